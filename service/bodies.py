"""Request bodies: spooled to disk, recognised, validated, and read in chunks.

A body is written to a temporary file as it arrives (never held in memory), then
recognised by content type, and by magic bytes when the type is
`application/octet-stream` or absent; a body whose magic says it is something else than
declared (a PNG sent as video/mp4) is refused. Its header (npy, safetensors, container)
is checked against the limits before any frame is decoded or allocated; the frames or
latents are then read chunk by chunk as the model consumes them. Nothing is unpickled.
"""

from __future__ import annotations

import enum
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from cdt_client.formats.api import METADATA_HEADER, NPY, SAFETENSORS  # noqa: F401 (routes take METADATA_HEADER here)
from cdt_client.formats.files import FRAMES_TENSOR, LATENTS_TENSOR
from cdt_client.formats.tensors import TensorHeaderError, TensorLayout, read_npy_header, read_safetensors_header
from media import LatentsInfo, VideoReader, frame_count, model_video
from media.latents_file import LatentsFileError, ModelMismatchError
from media.tensor_data import read_slab
from media.video import MAX_FPS, VideoDecodeError, resize_short_side, short_side_shape
from model import LATENT_CHANNELS, SPACE_FACTOR

from .catalog import Catalog, ServedModel
from .domain_errors import BadParameter, Conflict, InvalidInput, TooLarge, UnsupportedFormat
from .settings import Settings

DEFAULT_FPS = 30.0  # recorded for tensor inputs that carry no rate (npy), as `cdt encode` does
MIN_SIDE = SPACE_FACTOR  # one latent cell: anything smaller is not a picture worth encoding

OCTET_STREAM = "application/octet-stream"
MP4 = "video/mp4"
SNIFF_BYTES = 16  # enough for every magic below


class BodyFormat(enum.Enum):
    """What a body holds, whatever its content type said: the parsers go by this."""

    VIDEO = "video"
    NPY = "npy"
    SAFETENSORS = "safetensors"


FRAME_FORMATS = (BodyFormat.VIDEO, BodyFormat.NPY, BodyFormat.SAFETENSORS)  # what frames may come as

_DECLARED = {NPY: BodyFormat.NPY, SAFETENSORS: BodyFormat.SAFETENSORS}
_IMAGE_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF"}


@dataclass(frozen=True)
class Limits:
    max_frames: int
    max_side: int

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(settings.max_frames, settings.max_side)

    def fit(self, frames: int, height: int, width: int) -> bool:
        """Whether a clip of `frames` frames of height x width is within the limits."""
        return frames <= self.max_frames and max(height, width) <= self.max_side


@dataclass(frozen=True)
class ClipOptions:
    frames: int | None = None  # keep the first N (error if fewer)
    size: int | None = None  # resize so the short side is S
    fps: float | None = None  # rate recorded for inputs that carry none


@dataclass
class Body:
    """A request body in a temporary file, deleted by `close()`."""

    format: BodyFormat
    file: BinaryIO
    size: int

    @property
    def path(self) -> Path:
        return Path(self.file.name)

    def read(self) -> bytes:
        self.file.seek(0)
        return self.file.read()

    def close(self) -> None:
        self.file.close()


def container_suffix(head: bytes) -> str | None:
    """The file suffix of a container recognised by its magic (it helps FFmpeg's probe)."""
    if head[4:8] == b"ftyp":
        return ".mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return ".webm"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return ".avi"
    return None


def sniff(head: bytes, size: int) -> BodyFormat | None:
    if head.startswith(b"\x93NUMPY"):
        return BodyFormat.NPY
    # safetensors: an 8-byte little-endian header length, then a JSON object that fits.
    if size >= 10 and 2 <= int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{":
        return BodyFormat.SAFETENSORS
    if container_suffix(head):
        return BodyFormat.VIDEO
    return None


def classify(content_type: str | None, head: bytes, size: int, accepted: tuple[BodyFormat, ...]) -> BodyFormat:
    """The body's format from its content type and first bytes: `empty_body` when there are none,
    UnsupportedFormat when it is not one of `accepted` (or not what its content type says)."""
    if size == 0:
        raise BadParameter("the request body is empty", code="empty_body")
    declared = (content_type or OCTET_STREAM).split(";")[0].strip().lower()
    sniffed = sniff(head, size)
    image = next((name for magic, name in _IMAGE_MAGIC.items() if head.startswith(magic)), None)
    if image:
        raise UnsupportedFormat(f"the body is a {image} image; send a video container or a frames tensor")
    if declared.startswith("video/"):
        # Unknown magic may still be a container FFmpeg reads (MPEG-TS, ...); let it try.
        if sniffed not in (None, BodyFormat.VIDEO):
            raise UnsupportedFormat(f"content type {declared} but the body is {sniffed.value}")
        fmt = BodyFormat.VIDEO
    elif declared in _DECLARED:
        fmt = _DECLARED[declared]
    elif declared == OCTET_STREAM:
        if sniffed is None:
            raise UnsupportedFormat("application/octet-stream body of unknown format "
                                    "(not an mp4/webm/avi container, npy or safetensors)")
        fmt = sniffed
    else:
        raise UnsupportedFormat(f"unsupported content type {declared!r}")
    if fmt not in accepted:
        raise UnsupportedFormat(f"{fmt.value} bodies are not accepted here; send "
                                f"{' or '.join(k.value for k in accepted)}")
    return fmt


def spool(head: bytes) -> BinaryIO:
    """A temporary file for a body starting with `head`, named as its container if any."""
    return tempfile.NamedTemporaryFile(suffix=container_suffix(head) or ".bin")


def body_from_bytes(fmt: BodyFormat, data: bytes) -> Body:
    """A Body of bytes already in memory whose format is known (a session's logged chunk)."""
    file = spool(data[:SNIFF_BYTES])
    file.write(data)
    file.flush()
    return Body(fmt, file, len(data))


# --- frames --------------------------------------------------------------------------------

@dataclass
class FrameSource:
    """A clip's frames, read chunk by chunk: `chunks(n)` yields at most n frames a chunk, as
    uint8 (n,H,W,3) frames where the body holds uint8 (they cross to the model's device as
    uint8) or float (1,3,n,H,W) in [-1,1] (`media.model_video` takes either), and counts them
    in `count`; the limits are enforced as frames are read."""

    height: int
    width: int
    fps: float
    read: Callable[[int], Iterator[np.ndarray | torch.Tensor]]
    count: int = field(default=0, init=False)

    def chunks(self, n: int) -> Iterator[np.ndarray | torch.Tensor]:
        for chunk in self.read(n):
            self.count += frame_count(chunk)
            yield chunk


def resized(height: int, width: int, size: int | None) -> tuple[int, int]:
    """(height, width) after `resize_short_side` to `size` (None: unchanged)."""
    return (height, width) if size is None else short_side_shape(height, width, size)


def open_frames(body: Body, options: ClipOptions, limits: Limits) -> FrameSource:
    """The body's frames with `options` applied; sizes are checked now, lengths as read."""
    if body.format is BodyFormat.VIDEO:
        return _container_frames(body, options, limits)
    layout, fps = _frames_layout(body)
    return _tensor_frames(body, layout, fps, options, limits)


def read_clip(body: Body, options: ClipOptions, limits: Limits) -> tuple[torch.Tensor, float]:
    """All of a body's frames at once, as float (1,3,T,H,W): for bodies of one chunk."""
    source = open_frames(body, options, limits)
    return torch.cat([model_video(c, "cpu") for c in source.chunks(limits.max_frames + 1)], dim=2), source.fps


def _check_size(height: int, width: int, limits: Limits) -> None:
    if max(height, width) > limits.max_side:
        raise TooLarge(f"frames are {height}x{width}; the largest side served is {limits.max_side} "
                       "(resize with size=S)", code="clip_too_large")
    check_min_side(height, width)


def check_min_side(height: int, width: int) -> None:
    if min(height, width) < MIN_SIDE:
        raise InvalidInput(f"frames are {height}x{width}; both sides must be at least {MIN_SIDE} pixels",
                           code="video_too_small")


def _too_long(limits: Limits) -> TooLarge:
    return TooLarge(f"the clip has more than {limits.max_frames} frames; send fewer (or frames=N)",
                    code="clip_too_large")


def _too_few(count: int, options: ClipOptions) -> InvalidInput:
    return InvalidInput(f"the clip has {count} frames, frames={options.frames} asks for more", code="too_few_frames")


def _container_frames(body: Body, options: ClipOptions, limits: Limits) -> FrameSource:
    # One frame past the limit tells "too long" apart from "exactly the limit".
    wanted = min(options.frames or limits.max_frames + 1, limits.max_frames + 1)
    try:
        reader = VideoReader(body.path, num_frames=wanted, size=options.size)
    except VideoDecodeError as exc:
        raise InvalidInput(str(exc).replace(str(body.path), "video"), code="undecodable_video") from None
    try:
        height, width = resized(reader.source_height, reader.source_width, options.size)
        _check_size(height, width, limits)
    except BaseException:
        reader.close()
        raise

    def read(n: int) -> Iterator[np.ndarray]:
        count = 0
        with reader:
            try:
                for frames in reader.chunks(n):
                    count += len(frames)
                    if count > limits.max_frames:
                        raise _too_long(limits)
                    yield frames
            except VideoDecodeError as exc:
                raise InvalidInput(str(exc).replace(str(body.path), "video"), code="undecodable_video") from None
        if options.frames is not None and count < options.frames:
            raise _too_few(count, options)

    return FrameSource(height, width, reader.fps, read)


def _frames_layout(body: Body) -> tuple[TensorLayout, float | None]:
    """The frames tensor's layout in an npy or safetensors body, and its recorded fps."""
    try:
        if body.format is BodyFormat.NPY:
            return read_npy_header(body.file), None
        layouts, meta = read_safetensors_header(body.file)
    except TensorHeaderError as exc:
        raise InvalidInput(f"not a valid {body.format.value} file ({exc})", code="invalid_tensor") from None
    if FRAMES_TENSOR not in layouts and len(layouts) != 1:
        raise InvalidInput(f"safetensors frames need a tensor named {FRAMES_TENSOR!r} (or exactly one tensor), "
                           f"got {sorted(layouts)}", code="invalid_tensor")
    layout = layouts.get(FRAMES_TENSOR) or next(iter(layouts.values()))
    try:
        fps = float(meta["fps"]) if "fps" in meta else None
    except ValueError:
        raise InvalidInput(f"bad fps metadata {meta['fps']!r}", code="invalid_tensor") from None
    if fps is not None and fps > MAX_FPS:  # inf too: no mp4 carries it
        raise InvalidInput(f"fps metadata {fps:g} is over {MAX_FPS:g}", code="invalid_tensor")
    return layout, fps if fps and fps > 0 else None


def _tensor_frames(body: Body, layout: TensorLayout, fps: float | None, options: ClipOptions,
                   limits: Limits) -> FrameSource:
    shape = layout.shape
    if layout.dtype == "U8" and len(shape) == 4 and shape[3] == 3:
        axis, (t, h, w) = 0, shape[:3]
    elif layout.dtype != "U8" and len(shape) == 4 and shape[0] == 3:
        axis, (t, h, w) = 1, shape[1:]
    else:
        raise InvalidInput(f"frames must be uint8 (T,H,W,3) or float (3,T,H,W) in [-1,1], got "
                           f"{layout.dtype} {shape}", code="invalid_tensor")
    if 0 in shape:
        raise InvalidInput(f"frames have an empty dimension: {shape}", code="invalid_tensor")
    t = min(t, options.frames or t)
    if t > limits.max_frames:
        raise _too_long(limits)
    if options.frames is not None and t < options.frames:
        raise _too_few(t, options)
    height, width = resized(h, w, options.size)
    _check_size(height, width, limits)

    def read(n: int) -> Iterator[np.ndarray | torch.Tensor]:
        for start in range(0, t, n):
            part = read_slab(body.file, layout, axis, start, min(t, start + n))
            yield _uint8_chunk(part, options) if axis == 0 else _float_chunk(part, options)

    return FrameSource(height, width, fps or options.fps or DEFAULT_FPS, read)


def _uint8_chunk(frames: torch.Tensor, options: ClipOptions) -> np.ndarray:
    array = frames.numpy()
    return resize_short_side(array, options.size) if options.size else array


def _float_chunk(frames: torch.Tensor, options: ClipOptions) -> torch.Tensor:
    video = frames.float().unsqueeze(0)
    if not torch.isfinite(video).all() or video.abs().max() > 1:
        raise InvalidInput("float frames must be finite and in [-1, 1]", code="invalid_tensor")
    if options.size:
        h, w = video.shape[3:]
        out = resized(h, w, options.size)
        if out != (h, w):
            # The float counterpart of `resize_short_side` (same filter, no uint8 rounding).
            video = F.interpolate(video[0].transpose(0, 1), size=out, mode="bicubic", align_corners=False,
                                  antialias=True).clamp(-1, 1).transpose(0, 1).unsqueeze(0)
    return video


# --- latents -------------------------------------------------------------------------------

@dataclass
class LatentsSource:
    """A latents file's metadata, and its latents read `m` latent frames at a time."""

    info: LatentsInfo
    body: Body
    layout: TensorLayout

    def chunks(self, m: int) -> Iterator[torch.Tensor]:
        total = self.layout.shape[2]
        for start in range(0, total, m):
            yield read_slab(self.body.file, self.layout, 2, start, min(total, start + m)).float()


def open_latents(body: Body, models: Catalog, asked: ServedModel | None,
                 limits: Limits) -> tuple[LatentsSource, ServedModel]:
    """A latents file, finite and within the limits (the latents are scanned in slices, never
    loaded whole), and the served model that decodes it: `asked`, which must be the model that
    made the latents (409 `model_mismatch`), or, when none is asked for, the model that made
    them if it is served here, else the default (which then must be it)."""
    try:
        layouts, meta = read_safetensors_header(body.file)
        info = LatentsInfo.from_metadata(meta)
        if LATENTS_TENSOR not in layouts:
            raise LatentsFileError(f"latents: no tensor named {LATENTS_TENSOR!r}")
        layout = layouts[LATENTS_TENSOR]
        info.check_latents(layout.dtype != "U8", layout.shape)
        served = asked or models.by_hash(info.model_hash) or models.default
        info.check_model(served.content_hash, model_name=served.name)
    except ModelMismatchError as exc:
        raise Conflict(str(exc), code="model_mismatch") from None
    except (LatentsFileError, TensorHeaderError) as exc:
        raise InvalidInput(str(exc), code="invalid_latents") from None
    if not limits.fit(info.frames, info.height, info.width):
        raise TooLarge(f"latents decode to {info.frames} frames of {info.height}x{info.width}; the limits are "
                       f"{limits.max_frames} frames and {limits.max_side} pixels a side", code="clip_too_large")
    source = LatentsSource(info, body, layout)
    if not all(torch.isfinite(part).all() for part in source.chunks(16)):
        raise InvalidInput("latents contain NaN or infinite values", code="invalid_latents")
    return source, served


def parse_latent_chunk(body: Body) -> torch.Tensor:
    """Latents (1,16,m,h,w) from a chunk response, a whole latents file, or npy, in the
    dtype they arrived in."""
    try:
        if body.format is BodyFormat.NPY:
            layout = read_npy_header(body.file)
        elif body.format is BodyFormat.SAFETENSORS:
            layouts, _ = read_safetensors_header(body.file)
            if LATENTS_TENSOR not in layouts:
                raise InvalidInput("safetensors latents need a tensor named 'latents'", code="invalid_latents")
            layout = layouts[LATENTS_TENSOR]
        else:
            raise InvalidInput("decode sessions take latents as safetensors or npy", code="invalid_latents")
    except TensorHeaderError as exc:
        raise InvalidInput(f"not a valid {body.format.value} file ({exc})", code="invalid_latents") from None
    shape = layout.shape
    if len(shape) != 5 or shape[0] != 1 or shape[1] != LATENT_CHANNELS or 0 in shape[2:] or layout.dtype == "U8":
        raise InvalidInput(f"latents must be float (1,{LATENT_CHANNELS},T,h,w), got {layout.dtype} {shape}",
                           code="invalid_latents")
    latents = read_slab(body.file, layout, 0, 0, 1)
    if not torch.isfinite(latents).all():
        raise InvalidInput("latents must be finite floats", code="invalid_latents")
    return latents
