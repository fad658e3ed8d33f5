"""What a data set encode makes: its options, the model, the inputs in a fixed order and
the shard each input goes to."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

SHARD_NAME = "shard-{:06d}.tar"
# Sample keys are the input's position in the sorted source: fixed width, so they sort as
# numbers, and without dots (WebDataset splits a member name at its first dot).
KEY_DIGITS = 9
CROPS = ("none", "center")


@dataclass(frozen=True)
class EncodeOptions:
    """How every input is read and encoded: the same options give the same latents as
    `cdt encode --frames --size` and POST /v1/encode?frames=&size= (crop "none")."""

    frames: int | None  # the first N frames; None: whole clips
    size: int | None  # short side resized to this; None: as decoded
    crop: str  # "none", or "center": a centre crop size x size after the resize
    chunk_frames: int  # pixel frames per step of the streaming encoder
    dtype: str  # compute dtype of the model
    shard_size: int  # inputs per shard

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.crop == "center" and self.size is None:
            raise ValueError("a centre crop needs a size (--size)")
        for name in ("frames", "size", "chunk_frames", "shard_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    @property
    def crop_shape(self) -> tuple[int, int] | None:
        return (self.size, self.size) if self.crop == "center" else None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelRef:
    """The checkpoint that encodes: its name (the checkpoint folder's) and content hash."""

    name: str
    hash: str
    preset: str
    kind: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Input:
    """One source file: its sample key, its name as recorded (relative to the source's
    folder) and the path it is opened at."""

    key: str
    name: str
    path: str


@dataclass(frozen=True)
class Shard:
    name: str
    inputs: tuple[Input, ...]


def plan_shards(files: list[tuple[str, str]], shard_size: int) -> list[Shard]:
    """Shards of `shard_size` inputs from (name, path) pairs, taken in sorted order."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    inputs = [Input(f"{i:0{KEY_DIGITS}d}", name, path) for i, (name, path) in enumerate(sorted(files))]
    return [Shard(SHARD_NAME.format(n), tuple(inputs[start : start + shard_size]))
            for n, start in enumerate(range(0, len(inputs), shard_size))]


def source_digest(shards: list[Shard]) -> str:
    """sha256 of the inputs' names in order: two runs into one OUTPUT must read the same source."""
    names = "\n".join(item.name for shard in shards for item in shard.inputs)
    return hashlib.sha256(names.encode()).hexdigest()
