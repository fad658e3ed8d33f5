"""Client side of streaming sessions: cutting the input into chunks and assembling the
chunks' outputs. Used by `Client.stream_encode` / `Client.stream_decode`, which retry a
chunk with the same `seq` (`service.client_retry`)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable, Iterator

import httpx
import numpy as np
import torch
from safetensors.numpy import load as st_load_numpy

from media import LatentsFile, Padding, VideoReader
from media.latents_file import latents_from_bytes, latents_to_bytes

def npy_body(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def frame_chunks(source: str | Path | np.ndarray, chunk_frames: int) -> tuple[Iterator[np.ndarray], float | None]:
    """uint8 (n,H,W,3) chunks of a video file (decoded lazily) or of a frames array."""
    if isinstance(source, np.ndarray):
        return (source[i : i + chunk_frames] for i in range(0, len(source), chunk_frames)), None
    reader = VideoReader(source)

    def chunks() -> Iterator[np.ndarray]:
        with reader:
            yield from reader.chunks(chunk_frames)

    return chunks(), reader.fps


def latent_chunks(latents: np.ndarray, chunk_latents: int) -> Iterator[np.ndarray]:
    return (latents[:, :, i : i + chunk_latents] for i in range(0, latents.shape[2], chunk_latents))


def read_latents(data: bytes) -> np.ndarray:
    return st_load_numpy(data)["latents"]


def assemble_latents(parts: list[np.ndarray], finish_info: dict, model: dict, fps: float) -> bytes:
    """A latents file (the /v1/encode format) from a finished encode session's chunks."""
    item = LatentsFile(
        latents=torch.from_numpy(np.concatenate(parts, axis=2)),
        model_hash=model["hash"], preset=model["preset"], model_kind=model["kind"], dtype=model["dtype"],
        frames=finish_info["frames"], height=finish_info["height"], width=finish_info["width"], fps=fps,
        padding=Padding(finish_info["pad_frames"], finish_info["pad_height"], finish_info["pad_width"]),
    )
    return latents_to_bytes(item)


def chunk_info(response: httpx.Response) -> dict:
    return json.loads(response.headers["x-cdt-chunk"])


def parse_latents_source(source: str | Path | bytes | np.ndarray) -> tuple[np.ndarray, LatentsFile | None]:
    """Latents (1,16,T,h,w) and, for a latents file, its metadata (original size, fps)."""
    if isinstance(source, np.ndarray):
        return source, None
    data = Path(source).read_bytes() if not isinstance(source, bytes) else source
    item = latents_from_bytes(data)
    return item.latents.float().numpy(), item


def concat_frames(parts: Iterable[np.ndarray]) -> np.ndarray:
    parts = [p for p in parts if p.size]
    return np.concatenate(parts) if parts else np.zeros((0, 0, 0, 3), np.uint8)
