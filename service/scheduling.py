"""How a device picks its next job: fairly between callers, interactive work first.

Every caller (an API key's principal, or the anonymous caller when keys are off) has a queue
of its own on each device, in one of two classes:

- Between callers, weighted fair queuing over the jobs' estimated costs: a job's cost is its
  pixels times its frames times its DDIM steps (the terms the memory model's per-pixel costs
  scale with), divided by its caller's weight (CDT_API_KEYS `key:weight`, default 1). A
  caller of many expensive jobs gets the same share of the device as a caller of few cheap
  ones (in proportion to the weights), not the same number of jobs. The order is start-time
  fair queuing: each job is tagged with the virtual time its caller's previous jobs reach
  (or the device's current virtual time, for a caller that was idle), and the job with the
  lowest tag runs next. It gives deficit round robin's shares without its quantum: a caller
  arriving at a busy device waits behind one job of each other caller, however much the
  others have queued or however cheap their jobs are, because the requests here submit their
  chunks one job at a time.
- Between classes, interactive jobs (session chunks: someone is waiting on the stream) go
  first; after `INTERACTIVE_RUN` of them in a row while bulk jobs (the chunks of whole-clip
  requests) wait, one bulk job runs, so bulk work is slowed by a stream of chunks, never
  starved by it.
- Jobs run together as one batch (`service.workers`) are the next ones in this order, taken
  while they match the first (`pop_while`): a batch never goes ahead of a job that comes
  before its members.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Generic, Protocol, TypeVar

# Interactive jobs run in a row, at most, while bulk jobs wait.
INTERACTIVE_RUN = 4


class Schedulable(Protocol):
    caller: str
    weight: float
    cost: float
    interactive: bool
    abandoned: bool


J = TypeVar("J", bound=Schedulable)


@dataclass
class _Caller(Generic[J]):
    jobs: deque[tuple[float, J]] = field(default_factory=deque)  # (start tag, job), tags rising
    finish: float = 0.0  # the virtual time its queued jobs reach


class FairQueue(Generic[J]):
    """The waiting jobs of several callers, in start-time fair queuing order over their
    weighted costs. Abandoned jobs are dropped when reached."""

    def __init__(self) -> None:
        self._callers: dict[str, _Caller[J]] = {}
        self._now = 0.0  # virtual time: the start tag of the job taken last
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, job: J) -> None:
        caller = self._callers.setdefault(job.caller, _Caller())
        start = max(self._now, caller.finish)
        caller.finish = start + job.cost / job.weight
        caller.jobs.append((start, job))
        self._size += 1

    def depth(self, caller: str) -> int:
        entry = self._callers.get(caller)
        return 0 if entry is None else len(entry.jobs)

    def _head(self) -> str | None:
        """The caller whose first job comes next (abandoned jobs dropped on the way), or None."""
        while self._callers:
            name = min(self._callers, key=lambda c: self._callers[c].jobs[0][0])
            caller = self._callers[name]
            if not caller.jobs[0][1].abandoned:
                return name
            self._remove_first(name)
        return None

    def _remove_first(self, name: str) -> tuple[float, J]:
        caller = self._callers[name]
        entry = caller.jobs.popleft()
        self._size -= 1
        if not caller.jobs:
            del self._callers[name]  # an idle caller starts again from the virtual time
        return entry

    def pop(self) -> J | None:
        """The next job, or None when none is waiting."""
        name = self._head()
        if name is None:
            return None
        start, job = self._remove_first(name)
        self._now = max(self._now, start)
        return job

    def pop_while(self, match: Callable[[J], bool], limit: int) -> list[J]:
        """Up to `limit` next jobs, taken while the next one `match`es: jobs run together never
        go ahead of a job that comes before them in the fair order."""
        jobs: list[J] = []
        while len(jobs) < limit and (name := self._head()) is not None and match(self._callers[name].jobs[0][1]):
            jobs.append(self.pop())
        return jobs


class JobQueue(Generic[J]):
    """A device's waiting jobs: interactive and bulk fair queues, and the wait for the next job."""

    def __init__(self) -> None:
        self.interactive: FairQueue[J] = FairQueue()
        self.bulk: FairQueue[J] = FairQueue()
        self._run = 0  # interactive jobs taken in a row while bulk jobs waited
        self._changed = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self.interactive) + len(self.bulk)

    def depth(self, caller: str) -> int:
        return self.interactive.depth(caller) + self.bulk.depth(caller)

    def push(self, job: J) -> None:
        (self.interactive if job.interactive else self.bulk).push(job)
        self._changed.set()

    def pop_while(self, job: J, match: Callable[[J], bool], limit: int) -> list[J]:
        """Up to `limit` jobs of `job`'s class that come next after it in the fair order, taken
        while they `match` (`FairQueue.pop_while`), to run beside it."""
        return (self.interactive if job.interactive else self.bulk).pop_while(match, limit)

    def close(self) -> None:
        """No more jobs: `get` gives None once those waiting have been taken."""
        self._closed = True
        self._changed.set()

    async def get(self) -> J | None:
        """The next job to run; None once closed and drained."""
        while True:
            job = self._take()
            if job is not None or self._closed:
                return job
            self._changed.clear()
            await self._changed.wait()

    def _take(self) -> J | None:
        queues = (self.bulk, self.interactive) if self._run >= INTERACTIVE_RUN else (self.interactive, self.bulk)
        for queue in queues:
            job = queue.pop()
            if job is not None:
                self._run = self._run + 1 if job.interactive and len(self.bulk) else 0
                return job
        return None
