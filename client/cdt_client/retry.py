"""The client's retry policy: which failures are worth another attempt, and how long to wait.

Retried are connection errors and the answers that mean "not now" rather than "not this":
429 (queue full, too many sessions), 502 (the load balancer lost its replica mid-request),
503 (shutting down, not ready, queue timeout, session store unavailable) and 504 (compute
timeout). A request is repeated only where a repeat cannot do harm:

- session chunks and finishes carry their `seq`: the service applies each once and answers
  a repeat of the last one with its stored response;
- whole-clip encodes and decodes change nothing on the service, so a repeat costs compute
  only (after a 504 the first attempt's job still runs to its end);
- creating a session is not idempotent (`idempotent=False`): it is repeated only when the
  service refused it (429, 503) or the connection was never made, never after a lost answer
  or a 502, which could leave a second, unused session counting against CDT_MAX_SESSIONS
  until its TTL runs out.

The wait before attempt n+1 is the server's Retry-After when it sends one (a 429: its
estimate of when the queue has room), else the exponential backoff `backoff_s * 2**n` (at
most `max_delay_s`), stretched by up to `jitter` of itself at random so that clients
refused together do not all come back together.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from typing import Awaitable, Callable

import httpx

RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
REFUSED_STATUS = frozenset({429, 503})  # the service did nothing: safe to repeat any request
NOT_CONNECTED = (httpx.ConnectError, httpx.ConnectTimeout)  # the request never left


class Retrying:
    """Send one request until it gets an answer not worth retrying or `attempts` run out;
    then the last answer is returned (or the last connection error raised)."""

    def __init__(self, attempts: int = 8, backoff_s: float = 0.5, max_delay_s: float = 30.0, jitter: float = 0.5,
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        self.attempts, self.backoff_s, self.max_delay_s, self.jitter = attempts, backoff_s, max_delay_s, jitter
        self.sleep = sleep
        self._rng = rng or random.Random()

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds to wait after failed attempt `attempt` (from 0)."""
        wait = retry_after_s(response)
        if wait is None:
            wait = min(self.max_delay_s, self.backoff_s * 2**attempt)
        return wait * (1 + self.jitter * self._rng.random())

    def _wait(self, attempt: int, outcome: Outcome, idempotent: bool) -> float | None:
        """The wait before another attempt, or None to stop here."""
        if attempt + 1 >= self.attempts:
            return None
        if isinstance(outcome, httpx.Response):
            retry = outcome.status_code in (RETRYABLE_STATUS if idempotent else REFUSED_STATUS)
            return self.delay(attempt, outcome) if retry else None
        return self.delay(attempt, None) if idempotent or isinstance(outcome, NOT_CONNECTED) else None

    def send(self, request: Callable[[], httpx.Response], idempotent: bool = True) -> httpx.Response:
        for attempt in itertools.count():
            outcome = _attempt(request)
            wait = self._wait(attempt, outcome, idempotent)
            if wait is None:
                return _settled(outcome)
            self.sleep(wait)

    async def send_async(self, request: Callable[[], Awaitable[httpx.Response]],
                         idempotent: bool = True) -> httpx.Response:
        """`send` for an async request; waits with asyncio.sleep."""
        for attempt in itertools.count():
            try:
                outcome = await request()
            except httpx.TransportError as exc:
                outcome = exc
            wait = self._wait(attempt, outcome, idempotent)
            if wait is None:
                return _settled(outcome)
            await asyncio.sleep(wait)


Outcome = httpx.Response | httpx.TransportError  # an attempt's answer, or why there was none


def _attempt(request: Callable[[], httpx.Response]) -> Outcome:
    try:
        return request()
    except httpx.TransportError as exc:
        return exc


def _settled(outcome: Outcome) -> httpx.Response:
    """The last attempt's answer, or its connection error raised."""
    if isinstance(outcome, httpx.TransportError):
        raise outcome
    return outcome


NO_RETRY = Retrying(attempts=1)


def retry_after_s(response: httpx.Response | None) -> float | None:
    """A Retry-After header given in seconds (the service's form); None without one."""
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: fall back to the backoff
