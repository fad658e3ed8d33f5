"""When to snapshot a session: every K chunks, K from a target rebuild time and a traffic budget.

A replica lost without warning (killed, crashed) leaves its sessions to be rebuilt from their
latest snapshot plus the chunks logged after it. Snapshots taken every K chunks, each written
before the next is due, leave at most K chunks after the latest one, so the rebuild costs at
most restore + K chunk computes; and each costs its bytes once per K chunks. So, per session,
from its own measurements on its replica:

- the longest interval within `CDT_SESSION_REBUILD_TARGET` (T, chunk computes):
  K_rebuild = max(1, floor(T - restore / chunk)), with `chunk` the compute of its last chunk
  and `restore` the time its last snapshot took to export, pack and write, which reading,
  unpacking and restoring it mirror (0 before the first);
- the shortest within `CDT_SESSION_SNAPSHOT_TRAFFIC` (R, snapshot bytes per byte of the
  chunks' own traffic, body plus response): K_traffic = ceil(snapshot / (R * chunk bytes)),
  `snapshot` the size of its last snapshot (the feature cache's, before the first).

K = min(K_rebuild, K_traffic): the most frequent snapshots the traffic budget allows, never
rarer than the rebuild target allows. When the two conflict the rebuild target wins, and the
session's snapshots cost more than R times its chunks.
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
    chunk_bytes: int = 0  # the last chunk's body plus response
    snapshot_s: float = 0.0
    snapshot_bytes: int = 0  # the last snapshot's, packed; before one, the feature cache's


class SnapshotPolicy:
    def __init__(self, rebuild_target: float, traffic: float) -> None:
        self.target, self.traffic = rebuild_target, traffic
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
        rebuild = max(1, math.floor(self.target - restore))
        if measured.chunk_bytes <= 0:
            return rebuild
        return max(1, min(rebuild, math.ceil(measured.snapshot_bytes / (self.traffic * measured.chunk_bytes))))

    def due(self, session_id: str, label: int) -> int | None:
        """K when the state after chunk `label` should be snapshotted, else None."""
        measured = self.of(session_id)
        interval = self.interval(measured)
        return interval if label - measured.label >= interval else None
