"""FastAPI dependencies: the app's single settings, metrics and worker pool, and the
request body spooled to disk under the upload limit."""

from __future__ import annotations

from fastapi import Request

from .bodies import SNIFF_BYTES, Body, BodyFormat, classify, spool
from .domain_errors import BadParameter, TooLarge, Unavailable
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


async def receive_body(request: Request, accepted: tuple[BodyFormat, ...], settings: Settings, pool: WorkerPool,
                       metrics: Metrics) -> Body:
    """The classified body of a request that will run a model job, spooled to a temporary
    file. Capacity is checked first, so an overloaded server answers 429 without taking
    the upload. The body is refused with 413 as soon as it passes the upload limit: a
    declared Content-Length over it before anything is read, a chunked body as it
    streams in."""
    pool.check_capacity()
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadParameter(f"bad Content-Length {declared!r}")
        if int(declared) > limit:
            raise TooLarge(f"the body is {int(declared)} bytes; the limit is {limit} (CDT_MAX_UPLOAD_MB)")
    head, size, file = b"", 0, None
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"the body passed the limit of {limit} bytes (CDT_MAX_UPLOAD_MB)")
            if file is None:
                head += chunk
                if len(head) >= SNIFF_BYTES:
                    file, chunk = spool(head), head
            if file is not None:
                file.write(chunk)
        metrics.bytes_total.labels(request.scope["route"].path, "in").inc(size)
        kind = classify(request.headers.get("content-type"), head[:SNIFF_BYTES], size, accepted)
        if file is None:
            file = spool(head)
            file.write(head)
        file.flush()
        return Body(kind, file, size)
    except BaseException:
        if file is not None:
            file.close()
        raise
