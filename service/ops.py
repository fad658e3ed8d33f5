"""The model as the routes see it: its ValueErrors (shapes the body parsers let through)
surface as 422 `invalid_input` through `model_errors`, never as 500; `check_steps`
applies the configured bound on DDIM steps; `model_card` describes it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from model import SPACE_FACTOR, TIME_FACTOR, Tokenizer, dtype_name

from .domain_errors import BadParameter, InvalidInput
from .settings import Settings


@contextmanager
def model_errors() -> Iterator[None]:
    try:
        yield
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


def check_steps(steps: int, settings: Settings) -> None:
    """CDT_MAX_STEPS, answered like the schema's own bounds (400 `bad_parameter`): the schema
    can only state the model's hard bound, the setting being read at start."""
    if steps > settings.max_steps:
        raise BadParameter(f"steps: must be at most {settings.max_steps} (CDT_MAX_STEPS), got {steps}")


def model_card(model: Tokenizer, device: str) -> dict:
    """What /v1/models and the model-info metric say about the served model."""
    config = model.config
    return {
        "id": model.content_hash()[:12],
        "hash": model.content_hash(),
        "preset": config.preset,
        "kind": model.kind,
        "dtype": dtype_name(model.compute_dtype),
        "device": device,
        "compression": {
            "time": TIME_FACTOR,
            "space": SPACE_FACTOR,
            "latent_channels": config.latent_channels,
            # RGB values per latent value: 3*4*8*8 pixels' channels over 16 channels.
            "ratio": 3 * TIME_FACTOR * SPACE_FACTOR**2 / config.latent_channels,
        },
    }
