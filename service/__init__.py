"""The CDT HTTP service: FastAPI app, request body parsing, worker pool, metrics, auth.

Routes parse, validate and hand off to the worker pool; the pool and the model never
see a Request object. May import `model`, `media` and the formats of `cdt_client`;
nothing imports `service` but the CLI.

`create_app` and `Settings` load on first use, so a module of `service` (the CLI's media
commands take `service.settings`) imports without the app and its routes.
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
