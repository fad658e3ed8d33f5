"""Streaming sessions: a long video (or latent sequence) in successive chunk requests.

Session state lives in tiers:

- hot: the live stream (StreamingEncoder/StreamingDecoder and its FeatureCache) stays in the
  memory of the replica that computed it (`HotStreams`, LRU under CDT_SESSION_HOT_MB), tagged
  with the store version it corresponds to;
- store: the typed `SessionRecord`, the last response, and an input log: each chunk's request
  body as received, kept while it is needed to cover the model's receptive field; optionally
  a FeatureCache snapshot, written off the response path.

A chunk is applied exactly once: its commit is a compare-and-set on the store version that
writes the record, the response and the log change together, so a retried `seq` (or a racing
duplicate that lost the write) gets the winner's bytes back without a second apply. A replica
whose hot stream is missing, evicted or older than the stored version rebuilds it, in the same
model job as the new chunk: from the snapshot plus the logged chunks after it (bit-identical),
or by replaying the logged window from a resumed stream (equal within float rounding).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal

import numpy as np
import torch
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors.torch import save as st_save

from media import Padding, pad_spatial, tensor_to_frames
from media.video import MAX_FPS
from model import (NUM_TIMESTEPS, SPACE_FACTOR, TIME_FACTOR, CacheFormatError, CacheMismatchError, FeatureCache,
                   StreamingDecoder, StreamingEncoder, Tokenizer, dtype_name, pixel_frames)

from ..bodies import NPY, SAFETENSORS, Body, BodyFormat, ClipOptions, Limits, body_from_bytes, parse_latent_chunk, \
    read_clip
from ..domain_errors import (BadParameter, Conflict, InvalidInput, NotFound, Overloaded, SeqOutOfOrder, TooLarge,
                            Unavailable)
from ..memory import chunk_bytes, cost_for
from ..metrics import LATENCY_BUCKETS, Metrics
from ..ops import check_steps, model_errors
from ..responses import render_frames
from ..settings import Settings
from ..wire import CHUNK_FORMAT, CHUNK_HEADER, MAX_JSON_SEED, REBUILD_HEADER, REPLAYED_HEADER
from ..workers import WorkerPool
from .store import SessionStore, StoredSession

log = logging.getLogger("cdt.sessions")

FINISH = "finish"  # the `seq` recorded for a finish, so a retried finish replays too
CHUNK_KINDS = tuple(BodyFormat)  # the session's kind is known only once its record is loaded
# Sizes from kB (tiny model, small frames, one chunk) to GB (snapshots at 720p).
BYTES_BUCKETS = tuple(2.0**k for k in range(10, 36, 2))
EVICTED_MEMORY = 10_000  # evicted ids remembered to tell "evicted" from "missing" rebuilds

Stream = StreamingEncoder | StreamingDecoder


class SessionRaced(Exception):
    """Another request advanced the session while this one was computing."""


# --- records -------------------------------------------------------------------------------

class SessionSpec(BaseModel):
    """Body of POST /v1/sessions."""

    # strict, as its schema says: true is not 1, nor "8" a number
    model_config = ConfigDict(extra="forbid", strict=True)

    kind: Literal["encode", "decode"]
    height: int | None = Field(None, ge=SPACE_FACTOR, description="original frame height (encode: default = "
                               "first chunk's; decode: output is cropped to it)")
    width: int | None = Field(None, ge=SPACE_FACTOR, description="original frame width")
    frames: int | None = Field(None, ge=1, description="decode: original frame count; output stops there")
    steps: int = Field(1, ge=1, le=NUM_TIMESTEPS, description="decode: DDIM steps, at most CDT_MAX_STEPS")
    seed: int = Field(0, ge=0, le=MAX_JSON_SEED, description="decode: noise seed")
    dtype: str | None = Field(None, description="compute dtype; must be the serving replica's")
    fps: float = Field(30.0, gt=0, le=MAX_FPS, description="decode: frame rate of mp4 output")
    ttl_s: int | None = Field(None, ge=1, description="idle lifetime; at most CDT_SESSION_TTL_S")

    @field_validator("height", "width", "frames", "steps", "seed", "ttl_s", mode="before")
    @classmethod
    def _json_integer(cls, value):
        """JSON Schema's integers include 50.0, which strict validation would refuse."""
        return int(value) if isinstance(value, float) and value.is_integer() else value


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
    headers: dict[str, str]


class LogEntry(BaseModel):
    """A logged chunk input: its body is the store log entry named `name`, as received."""

    seq: int
    start: int  # input position: pixel frames (encode) or latent frames (decode) before this chunk
    count: int  # input frames in this chunk, in the same unit
    body_kind: BodyFormat
    content_type: str
    nbytes: int

    @property
    def name(self) -> str:
        return str(self.seq)


class SessionRecord(BaseModel):
    """A session's metadata as the store holds it."""

    id: str
    kind: Literal["encode", "decode"]
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
    next_seq: int = 0
    finished: bool = False
    counters: Counters = Field(default_factory=Counters)
    last: LastResponse | None = None
    log: list[LogEntry] = Field(default_factory=list)

    @property
    def input_end(self) -> int:
        """Input frames received so far, in the log's unit."""
        return self.counters.frames_in if self.kind == "encode" else self.counters.latents_in


class SessionInfo(BaseModel):
    """A session as GET /v1/sessions/{id} and POST /v1/sessions describe it."""

    id: str
    kind: Literal["encode", "decode"]
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
    model_hash: str
    dtype: str
    log_chunks: int = Field(description="chunks held in the input log")
    log_bytes: int = Field(description="bytes of the input log in the store")
    snapshot_seq: int | None = Field(description="seq after which the stored snapshot was taken, if any")
    snapshot_bytes: int = Field(description="bytes of the stored snapshot (0 without one)")
    expires_at: float
    ttl_s: int


@dataclass
class ChunkResult:
    body: bytes
    media_type: str
    headers: dict[str, str]


# --- the input log's window ------------------------------------------------------------------

def resume_position(kind: str, start: int) -> int:
    """Where a stream rebuilt from a log entry starting at input `start` resumes: encode streams
    resume on a group boundary (1+4k), the first at or after `start`."""
    if kind == "decode" or start == 0:
        return start
    return 1 + TIME_FACTOR * -(-(start - 1) // TIME_FACTOR)


def settled_inputs(kind: str, end: int) -> int:
    """Inputs that the stream's state has consumed after `end` inputs: an encoder keeps the
    frames past the last group boundary pending, not yet in its state."""
    if kind == "decode" or end == 0:
        return end
    return 1 + TIME_FACTOR * ((end - 1) // TIME_FACTOR)


def window(kind: str, entries: list[LogEntry], end: int, field: int) -> int:
    """Index of the first entry to keep: the latest one from which a replay reaches `end` with
    at least `field` inputs replayed (a log starting at 0 always rebuilds exactly)."""
    keep = 0
    for i, entry in enumerate(entries):
        position = resume_position(kind, entry.start)
        if position == 0 or settled_inputs(kind, end) - position >= field:
            keep = i
    return keep


# --- hot streams -----------------------------------------------------------------------------

@dataclass
class HotEntry:
    stream: Stream
    version: int  # the store version the stream's state corresponds to
    nbytes: int


class HotStreams:
    """The live streams of the sessions this replica serves, least recently used first, under a
    byte budget. A stream is taken out while a chunk computes on it and put back after commit."""

    def __init__(self, budget_bytes: int, evicted: Counter) -> None:
        self.budget = budget_bytes
        self.nbytes = 0
        self._entries: OrderedDict[str, HotEntry] = OrderedDict()
        self._evicted: OrderedDict[str, None] = OrderedDict()
        self._evictions = evicted

    def take(self, session_id: str, version: int) -> tuple[Stream | None, str | None]:
        """The session's stream if it is at `version`, else None and why not."""
        entry = self._entries.pop(session_id, None)
        if entry is None:
            return None, "evicted" if session_id in self._evicted else "missing"
        self.nbytes -= entry.nbytes
        if entry.version != version:
            return None, "stale"  # another replica advanced the session
        return entry.stream, None

    def put(self, session_id: str, stream: Stream, version: int) -> None:
        entry = HotEntry(stream, version, stream.cache.nbytes())
        self._evicted.pop(session_id, None)
        self._entries[session_id] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.budget:
            self._evict_oldest()

    def discard(self, session_id: str) -> None:
        entry = self._entries.pop(session_id, None)
        if entry is not None:
            self.nbytes -= entry.nbytes

    def _evict_oldest(self) -> None:
        session_id, entry = self._entries.popitem(last=False)
        self.nbytes -= entry.nbytes
        self._evictions.inc()
        self._evicted[session_id] = None
        if len(self._evicted) > EVICTED_MEMORY:
            self._evicted.popitem(last=False)


# --- rebuilding ------------------------------------------------------------------------------

@dataclass
class Rebuild:
    """What a stream is rebuilt from: a snapshot (or None: a fresh or resumed stream) and the
    logged chunks to replay after it, with their bodies."""

    reason: str
    snapshot: bytes | None
    entries: list[tuple[LogEntry, bytes]]
    read_s: float  # reading the snapshot and the log from the store

    @property
    def source(self) -> str:
        if self.snapshot is not None:
            return "snapshot"
        return "window" if self.entries and self.entries[0][0].start > 0 else "start"


def open_stream(model: Tokenizer, record: SessionRecord, position: int) -> Stream:
    """A stream of the session's kind that has taken `position` inputs and remembers none."""
    if record.kind == "encode":
        return StreamingEncoder.resume(model, position) if position else StreamingEncoder(model)
    if position:
        return StreamingDecoder.resume(model, record.steps, record.seed, position)
    return StreamingDecoder(model, steps=record.steps, seed=record.seed)


def parse_chunk(kind: str, body: Body, limits: Limits) -> torch.Tensor:
    """A chunk body's frames (float (1,3,n,H,W), unpadded) or latents (in their arrival dtype)."""
    if kind == "encode":
        return read_clip(body, ClipOptions(), limits)[0]
    return parse_latent_chunk(body)


def model_input(kind: str, chunk: torch.Tensor) -> torch.Tensor:
    """What the stream takes for a parsed chunk: frames padded to multiples of 8, float latents."""
    return pad_spatial(chunk) if kind == "encode" else chunk.float()


def logged_input(kind: str, entry: LogEntry, data: bytes, limits: Limits) -> torch.Tensor:
    """A logged chunk's model input, parsed by the same code as when it arrived."""
    body = body_from_bytes(entry.body_kind, data)
    try:
        return model_input(kind, parse_chunk(kind, body, limits))
    finally:
        body.close()


def rebuild_stream(model: Tokenizer, record: SessionRecord, rebuild: Rebuild, limits: Limits) -> Stream:
    """The session's stream at its stored version: the snapshot or a resumed stream, then the
    logged chunks replayed with their original boundaries."""
    if rebuild.snapshot is not None:
        cls = StreamingEncoder if record.kind == "encode" else StreamingDecoder
        stream, skip = cls.from_state(model, rebuild.snapshot), 0
    else:
        start = rebuild.entries[0][0].start if rebuild.entries else 0
        position = resume_position(record.kind, start)
        stream, skip = open_stream(model, record, position), position - start
    for entry, data in rebuild.entries:
        inputs = logged_input(record.kind, entry, data, limits)[:, :, skip:]
        skip = max(0, skip - entry.count)
        if inputs.shape[2]:
            stream.push(inputs)
    return stream


# --- chunk outputs ---------------------------------------------------------------------------

def output_format(kind: str, fmt: str | None) -> str:
    """Encode sessions return latents (safetensors by default), decode sessions frames (mp4)."""
    if fmt is None:
        return "safetensors" if kind == "encode" else "mp4"
    if kind == "encode" and fmt == "mp4":
        raise BadParameter("encode sessions return latents: use format=safetensors or npy")
    return fmt


def encode_latent_chunk(latents: torch.Tensor, info: dict[str, Any], fmt: str) -> ChunkResult:
    headers = {CHUNK_HEADER: json.dumps(info, sort_keys=True)}
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, latents.numpy(), allow_pickle=False)
        return ChunkResult(buffer.getvalue(), NPY, headers)
    meta = {"cdt_chunk": json.dumps(info, sort_keys=True), "format": CHUNK_FORMAT}
    return ChunkResult(st_save({"latents": latents.contiguous()}, metadata=meta), SAFETENSORS, headers)


# --- metrics ---------------------------------------------------------------------------------

class SessionMetrics:
    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.active = Gauge("cdt_active_sessions", "live streaming sessions (store-wide)", registry=r)
        self.store_seconds = Histogram("cdt_session_store_seconds", "session store latency", ["op"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.chunk_seconds = Histogram("cdt_chunk_seconds", "chunk latency: load, compute, commit", ["kind"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.hot_hits = Counter("cdt_session_hot_hits", "chunks computed on this replica's hot stream", registry=r)
        self.hot_bytes = Gauge("cdt_session_hot_bytes", "feature-cache bytes of the hot streams", registry=r)
        self.evictions = Counter("cdt_session_evictions", "hot streams evicted over CDT_SESSION_HOT_MB",
                                 registry=r)
        self.rebuilds = Counter("cdt_session_rebuilds", "streams rebuilt from the store: reason missing, stale or "
                                "evicted; source snapshot, window (resumed mid-stream) or start",
                                ["reason", "source"], registry=r)
        self.rebuild_seconds = Histogram("cdt_session_rebuild_seconds", "time to rebuild a stream: reading its "
                                         "snapshot and log from the store, then replaying them",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.log_bytes = Histogram("cdt_session_log_bytes", "input log bytes kept per commit",
                                   buckets=BYTES_BUCKETS, registry=r)
        self.snapshot_bytes = Histogram("cdt_session_snapshot_bytes", "snapshot size", buckets=BYTES_BUCKETS,
                                        registry=r)
        self.snapshot_seconds = Histogram("cdt_session_snapshot_seconds", "snapshot export and write, off the "
                                          "response path", buckets=LATENCY_BUCKETS, registry=r)


# --- sessions --------------------------------------------------------------------------------

@dataclass
class Applied:
    """A computed chunk, not yet committed."""

    result: ChunkResult
    record: SessionRecord
    stream: Stream | None  # None once the session is finished
    rebuild: str | None  # the rebuild reason, if the stream was rebuilt


class Sessions:
    """Session operations; routes hand off to these and never touch the store."""

    def __init__(self, store: SessionStore, pool: WorkerPool, settings: Settings, metrics: Metrics) -> None:
        self.store, self.pool, self.settings = store, pool, settings
        self.metrics = SessionMetrics(metrics)
        model = pool.model
        self.model_hash, self.dtype = model.content_hash(), dtype_name(model.compute_dtype)
        self.limits = Limits(settings.max_frames, settings.max_side)
        self.hot = HotStreams(settings.session_hot_bytes, self.metrics.evictions)
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._snapshotting: set[str] = set()
        self._tasks: set[asyncio.Task] = set()

    async def close(self) -> None:
        """Let the snapshots in flight finish."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- store access, timed and mapped to HTTP errors -----------------------------------
    async def _store(self, op: str, coro):
        start = time.perf_counter()
        try:
            return await coro
        finally:
            self.metrics.store_seconds.labels(op).observe(time.perf_counter() - start)

    async def _load(self, session_id: str, owner: str, response: bool = True) -> tuple[StoredSession, SessionRecord]:
        stored = await self._store("load", self.store.load(session_id, response))
        # Another owner's session is reported exactly like a missing one.
        if stored is None or stored.meta.get("owner") != owner:
            raise NotFound(f"session {session_id} does not exist (unknown, expired or deleted)",
                           code="session_not_found")
        record = SessionRecord.model_validate(stored.meta)
        if record.model_hash != self.model_hash or record.dtype != self.dtype:
            raise Conflict(f"session belongs to model {record.model_hash[:12]} ({record.dtype}); this replica "
                           f"serves {self.model_hash[:12]} ({self.dtype})", code="model_mismatch")
        return stored, record

    async def refresh_active(self) -> int:
        count = await self._store("count", self.store.live_count())
        self.metrics.active.set(count)
        return count

    @asynccontextmanager
    async def _exclusive(self, session_id: str) -> AsyncIterator[None]:
        """One chunk of a session at a time on this replica: a hot stream has one user."""
        lock, users = self._locks.get(session_id, (asyncio.Lock(), 0))
        self._locks[session_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[session_id]
            if users == 1:
                del self._locks[session_id]
            else:
                self._locks[session_id] = (lock, users - 1)

    # --- lifecycle ----------------------------------------------------------------------
    async def create(self, spec: SessionSpec, owner: str) -> SessionInfo:
        if spec.dtype is not None and spec.dtype != self.dtype:
            raise Conflict(f"this replica computes in {self.dtype}, the session asks for {spec.dtype}",
                           code="model_mismatch")
        check_steps(spec.steps, self.settings)
        if spec.kind == "decode":
            with model_errors():
                self.pool.model.decode_steps(spec.steps)
        ttl = min(spec.ttl_s or self.settings.session_ttl_s, self.settings.session_ttl_s)
        record = SessionRecord(**spec.model_dump(exclude={"ttl_s", "dtype"}), id=secrets.token_urlsafe(24),
                               owner=owner, model_hash=self.model_hash, dtype=self.dtype, ttl_s=ttl,
                               created_at=time.time())  # the id has 192 random bits: unguessable
        created = await self._store("create", self.store.create(record.id, record.model_dump(mode="json"), ttl,
                                                                self.settings.max_sessions))
        if not created:
            raise Overloaded(f"the limit of {self.settings.max_sessions} live sessions is reached; finish or "
                             "delete sessions, or retry later (CDT_MAX_SESSIONS)", 30, code="too_many_sessions")
        await self.refresh_active()
        return describe(record, StoredSession(meta={}, version=1, expires_at=time.time() + ttl))

    async def get(self, session_id: str, owner: str) -> SessionInfo:
        stored, record = await self._load(session_id, owner, response=False)
        return describe(record, stored)

    async def delete(self, session_id: str, owner: str) -> None:
        await self._load(session_id, owner, response=False)
        await self._store("delete", self.store.delete(session_id))
        self.hot.discard(session_id)
        await self.refresh_active()

    # --- chunks ---------------------------------------------------------------------------
    async def push(self, session_id: str, seq: int, owner: str, body: Body, content_type: str,
                   fmt: str | None) -> ChunkResult:
        """Apply chunk `seq` exactly once and return its output."""
        return await self._apply(session_id, seq, owner, body, content_type, fmt)

    async def finish(self, session_id: str, owner: str, fmt: str | None) -> ChunkResult:
        """Close the session (encode: flush the pending frames) exactly once."""
        return await self._apply(session_id, FINISH, owner, None, "", fmt)

    async def _apply(self, session_id: str, label: int | str, owner: str, body: Body | None, content_type: str,
                     fmt: str | None) -> ChunkResult:
        start = time.perf_counter()
        async with self._exclusive(session_id):
            # The stored response is read only for a retry: a decode chunk's is its frames.
            stored, record = await self._load(session_id, owner, response=False)
            fmt = output_format(record.kind, fmt)
            if record.last is not None and record.last.seq == label:
                return await self._winner(session_id, owner, label)
            if record.finished:
                raise Conflict("the session is finished; start a new one", code="session_finished")
            if body is not None and label != record.next_seq:
                raise SeqOutOfOrder(f"expected chunk seq {record.next_seq}, got {label}", record.next_seq)
            try:
                applied, log_put, log_drop = await self._compute(session_id, stored, record, body, content_type, fmt)
            except SessionRaced:
                return await self._winner(session_id, owner, label)
            result = applied.result
            applied.record.last = LastResponse(seq=label, media_type=result.media_type, headers=result.headers)
            committed = await self._store("commit", self.store.commit(
                session_id, stored.version, applied.record.model_dump(mode="json"), result.body,
                applied.record.ttl_s, log_put, log_drop))
            if not committed:
                return await self._winner(session_id, owner, label)
            self._after_commit(session_id, stored.version + 1, applied)
        self.metrics.chunk_seconds.labels(record.kind).observe(time.perf_counter() - start)
        if applied.rebuild is None:
            return result
        return ChunkResult(result.body, result.media_type, {**result.headers, REBUILD_HEADER: applied.rebuild})

    async def _winner(self, session_id: str, owner: str, label: int | str) -> ChunkResult:
        """The stored answer when `label` is the last applied chunk (a retry, or a race this request
        lost); otherwise 409."""
        stored, record = await self._load(session_id, owner)
        replay = replayed(stored, record, label)
        if replay is None:
            raise SeqOutOfOrder(f"chunk {label} raced with another write; expected seq {record.next_seq}")
        return replay

    def _after_commit(self, session_id: str, version: int, applied: Applied) -> None:
        stream = applied.stream
        if stream is None:
            self.hot.discard(session_id)
        else:
            self._maybe_snapshot(session_id, applied.record, stream)
            self.hot.put(session_id, stream, version)
        self.metrics.hot_bytes.set(self.hot.nbytes)
        self.metrics.log_bytes.observe(sum(entry.nbytes for entry in applied.record.log))

    async def _compute(self, session_id: str, stored: StoredSession, base: SessionRecord, body: Body | None,
                       content_type: str, fmt: str) -> tuple[Applied, tuple[str, bytes] | None, list[str]]:
        """Parse the chunk, plan the log, get the stream (hot or rebuilt) and run the chunk on it.
        `base` is the stored record; the returned one is its successor."""
        record = base.model_copy(deep=True)
        if body is None:
            if record.kind == "encode" and record.counters.frames_in == 0:
                raise InvalidInput("nothing to finish: the session received no frames", code="empty_session")
            log_put, log_drop = None, [entry.name for entry in record.log]
            record.log = []
            chunk = None
        else:
            chunk = await asyncio.to_thread(parse_chunk, record.kind, body, self.limits)
            self._check_chunk(record, chunk)
            entry = LogEntry(seq=record.next_seq, start=record.input_end, count=chunk.shape[2],
                             body_kind=body.format, content_type=content_type, nbytes=body.size)
            log_put = (entry.name, await asyncio.to_thread(body.read))
            log_drop = self._plan_log(record, entry)
        if record.kind == "decode" and chunk is None:
            record.finished = True
            summary = {"id": record.id, "latents_in": record.counters.latents_in,
                       "frames_out": record.counters.frames_out, "height": record.height, "width": record.width}
            return Applied(ChunkResult(json.dumps(summary).encode(), "application/json", {}), record, None,
                           None), log_put, log_drop
        stream, reason = self.hot.take(session_id, stored.version)
        rebuild = None
        if stream is not None:
            self.metrics.hot_hits.inc()
        elif base.next_seq > 0:
            rebuild = await self._rebuild_source(session_id, stored, base, reason)
        stream, output = await self._run_chunk(base, stream, rebuild, chunk)
        applied = (self._encoded if record.kind == "encode" else self._decoded)(record, stream, chunk, output, fmt)
        applied.rebuild = rebuild.reason if rebuild is not None else None
        return applied, log_put, log_drop

    def _check_chunk(self, record: SessionRecord, chunk: torch.Tensor) -> None:
        """Validate the chunk against the session and record the frame size it fixes."""
        _, _, n, h, w = chunk.shape
        if record.kind == "encode":
            record.height, record.width = record.height or h, record.width or w
            if (h, w) != (record.height, record.width):
                raise InvalidInput(f"chunk frames are {h}x{w}, the session is {record.height}x{record.width}",
                                   code="chunk_shape_mismatch")
            return
        if pixel_frames(n, first_chunk=False) > self.settings.max_frames + 3:  # per chunk; a stream has no limit
            raise TooLarge(f"a chunk of {n} latent frames decodes to more than {self.settings.max_frames} "
                           "frames; send fewer per chunk", code="clip_too_large")
        height, width = record.height or h * SPACE_FACTOR, record.width or w * SPACE_FACTOR
        if height > h * SPACE_FACTOR or width > w * SPACE_FACTOR:
            raise InvalidInput(f"latents decode to {h * SPACE_FACTOR}x{w * SPACE_FACTOR}, smaller than the "
                               f"session's {height}x{width}", code="chunk_shape_mismatch")
        record.height, record.width = height, width

    def _plan_log(self, record: SessionRecord, entry: LogEntry) -> list[str]:
        """Append `entry` to the record's log and drop the entries the window no longer needs;
        the names dropped. 413 when the kept log is over CDT_MAX_SESSION_LOG_MB."""
        entries = [*record.log, entry]
        field = self.pool.model.receptive_field(record.kind, record.steps)
        keep = window(record.kind, entries, entry.start + entry.count, field)
        record.log = entries[keep:]
        kept_bytes = sum(e.nbytes for e in record.log)
        if kept_bytes > self.settings.max_session_log_bytes:
            raise TooLarge(f"the session's input log would be {kept_bytes} bytes, over the limit of "
                           f"{self.settings.max_session_log_bytes} (CDT_MAX_SESSION_LOG_MB); send smaller "
                           "frames or a compressed container", code="session_log_too_large")
        return [e.name for e in entries[:keep]]

    async def _rebuild_source(self, session_id: str, stored: StoredSession, record: SessionRecord,
                              reason: str) -> Rebuild:
        """The snapshot (when the log holds every chunk after it) or the log window to rebuild from."""
        started = time.perf_counter()
        logged = {entry.seq: entry for entry in record.log}
        ref = stored.snapshot
        snapshot = None
        if ref is not None and all(seq in logged for seq in range(ref.label + 1, record.next_seq)):
            found = await self._store("read_snapshot", self.store.read_snapshot(session_id))
            if found is not None and found[0].label == ref.label:
                snapshot = found[1]
        entries = record.log if snapshot is None else [e for e in record.log if e.seq > ref.label]
        bodies = await self._store("read_log", self.store.read_log(session_id, [e.name for e in entries]))
        if len(bodies) < len(entries):
            raise SessionRaced()  # a commit since our load dropped entries: the session moved on
        return Rebuild(reason, snapshot, [(e, bodies[e.name]) for e in entries], time.perf_counter() - started)

    async def _run_chunk(self, record: SessionRecord, stream: Stream | None, rebuild: Rebuild | None,
                         chunk: torch.Tensor | None) -> tuple[Stream, torch.Tensor]:
        """One model job: rebuild the stream if needed, then push the chunk (or finish)."""
        limits = self.limits

        def job(model: Tokenizer):
            started = time.perf_counter()
            current = stream
            if current is None:
                current = (rebuild_stream(model, record, rebuild, limits) if rebuild is not None
                           else open_stream(model, record, 0))
            rebuild_s = time.perf_counter() - started
            if chunk is None:
                output = current.finish()
            else:
                output = current.push(model_input(record.kind, chunk))
            return current, output.float().cpu(), rebuild_s

        admission = await self.pool.admit(self._chunk_bytes(record, chunk))
        try:
            current, output, rebuild_s = await self.pool.execute(f"session_{record.kind}", job)
        except (CacheMismatchError, CacheFormatError) as exc:
            raise Conflict(f"session state does not fit this replica: {exc}", code="model_mismatch") from None
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        finally:
            admission.release()
        if rebuild is not None:
            self.metrics.rebuilds.labels(rebuild.reason, rebuild.source).inc()
            self.metrics.rebuild_seconds.observe(rebuild.read_s + rebuild_s)
        return current, output

    def _chunk_bytes(self, record: SessionRecord, chunk: torch.Tensor | None) -> int:
        """The memory a chunk's job reserves: its frames as sent (encode: plus up to 3 frames
        pending from earlier chunks; a finish, the last 4) at the session's frame size."""
        if chunk is None:
            frames, height, width = TIME_FACTOR, record.height, record.width
        elif record.kind == "encode":
            frames, (height, width) = chunk.shape[2] + TIME_FACTOR - 1, chunk.shape[3:]
        else:
            frames, height, width = TIME_FACTOR * chunk.shape[2], *(SPACE_FACTOR * d for d in chunk.shape[3:])
        model = self.pool.model
        return chunk_bytes(cost_for(model.config.preset, record.kind), self.pool.memory.total, height, width, frames,
                           record.steps if record.kind == "decode" else 1)

    def _encoded(self, record: SessionRecord, stream: Stream, chunk: torch.Tensor | None, latents: torch.Tensor,
                 fmt: str) -> Applied:
        counters = record.counters
        start = counters.latents_out
        record.next_seq += chunk is not None
        counters.frames_in += 0 if chunk is None else chunk.shape[2]
        counters.latents_out += latents.shape[2]
        record.finished = chunk is None
        info = {"format": CHUNK_FORMAT, "session": record.id, "latent_start": start,
                "latent_count": latents.shape[2], "frames_in": counters.frames_in, "finished": record.finished,
                "height": record.height, "width": record.width, "model_hash": self.model_hash}
        if record.finished:  # what a client needs to write the whole clip's latents file
            padding = Padding.for_shape(counters.frames_in, record.height, record.width)
            info.update(frames=counters.frames_in, pad_frames=padding.frames, pad_height=padding.height,
                        pad_width=padding.width)
        return Applied(encode_latent_chunk(latents, info, fmt), record, None if record.finished else stream, None)

    def _decoded(self, record: SessionRecord, stream: Stream, chunk: torch.Tensor, video: torch.Tensor,
                 fmt: str) -> Applied:
        counters = record.counters
        start = counters.frames_out
        made = video.shape[2]
        keep = made if record.frames is None else max(0, min(made, record.frames - start))
        record.next_seq += 1
        counters.latents_in += chunk.shape[2]
        counters.frames_out += keep
        if keep:
            frames = tensor_to_frames(video[:, :, :keep, :record.height, :record.width])
            body, media_type = render_frames(frames, record.fps, fmt)
        else:
            body, media_type = b"", "application/octet-stream"
        headers = {CHUNK_HEADER: json.dumps({"session": record.id, "frame_start": start, "frame_count": keep})}
        return Applied(ChunkResult(body, media_type, headers), record, stream, None)

    # --- snapshots ------------------------------------------------------------------------
    def _maybe_snapshot(self, session_id: str, record: SessionRecord, stream: Stream) -> None:
        """Start writing a snapshot of the stream, labelled with the seq just committed, when it is
        due, fits CDT_SESSION_SNAPSHOT_MB and none of this session is in flight."""
        settings = self.settings
        if (settings.session_snapshot_bytes == 0 or record.next_seq % settings.session_snapshot_every
                or session_id in self._snapshotting or stream.cache.nbytes() > settings.session_snapshot_bytes):
            return
        # FeatureCache.set updates its tensors in place, so the snapshot takes a copy now, between
        # chunks: it stays the state at this seq while the next chunks run on the stream (a memory
        # copy of at most CDT_SESSION_SNAPSHOT_MB; serialising and writing it happen off the loop).
        state = stream.cache.copy()
        self._snapshotting.add(session_id)
        task = asyncio.get_running_loop().create_task(self._write_snapshot(session_id, record.next_seq - 1, state))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_snapshot(self, session_id: str, label: int, state: FeatureCache) -> None:
        started = time.perf_counter()
        try:
            data = await asyncio.to_thread(state.to_bytes)
            await self._store("snapshot", self.store.put_snapshot(session_id, label, data,
                                                                  self.settings.session_snapshot_part_bytes))
            self.metrics.snapshot_bytes.observe(len(data))
            self.metrics.snapshot_seconds.observe(time.perf_counter() - started)
        except Unavailable as exc:
            log.warning("snapshot of session %s after chunk %d not written: %s", session_id, label, exc)
        finally:
            self._snapshotting.discard(session_id)


def replayed(stored: StoredSession, record: SessionRecord, label: int | str) -> ChunkResult | None:
    """The stored answer when `label` is the last applied chunk (a retry)."""
    last = record.last
    if last is None or last.seq != label:
        return None
    return ChunkResult(stored.response, last.media_type, {**last.headers, REPLAYED_HEADER: "1"})


def describe(record: SessionRecord, stored: StoredSession) -> SessionInfo:
    counters = record.counters
    snapshot = stored.snapshot
    return SessionInfo(
        id=record.id, kind=record.kind, state="finished" if record.finished else "open", next_seq=record.next_seq,
        frames_in=counters.frames_in, frames_out=counters.frames_out, latents_in=counters.latents_in,
        latents_out=counters.latents_out, height=record.height, width=record.width, frames=record.frames,
        steps=record.steps, seed=record.seed, model_hash=record.model_hash, dtype=record.dtype,
        log_chunks=len(record.log), log_bytes=stored.log_bytes,
        snapshot_seq=None if snapshot is None else snapshot.label,
        snapshot_bytes=0 if snapshot is None else snapshot.nbytes, expires_at=stored.expires_at, ttl_s=record.ttl_s)
