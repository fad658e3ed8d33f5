"""Client side of streaming sessions: cutting the input into chunks and assembling the
chunks' outputs. Used by the streaming calls of `cdt_client.client`, which retry a chunk with
the same `seq` (`cdt_client.retry`).

It needs only numpy and safetensors (no torch): the formats come from `cdt_client.formats`,
and a video file is decoded with PyAV, imported only when a video path is given.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable, Iterator

import httpx
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .formats.api import CHUNK_HEADER
from .formats.files import LATENTS_TENSOR, latents_metadata, read_latents_metadata
from .formats.tensors import safetensors_metadata
from .formats.video import display_size, displayed

VIDEO_EXTRA = "video"  # the client's extra that adds PyAV to its dependencies


def npy_body(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def npy_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def frame_chunks(source: str | Path | np.ndarray, chunk_frames: int) -> tuple[Iterator[np.ndarray], float | None]:
    """uint8 (n,H,W,3) chunks of a frames array or of a video file (decoded lazily), and the
    file's frame rate."""
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be at least 1, got {chunk_frames}")
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 4 or source.shape[3] != 3:
            raise ValueError(f"frames must be uint8 (T,H,W,3), got {source.dtype} {source.shape}")
        return (source[i : i + chunk_frames] for i in range(0, len(source), chunk_frames)), None
    return video_chunks(Path(source), chunk_frames)


def video_chunks(path: Path, chunk_frames: int) -> tuple[Iterator[np.ndarray], float | None]:
    """RGB frames of a video file as the service reads them (swscale's rgb24, cropped to the
    clip's recorded display size, turned by the stream's rotation)."""
    try:
        import av
    except ImportError:
        raise ImportError(f"reading frames from a video file needs PyAV: pip install 'cdt-client[{VIDEO_EXTRA}]', "
                          "or pass uint8 (T,H,W,3) frames") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    container = av.open(str(path))
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate

    def frames() -> Iterator[np.ndarray]:
        display = None
        for frame in container.decode(stream):
            display = display or display_size(container.metadata, frame.width, frame.height)
            yield np.ascontiguousarray(displayed(frame.to_ndarray(format="rgb24"), display, frame.rotation))

    def chunks() -> Iterator[np.ndarray]:
        with container:
            batch = []
            for rgb in frames():
                batch.append(rgb)
                if len(batch) == chunk_frames:
                    yield np.stack(batch)
                    batch = []
            if batch:
                yield np.stack(batch)

    return chunks(), float(rate) if rate else None


def latent_chunks(latents: np.ndarray, chunk_latents: int) -> Iterator[np.ndarray]:
    if chunk_latents < 1:
        raise ValueError(f"chunk_latents must be at least 1, got {chunk_latents}")
    return (latents[:, :, i : i + chunk_latents] for i in range(0, latents.shape[2], chunk_latents))


def read_latents(data: bytes) -> np.ndarray:
    """The `latents` tensor of a safetensors body (a chunk answer or a latents file)."""
    return st_load(data)[LATENTS_TENSOR]


def session_model(models: list[dict], finish_info: dict) -> dict:
    """The card (GET /v1/models) of the model a finished encode session ran on."""
    found = [card for card in models if card["hash"] == finish_info["model_hash"]]
    if not found:
        raise ValueError(f"the service no longer lists the session's model {finish_info['model_hash'][:12]}")
    return found[0]


def assemble_latents(parts: list[np.ndarray], finish_info: dict, model: dict, fps: float) -> bytes:
    """A latents file (the /v1/encode format) from a finished encode session's chunks and the
    card of its model."""
    latents = np.ascontiguousarray(np.concatenate(parts, axis=2), dtype=np.float32)
    clip = {key: finish_info[key] for key in ("frames", "height", "width", "pad_frames", "pad_height", "pad_width",
                                              "time_factor")}
    metadata = latents_metadata(model_name=finish_info["model"], model_hash=model["hash"], preset=model["preset"],
                                model_kind=model["kind"], dtype=model["dtype"], fps=fps, **clip)
    return st_save({LATENTS_TENSOR: latents}, metadata=metadata)


def chunk_info(response: httpx.Response) -> dict:
    return json.loads(response.headers[CHUNK_HEADER])


def decode_session_spec(source: str | Path | bytes | np.ndarray, steps: int, seed: int,
                        model: str | None = None) -> tuple[np.ndarray, dict, str | None]:
    """Latents (1,16,T,h,w), the decode session that takes them on `model` (None: the
    service's default) and the hash of the model that made them, when a latents file says:
    its metadata adds the original size, length and rate, so the output is cropped to them."""
    spec = {"kind": "decode", "steps": steps, "seed": seed, **({"model": model} if model is not None else {})}
    if isinstance(source, np.ndarray):
        if source.ndim != 5 or source.dtype.kind != "f":
            raise ValueError(f"latents must be float (1,16,T,h,w), got {source.dtype} {source.shape}")
        return source, spec, None
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    clip = read_latents_metadata(safetensors_metadata(data))
    spec.update({key: clip[key] for key in ("height", "width", "frames", "fps")})
    return read_latents(data).astype(np.float32, copy=False), spec, clip["model_hash"]


def model_named_by(models: list[dict], spec: dict, model_hash: str | None) -> dict:
    """`spec` with the model that made a latents file (`model_hash`) when the spec names none
    and the service serves it, as /v1/decode picks it."""
    if "model" in spec or model_hash is None:
        return spec
    found = [card["name"] for card in models if card["hash"] == model_hash]
    return {**spec, "model": found[0]} if found else spec


def concat_frames(parts: Iterable[np.ndarray]) -> np.ndarray:
    parts = [p for p in parts if p.size]
    return np.concatenate(parts) if parts else np.zeros((0, 0, 0, 3), np.uint8)
