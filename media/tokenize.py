"""The tokenizer on clips: encode frames to a latents file and decode one back, padded
to the model's grid, run whole or streamed through the feature cache, and cropped back
to the original clip.

Streamed and whole-clip runs give the same numbers (the model's streaming contract);
streaming keeps memory bounded by the chunk, not the clip.

`model_hash` is the content hash of the model's weights (`ModelIdentity.content_hash` of a
loaded checkpoint): latents files and stream states carry it. `model_name`, where given, is
the name the model is known by (the service's model names, the checkpoint directory's name
for the `cdt` commands): latents files carry it too, for people and error messages.
Clips are padded to the model's own frames rule, 1 + `config.time_factor`*k.

Inputs may be on any device; uint8 frames cross to the model's device as uint8. The latents
and frames given back are on the host, copied off the model's device as each is made (frames
quantised to uint8 there first): the service runs each `ClipEncoder`/`ClipDecoder` call as a
job of its model thread, so the job's time includes the device's work and nothing else waits
on the device.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch

from model import StreamingDecoder, StreamingEncoder, Tokenizer, dtype_name

from .latents_file import LatentsFile, LatentsInfo
from .padding import Padding, pad_spatial, pad_video
from .pushes import StreamPush
from .video import frames_to_tensor, model_video, tensor_to_frames


@torch.no_grad()
def encode_video(model: Tokenizer, model_hash: str, video: torch.Tensor, fps: float,
                 model_name: str = "") -> LatentsFile:
    """Encode a whole float (1,3,T,H,W) clip in [-1,1] in one call."""
    count, height, width = video.shape[2:]
    latents = model.encode(pad_video(video.to(model.device), model.config.time_factor)[0])
    return latents_file(model, model_hash, latents, count, height, width, fps, model_name)


class ClipEncoder:
    """One clip's streamed encode, a call per chunk (the service runs each call as one model job).
    A chunk is uint8 (n,H,W,3) frames, converted to the model's input on its device, or float
    (1,3,n,H,W) in [-1,1], at the clip's original size; `push` gives back the latents of its
    complete groups of `time_factor` frames (maybe none), `finish` those of the tail, padded like
    a whole clip."""

    def __init__(self, model: Tokenizer, model_hash: str) -> None:
        self._device = model.device
        self._stream = StreamingEncoder(model, model_hash)

    @torch.no_grad()
    def push(self, chunk: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.step(chunk).run()

    def step(self, chunk: np.ndarray | torch.Tensor) -> StreamPush[torch.Tensor]:
        """`push` as a unit of model work that may run batched with other streams' (`StreamPush`)."""
        count, height, width = (chunk.shape[:3] if isinstance(chunk, np.ndarray) else chunk.shape[2:])
        padding = Padding.for_shape(1, height, width, self._stream.model.config.time_factor)  # its spatial part
        return StreamPush(self._stream, lambda: pad_spatial(model_video(chunk, self._device)), torch.Tensor.cpu,
                          (1, 3, count, height + padding.height, width + padding.width))

    @torch.no_grad()
    def finish(self) -> torch.Tensor:
        if self._stream.meta["frames_in"] == 0:
            raise ValueError("no frames to encode")
        return self._stream.finish().cpu()


def encode_chunks(model: Tokenizer, model_hash: str,
                  chunks: Iterable[np.ndarray | torch.Tensor]) -> Iterator[torch.Tensor]:
    """Latents of a clip given as successive chunks (`ClipEncoder`): one yield per chunk, then
    one for the tail."""
    encoder = ClipEncoder(model, model_hash)
    for chunk in chunks:
        yield encoder.push(chunk)
    yield encoder.finish()


@torch.no_grad()
def encode_frames(model: Tokenizer, model_hash: str, chunks: Iterable[np.ndarray], fps: float,
                  streamed: bool, model_name: str = "") -> LatentsFile:
    """Encode a clip given as successive uint8 (n,H,W,3) chunks.

    `streamed` pushes each chunk through a StreamingEncoder as it arrives; otherwise
    the chunks are joined and encoded in one call."""
    if not streamed:
        return encode_video(model, model_hash, frames_to_tensor(np.concatenate(list(chunks))), fps, model_name)
    count, shape = 0, None

    def counted() -> Iterator[np.ndarray]:
        nonlocal count, shape
        for chunk in chunks:
            count, shape = count + len(chunk), chunk.shape[1:3]
            yield chunk

    latents = torch.cat(list(encode_chunks(model, model_hash, counted())), dim=2)
    return latents_file(model, model_hash, latents, count, *shape, fps, model_name)


def latents_info(model: Tokenizer, model_hash: str, frames: int, height: int, width: int,
                 fps: float, model_name: str = "") -> LatentsInfo:
    """The metadata of `model`'s latents of a clip of `frames` frames of height x width."""
    return LatentsInfo(
        model_name=model_name,
        model_hash=model_hash,
        preset=model.config.preset,
        model_kind=model.kind,
        time_factor=model.config.time_factor,
        dtype=dtype_name(model.compute_dtype),
        frames=frames,
        height=height,
        width=width,
        fps=fps,
        padding=Padding.for_shape(frames, height, width, model.config.time_factor),
    )


def latents_file(model: Tokenizer, model_hash: str, latents: torch.Tensor, frames: int, height: int, width: int,
                 fps: float, model_name: str = "") -> LatentsFile:
    """The latents of a clip of `frames` frames of height x width, with their metadata."""
    info = latents_info(model, model_hash, frames, height, width, fps, model_name)
    return LatentsFile(latents=latents.float().cpu(), **vars(info))


@torch.no_grad()
def decode_video(model: Tokenizer, model_hash: str, item: LatentsFile, steps: int = 1, seed: int = 0,
                 chunk: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the decoded clip as float (1,3,n,H,W) chunks, cropped to the original size
    and length. `chunk` latent frames at a time go through a StreamingDecoder; None
    decodes the whole clip in one call."""
    latents = item.latents.to(model.device)
    if chunk is None:
        yield _Crop(item)(model.decode(latents, steps=steps, seed=seed)).cpu()
        return
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 latent frame, got {chunk}")
    parts = (latents[:, :, i : i + chunk] for i in range(0, latents.shape[2], chunk))
    yield from decode_chunks(model, model_hash, item, parts, steps, seed)


def decode_chunk_length(model: Tokenizer, frames: int) -> int:
    """The latent frames of a decode chunk that yields at most `frames` pixel frames past a
    stream's first chunk (at least one latent frame, which yields the model's `time_factor`):
    how the service and `cdt reconstruct --chunk` cut a clip's latents alike."""
    return max(1, frames // model.config.time_factor)


class ClipDecoder:
    """One clip's streamed decode, a call per latent chunk (1,16,m,h,w) (the service runs each call
    as one model job): its frames cropped to the clip's size and length (`info`)."""

    def __init__(self, model: Tokenizer, model_hash: str, info: LatentsInfo, steps: int = 1, seed: int = 0) -> None:
        self._device = model.device
        self._decoder = StreamingDecoder(model, model_hash, steps=steps, seed=seed)
        self._crop = _Crop(info)

    @torch.no_grad()
    def push(self, latents: torch.Tensor) -> torch.Tensor:
        """Float (1,3,n,H,W) frames on the model's device (n may be 0)."""
        return self._crop(self._decoder.push(latents.to(self._device)))

    def frames(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 (n,H,W,3) frames on the host, quantised on the model's device."""
        return self.step(latents).run()

    def step(self, latents: torch.Tensor) -> StreamPush[np.ndarray]:
        """`frames` as a unit of model work that may run batched with other streams' (`StreamPush`)."""
        return StreamPush(self._decoder, lambda: latents.to(self._device),
                          lambda video: tensor_to_frames(self._crop(video)), tuple(latents.shape))


def decode_chunks(model: Tokenizer, model_hash: str, info: LatentsInfo, chunks: Iterable[torch.Tensor],
                  steps: int = 1, seed: int = 0) -> Iterator[torch.Tensor]:
    """Decode successive latent chunks of the clip `info` describes (`ClipDecoder`): float
    (1,3,n,H,W) chunks on the host, empty ones skipped."""
    decoder = ClipDecoder(model, model_hash, info, steps, seed)
    for part in chunks:
        video = decoder.push(part)
        if video.shape[2]:
            yield video.cpu()


class _Crop:
    """Decoded chunks cut to a clip's original height, width and frame count."""

    def __init__(self, info: LatentsInfo) -> None:
        self._info, self._remaining = info, info.frames

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        video = video[:, :, :self._remaining, :self._info.height, :self._info.width]
        self._remaining -= video.shape[2]
        return video


def decode_frames(model: Tokenizer, model_hash: str, item: LatentsFile, steps: int = 1, seed: int = 0,
                  chunk: int | None = None) -> Iterator[np.ndarray]:
    """`decode_video` as uint8 (n,H,W,3) RGB chunks."""
    return (tensor_to_frames(video) for video in decode_video(model, model_hash, item, steps, seed, chunk))
