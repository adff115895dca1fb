"""The per-client token bucket: bursts, refill, Retry-After, and clients kept apart."""

import pytest

from fhirkit.errors import TooManyRequests
from gateway.rate_limit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_passes_then_the_next_request_waits_for_a_token() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2, burst=3, clock=clock)
    for _ in range(3):
        limiter.check("his-1")
    with pytest.raises(TooManyRequests) as refused:
        limiter.check("his-1")
    assert refused.value.status_code == 429
    assert refused.value.headers["Retry-After"] == "1"
    clock.now += 0.5  # one token back at 2/s
    limiter.check("his-1")
    with pytest.raises(TooManyRequests):
        limiter.check("his-1")


def test_clients_have_their_own_buckets_and_a_bucket_never_exceeds_its_burst() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1, burst=2, clock=clock)
    limiter.check("a")
    limiter.check("a")
    limiter.check("b")  # another client is not slowed by the first
    clock.now += 3600  # an idle hour refills to the burst, not beyond
    limiter.check("a")
    limiter.check("a")
    with pytest.raises(TooManyRequests) as refused:
        limiter.check("a")
    assert refused.value.headers["Retry-After"] == "1"


def test_a_slow_rate_says_how_long_to_wait() -> None:
    limiter = RateLimiter(rate=0.1, burst=1, clock=Clock())
    limiter.check("slow")
    with pytest.raises(TooManyRequests) as refused:
        limiter.check("slow")
    assert refused.value.headers["Retry-After"] == "10"


def test_zero_rate_means_no_limit() -> None:
    limiter = RateLimiter(rate=0, burst=1, clock=Clock())
    for _ in range(100):
        limiter.check("unlimited")
