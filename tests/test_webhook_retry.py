"""The webhook retry schedule: Standard Webhooks default, jitter, Retry-After, dead letter."""

from __future__ import annotations

import math
import random

import pytest

from mailsrv.webhook.retry import DAY, DEFAULT_SCHEDULE, STANDARD_SCHEDULE, RetrySchedule


def test_default_is_the_standard_webhooks_example() -> None:
    assert STANDARD_SCHEDULE == (0, 5, 300, 1800, 7200, 18000, 36000, 36000, 50400, 72000, 86400)
    assert DEFAULT_SCHEDULE.delays == STANDARD_SCHEDULE
    assert DEFAULT_SCHEDULE.max_attempts == 11


def test_delays_follow_the_schedule_within_jitter_then_dead_letter() -> None:
    rng = random.Random(1)
    for attempts, base in enumerate(STANDARD_SCHEDULE):
        for _ in range(50):
            wait = DEFAULT_SCHEDULE.delay(attempts, rng)
            assert wait is not None
            assert base * 0.9 <= wait <= base * 1.1
    assert DEFAULT_SCHEDULE.delay(0, rng) == 0.0  # the first attempt: at once
    assert DEFAULT_SCHEDULE.delay(11, rng) is None
    assert DEFAULT_SCHEDULE.delay(50, rng) is None


def test_jitter_spreads_events_that_failed_together() -> None:
    rng = random.Random(7)
    waits = {DEFAULT_SCHEDULE.delay(3, rng) for _ in range(20)}
    assert len(waits) == 20


def test_same_rng_same_delays() -> None:
    a = [DEFAULT_SCHEDULE.delay(n, random.Random(3)) for n in range(12)]
    b = [DEFAULT_SCHEDULE.delay(n, random.Random(3)) for n in range(12)]
    assert a == b


def test_no_jitter() -> None:
    schedule = RetrySchedule(delays=(0, 10, 20), jitter=0)
    assert [schedule.delay(n, random.Random()) for n in range(4)] == [0, 10, 20, None]
    assert schedule.next_attempt(1, 1000.0, random.Random()) == 1010.0
    assert schedule.next_attempt(3, 1000.0, random.Random()) is None


# attempts, Retry-After, expected wait (jitter 0, schedule 0, 10, 20; Retry-After cap 100)
RETRY_AFTER = [
    (1, 3.0, 10.0),  # shorter than the schedule: the schedule wins
    (1, 50.0, 50.0),  # longer: honoured
    (1, 1e9, 100.0),  # absurd: bounded
    (1, -5.0, 10.0),  # in the past: ignored
    (0, 30.0, 30.0),  # even before the first retry
    (1, math.inf, 10.0),
    (1, math.nan, 10.0),
    (3, 5.0, None),  # out of attempts: Retry-After does not revive the event
]


@pytest.mark.parametrize(("attempts", "retry_after", "expected"), RETRY_AFTER)
def test_retry_after_is_the_floor_bounded(
    attempts: int, retry_after: float, expected: float | None
) -> None:
    schedule = RetrySchedule(delays=(0, 10, 20), jitter=0, max_retry_after=100)
    assert schedule.delay(attempts, random.Random(), retry_after) == expected


def test_default_retry_after_bound_is_a_day() -> None:
    assert DEFAULT_SCHEDULE.delay(1, random.Random(), 10 * DAY) == DAY


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delays": ()},
        {"delays": (0, -1)},
        {"delays": (0, math.inf)},
        {"jitter": 1.0},
        {"jitter": -0.1},
        {"max_retry_after": -1},
    ],
)
def test_bad_schedules_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RetrySchedule(**kwargs)  # type: ignore[arg-type]


def test_negative_attempts_refused() -> None:
    with pytest.raises(ValueError):
        DEFAULT_SCHEDULE.delay(-1, random.Random())
