"""The model as the routes and sessions see it: the bounds on DDIM steps (`check_steps`, the
configured one; `check_decode_steps`, the model's own), admission of a whole-clip request
(`admit`), and the model card (`model_card`)."""

from __future__ import annotations

from model import SPACE_FACTOR, TIME_FACTOR, Tokenizer, dtype_name

from .domain_errors import BadParameter, InvalidInput
from .memory import padded_pixels
from .settings import Settings
from .workers import Admission, WorkerPool


def check_steps(steps: int, settings: Settings) -> None:
    """CDT_MAX_STEPS, answered like the schema's own bounds (`bad_parameter`): the schema can
    only state the model's hard bound, the setting being read at start."""
    if steps > settings.max_steps:
        raise BadParameter(f"steps: must be at most {settings.max_steps} (CDT_MAX_STEPS), got {steps}")


def check_decode_steps(model: Tokenizer, steps: int) -> None:
    """The served checkpoint's bound on DDIM steps (its diffusion schedule may be shorter than the
    schema's bound), checked before any model job with the model's own check."""
    try:
        model.decode_steps(steps)
    except ValueError as exc:  # decode_steps' documented answer to steps it cannot run
        raise InvalidInput(str(exc)) from None


async def admit(pool: WorkerPool, owner: str, op: str, height: int, width: int,
                steps: int = 1) -> tuple[int, Admission]:
    """A whole-clip request's chunk length (pixel frames), once admitted to a device with the
    memory that chunk length takes there reserved. Its jobs are bulk work of `owner`, each
    costing its chunk's pixels times frames times steps (`service.scheduling`)."""
    worker = pool.choose()
    chunking = worker.memory_model.plan(op, height, width, steps)
    cost = chunking.chunk_frames * padded_pixels(height, width) * steps
    return chunking.chunk_frames, await worker.admit(chunking.bytes, pool.caller(owner), cost)


def model_card(pool: WorkerPool) -> dict:
    """What /v1/models and the model-info metric say about the served model."""
    model, identity = pool.model, pool.identity
    config = model.config
    return {
        "id": identity.content_hash[:12],
        "hash": identity.content_hash,
        "preset": config.preset,
        "kind": model.kind,
        "dtype": dtype_name(model.compute_dtype),
        "device": ",".join(worker.name for worker in pool.workers),
        "devices": [{"name": worker.name, "healthy": worker.healthy,
                     "memory_budget_bytes": worker.memory.total,
                     "memory_model": "fitted" if worker.memory_model.fitted else "one request at a time"}
                    for worker in pool.workers],
        "compression": {
            "time": TIME_FACTOR,
            "space": SPACE_FACTOR,
            "latent_channels": config.latent_channels,
            # RGB values per latent value: 3*4*8*8 pixels' channels over 16 channels.
            "ratio": 3 * TIME_FACTOR * SPACE_FACTOR**2 / config.latent_channels,
        },
    }
