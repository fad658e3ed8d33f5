"""FeatureCache: the explicit state of a causal network processed chunk by chunk.

Each stateful layer owns one key (its module path, assigned once when the model is
built). A layer reads its entry before processing a chunk and writes it back after.
Multi-step decoding keeps one namespace per DDIM step through `scope`.

The `started` flag tells a layer what a missing entry means. In a cache that has not
started, it is the first chunk of the stream: the layer pads as for a clip's first
frame. In a started cache (a stream resumed mid-way with no history), it is steady
state with an unknown past: the layer pads with as many frames as it would have cached.
The stream object sets the flag after its first non-empty chunk.

State exports to bytes as safetensors (tensors) with a JSON metadata header, and
imports again in any process; nothing is ever pickled.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

CACHE_FORMAT = "cdt-feature-cache"
CACHE_FORMAT_VERSION = 2
_META_KEY = "cdt_cache"
STARTED_KEY = "started"


def _reusable(old: torch.Tensor, value: torch.Tensor) -> bool:
    # An inference-mode tensor may only be written in inference mode (and an ordinary one
    # there only by a copy into a new tensor).
    return (old.shape == value.shape and old.dtype == value.dtype and old.device == value.device
            and old.is_inference() == torch.is_inference_mode_enabled())


class CacheFormatError(ValueError):
    """Bytes that are not a valid exported FeatureCache."""


class FeatureCache:
    """Tensors keyed by layer path, plus JSON-serialisable metadata."""

    def __init__(self, meta: dict[str, Any] | None = None) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.meta: dict[str, Any] = dict(meta or {})

    # Layers use get, set, scope and started; streams also take entries out with pop.
    def get(self, key: str) -> torch.Tensor | None:
        return self.tensors.get(key)

    def pop(self, key: str) -> torch.Tensor | None:
        """Remove and return the entry under `key` (None if there is none)."""
        return self.tensors.pop(key, None)

    def set(self, key: str, value: torch.Tensor) -> None:
        """Store a copy of `value` (a view would keep a whole activation alive), into the
        tensor already stored under `key` when it has the same shape: a stream's state then
        keeps its allocations from chunk to chunk instead of taking new ones among each
        chunk's temporaries, which fragments the C heap and raises a long stream's peak
        memory. So stored tensors are updated in place: take copies to keep a state."""
        old = self.tensors.get(key)
        if old is not None and _reusable(old, value):
            old.copy_(value.detach())
        else:
            self.tensors[key] = value.detach().clone()

    def scope(self, prefix: str) -> "CacheScope":
        return CacheScope(self, prefix)

    @property
    def started(self) -> bool:
        """Whether the stream is past its start; kept in `meta`, so it travels with exports."""
        return bool(self.meta.get(STARTED_KEY, False))

    @started.setter
    def started(self, value: bool) -> None:
        self.meta[STARTED_KEY] = bool(value)

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def nbytes(self) -> int:
        """Bytes held by the cached tensors (the state's size without the metadata)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def copy(self) -> "FeatureCache":
        """A cache holding copies of these tensors and metadata: it keeps the state as it is
        now while this one goes on being updated in place."""
        cache = FeatureCache(json.loads(json.dumps(self.meta)))
        cache.tensors = {key: tensor.clone() for key, tensor in self.tensors.items()}
        return cache

    def equals(self, other: "FeatureCache") -> bool:
        """Whether both hold the same entries with exactly equal tensors."""
        return self.tensors.keys() == other.tensors.keys() and all(
            torch.equal(value, other.tensors[key]) for key, value in self.tensors.items())

    @classmethod
    def join(cls, caches: "list[FeatureCache]", skip: str | None = None) -> "FeatureCache":
        """One cache holding several streams' states side by side along the batch dimension
        (every cached tensor is batch-first), with the first one's metadata, to run them as one
        batch: the caches must hold the same entries of the same shapes (`skip` left out)."""
        joined = cls(dict(caches[0].meta))
        joined.tensors = {key: torch.cat([cache.tensors[key] for cache in caches])
                          for key in caches[0].tensors if key != skip}
        return joined

    def split_into(self, caches: "list[FeatureCache]", sizes: list[int], skip: str | None = None) -> None:
        """Give each of `caches` its rows of this joined state (`join`), in place; their entries
        this one lacks go (`skip` kept)."""
        start = 0
        for cache, size in zip(caches, sizes):
            for key in [key for key in cache.tensors if key not in self.tensors and key != skip]:
                del cache.tensors[key]
            for key, tensor in self.tensors.items():
                cache.set(key, tensor[start:start + size])
            start += size

    def layout(self) -> tuple:
        """Each entry's name, shape and dtype: what states run as one batch must share."""
        return tuple((key, tuple(t.shape), t.dtype) for key, t in sorted(self.tensors.items()))

    def to(self, device: torch.device | str) -> "FeatureCache":
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return self

    # --- export / import ------------------------------------------------------------
    def to_bytes(self) -> bytes:
        header = {"format": CACHE_FORMAT, "version": CACHE_FORMAT_VERSION, "meta": self.meta}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        return st_save(tensors, metadata={_META_KEY: json.dumps(header, sort_keys=True)})

    @classmethod
    def from_bytes(cls, data: bytes, device: torch.device | str = "cpu") -> "FeatureCache":
        try:
            tensors = st_load(data)
            header = json.loads(_read_metadata(data)[_META_KEY])
        except Exception as exc:  # safetensors raises several types for bad input
            raise CacheFormatError(f"not a feature-cache file: {exc}") from None
        if header.get("format") != CACHE_FORMAT:
            raise CacheFormatError(f"not a feature-cache file (format={header.get('format')!r})")
        if header.get("version") != CACHE_FORMAT_VERSION:
            raise CacheFormatError(f"unsupported feature-cache version {header.get('version')!r}")
        cache = cls(header.get("meta", {}))
        cache.tensors = {k: v.to(device) for k, v in tensors.items()}
        return cache


class CacheScope:
    """A prefixed view on a FeatureCache (e.g. one DDIM step's namespace)."""

    def __init__(self, cache: FeatureCache, prefix: str) -> None:
        self._cache = cache
        self._prefix = prefix

    def get(self, key: str) -> torch.Tensor | None:
        return self._cache.get(self._prefix + key)

    def set(self, key: str, value: torch.Tensor) -> None:
        self._cache.set(self._prefix + key, value)

    def scope(self, prefix: str) -> "CacheScope":
        return CacheScope(self._cache, self._prefix + prefix)

    @property
    def started(self) -> bool:
        return self._cache.started


def _read_metadata(data: bytes) -> dict[str, str]:
    """The string metadata of a safetensors blob, without loading its tensors.

    The model reads this header itself: the `safetensors` library gives metadata only for a
    file it opens by name (`safe_open`), and `model` imports nothing else of ours, so not the
    formats' reader (`cdt_client.formats.tensors`) either."""
    if len(data) < 8:
        raise CacheFormatError("too short to be a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise CacheFormatError("bad safetensors header length")
    header = json.loads(data[8 : 8 + n])
    return header.get("__metadata__", {}) or {}
