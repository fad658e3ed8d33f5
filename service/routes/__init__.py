"""HTTP routes: parse, validate, hand off to the worker pool, encode the response."""

from . import clips, health

ROUTERS = (health.router, clips.router)
