"""The worker pool: one model per device, a bounded job queue, model calls in a worker
thread off the event loop.

A job is a plain function of the model (`run(op, fn)` awaits `fn(model)`); it never
sees a request. Whole-clip routes submit an encode or decode; a streaming session
submits "load state, push chunk, export state" the same way.

Capacity is `queue_size` waiting jobs plus the one running: beyond that `run` raises
`Overloaded` (429 + Retry-After) at once instead of growing memory. The timeout covers
queue wait plus compute: a job still waiting when it expires is dropped and never runs
(503 `queue_timeout`); a job already computing cannot be interrupted, so it finishes in
the background and its caller gets 504 `compute_timeout`. `stop()` refuses new jobs
and finishes every accepted one.

No batching of same-shape jobs: on CPU one job already uses every core through torch's
intra-op threads, so batching only adds queueing delay.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch

from model import Tokenizer

from .errors import GatewayTimeout, Overloaded, Unavailable
from .metrics import Metrics

T = TypeVar("T")


@dataclass(eq=False)
class _Job:
    op: str
    fn: Callable[[Tokenizer], Any]
    future: asyncio.Future
    submitted: float = field(default_factory=time.perf_counter)
    started: bool = False
    abandoned: bool = False  # timed out or cancelled while waiting: skip it


class WorkerPool:
    def __init__(self, model: Tokenizer, queue_size: int, timeout_s: float, metrics: Metrics) -> None:
        self.model = model
        self.queue_size, self.timeout_s = queue_size, timeout_s
        self._metrics = metrics
        # Unbounded queue, bounded by `_accepted`: counting admitted jobs ourselves makes
        # the capacity exact, independent of when the consumer task gets to run.
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._accepted = 0  # waiting + running
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cdt-model")
        self._consumer: asyncio.Task | None = None
        self._closing = False
        self._recent_compute_s = 1.0  # Retry-After estimate, updated after every job

    @property
    def running(self) -> bool:
        return self._consumer is not None and not self._consumer.done() and not self._closing

    def start(self) -> None:
        self._consumer = asyncio.get_running_loop().create_task(self._consume(), name="cdt-worker")

    async def stop(self) -> None:
        """Refuse new jobs, finish the accepted ones, release the thread."""
        self._closing = True
        if self._consumer is not None:
            await self._queue.put(None)
            await self._consumer
        self._executor.shutdown(wait=True)

    def check_capacity(self) -> None:
        """Raise now if a job would be refused: lets routes reject before reading a body."""
        if self._closing or self._consumer is None:
            raise Unavailable("the service is shutting down", code="shutting_down")
        if self._accepted > self.queue_size:
            self._metrics.rejected_total.labels("queue_full").inc()
            retry = max(1, math.ceil(self._recent_compute_s * (self._queue.qsize() + 1)))
            raise Overloaded(f"the job queue is full ({self.queue_size} waiting); retry later", retry)

    async def run(self, op: str, fn: Callable[[Tokenizer], T]) -> T:
        self.check_capacity()
        job = _Job(op, fn, asyncio.get_running_loop().create_future())
        self._accepted += 1
        self._queue.put_nowait(job)
        self._metrics.queue_depth.set(self._queue.qsize())
        try:
            # shield: a timeout must not cancel the future the worker will complete.
            return await asyncio.wait_for(asyncio.shield(job.future), self.timeout_s)
        except asyncio.TimeoutError:
            if job.started:
                # Nobody awaits the result any more; retrieve it so its error is not logged as lost.
                job.future.add_done_callback(lambda f: f.cancelled() or f.exception())
                self._metrics.rejected_total.labels("compute_timeout").inc()
                raise GatewayTimeout(f"{op} did not finish within {self.timeout_s:g} s", code="compute_timeout")
            job.abandoned = True
            self._metrics.rejected_total.labels("queue_timeout").inc()
            raise Unavailable(f"{op} waited {self.timeout_s:g} s for the model without starting",
                              code="queue_timeout") from None
        except asyncio.CancelledError:
            job.abandoned = True  # the client went away: do not compute for nobody
            raise

    async def _consume(self) -> None:
        while (job := await self._queue.get()) is not None:
            self._metrics.queue_depth.set(self._queue.qsize())
            try:
                if not job.abandoned:
                    await self._execute(job)
            finally:
                self._accepted -= 1

    async def _execute(self, job: _Job) -> None:
        loop = asyncio.get_running_loop()
        job.started = True
        self._metrics.queue_wait_seconds.labels(job.op).observe(time.perf_counter() - job.submitted)
        self._metrics.in_flight.inc()
        start = time.perf_counter()
        try:
            result = await loop.run_in_executor(self._executor, self._call, job.fn)
        except Exception as exc:  # delivered to the caller, who maps it to a response
            outcome = "error"
            if not job.future.done():
                job.future.set_exception(exc)
        else:
            outcome = "ok"
            if not job.future.done():
                job.future.set_result(result)
        finally:
            self._metrics.in_flight.dec()
        elapsed = time.perf_counter() - start
        self._recent_compute_s = elapsed
        self._metrics.compute_seconds.labels(job.op, outcome).observe(elapsed)

    def _call(self, fn: Callable[[Tokenizer], T]) -> T:
        with torch.inference_mode():
            return fn(self.model)
