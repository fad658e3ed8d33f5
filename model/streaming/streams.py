"""Streaming encode/decode over an explicit FeatureCache.

The encoder takes frames in chunks of any length: it emits latents for every complete
group (1 frame first, then the model's `config.time_factor` at a time) and keeps the remainder in the cache, so the
buffered frames travel with the exported state. `finish()` pads the remainder by
repeating its last frame, as `pad_frames` does for a whole clip.

The decoder takes latent chunks of any length and emits the pixel frames they decode
to: 1+f(m-1) for the first chunk, fm afterwards (f the time factor).

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


def pad_frames(video: torch.Tensor, time_factor: int = TIME_FACTOR) -> torch.Tensor:
    """Pad (B,C,T,H,W) to 1+fk frames (f = `time_factor`, the model's
    `config.time_factor`) by repeating the last frame."""
    missing = (-(video.shape[2] - 1)) % time_factor
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

    @property
    def time_factor(self) -> int:
        return self.model.config.time_factor

    def _check(self, cache: FeatureCache) -> None:
        expected = {"kind": self.kind, "model_hash": self.model_hash,
                    "dtype": dtype_name(self.model.compute_dtype)}
        for key, value in expected.items():
            if cache.meta.get(key) != value:
                raise CacheMismatchError(
                    f"cache {key} is {cache.meta.get(key)!r}, this stream needs {value!r}"
                )

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
        factor = model.config.time_factor
        if frames_done < 1 or resume_position(cls.kind, frames_done, factor) != frames_done:
            raise ValueError(f"frames_done must be 1+{factor}k (a group boundary), got {frames_done}")
        stream = cls(model, model_hash)
        stream.meta.update(frames_in=frames_done, frames_encoded=frames_done,
                           latents_out=outputs_for(cls.kind, frames_done, factor))
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

    @torch.no_grad()
    def push(self, frames: torch.Tensor) -> torch.Tensor:
        """Feed frames (B,3,n,H,W), n >= 0; return latents for the complete groups."""
        self._validate(frames)
        b, _, n, h, w = frames.shape
        self.meta["shape"] = [b, h, w]
        self.meta["frames_in"] += n
        pending = self.cache.pop(PENDING_KEY)
        frames = frames.to(self.model.device, self.model.compute_dtype)
        if pending is not None:
            frames = torch.cat([pending.to(frames.dtype), frames], dim=2)
        total, done = frames.shape[2], self.meta["frames_encoded"]
        usable = settled_inputs(self.kind, done + total, self.time_factor) - done
        if usable < total:
            self.cache.set(PENDING_KEY, frames[:, :, usable:])
        return self._encode(frames[:, :, :usable])

    def _empty(self) -> torch.Tensor:
        b, h, w = self.meta["shape"]
        lat = self.model.config.latent_channels
        return torch.zeros(b, lat, 0, h // SPACE_FACTOR, w // SPACE_FACTOR, device=self.model.device)

    def _encode(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.shape[2] == 0:
            return self._empty()
        latents = self.model.posterior(frames, self.cache).mean
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
        # Past the first frame, every group is time_factor frames: top the remainder up to one.
        missing = self.time_factor - pending.shape[2]
        return self._encode(torch.cat([pending, pending[:, :, -1:].expand(-1, -1, missing, -1, -1)], dim=2))


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
        stream.meta.update(latents_in=latents_done,
                           frames_out=outputs_for(cls.kind, latents_done, model.config.time_factor))
        stream.cache.started = True
        return stream

    @torch.no_grad()
    def push(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode a latent chunk (B,16,m,h,w), m >= 0, to its pixel frames."""
        validate_latents(latents, self.model.config.latent_channels, allow_empty=True)
        b, _, m, h, w = latents.shape
        shape = self.meta["shape"]
        if shape is not None and [b, h, w] != shape:
            raise ValueError(f"chunk has batch,height,width {[b, h, w]}, the stream started with {shape}")
        self.meta["shape"] = [b, h, w]
        if m == 0:
            return torch.zeros(b, 3, 0, h * SPACE_FACTOR, w * SPACE_FACTOR, device=self.model.device)
        start = self.meta["frames_out"]
        video = self.model.decode_chunk(latents.to(self.model.device), steps=self.meta["steps"],
                                        seed=self.meta["seed"], start=start, cache=self.cache)
        self.cache.started = True
        self.meta["latents_in"] += m
        self.meta["frames_out"] += pixel_frames(m, first_chunk=start == 0, time_factor=self.time_factor)
        return video
