"""The retry policy: when to try a deferred recipient again, and when to give up.

Postfix's defaults: the first retry after ``min_backoff`` (300 s), each later one twice as long,
never more than ``max_backoff`` (4000 s), and a message older than ``lifetime`` (5 days) is
bounced.  Every delay is jittered so that recipients deferred together do not come back together.
All of it is pure: the caller passes the attempt count, the random source and the clock reading.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DAY = 86400.0


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, capped, with a queue lifetime.

    ``jitter`` is a fraction: the delay for an attempt is drawn uniformly from
    ``base * (1 - jitter)`` .. ``base * (1 + jitter)``, kept within
    ``[min_backoff, max_backoff]``, where ``base`` is ``min_backoff * 2 ** (attempt - 1)``
    capped at ``max_backoff``.
    """

    min_backoff: float = 300.0
    max_backoff: float = 4000.0
    lifetime: float = 5 * DAY
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.min_backoff <= self.max_backoff:
            raise ValueError("need 0 < min_backoff <= max_backoff")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        if self.lifetime < 0:
            raise ValueError("lifetime must not be negative")

    def base(self, attempt: int) -> float:
        """The delay before jitter after ``attempt`` failed attempts (1 = the first failure)."""
        if attempt < 1:
            raise ValueError("attempt counts failed attempts and starts at 1")
        # 2 ** 63 is far past any cap; stop doubling before floats overflow.
        return min(self.min_backoff * 2.0 ** min(attempt - 1, 63), self.max_backoff)

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after ``attempt`` failed attempts, jittered with ``rng``."""
        base = self.base(attempt)
        low = max(self.min_backoff, base * (1 - self.jitter))
        high = min(self.max_backoff, base * (1 + self.jitter))
        return rng.uniform(low, high)

    def expired(self, created_at: float, now: float) -> bool:
        """True when a message created at ``created_at`` has outlived the queue lifetime."""
        return now - created_at >= self.lifetime

    def next_attempt(
        self, attempt: int, created_at: float, now: float, rng: random.Random
    ) -> float | None:
        """When to try again after ``attempt`` failures, or None: give up (bounce) now.

        The last retry is not put off past the expiry time, so a message is tried once more
        when its lifetime ends, then bounced if that fails too.
        """
        if self.expired(created_at, now):
            return None
        return min(now + self.delay(attempt, rng), created_at + self.lifetime)


DEFAULT_POLICY = RetryPolicy()


def delay(attempt: int, rng: random.Random, policy: RetryPolicy = DEFAULT_POLICY) -> float:
    """``policy.delay(attempt, rng)``: seconds to wait after ``attempt`` failed attempts."""
    return policy.delay(attempt, rng)
