"""HTTP routes: parse, validate, hand off to the worker pool, encode the response."""

from . import clips, diffusers_remote, frames, health, page, sessions

ROUTERS = (health.router, clips.router, frames.router, sessions.router, diffusers_remote.router, page.router)
