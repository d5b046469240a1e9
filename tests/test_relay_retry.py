"""The retry policy: exponential from min_backoff, doubling, capped, jittered; queue lifetime."""

from __future__ import annotations

import random

import pytest

from mailsrv.relay.retry import DAY, DEFAULT_POLICY, RetryPolicy, delay


def test_defaults_are_postfixs() -> None:
    assert (DEFAULT_POLICY.min_backoff, DEFAULT_POLICY.max_backoff) == (300.0, 4000.0)
    assert DEFAULT_POLICY.lifetime == 5 * DAY


@pytest.mark.parametrize(
    ("attempt", "base"),
    [(1, 300.0), (2, 600.0), (3, 1200.0), (4, 2400.0), (5, 4000.0), (6, 4000.0), (500, 4000.0)],
)
def test_base_doubles_up_to_the_cap(attempt: int, base: float) -> None:
    assert DEFAULT_POLICY.base(attempt) == base


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 9, 10_000])
def test_delay_stays_within_the_jitter_band_and_the_bounds(attempt: int) -> None:
    rng = random.Random(attempt)
    base = DEFAULT_POLICY.base(attempt)
    low, high = max(300.0, base * 0.75), min(4000.0, base * 1.25)
    samples = [delay(attempt, rng) for _ in range(2000)]
    assert all(low <= s <= high for s in samples)
    # Really jittered: spread over most of the band, not one value.
    assert max(samples) - min(samples) > 0.8 * (high - low)


def test_delay_is_a_pure_function_of_attempt_and_rng() -> None:
    first = [delay(n, random.Random(7)) for n in range(1, 8)]
    again = [delay(n, random.Random(7)) for n in range(1, 8)]
    assert first == again
    assert first != [delay(n, random.Random(8)) for n in range(1, 8)]


def test_no_jitter_gives_the_base() -> None:
    policy = RetryPolicy(jitter=0.0)
    assert [policy.delay(n, random.Random(1)) for n in (1, 2, 6)] == [300.0, 600.0, 4000.0]


def test_expiry_against_the_lifetime() -> None:
    policy = RetryPolicy(lifetime=100.0)
    assert not policy.expired(created_at=1000.0, now=1099.9)
    assert policy.expired(created_at=1000.0, now=1100.0)


def test_next_attempt_is_clipped_to_the_expiry_then_none() -> None:
    policy = RetryPolicy(min_backoff=300.0, max_backoff=4000.0, lifetime=1000.0, jitter=0.0)
    assert policy.next_attempt(1, created_at=0.0, now=100.0, rng=random.Random()) == 400.0
    # The next regular retry (now + 1200) would fall after the expiry: try once more at expiry.
    assert policy.next_attempt(3, created_at=0.0, now=500.0, rng=random.Random()) == 1000.0
    assert policy.next_attempt(4, created_at=0.0, now=1000.0, rng=random.Random()) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_backoff": 0.0},
        {"min_backoff": 500.0, "max_backoff": 400.0},
        {"jitter": 1.0},
        {"jitter": -0.1},
        {"lifetime": -1.0},
    ],
)
def test_bad_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_attempt_counts_from_one() -> None:
    with pytest.raises(ValueError):
        DEFAULT_POLICY.delay(0, random.Random())
