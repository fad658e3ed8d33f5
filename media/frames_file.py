"""Frames as tensor files: `.safetensors` (tensor `frames`, fps in the metadata; the format is
`cdt_client.formats.files`) or `.npy` (the bare array; loaded with allow_pickle=False). Both
hold uint8 (T,H,W,3) RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from cdt_client.formats.files import FRAMES_TENSOR, frames_metadata
from cdt_client.formats.tensors import safetensors_metadata

from .video import check_frames

FRAME_FILE_SUFFIXES = (".safetensors", ".npy")


class FramesFileError(ValueError):
    """A frames file that is missing, malformed or not uint8 (T,H,W,3)."""


def is_frames_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in FRAME_FILE_SUFFIXES


def save_frames(path: str | Path, frames: np.ndarray, fps: float | None = None) -> None:
    check_frames(frames)
    path = Path(path)
    if path.suffix.lower() == ".npy":
        np.save(path, np.ascontiguousarray(frames), allow_pickle=False)
    elif path.suffix.lower() == ".safetensors":
        path.write_bytes(st_save({FRAMES_TENSOR: np.ascontiguousarray(frames)}, metadata=frames_metadata(fps)))
    else:
        raise FramesFileError(f"{path}: frames files end in {' or '.join(FRAME_FILE_SUFFIXES)}")


def load_frames(path: str | Path) -> tuple[np.ndarray, float | None]:
    """The frames and their fps (None when the file does not say, as in `.npy`)."""
    path = Path(path)
    if not path.is_file():
        raise FramesFileError(f"{path}: no such file")
    fps = None
    try:
        if path.suffix.lower() == ".npy":
            frames = np.load(path, allow_pickle=False)
        else:
            data = path.read_bytes()
            meta = safetensors_metadata(data)
            frames = st_load(data)[FRAMES_TENSOR]
            fps = float(meta["fps"]) if "fps" in meta else None
    except Exception as exc:  # numpy and safetensors raise many types for bad files
        raise FramesFileError(f"{path}: not a frames file ({type(exc).__name__}: {exc})") from None
    try:
        check_frames(frames)
    except ValueError as exc:
        raise FramesFileError(f"{path}: {exc}") from None
    return frames, fps
