"""Several nodes, one queue, end to end: real ``twistd mailsrv`` processes on loopback with
their own ports and data directories and one PostgreSQL queue database (the session's
throwaway cluster), smtplib as the sender, a real SMTP peer (``tests/relay_peer.py``) as the
smarthost.  Node A accepts while the next hop is down and is killed with SIGKILL; node B then
delivers every recipient exactly once, counted at the peer.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import psycopg2
import pytest_twisted

from tests.relay_peer import Script, start_peer
from tests.test_process import Server, free_port
from tests.test_relay_process import BODY, eventually, relay_server, send


def node(tmp_path: Path, name: str, servers: list[Server], relay_port: int, dsn: str, **env: str):
    """A node named ``name`` of the cluster on ``dsn`` (its own directory and ports)."""
    home = tmp_path / name
    home.mkdir(exist_ok=True)
    settings = {
        "SMTP_QUEUE_URL": dsn,
        "SMTP_QUEUE_NODE": name,
        "SMTP_QUEUE_POLL": "0.2",
        "SMTP_QUEUE_LEASE": "3",
        "SMTP_RELAY_MIN_BACKOFF": "1",
        "SMTP_RELAY_MAX_BACKOFF": "1",
        **env,
    }
    return relay_server(home, servers, relay_port, **settings)


def rows(dsn: str) -> list[tuple[Any, ...]]:
    """``(queue_id, lease_node, states)`` of every queued message."""
    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT queue_id, lease_node,"
            " ARRAY(SELECT r->>'state' FROM jsonb_array_elements(record->'recipients') r)"
            " FROM queue_messages ORDER BY queue_id"
        )
        found = cursor.fetchall()
    connection.close()
    return found


@pytest_twisted.ensureDeferred
async def test_a_killed_node_s_mail_is_delivered_once_by_the_other(
    tmp_path: Path, servers: list[Server], pg_dsn: str
) -> None:
    down_port = free_port()  # nothing listens here yet: the smarthost is down
    a = node(tmp_path, "a", servers, down_port, pg_dsn)
    a.start()
    for n in range(3):
        send(a, "alice@example.org", [f"r{n}@remote.test", f"s{n}@remote.test"], BODY)
    # Every message is queued in the database before its 250, leased to A, then deferred
    # (the next hop is down) and given back to the queue.
    queued = rows(pg_dsn)
    assert len(queued) == 3
    await eventually(
        lambda: all(s == ["deferred", "deferred"] for _q, _n, s in rows(pg_dsn)),
        "three deferred messages",
    )
    a.signal(signal.SIGKILL)
    a.wait()
    peer = start_peer(port=down_port)
    try:
        b = node(tmp_path, "b", servers, down_port, pg_dsn)
        b.start()
        await eventually(lambda: rows(pg_dsn) == [], "an empty queue", within=60)
        got = sorted(r for m in peer.factory.messages for r in m.recipients)
        assert got == sorted(f"{p}{n}@remote.test" for p in "rs" for n in range(3))
        assert len(peer.factory.messages) == 3, "one transaction per message, none twice"
        assert b.log().count("left the queue: 2 sent, 0 bounced") == 3
    finally:
        await peer.stop()


@pytest_twisted.ensureDeferred
async def test_the_leases_of_a_dead_node_are_taken_over_when_they_expire(
    tmp_path: Path, servers: list[Server], pg_dsn: str
) -> None:
    # The first peer never answers a DATA: A's attempts hang while A holds the leases.
    stuck = start_peer(Script(silent="data"))
    peer = start_peer()
    try:
        a = node(tmp_path, "a", servers, stuck.number, pg_dsn, SMTP_QUEUE_LEASE="4")
        a.start()
        send(a, "alice@example.org", ["r0@remote.test"], BODY)
        await eventually(lambda: len(stuck.factory.sessions) == 1, "A's attempt")
        assert [n for _q, n, _s in rows(pg_dsn)] == ["a"]
        a.signal(signal.SIGKILL)
        a.wait()
        b = node(tmp_path, "b", servers, peer.number, pg_dsn)
        b.start()
        await eventually(lambda: rows(pg_dsn) == [], "B's delivery after the lease", within=60)
        assert [m.recipients for m in peer.factory.messages] == [["r0@remote.test"]]
        assert stuck.factory.messages == [], "A never got past DATA"
    finally:
        await stuck.stop()
        await peer.stop()


@pytest_twisted.ensureDeferred
async def test_a_node_that_stops_gives_its_work_back_at_once(
    tmp_path: Path, servers: list[Server], pg_dsn: str
) -> None:
    # A's attempt hangs at DATA, under a lease far longer than the test; A is stopped.
    stuck = start_peer(Script(silent="data"))
    peer = start_peer()
    try:
        a = node(
            tmp_path,
            "a",
            servers,
            stuck.number,
            pg_dsn,
            SMTP_QUEUE_LEASE="600",
            SMTP_SHUTDOWN_GRACE="1",
        )
        a.start()
        b = node(tmp_path, "b", servers, peer.number, pg_dsn)
        b.start()
        send(a, "alice@example.org", ["r0@remote.test"], BODY)
        await eventually(lambda: len(stuck.factory.sessions) == 1, "A's attempt")
        assert a.stop() in (0, -signal.SIGTERM)
        # The dropped attempt was deferred and the lease given back: B takes the message
        # when it is due (1 s), not when A's lease would have run out (600 s).
        await eventually(lambda: rows(pg_dsn) == [], "B's delivery")
        assert [m.recipients for m in peer.factory.messages] == [["r0@remote.test"]]
        assert stuck.factory.messages == []
    finally:
        await stuck.stop()
        await peer.stop()
