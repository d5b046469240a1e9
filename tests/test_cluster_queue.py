"""The cluster queue store on a real PostgreSQL (the session's throwaway cluster), two nodes'
stores side by side: group commit in the committer's thread, claims that never overlap,
leases that expire, are renewed, are lost and released, migrations that do not race, and the
database being down.  Lease times come from a ``task.Clock``; the database runs for real.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads
from zope.interface.verify import verifyObject

from mailsrv.delivery.sinks import StagedMessage
from mailsrv.relay.pg_queue import (
    ClusterQueueSink,
    ClusterQueueStore,
    CommitConnection,
    LeaseLost,
    next_due,
    open_queue_database,
)
from mailsrv.relay.queue_store import ISharedQueueStore
from mailsrv.relay.records import QueueRecord, State
from tests.queue_helpers import BODY, accepted, local, spool_body

NOW = 1_767_225_600.0


def run_in_thread(function: Any, *args: Any, **kwargs: Any) -> Any:
    return threads.deferToThread(function, *args, **kwargs)


class Node:
    """One node's view of the queue: its store on the shared database, its own cache."""

    def __init__(self, dsn: str, name: str, home: Path, clock: task.Clock, lease: float = 60):
        self.database = open_queue_database(dsn, reactor)
        self.commit = CommitConnection(dsn, clock, statement_timeout=5)
        self.store = ClusterQueueStore(
            self.database, self.commit, name, clock, run_in_thread, home / name, lease=lease
        )
        self.spool = home / f"{name}-spool"

    def stage(self, *messages: Any) -> tuple[list[QueueRecord], Any]:
        """What the committer's thread does with a batch (blocking: call in a thread)."""
        batch = [StagedMessage(m, spool_body(self.spool, m.queue_id)) for m in messages]
        return self.store.stage_batch_blocking(batch)


@pytest.fixture
def clock() -> task.Clock:
    c = task.Clock()
    c.advance(NOW)
    return c


@pytest_twisted.async_yield_fixture
async def nodes(pg_dsn: str, tmp_path: Path, clock: task.Clock) -> Any:
    made = [Node(pg_dsn, name, tmp_path, clock) for name in ("a", "b")]
    # Both open (and migrate) at once: the advisory lock makes one wait for the other.
    await defer.gatherResults([n.store.open() for n in made])
    yield made
    for n in made:
        n.commit.close()
        await n.database.close()


def table(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute(sql, params)
        found = cursor.fetchall() if cursor.description else []
    connection.close()
    return found


def test_the_store_provides_the_shared_interface(tmp_path: Path, clock: task.Clock) -> None:
    node = Node("postgresql://nobody@127.0.0.1:1/none", "a", tmp_path, clock)
    assert verifyObject(ISharedQueueStore, node.store)


def test_next_due_is_the_earliest_waiting_recipient() -> None:
    record = QueueRecord.from_message(accepted())
    assert record is not None
    assert next_due(record, NOW) == NOW  # pending: at once
    first, second = record.recipients
    later = record.with_recipients(
        [
            replace(first, state=State.DEFERRED, next_attempt=NOW + 300),
            replace(second, state=State.HELD),
        ]
    )
    assert next_due(later, NOW) == NOW + 300
    held = later.with_recipients([replace(first, state=State.HELD)])
    assert next_due(held, NOW) is None, "nothing to do until an operator releases it"
    done = later.with_recipients(
        [replace(first, state=State.SENT), replace(second, state=State.BOUNCED)]
    )
    assert next_due(done, NOW) == NOW, "finished: its DSNs and removal are due"


@pytest_twisted.ensureDeferred
async def test_a_batch_is_one_transaction_leased_to_the_node_that_accepted_it(
    nodes: list[Node], pg_dsn: str
) -> None:
    a, _b = nodes
    messages = [accepted() for _ in range(5)] + [accepted(recipients=(local("x@example.org"),))]
    records, failures = await threads.deferToThread(a.stage, *messages)
    assert failures == {}
    assert sorted(r.queue_id for r in records) == sorted(m.queue_id for m in messages[:5])
    rows = table(
        pg_dsn, "SELECT queue_id, lease_node, lease_until, next_due, body FROM queue_messages"
    )
    assert len(rows) == 5, "the local-only message is not queued"
    assert {(n, until, due) for _q, n, until, due, _body in rows} == {("a", NOW + 60, NOW)}
    assert all(bytes(body) == BODY for *_rest, body in rows), "the body is stored in the row"
    for record in records:
        assert a.store.body_path(record.queue_id).read_bytes() == BODY
    # One inserting transaction (one COMMIT) for the whole batch.
    assert len(table(pg_dsn, "SELECT DISTINCT xmin::text FROM queue_messages")) == 1


@pytest_twisted.ensureDeferred
async def test_a_held_message_is_not_claimed_by_another_node_until_its_lease_expires(
    nodes: list[Node], clock: task.Clock
) -> None:
    a, b = nodes
    records, _ = await threads.deferToThread(a.stage, accepted())
    a.store.remember(records)
    assert await b.store.claim() == []
    clock.advance(61)
    (taken,) = await b.store.claim()
    assert taken.queue_id == records[0].queue_id
    assert b.store.body_path(taken.queue_id).read_bytes() == BODY, "the body came from the row"
    assert b.store.holds(taken.queue_id)
    assert not a.store.holds(taken.queue_id), "a's lease ran out by its own clock too"
    # A, continuing, finds the message gone at its next write (and at its next renewal).
    with pytest.raises(LeaseLost):
        await a.store.modify_held(taken.queue_id, lambda r: r, release=False)


@pytest_twisted.ensureDeferred
async def test_two_nodes_claiming_at_once_never_take_the_same_message(
    nodes: list[Node], clock: task.Clock, pg_dsn: str
) -> None:
    a, b = nodes
    await threads.deferToThread(a.stage, *[accepted() for _ in range(40)])
    table(pg_dsn, "UPDATE queue_messages SET lease_node = NULL, lease_until = NULL RETURNING 1")
    got_a, got_b = await defer.gatherResults([a.store.claim(15), b.store.claim(100)])
    ids_a = {r.queue_id for r in got_a}
    ids_b = {r.queue_id for r in got_b}
    assert not ids_a & ids_b
    more = await a.store.claim(100)
    assert len(ids_a) + len(ids_b) + len(more) == 40


@pytest_twisted.ensureDeferred
async def test_renewal_keeps_the_lease_and_reports_the_lost_ones(
    nodes: list[Node], clock: task.Clock, pg_dsn: str
) -> None:
    a, b = nodes
    records, _ = await threads.deferToThread(a.stage, accepted(), accepted())
    a.store.remember(records)
    keep, lose = (r.queue_id for r in records)
    clock.advance(50)
    assert await a.store.renew() == []
    clock.advance(50)  # 100 s after staging, 50 after the renewal: still a's
    assert await b.store.claim() == []
    table(
        pg_dsn,
        "UPDATE queue_messages SET lease_node = 'b' WHERE queue_id = %s RETURNING 1",
        (lose,),
    )
    assert await a.store.renew() == [lose]
    assert a.store.held == [keep]


@pytest_twisted.ensureDeferred
async def test_a_write_after_an_attempt_releases_the_lease_in_the_same_statement(
    nodes: list[Node], clock: task.Clock, pg_dsn: str
) -> None:
    a, b = nodes
    records, _ = await threads.deferToThread(a.stage, accepted())
    a.store.remember(records)
    qid = records[0].queue_id

    def defer_all(record: QueueRecord) -> QueueRecord:
        return record.with_recipients(
            replace(r, state=State.DEFERRED, attempts=1, next_attempt=NOW + 300)
            for r in record.recipients
        )

    await a.store.modify_held(qid, defer_all, release=True)
    assert table(pg_dsn, "SELECT lease_node, next_due FROM queue_messages") == [(None, NOW + 300)]
    assert a.store.held == []
    assert await b.store.claim() == [], "not due yet"
    clock.advance(300)
    (taken,) = await b.store.claim()
    assert [r.state for r in taken.recipients] == [State.DEFERRED, State.DEFERRED]


@pytest_twisted.ensureDeferred
async def test_a_finished_message_keeps_its_lease_until_it_is_removed(
    nodes: list[Node], pg_dsn: str
) -> None:
    a, _b = nodes
    records, _ = await threads.deferToThread(a.stage, accepted())
    a.store.remember(records)
    qid = records[0].queue_id

    def sent(record: QueueRecord) -> QueueRecord:
        return record.with_recipients(replace(r, state=State.SENT) for r in record.recipients)

    await a.store.modify_held(qid, sent, release=True)
    assert table(pg_dsn, "SELECT lease_node FROM queue_messages") == [("a",)]
    await a.store.remove(qid)
    assert table(pg_dsn, "SELECT count(*) FROM queue_messages") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_a_restarted_node_takes_back_its_own_leases_at_once(
    nodes: list[Node], pg_dsn: str, tmp_path: Path, clock: task.Clock
) -> None:
    a, b = nodes
    records, _ = await threads.deferToThread(a.stage, accepted())
    again = Node(pg_dsn, "a", tmp_path, clock)
    await again.store.open()
    try:
        (loaded,) = await again.store.load()
        assert loaded.queue_id == records[0].queue_id
        assert await b.store.load() == [], "another node's load takes only what is free"
    finally:
        again.commit.close()
        await again.database.close()


@pytest_twisted.ensureDeferred
async def test_a_commit_before_the_database_is_open_waits_then_fails_with_a_451(
    pg_dsn: str, tmp_path: Path, clock: task.Clock
) -> None:
    a = Node(pg_dsn, "a", tmp_path, clock)
    a.store.open_wait = 0.05
    message = accepted()
    _records, failures = await threads.deferToThread(a.stage, message)
    assert set(failures) == {message.queue_id}
    assert "not open" in str(failures[message.queue_id])
    await a.store.open()
    try:
        _records, failures = await threads.deferToThread(a.stage, message)
        assert failures == {}
    finally:
        await a.store.close()


@pytest_twisted.ensureDeferred
async def test_the_sink_tells_its_listeners_after_the_commit(nodes: list[Node]) -> None:
    a, _b = nodes
    sink = ClusterQueueSink(a.store)
    told: list[list[QueueRecord]] = []
    sink.listen(told.append)
    message = accepted()
    staged = StagedMessage(message, spool_body(a.spool, message.queue_id))
    assert await threads.deferToThread(sink.write, [staged]) == {}
    sink.committed([message])
    assert [[r.queue_id for r in batch] for batch in told] == [[message.queue_id]]
    assert a.store.holds(message.queue_id)


@pytest_twisted.ensureDeferred
async def test_rollback_removes_the_row(nodes: list[Node], pg_dsn: str) -> None:
    a, _b = nodes
    sink = ClusterQueueSink(a.store)
    message = accepted()
    staged = StagedMessage(message, spool_body(a.spool, message.queue_id))
    await threads.deferToThread(sink.write, [staged])
    await threads.deferToThread(sink.rollback, staged)
    assert table(pg_dsn, "SELECT count(*) FROM queue_messages") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_the_database_down_fails_the_batch_quickly_then_recovers(
    own_pg_cluster: Any, tmp_path: Path, clock: task.Clock
) -> None:
    dsn = own_pg_cluster.create_database()
    a = Node(dsn, "a", tmp_path, clock)
    await a.store.open()
    try:
        _records, failures = await threads.deferToThread(a.stage, accepted())
        assert failures == {}
        own_pg_cluster.stop()
        message = accepted()
        _records, failures = await threads.deferToThread(a.stage, message)
        assert set(failures) == {message.queue_id}, "a 451 for it, never a 250"
        # While it is down, later batches fail at once rather than wait for a timeout.
        _records, failures = await threads.deferToThread(a.stage, accepted())
        assert len(failures) == 1
        own_pg_cluster.start()
        clock.advance(2)  # past the retry pause
        _records, failures = await threads.deferToThread(a.stage, message)
        assert failures == {}
    finally:
        a.commit.close()
        await a.database.close()


@pytest_twisted.ensureDeferred
async def test_connection_slots_to_a_destination_are_counted_across_nodes(
    nodes: list[Node], clock: task.Clock
) -> None:
    a, b = nodes
    first = await a.store.take_slot("mx.example.net", 2)
    second = await b.store.take_slot("mx.example.net", 2)
    assert first and second and first != second
    assert await a.store.take_slot("mx.example.net", 2) is None, "two open, cluster-wide"
    assert await b.store.take_slot("other.example", 2) is not None, "per destination"
    await a.store.give_slot(first)
    assert await b.store.take_slot("mx.example.net", 2) is not None
    # A node that dies leaves slots behind: they lapse with its leases.
    assert await a.store.take_slot("mx.example.net", 2) is None
    clock.advance(61)
    await a.store.renew()  # a renews its own (it has none left here), b is silent
    assert await a.store.take_slot("mx.example.net", 2) is not None
