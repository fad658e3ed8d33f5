"""What the session routes take and answer: the body that creates a session, a session's
description, and the result of a chunk (which the routes render as a response)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from cdt_client.formats.api import MAX_JSON_SEED
from pydantic import BaseModel, ConfigDict, Field, field_validator

from media.video import MAX_FPS
from model import NUM_TIMESTEPS, SPACE_FACTOR


KindName = Literal["encode", "decode"]


class SessionSpec(BaseModel):
    """Body of POST /v1/sessions."""

    # strict, as its schema says: true is not 1, nor "8" a number
    model_config = ConfigDict(extra="forbid", strict=True)

    kind: KindName
    height: int | None = Field(None, ge=SPACE_FACTOR, description="original frame height (encode: default = "
                               "first chunk's; decode: output is cropped to it)")
    width: int | None = Field(None, ge=SPACE_FACTOR, description="original frame width")
    frames: int | None = Field(None, ge=1, description="decode: original frame count; output stops there")
    steps: int = Field(1, ge=1, le=NUM_TIMESTEPS, description="decode: DDIM steps, at most CDT_MAX_STEPS")
    seed: int = Field(0, ge=0, le=MAX_JSON_SEED, description="decode: noise seed")
    dtype: str | None = Field(None, description="compute dtype; must be the serving replica's")
    model: str | None = Field(None, max_length=64, description=(
        "the served model, by name (GET /v1/models; 404 `model_not_found`); default: the first. The session "
        "stays pinned to that model's weights (its hash) for its life"))
    fps: float = Field(30.0, gt=0, le=MAX_FPS, description="decode: frame rate of mp4 output")
    ttl_s: int | None = Field(None, ge=1, description="idle lifetime; at most CDT_SESSION_TTL_S")

    @field_validator("height", "width", "frames", "steps", "seed", "ttl_s", mode="before")
    @classmethod
    def _json_integer(cls, value):
        """JSON Schema's integers include 50.0, which strict validation would refuse."""
        return int(value) if isinstance(value, float) and value.is_integer() else value


class SessionInfo(BaseModel):
    """A session as GET /v1/sessions/{id} and POST /v1/sessions describe it."""

    id: str
    kind: KindName
    state: Literal["open", "finished"]
    next_seq: int
    frames_in: int
    frames_out: int
    latents_in: int
    latents_out: int
    height: int | None
    width: int | None
    frames: int | None
    steps: int
    seed: int
    model: str
    model_hash: str
    dtype: str
    log_chunks: int = Field(description="chunks held in the input log")
    log_bytes: int = Field(description="bytes of the input log in the store")
    snapshot_seq: int | None = Field(description="seq after which the stored snapshot was taken, if any")
    snapshot_bytes: int = Field(description="bytes of the stored snapshot (0 without one)")
    expires_at: float
    ttl_s: int


@dataclass(frozen=True)
class ChunkResult:
    """What a chunk (or a finish) answers: its body, and the facts sent beside it."""

    body: bytes
    media_type: str
    chunk: dict[str, Any] | None  # the chunk's position and progress; None for a decode session's finish
    replayed: bool = False  # the stored answer of an already applied seq
    rebuild: str | None = None  # why this replica rebuilt the stream first: missing, stale or evicted
