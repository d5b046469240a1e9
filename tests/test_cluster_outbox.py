"""The webhook outbox in the queue database (a real PostgreSQL, the session's throwaway
cluster), two nodes' stores side by side: a batch's events commit in the queue's one
transaction with the body stored once, claims never overlap, leases expire and are released by
every outcome, a delivered entry takes its body with it when it was the last, relay outcome
events are written once per id, and an operator's redrive and the disabled endpoints are the
cluster's.  Lease times come from a ``task.Clock``; the database runs for real.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task, threads

from mailsrv.delivery.sinks import StagedMessage
from mailsrv.relay.pg_queue import ClusterQueueSink
from mailsrv.webhook.actions import OutboxActions
from mailsrv.webhook.endpoint_state import DisabledEndpoint
from mailsrv.webhook.entries import DeliverySource, EntryState, OutboxEntry, new_entries
from mailsrv.webhook.outbox_store import NoSuchEntry, OutboxError
from mailsrv.webhook.pg_outbox import (
    ClusterDisabledEndpoints,
    ClusterOutboxStore,
    OutboxPart,
)
from mailsrv.webhook.sink import OutboxSink
from tests.queue_helpers import BODY, accepted, local, remote, spool_body
from tests.test_cluster_queue import NOW, Node, run_in_thread, table
from tests.webhook_rig import endpoint

ENDPOINTS = [endpoint("crm", "http://127.0.0.1:9/crm"), endpoint("feed", "http://127.0.0.1:9/f")]


class OutboxNode:
    """One node: its queue store and outbox on the shared database, its sink with the part."""

    def __init__(self, dsn: str, name: str, home: Path, clock: task.Clock) -> None:
        self.queue = Node(dsn, name, home, clock)
        self.outbox = ClusterOutboxStore(
            self.queue.database, name, clock, run_in_thread, home / f"{name}-outbox", lease=60
        )
        self.states = ClusterDisabledEndpoints(self.queue.database)
        self.events = OutboxSink(None, ENDPOINTS)
        self.handed: list[OutboxEntry] = []
        self.events.listen(self.handed.extend)
        self.sink = ClusterQueueSink(self.queue.store, [OutboxPart(self.outbox, self.events)])

    async def commit(self, *messages: Any) -> Any:
        """What the committer does with a batch: write in its thread, then ``committed``."""
        batch = [StagedMessage(m, spool_body(self.queue.spool, m.queue_id)) for m in messages]
        failures = await threads.deferToThread(self.sink.write, batch)
        self.sink.committed([m for m in messages if m.queue_id not in failures])
        return failures


@pytest.fixture
def clock() -> task.Clock:
    c = task.Clock()
    c.advance(NOW)
    return c


@pytest_twisted.async_yield_fixture
async def nodes(pg_dsn: str, tmp_path: Path, clock: task.Clock) -> Any:
    made = [OutboxNode(pg_dsn, name, tmp_path, clock) for name in ("a", "b")]
    await defer.gatherResults([n.queue.store.open() for n in made])
    yield made
    for n in made:
        n.queue.commit.close()
        await n.queue.database.close()


def mixed() -> Any:
    """A message for a local mailbox and a remote recipient: received and queued events."""
    return accepted(recipients=(local("alice@example.org"), remote("bob@example.net")))


@pytest_twisted.ensureDeferred
async def test_events_commit_in_the_queue_s_transaction_with_the_body_stored_once(
    nodes: list[OutboxNode], pg_dsn: str
) -> None:
    a, _b = nodes
    message = mixed()
    assert await a.commit(message, accepted(recipients=(local("x@example.org"),))) == {}
    rows = table(pg_dsn, "SELECT entry_key, lease_node, lease_until, body_id FROM outbox_entries")
    # Two endpoints, each with two events of the mixed message and one of the local one.
    assert len(rows) == 6
    assert {(n, until) for _k, n, until, _b in rows} == {("a", NOW + 60)}
    bodies = table(pg_dsn, "SELECT body_id, body FROM outbox_bodies ORDER BY body_id")
    assert len(bodies) == 2 and all(bytes(body) == BODY for _i, body in bodies), "one per message"
    xmins = (
        "SELECT xmin::text FROM queue_messages UNION SELECT xmin::text FROM outbox_entries"
        " UNION SELECT xmin::text FROM outbox_bodies"
    )
    assert len(table(pg_dsn, xmins)) == 1
    assert sorted(e.key for e in a.handed) == sorted(k for k, *_ in rows), "handed on, once"
    for entry in a.handed:
        assert a.outbox.holds(entry.key)
        assert a.outbox.body_path(entry.key).read_bytes() == BODY


@pytest_twisted.ensureDeferred
async def test_a_rolled_back_message_leaves_no_row_in_either_table(
    nodes: list[OutboxNode], pg_dsn: str
) -> None:
    a, _b = nodes
    message = mixed()
    batch = [StagedMessage(message, spool_body(a.queue.spool, message.queue_id))]
    assert await threads.deferToThread(a.sink.write, batch) == {}
    await threads.deferToThread(a.sink.rollback, batch[0])  # another sink failed it
    a.sink.committed([])
    for name in ("queue_messages", "outbox_entries", "outbox_bodies"):
        assert table(pg_dsn, f"SELECT count(*) FROM {name}") == [(0,)]  # noqa: S608
    assert a.handed == []


@pytest_twisted.ensureDeferred
async def test_claims_wait_for_the_lease_and_never_overlap(
    nodes: list[OutboxNode], clock: task.Clock
) -> None:
    a, b = nodes
    await a.commit(*[accepted(recipients=(local("x@example.org"),)) for _ in range(10)])
    names = ["crm", "feed"]
    assert await b.outbox.claim(names) == [], "A holds its new entries"
    clock.advance(61)  # A froze: its leases ran out
    assert not a.outbox.holds(a.handed[0].key)
    got_a, got_b = await defer.gatherResults(
        [a.outbox.claim(names, limit=12), b.outbox.claim(names, limit=12)]
    )
    keys_a, keys_b = {e.key for e in got_a}, {e.key for e in got_b}
    assert not keys_a & keys_b and len(keys_a | keys_b) == 20
    for entry in got_b:
        assert b.outbox.body_path(entry.key).read_bytes() == BODY, "the body came from its row"
    assert await b.outbox.claim(["feed"]) == [], "nothing left for anyone"


@pytest_twisted.ensureDeferred
async def test_an_outcome_releases_the_lease_and_a_delivery_takes_the_last_body(
    nodes: list[OutboxNode], clock: task.Clock, pg_dsn: str
) -> None:
    a, b = nodes
    await a.commit(accepted(recipients=(local("x@example.org"),)))
    crm, feed = sorted(a.handed, key=lambda e: e.endpoint)
    retry = replace(crm, attempts=1, next_attempt=NOW + 30, last_status=503)
    await a.outbox.update(retry)
    assert not a.outbox.holds(crm.key)
    assert table(pg_dsn, "SELECT lease_node FROM outbox_entries WHERE entry_key = %s", (crm.key,))
    assert await b.outbox.claim(["crm"]) == [], "not due yet"
    clock.advance(30)
    (taken,) = await b.outbox.claim(["crm"])
    assert taken == retry, "B sends what A wrote"
    await b.outbox.discard(crm.key)
    assert len(table(pg_dsn, "SELECT body_id FROM outbox_bodies")) == 1, "feed still needs it"
    await a.outbox.discard(feed.key)
    assert table(pg_dsn, "SELECT count(*) FROM outbox_entries") == [(0,)]
    assert table(pg_dsn, "SELECT count(*) FROM outbox_bodies") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_writes_after_the_lease_ran_out_are_refused(
    nodes: list[OutboxNode], clock: task.Clock
) -> None:
    a, b = nodes
    await a.commit(accepted(recipients=(local("x@example.org"),)))
    clock.advance(61)
    taken = await b.outbox.claim(["crm", "feed"])
    assert len(taken) == 2
    with pytest.raises(NoSuchEntry):
        await a.outbox.discard(taken[0].key)
    with pytest.raises(NoSuchEntry):
        await a.outbox.update(replace(taken[1], attempts=1))
    assert sorted(e.key for e in await b.outbox.records()) == sorted(e.key for e in taken)


@pytest_twisted.ensureDeferred
async def test_a_relay_outcome_event_is_written_once_per_id(
    nodes: list[OutboxNode], pg_dsn: str
) -> None:
    a, b = nodes
    source = DeliverySource("7ZK2P1QH0000001", "alice@example.org", "bob@example.net", 1)
    (entry,) = new_entries("evt_" + "a" * 32, "message.delivered", NOW, source, ENDPOINTS[:1])
    await a.outbox.put(entry)
    assert a.outbox.holds(entry.key)
    await b.outbox.put(entry)  # the same attempt's event again (after a crash, say)
    assert not b.outbox.holds(entry.key), "the row there is A's"
    assert table(pg_dsn, "SELECT entry_key, lease_node FROM outbox_entries") == [(entry.key, "a")]


@pytest_twisted.ensureDeferred
async def test_a_redrive_from_any_node_makes_a_dead_letter_due_and_notifies(
    nodes: list[OutboxNode], clock: task.Clock, pg_dsn: str
) -> None:
    a, b = nodes
    await a.commit(accepted(recipients=(local("x@example.org"),)))
    crm, feed = sorted(a.handed, key=lambda e: e.endpoint)
    await a.outbox.update(replace(crm, state=EntryState.DEAD, attempts=1, finished_at=NOW))
    assert table(
        pg_dsn, "SELECT next_due FROM outbox_entries WHERE entry_key = %s", (crm.key,)
    ) == [(None,)]
    actions = OutboxActions(b.outbox, b.states, ENDPOINTS, clock)
    with pytest.raises(OutboxError, match="being sent by node a"):
        await b.outbox.modify(feed.key, lambda e: replace(e, attempts=5))
    assert await actions.redrive(None, None) == "1 dead-lettered event(s) redriven"
    (taken,) = await b.outbox.claim(["crm"])
    assert taken.state is EntryState.PENDING and taken.attempts == 0
    view = await actions.list_entries()
    assert view.leases == {crm.key: ("b", NOW + 60), feed.key: ("a", NOW + 60)}


@pytest_twisted.ensureDeferred
async def test_no_node_claims_the_entries_of_an_endpoint_disabled_in_the_cluster(
    nodes: list[OutboxNode], clock: task.Clock
) -> None:
    a, b = nodes
    await a.commit(accepted(recipients=(local("x@example.org"),)))
    await a.outbox.release(a.outbox.held)
    clock.advance(1)  # the events are due
    state = DisabledEndpoint("crm", "http://127.0.0.1:9/crm", NOW, "HTTP 410 Gone")
    await a.states.put(state)
    assert await b.states.records() == [state]
    assert [e.endpoint for e in await b.outbox.claim(["crm", "feed"])] == ["feed"]
    await b.states.remove("crm")
    assert [e.endpoint for e in await b.outbox.claim(["crm", "feed"])] == ["crm"]
