"""Delivery status notifications for finished messages, submitted through the commit path.

When every recipient of a queued message is sent or bounced, the scheduler calls
:class:`DsnSubmitter`.  It reports, in one RFC 3464 message (:func:`mailsrv.relay.dsn.compose`,
run in a thread: it reads the original), every bounced recipient that wants failure notices
(the default) and every sent one that asked for ``NOTIFY=SUCCESS`` (``Action: relayed``: the
next hop took it, and did not offer DSN; one that did got the request and reports itself).
The scheduler also calls it for deferred recipients it warns about (``Action: delayed``,
with ``Will-Retry-Until``), and :class:`~mailsrv.relay.local_success.LocalSuccessSink` calls
:meth:`DsnSubmitter.delivered` for local recipients that asked for ``NOTIFY=SUCCESS``
(``Action: delivered``).  The original's whole content is returned (``RET=FULL``) only in a
report of failures (RFC 3461 section 4.3); other reports carry its headers.

A DSN goes from ``<>`` to the original sender like any accepted message: through the
committer, to the sender's Maildir when the sender is local, else into the relay queue; never
a DSN about a message from ``<>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailsrv.delivery.envelope import (
    AcceptedMessage,
    ClientFacts,
    LocalRoute,
    Notify,
    Recipient,
    RemoteRoute,
    Ret,
)
from mailsrv.relay import dsn
from mailsrv.relay.body import wire_size
from mailsrv.relay.records import QueueRecord, RecipientStatus, State
from mailsrv.smtp import replies
from mailsrv.smtp.address import AddressError, parse_addr_spec
from mailsrv.smtp.policy import remote_domain

_log = Logger(namespace="mailsrv.relay")

DSN_LISTENER = "dsn"
"""The ``listener`` in the client facts of a DSN: mailsrv itself sent it."""


def outcomes_to_report(
    recipients: Sequence[RecipientStatus], retry_until: float | None = None
) -> list[dsn.RecipientOutcome]:
    """The recipients a DSN reports: failures (unless NOTIFY said otherwise), asked successes
    the next hop did not take over, and the unfinished ones marked ``delay_warned`` (the
    scheduler passes only those it warns now), which will be retried until ``retry_until``."""
    outcomes = []
    for recipient in recipients:
        until = None
        if recipient.state is State.BOUNCED and recipient.dsn.wants(Notify.FAILURE):
            action = dsn.FAILED
        elif (
            recipient.state is State.SENT
            and recipient.dsn.wants(Notify.SUCCESS)
            and not recipient.dsn_passed_on
        ):
            action = dsn.RELAYED
        elif not recipient.state.final and recipient.delay_warned:
            action, until = dsn.DELAYED, retry_until
        else:
            continue
        reply = recipient.last_reply or ""
        code, _, rest = reply.partition(" ")
        enhanced = rest.partition(" ")[0]
        if not (enhanced[:1].isdigit() and enhanced.count(".") == 2):
            enhanced = f"{code[:1] or '5'}.0.0"
        orcpt = recipient.dsn.orcpt
        outcomes.append(
            dsn.RecipientOutcome(
                recipient=recipient.address,
                action=action,
                status=enhanced,
                diagnostic=reply,
                remote_mta=recipient.remote_mta or "",
                last_attempt=recipient.last_attempt,
                orcpt=f"{orcpt[0]};{orcpt[1]}" if orcpt else None,
                will_retry_until=until,
            )
        )
    return outcomes


def delivered_locally(message: AcceptedMessage) -> list[dsn.RecipientOutcome]:
    """The local recipients of ``message`` that asked for ``NOTIFY=SUCCESS``, as delivered
    (``expanded`` for an alias of several mailboxes, RFC 3464 section 2.3.3)."""
    outcomes = []
    for recipient in message.recipients:
        route = recipient.route
        if not isinstance(route, LocalRoute) or not recipient.dsn.wants(Notify.SUCCESS):
            continue
        orcpt = recipient.dsn.orcpt
        outcomes.append(
            dsn.RecipientOutcome(
                recipient=recipient.address,
                action=dsn.EXPANDED if len(route.mailboxes) > 1 else dsn.DELIVERED,
                status="2.0.0",
                last_attempt=message.received_at,
                orcpt=f"{orcpt[0]};{orcpt[1]}" if orcpt else None,
            )
        )
    return outcomes


class DsnSubmitter:
    """Composes and submits the DSN of a finished message (see the module docstring).

    ``server`` is the :class:`~mailsrv.smtp.server.SMTPServer`: its spool, committer, policy
    and queue ids are what an SMTP session would use for the same message.  ``lifetime`` is
    the queue lifetime, for the ``Will-Retry-Until`` of delay warnings.
    """

    def __init__(
        self,
        server: Any,
        body_path: Any,
        run_in_thread: Any,
        max_full_size: int,
        lifetime: float | None = None,
    ) -> None:
        self._server = server
        self._body_path = body_path
        self._run = run_in_thread
        self._max_full_size = max_full_size
        self._lifetime = lifetime

    def reconfigure(self, max_full_size: int, lifetime: float | None) -> None:
        """A reload: DSNs composed from now on use these limits."""
        self._max_full_size = max_full_size
        self._lifetime = lifetime

    def __call__(
        self, record: QueueRecord, recipients: Sequence[RecipientStatus]
    ) -> Deferred[None]:
        """Report ``recipients`` of the queued ``record`` (see :func:`outcomes_to_report`)."""
        until = record.created_at + self._lifetime if self._lifetime is not None else None
        outcomes = outcomes_to_report(recipients, until)
        return Deferred.fromCoroutine(
            self._submit(
                Path(self._body_path(record.queue_id)),
                record.sender,
                outcomes,
                record.created_at,
                record.envid,
                record.ret,
                record.queue_id,
            )
        )

    def delivered(self, message: AcceptedMessage, original: bytes) -> Deferred[None]:
        """Report the local recipients of the just committed ``message`` that asked for
        ``NOTIFY=SUCCESS``; ``original`` is its header section (or more)."""
        return Deferred.fromCoroutine(
            self._submit(
                original,
                message.sender,
                delivered_locally(message),
                message.received_at,
                message.envid,
                message.ret,
                message.queue_id,
            )
        )

    async def _submit(
        self,
        original: Path | bytes,
        sender: str,
        outcomes: Sequence[dsn.RecipientOutcome],
        arrival: float,
        envid: str | None,
        ret: Ret | None,
        about: str,
    ) -> None:
        if not sender or not outcomes:
            return
        if ret is not None and not any(o.action == dsn.FAILED for o in outcomes):
            ret = None  # RET asks for the content of failure reports only
        server = self._server
        now = server.clock.seconds()
        body: bytes | None = await self._run(
            dsn.compose,
            original,
            sender,
            outcomes,
            server.hostname,
            now,
            arrival,
            envid,
            ret.value if ret is not None else None,
            self._max_full_size,
            about,
        )
        if body is None:
            return
        route = await self._route(sender)
        if route is None:
            _log.warn(
                "DSN for {queue_id} dropped: the sender <{sender}> cannot receive mail",
                queue_id=about,
                sender=sender,
            )
            return
        queue_id = server.new_queue_id()
        message = AcceptedMessage(
            queue_id=queue_id,
            sender="",
            recipients=(Recipient(sender, route),),
            client=ClientFacts(ip="127.0.0.1", helo=server.hostname, listener=DSN_LISTENER),
            received_at=now,
            size=len(body),
            smtputf8=not sender.isascii(),
            wire_size=wire_size(body),
        )
        spool_file = server.spool.open(queue_id, _nothing, _nothing)
        spool_file.write(body)
        try:
            await server.commit(message, spool_file)
        except Exception:
            spool_file.discard()
            raise
        _log.info(
            "DSN {dsn_id} for {queue_id} to <{sender}>: {count} recipient(s) {actions}",
            dsn_id=queue_id,
            queue_id=about,
            sender=sender,
            count=len(outcomes),
            actions=sorted({o.action for o in outcomes}),
        )

    async def _route(self, sender: str) -> LocalRoute | RemoteRoute | None:
        try:
            address = parse_addr_spec(sender)
        except AddressError:
            return None
        decision = await _maybe_deferred(self._server.policy.resolve(address))
        if decision.accepted:
            return LocalRoute(decision.mailboxes)
        if decision.reply is replies.RELAY_DENIED:
            domain = remote_domain(address)
            return RemoteRoute(domain) if domain is not None else None
        return None


async def _maybe_deferred(value: Any) -> Any:
    if isinstance(value, Deferred):
        return await value
    return value


def _nothing() -> None:
    """The spool's pause/resume hooks: a DSN has no client to pause."""
