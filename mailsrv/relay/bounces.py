"""Delivery status notifications for finished messages, submitted through the commit path.

When every recipient of a queued message is sent or bounced, the scheduler calls
:class:`DsnSubmitter`.  It reports, in one RFC 3464 message (:func:`mailsrv.relay.dsn.compose`,
run in a thread: it reads the original), every bounced recipient that wants failure notices
(the default) and every sent one that asked for ``NOTIFY=SUCCESS`` (``Action: relayed``: the
next hop took it).  The DSN goes from ``<>`` to the original sender like any accepted
message: through the committer, to the sender's Maildir when the sender is local, else into
the relay queue; never a DSN about a message from ``<>``.
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
)
from mailsrv.relay import dsn
from mailsrv.relay.records import QueueRecord, RecipientStatus, State
from mailsrv.smtp import replies
from mailsrv.smtp.address import AddressError, parse_addr_spec
from mailsrv.smtp.policy import remote_domain

_log = Logger(namespace="mailsrv.relay")


def outcomes_to_report(recipients: Sequence[RecipientStatus]) -> list[dsn.RecipientOutcome]:
    """The recipients a DSN reports: failures (unless NOTIFY said otherwise), asked successes."""
    outcomes = []
    for recipient in recipients:
        if recipient.state is State.BOUNCED and recipient.dsn.wants(Notify.FAILURE):
            action = dsn.FAILED
        elif recipient.state is State.SENT and recipient.dsn.wants(Notify.SUCCESS):
            action = dsn.RELAYED
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
            )
        )
    return outcomes


class DsnSubmitter:
    """Composes and submits the DSN of a finished message (see the module docstring).

    ``server`` is the :class:`~mailsrv.smtp.server.SMTPServer`: its spool, committer, policy
    and queue ids are what an SMTP session would use for the same message.
    """

    def __init__(self, server: Any, body_path: Any, run_in_thread: Any, max_full_size: int) -> None:
        self._server = server
        self._body_path = body_path
        self._run = run_in_thread
        self._max_full_size = max_full_size

    def __call__(
        self, record: QueueRecord, recipients: Sequence[RecipientStatus]
    ) -> Deferred[None]:
        return Deferred.fromCoroutine(self._submit(record, recipients))

    async def _submit(self, record: QueueRecord, recipients: Sequence[RecipientStatus]) -> None:
        outcomes = outcomes_to_report(recipients)
        if not record.sender or not outcomes:
            return
        server = self._server
        now = server.clock.seconds()
        body: bytes | None = await self._run(
            dsn.compose,
            Path(self._body_path(record.queue_id)),
            record.sender,
            outcomes,
            server.hostname,
            now,
            record.created_at,
            record.envid,
            record.ret.value if record.ret is not None else None,
            self._max_full_size,
            record.queue_id,
        )
        if body is None:
            return
        route = await self._route(record.sender)
        if route is None:
            _log.warn(
                "DSN for {queue_id} dropped: the sender <{sender}> cannot receive mail",
                queue_id=record.queue_id,
                sender=record.sender,
            )
            return
        queue_id = server.new_queue_id()
        message = AcceptedMessage(
            queue_id=queue_id,
            sender="",
            recipients=(Recipient(record.sender, route),),
            client=ClientFacts(ip="127.0.0.1", helo=server.hostname, listener="dsn"),
            received_at=now,
            size=len(body),
            smtputf8=not record.sender.isascii(),
        )
        spool_file = server.spool.open(queue_id, _nothing, _nothing)
        spool_file.write(body)
        try:
            await server.commit(message, spool_file)
        except Exception:
            spool_file.discard()
            raise
        _log.info(
            "DSN {dsn_id} for {queue_id} to <{sender}>: {count} recipient(s)",
            dsn_id=queue_id,
            queue_id=record.queue_id,
            sender=record.sender,
            count=len(outcomes),
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
