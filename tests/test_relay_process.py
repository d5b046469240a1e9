"""The relay end to end: a real ``twistd mailsrv``, smtplib as the sender, a real SMTP peer as
the smarthost, ``mailsrv queue`` as the operator; SIGKILL between accept and delivery.

The peer (``tests/relay_peer.py``) runs in the test's reactor; the server is its own process.
"""

from __future__ import annotations

import email
import email.policy
import json
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task

from tests.relay_peer import Script, start_peer
from tests.test_process import Server, free_port

MAILSRV = str(Path(sys.executable).parent / "mailsrv")
WAIT = 30.0


async def eventually(predicate: Callable[[], bool], what: str, within: float = WAIT) -> None:
    """Let the reactor run (the peer lives in it) until ``predicate`` holds."""
    from twisted.internet import reactor

    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await task.deferLater(reactor, 0.05, lambda: None)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[Server]]:
    made: list[Server] = []
    yield made
    for server in made:
        server.kill()


def relay_server(tmp_path: Path, made: list[Server], relay_port: int, **env: str) -> Server:
    server = Server(
        workdir=tmp_path,
        data_dir=tmp_path / "data",
        port=(port := free_port()),
        submission_port=free_port(port),
        extra_env={
            "SMTP_RELAY_HOST": f"127.0.0.1:{relay_port}",
            "SMTP_RELAY_TLS": "none",
            "SMTP_RELAY_CONNECTION_IDLE": "0.5",
            **env,
        },
    )
    made.append(server)
    return server


def queue_cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MAILSRV, "queue", *args],
        env=server.env(),
        cwd=server.workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def send(server: Server, sender: str, recipients: list[str], body: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.sendmail(sender, recipients, body)


def queued(server: Server) -> list[dict[str, Any]]:
    listing = queue_cli(server, "list", "--json")
    assert listing.returncode == 0, listing.stderr
    data = json.loads(listing.stdout)
    return data if isinstance(data, list) else data["messages"]


BODY = b"Subject: relayed\r\nMessage-ID: <relay-1@example.org>\r\n\r\n.dot first\r\nhello\r\n"


@pytest_twisted.ensureDeferred
async def test_trusted_client_relays_through_the_smarthost(
    tmp_path: Path, servers: list[Server]
) -> None:
    peer = start_peer()
    try:
        server = relay_server(tmp_path, servers, peer.number)
        server.start()
        send(server, "alice@example.org", ["bob@remote.test", "alice@example.org"], BODY)
        await eventually(lambda: len(peer.factory.messages) == 1, "the relayed message")
        (message,) = peer.factory.messages
        assert message.sender == "alice@example.org"
        assert message.recipients == ["bob@remote.test"]
        assert not message.bare_line_endings
        assert message.content.endswith(b"\r\n\r\n.dot first\r\nhello\r\n")
        assert b"Return-Path:" not in message.content
        assert message.content.startswith(b"Received: from ")
        assert len(server.maildir_new()) == 1, "the local recipient got its copy too"
        await eventually(lambda: not list((server.data_dir / "queue").glob("*.json")), "empty")
        assert server.stop() in (0, -signal.SIGTERM)
        assert "left the queue: 1 sent, 0 bounced" in server.log()
    finally:
        await peer.stop()


@pytest_twisted.ensureDeferred
async def test_refused_recipient_bounces_to_the_local_sender(
    tmp_path: Path, servers: list[Server]
) -> None:
    script = Script(rcpt={"nobody@remote.test": [b"550 5.1.1 No such user here"]})
    peer = start_peer(script)
    try:
        server = relay_server(tmp_path, servers, peer.number)
        server.start()
        send(server, "alice@example.org", ["nobody@remote.test", "bob@remote.test"], BODY)
        await eventually(lambda: len(server.maildir_new()) == 1, "the DSN in alice's Maildir")
        assert [m.recipients for m in peer.factory.messages] == [["bob@remote.test"]]
        report = email.message_from_bytes(
            server.maildir_new()[0].read_bytes(), policy=email.policy.default
        )
        assert report.get_content_type() == "multipart/report"
        assert report["To"].addresses[0].addr_spec == "alice@example.org"
        parts = list(report.iter_parts())
        status = parts[1]
        assert status.get_content_type() == "message/delivery-status"
        fields = status.get_payload()[1]
        assert fields["Final-Recipient"] == "rfc822; nobody@remote.test"
        assert fields["Action"] == "failed"
        assert fields["Status"] == "5.1.1"
        assert "550 5.1.1 No such user here" in fields["Diagnostic-Code"]
        assert b"Subject: relayed" in parts[2].as_bytes()
    finally:
        await peer.stop()


@pytest_twisted.ensureDeferred
async def test_kill_9_before_delivery_then_delivered_once(
    tmp_path: Path, servers: list[Server]
) -> None:
    down_port = free_port()  # nothing listens here: the smarthost is down
    server = relay_server(tmp_path, servers, down_port)
    server.start()
    for n in range(3):
        send(server, "alice@example.org", [f"r{n}@remote.test"], BODY)
    await eventually(
        lambda: (
            all(r["state"] == "deferred" for m in queued(server) for r in m["recipients"])
            and len(queued(server)) == 3
        ),
        "three deferred messages",
    )
    server.signal(signal.SIGKILL)
    server.wait()
    peer = start_peer(port=down_port)
    try:
        server.start()
        assert len(queued(server)) == 3, "the queue was rebuilt from disk"
        flushed = queue_cli(server, "flush")  # retry now rather than at the next backoff
        assert flushed.returncode == 0, flushed.stderr
        await eventually(lambda: len(peer.factory.messages) == 3, "three relayed messages")
        await eventually(lambda: queued(server) == [], "an empty queue")
        got = sorted(r for m in peer.factory.messages for r in m.recipients)
        assert got == ["r0@remote.test", "r1@remote.test", "r2@remote.test"]
    finally:
        await peer.stop()


def test_untrusted_clients_still_cannot_relay(tmp_path: Path, servers: list[Server]) -> None:
    server = relay_server(tmp_path, servers, free_port(), SMTP_TRUSTED_NETWORKS="")
    server.start()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("someone@remote.test")
        code, text = client.rcpt("bob@remote.test")
    assert (code, text[:5]) == (554, b"5.7.1")
    assert queued(server) == []
