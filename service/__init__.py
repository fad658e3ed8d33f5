"""The CDT HTTP service: FastAPI app, request body parsing, worker pool, metrics, auth.

Routes parse, validate and hand off to the worker pool; the pool and the model never
see a Request object. May import `model` and `media`; nothing imports `service` but
the CLI and clients.

`create_app` and `Settings` load on first use, so `service.client` (httpx and numpy
only) imports without the server's modules, torch or PyAV.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .app import create_app
    from .settings import Settings

__all__ = ["Settings", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "Settings":
        from .settings import Settings

        return Settings
    raise AttributeError(f"module 'service' has no attribute {name!r}")
