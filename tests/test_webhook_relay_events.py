"""Relay outcomes as webhook events: the scheduler (its test rig: a real on-disk queue, scripted
next hops, ``task.Clock``) with the real outcome listener writing to a real outbox.

What matters: one event per recipient and attempt, with the remote reply; written durably
*before* the queue records the attempt; and, when the server dies between the two, the attempt
made again gets the same event id."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailsrv.relay.outcomes import IOutcomeListener
from mailsrv.relay.records import QueueRecord, RecipientStatus, decode
from mailsrv.webhook.build import delivery_body
from mailsrv.webhook.entries import DeliverySource, OutboxEntry, delivery_event_id
from mailsrv.webhook.outbox_store import OutboxStore
from mailsrv.webhook.relay_events import RelayEvents
from tests.test_relay_scheduler import Rig, ok, perm, temp
from tests.webhook_rig import VALIDATOR, endpoint, run_now


@implementer(IOutcomeListener)
class Watching:
    """The real listener, noting what the queue file said when it was called."""

    def __init__(self, inner: RelayEvents, rig: Rig) -> None:
        self.inner = inner
        self.rig = rig
        self.queue_attempts_then: list[int] = []

    @property
    def listening(self) -> bool:
        return self.inner.listening

    def outcomes(
        self, record: QueueRecord, recipients: Sequence[RecipientStatus]
    ) -> Deferred[None]:
        path = self.rig.store.record_path(record.queue_id)
        stored = decode(path.read_bytes())
        self.queue_attempts_then.extend(r.attempts for r in stored.recipients)
        return self.inner.outcomes(record, recipients)


class EventRig:
    def __init__(self, tmp_path: Path, events: frozenset[str] | None = None) -> None:
        self.relay = Rig(tmp_path)
        self.outbox = OutboxStore(tmp_path / "outbox", run_now)
        self.outbox.load_now()
        kwargs = {"events": events} if events else {}
        self.endpoint = endpoint("feed", "http://127.0.0.1:9/feed", **kwargs)
        self.handed: list[OutboxEntry] = []
        self.listener = RelayEvents(
            self.outbox, [self.endpoint], self.handed.extend, self.relay.clock
        )
        self.watching = Watching(self.listener, self.relay)
        self.attach()

    def attach(self) -> None:
        self.relay.scheduler.outcome_listener = self.watching
        self.relay.scheduler.startService()
        self.relay.clock.advance(0)

    def entries(self) -> list[OutboxEntry]:
        found: list[OutboxEntry] = []
        OutboxStore(self.outbox.root, run_now).records().addCallback(found.extend)
        return sorted(found, key=lambda e: (e.created_at, e.type))


def test_the_listener_provides_its_interface(tmp_path: Path) -> None:
    assert verifyObject(IOutcomeListener, EventRig(tmp_path).listener)


def test_deferred_then_delivered_each_an_event_written_before_the_queue_changed(
    tmp_path: Path,
) -> None:
    rig = EventRig(tmp_path)
    rig.relay.peer.answer = temp
    record = rig.relay.submit("bob@example.net")
    (deferred,) = rig.entries()
    stored = rig.relay.on_disk()[record.queue_id].recipients[0]
    assert deferred.type == "message.deferred"
    assert deferred.event_id == delivery_event_id(record.queue_id, "bob@example.net", 1)
    source = deferred.source
    assert isinstance(source, DeliverySource)
    assert (source.attempts, source.reply, source.remote_mta) == (
        1,
        "451 4.3.0 try later",
        "mx.example.net",
    )
    assert source.next_attempt == stored.next_attempt, "the time the queue stored"
    rig.relay.peer.answer = ok
    assert stored.next_attempt is not None
    rig.relay.clock.advance(stored.next_attempt - rig.relay.clock.seconds())
    assert [e.type for e in rig.entries()] == ["message.deferred", "message.delivered"]
    assert rig.watching.queue_attempts_then == [0, 1], "the queue file was not yet changed"
    assert [e.key for e in rig.handed] == [e.key for e in rig.entries()]
    for entry in rig.entries():
        VALIDATOR.validate(json.loads(delivery_body(entry)))


def test_a_refusal_is_a_bounced_event_per_recipient_with_the_reply(tmp_path: Path) -> None:
    rig = EventRig(tmp_path)
    rig.relay.peer.answer = lambda a: perm(a) if a.startswith("x") else ok(a)
    record = rig.relay.submit("x@example.net", "ok@example.net")
    got = {
        (e.type, e.source.recipient) for e in rig.entries() if isinstance(e.source, DeliverySource)
    }
    assert got == {("message.bounced", "x@example.net"), ("message.delivered", "ok@example.net")}
    bounced = next(e for e in rig.entries() if e.type == "message.bounced")
    assert isinstance(bounced.source, DeliverySource)
    assert bounced.source.reply == "550 5.1.1 no such user"
    assert bounced.source.next_attempt is None
    assert rig.relay.on_disk() == {}, f"{record.queue_id} left the queue"


def test_an_endpoint_without_relay_events_gets_none(tmp_path: Path) -> None:
    rig = EventRig(tmp_path, events=frozenset({"message.received"}))
    rig.relay.submit("bob@example.net")
    assert rig.entries() == []


@pytest.mark.parametrize("answer", [temp, ok], ids=["deferred", "delivered"])
def test_a_crash_before_the_queue_records_the_attempt_gives_the_same_id(
    tmp_path: Path, answer: object
) -> None:
    rig = EventRig(tmp_path)
    rig.relay.peer.answer = answer  # type: ignore[assignment]
    message = rig.relay.message("bob@example.net")
    record = rig.relay.store.stage_blocking(message, rig.relay.root / "spool" / message.queue_id)
    assert record is not None
    path = rig.relay.store.record_path(record.queue_id)
    before = path.read_bytes()
    rig.relay.scheduler.queued([record])
    rig.relay.clock.advance(0)
    (first,) = rig.entries()

    # The process dies after the event is durable and before the queue record changes: the
    # record is as it was, the message body still there.
    path.write_bytes(before)
    rig.relay.store.body_path(record.queue_id).write_bytes(b"Subject: t\n\nhello\n")
    rig.relay.scheduler.stopService()
    rig.relay.scheduler = rig.relay.make_scheduler()
    rig.attach()
    rig.relay.clock.advance(60)
    (again,) = rig.entries()
    assert again.event_id == first.event_id, "the attempt made again has the event's id"
    assert len(rig.relay.peer.transactions) == 2
