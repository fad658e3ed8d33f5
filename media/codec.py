"""Clip-level encode and decode around the model: pad to its grid, run whole or
streamed through the feature cache, and crop the decode back to the original clip.

Streamed and whole-clip runs give the same numbers (the model's streaming contract);
streaming keeps memory bounded by the chunk, not the clip.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch

from model import StreamingDecoder, StreamingEncoder, Tokenizer, dtype_name

from .latents_file import LatentsFile
from .padding import Padding, pad_spatial, pad_video
from .video import frames_to_tensor, tensor_to_frames


@torch.no_grad()
def encode_video(model: Tokenizer, video: torch.Tensor, fps: float) -> LatentsFile:
    """Encode a whole float (1,3,T,H,W) clip in [-1,1] in one call."""
    count, height, width = video.shape[2:]
    latents = model.encode(pad_video(video.to(model.device))[0])
    return latents_file(model, latents, count, height, width, fps)


@torch.no_grad()
def encode_frames(model: Tokenizer, chunks: Iterable[np.ndarray], fps: float, streamed: bool) -> LatentsFile:
    """Encode a clip given as successive uint8 (n,H,W,3) chunks.

    `streamed` pushes each chunk through a StreamingEncoder as it arrives; otherwise
    the chunks are joined and encoded in one call."""
    if not streamed:
        return encode_video(model, frames_to_tensor(np.concatenate(list(chunks))), fps)
    encoder = StreamingEncoder(model)
    parts, count, shape = [], 0, None
    for chunk in chunks:
        count, shape = count + len(chunk), chunk.shape[1:3]
        parts.append(encoder.push(pad_spatial(frames_to_tensor(chunk))))
    if count == 0:
        raise ValueError("no frames to encode")
    parts.append(encoder.finish())
    return latents_file(model, torch.cat(parts, dim=2), count, *shape, fps)


def latents_file(model: Tokenizer, latents: torch.Tensor, frames: int, height: int, width: int,
                 fps: float) -> LatentsFile:
    """The latents of a clip of `frames` frames of height x width, with their metadata."""
    return LatentsFile(
        latents=latents.float().cpu(),
        model_hash=model.content_hash(),
        preset=model.config.preset,
        model_kind=model.kind,
        dtype=dtype_name(model.compute_dtype),
        frames=frames,
        height=height,
        width=width,
        fps=fps,
        padding=Padding.for_shape(frames, height, width),
    )


@torch.no_grad()
def decode_video(model: Tokenizer, item: LatentsFile, steps: int = 1, seed: int = 0,
                 chunk: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the decoded clip as float (1,3,n,H,W) chunks, cropped to the original size
    and length. `chunk` latent frames at a time go through a StreamingDecoder; None
    decodes the whole clip in one call."""
    latents = item.latents.to(model.device)
    if chunk is None:
        videos: Iterable[torch.Tensor] = [model.decode(latents, steps=steps, seed=seed)]
    elif chunk < 1:
        raise ValueError(f"chunk must be >= 1 latent frame, got {chunk}")
    else:
        decoder = StreamingDecoder(model, steps=steps, seed=seed)
        videos = (decoder.push(latents[:, :, i : i + chunk]) for i in range(0, latents.shape[2], chunk))
    remaining = item.frames
    for video in videos:
        video = video[:, :, :remaining, : item.height, : item.width]
        remaining -= video.shape[2]
        if video.shape[2]:
            yield video


def decode_frames(model: Tokenizer, item: LatentsFile, steps: int = 1, seed: int = 0,
                  chunk: int | None = None) -> Iterator[np.ndarray]:
    """`decode_video` as uint8 (n,H,W,3) RGB chunks."""
    return (tensor_to_frames(video) for video in decode_video(model, item, steps, seed, chunk))
