"""Client side of streaming sessions: cutting the input into chunks and assembling the
chunks' outputs. Used by the streaming calls of `service.client`, which retry a chunk with
the same `seq` (`service.client_retry`).

It needs only numpy and safetensors (no torch): the client imports nothing of `media` or
`model`, so it reads and writes the latents file format (`media.latents_file`: one tensor
`latents`, cdt-latents string metadata) with safetensors' numpy API, and decodes a video
file with PyAV, imported only when a video path is given.
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

LATENTS_TENSOR = "latents"
LATENTS_FORMAT = "cdt-latents"
LATENTS_FORMAT_VERSION = "1"
DISPLAY_SIZE_TAG = "cdt_display_size"  # the true size of an odd-sized clip written by `media.video`
VIDEO_EXTRA = "client-video"  # the pyproject extra that adds PyAV to the client's dependencies


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
        raise ImportError(f"reading frames from a video file needs PyAV: pip install av (the {VIDEO_EXTRA!r} "
                          "extra), or pass uint8 (T,H,W,3) frames") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    container = av.open(str(path))
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    tag = container.metadata.get(DISPLAY_SIZE_TAG, "")
    display = tuple(int(v) for v in tag.split("x")) if tag else None

    def frames() -> Iterator[np.ndarray]:
        for frame in container.decode(stream):
            rgb = frame.to_ndarray(format="rgb24")
            if display:
                rgb = rgb[: display[1], : display[0]]
            if frame.rotation % 360:
                rgb = np.rot90(rgb, k=round(frame.rotation / 90) % 4)  # counter-clockwise degrees
            yield np.ascontiguousarray(rgb)

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


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The string metadata of a safetensors file: an 8-byte little-endian header length, then
    a JSON header whose `__metadata__` holds it."""
    try:
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + length])
        return dict(header.get("__metadata__") or {})
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"not a safetensors file ({exc})") from None


def assemble_latents(parts: list[np.ndarray], finish_info: dict, model: dict, fps: float) -> bytes:
    """A latents file (the /v1/encode format) from a finished encode session's chunks."""
    latents = np.ascontiguousarray(np.concatenate(parts, axis=2), dtype=np.float32)
    metadata = {
        "format": LATENTS_FORMAT, "format_version": LATENTS_FORMAT_VERSION, "model_hash": model["hash"],
        "preset": model["preset"], "model_kind": model["kind"], "dtype": model["dtype"],
        "frames": str(finish_info["frames"]), "height": str(finish_info["height"]),
        "width": str(finish_info["width"]), "fps": repr(float(fps)), "pad_frames": str(finish_info["pad_frames"]),
        "pad_height": str(finish_info["pad_height"]), "pad_width": str(finish_info["pad_width"]),
    }
    return st_save({LATENTS_TENSOR: latents}, metadata=metadata)


def chunk_info(response: httpx.Response) -> dict:
    return json.loads(response.headers["x-cdt-chunk"])


def decode_session_spec(source: str | Path | bytes | np.ndarray, steps: int,
                        seed: int) -> tuple[np.ndarray, dict]:
    """Latents (1,16,T,h,w) and the decode session that takes them: a latents file's
    metadata adds the original size, length and rate, so the output is cropped to them."""
    spec = {"kind": "decode", "steps": steps, "seed": seed}
    if isinstance(source, np.ndarray):
        if source.ndim != 5 or source.dtype.kind != "f":
            raise ValueError(f"latents must be float (1,16,T,h,w), got {source.dtype} {source.shape}")
        return source, spec
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    meta = safetensors_metadata(data)
    if meta.get("format") != LATENTS_FORMAT:
        raise ValueError(f"not a {LATENTS_FORMAT} file (format={meta.get('format')!r})")
    spec.update(height=int(meta["height"]), width=int(meta["width"]), frames=int(meta["frames"]),
                fps=float(meta["fps"]))
    return read_latents(data).astype(np.float32, copy=False), spec


def concat_frames(parts: Iterable[np.ndarray]) -> np.ndarray:
    parts = [p for p in parts if p.size]
    return np.concatenate(parts) if parts else np.zeros((0, 0, 0, 3), np.uint8)
