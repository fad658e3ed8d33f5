"""The callers of a replica, as its scheduler and limits see them: each caller's weight, its
requests admitted, and its request rate, against the per-caller limits. A caller is an API
key's principal (`service.auth`), or the anonymous caller when keys are off.

A key over its own limit gets its own 429 (`key_queue_full`, `key_rate_limited`,
`key_too_many_sessions`) with `Retry-After`, before its body is read, while other keys are still served; the replica's
limits (CDT_QUEUE_SIZE per device, the memory budget) stay as the last line. With keys off,
every request is the anonymous caller's, and only the replica's limits apply: a per-caller
limit would only shrink the replica.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .domain_errors import Overloaded
from .metrics import Metrics

if TYPE_CHECKING:  # the sessions import the workers, which import this
    from .sessions.store import SessionStore

ANONYMOUS = "anonymous"  # the caller when API keys are off


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class Callers:
    def __init__(self, weights: dict[str, float], queue_limit: int, rate: float, burst: int, metrics: Metrics) -> None:
        self._weights, self.queue_limit = weights, queue_limit
        self._rate, self._burst = rate, burst
        self._admitted: Counter[str] = Counter()
        self._buckets: dict[str, _Bucket] = {}
        self._metrics = metrics

    def weight(self, caller: str) -> float:
        return self._weights.get(caller, 1.0)

    def check_queue(self, caller: str, retry_after_s: int) -> None:
        """Refuse a request of `caller` over its queue limit (a retry may fit after
        `retry_after_s`, the pool's estimate)."""
        if caller != ANONYMOUS and self._admitted[caller] >= self.queue_limit:
            self._reject(caller, "key_queue_full")
            raise Overloaded(f"this key has {self.queue_limit} requests waiting or running (CDT_KEY_QUEUE_SIZE); "
                             "retry when one has finished", retry_after_s, code="key_queue_full")

    def take_token(self, caller: str) -> None:
        """Count a request against `caller`'s rate (CDT_KEY_RATE, a token bucket of CDT_KEY_BURST);
        refuse it over the rate."""
        if not self._rate or caller == ANONYMOUS:
            return
        now = time.monotonic()
        bucket = self._buckets.setdefault(caller, _Bucket(self._burst, now))
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.stamp) * self._rate)
        bucket.stamp = now
        if bucket.tokens < 1:
            self._reject(caller, "key_rate_limited")
            raise Overloaded(f"this key is over {self._rate:g} requests per second (CDT_KEY_RATE)",
                             max(1, math.ceil((1 - bucket.tokens) / self._rate)), code="key_rate_limited")
        bucket.tokens -= 1

    async def own_session(self, store: "SessionStore", caller: str, session_id: str, ttl_s: float, limit: int) -> None:
        """Count a new session of `caller` against its limit of live sessions (CDT_KEY_MAX_SESSIONS,
        store-wide: every replica's); refuse it over the limit."""
        if caller != ANONYMOUS and not await store.own(caller, session_id, ttl_s, limit):
            self._reject(caller, "key_too_many_sessions")
            raise Overloaded(f"this key has {limit} live sessions (CDT_KEY_MAX_SESSIONS); finish and delete one, "
                             "or let one expire", 30, code="key_too_many_sessions")

    def admitted(self, caller: str, change: int) -> None:
        self._admitted[caller] += change
        self._metrics.key_requests_admitted.labels(caller).set(self._admitted[caller])
        if not self._admitted[caller]:
            del self._admitted[caller]

    def _reject(self, caller: str, reason: str) -> None:
        self._metrics.key_rejected_total.labels(caller, reason).inc()
