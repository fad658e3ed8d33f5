"""Rebuilding a session's stream on a replica that does not hold it at the stored version
(never held it, evicted it, or another replica advanced the session): from the snapshot plus
the logged chunks after it (bit-identical), or by replaying the logged window from a resumed
stream (equal within float rounding)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from model import Tokenizer, resume_position

from ..bodies import Limits, body_from_bytes
from .kinds import SessionKind, Stream
from .metrics import SessionMetrics
from .record import LogEntry, SessionRecord
from .store import SessionStore, StoredSession


class SessionRaced(Exception):
    """Another request advanced the session while this one was computing."""


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


async def read_rebuild(store: SessionStore, metrics: SessionMetrics, session_id: str, stored: StoredSession,
                       record: SessionRecord, reason: str) -> Rebuild:
    """The snapshot (when the log holds every chunk after it) or the log window to rebuild from."""
    started = time.perf_counter()
    logged = {entry.seq: entry for entry in record.log}
    ref = stored.snapshot
    snapshot = None
    if ref is not None and all(seq in logged for seq in range(ref.label + 1, record.next_seq)):
        found = await metrics.timed("read_snapshot", store.read_snapshot(session_id))
        if found is not None and found[0].label == ref.label:
            snapshot = found[1]
    entries = record.log if snapshot is None else [e for e in record.log if e.seq > ref.label]
    bodies = await metrics.timed("read_log", store.read_log(session_id, [e.name for e in entries]))
    if len(bodies) < len(entries):
        raise SessionRaced()  # a commit since our load dropped entries: the session moved on
    return Rebuild(reason, snapshot, [(e, bodies[e.name]) for e in entries], time.perf_counter() - started)


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
