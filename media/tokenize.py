"""The tokenizer on clips: encode frames to a latents file and decode one back, padded
to the model's grid, run whole or streamed through the feature cache, and cropped back
to the original clip.

Streamed and whole-clip runs give the same numbers (the model's streaming contract);
streaming keeps memory bounded by the chunk, not the clip.

`model_hash` is the content hash of the model's weights (`ModelIdentity.content_hash` of a
loaded checkpoint): latents files and stream states carry it.

Inputs may be on any device. The latents and frames given back are on the host, copied off
the model's device as each is made: the service runs each step of these generators as a job
of its model thread, so the job's time includes the device's work and nothing else waits on
the device.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch

from model import StreamingDecoder, StreamingEncoder, Tokenizer, dtype_name

from .latents_file import LatentsFile, LatentsInfo
from .padding import Padding, pad_spatial, pad_video
from .video import frames_to_tensor, tensor_to_frames


@torch.no_grad()
def encode_video(model: Tokenizer, model_hash: str, video: torch.Tensor, fps: float) -> LatentsFile:
    """Encode a whole float (1,3,T,H,W) clip in [-1,1] in one call."""
    count, height, width = video.shape[2:]
    latents = model.encode(pad_video(video.to(model.device))[0])
    return latents_file(model, model_hash, latents, count, height, width, fps)


@torch.no_grad()
def encode_chunks(model: Tokenizer, model_hash: str, chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Latents of a clip given as successive float (1,3,n,H,W) chunks in [-1,1], at their
    original size: one yield per chunk (the latents of its complete 4-frame groups, maybe
    none), then one for the tail, padded like a whole clip."""
    encoder = StreamingEncoder(model, model_hash)
    for chunk in chunks:
        yield encoder.push(pad_spatial(chunk.to(model.device))).cpu()
    if encoder.meta["frames_in"] == 0:
        raise ValueError("no frames to encode")
    yield encoder.finish().cpu()


@torch.no_grad()
def encode_frames(model: Tokenizer, model_hash: str, chunks: Iterable[np.ndarray], fps: float,
                  streamed: bool) -> LatentsFile:
    """Encode a clip given as successive uint8 (n,H,W,3) chunks.

    `streamed` pushes each chunk through a StreamingEncoder as it arrives; otherwise
    the chunks are joined and encoded in one call."""
    if not streamed:
        return encode_video(model, model_hash, frames_to_tensor(np.concatenate(list(chunks))), fps)
    count, shape = 0, None

    def tensors() -> Iterator[torch.Tensor]:
        nonlocal count, shape
        for chunk in chunks:
            count, shape = count + len(chunk), chunk.shape[1:3]
            yield frames_to_tensor(chunk)

    latents = torch.cat(list(encode_chunks(model, model_hash, tensors())), dim=2)
    return latents_file(model, model_hash, latents, count, *shape, fps)


def latents_info(model: Tokenizer, model_hash: str, frames: int, height: int, width: int,
                 fps: float) -> LatentsInfo:
    """The metadata of `model`'s latents of a clip of `frames` frames of height x width."""
    return LatentsInfo(
        model_hash=model_hash,
        preset=model.config.preset,
        model_kind=model.kind,
        dtype=dtype_name(model.compute_dtype),
        frames=frames,
        height=height,
        width=width,
        fps=fps,
        padding=Padding.for_shape(frames, height, width),
    )


def latents_file(model: Tokenizer, model_hash: str, latents: torch.Tensor, frames: int, height: int, width: int,
                 fps: float) -> LatentsFile:
    """The latents of a clip of `frames` frames of height x width, with their metadata."""
    info = latents_info(model, model_hash, frames, height, width, fps)
    return LatentsFile(latents=latents.float().cpu(), **vars(info))


@torch.no_grad()
def decode_video(model: Tokenizer, model_hash: str, item: LatentsFile, steps: int = 1, seed: int = 0,
                 chunk: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the decoded clip as float (1,3,n,H,W) chunks, cropped to the original size
    and length. `chunk` latent frames at a time go through a StreamingDecoder; None
    decodes the whole clip in one call."""
    latents = item.latents.to(model.device)
    if chunk is None:
        yield from crop_decoded(item, [model.decode(latents, steps=steps, seed=seed)])
        return
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 latent frame, got {chunk}")
    parts = (latents[:, :, i : i + chunk] for i in range(0, latents.shape[2], chunk))
    yield from decode_chunks(model, model_hash, item, parts, steps, seed)


@torch.no_grad()
def decode_chunks(model: Tokenizer, model_hash: str, info: LatentsInfo, chunks: Iterable[torch.Tensor],
                  steps: int = 1, seed: int = 0) -> Iterator[torch.Tensor]:
    """Decode successive latent chunks (1,16,m,h,w) of the clip `info` describes through a
    StreamingDecoder: float (1,3,n,H,W) chunks, cropped to its size and length."""
    decoder = StreamingDecoder(model, model_hash, steps=steps, seed=seed)
    yield from crop_decoded(info, (decoder.push(part.to(model.device)) for part in chunks))


def crop_decoded(info: LatentsInfo, videos: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Decoded chunks cut to the original height, width and frame count (empty ones skipped),
    copied to the host."""
    remaining = info.frames
    for video in videos:
        video = video[:, :, :remaining, : info.height, : info.width]
        remaining -= video.shape[2]
        if video.shape[2]:
            yield video.cpu()


def decode_frames(model: Tokenizer, model_hash: str, item: LatentsFile, steps: int = 1, seed: int = 0,
                  chunk: int | None = None) -> Iterator[np.ndarray]:
    """`decode_video` as uint8 (n,H,W,3) RGB chunks."""
    return (tensor_to_frames(video) for video in decode_video(model, model_hash, item, steps, seed, chunk))
