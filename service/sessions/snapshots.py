"""Snapshots of hot streams, written to the store off the response path: a replica that
rebuilds the session replays the log only from the snapshot's chunk on."""

from __future__ import annotations

import asyncio
import logging
import time

from model import FeatureCache

from ..domain_errors import Unavailable
from ..settings import Settings
from .kinds import Stream
from .metrics import SessionMetrics
from .record import SessionRecord
from .store import SessionStore

log = logging.getLogger("cdt.sessions")


class Snapshots:
    def __init__(self, store: SessionStore, settings: Settings, metrics: SessionMetrics) -> None:
        self._store, self._settings, self._metrics = store, settings, metrics
        self._writing: set[str] = set()
        self._tasks: set[asyncio.Task] = set()

    def maybe_take(self, session_id: str, record: SessionRecord, stream: Stream) -> None:
        """Start writing a snapshot of the stream, labelled with the seq just committed, when it is
        due, fits CDT_SESSION_SNAPSHOT_MB and none of this session is in flight."""
        settings = self._settings
        if (settings.session_snapshot_bytes == 0 or record.next_seq % settings.session_snapshot_every
                or session_id in self._writing or stream.cache.nbytes() > settings.session_snapshot_bytes):
            return
        # FeatureCache.set updates its tensors in place, so the snapshot takes a copy now, between
        # chunks: it stays the state at this seq while the next chunks run on the stream (a memory
        # copy of at most CDT_SESSION_SNAPSHOT_MB; serialising and writing it happen off the loop).
        state = stream.cache.copy()
        self._writing.add(session_id)
        task = asyncio.get_running_loop().create_task(self._write(session_id, record.next_seq - 1, state))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Let the snapshots in flight finish."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _write(self, session_id: str, label: int, state: FeatureCache) -> None:
        started = time.perf_counter()
        try:
            data = await asyncio.to_thread(state.to_bytes)
            await self._metrics.timed("snapshot", self._store.put_snapshot(
                session_id, label, data, self._settings.session_snapshot_part_bytes))
            self._metrics.snapshot_bytes.observe(len(data))
            self._metrics.snapshot_seconds.observe(time.perf_counter() - started)
        except Unavailable as exc:
            log.warning("snapshot of session %s after chunk %d not written: %s", session_id, label, exc)
        finally:
            self._writing.discard(session_id)
