"""Streaming encode/decode over an explicit FeatureCache.

The encoder takes frames in chunks of any length: it emits latents for every complete
group (1 frame first, then 4 at a time) and keeps the remainder in the cache, so the
buffered frames travel with the exported state. `finish()` pads the remainder by
repeating its last frame, as `pad_frames` does for a whole clip.

The decoder takes latent chunks of any length and emits the pixel frames they decode
to: 1+4(m-1) for the first chunk, 4m afterwards.

Concatenated outputs equal the whole-clip `encode`/`decode` up to float rounding.

A stream's state names the weights it was computed with by their content hash (the
loader's `ModelIdentity.content_hash`, or `content_hash(model)` for a model in memory), so
a state is never continued by another model.

`resume` starts either stream in the middle of a video with no history, keeping the
original frame indexing: its layers pad the unknown past as in steady state. Once the
inputs since the resume point cover the model's receptive field
(model/streaming/receptive_field.py), its state and outputs equal those of the uninterrupted
stream, so replaying a log of recent chunks rebuilds a stream anywhere.
"""

from __future__ import annotations

from typing import Any

import torch

from ..cache import FeatureCache
from ..config import SPACE_FACTOR, TIME_FACTOR
from ..tokenizer import Tokenizer, dtype_name, pixel_frames, validate_latents
from .positions import outputs_for, resume_position, settled_inputs

PENDING_KEY = "pending_frames"


class CacheMismatchError(ValueError):
    """A cache made by another model, dtype, or kind of stream."""


def pad_frames(video: torch.Tensor) -> torch.Tensor:
    """Pad (B,C,T,H,W) to 1+4k frames by repeating the last frame."""
    missing = (-(video.shape[2] - 1)) % TIME_FACTOR
    if missing == 0:
        return video
    return torch.cat([video, video[:, :, -1:].expand(-1, -1, missing, -1, -1)], dim=2)


class _Stream:
    kind = ""

    def __init__(self, model: Tokenizer, model_hash: str, cache: FeatureCache | None, meta: dict[str, Any]) -> None:
        self.model, self.model_hash = model, model_hash
        if cache is None:
            cache = FeatureCache({"kind": self.kind, "model_hash": model_hash,
                                  "model_kind": model.kind, "dtype": dtype_name(model.compute_dtype), **meta})
            cache.started = False
        else:
            self._check(cache)
            cache.to(model.device)
        self.cache = cache

    @property
    def meta(self) -> dict[str, Any]:
        return self.cache.meta

    def _check(self, cache: FeatureCache) -> None:
        expected = {"kind": self.kind, "model_hash": self.model_hash,
                    "dtype": dtype_name(self.model.compute_dtype)}
        for key, value in expected.items():
            if cache.meta.get(key) != value:
                raise CacheMismatchError(
                    f"cache {key} is {cache.meta.get(key)!r}, this stream needs {value!r}"
                )

    def batch_key(self, input_shape: tuple[int, ...]) -> tuple:
        """What streams pushed together in one batch (`push_together`) must share, for a push
        of an input of `input_shape`: kind, model and settings, phase (first chunk or not),
        the input's shape and the state's layout (which also tells a stream resumed with no
        history from one that has it)."""
        return (self.kind, id(self.model), self.model_hash, dtype_name(self.model.compute_dtype),
                self.meta["steps"], self.cache.started, self._first(), tuple(input_shape), self.cache.layout())

    def _first(self) -> bool:
        raise NotImplementedError

    def export_state(self) -> bytes:
        return self.cache.to_bytes()

    @classmethod
    def from_state(cls, model: Tokenizer, model_hash: str, data: bytes):
        return cls(model, model_hash, cache=FeatureCache.from_bytes(data, model.device))


class StreamingEncoder(_Stream):
    kind = "encode"

    def __init__(self, model: Tokenizer, model_hash: str, cache: FeatureCache | None = None) -> None:
        super().__init__(model, model_hash, cache, {"frames_in": 0, "frames_encoded": 0, "latents_out": 0,
                                        "shape": None, "steps": 0, "finished": False})

    @classmethod
    def resume(cls, model: Tokenizer, model_hash: str, frames_done: int) -> "StreamingEncoder":
        """A stream that has encoded `frames_done` frames (a group boundary: 1, 5, 9, ...)
        with nothing pending, and remembers none of them."""
        if frames_done < 1 or resume_position(cls.kind, frames_done) != frames_done:
            raise ValueError(f"frames_done must be 1+{TIME_FACTOR}k (a group boundary), got {frames_done}")
        stream = cls(model, model_hash)
        stream.meta.update(frames_in=frames_done, frames_encoded=frames_done,
                           latents_out=outputs_for(cls.kind, frames_done))
        stream.cache.started = True
        return stream

    def _validate(self, frames: torch.Tensor) -> None:
        if not isinstance(frames, torch.Tensor) or frames.dim() != 5 or frames.shape[1] != 3:
            raise ValueError(f"frames must be a (B,3,T,H,W) tensor, got {tuple(getattr(frames, 'shape', ()))}")
        if not frames.is_floating_point():
            raise ValueError(f"frames must be float in [-1,1], got {frames.dtype}")
        b, _, _, h, w = frames.shape
        if h % SPACE_FACTOR or w % SPACE_FACTOR or h == 0 or w == 0:
            raise ValueError(f"frame height and width must be positive multiples of 8, got {h}x{w}")
        shape = self.meta["shape"]
        if shape is not None and [b, h, w] != shape:
            raise ValueError(f"chunk has batch,height,width {[b, h, w]}, the stream started with {shape}")
        if self.meta["finished"]:
            raise ValueError("the stream is finished")

    def _first(self) -> bool:
        return self.meta["frames_encoded"] == 0

    @torch.no_grad()
    def push(self, frames: torch.Tensor) -> torch.Tensor:
        """Feed frames (B,3,n,H,W), n >= 0; return latents for the complete groups."""
        ready, rest = self._split(frames)
        latents = self.model.posterior(ready, self.cache).mean if ready.shape[2] else None
        return self._took(frames, ready, rest, latents)

    def _split(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the frames the network takes now: complete groups, the pending ones first; those
        left pending) for a push of `frames`. The stream is unchanged."""
        self._validate(frames)
        pending = self.cache.get(PENDING_KEY)
        frames = frames.to(self.model.device, self.model.compute_dtype)
        if pending is not None:
            frames = torch.cat([pending.to(frames.dtype), frames], dim=2)
        done = self.meta["frames_encoded"]
        usable = settled_inputs(self.kind, done + frames.shape[2]) - done
        return frames[:, :, :usable], frames[:, :, usable:]

    def _took(self, frames: torch.Tensor, ready: torch.Tensor, rest: torch.Tensor,
              latents: torch.Tensor | None) -> torch.Tensor:
        """Count a push of `frames` (`_split` into `ready` and `rest`) whose ready frames the
        network turned into `latents` (None: there were none); its answer."""
        b, _, n, h, w = frames.shape
        self.meta["shape"] = [b, h, w]
        self.meta["frames_in"] += n
        if rest.shape[2]:
            self.cache.set(PENDING_KEY, rest)
        else:
            self.cache.pop(PENDING_KEY)
        return self._empty() if latents is None else self._encoded(ready, latents)

    def _empty(self) -> torch.Tensor:
        b, h, w = self.meta["shape"]
        lat = self.model.config.latent_channels
        return torch.zeros(b, lat, 0, h // SPACE_FACTOR, w // SPACE_FACTOR, device=self.model.device)

    def _encoded(self, frames: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        self.cache.started = True
        self.meta["frames_encoded"] += frames.shape[2]
        self.meta["latents_out"] += latents.shape[2]
        return latents

    @torch.no_grad()
    def finish(self) -> torch.Tensor:
        """Encode the buffered remainder, padded by repeating its last frame; close."""
        if self.meta["frames_in"] == 0 or self.meta["shape"] is None:  # a resumed stream has frames_in
            raise ValueError("no frames were pushed to this stream")
        self.meta["finished"] = True
        pending = self.cache.pop(PENDING_KEY)
        if pending is None:
            return self._empty()
        # Past the first frame, every group is 4 frames: top the remainder up to one.
        missing = TIME_FACTOR - pending.shape[2]
        frames = torch.cat([pending, pending[:, :, -1:].expand(-1, -1, missing, -1, -1)], dim=2)
        return self._encoded(frames, self.model.posterior(frames, self.cache).mean)


class StreamingDecoder(_Stream):
    kind = "decode"

    def __init__(self, model: Tokenizer, model_hash: str, steps: int = 1, seed: int = 0,
                 cache: FeatureCache | None = None) -> None:
        if cache is None:  # a restored state carries its steps
            steps = model.decode_steps(steps)
        super().__init__(model, model_hash, cache, {"steps": steps, "seed": int(seed), "latents_in": 0,
                                        "frames_out": 0, "shape": None})

    @classmethod
    def resume(cls, model: Tokenizer, model_hash: str, steps: int, seed: int,
               latents_done: int) -> "StreamingDecoder":
        """A stream that has decoded `latents_done` latent frames (>= 1) and remembers
        none of them: the next frame's noise has its index in the whole video, and the
        temporal upsamplers no longer drop a stream's first frame."""
        if latents_done < 1:
            raise ValueError(f"latents_done must be >= 1, got {latents_done}")
        stream = cls(model, model_hash, steps=steps, seed=seed)
        stream.meta.update(latents_in=latents_done, frames_out=outputs_for(cls.kind, latents_done))
        stream.cache.started = True
        return stream

    def _first(self) -> bool:
        return self.meta["frames_out"] == 0

    @torch.no_grad()
    def push(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode a latent chunk (B,16,m,h,w), m >= 0, to its pixel frames."""
        self._validate(latents)
        if latents.shape[2] == 0:
            return self._took(latents, None)
        video = self.model.decode_chunk(latents.to(self.model.device), steps=self.meta["steps"],
                                        seed=self.meta["seed"], start=self.meta["frames_out"], cache=self.cache)
        return self._took(latents, video)

    def _validate(self, latents: torch.Tensor) -> None:
        validate_latents(latents, self.model.config.latent_channels, allow_empty=True)
        b, _, _, h, w = latents.shape
        shape = self.meta["shape"]
        if shape is not None and [b, h, w] != shape:
            raise ValueError(f"chunk has batch,height,width {[b, h, w]}, the stream started with {shape}")

    def _took(self, latents: torch.Tensor, video: torch.Tensor | None) -> torch.Tensor:
        """Count a push of `latents` that decoded to `video` (None: the chunk was empty); its answer."""
        b, _, m, h, w = latents.shape
        self.meta["shape"] = [b, h, w]
        if video is None:
            return torch.zeros(b, 3, 0, h * SPACE_FACTOR, w * SPACE_FACTOR, device=self.model.device)
        frames = pixel_frames(m, first_chunk=self._first())
        self.cache.started = True
        self.meta["latents_in"] += m
        self.meta["frames_out"] += frames
        return video


def push_together(streams: list[StreamingEncoder] | list[StreamingDecoder],
                  inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Push one input into each stream as one batched forward: each stream's state and answer
    are those of its own `push`, up to float rounding (the batch's kernels may round otherwise),
    and a decode stream (of one item) draws its own noise. The streams must agree on
    `batch_key` for their inputs; their states change only once the forward has succeeded."""
    key = streams[0].batch_key(tuple(inputs[0].shape))
    if any(stream.batch_key(tuple(x.shape)) != key for stream, x in zip(streams, inputs)):
        raise ValueError("streams pushed together must agree on batch_key")
    if len(streams) == 1:
        return [streams[0].push(inputs[0])]
    model, sizes = streams[0].model, [x.shape[0] for x in inputs]
    caches = [stream.cache for stream in streams]
    if isinstance(streams[0], StreamingEncoder):
        parts = [stream._split(x) for stream, x in zip(streams, inputs)]
        latents: list[torch.Tensor | None] = [None] * len(streams)
        if parts[0][0].shape[2]:
            joined = FeatureCache.join(caches, skip=PENDING_KEY)
            latents = list(model.posterior(torch.cat([ready for ready, _ in parts]), joined).mean.split(sizes))
            joined.split_into(caches, sizes, skip=PENDING_KEY)
        return [stream._took(x, ready, rest, z) for stream, x, (ready, rest), z in zip(streams, inputs, parts, latents)]
    for stream, x in zip(streams, inputs):
        stream._validate(x)
        if x.shape[0] != 1:
            raise ValueError("decode streams pushed together take one item each (each draws its own noise)")
    if inputs[0].shape[2] == 0:
        return [stream._took(x, None) for stream, x in zip(streams, inputs)]
    joined = FeatureCache.join(caches)
    video = model.decode_chunk(torch.cat(inputs).to(model.device), steps=streams[0].meta["steps"],
                               seed=[stream.meta["seed"] for stream in streams],
                               start=[stream.meta["frames_out"] for stream in streams], cache=joined)
    joined.split_into(caches, sizes)
    return [stream._took(x, v) for stream, x, v in zip(streams, inputs, video.split(sizes))]
