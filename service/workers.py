"""The worker pool: one model per device, a bounded job queue, model calls in a worker
thread off the event loop.

A job is a plain function of the model (`execute(op, fn)` awaits `fn(model)`); it never
sees a request. A request is first admitted (`admit`), then runs jobs: a session chunk
one job, a whole-clip request one job per chunk of its stream (`stream`), so other
requests' jobs interleave with a long clip's and a slow reader never holds the model.

Capacity is `queue_size` admitted requests waiting plus the one running: beyond that
`admit` raises `Overloaded` (429 + Retry-After) at once instead of growing memory. An
admitted request also reserves its estimated memory (`service.memory`) and waits, still
counted in the queue, until that fits beside the running requests. The timeout covers
one job's queue wait plus compute: a job still waiting when it expires is dropped and
never runs (503 `queue_timeout`); a job already computing cannot be interrupted, so it
finishes in the background and its caller gets 504 `compute_timeout`. `stop()` refuses
new requests and finishes every accepted job.

No batching of same-shape jobs: on CPU one job already uses every core through torch's
intra-op threads, so batching only adds queueing delay.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from collections import deque
from typing import Any, AsyncIterator, Callable, Iterator, TypeVar

import torch

from model import ModelIdentity, Tokenizer

from .domain_errors import Overloaded, Timeout, Unavailable
from .memory import release_free_memory
from .metrics import Metrics

T = TypeVar("T")
_END = object()  # a stream's generator is exhausted


class MemoryBudget:
    """Bytes reserved by the admitted requests, at most `total`; waiters are served in
    arrival order (a large request is not starved by a stream of small ones)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.reserved = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    async def reserve(self, nbytes: int) -> None:
        if not self._waiters and self.reserved + nbytes <= self.total:
            self.reserved += nbytes
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiters.append((nbytes, granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release(nbytes)  # granted as the waiter was cancelled: give it back
            else:
                self._waiters.remove((nbytes, granted))
                self._grant()
            raise

    def release(self, nbytes: int) -> None:
        self.reserved -= nbytes
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.reserved + self._waiters[0][0] <= self.total:
            nbytes, granted = self._waiters.popleft()
            self.reserved += nbytes
            granted.set_result(None)


class Admission:
    """An admitted request's queue slot and memory reservation; `release()` (idempotent,
    synchronous so it can run while a response is being cancelled) gives both back."""

    def __init__(self, pool: "WorkerPool", nbytes: int) -> None:
        self._pool, self.nbytes = pool, nbytes
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._pool._admitted -= 1
            if self.nbytes:
                self._pool.memory.release(self.nbytes)
            self._pool._metrics.memory_reserved.set(self._pool.memory.reserved)


@dataclass(eq=False)
class _Job:
    op: str
    fn: Callable[[Tokenizer], Any]
    future: asyncio.Future
    submitted: float = field(default_factory=time.perf_counter)
    started: bool = False
    abandoned: bool = False  # timed out or cancelled while waiting: skip it


class WorkerPool:
    def __init__(self, model: Tokenizer, identity: ModelIdentity, queue_size: int, timeout_s: float,
                 metrics: Metrics, memory_bytes: int) -> None:
        self.model, self.identity = model, identity
        self.queue_size, self.timeout_s = queue_size, timeout_s
        self._metrics = metrics
        self.memory = MemoryBudget(memory_bytes)
        metrics.memory_budget.set(memory_bytes)
        # Unbounded queue, bounded by `_admitted`: counting admitted requests ourselves makes
        # the capacity exact, independent of when the consumer task gets to run.
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._admitted = 0  # requests waiting + running
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
        """Raise now if a request would be refused: lets routes reject before reading a body."""
        if self._closing or self._consumer is None:
            raise Unavailable("the service is shutting down", code="shutting_down")
        if self._admitted > self.queue_size:
            self._metrics.rejected_total.labels("queue_full").inc()
            retry = max(1, math.ceil(self._recent_compute_s * (self._queue.qsize() + 1)))
            raise Overloaded(f"the job queue is full ({self.queue_size} waiting); retry later", retry)

    async def admit(self, nbytes: int = 0) -> Admission:
        """A queue slot, then `nbytes` of the memory budget once they fit (waiting at most
        the timeout). Release the returned Admission when the request is done."""
        self.check_capacity()
        self._admitted += 1
        admission = Admission(self, 0)
        try:
            await asyncio.wait_for(self.memory.reserve(nbytes), self.timeout_s)
        except asyncio.TimeoutError:
            admission.release()
            self._metrics.rejected_total.labels("memory_timeout").inc()
            raise Unavailable(f"waited {self.timeout_s:g} s for memory to run this request",
                              code="queue_timeout") from None
        except BaseException:
            admission.release()
            raise
        admission.nbytes = nbytes
        self._metrics.memory_reserved.set(self.memory.reserved)
        return admission

    async def run(self, op: str, fn: Callable[[Tokenizer], T]) -> T:
        """Admit a one-job request and run its job."""
        admission = await self.admit()
        try:
            return await self.execute(op, fn)
        finally:
            admission.release()

    async def stream(self, op: str, steps: Iterator[T]) -> AsyncIterator[T]:
        """Run an admitted request's generator of model work, one job per item."""
        while (item := await self.execute(op, lambda model: next(steps, _END))) is not _END:
            yield item

    async def execute(self, op: str, fn: Callable[[Tokenizer], T]) -> T:
        """Queue one job of an admitted request and await its result."""
        job = _Job(op, fn, asyncio.get_running_loop().create_future())
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
                raise Timeout(f"{op} did not finish within {self.timeout_s:g} s", code="compute_timeout")
            job.abandoned = True
            self._metrics.rejected_total.labels("queue_timeout").inc()
            raise Unavailable(f"{op} waited {self.timeout_s:g} s for the model without starting",
                              code="queue_timeout") from None
        except asyncio.CancelledError:
            job.abandoned = True  # the client went away: do not compute for nobody
            if job.started:
                job.future.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise

    async def _consume(self) -> None:
        while (job := await self._queue.get()) is not None:
            self._metrics.queue_depth.set(self._queue.qsize())
            if not job.abandoned:
                await self._execute(job)

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
        try:
            with torch.inference_mode():
                return fn(self.model)
        finally:
            release_free_memory()
