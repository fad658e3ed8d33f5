"""What a session store promises (`SessionStore`), whatever holds the sessions; the package
docstring says what it keeps and why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ...domain_errors import Unavailable


class SessionStoreUnavailable(Unavailable):
    """The store cannot be reached."""

    code = "session_store_unavailable"


@dataclass(frozen=True)
class SnapshotRef:
    """A stored snapshot: the caller's label, how many parts it was split into, its total size."""

    label: int
    parts: int
    nbytes: int


@dataclass
class StoredSession:
    meta: dict[str, Any]
    version: int
    expires_at: float  # unix seconds; refreshed by every commit
    response: bytes = b""  # empty when loaded with response=False
    snapshot: SnapshotRef | None = None
    log_bytes: int = 0  # total size of the log entries held


class SessionStore(Protocol):
    async def create(self, session_id: str, meta: dict[str, Any], ttl_s: float, max_sessions: int) -> bool:
        """Store a new session at version 1. False when `max_sessions` are live (store-wide) or the id
        is taken."""

    async def load(self, session_id: str, response: bool = True) -> StoredSession | None:
        """The session, or None. response=False leaves the response out."""

    async def commit(self, session_id: str, expected_version: int, meta: dict[str, Any], response: bytes,
                     ttl_s: float, log_put: tuple[str, bytes] | None, log_drop: list[str]) -> bool:
        """If the stored version is still `expected_version`, in one step: write meta and response,
        delete the log entries named in `log_drop`, then add `log_put` (name, bytes), bump the version
        and refresh the TTL of every key of the session. False if another writer got there first or
        the session is gone."""

    async def read_log(self, session_id: str, names: list[str]) -> dict[str, bytes]:
        """The named log entries that exist."""

    async def put_snapshot(self, session_id: str, label: int, data: bytes, part_bytes: int) -> bool:
        """Store `data` in parts of at most `part_bytes` and make it the current snapshot if the session
        still exists and its current snapshot (if any) has a lower label; the replaced snapshot is
        deleted. False (and nothing kept) otherwise. Commits running meanwhile are not affected."""

    async def read_snapshot(self, session_id: str) -> tuple[SnapshotRef, bytes] | None:
        """The current snapshot and its bytes (all from one snapshot), or None when there is none."""

    async def delete(self, session_id: str) -> bool:
        """Remove the session with its log and snapshot. False if it did not exist."""

    async def live(self, session_ids: list[str]) -> set[str]:
        """Those of `session_ids` that exist (not expired, not deleted)."""

    async def own(self, owner: str, session_id: str, ttl_s: float, limit: int) -> bool:
        """Count `session_id` among `owner`'s sessions (store-wide), unless `limit` of them are
        live: False then. Expired and deleted sessions stop counting."""

    async def disown(self, owner: str, session_id: str) -> None:
        """`session_id` no longer counts among `owner`'s sessions."""

    async def promise_snapshot(self, session_id: str, label: int, ttl_s: float) -> None:
        """Note that a snapshot labelled `label` is being written (a draining replica's): a replica
        that rebuilds the session meanwhile waits for it (`promised_snapshot`). The note lasts
        `ttl_s` at most, and no longer than the session."""

    async def withdraw_promise(self, session_id: str) -> None:
        """Remove the note of `promise_snapshot`: the snapshot is written, or will not be."""

    async def promised_snapshot(self, session_id: str) -> int | None:
        """The label of the snapshot being written for the session, if one is promised."""

    async def live_count(self) -> int: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def part_starts(nbytes: int, part_bytes: int) -> range:
    """Offsets at which the parts of an `nbytes` snapshot begin."""
    if part_bytes < 1:
        raise ValueError(f"part_bytes must be positive, got {part_bytes}")
    return range(0, nbytes, part_bytes)
