"""The session service: create, inspect and delete sessions, and apply their chunks exactly once.

A chunk is applied exactly once: its commit is a compare-and-set on the store version that
writes the record, the response and the log change together, so a retried `seq` (or a racing
duplicate that lost the write) gets the winner's bytes back without a second apply. A replica
whose hot stream is missing, evicted or older than the stored version rebuilds it
(`rebuild`), in the same model job as the new chunk.

A replica told to stop (`drain`) hands its sessions over: it refuses new sessions and chunks
(503 `draining`), lets its running chunks finish, then snapshots its hot streams
(`snapshots`), so the replicas that continue them replay nothing.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import AsyncIterator

import torch

from media import StreamPush
from model import CacheFormatError, CacheMismatchError, Tokenizer, dtype_name

from ..bodies import Body, Limits
from ..catalog import ServedModel
from ..domain_errors import Conflict, NotFound, Overloaded, SeqOutOfOrder, TooLarge, Unavailable
from ..memory import padded_pixels
from ..metrics import Metrics
from ..ops import check_steps
from ..settings import Settings
from ..workers import DeviceWorker, WorkerPool, Work
from .hot import HotStreams
from .kinds import KINDS, Applied, SessionKind, Stream
from .metrics import SessionMetrics
from .protocol import ChunkResult, SessionInfo, SessionSpec
from .rebuild import Rebuild, SessionRaced, read_rebuild, rebuild_stream
from .record import FINISH, LastResponse, LogEntry, SessionRecord
from .snapshots import Snapshots
from .store import SessionStore, SnapshotRef, StoredSession
from .store.snapshot_store import SnapshotStore
from .window import window

log = logging.getLogger("cdt.sessions")


class SessionService:
    """Session operations; the routes hand off to these and never touch the store or the pool."""

    def __init__(self, store: SessionStore, snapshot_store: SnapshotStore, pool: WorkerPool, settings: Settings,
                 metrics: Metrics) -> None:
        self.store, self.pool, self.settings = store, pool, settings
        self.metrics = SessionMetrics(metrics)
        self.dtype = dtype_name(pool.models.default.reference.compute_dtype)  # every served model's
        self.limits = Limits.of(settings)
        self.hot = HotStreams(settings.session_hot_bytes, self.metrics.evictions)
        self.snapshots = Snapshots(snapshot_store, store, settings, self.metrics)
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self.draining = False
        self._running = 0  # chunks (and finishes) being applied
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain: asyncio.Task | None = None

    def start(self) -> None:
        self.snapshots.start_sweeping()

    async def close(self) -> None:
        await self.snapshots.close()

    # --- handing sessions over on shutdown --------------------------------------------------
    def drain(self) -> asyncio.Task:
        """Start handing this replica's sessions over (once; later calls give the same task)."""
        if self._drain is None:
            self.draining = True
            self._drain = asyncio.get_running_loop().create_task(self._hand_over())
        return self._drain

    async def _hand_over(self) -> None:
        started = time.monotonic()
        budget = self.settings.drain_s
        try:
            await asyncio.wait_for(self._idle.wait(), budget)
        except asyncio.TimeoutError:
            pass  # a chunk still running: its stream is not at rest, the others are snapshotted
        # An in-process store ends with the process: no other replica continues its sessions.
        held = self.hot.most_recent_first() if self.settings.redis_url else []
        streams = [(sid, entry.label, entry.stream) for sid, entry in held if self.snapshots.fits(entry.stream)]
        written, missed = await self.snapshots.drain(streams, max(0.0, budget - (time.monotonic() - started)))
        missed += len(held) - len(streams)
        elapsed = time.monotonic() - started
        self.metrics.drain_snapshots.labels("written").inc(written)
        self.metrics.drain_snapshots.labels("missed").inc(missed)
        self.metrics.drain_seconds.set(elapsed)
        log.warning("drained in %.2f s: %d hot streams snapshotted, %d left to rebuild from the log", elapsed,
                    written, missed)

    def _refuse_if_draining(self) -> None:
        if self.draining:
            raise Unavailable("this replica is stopping; retry: another replica continues the session",
                              code="draining", retry_after_s=1)

    def check_capacity(self, owner: str) -> None:
        """Raise now if a chunk would be refused for lack of room: lets routes refuse before reading a body."""
        self.pool.check_capacity(owner)

    async def ping_store(self) -> None:
        await self.store.ping()

    # --- lifecycle ----------------------------------------------------------------------
    async def create(self, spec: SessionSpec, owner: str) -> SessionInfo:
        self._refuse_if_draining()
        if spec.dtype is not None and spec.dtype != self.dtype:
            raise Conflict(f"this replica computes in {self.dtype}, the session asks for {spec.dtype}",
                           code="model_mismatch")
        served = self.pool.models.get(spec.model)
        check_steps(spec.steps, self.settings)
        KINDS[spec.kind].check_steps(served.reference, spec.steps)
        ttl = min(spec.ttl_s or self.settings.session_ttl_s, self.settings.session_ttl_s)
        record = SessionRecord(**spec.model_dump(exclude={"ttl_s", "dtype", "model"}), id=secrets.token_urlsafe(24),
                               owner=owner, model=served.name, model_hash=served.content_hash, dtype=self.dtype,
                               ttl_s=ttl,
                               created_at=time.time())  # the id has 192 random bits: unguessable
        await self.pool.callers.own_session(self.store, owner, record.id, ttl, self.settings.key_max_sessions)
        created = await self.metrics.timed("create", self.store.create(
            record.id, record.model_dump(mode="json"), ttl, self.settings.max_sessions))
        if not created:
            await self.store.disown(owner, record.id)
            raise Overloaded(f"the limit of {self.settings.max_sessions} live sessions is reached; finish or "
                             "delete sessions, or retry later (CDT_MAX_SESSIONS)", 30, code="too_many_sessions")
        await self._refresh_active()
        return describe(record, StoredSession(meta={}, version=1, expires_at=time.time() + ttl), None)

    async def get(self, session_id: str, owner: str) -> SessionInfo:
        stored, record = await self._load(session_id, owner, response=False)
        snapshot = await self.metrics.timed("snapshot_ref", self.snapshots.store.latest(session_id))
        return describe(record, stored, snapshot)

    async def delete(self, session_id: str, owner: str) -> None:
        await self._load(session_id, owner, response=False)
        await self.metrics.timed("delete", self.store.delete(session_id))
        await self.store.disown(owner, session_id)
        await self.snapshots.forget(session_id)
        self.hot.discard(session_id)
        await self._refresh_active()

    async def _load(self, session_id: str, owner: str, response: bool = True) -> tuple[StoredSession, SessionRecord]:
        stored = await self.metrics.timed("load", self.store.load(session_id, response))
        # Another owner's session is reported exactly like a missing one.
        if stored is None or stored.meta.get("owner") != owner:
            raise NotFound(f"session {session_id} does not exist (unknown, expired or deleted)",
                           code="session_not_found")
        record = SessionRecord.model_validate(stored.meta)
        self._model_of(record)
        return stored, record

    def _model_of(self, record: SessionRecord) -> ServedModel:
        """The served model a session is pinned to: the one with its hash, whatever its name here
        (409 `model_mismatch` when this replica serves no such model, or computes in another dtype)."""
        served = self.pool.models.by_hash(record.model_hash)
        if served is None or record.dtype != self.dtype:
            raise Conflict(f"session belongs to model {record.model or '?'} ({record.model_hash[:12]}, "
                           f"{record.dtype}); this replica serves {', '.join(m.label for m in self.pool.models)} "
                           f"({self.dtype})", code="model_mismatch")
        return served

    async def _refresh_active(self) -> None:
        self.metrics.active.set(await self.metrics.timed("count", self.store.live_count()))

    # --- chunks ---------------------------------------------------------------------------
    async def push(self, session_id: str, seq: int, owner: str, body: Body, fmt: str | None) -> ChunkResult:
        """Apply chunk `seq` exactly once and return its output."""
        return await self._apply(session_id, seq, owner, body, fmt)

    async def finish(self, session_id: str, owner: str, fmt: str | None) -> ChunkResult:
        """Close the session (encode: flush the pending frames) exactly once."""
        return await self._apply(session_id, FINISH, owner, None, fmt)

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

    async def _apply(self, session_id: str, label: int | str, owner: str, body: Body | None,
                     fmt: str | None) -> ChunkResult:
        self._refuse_if_draining()
        self._running += 1
        self._idle.clear()
        try:
            return await self._apply_now(session_id, label, owner, body, fmt)
        finally:
            self._running -= 1
            if not self._running:
                self._idle.set()

    async def _apply_now(self, session_id: str, label: int | str, owner: str, body: Body | None,
                         fmt: str | None) -> ChunkResult:
        start = time.perf_counter()
        async with self._exclusive(session_id):
            # The stored response is read only for a retry: a decode chunk's is its frames.
            stored, record = await self._load(session_id, owner, response=False)
            kind = KINDS[record.kind]
            fmt = kind.output_format(fmt)
            if record.last is not None and record.last.seq == label:
                return await self._winner(session_id, owner, label)
            if record.finished:
                raise Conflict("the session is finished; start a new one", code="session_finished")
            if body is not None and label != record.next_seq:
                raise SeqOutOfOrder(f"expected chunk seq {record.next_seq}, got {label}", record.next_seq)
            try:
                applied, rebuild, log_put, log_drop, device = await self._compute(session_id, stored, record, kind,
                                                                                  body, fmt)
            except SessionRaced:
                return await self._winner(session_id, owner, label)
            result = applied.result
            applied.record.last = LastResponse(seq=label, media_type=result.media_type, chunk=result.chunk)
            committed = await self.metrics.timed("commit", self.store.commit(
                session_id, stored.version, applied.record.model_dump(mode="json"), result.body,
                applied.record.ttl_s, log_put, log_drop))
            if not committed:
                return await self._winner(session_id, owner, label)
            await self._after_commit(session_id, stored.version + 1, applied, device)
        self.metrics.chunk_seconds.labels(kind.name).observe(time.perf_counter() - start)
        return result if rebuild is None else replace(result, rebuild=rebuild.reason)

    async def _winner(self, session_id: str, owner: str, label: int | str) -> ChunkResult:
        """The stored answer when `label` is the last applied chunk (a retry, or a race this request
        lost); otherwise a conflict."""
        stored, record = await self._load(session_id, owner)
        last = record.last
        if last is None or last.seq != label:
            raise SeqOutOfOrder(f"chunk {label} raced with another write; expected seq {record.next_seq}")
        return ChunkResult(stored.response, last.media_type, last.chunk, replayed=True)

    async def _after_commit(self, session_id: str, version: int, applied: Applied, device: str | None) -> None:
        stream = applied.stream
        if stream is None:  # finished
            self.hot.discard(session_id)
            await self.snapshots.forget(session_id)
        else:
            self.snapshots.chunk_moved(session_id, applied.record.log[-1].nbytes + len(applied.result.body))
            self.snapshots.maybe_take(session_id, applied.record, stream)
            self.hot.put(session_id, stream, version, applied.record.next_seq - 1, device)
        self.metrics.hot_bytes.set(self.hot.nbytes)
        self.metrics.log_bytes.observe(sum(entry.nbytes for entry in applied.record.log))

    async def _compute(self, session_id: str, stored: StoredSession, base: SessionRecord, kind: SessionKind,
                       body: Body | None, fmt: str
                       ) -> tuple[Applied, Rebuild | None, tuple[str, bytes] | None, list[str], str | None]:
        """Parse the chunk, plan the log, get the stream (hot or rebuilt) and run the chunk on it.
        `base` is the stored record; the returned one is its successor. Also: what the stream was
        rebuilt from, if it was, the log entry to put and those to drop, and the device the stream
        is on (None when no job ran)."""
        record = base.model_copy(deep=True)
        host = self.pool.host
        if body is None:
            answer = kind.finish(record)
            log_put, log_drop = None, [entry.name for entry in record.log]
            record.log = []
            chunk = None
            if answer is not None:
                record.finished = True
                return Applied(answer, record, None), None, log_put, log_drop, None
        else:
            chunk = await host.run("parse_chunk", kind.parse, body, self.limits)
            kind.check(record, chunk, self.limits, self._model_of(record).time_factor)
            entry = LogEntry(seq=record.next_seq, start=kind.inputs(record.counters), count=chunk.shape[2],
                             format=body.format, nbytes=body.size)
            log_put = (entry.name, await host.run("read_chunk", body.read))
            log_drop = self._plan_log(record, kind, entry)
        # The device first: a refusal (429, 503) leaves the hot stream where it is.
        worker = self.pool.choose(prefer=self.hot.device_of(session_id))
        stream, reason = self.hot.take(session_id, stored.version, worker.name)
        rebuild = None
        if stream is not None:
            self.metrics.hot_hits.inc()
        elif base.next_seq > 0:
            rebuild = await read_rebuild(self.store, self.snapshots.store, self.metrics, session_id, base, reason,
                                         self.settings.drain_s)
        stream, output = await self._run_chunk(session_id, worker, base, kind, stream, rebuild, chunk)
        applied = await host.run("render_chunk", kind.applied, record, stream, chunk, output, fmt)
        return applied, rebuild, log_put, log_drop, worker.name

    def _plan_log(self, record: SessionRecord, kind: SessionKind, entry: LogEntry) -> list[str]:
        """Append `entry` to the record's log and drop the entries the window no longer needs;
        the names dropped. TooLarge when the kept log is over CDT_MAX_SESSION_LOG_MB."""
        entries = [*record.log, entry]
        served = self._model_of(record)
        field = served.identity.receptive_field.frames(kind.name, kind.steps(record))
        keep = window(kind.name, entries, entry.start + entry.count, field, served.time_factor)
        record.log = entries[keep:]
        kept_bytes = sum(e.nbytes for e in record.log)
        if kept_bytes > self.settings.max_session_log_bytes:
            raise TooLarge(f"the session's input log would be {kept_bytes} bytes, over the limit of "
                           f"{self.settings.max_session_log_bytes} (CDT_MAX_SESSION_LOG_MB); send smaller "
                           "frames or a compressed container", code="session_log_too_large")
        return [e.name for e in entries[:keep]]

    async def _run_chunk(self, session_id: str, worker: DeviceWorker, record: SessionRecord, kind: SessionKind,
                         stream: Stream | None, rebuild: Rebuild | None, chunk: torch.Tensor | None
                         ) -> tuple[Stream, torch.Tensor]:
        """One model job on `worker`: rebuild the stream if needed, then push the chunk (or finish).
        The output comes back on the host (`SessionKind.to_host`)."""
        limits = self.limits

        def job(model: Tokenizer):
            started = time.perf_counter()
            current = stream
            if current is None:
                current = (rebuild_stream(model, kind, record, rebuild, limits) if rebuild is not None
                           else kind.open(model, record, 0))
            rebuilt = time.perf_counter()
            output = current.finish() if chunk is None else current.push(kind.model_input(chunk))
            output = kind.to_host(output)
            return current, output, rebuilt - started, time.perf_counter() - rebuilt

        work: Work = job
        if stream is not None and chunk is not None:  # a hot stream's push, which may run batched with others
            inputs = kind.model_input(chunk)
            # Run alone, the push measures its compute; a batch member's is not measured (None), and
            # the snapshot policy keeps the session's last chunk time measured alone.
            push = StreamPush(stream, lambda: inputs, lambda output: (stream, kind.to_host(output), 0.0, push.seconds),
                              tuple(inputs.shape))
            work = push

        served = self._model_of(record)
        frames, height, width = kind.job_shape(record, chunk, served.time_factor)
        steps = kind.steps(record)
        # Interactive work of the session's owner, costing its pixels times frames times steps.
        admission = await worker.admit(
            worker.memory_model.chunk_bytes(served.config, kind.name, height, width, frames, steps),
            self.pool.caller(record.owner, interactive=True), padded_pixels(height, width) * frames * steps,
            served.name)
        try:
            current, output, rebuild_s, chunk_s = await admission.execute(f"session_{kind.name}", work)
        except (CacheMismatchError, CacheFormatError) as exc:
            raise Conflict(f"session state does not fit this replica: {exc}", code="model_mismatch") from None
        finally:
            admission.release()
        self.snapshots.chunk_computed(session_id, chunk_s)
        if rebuild is not None:
            self.metrics.rebuilds.labels(rebuild.reason, rebuild.source).inc()
            self.metrics.rebuild_seconds.labels(rebuild.source).observe(rebuild.read_s + rebuild_s)
            if rebuild.label is not None:
                self.metrics.snapshot_age.observe(len(rebuild.entries))
                self.snapshots.restored(session_id, rebuild.label)
        return current, output


def describe(record: SessionRecord, stored: StoredSession, snapshot: SnapshotRef | None) -> SessionInfo:
    counters = record.counters
    return SessionInfo(
        id=record.id, kind=record.kind, state="finished" if record.finished else "open", next_seq=record.next_seq,
        frames_in=counters.frames_in, frames_out=counters.frames_out, latents_in=counters.latents_in,
        latents_out=counters.latents_out, height=record.height, width=record.width, frames=record.frames,
        steps=record.steps, seed=record.seed, model=record.model, model_hash=record.model_hash, dtype=record.dtype,
        log_chunks=len(record.log), log_bytes=stored.log_bytes,
        snapshot_seq=None if snapshot is None else snapshot.label,
        snapshot_bytes=0 if snapshot is None else snapshot.nbytes, expires_at=stored.expires_at, ttl_s=record.ttl_s)
