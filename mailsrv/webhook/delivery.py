"""One delivery attempt of an outbox entry: its payload built, signed and POSTed, in a worker
process or on this reactor.

The dispatcher (:mod:`mailsrv.webhook.dispatcher`) decides when an entry is attempted and what
the outcome changes; a :class:`Delivery` makes the attempt and always answers with an
:class:`~mailsrv.webhook.sender.AttemptResult`, never with a failure.

* :class:`WorkerDelivery`, the server's: the whole attempt (reading and parsing the stored
  message, encoding, signing, the HTTP exchange with treq) runs in a worker process
  (:mod:`mailsrv.processes`) that runs a reactor of its own, so neither the parsing nor the
  HTTP client takes the GIL the SMTP sessions need.  The server sends the entry and the
  endpoint (a few hundred bytes) and gets the result back.  Measured in workload (g) before the
  move: the HTTP client alone was about 40% of the reactor thread's time per event.
* :class:`InProcessDelivery`: the payload built by a given runner (threads or workers) and
  POSTed from this reactor by a :class:`~mailsrv.webhook.sender.WebhookSender` (the tests'
  rig, which drives time with ``task.Clock``).

A worker that dies or does not answer within the endpoint's timeout plus a grace gives a
``RETRY`` result: the entry stays pending and is attempted again on its schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsrv.threads import RunInThread
from mailsrv.webhook.build import delivery_body, message_body
from mailsrv.webhook.endpoints import Endpoint
from mailsrv.webhook.entries import MessageSource, OutboxEntry
from mailsrv.webhook.sender import AttemptResult, Outcome, WebhookSender
from mailsrv.webhook.trust import https_policy

_log = Logger(namespace="mailsrv.webhook")

BuildBody = Callable[[OutboxEntry, Endpoint], "Deferred[bytes]"]
"""Builds the request body of an entry for its endpoint (off the reactor when it parses)."""

WORKER_GRACE = 30.0
"""How long past the endpoint's timeout the server waits for a worker's answer."""


class Delivery(Protocol):
    """What the dispatcher needs to attempt an entry."""

    def attempt(self, entry: OutboxEntry, endpoint: Endpoint) -> Deferred[AttemptResult]:
        """One attempt; always fires with a result."""

    def close(self) -> Deferred[Any]:
        """Close what the attempts kept open (connections)."""


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


class InProcessDelivery:
    """The body built by ``build``, POSTed by ``sender`` on this reactor."""

    def __init__(self, sender: WebhookSender, build: BuildBody) -> None:
        self.sender = sender
        self._build = build

    def attempt(self, entry: OutboxEntry, endpoint: Endpoint) -> Deferred[AttemptResult]:
        return Deferred.fromCoroutine(self._attempt(entry, endpoint))

    async def _attempt(self, entry: OutboxEntry, endpoint: Endpoint) -> AttemptResult:
        try:
            body = await self._build(entry, endpoint)
        except Exception:
            _log.failure(
                "webhook {event_id}: the payload could not be built", event_id=entry.event_id
            )
            return AttemptResult(Outcome.RETRY, None, 0.0, error="the payload could not be built")
        return await self.sender.attempt(endpoint, entry.event_id, body)

    def renewed(self, endpoints: Sequence[Endpoint]) -> Callable[[], None]:
        """See :meth:`WebhookSender.renewed`."""
        return self.sender.renewed(endpoints)

    def close(self) -> Deferred[Any]:
        return self.sender.close()


# -- in the worker process ---------------------------------------------------------------------

_worker_senders: dict[int, WebhookSender] = {}
"""The worker's sender, by trust generation (a reload that changed endpoints starts a new one,
so CA bundles are read again)."""


def _worker_sender(generation: int) -> WebhookSender:
    sender = _worker_senders.get(generation)
    if sender is None:
        from twisted.internet import reactor

        for old in _worker_senders.values():
            old.close()
        _worker_senders.clear()
        sender = _worker_senders[generation] = WebhookSender(reactor)
    return sender


async def attempt_in_worker(
    entry: OutboxEntry, endpoint: Endpoint, message_file: Path, generation: int
) -> AttemptResult:
    """A whole attempt, in a worker process (a job of :class:`WorkerDelivery`)."""
    try:
        if isinstance(entry.source, MessageSource):
            body = message_body(entry, endpoint.include_raw, endpoint.max_raw_size, message_file)
        else:
            body = delivery_body(entry)
    except Exception as e:
        error = _one_line(f"the payload could not be built: {type(e).__name__}: {e}")
        return AttemptResult(Outcome.RETRY, None, 0.0, error=error)
    return await _worker_sender(generation).attempt(endpoint, entry.event_id, body)


# -- in the server -----------------------------------------------------------------------------


class WorkerDelivery:
    """Attempts made whole in worker processes (see the module docstring).

    ``run_in_worker`` is :meth:`mailsrv.processes.ProcessPoolService.run`; ``message_file``
    gives the stored message of an entry (the outbox's link); time is ``clock``'s.
    """

    def __init__(
        self,
        run_in_worker: RunInThread,
        message_file: Callable[[str], Path],
        clock: IReactorTime,
        grace: float = WORKER_GRACE,
    ) -> None:
        self._run = run_in_worker
        self._message_file = message_file
        self._clock = clock
        self._grace = grace
        self._generation = 0

    def attempt(self, entry: OutboxEntry, endpoint: Endpoint) -> Deferred[AttemptResult]:
        answer: Deferred[AttemptResult] = Deferred()
        started = self._clock.seconds()

        def give_up() -> None:
            if not answer.called:
                waited = self._clock.seconds() - started
                error = "the webhook worker did not answer"
                answer.callback(AttemptResult(Outcome.RETRY, None, waited, error=error))

        timer = self._clock.callLater(endpoint.timeout + self._grace, give_up)

        def answered(result: AttemptResult | Failure) -> None:
            if timer.active():
                timer.cancel()
            if answer.called:
                return  # given up on already
            if isinstance(result, Failure):
                waited = self._clock.seconds() - started
                error = _one_line(f"the webhook worker failed: {result.getErrorMessage()}")
                result = AttemptResult(Outcome.RETRY, None, waited, error=error)
            answer.callback(result)

        job = self._run(
            attempt_in_worker,
            entry,
            endpoint,
            self._message_file(entry.key),
            self._generation,
        )
        job.addBoth(answered)
        return answer

    def renewed(self, endpoints: Sequence[Endpoint]) -> Callable[[], None]:
        """The CA bundles of ``endpoints`` read now (blocking; raises
        :class:`~mailsrv.webhook.trust.TrustError`, which refuses a reload); what it returns
        makes the workers read them again for the next attempts."""
        for endpoint in endpoints:
            https_policy(endpoint.ca_file)

        def install() -> None:
            self._generation += 1

        return install

    def close(self) -> Deferred[Any]:
        return succeed(None)  # the workers' connections close with the workers
