"""Request and response codecs: body bytes <-> clips and latents, with validation.

Pure functions of bytes (no Request), shared by the whole-clip routes and sessions.
Inputs are recognised by content type, and by magic bytes when the type is
`application/octet-stream` or absent; a body whose magic says it is something else
than declared (a PNG sent as video/mp4) is refused. Nothing is unpickled: npy goes
through `np.load(..., allow_pickle=False)`, tensors through safetensors.
"""

from __future__ import annotations

import enum
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.numpy import save as st_save_numpy
from safetensors.torch import load as st_load_torch

from media import LatentsFile, VideoReader, frames_to_tensor, write_video
from media.frames_file import FRAMES_FORMAT
from media.frames_file import TENSOR_NAME as FRAMES_TENSOR
from media.latents_file import LatentsFileError, ModelMismatchError, latents_from_bytes, latents_to_bytes
from media.video import VideoDecodeError, resize_short_side
from model.cache import read_metadata
from model.config import SPACE_FACTOR

from .errors import BadParameter, Conflict, InvalidInput, PayloadTooLarge, UnsupportedMedia

DEFAULT_FPS = 30.0  # recorded for tensor inputs that carry no rate (npy), as `cdt encode` does
MIN_SIDE = SPACE_FACTOR  # one latent cell: anything smaller is not a picture worth encoding
METADATA_HEADER = "X-CDT-Metadata"  # latents metadata as JSON when the body is bare npy

NPY = "application/x-npy"
SAFETENSORS = "application/x-safetensors"
OCTET_STREAM = "application/octet-stream"
MP4 = "video/mp4"


class Kind(enum.Enum):
    VIDEO = "video"
    NPY = "npy"
    SAFETENSORS = "safetensors"


_DECLARED = {NPY: Kind.NPY, SAFETENSORS: Kind.SAFETENSORS}
_CONTAINER_SUFFIX = {b"ftyp": ".mp4", b"\x1a\x45\xdf\xa3": ".webm", b"AVI ": ".avi"}
_IMAGE_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF"}


@dataclass(frozen=True)
class Limits:
    max_frames: int
    max_side: int


@dataclass(frozen=True)
class ClipOptions:
    frames: int | None = None  # keep the first N (error if fewer)
    size: int | None = None  # resize so the short side is S
    fps: float | None = None  # rate recorded for inputs that carry none


@dataclass
class Clip:
    video: torch.Tensor  # float32 (1,3,T,H,W) in [-1,1]
    fps: float


@dataclass(frozen=True)
class Body:
    kind: Kind
    data: bytes
    suffix: str = ""  # container file suffix that helps FFmpeg's probe


def _container_suffix(data: bytes) -> str | None:
    if data[4:8] == b"ftyp":
        return _CONTAINER_SUFFIX[b"ftyp"]
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return _CONTAINER_SUFFIX[b"\x1a\x45\xdf\xa3"]
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return _CONTAINER_SUFFIX[b"AVI "]
    return None


def _is_safetensors(data: bytes) -> bool:
    """An 8-byte little-endian header length, then a JSON object that fits the body."""
    if len(data) < 10:
        return False
    header = int.from_bytes(data[:8], "little")
    return 2 <= header <= len(data) - 8 and data[8:9] == b"{"


def sniff(data: bytes) -> Kind | None:
    if data.startswith(b"\x93NUMPY"):
        return Kind.NPY
    if _is_safetensors(data):
        return Kind.SAFETENSORS
    if _container_suffix(data):
        return Kind.VIDEO
    return None


def classify(content_type: str | None, data: bytes, accepted: tuple[Kind, ...]) -> Body:
    """The body's kind from its content type and magic bytes; 400 empty, 415 refused."""
    if not data:
        raise BadParameter("the request body is empty", code="empty_body")
    declared = (content_type or OCTET_STREAM).split(";")[0].strip().lower()
    sniffed = sniff(data)
    image = next((name for magic, name in _IMAGE_MAGIC.items() if data.startswith(magic)), None)
    if image:
        raise UnsupportedMedia(f"the body is a {image} image; send a video container or a frames tensor")
    if declared.startswith("video/"):
        # Unknown magic may still be a container FFmpeg reads (MPEG-TS, ...); let it try.
        if sniffed not in (None, Kind.VIDEO):
            raise UnsupportedMedia(f"content type {declared} but the body is {sniffed.value}")
        kind = Kind.VIDEO
    elif declared in _DECLARED:
        kind = _DECLARED[declared]
    elif declared == OCTET_STREAM:
        if sniffed is None:
            raise UnsupportedMedia("application/octet-stream body of unknown format "
                                   "(not an mp4/webm/avi container, npy or safetensors)")
        kind = sniffed
    else:
        raise UnsupportedMedia(f"unsupported content type {declared!r}")
    if kind not in accepted:
        raise UnsupportedMedia(f"{kind.value} bodies are not accepted here; send "
                               f"{' or '.join(k.value for k in accepted)}")
    return Body(kind, data, _container_suffix(data) or ".bin")


# --- clips -------------------------------------------------------------------------------

def decode_clip(body: Body, options: ClipOptions, limits: Limits) -> Clip:
    """Frames of a video container or tensor body, with `options` applied and checked."""
    if body.kind is Kind.VIDEO:
        clip = _read_container(body, options, limits)
    else:
        clip = _read_tensor(body, options)
    _check_clip(clip.video, options, limits)
    return clip


def _read_container(body: Body, options: ClipOptions, limits: Limits) -> Clip:
    # One frame past the limit tells "too long" apart from "exactly the limit".
    wanted = min(options.frames or limits.max_frames + 1, limits.max_frames + 1)
    # PyAV reads from a path; the temporary file lives only for this call.
    with tempfile.NamedTemporaryFile(suffix=body.suffix) as tmp:
        tmp.write(body.data)
        tmp.flush()
        try:
            with VideoReader(Path(tmp.name), num_frames=wanted, size=options.size) as reader:
                frames = np.stack(list(reader))
                fps = reader.fps
        except VideoDecodeError as exc:
            raise InvalidInput(str(exc).replace(tmp.name, "video"), code="undecodable_video") from None
    return Clip(frames_to_tensor(frames), fps)


def _read_tensor(body: Body, options: ClipOptions) -> Clip:
    array, fps = _load_array(body)
    if array.dtype == torch.uint8 and array.dim() == 4 and array.shape[3] == 3:
        frames = array.numpy()[: options.frames]
        if 0 in frames.shape:
            raise InvalidInput(f"frames have an empty dimension: {tuple(frames.shape)}", code="invalid_tensor")
        if options.size:
            frames = resize_short_side(frames, options.size)
        video = frames_to_tensor(frames)
    elif array.is_floating_point() and array.dim() == 4 and array.shape[0] == 3:
        video = array[:, : options.frames].float().unsqueeze(0)
        if 0 in video.shape:
            raise InvalidInput(f"frames have an empty dimension: {tuple(array.shape)}", code="invalid_tensor")
        if not torch.isfinite(video).all() or video.abs().max() > 1:
            raise InvalidInput("float frames must be finite and in [-1, 1]", code="invalid_tensor")
        if options.size:
            video = _resize_float(video, options.size)
    else:
        raise InvalidInput(f"frames must be uint8 (T,H,W,3) or float (3,T,H,W) in [-1,1], got "
                           f"{str(array.dtype).removeprefix('torch.')} {tuple(array.shape)}", code="invalid_tensor")
    return Clip(video, fps or options.fps or DEFAULT_FPS)


def _load_array(body: Body) -> tuple[torch.Tensor, float | None]:
    if body.kind is Kind.NPY:
        try:
            array = np.load(io.BytesIO(body.data), allow_pickle=False)
        except ValueError as exc:
            if "allow_pickle" in str(exc):
                raise InvalidInput("npy holds Python objects (pickle); only numeric arrays are accepted",
                                   code="invalid_tensor") from None
            raise InvalidInput(f"not a valid npy file ({exc})", code="invalid_tensor") from None
        except (OSError, EOFError) as exc:
            raise InvalidInput(f"not a valid npy file ({exc})", code="invalid_tensor") from None
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "uf" or array.dtype.byteorder == ">":
            raise InvalidInput(f"npy dtype {array.dtype} is not uint8 or a native float", code="invalid_tensor")
        return torch.from_numpy(np.ascontiguousarray(array)), None
    try:
        meta = read_metadata(body.data)
        tensors = st_load_torch(body.data)
    except (SafetensorError, ValueError) as exc:
        raise InvalidInput(f"not a valid safetensors file ({exc})", code="invalid_tensor") from None
    if FRAMES_TENSOR not in tensors and len(tensors) != 1:
        raise InvalidInput(f"safetensors frames need a tensor named {FRAMES_TENSOR!r} (or exactly one tensor), "
                           f"got {sorted(tensors)}", code="invalid_tensor")
    array = tensors.get(FRAMES_TENSOR, next(iter(tensors.values()), None))
    try:
        fps = float(meta["fps"]) if "fps" in meta else None
    except ValueError:
        raise InvalidInput(f"bad fps metadata {meta['fps']!r}", code="invalid_tensor") from None
    return array, fps if fps and fps > 0 else None


def _resize_float(video: torch.Tensor, size: int) -> torch.Tensor:
    """The float counterpart of `resize_short_side` (same filter, no uint8 rounding)."""
    _, _, t, h, w = video.shape
    scale = size / min(h, w)
    out = (max(1, round(h * scale)), max(1, round(w * scale)))
    if out == (h, w):
        return video
    frames = F.interpolate(video[0].transpose(0, 1), size=out, mode="bicubic", align_corners=False, antialias=True)
    return frames.clamp(-1, 1).transpose(0, 1).unsqueeze(0)


def _check_clip(video: torch.Tensor, options: ClipOptions, limits: Limits) -> None:
    t, h, w = video.shape[2:]
    if options.frames is not None and t < options.frames:
        raise InvalidInput(f"the clip has {t} frames, frames={options.frames} asks for more", code="too_few_frames")
    if t > limits.max_frames:
        raise PayloadTooLarge(f"the clip has more than {limits.max_frames} frames; send fewer (or frames=N)",
                              code="clip_too_large")
    if max(h, w) > limits.max_side:
        raise PayloadTooLarge(f"frames are {h}x{w}; the largest side served is {limits.max_side} "
                              "(resize with size=S)", code="clip_too_large")
    if min(h, w) < MIN_SIDE:
        raise InvalidInput(f"frames are {h}x{w}; both sides must be at least {MIN_SIDE} pixels",
                           code="video_too_small")


# --- latents -----------------------------------------------------------------------------

def decode_latents(body: Body, model_hash: str, limits: Limits) -> LatentsFile:
    """A latents file made by this model, finite and within the limits."""
    try:
        item = latents_from_bytes(body.data, model_hash, source="latents")
    except ModelMismatchError as exc:
        raise Conflict(str(exc), code="model_mismatch") from None
    except LatentsFileError as exc:
        raise InvalidInput(str(exc), code="invalid_latents") from None
    if not torch.isfinite(item.latents).all():
        raise InvalidInput("latents contain NaN or infinite values", code="invalid_latents")
    if item.frames > limits.max_frames or max(item.height, item.width) > limits.max_side:
        raise PayloadTooLarge(f"latents decode to {item.frames} frames of {item.height}x{item.width}; the limits are "
                              f"{limits.max_frames} frames and {limits.max_side} pixels a side", code="clip_too_large")
    return item


def latents_metadata(item: LatentsFile) -> dict[str, str]:
    return read_metadata(latents_to_bytes(item))


def encode_latents(item: LatentsFile, fmt: str) -> tuple[bytes, str, dict[str, str]]:
    """(body, media type, headers). npy carries the metadata in a header instead."""
    if fmt == "safetensors":
        return latents_to_bytes(item), SAFETENSORS, {}
    buffer = io.BytesIO()
    np.save(buffer, item.latents.float().numpy(), allow_pickle=False)
    return buffer.getvalue(), NPY, {METADATA_HEADER: json.dumps(latents_metadata(item), sort_keys=True)}


def encode_frames(frames: np.ndarray, fps: float, fmt: str) -> tuple[bytes, str]:
    """uint8 (T,H,W,3) as mp4 (h264, crf 18), npy or safetensors (tensor `frames`)."""
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(frames), allow_pickle=False)
        return buffer.getvalue(), NPY
    if fmt == "safetensors":
        meta = {"format": FRAMES_FORMAT, "fps": repr(float(fps))}
        return st_save_numpy({FRAMES_TENSOR: np.ascontiguousarray(frames)}, metadata=meta), SAFETENSORS
    with tempfile.NamedTemporaryFile(suffix=".mp4") as tmp:
        write_video(tmp.name, frames, fps)
        return Path(tmp.name).read_bytes(), MP4
