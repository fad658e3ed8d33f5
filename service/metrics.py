"""Prometheus metrics on a per-app registry (not the global default), so several apps
can live in one process (tests) and each /metrics shows only its own app.

The model work's metrics (frames, queue wait, compute, the model info) carry a `model`
label, the served model's name (`service.catalog`).

Sessions add their collectors to `Metrics.registry`; `request_metrics` times the HTTP requests.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# Seconds: from a few ms (tiny clips, codecs) to minutes (long clips on CPU).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram("cdt_request_seconds", "HTTP request latency", ["endpoint", "status"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait_seconds = Histogram("cdt_queue_wait_seconds", "time a job waited for the model",
                                            ["op", "device", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram("cdt_compute_seconds", "model compute per job, device copies included "
                                         "(a batched job's is its batch's)", ["op", "outcome", "device", "model"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("cdt_batch_size", "jobs run as one batched forward (1: alone)", ["op", "device"],
                                    buckets=(1, 2, 4, 8, 16, 32), registry=r)
        self.media_seconds = Histogram("cdt_media_seconds", "decoding request bodies and encoding responses",
                                       ["op"], buckets=LATENCY_BUCKETS, registry=r)
        self.frames_total = Counter("cdt_frames_processed", "video frames encoded or decoded", ["op", "model"],
                                    registry=r)
        self.bytes_total = Counter("cdt_bytes", "request and response body bytes", ["endpoint", "direction"],
                                   registry=r)
        self.queue_depth = Gauge("cdt_queue_depth", "jobs waiting for the model", ["device"], registry=r)
        self.in_flight = Gauge("cdt_jobs_in_flight", "jobs running on the model", ["device"], registry=r)
        self.requests_admitted = Gauge("cdt_requests_admitted", "requests admitted to a device, waiting or "
                                       "running: the replica's load signal", ["device"], registry=r)
        self.device_healthy = Gauge("cdt_device_healthy", "1 while a device takes jobs, 0 after a fatal error",
                                    ["device"], registry=r)
        self.key_requests_admitted = Gauge("cdt_key_requests_admitted", "requests of a key (its principal) "
                                           "waiting or running", ["key"], registry=r)
        self.key_queue_wait_seconds = Histogram("cdt_key_queue_wait_seconds", "time a key's jobs waited for a device",
                                                ["key"], buckets=LATENCY_BUCKETS, registry=r)
        self.key_rejected_total = Counter("cdt_key_rejected", "requests refused by a key's own limits",
                                          ["key", "reason"], registry=r)
        self.device_errors = Counter("cdt_device_errors", "jobs failed by their device", ["device", "kind"],
                                     registry=r)
        self.rejected_total = Counter("cdt_jobs_rejected", "jobs refused or dropped", ["reason"], registry=r)
        self.cancelled_total = Counter("cdt_requests_cancelled", "whole-clip requests stopped at a chunk boundary "
                                       "because the client went away", ["op"], registry=r)
        self.memory_budget = Gauge("cdt_memory_budget_bytes", "memory a device admits requests into",
                                   ["device"], registry=r)
        self.memory_reserved = Gauge("cdt_memory_reserved_bytes", "memory reserved by admitted requests",
                                     ["device"], registry=r)
        self.model_info = Info("cdt_model", "each served model, by name", ["model"], registry=r)

    @contextmanager
    def media(self, op: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.media_seconds.labels(op).observe(time.perf_counter() - start)
