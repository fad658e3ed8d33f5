"""Rebuilding a session's stream on a replica that does not hold it at the stored version
(never held it, evicted it, or another replica advanced the session): from the snapshot plus
the logged chunks after it (bit-identical), or by replaying the logged window from a resumed
stream (equal within float rounding).

A draining replica promises the snapshots it is about to write (`SessionStore.promise_snapshot`):
a rebuild that finds one promised waits for it rather than replay the log.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch

from model import Tokenizer, resume_position

from ..bodies import Limits, body_from_bytes
from .codec import SnapshotFormatError, unpack
from .kinds import SessionKind, Stream
from .metrics import SessionMetrics
from .record import LogEntry, SessionRecord
from .store import SessionStore, SnapshotRef
from .store.snapshot_store import SnapshotStore

PROMISE_POLL_S = 0.05


class SessionRaced(Exception):
    """Another request advanced the session while this one was computing."""


@dataclass
class Rebuild:
    """What a stream is rebuilt from: a snapshot (or None: a fresh or resumed stream) and the
    logged chunks to replay after it, with their bodies."""

    reason: str
    snapshot: bytes | None
    label: int | None  # the snapshot's
    entries: list[tuple[LogEntry, bytes]]
    read_s: float  # reading the snapshot and the log from the stores

    @property
    def source(self) -> str:
        if self.snapshot is not None:
            return "snapshot"
        return "window" if self.entries and self.entries[0][0].start > 0 else "start"


async def read_rebuild(store: SessionStore, snapshots: SnapshotStore, metrics: SessionMetrics, session_id: str,
                       record: SessionRecord, reason: str, wait_s: float) -> Rebuild:
    """The snapshot (when the log holds every chunk after it) or the log window to rebuild from.
    A promised snapshot is waited for, `wait_s` at most."""
    started = time.perf_counter()
    ref = await metrics.timed("snapshot_ref", snapshots.latest(session_id))
    ref = await promised(store, snapshots, session_id, record, ref, wait_s)
    snapshot = None
    if ref is not None and usable(record, ref.label):
        found = await metrics.timed("read_snapshot", snapshots.get(session_id))
        if found is not None and usable(record, found[0].label):
            try:
                ref, snapshot = found[0], await asyncio.to_thread(unpack, found[1])
            except SnapshotFormatError:
                snapshot = None  # not this release's format (a rolling deploy): the log rebuilds it
    entries = record.log if snapshot is None else [e for e in record.log if e.seq > ref.label]
    bodies = await metrics.timed("read_log", store.read_log(session_id, [e.name for e in entries]))
    if len(bodies) < len(entries):
        raise SessionRaced()  # a commit since our load dropped entries: the session moved on
    return Rebuild(reason, snapshot, None if snapshot is None else ref.label, [(e, bodies[e.name]) for e in entries],
                   time.perf_counter() - started)


def usable(record: SessionRecord, label: int) -> bool:
    """Whether a snapshot after chunk `label` is of this record's past and the log holds every chunk since."""
    logged = {entry.seq for entry in record.log}
    return label < record.next_seq and all(seq in logged for seq in range(label + 1, record.next_seq))


async def promised(store: SessionStore, snapshots: SnapshotStore, session_id: str, record: SessionRecord,
                   ref: SnapshotRef | None, wait_s: float) -> SnapshotRef | None:
    """The latest snapshot once the one a draining replica promised is written (or the promise is
    withdrawn or expired, or `wait_s` has passed)."""
    deadline = time.monotonic() + wait_s
    while (ref is None or ref.label < record.next_seq - 1) and time.monotonic() < deadline:
        label = await store.promised_snapshot(session_id)
        if label is None or (ref is not None and ref.label >= label):
            break
        await asyncio.sleep(PROMISE_POLL_S)
        ref = await snapshots.latest(session_id)
    return ref


def rebuild_stream(model: Tokenizer, kind: SessionKind, record: SessionRecord, rebuild: Rebuild,
                   limits: Limits) -> Stream:
    """The session's stream at its stored version: the snapshot or a resumed stream, then the
    logged chunks replayed with their original boundaries."""
    if rebuild.snapshot is not None:
        stream, skip = kind.restore(model, record, rebuild.snapshot), 0
    else:
        start = rebuild.entries[0][0].start if rebuild.entries else 0
        position = resume_position(kind.name, start, model.config.time_factor)
        stream, skip = kind.open(model, record, position), position - start
    for entry, data in rebuild.entries:
        inputs = logged_input(kind, entry, data, limits)[:, :, skip:]
        skip = max(0, skip - entry.count)
        if inputs.shape[2]:
            stream.push(inputs)
    return stream


def logged_input(kind: SessionKind, entry: LogEntry, data: bytes, limits: Limits) -> torch.Tensor:
    """A logged chunk's model input, parsed by the same code as when it arrived."""
    body = body_from_bytes(entry.format, data)
    try:
        return kind.model_input(kind.parse(body, limits))
    finally:
        body.close()
