"""Response bodies rendered as they are produced.

Frames go out as mp4 (fragmented, so it needs no seek back), npy or safetensors (tensor
`frames`); the tensor formats' headers follow from the clip's metadata, so the header is
sent first and the frames after it, chunk by chunk, with an exact Content-Length.
Latents are spooled to a temporary file as chunks are encoded (along time, while the
file's layout is channel-major), then sent from it.
"""

from __future__ import annotations

import json
import tempfile
from typing import Iterator

import numpy as np
import torch
from cdt_client.formats.api import METADATA_HEADER, NPY, SAFETENSORS
from cdt_client.formats.files import FRAMES_TENSOR, LATENTS_TENSOR, frames_metadata
from cdt_client.formats.tensors import npy_header, safetensors_header

from media import LatentsInfo, VideoWriter

from .bodies import MP4

FRAME_FORMATS = {"mp4": MP4, "npy": NPY, "safetensors": SAFETENSORS}
_READ_BYTES = 1 << 20  # bytes per read when sending a spooled file


class _Sink:
    """A write-only byte buffer that hands over what was written since the last drain."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def drain(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


class FrameStream:
    """uint8 (T,H,W,3) frames of a clip of known shape, rendered chunk by chunk: `header()`,
    then `write(frames)` per chunk, then `close()`; each returns the bytes to send."""

    def __init__(self, fmt: str, frames: int, height: int, width: int, fps: float) -> None:
        self.fmt, self.media_type = fmt, FRAME_FORMATS[fmt]
        self.shape = (frames, height, width, 3)
        self._sink = _Sink()
        self._writer = VideoWriter(self._sink, width, height, fps, fragmented=True) if fmt == "mp4" else None
        self._header = {"mp4": b"", "npy": npy_header(np.uint8, self.shape),
                        "safetensors": safetensors_header(FRAMES_TENSOR, "U8", self.shape, frames_metadata(fps))}[fmt]

    @property
    def content_length(self) -> int | None:
        """Exact body size for the tensor formats; None for mp4 (known only at the end)."""
        return None if self._writer else len(self._header) + int(np.prod(self.shape))

    def header(self) -> bytes:
        return self._header

    def write(self, frames: np.ndarray) -> bytes:
        if self._writer is None:
            return np.ascontiguousarray(frames).tobytes()
        self._writer.write(frames)
        return self._sink.drain()

    def close(self) -> bytes:
        if self._writer is None:
            return b""
        self._writer.close()
        return self._sink.drain()


def render_frames(frames: np.ndarray, fps: float, fmt: str) -> tuple[bytes, str]:
    """A whole uint8 (T,H,W,3) clip as one mp4, npy or safetensors body."""
    stream = FrameStream(fmt, *frames.shape[:3], fps)
    return stream.header() + stream.write(frames) + stream.close(), stream.media_type


class LatentSpool:
    """Latent chunks (1,16,t,h,w) in a temporary file, sent as one latents file.

    Chunks arrive along time; the file is channel-major, so each channel's rows are
    gathered from every chunk as the body is sent."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()
        self._chunks: list[tuple[int, int]] = []  # (offset, latent frames)
        self._plane: tuple[int, int, int] | None = None  # (channels, h, w)

    @property
    def frames(self) -> int:
        return sum(t for _, t in self._chunks)

    def append(self, latents: torch.Tensor) -> None:
        """Spool a chunk of host latents (the encode job copies them off the device: the event
        loop, which calls this, never waits on it)."""
        if latents.shape[2] == 0:
            return
        array = latents[0].float().contiguous().numpy()
        self._plane = (array.shape[0], *array.shape[2:])
        self._chunks.append((self._file.seek(0, 2), array.shape[1]))
        self._file.write(array.tobytes())

    def body(self, info: LatentsInfo, fmt: str) -> tuple[bytes, Iterator[bytes], str, dict[str, str]]:
        """(header, the data's parts, media type, response headers) of the latents file."""
        channels, h, w = self._plane
        shape = (1, channels, self.frames, h, w)
        if fmt == "npy":
            header, media_type = npy_header(np.float32, shape), NPY
            headers = {METADATA_HEADER: json.dumps(info.metadata(), sort_keys=True)}
        else:
            header, media_type, headers = safetensors_header(LATENTS_TENSOR, "F32", shape, info.metadata()), \
                SAFETENSORS, {}
        return header, self._data(channels, h * w * 4), media_type, headers

    def _data(self, channels: int, frame_bytes: int) -> Iterator[bytes]:
        for c in range(channels):
            for offset, t in self._chunks:
                self._file.seek(offset + c * t * frame_bytes)
                remaining = t * frame_bytes
                while remaining:
                    part = self._file.read(min(remaining, _READ_BYTES))
                    remaining -= len(part)
                    yield part

    def nbytes(self, header: bytes) -> int:
        channels, h, w = self._plane
        return len(header) + channels * self.frames * h * w * 4

    def close(self) -> None:
        self._file.close()
