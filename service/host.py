"""The host pool: the work of requests that is not the model's (container decoding and
resizing, reading spooled latents, rendering mp4 and tensor answers, writing safetensors),
on a few threads of its own, so that it overlaps with the model threads' compute instead of
taking turns with it.

Submissions beyond `threads` wait for a slot (the queue is bounded by the admitted requests:
each keeps at most one host task ahead of its model work). Host threads leave torch's thread
count alone: `torch.set_num_threads` also sets MKL's, which is process-wide, so it would change
the model threads' GEMMs (their speed, and their rounding).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, Iterator, TypeVar


from .metrics import Metrics

A = TypeVar("A")
_END = object()


class HostPool:
    def __init__(self, threads: int, metrics: Metrics) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cdt-host")
        self._metrics = metrics

    async def run(self, op: str, fn: Callable[..., A], *args) -> A:
        """`fn(*args)` on a host thread, timed as `op` (`cdt_media_seconds`)."""
        with self._metrics.media(op):
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def iterate(self, op: str, items: Iterator[A]) -> AsyncIterator[A]:
        """The items of a blocking iterator, each made on a host thread; the next one is made while
        the caller works on the current one (one ahead). Close it (`contextlib.aclosing`) before
        what the iterator reads from."""
        pending = asyncio.ensure_future(self.run(op, next, items, _END))
        try:
            while (item := await pending) is not _END:
                pending = asyncio.ensure_future(self.run(op, next, items, _END))
                yield item
        finally:
            await settle(pending)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


async def settle(pending: asyncio.Future) -> None:
    """Wait out host work made ahead that nobody will read: a host thread cannot be interrupted,
    and what it works on must not be closed under it. Its error, if any, is nobody's."""
    await asyncio.wait([pending])
    if not pending.cancelled():
        pending.exception()
