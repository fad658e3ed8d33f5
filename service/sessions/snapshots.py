"""Snapshots of hot streams, written off the response path to the snapshot store, so that a
replica that rebuilds a session replays the log only from the snapshot's chunk on.

Two writers: the policy (`policy`), after a chunk's commit, every K chunks of a session; and
the drain of a stopping replica (`drain`), which snapshots every hot stream at once, most
recently used first, within its budget. A file snapshot store is swept of the snapshots of
sessions that ended (`sweep_forever`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from model import FeatureCache

from ..domain_errors import Unavailable
from ..settings import Settings
from .codec import pack
from .kinds import Stream
from .metrics import SessionMetrics
from .policy import SnapshotPolicy
from .record import SessionRecord
from .store import SessionStore
from .store.snapshot_store import InSessionStore, SnapshotStore

log = logging.getLogger("cdt.sessions")


def packed_state(state: FeatureCache) -> bytes:
    return pack(state.to_bytes())


class Snapshots:
    def __init__(self, store: SnapshotStore, sessions: SessionStore, settings: Settings,
                 metrics: SessionMetrics) -> None:
        self.store, self._sessions, self._settings, self._metrics = store, sessions, settings, metrics
        self.policy = SnapshotPolicy(settings.session_rebuild_target, settings.session_snapshot_traffic)
        self._writing: dict[str, asyncio.Task] = {}
        self._sweeper: asyncio.Task | None = None

    def fits(self, stream: Stream) -> bool:
        return 0 < stream.cache.nbytes() <= self._settings.session_snapshot_bytes

    def maybe_take(self, session_id: str, record: SessionRecord, stream: Stream) -> None:
        """Start writing a snapshot of the stream, labelled with the seq just committed, when the
        policy says it is due, it fits CDT_SESSION_SNAPSHOT_MB and none of this session is in flight."""
        label = record.next_seq - 1
        if not self.fits(stream) or session_id in self._writing:
            return
        measured = self.policy.of(session_id)
        if measured.snapshot_bytes == 0:  # none written yet: its size is at most the cache's
            measured.snapshot_bytes = stream.cache.nbytes()
        interval = self.policy.due(session_id, label)
        if interval is not None:
            self._metrics.snapshot_interval.observe(interval)
            self._start(session_id, label, stream)

    def _start(self, session_id: str, label: int, stream: Stream) -> asyncio.Task:
        # FeatureCache.set updates its tensors in place, so the snapshot takes a copy now, between
        # chunks: it stays the state at this seq while the next chunks run on the stream (a memory
        # copy of at most CDT_SESSION_SNAPSHOT_MB; packing and writing it happen off the loop).
        state = stream.cache.copy()
        task = asyncio.get_running_loop().create_task(self._write(session_id, label, state))
        self._writing[session_id] = task
        return task

    async def _write(self, session_id: str, label: int, state: FeatureCache) -> bool:
        started = time.perf_counter()
        try:
            data = await asyncio.to_thread(packed_state, state)
            del state
            written = await self._metrics.timed("snapshot", self.store.put(
                session_id, label, data, self._settings.session_snapshot_part_bytes))
            if written and not await self._sessions.live([session_id]):
                await self.store.delete(session_id)  # deleted or expired while written
                written = False
            if written:
                elapsed = time.perf_counter() - started
                measured = self.policy.of(session_id)
                measured.label, measured.snapshot_s, measured.snapshot_bytes = max(measured.label, label), elapsed, len(data)
                self._metrics.snapshot_bytes.observe(len(data))
                self._metrics.snapshot_seconds.observe(elapsed)
            return written
        except Unavailable as exc:
            log.warning("snapshot of session %s after chunk %d not written: %s", session_id, label, exc)
            return False
        finally:
            self._writing.pop(session_id, None)

    def chunk_computed(self, session_id: str, seconds: float | None) -> None:
        """A chunk of the session took `seconds` of compute (None: not measured, as in a batch)."""
        if seconds is not None:
            self.policy.of(session_id).chunk_s = seconds

    def chunk_moved(self, session_id: str, nbytes: int) -> None:
        """The bytes a chunk of the session moved: its body plus its response."""
        self.policy.of(session_id).chunk_bytes = nbytes

    def restored(self, session_id: str, label: int) -> None:
        """This replica rebuilt the session from its snapshot labelled `label`."""
        measured = self.policy.of(session_id)
        measured.label = max(measured.label, label)

    async def forget(self, session_id: str) -> None:
        """The session ended (deleted or finished): its snapshot is of no more use."""
        self.policy.forget(session_id)
        await self.store.delete(session_id)

    async def drain(self, streams: list[tuple[str, int, Stream]], budget_s: float) -> tuple[int, int]:
        """Snapshot each (session id, label, stream) in order within `budget_s`: (written, missed).
        Each session is first promised to the replicas that may rebuild it meanwhile, which wait
        for its snapshot rather than replay the log."""
        deadline = time.monotonic() + budget_s
        await asyncio.gather(*(self._sessions.promise_snapshot(sid, label, budget_s) for sid, label, _ in streams),
                             return_exceptions=True)
        written = 0
        for session_id, label, stream in streams:
            try:
                if await self._drained(session_id, label, stream, deadline):
                    written += 1
            finally:
                try:
                    await self._sessions.withdraw_promise(session_id)
                except Unavailable:
                    pass  # the promise expires with the budget
        return written, len(streams) - written

    async def _drained(self, session_id: str, label: int, stream: Stream, deadline: float) -> bool:
        """Whether the session's snapshot at `label` is in the store by the deadline."""
        if session_id in self._writing:  # the policy's snapshot, perhaps of this very label
            await asyncio.wait([self._writing[session_id]], timeout=max(0.0, deadline - time.monotonic()))
        if self.policy.of(session_id).label >= label:
            return True
        if not self.fits(stream) or time.monotonic() >= deadline or session_id in self._writing:
            return False
        task = self._start(session_id, label, stream)
        done, _ = await asyncio.wait([task], timeout=max(0.0, deadline - time.monotonic()))
        if task not in done:
            task.cancel()  # over the budget: the session's rebuild replays the log
            return False
        return task.result()

    def start_sweeping(self) -> None:
        """Sweep an external snapshot store every CDT_SESSION_SNAPSHOT_SWEEP_S (the session store's
        own snapshots expire with their sessions)."""
        if not isinstance(self.store, InSessionStore):
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.session_snapshot_sweep_s)
            try:
                swept = await self.store.sweep(self._sessions.live)
            except (Unavailable, OSError) as exc:
                log.warning("snapshot sweep failed: %s", exc)
                continue
            if swept:
                log.info("swept the snapshots of %d ended sessions", swept)

    async def close(self) -> None:
        """Stop sweeping; let the snapshots in flight finish."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.gather(*self._writing.values(), return_exceptions=True)
