"""The in-process session store: a single replica's sessions, in its own memory."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from .contract import SnapshotRef, StoredSession, part_starts


@dataclass
class _MemorySession:
    meta: dict[str, Any]
    expires_at: float
    version: int = 1
    response: bytes = b""
    log: dict[str, bytes] = field(default_factory=dict)
    snapshot: tuple[SnapshotRef, bytes] | None = None


class MemorySessionStore:
    """In-process store for a single replica. Expiry is checked on access. No method awaits between
    reading and writing, so each runs as one step on the event loop and needs no lock."""

    def __init__(self) -> None:
        self._sessions: dict[str, _MemorySession] = {}
        self._promises: dict[str, tuple[int, float]] = {}  # session id -> (label, expires at)
        self._owned: dict[str, set[str]] = {}  # owner -> its session ids (some maybe gone)

    def _live(self, session_id: str) -> _MemorySession | None:
        self._prune()
        return self._sessions.get(session_id)

    def _prune(self) -> None:
        now = time.time()
        for session_id in [s for s, session in self._sessions.items() if session.expires_at <= now]:
            del self._sessions[session_id]
            self._promises.pop(session_id, None)

    async def create(self, session_id, meta, ttl_s, max_sessions) -> bool:
        self._prune()
        if len(self._sessions) >= max_sessions or session_id in self._sessions:
            return False
        self._sessions[session_id] = _MemorySession(json.loads(json.dumps(meta)), time.time() + ttl_s)
        return True

    async def load(self, session_id, response=True):
        session = self._live(session_id)
        if session is None:
            return None
        return StoredSession(meta=json.loads(json.dumps(session.meta)), version=session.version,
                             expires_at=session.expires_at, response=session.response if response else b"",
                             snapshot=session.snapshot[0] if session.snapshot else None,
                             log_bytes=sum(len(entry) for entry in session.log.values()))

    async def commit(self, session_id, expected_version, meta, response, ttl_s, log_put, log_drop) -> bool:
        session = self._live(session_id)
        if session is None or session.version != expected_version:
            return False
        for name in log_drop:
            session.log.pop(name, None)
        if log_put is not None:
            session.log[log_put[0]] = bytes(log_put[1])
        session.meta, session.response = json.loads(json.dumps(meta)), bytes(response)
        session.version += 1
        session.expires_at = time.time() + ttl_s
        return True

    async def read_log(self, session_id, names) -> dict[str, bytes]:
        session = self._live(session_id)
        if session is None:
            return {}
        return {name: session.log[name] for name in names if name in session.log}

    async def put_snapshot(self, session_id, label, data, part_bytes) -> bool:
        parts = len(part_starts(len(data), part_bytes))
        session = self._live(session_id)
        if session is None or (session.snapshot is not None and session.snapshot[0].label >= label):
            return False
        session.snapshot = (SnapshotRef(label, parts, len(data)), bytes(data))
        return True

    async def read_snapshot(self, session_id):
        session = self._live(session_id)
        return None if session is None else session.snapshot

    async def delete(self, session_id) -> bool:
        self._promises.pop(session_id, None)
        return self._sessions.pop(session_id, None) is not None

    async def live(self, session_ids) -> set[str]:
        self._prune()
        return {session_id for session_id in session_ids if session_id in self._sessions}

    async def own(self, owner, session_id, ttl_s, limit) -> bool:
        self._prune()
        owned = {s for s in self._owned.get(owner, set()) if s in self._sessions}
        if len(owned) >= limit:
            return False
        self._owned[owner] = owned | {session_id}
        return True

    async def disown(self, owner, session_id) -> None:
        self._owned.get(owner, set()).discard(session_id)

    async def promise_snapshot(self, session_id, label, ttl_s) -> None:
        session = self._live(session_id)
        if session is not None:
            self._promises[session_id] = (label, min(time.time() + ttl_s, session.expires_at))

    async def withdraw_promise(self, session_id) -> None:
        self._promises.pop(session_id, None)

    async def promised_snapshot(self, session_id) -> int | None:
        label, expires_at = self._promises.get(session_id, (None, 0.0))
        return label if expires_at > time.time() else None

    async def live_count(self) -> int:
        self._prune()
        return len(self._sessions)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
