"""HTTP routes: parse, validate, hand off to the worker pool, encode the response."""

from . import clips, frames, health, page, sessions

ROUTERS = (health.router, clips.router, frames.router, sessions.router, page.router)
