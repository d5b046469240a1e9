"""The relay end to end: a real ``twistd mailsrv``, smtplib as the sender, a real SMTP peer as
the smarthost or as the MX, ``mailsrv queue`` as the operator; SIGKILL between accept and
delivery and during delivery.

The peer (``tests/relay_peer.py``) and, for direct MX delivery, an authoritative
``twisted.names`` server (``tests/relay_dns.py``) run in the test's reactor on 127.0.0.1; the
server is its own process.  Nothing reaches the machine's DNS or any non-loopback address.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import task
from twisted.names import dns

from tests.conftest import RawClient
from tests.relay_dns import start_dns
from tests.relay_peer import Script, start_peer
from tests.test_process import Server, free_port
from tests.test_submission_process import CHEAP_ARGON2, PASSWORD, users
from tests.test_tls import CertFiles

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


def report_fields(path: Path) -> dict[str, Any]:
    """A DSN parsed back: its subject and each recipient's fields, by Final-Recipient."""
    report = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report["Return-Path"] == "<>"
    status = list(report.iter_parts())[1]
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()[1:]
    return {
        "subject": report["Subject"],
        "recipients": {b["Final-Recipient"].partition("; ")[2]: b for b in blocks},
    }


def mx(preference: int, host: str) -> dns.Record_MX:
    return dns.Record_MX(preference, host.encode())


# The zone "test" as the loopback DNS server serves it: two domains whose MX host is the same
# (MX rollup), a null MX (RFC 7505); any other name in the zone is NXDOMAIN.
ZONE: dict[str, list[Any]] = {
    "a.test": [mx(10, "mx.shared.test")],
    "b.test": [mx(20, "mx.shared.test")],
    "mx.shared.test": [dns.Record_A("127.0.0.1")],
    "nullmx.test": [mx(0, "")],
}


@pytest_twisted.ensureDeferred
async def test_direct_mx_delivery_with_rollup_null_mx_and_nxdomain(
    tmp_path: Path, servers: list[Server]
) -> None:
    peer = start_peer(Script(extensions=["PIPELINING", "8BITMIME", "SIZE 10000000"]))
    names = start_dns(ZONE)
    try:
        server = Server(
            workdir=tmp_path,
            data_dir=tmp_path / "data",
            port=(port := free_port()),
            submission_port=free_port(port),
            extra_env={  # no smarthost: MX records, asked of the loopback DNS server
                "SMTP_DNS_SERVERS": f"127.0.0.1:{names.port}",
                "SMTP_RELAY_MX_PORT": str(peer.number),
                "SMTP_RELAY_CONNECTION_IDLE": "30",
            },
        )
        servers.append(server)
        server.start()
        send(server, "alice@example.org", ["bob@a.test"], BODY)
        await eventually(lambda: len(peer.factory.messages) == 1, "the message for a.test")
        # Once its outcome is on disk the connection is idle again (until then a new message
        # would rightly get a connection of its own).
        queue_dir = server.data_dir / "queue"
        await eventually(lambda: not list(queue_dir.glob("*.json")), "a.test's outcome stored")
        send(server, "alice@example.org", ["carol@b.test"], BODY)
        await eventually(lambda: len(peer.factory.messages) == 2, "the message for b.test")
        # a.test and b.test share their MX host: one destination, one connection for both.
        [session] = peer.factory.sessions
        assert [m.recipients for m in session.messages] == [["bob@a.test"], ["carol@b.test"]]
        assert "RSET" in session.commands
        for message in session.messages:  # SIZE= is the size of what was sent
            assert message.mail_line.endswith(f" SIZE={len(message.content)}")
            assert message.content.endswith(b"\r\n\r\n.dot first\r\nhello\r\n")
        asked = {(name, kind) for name, kind, _transport in names.factory.queries}
        assert {("a.test", dns.MX), ("b.test", dns.MX), ("mx.shared.test", dns.A)} <= asked

        send(server, "alice@example.org", ["x@nullmx.test", "y@missing.test"], BODY)
        await eventually(lambda: len(server.maildir_new()) == 1, "the DSN in alice's Maildir")
        report = report_fields(server.maildir_new()[0])
        assert report["subject"] == "Undelivered Mail Returned to Sender"
        null_mx, missing = (report["recipients"][a] for a in ("x@nullmx.test", "y@missing.test"))
        assert (null_mx["Action"], null_mx["Status"]) == ("failed", "5.1.10")
        assert "556 5.1.10" in null_mx["Diagnostic-Code"]
        assert (missing["Action"], missing["Status"]) == ("failed", "5.1.2")
        assert "550 5.1.2" in missing["Diagnostic-Code"]
        assert len(peer.factory.messages) == 2, "nothing was sent for them"
        await eventually(lambda: queued(server) == [], "an empty queue")
    finally:
        await peer.stop()
        await names.stop()


@pytest_twisted.ensureDeferred
async def test_authenticated_submission_relays_to_the_smarthost(
    tmp_path: Path, servers: list[Server]
) -> None:
    certs = CertFiles(tmp_path / "tls")
    peer = start_peer()
    try:
        server = relay_server(
            tmp_path,
            servers,
            peer.number,
            SMTP_TRUSTED_NETWORKS="",  # relaying needs AUTH here
            SMTP_ENABLE_TLS="true",
            SMTP_TLS_CERT=str(certs.chain),
            SMTP_TLS_KEY=str(certs.key),
            SMTP_ENABLE_AUTH="true",
            SMTP_MAILBOXES="",
            **CHEAP_ARGON2,
        )
        server.start()
        users(server, "add", "alice@example.org", password=PASSWORD)
        with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=30) as client:
            client.starttls(context=certs.client_context())
            client.ehlo("laptop.example.net")
            assert client.login("alice@example.org", PASSWORD)[0] == 235
            assert client.sendmail("alice@example.org", ["bob@remote.test"], BODY) == {}
        await eventually(lambda: len(peer.factory.messages) == 1, "the relayed message")
        [message] = peer.factory.messages
        assert (message.sender, message.recipients) == ("alice@example.org", ["bob@remote.test"])
        assert b"with ESMTPSA id" in message.content  # it came in over TLS, authenticated
        await eventually(lambda: queued(server) == [], "an empty queue")

        # The same address from a client that did not authenticate: not relayed.
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
            client.ehlo("client.test")
            client.mail("alice@example.org")
            code, text = client.rcpt("bob@remote.test")
        assert (code, text[:5]) == (554, b"5.7.1")
        assert len(peer.factory.messages) == 1
        assert PASSWORD not in server.output()
    finally:
        await peer.stop()


@pytest_twisted.ensureDeferred
async def test_kill_9_during_delivery_then_delivered_once(
    tmp_path: Path, servers: list[Server]
) -> None:
    # The peer takes the whole DATA and never answers the final dot.
    stalled = start_peer(Script(silent="final"))
    server = relay_server(tmp_path, servers, stalled.number)
    server.start()
    send(server, "alice@example.org", ["bob@remote.test"], BODY)
    await eventually(lambda: len(stalled.factory.messages) == 1, "the DATA at the peer")
    [record] = queued(server)
    assert record["recipients"][0]["state"] == "pending", "in flight: no outcome yet"
    server.signal(signal.SIGKILL)
    server.wait()
    # The stalled peer holds a complete first copy that it never acknowledged.  That is SMTP's
    # own duplicate window: a sender that gets no reply to the final dot cannot know whether
    # the message was taken, so it must send again (RFC 1047); the remote may deliver both.
    # What we promise is that every copy we count as sent was acknowledged, exactly once.
    first = stalled.factory.messages[0]
    port = stalled.number
    await stalled.stop()
    peer = start_peer(port=port)
    try:
        server.start()
        flushed = queue_cli(server, "flush")
        assert flushed.returncode == 0, flushed.stderr
        await eventually(lambda: len(peer.factory.messages) == 1, "the message, again")
        await eventually(lambda: queued(server) == [], "an empty queue")
        [again] = peer.factory.messages
        assert again.recipients == ["bob@remote.test"]
        assert again.content == first.content
        assert "left the queue: 1 sent, 0 bounced" in server.log()
    finally:
        await peer.stop()


@pytest_twisted.ensureDeferred
async def test_temporary_refusal_is_deferred_then_flushed_and_delivered(
    tmp_path: Path, servers: list[Server]
) -> None:
    script = Script(rcpt={"bob@remote.test": [b"451 4.3.0 Try again later", OK_RCPT]})
    peer = start_peer(script)
    try:
        server = relay_server(tmp_path, servers, peer.number)
        server.start()
        send(server, "alice@example.org", ["bob@remote.test"], BODY)
        await eventually(
            lambda: [r["state"] for m in queued(server) for r in m["recipients"]] == ["deferred"],
            "a deferred recipient",
        )
        [record] = queued(server)
        [bob] = record["recipients"]
        assert (bob["attempts"], bob["last_reply"]) == (1, "451 4.3.0 Try again later")
        assert bob["next_attempt"] >= bob["last_attempt"] + 300 * 0.75  # the minimal backoff
        assert peer.factory.messages == []
        flushed = queue_cli(server, "flush")
        assert flushed.returncode == 0, flushed.stderr
        assert "1 deferred recipient(s)" in flushed.stdout
        await eventually(lambda: len(peer.factory.messages) == 1, "the relayed message")
        await eventually(lambda: queued(server) == [], "an empty queue")
        assert peer.factory.messages[0].recipients == ["bob@remote.test"]
    finally:
        await peer.stop()


OK_RCPT = b"250 2.1.5 Recipient OK"


def send_with_notify(server: Server, sender: str, recipients: dict[str, list[str]]) -> None:
    """One transaction; ``recipients`` maps each address to its RCPT parameters."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.ehlo("client.test")
        assert client.mail(sender)[0] == 250
        for address, options in recipients.items():
            assert client.rcpt(address, options)[0] == 250, address
        assert client.data(BODY)[0] == 250


@pytest_twisted.ensureDeferred
async def test_delay_warning_once_and_local_success_report(
    tmp_path: Path, servers: list[Server]
) -> None:
    peer = start_peer(Script(rcpt={"bob@remote.test": [b"451 4.7.1 Greylisted, come back"]}))
    try:
        server = relay_server(tmp_path, servers, peer.number, SMTP_RELAY_DELAY_WARNING="1")
        server.start()
        send_with_notify(
            server,
            "alice@example.org",
            {"bob@remote.test": [], "alice@example.org": ["NOTIFY=SUCCESS"]},
        )

        def reports() -> list[dict[str, Any]]:
            return [
                report_fields(p)
                for p in server.maildir_new()
                if b"multipart/report" in p.read_bytes()
            ]

        # The local copy, then at once the report that asked for it.
        await eventually(lambda: len(reports()) == 1, "the success report")
        [delivered] = reports()
        assert delivered["subject"] == "Successful Mail Delivery Report"
        assert delivered["recipients"]["alice@example.org"]["Action"] == "delivered"

        def attempts() -> int:
            return sum(r["attempts"] for m in queued(server) for r in m["recipients"])

        await eventually(lambda: attempts() == 1, "the first attempt")
        assert len(reports()) == 1, "no warning with the first deferral: not 1 s old yet"
        [record] = queued(server)
        # The server's clock is the real one: wait until the message is older than 1 s.
        await eventually(lambda: time.time() > record["created_at"] + 1.2, "a second to pass")
        for n in (2, 3):
            assert queue_cli(server, "flush").returncode == 0
            await eventually(partial(lambda n: attempts() == n, n), f"attempt {n}")
        await eventually(lambda: len(reports()) == 2, "the delay warning")
        warning = next(r for r in reports() if "Delayed" in r["subject"])
        bob = warning["recipients"]["bob@remote.test"]
        assert (bob["Action"], bob["Status"]) == ("delayed", "4.7.1")
        assert "Will-Retry-Until" in bob
        [record] = queued(server)
        assert record["recipients"][0]["delay_warned"] is True
        assert len(reports()) == 2, "one warning, not one per deferral"
        assert len(server.maildir_new()) == 3  # alice's copy and the two reports
    finally:
        await peer.stop()


def dotted_body() -> tuple[bytes, bytes]:
    """(the DATA a client sends, dot-stuffed, with bare CR and LF; the content it means, CRLF).

    Mostly lines of a single dot, so that read chunks of the stored body (64 KiB) often start
    with one; some lines carry a bare LF or CR, which ``normalize`` turns into line ends.
    """
    lines = [b"Subject: dots", b"Message-ID: <dots@example.org>", b"", b"."]
    for n in range(60000):
        lines.append(b"." if n % 7 else b"..%d" % n)
        if n % 5000 == 0:
            lines.append(b"bare\nLF and bare\rCR inside")
    lines.append(b"end")
    content = re.sub(rb"\r\n|\r|\n", b"\r\n", b"\r\n".join(lines) + b"\r\n")
    data = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return data + b".\r\n", content


@pytest_twisted.ensureDeferred
async def test_what_is_accepted_arrives_byte_identical_at_the_next_hop(
    tmp_path: Path, servers: list[Server]
) -> None:
    peer = start_peer()
    try:
        server = relay_server(tmp_path, servers, peer.number, SMTP_BARE_LINE_ENDINGS="normalize")
        server.start()
        data, content = dotted_body()
        assert len(content) > 3 * 65536  # several read chunks
        client = RawClient(server.port)
        try:
            assert client.read_reply().startswith(b"220 ")
            assert client.command(b"EHLO client.test").startswith(b"250")
            assert client.command(b"MAIL FROM:<alice@example.org>").startswith(b"250 ")
            assert client.command(b"RCPT TO:<bob@remote.test>").startswith(b"250 ")
            assert client.command(b"DATA").startswith(b"354 ")
            client.send(data)
            assert client.read_reply().startswith(b"250 ")
            client.command(b"QUIT")
        finally:
            client.close()
        await eventually(lambda: len(peer.factory.messages) == 1, "the relayed message")
        await eventually(lambda: queued(server) == [], "an empty queue")
        [message] = peer.factory.messages
        assert not message.bare_line_endings
        assert message.content.startswith(b"Received: from client.test ")
        received, separator, rest = message.content.partition(b"\r\nSubject: dots\r\n")
        assert separator and b"Subject: dots\r\n" + rest == content
        # Our Received header (folded lines), and no Return-Path.
        assert all(line.startswith(b"\t") for line in received.split(b"\r\n")[1:])
    finally:
        await peer.stop()
