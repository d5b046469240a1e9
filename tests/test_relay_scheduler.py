"""The relay scheduler against a real on-disk queue, driven by ``task.Clock``.

The next hop and the connections are scripted stand-ins here (the real client, resolver and
SMTP peers have their own tests, and the process tests run the whole path over sockets): what
is tested is the schedule — which recipient is tried when, over which connection, and what is
durable afterwards.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.logger import capturedLogs, formatEvent
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailsrv.delivery.envelope import (
    AcceptedMessage,
    ClientFacts,
    DsnRequest,
    Notify,
    Recipient,
    RemoteRoute,
)
from mailsrv.ops.metrics import Metrics
from mailsrv.relay.message import OutboundMessage, RecipientResult
from mailsrv.relay.queue_store import FileQueueStore
from mailsrv.relay.records import QueueRecord, RecipientStatus, State
from mailsrv.relay.resolver import Candidate, NextHopError, Route
from mailsrv.relay.retry import RetryPolicy
from mailsrv.relay.scheduler import (
    DELAY_WARNING_ASKED,
    IRelayConnection,
    IRelayConnector,
    RelayScheduler,
    SchedulerSettings,
)
from mailsrv.smtp.replies import Reply

Answer = Callable[[str], tuple[int, str, str]]


def ok(_: str) -> tuple[int, str, str]:
    return 250, "2.0.0", "queued"


def temp(_: str) -> tuple[int, str, str]:
    return 451, "4.3.0", "try later"


def perm(_: str) -> tuple[int, str, str]:
    return 550, "5.1.1", "no such user"


def run_now(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
    return succeed(function(*args, **kwargs))


@implementer(IRelayConnection)
class ScriptedConnection:
    def __init__(self, peer: ScriptedPeer, route: Route) -> None:
        self.peer = peer
        self.route = route
        self.reusable = True
        self.remote_mta = route.mx_hosts[0]
        self.remote_address = "192.0.2.1"
        self.closed = False

    def send(self, message: OutboundMessage) -> Deferred[list[RecipientResult]]:
        self.peer.transactions.append((self, message))
        if self.peer.hold_sends:
            waiting: Deferred[list[RecipientResult]] = Deferred()
            self.peer.held.append((waiting, message))
            return waiting
        return succeed(self.peer.results(message))

    def close(self) -> Deferred[None]:
        self.closed = True
        self.peer.open -= 1
        return succeed(None)


@implementer(IRelayConnector)
class ScriptedPeer:
    """Every destination at once: answers per recipient from ``answer``; can refuse connects."""

    def __init__(self) -> None:
        self.answer: Answer = ok
        self.refuse: NextHopError | None = None
        self.connects: list[Route] = []
        self.transactions: list[tuple[ScriptedConnection, OutboundMessage]] = []
        self.open = 0
        self.max_open = 0
        self.hold_sends = False
        self.held: list[tuple[Deferred[list[RecipientResult]], OutboundMessage]] = []
        self.hold_connects = False
        self.connecting: list[tuple[Deferred[IRelayConnection], Route]] = []
        self.connection_class: type[ScriptedConnection] = ScriptedConnection
        self.offers_dsn = False

    def results(self, message: OutboundMessage) -> list[RecipientResult]:
        out = []
        for recipient in message.recipients:
            code, enhanced, text = self.answer(recipient.address)
            out.append(
                RecipientResult(
                    recipient.address,
                    code,
                    enhanced,
                    text,
                    code >= 500,
                    "mx.example.net",
                    "192.0.2.1",
                    dsn_passed_on=self.offers_dsn,
                )
            )
        return out

    def release_all(self) -> None:
        held, self.held = self.held, []
        for waiting, message in held:
            waiting.callback(self.results(message))

    def connect(self, route: Route) -> Deferred[IRelayConnection]:
        self.connects.append(route)
        if self.refuse is not None:
            failed: Deferred[IRelayConnection] = Deferred()
            failed.errback(self.refuse)
            return failed
        if self.hold_connects:
            waiting: Deferred[IRelayConnection] = Deferred()
            self.connecting.append((waiting, route))
            return waiting
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        return succeed(self.connection_class(self, route))

    def finish_connects(self) -> None:
        pending, self.connecting = self.connecting, []
        for waiting, route in pending:
            self.open += 1
            self.max_open = max(self.max_open, self.open)
            waiting.callback(self.connection_class(self, route))


class StaticNextHop:
    """Routes by a table: domain -> destination key (several domains may share one)."""

    def __init__(self) -> None:
        self.table: dict[str, str] = {}
        self.errors: dict[str, NextHopError] = {}

    async def route(self, domain: str) -> Route:
        if domain in self.errors:
            raise self.errors[domain]
        key = self.table.get(domain, f"mx:mx.{domain}")
        host = key.partition(":")[2]
        return Route(key, (host,), (Candidate(host, "192.0.2.1", 25),))


class Rig:
    def __init__(self, root: Path, settings: SchedulerSettings | None = None) -> None:
        self.root = root
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.store = FileQueueStore(root / "queue", run_now)
        self.peer = ScriptedPeer()
        self.hop = StaticNextHop()
        self.dsns: list[tuple[QueueRecord, Sequence[RecipientStatus]]] = []
        self.disk_at_dsn: list[dict[str, QueueRecord]] = []  # the queue as each DSN was asked
        self.policy = RetryPolicy()
        self.settings = settings or SchedulerSettings()
        self.metrics = Metrics()
        self.scheduler = self.make_scheduler()
        self.counter = 0

    def make_scheduler(self) -> RelayScheduler:
        def submit(record: QueueRecord, recipients: Sequence[RecipientStatus]) -> Deferred[None]:
            self.dsns.append((record, recipients))
            self.disk_at_dsn.append(self.on_disk())
            return succeed(None)

        return RelayScheduler(
            self.store,
            self.hop,
            self.peer,
            self.policy,
            self.clock,
            random.Random(7),
            submit,
            self.settings,
            metrics=self.metrics,
        )

    def message(
        self,
        *recipients: str,
        sender: str = "alice@example.org",
        notify: frozenset[Notify] = frozenset(),
        wire_size: int | None = None,
    ) -> AcceptedMessage:
        self.counter += 1
        queue_id = f"Q{self.counter:04d}"
        spool = self.root / "spool"
        spool.mkdir(exist_ok=True)
        body = spool / queue_id
        body.write_bytes(b"Return-Path: <a@example.org>\nSubject: t\n\nhello\n")
        return AcceptedMessage(
            queue_id=queue_id,
            sender=sender,
            recipients=tuple(
                Recipient(r, RemoteRoute(r.rpartition("@")[2]), DsnRequest(notify))
                for r in recipients
            ),
            client=ClientFacts("192.0.2.9", "client.example", "submission", login="alice"),
            received_at=self.clock.seconds(),
            size=body.stat().st_size,
            wire_size=wire_size,
        )

    def submit(self, *recipients: str, **kw: Any) -> QueueRecord:
        message = self.message(*recipients, **kw)
        record = self.store.stage_blocking(message, self.root / "spool" / message.queue_id)
        assert record is not None
        self.scheduler.queued([record])
        self.clock.advance(0)
        return record

    def on_disk(self) -> dict[str, QueueRecord]:
        fresh = FileQueueStore(self.root / "queue", run_now)
        records: list[QueueRecord] = []
        fresh.records().addCallback(records.extend)
        return {r.queue_id: r for r in records}


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    r = Rig(tmp_path)
    r.scheduler.startService()
    r.clock.advance(0)
    return r


def test_interfaces(rig: Rig) -> None:
    assert verifyObject(IRelayConnector, rig.peer)
    connection = ScriptedConnection(rig.peer, Route("mx:a", ("a",), ()))
    assert verifyObject(IRelayConnection, connection)


def test_delivered_message_leaves_the_queue(rig: Rig) -> None:
    record = rig.submit("bob@example.net")
    assert len(rig.peer.transactions) == 1
    assert rig.peer.transactions[0][1].recipients[0].address == "bob@example.net"
    assert rig.on_disk() == {}
    assert not rig.store.body_path(record.queue_id).exists()
    # Nothing owed (no NOTIFY=SUCCESS): its removal is the one durable write of its "sent".
    assert rig.dsns == []
    assert rig.store.writes == 1


def test_success_dsn_is_submitted_before_the_message_leaves(rig: Rig) -> None:
    message = rig.message("bob@example.net", "carol@example.net")
    asked = DsnRequest(frozenset({Notify.SUCCESS}))
    message = AcceptedMessage(
        **{
            **message.__dict__,
            "recipients": (
                Recipient("bob@example.net", RemoteRoute("example.net"), asked),
                Recipient("carol@example.net", RemoteRoute("example.net"), DsnRequest()),
            ),
        }
    )
    record = rig.store.stage_blocking(message, rig.root / "spool" / message.queue_id)
    assert record is not None
    rig.scheduler.queued([record])
    rig.clock.advance(0)
    assert rig.on_disk() == {}
    [(reported, recipients)] = rig.dsns
    assert reported.queue_id == record.queue_id
    assert [(r.address, r.state) for r in recipients] == [
        ("bob@example.net", State.SENT),
        ("carol@example.net", State.SENT),
    ]
    assert rig.store.writes == 2  # "sent" first, then the removal after the DSN


def test_temporary_failure_defers_with_backoff_then_delivers(rig: Rig) -> None:
    rig.peer.answer = temp
    record = rig.submit("bob@example.net")
    stored = rig.on_disk()[record.queue_id].recipients[0]
    assert stored.state is State.DEFERRED and stored.attempts == 1
    assert stored.last_reply == "451 4.3.0 try later"
    now = rig.clock.seconds()
    assert stored.next_attempt is not None
    assert now + 300 * 0.75 <= stored.next_attempt <= now + 300 * 1.25
    rig.peer.answer = ok
    rig.clock.advance(stored.next_attempt - now - 1)
    assert len(rig.peer.transactions) == 1
    rig.clock.advance(1)
    assert len(rig.peer.transactions) == 2
    assert rig.on_disk() == {}


def test_permanent_failure_bounces_at_once_with_one_dsn(rig: Rig) -> None:
    rig.peer.answer = lambda a: perm(a) if a.startswith("x") else ok(a)
    rig.submit("x1@example.net", "ok@example.net", "x2@example.net")
    assert len(rig.peer.transactions) == 1
    assert rig.on_disk() == {}
    assert len(rig.dsns) == 1
    states = {r.address: r.state for r in rig.dsns[0][1]}
    assert states == {
        "x1@example.net": State.BOUNCED,
        "ok@example.net": State.SENT,
        "x2@example.net": State.BOUNCED,
    }


def test_null_sender_gets_no_dsn(rig: Rig) -> None:
    rig.peer.answer = perm
    rig.submit("x@example.net", sender="")
    assert rig.dsns == []
    assert rig.on_disk() == {}


def test_permanent_route_error_bounces_without_connecting(rig: Rig) -> None:
    rig.hop.errors["nomail.example"] = NextHopError(Reply(556, "5.1.10", "null MX"))
    rig.submit("bob@nomail.example")
    assert rig.peer.connects == []
    recipients = rig.dsns[0][1]
    assert recipients[0].state is State.BOUNCED
    assert recipients[0].last_reply == "556 5.1.10 null MX"


def test_unreachable_destination_is_suspended(rig: Rig) -> None:
    rig.peer.refuse = NextHopError(Reply(421, "4.4.1", "connection refused"))
    first = rig.submit("a@down.example")
    assert len(rig.peer.connects) == 1
    second = rig.submit("b@down.example")
    assert len(rig.peer.connects) == 1, "a suspended destination is not tried again at once"
    disk = rig.on_disk()
    for record in (first, second):
        status = disk[record.queue_id].recipients[0]
        assert status.state is State.DEFERRED
        assert status.last_reply == "421 4.4.1 connection refused"


def test_expired_message_bounces(rig: Rig) -> None:
    rig.peer.answer = temp
    record = rig.submit("bob@example.net")
    for _ in range(200):
        if record.queue_id not in rig.on_disk():
            break
        rig.clock.advance(4000 * 1.25)
    assert record.queue_id not in rig.on_disk()
    status = rig.dsns[0][1][0]
    assert status.state is State.BOUNCED
    assert "queue lifetime" in (status.last_reply or "")
    assert rig.clock.seconds() - record.created_at >= rig.policy.lifetime


def test_connection_is_reused_for_a_backlog(rig: Rig) -> None:
    rig.peer.hold_sends = True
    rig.submit("a@example.net")
    rig.submit("b@example.net")
    rig.submit("c@example.net")
    assert len(rig.peer.connects) == 3  # three concurrent transactions, up to the limit
    rig.peer.release_all()
    rig.clock.advance(0)
    rig.peer.hold_sends = False
    for n in range(5):
        rig.submit(f"later{n}@example.net")
    assert len(rig.peer.connects) == 3, "idle connections carry the new messages"
    assert len(rig.peer.transactions) == 8
    rig.clock.advance(rig.settings.idle_timeout + 0.1)
    assert rig.peer.open == 0


def test_per_destination_and_total_limits(tmp_path: Path) -> None:
    rig = Rig(tmp_path, SchedulerSettings(per_destination=2, total=3))
    rig.scheduler.startService()
    rig.peer.hold_sends = True
    for n in range(5):
        rig.submit(f"r{n}@one.example")
    assert rig.peer.max_open == 2
    for n in range(5):
        rig.submit(f"r{n}@two.example")
    assert rig.peer.max_open == 3
    while rig.peer.held:
        rig.peer.release_all()
        rig.clock.advance(0)
    assert rig.peer.max_open == 3
    assert rig.on_disk() == {}


def test_recipients_are_chunked_per_transaction(tmp_path: Path) -> None:
    rig = Rig(tmp_path, SchedulerSettings(max_recipients=50, per_destination=1))
    rig.scheduler.startService()
    rig.submit(*(f"r{n}@example.net" for n in range(120)))
    sizes = [len(m.recipients) for _, m in rig.peer.transactions]
    assert sizes == [50, 50, 20]
    assert len(rig.peer.connects) == 1


def test_domains_with_the_same_mx_share_connections(rig: Rig) -> None:
    rig.hop.table = {"a.example": "mx:mx.shared", "b.example": "mx:mx.shared"}
    rig.peer.hold_sends = True
    rig.submit("x@a.example")
    rig.peer.release_all()
    rig.clock.advance(0)
    rig.submit("y@b.example")
    rig.peer.release_all()
    rig.clock.advance(0)
    assert len(rig.peer.connects) == 1


def test_flush_retries_deferred_now(rig: Rig) -> None:
    rig.peer.answer = temp
    record = rig.submit("bob@example.net")
    rig.peer.answer = ok
    assert rig.scheduler.flush(record.queue_id) == 1
    rig.clock.advance(0)
    assert len(rig.peer.transactions) == 2
    assert rig.on_disk() == {}


def test_restart_spreads_due_recipients(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    (tmp_path / "queue").mkdir()
    for n in range(40):
        message = rig.message(f"r{n}@d{n}.example")
        rig.store.stage_blocking(message, tmp_path / "spool" / message.queue_id)
    rig.scheduler.startService()
    rig.clock.advance(0)
    assert len(rig.peer.transactions) < 40, "not every due recipient fires at once"
    rig.clock.advance(rig.settings.restart_spread + 1)
    assert len(rig.peer.transactions) == 40
    assert rig.on_disk() == {}


def test_sent_is_durable_before_the_connection_is_reused(tmp_path: Path) -> None:
    rig = Rig(tmp_path, SchedulerSettings(per_destination=1))
    rig.scheduler.startService()
    seen_on_disk: list[set[str]] = []
    original_send = ScriptedConnection.send

    class Watching(ScriptedConnection):
        def send(self, message: OutboundMessage) -> Deferred[list[RecipientResult]]:
            seen_on_disk.append(set(rig.on_disk()))
            return original_send(self, message)

    rig.peer.connection_class = Watching
    first = rig.submit("a@example.net", "b@example.net")
    second = rig.submit("c@example.net")
    # One connection: the second transaction starts only once the first one's "sent" is on
    # disk (here: the finished message has left the queue).
    assert len(rig.peer.connects) == 1
    assert seen_on_disk == [{first.queue_id}, {second.queue_id}]


def test_held_recipients_wait_and_release(rig: Rig) -> None:
    rig.peer.answer = temp
    record = rig.submit("bob@example.net")
    current = rig.on_disk()[record.queue_id]
    held = current.with_recipients([replace_state(current.recipients[0], State.HELD)])
    rig.scheduler.replaced(held, record.queue_id)
    rig.clock.advance(5000)
    assert len(rig.peer.transactions) == 1
    released = held.with_recipients([replace_state(held.recipients[0], State.DEFERRED)])
    rig.peer.answer = ok
    rig.scheduler.replaced(released, record.queue_id)
    rig.clock.advance(0)
    assert len(rig.peer.transactions) == 2


def test_dsn_request_travels_to_the_client(rig: Rig) -> None:
    message = rig.message("bob@example.net")
    message = AcceptedMessage(
        **{
            **message.__dict__,
            "recipients": (
                Recipient(
                    "bob@example.net",
                    RemoteRoute("example.net"),
                    DsnRequest(frozenset({Notify.SUCCESS, Notify.FAILURE}), ("rfc822", "b@x")),
                ),
            ),
            "envid": "ENV1",
        }
    )
    record = rig.store.stage_blocking(message, rig.root / "spool" / message.queue_id)
    assert record is not None
    rig.scheduler.queued([record])
    rig.clock.advance(0)
    sent = rig.peer.transactions[0][1]
    assert sent.envid == "ENV1"
    assert sent.recipients[0].notify == ("FAILURE", "SUCCESS")
    assert sent.recipients[0].orcpt == "rfc822;b@x"


def replace_state(status: RecipientStatus, state: State) -> RecipientStatus:
    from dataclasses import replace

    return replace(status, state=state)


# --- delay warnings ----------------------------------------------------------------------------


def warnings(rig: Rig) -> list[Sequence[RecipientStatus]]:
    """The recipients of each delay warning asked for (a DSN about unfinished recipients)."""
    return [statuses for _record, statuses in rig.dsns if not statuses[0].state.final]


def next_try(rig: Rig, queue_id: str) -> None:
    """Advance the clock to the message's next attempt."""
    record = rig.on_disk()[queue_id]
    due = min(r.next_attempt for r in record.recipients if r.next_attempt is not None)
    rig.clock.advance(due - rig.clock.seconds())


def test_a_delay_warning_goes_once_with_the_first_deferral_past_the_setting(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path, SchedulerSettings(delay_warning=1000.0))
    rig.scheduler.startService()
    rig.peer.answer = temp
    record = rig.submit("bob@example.net", "carol@example.net")
    while rig.clock.seconds() - record.created_at < 1000:
        assert warnings(rig) == []
        next_try(rig, record.queue_id)
    [warned] = warnings(rig)  # one DSN for both recipients, deferred together
    assert [s.address for s in warned] == ["bob@example.net", "carol@example.net"]
    assert all(s.state is State.DEFERRED and s.delay_warned for s in warned)
    # The flag was on disk, in the same change as the deferral, before the DSN was asked for.
    on_disk = rig.disk_at_dsn[0][record.queue_id].recipients
    assert [(r.delay_warned, r.attempts) for r in on_disk] == [(True, s.attempts) for s in warned]
    for _ in range(5):
        next_try(rig, record.queue_id)
    assert len(warnings(rig)) == 1, "at most one delay warning per recipient"
    rig.peer.answer = ok
    next_try(rig, record.queue_id)
    assert rig.on_disk() == {}
    assert len(warnings(rig)) == 1
    # Both sent, none asked NOTIFY=SUCCESS: nothing more is owed, so no DSN is asked for.
    assert len(rig.dsns) == 1


def test_the_delay_warning_flag_survives_a_restart(tmp_path: Path) -> None:
    rig = Rig(tmp_path, SchedulerSettings(delay_warning=600.0))
    rig.scheduler.startService()
    rig.peer.answer = temp
    record = rig.submit("bob@example.net")
    while not warnings(rig):
        next_try(rig, record.queue_id)
    rig.scheduler.stopService()
    rig.scheduler = rig.make_scheduler()
    rig.scheduler.startService()
    rig.clock.advance(rig.settings.restart_spread)
    for _ in range(4):
        next_try(rig, record.queue_id)
    assert rig.on_disk()[record.queue_id].recipients[0].attempts >= 6
    assert len(warnings(rig)) == 1


HOUR = 3600.0


@pytest.mark.parametrize(
    ("setting", "notify", "sender", "after"),
    [
        (0.0, frozenset(), "alice@example.org", None),  # the default: off
        (0.0, frozenset({Notify.DELAY}), "alice@example.org", DELAY_WARNING_ASKED),
        (0.0, frozenset({Notify.DELAY, Notify.FAILURE}), "alice@example.org", 4 * HOUR),
        (HOUR, frozenset(), "alice@example.org", HOUR),  # no NOTIFY: the server's policy
        (HOUR, frozenset({Notify.DELAY}), "alice@example.org", HOUR),
        (HOUR, frozenset({Notify.FAILURE}), "alice@example.org", None),  # DELAY not asked
        (HOUR, frozenset({Notify.SUCCESS}), "alice@example.org", None),
        (HOUR, frozenset({Notify.NEVER}), "alice@example.org", None),
        (HOUR, frozenset({Notify.DELAY}), "", None),  # never a DSN to <>
    ],
    ids=[
        "off",
        "delay-asked",
        "delay-failure-asked",
        "set",
        "set-delay-asked",
        "set-failure-only",
        "set-success-only",
        "set-never",
        "set-null-sender",
    ],
)
def test_who_gets_a_delay_warning_and_when(
    tmp_path: Path, setting: float, notify: frozenset[Notify], sender: str, after: float | None
) -> None:
    assert DELAY_WARNING_ASKED == 4 * HOUR
    rig = Rig(tmp_path, SchedulerSettings(delay_warning=setting))
    rig.scheduler.startService()
    rig.peer.answer = temp
    message = rig.message("bob@example.net", sender=sender, notify=notify)
    record = rig.store.stage_blocking(message, tmp_path / "spool" / message.queue_id)
    assert record is not None
    rig.scheduler.queued([record])
    rig.clock.advance(0)
    warned_at = None
    while rig.clock.seconds() - record.created_at < 6 * HOUR:
        next_try(rig, record.queue_id)
        if warnings(rig) and warned_at is None:
            warned_at = rig.clock.seconds() - record.created_at
    if after is None:
        assert warnings(rig) == []
        assert not rig.on_disk()[record.queue_id].recipients[0].delay_warned
    else:
        assert len(warnings(rig)) == 1
        assert warned_at is not None
        # At the first deferral past the age: within one (longest, jittered) retry delay.
        assert after <= warned_at < after + rig.policy.max_backoff * 1.25


def test_recipients_deferred_together_are_retried_together(rig: Rig) -> None:
    rig.peer.answer = temp
    record = rig.submit(*(f"r{n}@example.net" for n in range(5)))
    times = {r.next_attempt for r in rig.on_disk()[record.queue_id].recipients}
    assert len(times) == 1
    next_try(rig, record.queue_id)
    assert [len(m.recipients) for _c, m in rig.peer.transactions] == [5, 5]


# --- grouping and connections ------------------------------------------------------------------


def test_domains_of_one_message_with_one_destination_share_a_transaction(rig: Rig) -> None:
    rig.hop.table = {"a.example": "mx:mx.shared", "b.example": "mx:mx.shared"}
    rig.peer.hold_connects = True
    rig.submit("x@a.example", "y@b.example", "z@a.example")
    assert len(rig.peer.connects) == 1
    rig.peer.finish_connects()
    rig.clock.advance(0)
    [(_connection, message)] = rig.peer.transactions
    assert sorted(r.address for r in message.recipients) == [
        "x@a.example",
        "y@b.example",
        "z@a.example",
    ]
    assert rig.on_disk() == {}


def test_connections_are_opened_for_waiting_work_only(rig: Rig) -> None:
    rig.peer.hold_connects = True
    rig.submit("a@example.net")
    assert len(rig.peer.connects) == 1, "one transaction waiting: one connection being opened"
    rig.submit("b@example.net")
    assert len(rig.peer.connects) == 2
    rig.peer.finish_connects()
    rig.clock.advance(0)
    assert len(rig.peer.transactions) == 2
    assert rig.on_disk() == {}


# --- what the client is given ------------------------------------------------------------------


def _queue(rig: Rig, message: AcceptedMessage) -> QueueRecord:
    record = rig.store.stage_blocking(message, rig.root / "spool" / message.queue_id)
    assert record is not None
    rig.scheduler.queued([record])
    rig.clock.advance(0)
    return record


def test_the_client_compares_the_size_on_the_wire(rig: Rig) -> None:
    _queue(rig, rig.message("bob@example.net", wire_size=4321))
    assert rig.peer.transactions[-1][1].size == 4321
    old = rig.message("bob@example.net")  # a record without a count (version 1)
    _queue(rig, old)
    assert rig.peer.transactions[-1][1].size == old.size - len(
        b"Return-Path: <alice@example.org>\n"
    )


def test_a_next_hop_that_took_the_dsn_request_is_remembered(rig: Rig) -> None:
    # NOTIFY=SUCCESS, so that the scheduler asks the bouncer whether a DSN is owed.
    success = frozenset({Notify.SUCCESS})
    rig.peer.offers_dsn = True
    rig.submit("bob@example.net", notify=success)
    rig.peer.offers_dsn = False
    rig.submit("carol@example.net", notify=success)
    assert [s.dsn_passed_on for _r, (s,) in rig.dsns] == [True, False]


def test_every_attempt_is_logged_with_next_hop_tls_reply_and_next_retry(rig: Rig) -> None:
    rig.peer.answer = temp
    with capturedLogs() as events:
        record = rig.submit("bob@example.net")
        next_try(rig, record.queue_id)
        rig.peer.answer = ok
        next_try(rig, record.queue_id)
    lines = [formatEvent(e) for e in events if e.get("log_namespace") == "mailsrv.relay"]
    attempts = [line for line in lines if "to <bob@example.net>" in line]
    assert len(attempts) == 3
    first, _second, last = attempts
    assert first.startswith(
        f"relay {record.queue_id} to <bob@example.net> via mx.example.net [192.0.2.1] tls=none: "
        "deferred (attempt 1, next attempt in "
    )
    assert first.endswith(" s): 451 4.3.0 try later")
    assert last.endswith("tls=none: sent (attempt 3): 250 2.0.0 queued")
    assert f"relay {record.queue_id} left the queue: 1 sent, 0 bounced" in lines


# --- metrics -----------------------------------------------------------------------------------


def scraped(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What a scrape of ``metrics`` shows, parsed back: (sample name, labels) -> value."""
    metrics.refresh()
    text = metrics.render().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_attempts_and_the_queue_are_exported(rig: Rig) -> None:
    rig.peer.answer = temp
    record = rig.submit("bob@example.net", "carol@example.net")
    rig.clock.advance(60)
    seen = scraped(rig.metrics)
    assert seen[("mailsrv_relay_attempts_total", (("result", "deferred"),))] == 2
    assert seen[("mailsrv_relay_queue_recipients", (("state", "deferred"),))] == 2
    assert seen[("mailsrv_relay_queue_recipients", (("state", "pending"),))] == 0
    assert seen[("mailsrv_relay_queue_messages", ())] == 1
    assert seen[("mailsrv_relay_oldest_message_age_seconds", ())] == pytest.approx(
        rig.clock.seconds() - record.created_at
    )
    rig.peer.answer = ok
    next_try(rig, record.queue_id)
    seen = scraped(rig.metrics)
    assert seen[("mailsrv_relay_attempts_total", (("result", "sent"),))] == 2
    assert seen[("mailsrv_relay_attempts_total", (("result", "deferred"),))] == 2
    assert seen[("mailsrv_relay_queue_messages", ())] == 0
    assert seen[("mailsrv_relay_queue_recipients", (("state", "deferred"),))] == 0
    assert seen[("mailsrv_relay_oldest_message_age_seconds", ())] == 0
    rig.peer.answer = perm
    rig.submit("dave@example.net")
    seen = scraped(rig.metrics)
    assert seen[("mailsrv_relay_attempts_total", (("result", "bounced"),))] == 1
