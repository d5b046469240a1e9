"""Relay outcomes as webhook events: ``message.delivered``, ``.deferred`` and ``.bounced``.

:class:`RelayEvents` is the relay scheduler's outcome listener
(:class:`~mailsrv.relay.outcomes.IOutcomeListener`).  For every recipient whose attempt ended
it writes one entry per subscribed endpoint, durably (one group-committed batch for all of
them), and only then lets the scheduler store the queue record.  The event id is derived from
the queue id, the recipient and the attempt number
(:func:`~mailsrv.webhook.entries.delivery_event_id`): if the server dies before the queue
records the attempt, the attempt is made again and its event is written again under the same
id, so receivers see the same ``webhook-id`` (at least once, with a stable id).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailsrv.relay.outcomes import IOutcomeListener
from mailsrv.relay.records import QueueRecord, RecipientStatus, State
from mailsrv.webhook.endpoints import (
    MESSAGE_BOUNCED,
    MESSAGE_DEFERRED,
    MESSAGE_DELIVERED,
    Endpoint,
)
from mailsrv.webhook.entries import (
    DeliverySource,
    OutboxEntry,
    delivery_event_id,
    new_entries,
)
from mailsrv.webhook.outbox_store import Outbox

_log = Logger(namespace="mailsrv.webhook")

_EVENT_TYPES = {
    State.SENT: MESSAGE_DELIVERED,
    State.BOUNCED: MESSAGE_BOUNCED,
    State.DEFERRED: MESSAGE_DEFERRED,
    State.HELD: MESSAGE_DEFERRED,  # held by an operator while the attempt was in flight
}
_RELAY_EVENT_TYPES = frozenset(_EVENT_TYPES.values())


@implementer(IOutcomeListener)
class RelayEvents:
    """Writes relay outcome events to ``store``; hands them to ``added`` once durable."""

    def __init__(
        self,
        store: Outbox,
        endpoints: Sequence[Endpoint],
        added: Callable[[list[OutboxEntry]], None],
        clock: IReactorTime,
    ) -> None:
        self._store = store
        self._endpoints = tuple(endpoints)
        self._added = added
        self._clock = clock

    @property
    def listening(self) -> bool:
        """True when an endpoint wants relay outcomes (otherwise the scheduler need not ask)."""
        return any(endpoint.events & _RELAY_EVENT_TYPES for endpoint in self._endpoints)

    def reconfigure(self, endpoints: Sequence[Endpoint]) -> None:
        """A reload: outcomes from now on are written for ``endpoints``."""
        self._endpoints = tuple(endpoints)

    def entries_for(
        self, record: QueueRecord, recipients: Sequence[RecipientStatus]
    ) -> list[OutboxEntry]:
        """The new entries for the outcomes of ``recipients`` of ``record``."""
        entries = []
        for status in recipients:
            event_type = _EVENT_TYPES.get(status.state)
            wanting = [e for e in self._endpoints if event_type and e.wants(event_type)]
            if event_type is None or not wanting or not status.attempts:
                continue
            happened = status.last_attempt or self._clock.seconds()
            source = DeliverySource(
                queue_id=record.queue_id,
                mail_from=record.sender,
                recipient=status.address,
                attempts=status.attempts,
                reply=status.last_reply,
                remote_mta=status.remote_mta,
                next_attempt=status.next_attempt if event_type == MESSAGE_DEFERRED else None,
                envid=record.envid,
                orcpt=status.dsn.orcpt,
            )
            event_id = delivery_event_id(record.queue_id, status.address, status.attempts)
            entries += new_entries(event_id, event_type, happened, source, wanting)
        return entries

    def outcomes(
        self, record: QueueRecord, recipients: Sequence[RecipientStatus]
    ) -> Deferred[None]:
        entries = self.entries_for(record, recipients)
        if not entries:
            return succeed(None)
        puts: list[Deferred[Any]] = [self._store.put(entry) for entry in entries]
        written = DeferredList(puts, consumeErrors=True)

        def stored(results: list[tuple[bool, Any]]) -> None:
            ok = [entry for entry, (success, _) in zip(entries, results, strict=True) if success]
            for entry, (success, failure) in zip(entries, results, strict=True):
                if not success:
                    _log.failure(
                        "webhook {event_id}: the {type} event of {queue_id} was not stored",
                        failure,
                        event_id=entry.event_id,
                        type=entry.type,
                        queue_id=record.queue_id,
                    )
            if ok:
                try:
                    self._added(ok)
                except Exception:  # never fail the scheduler: the queue must record the attempt
                    _log.failure("webhook relay events could not be scheduled")

        return written.addCallback(stored)
