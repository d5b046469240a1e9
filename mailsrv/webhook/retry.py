"""The webhook retry schedule: when to try an event again, and when to dead-letter it.

The default is the example schedule of the Standard Webhooks specification: the first attempt at
once, then retries 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h, 14 h, 20 h and 24 h after each
failure: eleven attempts over about four days, then the event is dead-lettered.  Every delay is
jittered, so events that failed together do not come back together, and a receiver's
``Retry-After`` is honoured: the delay is the larger of the two, with ``Retry-After`` bounded so
that a receiver cannot park an event for ever.

Everything here is pure: the caller passes the attempt count, the random source and the clock.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

MINUTE = 60.0
HOUR = 60 * MINUTE
DAY = 24 * HOUR

STANDARD_SCHEDULE: tuple[float, ...] = (
    0.0,
    5.0,
    5 * MINUTE,
    30 * MINUTE,
    2 * HOUR,
    5 * HOUR,
    10 * HOUR,
    10 * HOUR,
    14 * HOUR,
    20 * HOUR,
    24 * HOUR,
)
"""Delay before each attempt: ``STANDARD_SCHEDULE[n]`` is waited after the ``n``-th failure."""


@dataclass(frozen=True)
class RetrySchedule:
    """A list of delays, jitter, and the bound on ``Retry-After``.

    ``delays[0]`` is the wait before the first attempt (0: at once) and ``delays[n]`` the wait
    after the ``n``-th failed attempt, so an event gets ``len(delays)`` attempts in all.
    ``jitter`` is a fraction: a delay ``d`` is drawn uniformly from ``d * (1 - jitter)`` ..
    ``d * (1 + jitter)``.  A ``Retry-After`` longer than ``max_retry_after`` counts as
    ``max_retry_after``.
    """

    delays: tuple[float, ...] = STANDARD_SCHEDULE
    jitter: float = 0.1
    max_retry_after: float = DAY

    def __post_init__(self) -> None:
        if not self.delays:
            raise ValueError("a retry schedule needs at least one delay")
        if not all(math.isfinite(d) and d >= 0 for d in self.delays):
            raise ValueError("retry delays must be finite and not negative")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        if not (math.isfinite(self.max_retry_after) and self.max_retry_after >= 0):
            raise ValueError("max_retry_after must be finite and not negative")

    @property
    def max_attempts(self) -> int:
        """How many attempts an event gets before it is dead-lettered."""
        return len(self.delays)

    def delay(
        self, attempts: int, rng: random.Random, retry_after: float | None = None
    ) -> float | None:
        """Seconds to wait after ``attempts`` failed attempts, or None: dead-letter it now.

        ``attempts`` is 0 before the first attempt.  ``retry_after`` is the receiver's
        ``Retry-After`` in seconds (see :func:`mailsrv.webhook.sender.parse_retry_after`).
        """
        if attempts < 0:
            raise ValueError("attempts counts failed attempts and starts at 0")
        if attempts >= len(self.delays):
            return None
        base = self.delays[attempts]
        wait = base * rng.uniform(1 - self.jitter, 1 + self.jitter) if base else 0.0
        if retry_after is not None and math.isfinite(retry_after):
            wait = max(wait, min(max(retry_after, 0.0), self.max_retry_after))
        return wait

    def next_attempt(
        self, attempts: int, now: float, rng: random.Random, retry_after: float | None = None
    ) -> float | None:
        """When to try next (a clock reading) after ``attempts`` failures, or None: give up."""
        wait = self.delay(attempts, rng, retry_after)
        return None if wait is None else now + wait


DEFAULT_SCHEDULE = RetrySchedule()
