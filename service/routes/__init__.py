"""HTTP routes: parse, validate, hand off to the worker pool, encode the response."""

from . import clips, health, sessions

ROUTERS = (health.router, clips.router, sessions.router)
