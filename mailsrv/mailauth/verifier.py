"""Runs the checks of a message off the reactor, within a time budget, and always answers.

:meth:`Verifier.verify` hands :func:`~mailsrv.mailauth.checks.run_checks` to the verifier's own
thread pool (not the I/O threads: a check waiting on a slow DNS server must not hold up the
spool writes of other sessions) and fires with a :class:`~mailsrv.mailauth.verdict.Verdict`
no later than ``budget`` seconds after it was called: when the checks have not finished by
then (slow DNS, a busy pool, a large message), the verdict has what was finished and
``temperror`` for the rest; the worker's lookups fail from then on, so it ends soon after.
A full pool (more messages waiting than :data:`MAX_WAITING`) gives ``temperror`` at once.
Nothing here fails the Deferred: trouble in a check is a ``temperror`` and a log line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsrv.mailauth import spf_check
from mailsrv.mailauth.checks import Facts, Progress, run_checks, unfinished
from mailsrv.mailauth.dmarc_check import OrgDomains
from mailsrv.mailauth.lookups import LookupGate, ThreadLookups
from mailsrv.mailauth.verdict import SPFResult, Verdict
from mailsrv.threads import PoolFull, ThreadPoolService

_log = Logger(namespace="mailsrv.mailauth")
T = TypeVar("T")

MAX_WAITING = 64
"""Messages waiting for a check thread, beyond those being checked, before new ones get
``temperror`` at once."""


class Verifier(Service):
    """The checks' thread pool and DNS; see the module docstring.

    ``reactor`` provides the thread hand-off and, unless ``clock`` is given, the time;
    ``resolver`` is the server's (:class:`mailsrv.dns.ServerResolver`).
    """

    def __init__(
        self,
        reactor: Any,
        resolver: Any,
        threads: int = 4,
        orgs: OrgDomains | None = None,
        clock: IReactorTime | None = None,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self._reactor: IReactorFromThreads = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._resolver = resolver
        self._pool = ThreadPoolService(
            reactor, "mailsrv-mailauth", threads, max_pending=threads + max_waiting
        )
        self._gate = LookupGate()
        self.orgs = orgs if orgs is not None else OrgDomains()
        self.setName("mailauth")

    def startService(self) -> None:
        super().startService()
        self._gate = LookupGate()
        self._pool.startService()

    def stopService(self) -> None:
        super().stopService()
        self._gate.close()  # workers stop waiting on DNS, so joining them cannot hang
        self._pool.stopService()

    def spf_mailfrom(
        self, ip: str, sender: str, helo: str, receiver: str, budget: float
    ) -> Deferred[SPFResult]:
        """SPF of ``sender`` (not null) alone, within ``budget``: ``temperror`` when it took
        longer, the pool is full or the check failed.  Never fails."""
        domain = sender.rpartition("@")[2].lower()

        def failed(failure: Failure) -> SPFResult:
            if not failure.check(PoolFull):
                _log.failure("SPF check failed for {client_ip}", failure, client_ip=ip)
            return SPFResult("temperror", domain, "checks busy or failed")

        return self._within(
            budget,
            lambda lookups: spf_check.check_mailfrom(lookups, ip, sender, helo, receiver),
            lambda: SPFResult("temperror", domain, "time budget used up"),
            failed,
        )

    def verify(self, facts: Facts, message: bytes, budget: float) -> Deferred[Verdict]:
        """The verdict on ``message`` (content as received, LF line ends) within ``budget``."""
        progress = Progress()

        def failed(failure: Failure) -> Verdict:
            if failure.check(PoolFull):
                return unfinished(progress, "checks busy")
            _log.failure(
                "checks failed for a message from {client_ip}", failure, client_ip=facts.ip
            )
            return unfinished(progress, "internal error")

        return self._within(
            budget,
            lambda lookups: run_checks(facts, message, lookups, progress, self.orgs),
            lambda: unfinished(progress, "time budget used up"),
            failed,
        )

    def _within(
        self,
        budget: float,
        check: Callable[[ThreadLookups], T],
        late: Callable[[], T],
        failed: Callable[[Failure], T],
    ) -> Deferred[T]:
        """Run ``check(lookups)`` in the pool, its DNS lookups bounded by ``budget``; fires with
        its result, ``late()`` once the budget is used up, or ``failed(failure)``: never
        fails, never later than ``budget``."""
        lookups = ThreadLookups(
            self._reactor, self._clock, self._resolver, self._clock.seconds() + budget, self._gate
        )
        answer: Deferred[T] = Deferred()

        def finish(result: T) -> None:
            if timer.active():
                timer.cancel()
            if not answer.called:
                answer.callback(result)

        timer = self._clock.callLater(budget, lambda: finish(late()))
        job = self._pool.run(check, lookups)
        job.addCallbacks(finish, lambda failure: finish(failed(failure)))
        return answer
