"""When to snapshot a session: every K chunks, K from a target rebuild time.

A replica lost without warning (killed, crashed) leaves its sessions to be rebuilt from their
latest snapshot plus the chunks logged after it. Snapshots taken every K chunks, each written
before the next is due, leave at most K chunks after the latest one, so the rebuild costs at
most restore + K chunk computes. With `CDT_SESSION_REBUILD_TARGET` T chunk computes:

    K = max(1, floor(T - restore / chunk))

per session, from its own measurements: `chunk`, the compute of its last chunk; `restore`,
the time its last snapshot took to export, pack and write, which reading, unpacking and
restoring it mirror. Before the first snapshot restore is unknown and taken as 0.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

REMEMBERED = 10_000  # sessions whose measurements a replica keeps (least recently used forgotten)


@dataclass
class Measured:
    """A session's snapshot and chunk costs on this replica, and its latest snapshot's label."""

    label: int = -1  # seq after which the latest snapshot known here was taken; -1: none
    chunk_s: float = 0.0
    snapshot_s: float = 0.0


class SnapshotPolicy:
    def __init__(self, rebuild_target: float) -> None:
        self.target = rebuild_target
        self._sessions: OrderedDict[str, Measured] = OrderedDict()

    def of(self, session_id: str) -> Measured:
        measured = self._sessions.pop(session_id, None) or Measured()
        self._sessions[session_id] = measured
        if len(self._sessions) > REMEMBERED:
            self._sessions.popitem(last=False)
        return measured

    def forget(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def interval(self, measured: Measured) -> int:
        """K, the chunks between two snapshots of the session."""
        restore = measured.snapshot_s / measured.chunk_s if measured.chunk_s > 0 else 0.0
        return max(1, math.floor(self.target - restore))

    def due(self, session_id: str, label: int) -> int | None:
        """K when the state after chunk `label` should be snapshotted, else None."""
        measured = self.of(session_id)
        interval = self.interval(measured)
        return interval if label - measured.label >= interval else None
