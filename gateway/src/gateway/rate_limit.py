"""Per-client rate limits: a token bucket per API client, in the gateway process.

Each client may send `rate` requests per second on average and `burst` at once. Over the limit
the answer is 429 (OperationOutcome `throttled`) with `Retry-After` in whole seconds, so a
well-behaved HIS backs off instead of retrying at once.

The buckets live in this process's memory (a database row per request would cost a write on the
hot path, and on SQLite a turn at its one write lock). With several worker processes
(`alliance serve --workers N`) each enforces its share: `serve` hands every worker the limit
divided by N, so the configured numbers remain the whole server's. A client whose requests all
arrive on one keep-alive connection meets one worker's share (docs/operations.md); several
gateway replicas each enforce the whole limit.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from fhirkit.errors import TooManyRequests

MAX_TRACKED_CLIENTS = 10_000


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def check(self, client_id: str) -> None:
        """Spend one request of `client_id`'s allowance, or raise TooManyRequests."""
        if self.rate <= 0:
            return  # limits switched off by configuration
        now = self.clock()
        bucket = self._buckets.get(client_id)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED_CLIENTS:
                self._forget_full_buckets(now)
            bucket = self._buckets[client_id] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return
        wait = math.ceil((1.0 - bucket.tokens) / self.rate)
        raise TooManyRequests(
            f"Too many requests from this client: at most {self.rate:g}/s (bursts of {self.burst}); retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )

    def _forget_full_buckets(self, now: float) -> None:
        # A bucket that has refilled completely carries no state worth keeping.
        for client_id, bucket in list(self._buckets.items()):
            if bucket.tokens + (now - bucket.updated) * self.rate >= self.burst:
                del self._buckets[client_id]
