"""Per-key rate limits: two token buckets per key, requests/min and tokens/min.

A bucket holds at most `capacity` and refills at `rate_per_min / 60` per second. The request bucket's
capacity is the key's `burst` (default: its rpm, one minute's allowance), so within any window of T
seconds a key gets at most `burst + rpm * T / 60` requests. The token bucket is charged up front with
the request's worst case (estimated prompt tokens + max_tokens × n) and settled once the real usage is
known: unused tokens go back, under-estimated ones are taken (the level may go below zero, which only
makes the next request wait longer). A request that could never fit (cost above the capacity) is told
so instead of being asked to retry.

Both buckets are checked before either is charged, so a request refused for tokens costs no request.
Buckets exist only for authenticated keys, so a flood of bad keys allocates nothing.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass


@dataclass
class Bucket:
    capacity: float
    rate_per_s: float
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate_per_s)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0 if it is now)."""
        missing = amount - self.level
        if missing <= 0:
            return 0.0
        return math.inf if self.rate_per_s <= 0 else missing / self.rate_per_s


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""  # "requests" / "tokens" / "too_large"
    retry_after: int = 0  # whole seconds, >= 1 when refused for a retryable reason
    limit: int = 0


class RateLimiter:
    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], Bucket] = {}

    def _bucket(self, key: str, kind: str, per_min: int, capacity: int, now: float) -> Bucket:
        bucket = self._buckets.get((key, kind))
        rate = per_min / 60.0
        if bucket is None or bucket.capacity != capacity or bucket.rate_per_s != rate:
            level = capacity if bucket is None else min(bucket.level, capacity)  # limits were changed
            bucket = self._buckets[(key, kind)] = Bucket(capacity, rate, level, now)
        bucket.refill(now)
        return bucket

    def acquire(self, key: str, *, rpm: int, tpm: int, burst: int | None, tokens: int) -> Decision:
        now = self._clock()
        with self._lock:
            requests = self._bucket(key, "requests", rpm, max(1, burst if burst is not None else rpm), now)
            token_bucket = self._bucket(key, "tokens", tpm, max(1, tpm), now)
            if tokens > token_bucket.capacity:
                return Decision(False, "too_large", 0, tpm)
            wait_requests = requests.wait_for(1)
            wait_tokens = token_bucket.wait_for(tokens)
            if wait_requests > 0 or wait_tokens > 0:
                reason = "requests" if wait_requests >= wait_tokens else "tokens"
                wait = max(wait_requests, wait_tokens)
                retry = 3600 if math.isinf(wait) else max(1, math.ceil(wait))
                return Decision(False, reason, retry, rpm if reason == "requests" else tpm)
            requests.level -= 1
            token_bucket.level -= tokens
            return Decision(True)

    def settle(self, key: str, charged: int, used: int) -> None:
        """Correct the token bucket once the real usage is known (refund or extra charge)."""
        if charged == used:
            return
        with self._lock:
            bucket = self._buckets.get((key, "tokens"))
            if bucket is not None:
                bucket.refill(self._clock())
                bucket.level = min(bucket.capacity, bucket.level + charged - used)
