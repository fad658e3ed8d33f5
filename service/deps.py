"""FastAPI dependencies: the app's single settings, metrics and worker pool, and the
request body read under the upload limit."""

from __future__ import annotations

from fastapi import Request

from .codecs import Body, Kind, classify
from .errors import BadParameter, PayloadTooLarge, Unavailable
from .metrics import Metrics
from .settings import Settings
from .workers import WorkerPool


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_pool(request: Request) -> WorkerPool:
    pool = getattr(request.app.state, "pool", None)
    if pool is None:
        raise Unavailable("the model is not loaded yet", code="not_ready")
    return pool


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes: a declared
    Content-Length over the limit is refused before reading anything, and a chunked
    body is counted as it streams in, never buffered past the limit."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadParameter(f"bad Content-Length {declared!r}")
        if int(declared) > limit:
            raise PayloadTooLarge(f"the body is {int(declared)} bytes; the limit is {limit} (CDT_MAX_UPLOAD_MB)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"the body passed the limit of {limit} bytes (CDT_MAX_UPLOAD_MB)")
    return bytes(body)


async def receive_body(request: Request, accepted: tuple[Kind, ...], settings: Settings, pool: WorkerPool,
                       metrics: Metrics) -> Body:
    """The classified body of a request that will run a model job. Capacity is checked
    first, so an overloaded server answers 429 without taking the upload."""
    pool.check_capacity()
    data = await read_body(request, settings.max_upload_bytes)
    metrics.bytes_total.labels(request.scope["route"].path, "in").inc(len(data))
    return classify(request.headers.get("content-type"), data, accepted)
