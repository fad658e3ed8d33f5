"""The Prometheus metrics of sessions, on the app's registry."""

from __future__ import annotations

import time
from typing import Awaitable, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from ..metrics import LATENCY_BUCKETS, Metrics

# Sizes from kB (tiny model, small frames, one chunk) to GB (snapshots at 720p).
BYTES_BUCKETS = tuple(2.0**k for k in range(10, 36, 2))

# Chunks replayed after a snapshot: 0 after a drain, at most the policy's K after a crash.
AGE_BUCKETS = (0, 1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 100)

T = TypeVar("T")


class SessionMetrics:
    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.active = Gauge("cdt_active_sessions", "live streaming sessions (store-wide)", registry=r)
        self.store_seconds = Histogram("cdt_session_store_seconds", "session store latency", ["op"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.chunk_seconds = Histogram("cdt_chunk_seconds", "chunk latency: load, compute, commit", ["kind"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.hot_hits = Counter("cdt_session_hot_hits", "chunks computed on this replica's hot stream", registry=r)
        self.hot_bytes = Gauge("cdt_session_hot_bytes", "feature-cache bytes of the hot streams", registry=r)
        self.evictions = Counter("cdt_session_evictions", "hot streams evicted over CDT_SESSION_HOT_MB",
                                 registry=r)
        self.rebuilds = Counter("cdt_session_rebuilds", "streams rebuilt from the store: reason missing, stale or "
                                "evicted; source snapshot, window (resumed mid-stream) or start",
                                ["reason", "source"], registry=r)
        self.rebuild_seconds = Histogram("cdt_session_rebuild_seconds", "time to rebuild a stream: reading its "
                                         "snapshot and log from the stores, then replaying them; by source "
                                         "(snapshot, window, start)", ["source"], buckets=LATENCY_BUCKETS,
                                         registry=r)
        self.snapshot_age = Histogram("cdt_session_snapshot_age_chunks", "chunks logged after the snapshot a "
                                      "stream is rebuilt from, replayed on it", buckets=AGE_BUCKETS, registry=r)
        self.snapshot_interval = Histogram("cdt_session_snapshot_interval_chunks", "K, the chunks between two "
                                           "snapshots of a session, as the policy set it when it took one",
                                           buckets=AGE_BUCKETS, registry=r)
        self.drain_snapshots = Counter("cdt_session_drain_snapshots", "hot streams a stopping replica handed over: "
                                       "snapshot written, or missed (over CDT_DRAIN_S, or too large)", ["outcome"],
                                       registry=r)
        self.drain_seconds = Gauge("cdt_session_drain_seconds", "duration of this replica's drain: running chunks "
                                   "finishing, then the snapshots of its hot streams", registry=r)
        self.log_bytes = Histogram("cdt_session_log_bytes", "input log bytes kept per commit",
                                   buckets=BYTES_BUCKETS, registry=r)
        self.snapshot_bytes = Histogram("cdt_session_snapshot_bytes", "snapshot size", buckets=BYTES_BUCKETS,
                                        registry=r)
        self.snapshot_seconds = Histogram("cdt_session_snapshot_seconds", "snapshot export and write, off the "
                                          "response path", buckets=LATENCY_BUCKETS, registry=r)

    async def timed(self, op: str, call: Awaitable[T]) -> T:
        """A session store call, its latency observed under `op`."""
        start = time.perf_counter()
        try:
            return await call
        finally:
            self.store_seconds.labels(op).observe(time.perf_counter() - start)
