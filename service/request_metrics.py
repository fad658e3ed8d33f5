"""HTTP request latency, by route template and status (`cdt_request_seconds`)."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import Metrics

UNMATCHED = "unmatched"  # requests to unknown paths share one label: no unbounded cardinality


class RequestMetricsMiddleware:
    """Request latency by route template and status, measured until the last body byte
    is sent. Plain ASGI (not BaseHTTPMiddleware), so responses are not re-buffered."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", UNMATCHED)
            self.metrics.request_seconds.labels(endpoint, str(status)).observe(time.perf_counter() - start)
