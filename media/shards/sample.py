"""One input of a data set: decoded to frames on a host CPU (`decode_input`, in a worker
process or task), then encoded to a sample by a model (`encode_sample`).

A file that gives no clip becomes an `InputFailure` with a machine-readable code, never a
partial sample: `empty_file`, `undecodable_video` (corrupt, not a video, no frames),
`too_few_frames` (fewer than the options' frames), `video_too_small` (a side under 8
pixels after the resize, as the service refuses), `unreadable_file` (the OS could not read
it), `invalid_input` (frames the model refuses).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

import av
import numpy as np
import torch

from model import SPACE_FACTOR, Tokenizer

from ..latents_file import latents_to_bytes
from ..tokenize import encode_chunks, latents_file
from ..video import VideoDecodeError, VideoReader, frames_to_tensor
from .plan import EncodeOptions, Input, ModelRef

JSON_SUFFIX = "json"
LATENTS_SUFFIX = "latents.safetensors"


class InputFailure(NamedTuple):
    """Why an input gives no sample."""

    code: str
    reason: str


@dataclass
class DecodedClip:
    """An input's frames as the options read them: uint8 (T,H,W,3) RGB."""

    frames: np.ndarray
    fps: float
    source_width: int
    source_height: int


@dataclass(frozen=True)
class Sample:
    """One input's tar members: its metadata (JSON) and its latents file."""

    key: str
    meta: bytes
    latents: bytes
    frames: int

    def members(self) -> dict[str, bytes]:
        return {JSON_SUFFIX: self.meta, LATENTS_SUFFIX: self.latents}


def decode_input(path: str, options: EncodeOptions) -> DecodedClip | InputFailure:
    """The input's frames, or why it has none (never raises for a bad file)."""
    try:
        if os.path.getsize(path) == 0:
            return InputFailure("empty_file", f"{path}: the file is empty")
        # One FFmpeg thread: the decode workers already fill the cores.
        with VideoReader(path, num_frames=options.frames, size=options.size, crop=options.crop_shape,
                         threads=1) as reader:
            frames = np.stack(list(reader))
            clip = DecodedClip(frames, reader.fps, reader.source_width, reader.source_height)
    except (VideoDecodeError, av.FFmpegError) as exc:
        return InputFailure("undecodable_video", str(exc))
    except OSError as exc:
        return InputFailure("unreadable_file", f"{path}: {exc}")
    except ValueError as exc:  # a crop larger than the resized frame
        return InputFailure("video_too_small", f"{path}: {exc}")
    count, height, width = frames.shape[:3]
    if options.frames is not None and count < options.frames:
        return InputFailure("too_few_frames", f"{path}: it has {count} frames, {options.frames} are asked for")
    if min(height, width) < SPACE_FACTOR:
        return InputFailure("video_too_small", f"{path}: {width}x{height} frames, a side is under {SPACE_FACTOR}")
    return clip


@torch.no_grad()
def encode_sample(model: Tokenizer, ref: ModelRef, item: Input, clip: DecodedClip,
                  options: EncodeOptions) -> Sample:
    """The input's sample: its frames pushed through the streaming encoder
    `options.chunk_frames` at a time, as the service runs a clip (the posterior mean)."""
    frames = clip.frames
    count, height, width = frames.shape[:3]
    step = options.chunk_frames
    chunks = (frames_to_tensor(frames[i : i + step]) for i in range(0, count, step))
    latents = torch.cat(list(encode_chunks(model, ref.hash, chunks)), dim=2)
    data = latents_to_bytes(latents_file(model, ref.hash, latents, count, height, width, clip.fps, ref.name))
    meta = {
        "key": item.key, "source": item.name, "frames": count, "fps": clip.fps, "height": height, "width": width,
        "source_height": clip.source_height, "source_width": clip.source_width, "size": options.size,
        "crop": list(options.crop_shape) if options.crop_shape else None, "model": ref.to_dict(),
        "dtype": options.dtype, "latent_shape": list(latents.shape),
    }
    return Sample(item.key, (json.dumps(meta, sort_keys=True) + "\n").encode(), data, count)


class ModelTime(NamedTuple):
    """When the model started on an input (wall clock, comparable across processes and
    machines' synchronised clocks) and the seconds it spent on it."""

    started: float
    seconds: float


def encode_input(model: Tokenizer, ref: ModelRef, item: Input, clip: DecodedClip | InputFailure,
                 options: EncodeOptions) -> tuple[Sample | InputFailure, ModelTime | None]:
    """The input's sample, or why it has none (a failed decode, or content the model
    refuses), and the model's time on it (None: the model did not run)."""
    if isinstance(clip, InputFailure):
        return clip, None
    started, start = time.time(), time.perf_counter()
    try:
        result = encode_sample(model, ref, item, clip, options)
    except ValueError as exc:
        result = InputFailure("invalid_input", f"{item.path}: {exc}")
    return result, ModelTime(started, time.perf_counter() - start)
