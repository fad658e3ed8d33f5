"""Batching of stream pushes on one device.

A job that pushes one chunk into one stream (`media.StreamPush`: a session chunk, a
whole-clip chunk) takes with it, up to `Batching.max` in all, the jobs that come next in the
fair order while they have the same op, served model and `key` (kind, model, steps, phase,
chunk shape, state layout), and they run as one batched forward (`model.push_together`):
each stream's state and answer are those of its own push up to float rounding.
`Batching.wait_s` waits that long for more to arrive when fewer are waiting; 0 batches only
what is already queued, so batching adds no wait. A batch whose forward fails on anything
but the device runs its pushes one at a time, so a bad chunk fails alone. A batch holds its
streams' states twice while it runs (joined, and each stream's own).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Hashable, Protocol, TypeVar

from media import StreamPush, push_outputs

from .devices import is_device_failure, is_out_of_memory
from .scheduling import JobQueue

T = TypeVar("T")


@dataclass(frozen=True)
class Batching:
    """How a device batches stream pushes: at most `max` a batch; `wait_s` to wait for more."""

    max: int = 1
    wait_s: float = 0.0


class Batchable(Protocol):
    @property
    def key(self) -> Hashable | None:
        """What jobs run batched together share (None: this one runs alone)."""


J = TypeVar("J", bound=Batchable)


async def take_batch(queue: JobQueue[J], job: J, batching: Batching) -> list[J]:
    """`job` and the waiting jobs that run batched with it (waiting up to `batching.wait_s`
    for more when fewer than `batching.max` are there)."""
    key, limit = job.key, batching.max - 1
    if key is None or limit < 1:
        return [job]
    jobs = [job, *queue.pop_while(job, lambda other: other.key == key, limit)]
    if len(jobs) <= limit and batching.wait_s > 0:
        await asyncio.sleep(batching.wait_s)
        jobs += queue.pop_while(job, lambda other: other.key == key, limit + 1 - len(jobs))
    return jobs


@dataclass(frozen=True)
class Failed:
    """A job of a batch whose own work raised `error`."""

    error: Exception


def run_batch(pushes: list[StreamPush]) -> list[Any]:
    """Each push's result, or `Failed` for one whose own work failed. Raises a device error,
    which fails them all."""
    try:
        outputs = push_outputs(pushes)
    except Exception as exc:
        if is_out_of_memory(exc) or is_device_failure(exc):
            raise
        # No stream has changed (`push_together`): each push alone, so a bad input fails alone.
        return [_attempt(push.run) for push in pushes]
    return [_attempt(partial(push.finish, output)) for push, output in zip(pushes, outputs)]


def _attempt(fn: Callable[[], T]) -> T | Failed:
    """`fn()`, or its error as a `Failed` unless it is the device's (which fails the batch)."""
    try:
        return fn()
    except Exception as exc:
        if is_out_of_memory(exc) or is_device_failure(exc):
            raise
        return Failed(exc)
