"""Stopping gracefully: the first SIGTERM (or SIGINT) starts the replica's drain at once.

uvicorn handles the signal itself: it stops accepting connections, waits for the requests in
flight (without a time limit: `cdt serve` sets none), then runs the app's lifespan shutdown.
Sessions should not wait for the slowest whole-clip request before they are handed over, so
`on_stop` chains a callback in front of uvicorn's handler: the drain starts with the signal,
beside uvicorn's wait, and the lifespan shutdown awaits it (bounded by CDT_DRAIN_S).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def on_stop(callback: Callable[[], object]) -> Iterator[None]:
    """While inside: run `callback` on the event loop when a stop signal arrives, before the
    handler the server installed for it. Only where the server handles the signal in Python
    (uvicorn does, in the main thread): elsewhere (an app run in a test client's thread) this
    does nothing, and the drain starts with the lifespan shutdown."""
    installed: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        loop = asyncio.get_running_loop()
        for number in STOP_SIGNALS:
            previous = signal.getsignal(number)
            if not callable(previous):
                continue  # the default action or ignored: not ours to take over

            def handler(signum, frame, previous=previous):
                if not loop.is_closed():
                    loop.call_soon_threadsafe(callback)
                previous(signum, frame)

            signal.signal(number, handler)
            installed[number] = previous
    try:
        yield
    finally:
        for number, previous in installed.items():
            signal.signal(number, previous)
