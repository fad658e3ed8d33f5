"""What the route handlers depend on, as `Annotated` aliases to put in their signatures: the
app's settings, metrics, worker pool and session service, the caller (`Owner`), the
request-size limits, the request body (`UploadDep`), the served model a request names
(`ModelDep`, its `model` query parameter), and the query parameters several routes share."""

from __future__ import annotations

from typing import Annotated, AsyncIterator

from cdt_client.formats.api import MAX_QUERY_SEED
from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials

from media.video import MAX_FPS
from model import NUM_TIMESTEPS

from .auth import BEARER, principal
from .bodies import SNIFF_BYTES, Body, BodyFormat, Limits, classify, spool
from .catalog import ServedModel
from .domain_errors import BadParameter, TooLarge, Unavailable
from .metrics import Metrics
from .sessions.service import SessionService
from .settings import Settings
from .workers import WorkerPool

MAX_SIZE = 2**16  # a resize target past any CDT_MAX_SIDE: keeps the size arithmetic finite


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_pool(request: Request) -> WorkerPool:
    pool = getattr(request.app.state, "pool", None)
    if pool is None:
        raise Unavailable("the model is not loaded yet", code="not_ready")
    return pool


def get_sessions(request: Request) -> SessionService:
    sessions = getattr(request.app.state, "sessions", None)
    if sessions is None:
        raise Unavailable("the model is not loaded yet", code="not_ready")
    return sessions


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
PoolDep = Annotated[WorkerPool, Depends(get_pool)]
SessionsDep = Annotated[SessionService, Depends(get_sessions)]


def get_limits(settings: SettingsDep) -> Limits:
    return Limits.of(settings)


LimitsDep = Annotated[Limits, Depends(get_limits)]


def require_api_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
                    settings: SettingsDep) -> str:
    return principal(credentials, settings.keys)


Owner = Annotated[str, Depends(require_api_key)]


class Upload:
    """A request's body, read only once the worker pool has room for the request (so an
    overloaded server answers 429 without taking the upload), and refused with 413 as soon as
    it passes the upload limit: a declared Content-Length over it before anything is read, a
    chunked body as it streams in."""

    def __init__(self, request: Request, limit: int, pool: WorkerPool, metrics: Metrics, caller: str) -> None:
        self._request, self._limit, self._pool, self._metrics = request, limit, pool, metrics
        self._caller = caller

    async def spooled(self, accepted: tuple[BodyFormat, ...]) -> Body:
        """The body in a temporary file, classified (UnsupportedFormat unless one of `accepted`)."""
        head, size, file = b"", 0, None
        try:
            async for chunk in self._parts():
                size += len(chunk)
                if file is None:
                    head += chunk
                    if len(head) >= SNIFF_BYTES:
                        file, chunk = spool(head), head
                if file is not None:
                    file.write(chunk)
            fmt = classify(self._request.headers.get("content-type"), head[:SNIFF_BYTES], size, accepted)
            if file is None:
                file = spool(head)
                file.write(head)
            file.flush()
            return Body(fmt, file, size)
        except BaseException:
            if file is not None:
                file.close()
            raise

    async def in_memory(self) -> bytes:
        """The body's bytes, for the bodies no parser here reads (raw tensors, images)."""
        data = b"".join([part async for part in self._parts()])
        if not data:
            raise BadParameter("the request body is empty", code="empty_body")
        return data

    async def _parts(self) -> AsyncIterator[bytes]:
        self._pool.check_capacity(self._caller)
        limit = self._limit
        declared = self._request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise BadParameter(f"bad Content-Length {declared!r}")
            if int(declared) > limit:
                raise TooLarge(f"the body is {int(declared)} bytes; the limit is {limit} (CDT_MAX_UPLOAD_MB)")
        size = 0
        async for part in self._request.stream():
            size += len(part)
            if size > limit:
                raise TooLarge(f"the body passed the limit of {limit} bytes (CDT_MAX_UPLOAD_MB)")
            yield part
        self._metrics.bytes_total.labels(self._request.scope["route"].path, "in").inc(size)


def get_upload(request: Request, settings: SettingsDep, pool: PoolDep, metrics: MetricsDep, owner: Owner) -> Upload:
    return Upload(request, settings.max_upload_bytes, pool, metrics, owner)


UploadDep = Annotated[Upload, Depends(get_upload)]


ModelQuery = Annotated[str | None, Query(max_length=64, description=(
    "the served model to use, by name (GET /v1/models); default: the first"))]


def get_model(pool: PoolDep, model: ModelQuery = None) -> ServedModel:
    """The request's model, found before its body is read (404 `model_not_found`)."""
    return pool.models.get(model)


def get_asked_model(pool: PoolDep, model: Annotated[str | None, Query(max_length=64, description=(
        "the served model to decode with, by name (GET /v1/models); it must be the one that made the latents "
        "(409 `model_mismatch`); default: that one if served here, else the first"))] = None) -> ServedModel | None:
    """The model a decode of a latents file names, if it names one (404 `model_not_found`)."""
    return None if model is None else pool.models.get(model)


ModelDep = Annotated[ServedModel, Depends(get_model)]
AskedModelDep = Annotated[ServedModel | None, Depends(get_asked_model)]

# Query parameters of several routes.
FramesQuery = Annotated[int | None, Query(ge=1, description="use the first N frames (422 if fewer)")]
SizeQuery = Annotated[int | None, Query(ge=1, le=MAX_SIZE, description="resize so the short side is S")]
FpsQuery = Annotated[float | None, Query(gt=0, le=MAX_FPS,
                                         description="rate recorded for inputs that carry none (npy); default 30")]
StepsQuery = Annotated[int, Query(ge=1, le=NUM_TIMESTEPS,
                                  description="diffusion decoding steps, at most CDT_MAX_STEPS")]
SeedQuery = Annotated[int, Query(ge=0, le=MAX_QUERY_SEED, description="decoding noise seed")]
