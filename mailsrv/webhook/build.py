"""Request bodies of outbox entries: the event payload, encoded, for one endpoint.

A message event's payload is built from the entry's link of the stored message
(:func:`~mailsrv.webhook.payload.build_message_event` reads and parses it: blocking, so in the
webhook thread pool, never on the reactor); a relay outcome's from the values in the entry.
Both are built again for every attempt from what the entry holds, so every attempt, before and
after a restart, sends the same event.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import Deferred, succeed

from mailsrv.threads import RunInThread
from mailsrv.webhook.endpoints import Endpoint
from mailsrv.webhook.entries import DeliverySource, MessageSource, OutboxEntry
from mailsrv.webhook.outbox_store import Outbox
from mailsrv.webhook.payload import build_delivery_event, build_message_event, encode_event


def message_body(
    entry: OutboxEntry, include_raw: bool, max_raw_size: int, message_file: Path
) -> bytes:
    """The body of a message event (blocking and CPU-bound: reads and parses
    ``message_file``; plain picklable arguments, so it can run in a worker process)."""
    source = entry.source
    assert isinstance(source, MessageSource)
    event = build_message_event(
        source.message,
        message_file,
        dict(source.maildir),
        event_id=entry.event_id,
        event_type=entry.type,
        timestamp=entry.created_at,
        include_raw=include_raw,
        max_raw_size=max_raw_size,
    )
    return encode_event(event)


def delivery_body(entry: OutboxEntry) -> bytes:
    """The body of a relay outcome event (pure)."""
    source = entry.source
    assert isinstance(source, DeliverySource)
    event = build_delivery_event(
        entry.type,
        event_id=entry.event_id,
        timestamp=entry.created_at,
        queue_id=source.queue_id,
        mail_from=source.mail_from,
        recipient=source.recipient,
        attempts=source.attempts,
        reply=source.reply,
        remote_mta=source.remote_mta,
        next_attempt=source.next_attempt,
        envid=source.envid,
        orcpt=source.orcpt,
    )
    return encode_event(event)


class PayloadBuilder:
    """The dispatcher's :data:`~mailsrv.webhook.dispatcher.BuildBody` over ``store``:
    message events are parsed by ``run_elsewhere`` (the worker processes of
    :class:`mailsrv.processes.ProcessPoolService`, or a thread pool), relay outcomes built at
    once."""

    def __init__(self, store: Outbox, run_elsewhere: RunInThread) -> None:
        self._store = store
        self._run = run_elsewhere

    def __call__(self, entry: OutboxEntry, endpoint: Endpoint) -> Deferred[bytes]:
        if isinstance(entry.source, MessageSource):
            built: Deferred[bytes] = self._run(
                message_body,
                entry,
                endpoint.include_raw,
                endpoint.max_raw_size,
                self._store.body_path(entry.key),
            )
            return built
        return succeed(delivery_body(entry))
