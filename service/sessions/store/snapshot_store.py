"""Where snapshots live (`CDT_SESSION_SNAPSHOT_STORE`): one interface, `SnapshotStore`, and
its backends.

A session has at most one snapshot, its latest. A snapshot is written in parts and then
committed in one step (a pointer switch, a manifest written last): until then readers see
the previous one, so a half-written snapshot is never used, and a commit only ever replaces
a snapshot with a lower label. The session's other state (record, last response, log) stays
in the session store, small and hot.

- `InSessionStore`: the session store itself (Redis or the in-process store), whose layout
  its module describes; the snapshot's keys expire and are deleted with the session's.
- `files.FileSnapshotStore` (`file:///path`): a directory shared by the replicas (a
  ReadWriteMany volume), laid out as an object store's keys would be, so an S3-compatible
  backend is the same layout over another transport. Sessions that expire leave files
  behind until a sweep (`sweep`) finds their record gone.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Protocol

from .contract import SessionStore, SnapshotRef

Live = Callable[[list[str]], Awaitable[set[str]]]  # which of these session ids still exist


class SnapshotStore(Protocol):
    async def put(self, session_id: str, label: int, data: bytes, part_bytes: int) -> bool:
        """Store `data` in parts of at most `part_bytes`, then make it the session's snapshot if the
        current one (if any) has a lower label; the replaced one is deleted. False (nothing kept)
        otherwise, or when the session is known to be gone."""

    async def latest(self, session_id: str) -> SnapshotRef | None:
        """The session's committed snapshot, without its bytes."""

    async def get(self, session_id: str) -> tuple[SnapshotRef, bytes] | None:
        """The committed snapshot and its bytes (all of one snapshot), or None."""

    async def delete(self, session_id: str) -> None:
        """Remove the session's snapshot (a deleted session's)."""

    async def sweep(self, live: Live) -> int:
        """Remove the snapshots of sessions that no longer exist; how many."""


class InSessionStore:
    """Snapshots kept by the session store, beside the session's other keys."""

    def __init__(self, store: SessionStore) -> None:
        self._store = store

    async def put(self, session_id, label, data, part_bytes) -> bool:
        return await self._store.put_snapshot(session_id, label, data, part_bytes)

    async def latest(self, session_id):
        stored = await self._store.load(session_id, response=False)
        return None if stored is None else stored.snapshot

    async def get(self, session_id):
        return await self._store.read_snapshot(session_id)

    async def delete(self, session_id) -> None:
        return None  # the session store deletes it with the session

    async def sweep(self, live) -> int:
        return 0  # its keys expire with the session's


def open_snapshot_store(url: str | None, sessions: SessionStore, prefix: str) -> SnapshotStore:
    """The session store itself when `url` is unset, else the directory of a `file://` URL."""
    if not url:
        return InSessionStore(sessions)
    from .files import FileSnapshotStore, directory_of

    return FileSnapshotStore(directory_of(url), prefix)
