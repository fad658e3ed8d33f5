"""The CDT HTTP service: FastAPI app, request body parsing, worker pool, metrics, auth.

Routes parse, validate and hand off to the worker pool; the pool and the model never
see a Request object. May import `model` and `media`; nothing imports `service` but
the CLI and clients.
"""

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]
