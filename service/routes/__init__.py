"""HTTP routes: parse and validate, hand off to the worker pool or the session service, render
the response. What a handler depends on comes from `service.deps`; the errors it meets are
domain errors (`service.domain_errors`), answered by `service.errors`."""

from . import clips, diffusers_remote, frames, health, page, sessions

ROUTERS = (health.router, clips.router, frames.router, sessions.router, diffusers_remote.router, page.router)
