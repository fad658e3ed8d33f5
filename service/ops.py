"""The models as the routes and sessions see them: the bounds on DDIM steps (`check_steps`, the
configured one; `check_decode_steps`, the model's own), admission of a whole-clip request for
one model (`admit`), and each model's card (`model_card`)."""

from __future__ import annotations

from model import SPACE_FACTOR, Tokenizer, dtype_name

from .catalog import ServedModel
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


async def admit(pool: WorkerPool, served: ServedModel, owner: str, op: str, height: int, width: int,
                steps: int = 1) -> tuple[int, Admission]:
    """A whole-clip request's chunk length (pixel frames), once admitted to a device for `served`
    with the memory that chunk length of that model takes there reserved. Its jobs are bulk work of
    `owner`, each costing its chunk's pixels times frames times steps (`service.scheduling`)."""
    worker = pool.choose()
    chunking = worker.memory_model.plan(served.config, op, height, width, steps)
    cost = chunking.chunk_frames * padded_pixels(height, width) * steps
    return chunking.chunk_frames, await worker.admit(chunking.bytes, pool.caller(owner), cost, served.name)


def frames_rule(time_factor: int) -> str:
    return f"1+{time_factor}k"


def model_card(pool: WorkerPool, served: ServedModel, settings: Settings) -> dict:
    """What /v1/models says about one served model."""
    model, config, field = served.reference, served.config, served.identity.receptive_field
    tf = served.time_factor
    return {
        "name": served.name,
        "default": served is pool.models.default,
        "id": served.content_hash[:12],
        "hash": served.content_hash,
        "preset": config.preset,
        "kind": model.kind,
        "dtype": dtype_name(model.compute_dtype),
        "parameters": sum(p.numel() for p in model.parameters()),
        # What the model's copy on each device takes (the weights, in the compute dtype).
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "device": ",".join(worker.name for worker in pool.workers),
        "devices": [{"name": worker.name, "healthy": worker.healthy,
                     "memory_budget_bytes": worker.memory.total,
                     "memory_model": "fitted" if worker.memory_model.fitted else "one request at a time"}
                    for worker in pool.workers],
        "compression": {
            "time": tf,
            "space": SPACE_FACTOR,
            "latent_channels": config.latent_channels,
            "label": f"{tf}x{SPACE_FACTOR}x{SPACE_FACTOR}",
            # RGB values per latent value: 3*t*8*8 pixels' channels over 16 channels.
            "ratio": 3 * tf * SPACE_FACTOR**2 / config.latent_channels,
        },
        "frames_rule": frames_rule(tf),
        "receptive_field": {"encode_frames": field.encode, "decode_base_latents": field.decode_base,
                            "decode_per_step_latents": field.decode_per_step},
        # DDIM steps a decode may take: CDT_MAX_STEPS, within the model's diffusion levels.
        "max_steps": min(settings.max_steps, config.num_timesteps),
    }


def model_info(pool: WorkerPool, served: ServedModel, settings: Settings) -> dict[str, str]:
    """The model-info metric's values of one served model: its card's flat entries."""
    return {key: str(value) for key, value in model_card(pool, served, settings).items()
            if not isinstance(value, (dict, list))}
