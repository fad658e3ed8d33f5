"""The worker pool: one worker per device, each with its resident copy of every served model
(`service.catalog`), one model thread, a job queue and a memory budget. The model thread runs
only model work; host work (container decoding, rendering) runs on the host pool
(`service.host`) around it.

A job is a plain function of the model (`execute(op, fn)` awaits `fn(model)` on the worker's
thread, with the worker's copy of the model its request was admitted for); it never sees a
request. A request is first admitted to one device for one model (`admit`), and
runs all its jobs there: a session chunk one job, a whole-clip request one job per chunk of
its stream, so other requests' jobs interleave with a long clip's and a slow reader never
holds the model. A job hands back host data: whatever copies leave the device finish inside
the job, so its time is the device's and the event loop never waits on the device.

Placement: a new request goes to the healthy device with the fewest admitted requests (then
the lowest share of its memory budget reserved); a session's chunk goes to the device that
holds its stream hot, and a stream that has to be built goes where a new request would.

Capacity, per device: `queue_size` admitted requests waiting plus the one running; when no
device has room, `choose` raises `Overloaded` (429 + Retry-After) at once instead of growing
memory. An admitted request also reserves its estimated memory on its device
(`service.memory`) and waits, still counted, until that fits beside the running requests.
The timeout covers one job's queue wait plus compute: a job still waiting when it expires is
dropped and never runs (503 `queue_timeout`); a job already computing cannot be interrupted,
so it finishes in the background and its caller gets 504 `compute_timeout`. `stop()` refuses
new requests and finishes every accepted job.

Device failures: a job that runs the device out of memory fails alone (503
`device_out_of_memory`, Retry-After), after the allocator's cache is emptied; a fatal
accelerator error takes the device out of service (503 `device_failed` for its queued jobs;
`/readyz` fails, and `/healthz` once no device is left).

Order: each device takes its waiting jobs fairly between callers, session chunks first
(`service.scheduling`); each caller's own limits are `service.callers`'.

Batching: a job that pushes one chunk into one stream may take the next jobs of the same shape
with it and run as one batched forward (`service.batching`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, TypeVar

import torch

from media import StreamPush
from model import Tokenizer

from .batching import Batching, Failed, run_batch, take_batch
from .budget import MemoryBudget
from .callers import ANONYMOUS, Callers
from .catalog import Catalog
from .devices import DeviceSlot, is_device_failure, is_out_of_memory, release_device_cache
from .domain_errors import DeviceFailed, DeviceOutOfMemory, Overloaded, Timeout, Unavailable
from .host import HostPool
from .memory import MemoryModel, release_free_memory
from .metrics import Metrics
from .scheduling import JobQueue

T = TypeVar("T")
# A job's work: a function of its worker's model, or a stream push (which may run batched).
Work = Callable[[Tokenizer], T] | StreamPush[T]
_END = object()  # a stream's generator is exhausted

log = logging.getLogger("cdt.service")


@dataclass(frozen=True)
class Caller:
    """Whose a request is, as the scheduler sees it (`service.scheduling`)."""

    name: str  # the principal, or the anonymous caller
    weight: float = 1.0
    interactive: bool = False  # a session chunk: someone waits on the stream


ANONYMOUS_BULK = Caller(ANONYMOUS)


class Admission:
    """A request admitted to one device: its queue slot and memory reservation there, and the
    way to run its jobs, each costing `cost` (`service.scheduling`).
    `release()` (idempotent, synchronous so it can run while a response is being cancelled)
    gives the slot and memory back."""

    def __init__(self, worker: "DeviceWorker", nbytes: int, caller: Caller, cost: float, model: str) -> None:
        self.worker, self.nbytes, self.caller, self.cost = worker, nbytes, caller, cost
        self.model_name = model
        self._held = True

    @property
    def model(self) -> Tokenizer:
        """This device's copy of the request's model."""
        return self.worker.models[self.model_name]

    async def execute(self, op: str, work: Work[T]) -> T:
        return await self.worker.execute(op, work, self.caller, self.cost, self.model_name)

    async def stream(self, op: str, steps: Iterator[T]) -> AsyncIterator[T]:
        """Run a generator of model work, one job per item."""
        while (item := await self.execute(op, lambda model: next(steps, _END))) is not _END:
            yield item

    def release(self) -> None:
        if self._held:
            self._held = False
            self.worker.released(self.nbytes, self.caller)


@dataclass(eq=False)
class _Job:
    op: str
    work: Work
    future: asyncio.Future
    caller: str
    weight: float
    cost: float
    interactive: bool
    model: str  # the served model's name: the work runs on the worker's copy of it
    submitted: float = field(default_factory=time.perf_counter)
    started: bool = False
    abandoned: bool = False  # timed out or cancelled while waiting: skip it

    @property
    def key(self) -> tuple | None:
        """What jobs run batched together share (None: this one runs alone)."""
        return (self.op, self.model, self.work.key) if isinstance(self.work, StreamPush) else None

    def run(self, model: Tokenizer) -> Any:
        return self.work.run() if isinstance(self.work, StreamPush) else self.work(model)


class DeviceWorker:
    """One device's resident models (by name), model thread, job queue, memory budget and health."""

    def __init__(self, slot: DeviceSlot, models: dict[str, Tokenizer], memory: MemoryModel, queue_size: int,
                 timeout_s: float, metrics: Metrics, callers: Callers, batching: Batching = Batching()) -> None:
        self.slot, self.name, self.models, self.memory_model = slot, slot.name, models, memory
        self.callers, self.batching = callers, batching
        self.queue_size, self.timeout_s = queue_size, timeout_s
        self.memory = MemoryBudget(memory.budget)
        self.healthy = True
        self.admitted = 0  # requests waiting + running here
        self._metrics = metrics
        self._labels = {"device": slot.name}
        metrics.memory_budget.labels(**self._labels).set(memory.budget)
        metrics.device_healthy.labels(**self._labels).set(1)
        # Unbounded queue, bounded by `admitted`: counting admitted requests ourselves makes the
        # capacity exact, independent of when the consumer task gets to run.
        self._queue: JobQueue[_Job] = JobQueue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"cdt-model-{slot.name}",
                                            initializer=_model_thread, initargs=(slot,))
        self._consumer: asyncio.Task | None = None
        self._closing = False
        self._recent_compute_s = 1.0  # Retry-After estimate, updated after every job

    @property
    def running(self) -> bool:
        return self._consumer is not None and not self._consumer.done() and not self._closing

    @property
    def has_room(self) -> bool:
        return self.healthy and self.admitted <= self.queue_size

    @property
    def retry_after_s(self) -> int:
        return max(1, math.ceil(self._recent_compute_s * (len(self._queue) + 1)))

    @property
    def load(self) -> tuple[int, float]:
        """What placement compares: admitted requests, then the share of memory reserved."""
        return self.admitted, self.memory.reserved / max(1, self.memory.total)

    def start(self) -> None:
        self._consumer = asyncio.get_running_loop().create_task(self._consume(), name=f"cdt-worker-{self.name}")

    async def stop(self) -> None:
        """Refuse new jobs, finish the accepted ones, release the thread."""
        self._closing = True
        self._queue.close()
        if self._consumer is not None:
            await self._consumer
        self._executor.shutdown(wait=True)

    async def admit(self, nbytes: int, caller: Caller = ANONYMOUS_BULK, cost: float = 1.0,
                    model: str | None = None) -> Admission:
        """A queue slot here, then `nbytes` of this device's budget once they fit (waiting at most
        the timeout), for jobs of `model` (a served name; None: the first). Release the returned
        Admission when the request is done."""
        model = next(iter(self.models)) if model is None else model
        self.callers.check_queue(caller.name, self.retry_after_s)
        self.admitted += 1
        self.callers.admitted(caller.name, +1)
        self._metrics.requests_admitted.labels(**self._labels).set(self.admitted)
        admission = Admission(self, 0, caller, cost, model)
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
        self._metrics.memory_reserved.labels(**self._labels).set(self.memory.reserved)
        return admission

    def released(self, nbytes: int, caller: Caller) -> None:
        self.admitted -= 1
        self.callers.admitted(caller.name, -1)
        if nbytes:
            self.memory.release(nbytes)
        self._metrics.requests_admitted.labels(**self._labels).set(self.admitted)
        self._metrics.memory_reserved.labels(**self._labels).set(self.memory.reserved)

    async def execute(self, op: str, work: Work[T], caller: Caller = ANONYMOUS_BULK, cost: float = 1.0,
                      model: str | None = None) -> T:
        """Queue one job of an admitted request and await its result."""
        model = next(iter(self.models)) if model is None else model
        if not self.healthy:
            raise DeviceFailed(f"device {self.name} has failed and takes no more jobs")
        job = _Job(op, work, asyncio.get_running_loop().create_future(), caller.name, caller.weight, cost,
                   caller.interactive, model)
        self._queue.push(job)
        self._metrics.queue_depth.labels(**self._labels).set(len(self._queue))
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
            # A job abandoned while the batch waited for more is dropped, as a waiting one is.
            jobs = [each for each in await take_batch(self._queue, job, self.batching) if not each.abandoned]
            self._metrics.queue_depth.labels(**self._labels).set(len(self._queue))
            if not jobs:
                continue
            if not self.healthy:
                for each in jobs:
                    each.future.set_exception(DeviceFailed(f"device {self.name} failed before this job ran"))
                continue
            await self._execute(jobs)

    async def _execute(self, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        for job in jobs:
            job.started = True
            self._metrics.queue_wait_seconds.labels(job.op, self.name, job.model).observe(start - job.submitted)
            self._metrics.key_queue_wait_seconds.labels(job.caller).observe(start - job.submitted)
        self._metrics.batch_size.labels(jobs[0].op, self.name).observe(len(jobs))
        in_flight = self._metrics.in_flight.labels(**self._labels)
        in_flight.inc(len(jobs))
        try:
            outcomes = await loop.run_in_executor(self._executor, self._call, jobs)
        except Exception as exc:  # it failed them all
            outcomes = [Failed(exc)] * len(jobs)
        finally:
            in_flight.dec(len(jobs))
        elapsed = time.perf_counter() - start
        self._recent_compute_s = elapsed
        # Mapped once per error: a device failure takes the device out of service once.
        errors = {id(o): self._device_error(o.error) for o in outcomes if isinstance(o, Failed)}
        for job, outcome in zip(jobs, outcomes):
            failed = isinstance(outcome, Failed)
            self._metrics.compute_seconds.labels(job.op, "error" if failed else "ok", self.name,
                                                 job.model).observe(elapsed)
            if not job.future.done():  # delivered to the caller, who maps an error to a response
                if failed:
                    job.future.set_exception(errors[id(outcome)])
                else:
                    job.future.set_result(outcome)

    def _device_error(self, exc: Exception) -> Exception:
        """The error the caller gets: the device's own failures in service terms, others as raised."""
        if is_out_of_memory(exc):
            self._metrics.device_errors.labels(self.name, "out_of_memory").inc()
            return DeviceOutOfMemory(f"device {self.name} ran out of memory for this job; retry later, or send "
                                     "smaller frames", retry_after_s=self.retry_after_s)
        if is_device_failure(exc):
            log.error("device %s failed and is taken out of service: %s", self.name, exc)
            self.healthy = False
            self._metrics.device_errors.labels(self.name, "fatal").inc()
            self._metrics.device_healthy.labels(**self._labels).set(0)
            return DeviceFailed(f"device {self.name} failed: {exc}")
        return exc

    def _call(self, jobs: list[_Job]) -> list[Any]:
        """Run `jobs` (one, or a batch) on the model thread: their results, or `Failed` for a
        job of a batch whose own work failed. Raises what fails them all: a device error, or
        the error of a job run alone."""
        try:
            with torch.inference_mode():
                if len(jobs) == 1:
                    return [jobs[0].run(self.models[jobs[0].model])]
                return run_batch([job.work for job in jobs])
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            message = str(exc)
        finally:
            release_free_memory()
        # Out of the except block: the error's traceback, whose frames hold the failed job's
        # tensors, is gone, so the cache can give their blocks back to the device.
        release_device_cache(self.slot.device)
        raise torch.OutOfMemoryError(message)


def _model_thread(slot: DeviceSlot) -> None:
    """Set up a model thread: its share of the CPU's cores, and its device as the current one
    (where code without an explicit device allocates)."""
    if slot.threads is not None:
        # OpenMP's team size is per thread; MKL's, which this also sets, is per process: every CPU
        # model thread sets the same share, so they agree.
        torch.set_num_threads(slot.threads)
    if slot.device.type == "cuda":
        torch.cuda.set_device(slot.device)


class WorkerPool:
    """The replica's device workers, the catalog of the models they hold (`models`: names,
    identities, the copy for what every copy shares) and its host pool: jobs run on their
    worker's copy."""

    def __init__(self, workers: list[DeviceWorker], models: Catalog, host: HostPool, callers: Callers,
                 metrics: Metrics) -> None:
        self.workers, self.models, self.host, self.callers = workers, models, host, callers
        self._metrics = metrics
        self._closing = False
        self._started = False

    @property
    def running(self) -> bool:
        return self._started and not self._closing and any(w.running for w in self.workers)

    @property
    def healthy(self) -> list[DeviceWorker]:
        return [worker for worker in self.workers if worker.healthy]

    def caller(self, name: str, interactive: bool = False) -> Caller:
        return Caller(name, self.callers.weight(name), interactive)

    def worker(self, name: str) -> DeviceWorker | None:
        return next((w for w in self.workers if w.name == name), None)

    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        self._started = True

    async def stop(self) -> None:
        """Refuse new requests, finish every accepted job, release the threads."""
        self._closing = True
        await asyncio.gather(*(worker.stop() for worker in self.workers))
        self.host.close()

    def choose(self, prefer: str | None = None) -> DeviceWorker:
        """The device a request runs on: `prefer` (the device holding its session hot) while that
        is healthy, else the least loaded healthy device with room. Raises when none can take it."""
        if not self._started or self._closing:
            raise Unavailable("the service is shutting down", code="shutting_down")
        healthy = self.healthy
        if not healthy:
            raise DeviceFailed("no device of this replica is healthy")
        preferred = self.worker(prefer) if prefer else None
        candidates = [preferred] if preferred is not None and preferred.healthy else healthy
        roomy = [worker for worker in candidates if worker.has_room]
        if not roomy:
            self._metrics.rejected_total.labels("queue_full").inc()
            retry = min(worker.retry_after_s for worker in candidates)
            raise Overloaded(f"the job queue is full ({candidates[0].queue_size} waiting per device); retry later",
                             retry)
        return min(roomy, key=lambda worker: worker.load)

    def check_capacity(self, caller: str) -> None:
        """Raise now if `caller`'s request would be refused, and count it against the caller's
        rate: lets routes reject before reading a body."""
        worker = self.choose()
        self.callers.check_queue(caller, worker.retry_after_s)
        self.callers.take_token(caller)
