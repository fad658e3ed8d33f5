"""A device's memory budget: bytes reserved by the requests admitted to it, granted in arrival
order."""

from __future__ import annotations

import asyncio
from collections import deque


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
