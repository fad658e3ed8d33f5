"""Operations endpoints: liveness, readiness, the served models' cards, Prometheus metrics."""

from __future__ import annotations

import asyncio

from typing import Literal

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from ..auth import AUTH_ERRORS
from ..deps import MetricsDep, PoolDep, SettingsDep, require_api_key
from ..errors import error_response, error_responses
from ..ops import model_card
from ..sessions.service import SessionService
from ..workers import WorkerPool

STORE_PING_TIMEOUT_S = 1.0

NOT_READY = error_responses({503: "`not_ready`: the model is not loaded yet, a device has failed, the session "
                                  "store does not answer, or the replica is stopping"})
NOT_ALIVE = error_responses({503: "`not_ready`: every device of this replica has failed: restart it"})

router = APIRouter(tags=["operations"])


class Alive(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    checks: dict[str, bool]


@router.get("/healthz", summary="the process is alive and has a working device", response_model=Alive,
            responses=NOT_ALIVE)
async def healthz(request: Request):
    pool: WorkerPool | None = getattr(request.app.state, "pool", None)
    if pool is not None and not pool.healthy:
        return error_response(503, "not_ready", "every device of this replica has failed")
    return Alive(status="ok")


@router.get("/readyz", summary="the model is loaded, every device works, and the session store (if configured) "
                               "answers", response_model=Ready, responses=NOT_READY)
async def readyz(request: Request, settings: SettingsDep):
    pool: WorkerPool | None = getattr(request.app.state, "pool", None)
    checks = {"model": pool is not None and pool.running}
    for worker in pool.workers if pool is not None else ():
        checks[f"device {worker.name}"] = worker.healthy
    sessions: SessionService | None = getattr(request.app.state, "sessions", None)
    checks["accepting"] = sessions is not None and not sessions.draining  # not stopping
    if settings.redis_url:
        checks["session_store"] = sessions is not None and await _pings(sessions)
    failing = [name for name, ok in checks.items() if not ok]
    if failing:
        return error_response(503, "not_ready", f"not ready: {', '.join(failing)}")
    return Ready(status="ready", checks=checks)


async def _pings(sessions: SessionService) -> bool:
    try:
        await asyncio.wait_for(sessions.ping_store(), STORE_PING_TIMEOUT_S)
        return True
    except Exception:  # any failure to answer means "not reachable"; the reason is not the probe's business
        return False


@router.get("/v1/models", summary="the served models, the default first: name, hash, preset, compression, frames "
                                  "rule, dtype, receptive field, max steps, weights, devices",
            dependencies=[Depends(require_api_key)], responses={**AUTH_ERRORS, **NOT_READY})
async def models(pool: PoolDep, settings: SettingsDep) -> dict:
    return {"models": [model_card(pool, served, settings) for served in pool.models]}


@router.get("/metrics", summary="Prometheus metrics of this process", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
