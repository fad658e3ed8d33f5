"""A session as the store holds it: the record each chunk reads, changes and commits.

The record is the store's `meta` (JSON). Its input log names the chunk bodies the store keeps
beside it, described by their format (what the body parsers take), so a replica replays them
through the same parser as when they arrived.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from ..bodies import BodyFormat
from .protocol import KindName

FINISH = "finish"  # the `seq` recorded for a finish, so a retried finish replays too


class Counters(BaseModel):
    """A session's progress, in pixel frames and latent frames."""

    frames_in: int = 0
    frames_out: int = 0
    latents_in: int = 0
    latents_out: int = 0


class LastResponse(BaseModel):
    """What a retry of the last applied chunk (or finish) is answered with, beside the stored body."""

    seq: int | Literal["finish"]
    media_type: str
    chunk: dict[str, Any] | None  # the chunk's facts (`ChunkResult.chunk`)


class LogEntry(BaseModel):
    """A logged chunk input: its body is the store log entry named `name`, as received."""

    seq: int
    start: int  # input position: pixel frames (encode) or latent frames (decode) before this chunk
    count: int  # input frames in this chunk, in the same unit
    format: BodyFormat
    nbytes: int

    @property
    def name(self) -> str:
        return str(self.seq)


class SessionRecord(BaseModel):
    """A session's metadata as the store holds it."""

    id: str
    kind: KindName
    owner: str
    model_hash: str
    dtype: str
    ttl_s: int
    created_at: float
    height: int | None
    width: int | None
    frames: int | None
    steps: int
    seed: int
    fps: float
    latent_size: tuple[int, int] | None = None  # decode: the (h, w) of every chunk's latents, set by the first
    next_seq: int = 0
    finished: bool = False
    counters: Counters = Field(default_factory=Counters)
    last: LastResponse | None = None
    log: list[LogEntry] = Field(default_factory=list)
