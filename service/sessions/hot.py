"""Hot streams: the live streams of the sessions this replica serves, kept in its memory."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from prometheus_client import Counter

from .kinds import Stream

EVICTED_MEMORY = 10_000  # evicted ids remembered to tell "evicted" from "missing" rebuilds


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
