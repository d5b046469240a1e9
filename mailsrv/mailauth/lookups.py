"""DNS for the verification libraries: blocking lookups in a worker thread, answered by the
reactor's resolver within the message's time budget.

pyspf and dkimpy look DNS up synchronously, in the middle of their evaluation (SPF is
iterative: each ``include:`` or ``mx`` mechanism needs the answer to the previous lookup), so
they run in a worker thread and :class:`ThreadLookups` is their DNS: each call hands the query
to the reactor thread, where the server's one twisted.names resolver (and its cache) answers,
and waits for the outcome.  Each lookup is bounded by :data:`LOOKUP_TIMEOUT` and by the
message's deadline (an IReactorTime reading, checked in the reactor thread), so a slow or
silent DNS server makes the check ``temperror`` instead of stalling the session; after the
deadline every lookup fails at once.

The worker waits with a bound of its own (unlike ``blockingCallFromThread``): at shutdown the
reactor thread joins the pool's threads, and a worker must not wait for a reactor that is
waiting for it.  :meth:`LookupGate.close` fails every lookup in flight and every later one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.names import dns, error
from twisted.python.failure import Failure

LOOKUP_TIMEOUT = 2.0
"""The longest one DNS lookup of a check may take (s); two tries of half of it."""
_WAIT_MARGIN = 5.0  # the worker's own bound beyond the deadline, should the reactor be stuck


class DNSTemporaryError(Exception):
    """A lookup gave no answer now (timeout, SERVFAIL, refused, the time budget used up)."""


def ascii_name(name: str | bytes) -> str | None:
    """``name`` as the ASCII form DNS asks for (IDNA for a U-label), no final dot; None when
    it cannot be one."""
    text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
    text = text.strip().rstrip(".")
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if not text or len(text) > 253 or any(not 0 < len(label) <= 63 for label in text.split(".")):
        return None
    return text.lower()


class LookupGate:
    """What the lookups of all checks share: the lookups in flight, and whether the server is
    stopping (then every lookup fails at once)."""

    def __init__(self) -> None:
        self.closed = threading.Event()
        self.pending: set[Deferred[Any]] = set()

    def close(self) -> None:
        """Reactor thread: fail the lookups in flight and every later one."""
        self.closed.set()
        for pending in list(self.pending):
            pending.cancel()


class ThreadLookups:
    """The DNS of one message's checks (see the module docstring).

    Built in the reactor thread; :meth:`query` is called from the one worker thread that runs
    the checks.  ``deadline`` is a reading of ``clock``.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        clock: IReactorTime,
        resolver: Any,
        deadline: float,
        gate: LookupGate,
        lookup_timeout: float = LOOKUP_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self._resolver = resolver
        self._deadline = deadline
        self._gate = gate
        self._lookup_timeout = lookup_timeout
        self._wait = max(0.0, deadline - clock.seconds()) + _WAIT_MARGIN
        self.count = 0

    def query(self, name: str | bytes, qtype: int) -> list[dns.RRHeader]:
        """Worker thread: the answer records (CNAMEs included) of ``name``; ``[]`` when the
        name or the type does not exist; DNSTemporaryError when there is no answer now."""
        ascii = ascii_name(name)
        if ascii is None:
            return []
        if self._gate.closed.is_set():
            raise DNSTemporaryError("server shutting down")
        self.count += 1
        box: queue.SimpleQueue[list[dns.RRHeader] | DNSTemporaryError] = queue.SimpleQueue()
        self._reactor.callFromThread(self._ask, ascii, qtype, box)
        try:
            outcome = box.get(timeout=self._wait)
        except queue.Empty:
            raise DNSTemporaryError("no answer in time") from None
        if isinstance(outcome, DNSTemporaryError):
            raise outcome
        return outcome

    def text(self, name: str | bytes) -> list[bytes]:
        """Worker thread: each TXT record of ``name``, its strings joined (RFC 7208 3.3)."""
        found: list[bytes] = []
        for record in self.query(name, dns.TXT):
            payload = record.payload
            if isinstance(payload, dns.Record_TXT):
                found.append(b"".join(payload.data))
        return found

    # -- in the reactor thread ------------------------------------------------------------------

    def _ask(self, name: str, qtype: int, box: queue.SimpleQueue[Any]) -> None:
        remaining = self._deadline - self._clock.seconds()
        if remaining <= 0 or self._gate.closed.is_set():
            box.put(DNSTemporaryError("time budget used up"))
            return
        timeout = min(self._lookup_timeout, remaining)
        try:
            asked: Deferred[Any] = self._resolver.query(
                dns.Query(name, qtype, dns.IN), timeout=(timeout / 2, timeout / 2)
            )
        except Exception as e:  # a resolver that raises instead of failing its Deferred
            box.put(DNSTemporaryError(f"DNS {type(e).__name__}"))
            return
        asked.addTimeout(timeout, self._clock)
        self._gate.pending.add(asked)
        asked.addBoth(self._answered, asked, box)

    def _answered(self, outcome: Any, asked: Deferred[Any], box: queue.SimpleQueue[Any]) -> None:
        self._gate.pending.discard(asked)
        if isinstance(outcome, Failure):
            box.put(_classify(outcome))
        else:
            answers: Sequence[dns.RRHeader] = outcome[0]
            box.put(list(answers))


def _classify(failure: Failure) -> list[dns.RRHeader] | DNSTemporaryError:
    # DNSServerError and the other rcode errors are DomainErrors too: test them first.
    if failure.check(error.DNSNameError):
        return []  # NXDOMAIN
    if failure.check(error.DNSServerError):
        return DNSTemporaryError("DNS server failure")
    if failure.check(error.DNSQueryRefusedError):
        return DNSTemporaryError("DNS query refused")
    if failure.check(TimeoutError, error.DNSQueryTimeoutError):
        return DNSTemporaryError("DNS timed out")
    if failure.check(CancelledError):
        return DNSTemporaryError("DNS lookup cancelled")
    if failure.check(error.DNSFormatError, error.DNSNotImplementedError, error.DNSUnknownError):
        return DNSTemporaryError(f"DNS {type(failure.value).__name__}")
    if failure.check(error.DomainError):
        return []  # a name no resolver of the chain knows
    return DNSTemporaryError(f"DNS {type(failure.value).__name__}")
