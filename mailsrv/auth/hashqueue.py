"""Which AUTH attempt gets a password-hash thread next, and a bound on those that wait.

At most ``concurrency`` credential checks run at once (one per hash thread) and at most
``size`` wait.  Waiting checks start best ``priority`` first (fewest recent failures of their
client and account, see :class:`mailsrv.auth.throttle.AuthAttempt`; a name that matches no
account, which cannot succeed, ranks after every check that can: :func:`priority`), in arrival
order among equals, so a client with a clean record is not stuck behind a storm of guessers.
With two or more threads, one is kept for checks with a clean record (priority 0: no recent
failure of their client or account), so guessers never hold every thread.  When the queue
is full a new check is refused at once with :class:`~mailsrv.threads.PoolFull` (the session
answers ``454 4.7.0``), unless it ranks better than the worst waiting one, which is refused
instead.  A waiting check whose session has gone is dropped without running.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred

from mailsrv.threads import PoolFull

# Added to the rank of a check for a name that matches no account.
NO_ACCOUNT_RANK = 1_000_000


def priority(failures: int, is_account: bool) -> int:
    """The queue rank of a check: recent failures, and names with no account last."""
    return failures if is_account else failures + NO_ACCOUNT_RANK


def _always() -> bool:
    return True


@dataclass
class _Entry:
    priority: int
    seq: int
    work: Callable[[], Any]
    wanted: Callable[[], bool]
    result: Deferred[Any] = field(default_factory=Deferred)

    @property
    def rank(self) -> tuple[int, int]:
        return (self.priority, self.seq)


class HashQueue:
    """Runs credential checks ``concurrency`` at a time; see the module docstring."""

    def __init__(self, concurrency: int, size: int) -> None:
        self.concurrency = concurrency
        self.size = size
        self.running = 0
        self._running_marked = 0  # of which checks with failures on record
        self._marked_slots = concurrency - 1 if concurrency > 1 else concurrency
        self._waiting: list[_Entry] = []
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        """Checks waiting for a thread."""
        return len(self._waiting)

    def submit(
        self,
        priority: int,
        work: Callable[[], Deferred[Any]],
        wanted: Callable[[], bool] = _always,
    ) -> Deferred[Any]:
        """Run ``work()`` when a thread is free; fires with its result, or PoolFull at once.

        ``wanted`` is asked just before a waiting check starts; False drops it (the Deferred
        fails with CancelledError).
        """
        entry = _Entry(priority, next(self._seq), work, wanted)
        if self._startable(entry):  # nothing waiting could start, so nothing better waits
            self._run(entry)
            return entry.result
        if len(self._waiting) >= self.size:
            worst = max(self._waiting, key=lambda e: e.rank) if self._waiting else None
            if worst is None or entry.rank >= worst.rank:
                return fail(PoolFull("every password-hash thread is busy and the queue is full"))
            self._waiting.remove(worst)
            worst.result.errback(PoolFull("displaced from the hash queue by a better-ranked check"))
        self._waiting.append(entry)
        return entry.result

    def _startable(self, entry: _Entry) -> bool:
        if self.running >= self.concurrency:
            return False
        return entry.priority == 0 or self._running_marked < self._marked_slots

    def _run(self, entry: _Entry) -> None:
        marked = entry.priority != 0
        self.running += 1
        self._running_marked += marked
        running = maybeDeferred(entry.work)

        def done(result: object) -> object:
            self.running -= 1
            self._running_marked -= marked
            self._next()
            return result

        running.addBoth(done)
        running.chainDeferred(entry.result)

    def _next(self) -> None:
        while self._waiting:
            entry = min(self._waiting, key=lambda e: e.rank)
            if entry.wanted() and not self._startable(entry):
                return  # the best waiting cannot start yet, so neither can the rest
            self._waiting.remove(entry)
            if not entry.wanted():
                entry.result.errback(CancelledError("the session went away while waiting"))
                continue
            self._run(entry)
