"""Latents files: safetensors with one tensor `latents` (1,16,T',H'/8,W'/8) and string
metadata that says which model made them and how to crop the decode back exactly.

The same bytes serve files on disk (`save_latents`/`load_latents`) and HTTP bodies
(`latents_to_bytes`/`latents_from_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from model.cache import read_metadata
from model.config import LATENT_CHANNELS, SPACE_FACTOR, TIME_FACTOR

from .padding import Padding

LATENTS_FORMAT = "cdt-latents"
LATENTS_FORMAT_VERSION = 1
TENSOR_NAME = "latents"


class LatentsFileError(ValueError):
    """Bytes that are not a valid latents file."""


class ModelMismatchError(LatentsFileError):
    """Latents made by another model than the one asked to decode them."""


@dataclass
class LatentsFile:
    latents: torch.Tensor  # (1, 16, T', H'/8, W'/8)
    model_hash: str
    preset: str
    model_kind: str
    dtype: str  # compute dtype of the encode
    frames: int  # original clip, before padding
    height: int
    width: int
    fps: float
    padding: Padding

    def check_model(self, model_hash: str, force: bool = False) -> None:
        if self.model_hash != model_hash and not force:
            raise ModelMismatchError(
                f"latents were made by model {self.model_hash[:12]}, the checkpoint is {model_hash[:12]} "
                "(use the same checkpoint, or force to decode anyway)"
            )


def latents_to_bytes(item: LatentsFile) -> bytes:
    meta = {
        "format": LATENTS_FORMAT,
        "format_version": str(LATENTS_FORMAT_VERSION),
        "model_hash": item.model_hash,
        "preset": item.preset,
        "model_kind": item.model_kind,
        "dtype": item.dtype,
        "frames": str(item.frames),
        "height": str(item.height),
        "width": str(item.width),
        "fps": repr(float(item.fps)),
        "pad_frames": str(item.padding.frames),
        "pad_height": str(item.padding.height),
        "pad_width": str(item.padding.width),
    }
    _check_shape(item)
    return st_save({TENSOR_NAME: item.latents.detach().cpu().contiguous()}, metadata=meta)


def latents_from_bytes(data: bytes, model_hash: str | None = None, force: bool = False,
                       source: str = "latents") -> LatentsFile:
    """Parse and validate; with `model_hash`, refuse latents of another model unless `force`."""
    try:
        meta = read_metadata(data)
        tensors = st_load(data)
    except Exception as exc:  # safetensors and the header parser raise several types
        raise LatentsFileError(f"{source}: not a safetensors file ({exc})") from None
    if meta.get("format") != LATENTS_FORMAT:
        raise LatentsFileError(f"{source}: not a {LATENTS_FORMAT} file (format={meta.get('format')!r})")
    if meta.get("format_version") != str(LATENTS_FORMAT_VERSION):
        raise LatentsFileError(f"{source}: unsupported format version {meta.get('format_version')!r}")
    if TENSOR_NAME not in tensors:
        raise LatentsFileError(f"{source}: no tensor named {TENSOR_NAME!r}")
    try:
        item = LatentsFile(
            latents=tensors[TENSOR_NAME],
            model_hash=meta["model_hash"],
            preset=meta["preset"],
            model_kind=meta["model_kind"],
            dtype=meta["dtype"],
            frames=int(meta["frames"]),
            height=int(meta["height"]),
            width=int(meta["width"]),
            fps=float(meta["fps"]),
            padding=Padding(int(meta["pad_frames"]), int(meta["pad_height"]), int(meta["pad_width"])),
        )
    except (KeyError, ValueError) as exc:
        raise LatentsFileError(f"{source}: bad metadata ({exc})") from None
    try:
        _check_shape(item)
    except ValueError as exc:
        raise LatentsFileError(f"{source}: {exc}") from None
    if model_hash is not None:
        item.check_model(model_hash, force)
    return item


def _check_shape(item: LatentsFile) -> None:
    if item.padding != Padding.for_shape(item.frames, item.height, item.width):
        raise ValueError(f"padding {item.padding} does not fit {item.frames} frames of {item.height}x{item.width}")
    expected = (
        1,
        LATENT_CHANNELS,
        1 + (item.frames + item.padding.frames - 1) // TIME_FACTOR,
        (item.height + item.padding.height) // SPACE_FACTOR,
        (item.width + item.padding.width) // SPACE_FACTOR,
    )
    if tuple(item.latents.shape) != expected or not item.latents.is_floating_point():
        raise ValueError(f"latents {item.latents.dtype} {tuple(item.latents.shape)} do not match the metadata "
                         f"(expected float {expected})")


def save_latents(path: str | Path, item: LatentsFile) -> None:
    Path(path).write_bytes(latents_to_bytes(item))


def load_latents(path: str | Path, model_hash: str | None = None, force: bool = False) -> LatentsFile:
    path = Path(path)
    if not path.is_file():
        raise LatentsFileError(f"{path}: no such file")
    return latents_from_bytes(path.read_bytes(), model_hash, force, source=str(path))
