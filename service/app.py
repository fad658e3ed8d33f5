"""The app factory: `create_app(settings)` builds the FastAPI app; its lifespan loads
every served model on each device, starts the worker pool and, with CDT_REDIS_URL, connects to the
session store (in-process without it) and the snapshot store; on shutdown (`shutdown`) it hands its
sessions over (`SessionService.drain`) and finishes the accepted jobs before the process exits.

`cdt serve` runs `create_app` as a uvicorn factory, so settings come from the
environment once per process.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

import torch

from model import ModelIdentity, Tokenizer, bf16_is_fast, from_pretrained

from .errors import install_handlers
from .auth import principal_of
from .callers import Callers
from .catalog import Catalog, ServedModel, model_sources
from .devices import DeviceSlot, batch_max, compute_dtype, resolve, slots
from .host import HostPool
from .memory import MemoryModel, configure_allocator, default_budget
from .metrics import Metrics
from .ops import model_info
from .request_metrics import RequestMetricsMiddleware
from .routes import ROUTERS
from .sessions.service import SessionService
from .sessions.store import open_store
from .sessions.store.snapshot_store import open_snapshot_store
from .shutdown import on_stop
from .settings import Settings, mib
from .batching import Batching
from .workers import DeviceWorker, WorkerPool


log = logging.getLogger("cdt.service")


def load_models(settings: Settings, slots: list[DeviceSlot], dtype: str
                ) -> tuple[list[dict[str, Tokenizer]], Catalog]:
    """Every served model on each slot's device, by name (slots on one device share its copies:
    inference leaves a model unchanged), and the catalog of their identities (measuring each
    receptive field, which sessions size their input logs by, when the checkpoint records none)."""
    sources = model_sources(settings)
    if dtype == "bf16" and not all(bf16_is_fast(slot.device) for slot in slots):
        log.warning("CDT_DTYPE=bf16 on a device without fast bf16 arithmetic (a CPU without AVX512-BF16/AMX, "
                    "a GPU before compute capability 8.0): it is several times slower than fp32 there; unset "
                    "CDT_DTYPE to compute in fp32")
    copies: dict[torch.device, dict[str, Tokenizer]] = {}
    identities: dict[str, ModelIdentity] = {}
    for slot in slots:
        if slot.device not in copies:
            copies[slot.device] = {}
            for source in sources:
                model, identities[source.name] = from_pretrained(source.path, device=slot.device, dtype=dtype)
                copies[slot.device][source.name] = model
    first = copies[slots[0].device]
    catalog = Catalog([ServedModel(source.name, source.path, identities[source.name], first[source.name])
                       for source in sources])
    return [copies[slot.device] for slot in slots], catalog


def build_pool(settings: Settings, metrics: Metrics) -> WorkerPool:
    """A worker per device of CDT_DEVICES, each with every served model and a memory budget, and the
    host pool."""
    devices = resolve(settings.devices)
    device_slots = slots(devices)
    models, catalog = load_models(settings, device_slots, compute_dtype(settings.dtype, devices))
    cpu_workers = sum(slot.device.type == "cpu" for slot in device_slots)
    weights = {principal_of(key): weight for key, weight in settings.key_weights.items()}
    callers = Callers(weights, settings.key_queue_size, settings.key_rate, settings.key_burst, metrics)
    workers = []
    for slot, held in zip(device_slots, models):
        budget = (mib(settings.memory_budget_mb) if settings.memory_budget_mb
                  else default_budget(slot.device, settings.session_hot_bytes, max(1, cpu_workers)))
        memory = MemoryModel(slot.device.type, budget)
        if not memory.fitted:
            log.warning("no memory fit for %s devices (python -m benchmarks.memory_calibration --device %s): "
                        "requests on %s run one at a time in the shortest chunks", slot.device.type,
                        slot.device.type, slot.name)
        batching = Batching(batch_max(settings.batch_max, slot.device), settings.batch_wait_ms / 1000)
        workers.append(DeviceWorker(slot, held, memory, settings.queue_size, settings.request_timeout_s, metrics,
                                    callers, batching))
    return WorkerPool(workers, catalog, HostPool(settings.host_threads, metrics), callers, metrics)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        configure_allocator()
        pool = await asyncio.to_thread(build_pool, settings, metrics)
        for served in pool.models:
            metrics.model_info.labels(served.name).info(model_info(pool, served, settings))
        pool.start()
        app.state.pool = pool
        app.state.store = open_store(settings.redis_url, settings.session_key_prefix)
        snapshot_store = open_snapshot_store(settings.session_snapshot_store, app.state.store,
                                             settings.session_key_prefix)
        app.state.sessions = sessions = SessionService(app.state.store, snapshot_store, pool, settings, metrics)
        sessions.start()
        try:
            with on_stop(sessions.drain):
                yield
                await sessions.drain()  # started by the signal, or now
        finally:
            await pool.stop()
            await sessions.close()
            await app.state.store.close()

    app = FastAPI(
        title="CDT video tokenizer",
        summary="Encode videos to latents and decode latents to videos (causal encoder + diffusion decoder).",
        version="1",
        lifespan=lifespan,
        generate_unique_id_function=lambda route: route.name,  # operationIds: the handlers' names
    )
    app.state.settings = settings
    app.state.metrics = metrics
    install_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.openapi = lambda: openapi_schema(app, settings)
    return app


def openapi_schema(app: FastAPI, settings: Settings) -> dict:
    """FastAPI's schema, without the 422 `HTTPValidationError` it documents on every route with
    parameters (request validation fails here with 400 `bad_parameter`, errors.py, as each route
    documents), and with DDIM steps bounded by this replica's CDT_MAX_STEPS rather than the
    model's limit the routes declare."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        generated = {"$ref": "#/components/schemas/HTTPValidationError"}
        for operation in (op for path in schema["paths"].values() for op in path.values()):
            if operation["responses"].get("422", {}).get("content", {}).get("application/json", {}).get(
                    "schema") == generated:
                del operation["responses"]["422"]
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "steps":
                    parameter["schema"]["maximum"] = settings.max_steps
        for name in ("HTTPValidationError", "ValidationError"):
            schema["components"]["schemas"].pop(name, None)
        for model in schema["components"]["schemas"].values():
            if "steps" in model.get("properties", {}):
                model["properties"]["steps"]["maximum"] = settings.max_steps
        app.openapi_schema = schema
    return app.openapi_schema
