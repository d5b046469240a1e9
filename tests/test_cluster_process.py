"""Several nodes, one queue, end to end: real ``twistd mailsrv`` processes on loopback with
their own ports and data directories and one PostgreSQL queue database (the session's
throwaway cluster), smtplib as the sender, a real SMTP peer (``tests/relay_peer.py``) as the
smarthost.  Node A accepts while the next hop is down and is killed with SIGKILL; node B then
delivers every recipient exactly once, counted at the peer.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import psycopg2
import pytest_twisted

from tests.relay_peer import Script, start_peer
from tests.test_process import Server, free_port, run_twistd
from tests.test_relay_process import BODY, eventually, queue_cli, queued, relay_server, send
from tests.test_webhook_process import QUICK, config_file, receivers, webhooks_cli
from tests.test_webhook_process import send as webhook_send
from tests.webhook_rig import Answer, Listening, check_signed, start_receiver

__all__ = ["receivers"]  # a fixture


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


@pytest_twisted.ensureDeferred
async def test_the_queue_command_on_any_node_shows_and_steers_the_whole_cluster(
    tmp_path: Path, servers: list[Server], pg_dsn: str
) -> None:
    down_port = free_port()
    slow = {"SMTP_RELAY_MIN_BACKOFF": "3600", "SMTP_RELAY_MAX_BACKOFF": "3600"}
    a = node(tmp_path, "a", servers, down_port, pg_dsn, **slow)
    a.start()
    send(a, "alice@example.org", ["r0@remote.test"], BODY)
    send(a, "alice@example.org", ["r1@remote.test"], BODY)
    await eventually(
        lambda: [s for _q, _n, s in rows(pg_dsn)] == [["deferred"], ["deferred"]], "deferrals"
    )
    b = node(tmp_path, "b", servers, down_port, pg_dsn, **slow)  # not running: the CLI only
    listed = queued(b)
    assert sorted(r["address"] for m in listed for r in m["recipients"]) == [
        "r0@remote.test",
        "r1@remote.test",
    ]
    assert all(m["lease"] is None for m in listed), "deferred work is no node's"
    first = next(m["queue_id"] for m in listed if m["recipients"][0]["address"] == "r0@remote.test")
    text = queue_cli(b, "list")
    assert text.returncode == 0 and first in text.stdout and "deferred" in text.stdout
    held = queue_cli(b, "hold", first)
    assert held.returncode == 0, held.stderr
    assert f"{first}: r0@remote.test put on hold" in held.stdout
    shown = queue_cli(b, "show", first)
    assert shown.returncode == 0 and "Subject: relayed" in shown.stdout
    peer = start_peer(port=down_port)
    try:
        flushed = queue_cli(b, "flush")
        assert flushed.returncode == 0, flushed.stderr
        await eventually(lambda: len(peer.factory.messages) == 1, "the message not on hold")
        assert peer.factory.messages[0].recipients == ["r1@remote.test"]
        released = queue_cli(b, "release", first)
        assert released.returncode == 0, released.stderr
        assert queue_cli(b, "flush", first).returncode == 0
        await eventually(lambda: rows(pg_dsn) == [], "the released one delivered too")
        assert sorted(r for m in peer.factory.messages for r in m.recipients) == [
            "r0@remote.test",
            "r1@remote.test",
        ]
        for bad in (["show", "NOSUCHID"], ["hold", "../etc"], ["release", first]):
            result = queue_cli(b, *bad)
            assert result.returncode == 1, (bad, result)
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    finally:
        await peer.stop()


@pytest_twisted.ensureDeferred
async def test_the_destination_limit_holds_across_nodes(
    tmp_path: Path, servers: list[Server], pg_dsn: str
) -> None:
    from twisted.internet import reactor, task

    stuck = start_peer(Script(silent="data"))  # every session it gets stays open
    try:
        one = {"SMTP_RELAY_DESTINATION_CONCURRENCY": "1", "SMTP_QUEUE_LEASE": "600"}
        a = node(tmp_path, "a", servers, stuck.number, pg_dsn, **one)
        b = node(tmp_path, "b", servers, stuck.number, pg_dsn, **one)
        a.start()
        b.start()
        send(a, "alice@example.org", ["r0@remote.test"], BODY)
        await eventually(lambda: len(stuck.factory.sessions) == 1, "A's connection")
        send(b, "alice@example.org", ["r1@remote.test"], BODY)
        # B finds the destination's one slot taken and keeps trying (every second).
        await task.deferLater(reactor, 3.0, lambda: None)
        assert len(stuck.factory.sessions) == 1, "one connection to it in the whole cluster"
        assert sorted(n for _q, n, _s in rows(pg_dsn)) == ["a", "b"]
    finally:
        await stuck.stop()


@pytest_twisted.ensureDeferred
async def test_a_frozen_node_past_its_lease_does_not_send_what_another_node_took(
    tmp_path: Path, servers: list[Server], pg_dsn: str
) -> None:
    # A's next hop answers DATA late; A is frozen (SIGSTOP) right after sending it, its
    # lease runs out, B takes the message and delivers it; then A continues, gets its 354...
    late = start_peer(Script(data_delay=1.0))
    peer = start_peer()
    try:
        a = node(tmp_path, "a", servers, late.number, pg_dsn)
        a.start()
        send(a, "alice@example.org", ["r0@remote.test"], BODY)
        await eventually(
            lambda: any("DATA" in s.commands for s in late.factory.sessions), "A's DATA"
        )
        a.signal(signal.SIGSTOP)
        try:
            b = node(tmp_path, "b", servers, peer.number, pg_dsn)
            b.start()
            await eventually(lambda: rows(pg_dsn) == [], "B's delivery after A's lease ran out")
            assert [m.recipients for m in peer.factory.messages] == [["r0@remote.test"]]
        finally:
            a.signal(signal.SIGCONT)
        # ... and aborts before the body: the message is not sent a second time.
        await eventually(lambda: all(s.closed.called for s in late.factory.sessions), "abort")
        assert late.factory.messages == []
        await eventually(lambda: "lease" in a.log(), "A's log line")
        assert a.process is not None and a.process.poll() is None, "A runs on"
    finally:
        await late.stop()
        await peer.stop()


@pytest_twisted.ensureDeferred
async def test_postgresql_restarted_under_load_no_250_without_a_row_and_recovery(
    tmp_path: Path, servers: list[Server], own_pg_cluster: Any
) -> None:
    import smtplib
    import subprocess
    import threading

    from twisted.internet import threads

    dsn = own_pg_cluster.create_database()
    peer = start_peer()
    try:
        a = node(tmp_path, "a", servers, peer.number, dsn)
        a.start()
        accepted: list[str] = []
        refused: list[str] = []
        other: list[str] = []
        stop = threading.Event()

        def load() -> None:
            n = 0
            while not stop.is_set() and n < 5000:
                n += 1
                mid = f"<load-{n}@example.org>"
                body = f"Subject: load {n}\r\nMessage-ID: {mid}\r\n\r\nbody\r\n".encode()
                try:
                    send(a, "alice@example.org", [f"r{n}@remote.test"], body)
                    accepted.append(mid)
                except smtplib.SMTPDataError as e:
                    (refused if 400 <= e.smtp_code < 500 else other).append(f"{mid} {e}")

        sending = threads.deferToThread(load)
        await eventually(lambda: len(accepted) >= 20, "mail flowing")
        await threads.deferToThread(
            subprocess.run, own_pg_cluster.restart_command(), check=True, capture_output=True
        )
        after_restart = len(accepted)
        await eventually(lambda: len(accepted) >= after_restart + 30, "mail flowing again")
        stop.set()
        await sending
        assert other == [], "only 4xx while the database was away"
        assert a.process is not None and a.process.poll() is None, "no crash"

        def delivered() -> list[str]:
            ids = []
            for message in peer.factory.messages:
                for line in message.content.split(b"\r\n"):
                    if line.startswith(b"Message-ID: "):
                        ids.append(line[12:].decode())
            return ids

        await eventually(lambda: rows(dsn) == [], "the queue drained", within=60)
        # Every 250 was a committed row, delivered exactly once; nothing refused went out.
        assert sorted(delivered()) == sorted(accepted)
    finally:
        await peer.stop()


def outbox(dsn: str) -> list[tuple[Any, ...]]:
    """``(event_id, lease_node, attempts)`` of every outbox entry."""
    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT event_id, lease_node, (entry->>'attempts')::int FROM outbox_entries"
            " ORDER BY event_id"
        )
        found = cursor.fetchall()
    connection.close()
    return found


@pytest_twisted.ensureDeferred
async def test_a_killed_node_s_webhook_events_are_delivered_once_by_the_other(
    tmp_path: Path, servers: list[Server], pg_dsn: str, receivers: list[Listening]
) -> None:
    receiver = start_receiver()
    receivers.append(receiver)
    await receiver.stop()  # the application is down
    config = config_file(
        tmp_path, {"name": "app", "url": receiver.url("/hook"), "retry_schedule": QUICK}
    )
    a = node(tmp_path, "a", servers, free_port(), pg_dsn, SMTP_CONFIG=str(config))
    a.start()
    for _ in range(3):
        webhook_send(a, ["alice@example.org"])
    # Every event is in the database before its 250, tried by A, and given back for a retry.
    await eventually(
        lambda: len(outbox(pg_dsn)) == 3 and all(n >= 1 for _e, _l, n in outbox(pg_dsn)),
        "three events tried and pending",
    )
    pending = {event_id for event_id, _l, _n in outbox(pg_dsn)}
    a.signal(signal.SIGKILL)
    a.wait()
    b = node(tmp_path, "b", servers, free_port(), pg_dsn, SMTP_CONFIG=str(config))
    # With no server running on B's data directory, the command reads the cluster's outbox.
    listed = webhooks_cli(b, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {e["event_id"] for e in json.loads(listed.stdout)["entries"]} == pending
    receiver.start()  # the application is back, on the same port
    b.start()
    await eventually(lambda: outbox(pg_dsn) == [], "B's deliveries", within=60)
    assert sorted(s.webhook_id for s in receiver.receiver.seen) == sorted(pending), "once each"
    for seen in receiver.receiver.seen:
        assert check_signed(seen)["type"] == "message.received"
    with psycopg2.connect(pg_dsn) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM outbox_bodies")
        assert cursor.fetchone() == (0,), "each message went with its last event"
    connection.close()
    assert len(b.maildir_new()) == 0, "the messages were delivered on A's disk"
    assert len(a.maildir_new()) == 3


@pytest_twisted.ensureDeferred
async def test_a_410_disables_the_endpoint_on_every_node_until_a_redrive(
    tmp_path: Path, servers: list[Server], pg_dsn: str, receivers: list[Listening]
) -> None:
    receiver = start_receiver()
    receivers.append(receiver)
    receiver.receiver.script("/hook", Answer(410))
    config = config_file(
        tmp_path, {"name": "app", "url": receiver.url("/hook"), "retry_schedule": QUICK}
    )
    a = node(tmp_path, "a", servers, free_port(), pg_dsn, SMTP_CONFIG=str(config))
    b = node(tmp_path, "b", servers, free_port(), pg_dsn, SMTP_CONFIG=str(config))
    a.start()
    b.start()
    webhook_send(a, ["alice@example.org"])
    await eventually(lambda: "answered 410 Gone: disabled" in a.log(), "A's 410")
    await eventually(
        lambda: (
            webhooks_cli(b, "list").stdout.startswith("endpoint app ")
            and "DISABLED" in webhooks_cli(b, "list").stdout
        ),
        "B sees the endpoint disabled",
    )
    webhook_send(b, ["alice@example.org"])  # B's own event is kept, not sent, too
    await eventually(lambda: len(outbox(pg_dsn)) == 2, "two events kept")
    assert len(receiver.receiver.seen) == 1
    redriven = webhooks_cli(b, "redrive", "--all")
    assert redriven.returncode == 0, redriven.stderr
    assert "endpoint(s) enabled again: app" in redriven.stdout
    await eventually(lambda: outbox(pg_dsn) == [], "both sent after the redrive", within=60)
    ids = [s.webhook_id for s in receiver.receiver.seen]
    assert len(ids) == 3 and len(set(ids[1:])) == 2, "the first again, then the second, once"


def test_a_queue_url_that_is_not_postgresql_stops_the_start(tmp_path: Path) -> None:
    result = run_twistd(
        tmp_path, "-n", "--pidfile=", "mailsrv", SMTP_QUEUE_URL="mysql://db.example.org/q"
    )
    assert result.returncode != 0
    assert result.stderr.splitlines() == ["mailsrv: queue_url: expected a postgresql:// URL"]
    assert "Traceback" not in result.stdout


def test_an_unreachable_queue_database_stops_the_start_with_one_line(tmp_path: Path) -> None:
    result = run_twistd(
        tmp_path,
        "-n",
        "--pidfile=",
        "mailsrv",
        SMTP_PORT=str(free_port()),
        SMTP_QUEUE_URL=f"postgresql://nobody@127.0.0.1:{free_port()}/none",
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert "cannot open the queue database (queue_url): database error: Connection refused" in (
        output
    )
    assert "leases not released" not in output, "nothing was held"
