"""Model jobs: plain functions of the model that the worker pool runs in its thread.

Model-side ValueErrors (shapes the codecs let through) surface as 422 `invalid_input`
through `model_errors`, never as 500.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np

from media import LatentsFile, decode_frames
from model import Tokenizer, dtype_name
from model.config import SPACE_FACTOR, TIME_FACTOR

from .errors import InvalidInput


def decode_clip(model: Tokenizer, item: LatentsFile, steps: int, seed: int) -> np.ndarray:
    """uint8 (T,H,W,3) frames cropped to the size and length in the latents' metadata."""
    return np.concatenate(list(decode_frames(model, item, steps=steps, seed=seed)))


@contextmanager
def model_errors() -> Iterator[None]:
    try:
        yield
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None



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
