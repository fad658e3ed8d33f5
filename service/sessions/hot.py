"""Hot streams: the live streams of the sessions this replica serves, kept in its devices'
memory, each on the device its chunks run on."""

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
    label: int  # the seq of the last chunk the stream took
    device: str  # the worker whose device holds the stream's state
    nbytes: int


class HotStreams:
    """The live streams of the sessions this replica serves, least recently used first, under a
    byte budget per device. A stream is taken out while a chunk computes on it and put back after
    commit."""

    def __init__(self, budget_bytes: int, evicted: Counter) -> None:
        self.budget = budget_bytes
        self.nbytes = 0
        self._entries: OrderedDict[str, HotEntry] = OrderedDict()
        self._device_bytes: dict[str, int] = {}
        self._evicted: OrderedDict[str, None] = OrderedDict()
        self._evictions = evicted

    def device_of(self, session_id: str) -> str | None:
        """The device holding the session's stream, if one does."""
        entry = self._entries.get(session_id)
        return None if entry is None else entry.device

    def take(self, session_id: str, version: int, device: str) -> tuple[Stream | None, str | None]:
        """The session's stream if it is at `version` on `device`, else None and why not."""
        entry = self._entries.pop(session_id, None)
        if entry is None:
            return None, "evicted" if session_id in self._evicted else "missing"
        self._count(entry, -1)
        if entry.version != version:
            return None, "stale"  # another replica advanced the session
        if entry.device != device:
            return None, "device_failed"  # its device was taken out of service
        return entry.stream, None

    def put(self, session_id: str, stream: Stream, version: int, label: int, device: str) -> None:
        entry = HotEntry(stream, version, label, device, stream.cache.nbytes())
        self._evicted.pop(session_id, None)
        self._entries[session_id] = entry
        self._count(entry, +1)
        while self._device_bytes[device] > self.budget:
            self._evict_oldest(device)

    def most_recent_first(self) -> list[tuple[str, HotEntry]]:
        return list(reversed(self._entries.items()))

    def discard(self, session_id: str) -> None:
        entry = self._entries.pop(session_id, None)
        if entry is not None:
            self._count(entry, -1)

    def _count(self, entry: HotEntry, sign: int) -> None:
        self.nbytes += sign * entry.nbytes
        self._device_bytes[entry.device] = self._device_bytes.get(entry.device, 0) + sign * entry.nbytes

    def _evict_oldest(self, device: str) -> None:
        session_id = next(sid for sid, entry in self._entries.items() if entry.device == device)
        self._count(self._entries.pop(session_id), -1)
        self._evictions.inc()
        self._evicted[session_id] = None
        if len(self._evicted) > EVICTED_MEMORY:
            self._evicted.popitem(last=False)
