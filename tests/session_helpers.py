"""Helpers for session tests: real frames from a shared clip, bodies, and parsing answers."""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from safetensors.torch import load as st_load

from media import read_video

CLIP = "cotracker__cat.mp4"  # 368x480 portrait, 87 frames
SIZE = 36  # short side: 36x47 frames, neither side a multiple of 8


def real_frames(shared_videos, count: int, size: int = SIZE) -> np.ndarray:
    """uint8 (T,H,W,3) from a real clip, its short side resized to `size` (by default so that
    neither side is a multiple of 8)."""
    return read_video(shared_videos / CLIP, num_frames=count, size=size).frames


def npy_bytes(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def npy_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def latents_of(data: bytes) -> torch.Tensor:
    return st_load(data)["latents"]


def chunk_info(response) -> dict:
    return json.loads(response.headers["x-cdt-chunk"])


def split(total: int, sizes: list[int]) -> list[tuple[int, int]]:
    """Consecutive (start, stop) chunks with the given sizes, cycled until `total` frames."""
    out, start, i = [], 0, 0
    while start < total:
        stop = min(total, start + sizes[i % len(sizes)])
        out.append((start, stop))
        start, i = stop, i + 1
    return out
