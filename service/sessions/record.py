"""A session as the store holds it: the record each chunk reads, changes and commits.

The record is the store's `meta` (JSON). Its input log names the chunk bodies the store keeps
beside it, described by their format (what the body parsers take), so a replica replays them
through the same parser as when they arrived.

Replicas of the previous release (cdt-tokenizer 0.1.0) store each log entry's body kind and
content type, and the last answer's headers: records in that layout are read too, so a rolling
deploy continues the sessions they hold (the other way round, they cannot read this layout).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from cdt_client.formats.api import CHUNK_HEADER
from pydantic import BaseModel, Field, model_validator

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

    @model_validator(mode="before")
    @classmethod
    def _from_headers(cls, data: Any) -> Any:
        """The 0.1.0 layout: the answer's headers, whose X-CDT-Chunk holds the facts."""
        if isinstance(data, dict) and "headers" in data and "chunk" not in data:
            data = {**data}
            facts = data.pop("headers").get(CHUNK_HEADER)
            data["chunk"] = None if facts is None else json.loads(facts)
        return data


class LogEntry(BaseModel):
    """A logged chunk input: its body is the store log entry named `name`, as received."""

    seq: int
    start: int  # input position: pixel frames (encode) or latent frames (decode) before this chunk
    count: int  # input frames in this chunk, in the same unit
    format: BodyFormat
    nbytes: int

    @model_validator(mode="before")
    @classmethod
    def _from_body_kind(cls, data: Any) -> Any:
        """The 0.1.0 layout: the body's kind (the same names as BodyFormat) and content type."""
        if isinstance(data, dict) and "body_kind" in data and "format" not in data:
            data = {key: value for key, value in data.items() if key != "content_type"}
            data["format"] = data.pop("body_kind")
        return data

    @property
    def name(self) -> str:
        return str(self.seq)


class SessionRecord(BaseModel):
    """A session's metadata as the store holds it."""

    id: str
    kind: KindName
    owner: str
    model: str = ""  # the name the model was served under at creation ("": a record from before names)
    model_hash: str  # the model the session is pinned to, on any replica and under any name
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
