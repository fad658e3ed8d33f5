"""The shared state of streaming sessions: what any replica needs to rebuild a session.

The replica serving a session keeps the model's FeatureCache in its own memory. The store keeps, per
session, only what rebuilding it takes:

- metadata (a JSON-serialisable dict the store does not interpret) and an integer version;
- the last chunk's response, so a retried `seq` gets the same bytes without applying the chunk twice;
- a bounded log of recent chunk inputs, entries named by the caller;
- optionally a snapshot of the FeatureCache, written off the response path and split into parts.

Every chunk is one compare-and-set on the version (`commit`): metadata, response and log changes land
together or not at all, so two replicas racing on one session cannot both apply a chunk. A snapshot is
written beside the commits (its parts are keys of their own; only the final pointer switch touches the
session), and it only ever replaces a snapshot with a lower label.

`contract.SessionStore` is the interface; `memory.MemorySessionStore` serves a single replica and
`redis_store.RedisSessionStore` lets any replica continue any session (its module describes the
Redis layout and the URL rule of `CDT_REDIS_URL`).
"""

from __future__ import annotations

from .contract import SessionStore, SessionStoreUnavailable, SnapshotRef, StoredSession
from .memory import MemorySessionStore
from .redis_store import RedisSessionStore

__all__ = ["MemorySessionStore", "RedisSessionStore", "SessionStore", "SessionStoreUnavailable", "SnapshotRef",
           "StoredSession", "open_store"]


def open_store(redis_url: str | None, prefix: str = "cdt:") -> SessionStore:
    """Redis (single or cluster, by the URL rule in `redis_store`) when a URL is given, else
    the in-process store."""
    if not redis_url:
        return MemorySessionStore()
    return RedisSessionStore(redis_url, prefix)
