"""DKIM signing end to end: keys made by ``mailsrv dkim keygen``, a real ``twistd mailsrv``,
smtplib as the sender (trusted loopback, or AUTH over STARTTLS), a real SMTP peer as the next
hop, and dkimpy verifying what the peer received against the TXT records keygen printed.

The peer (``tests/relay_peer.py``) runs in the test's reactor; the server is its own process.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import signal
import smtplib
import subprocess
from pathlib import Path

import dkim
import pytest
import pytest_twisted

from tests.relay_peer import Message, Script, start_peer
from tests.test_process import Server
from tests.test_relay_process import (
    MAILSRV,
    OK_RCPT,
    eventually,
    queue_cli,
    queued,
    relay_server,
)
from tests.test_submission_process import CHEAP_ARGON2, PASSWORD, users
from tests.test_tls import CertFiles

ZONE_STRING = re.compile(r'"([^"]*)"')


def dkim_cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MAILSRV, "dkim", *args],
        env=server.env(),
        cwd=server.workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Zone:
    """The TXT records ``mailsrv dkim keygen`` printed, as a dkimpy ``dnsfunc``."""

    def __init__(self) -> None:
        self.records: dict[bytes, bytes] = {}

    def keygen(self, server: Server, domain: str, *args: str) -> str:
        """Make a key; returns its selector."""
        done = dkim_cli(server, "keygen", domain, *args)
        assert done.returncode == 0, done.stderr
        [line] = [line for line in done.stdout.splitlines() if not line.startswith(";")]
        name = line.split()[0]  # s202612r._domainkey.example.org.
        self.records[name.rstrip(".").encode()] = "".join(ZONE_STRING.findall(line)).encode()
        return name.partition(".")[0]

    def __call__(self, name: bytes, timeout: int = 5) -> bytes | None:
        return self.records.get(name.rstrip(b"."))


def signatures(message: Message) -> list[dict[bytes, bytes]]:
    """The tags of each DKIM-Signature of ``message``, top first."""
    verifier = dkim.DKIM(message.content)
    found = []
    for index, (name, value) in enumerate(verifier.headers):
        if name.lower() == b"dkim-signature":
            found.append((index, dkim.util.parse_tag_value(value)))
    return [tags for _index, tags in found]


def verify_all(message: Message, zone: Zone) -> list[tuple[bytes, bytes, bytes]]:
    """Verify every signature of ``message``; their (d=, s=, a=)."""
    verifier = dkim.DKIM(message.content)
    seen = []
    for index, tags in enumerate(signatures(message)):
        assert verifier.verify(idx=index, dnsfunc=zone), tags
        seen.append((tags[b"d"], tags[b"s"], tags[b"a"]))
    return seen


BODY = (
    b"From: Alice <alice@example.org>\r\nTo: bob@remote.test, alice@example.org\r\n"
    b"Subject: signed\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\n"
    b"Message-ID: <dkim-1@example.org>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\n.dot first\r\nhello   \r\n"
)


def send(server: Server, sender: str, recipients: list[str], body: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.sendmail(sender, recipients, body)


@pytest.mark.parametrize("types", [("rsa",), ("ed25519",), ("rsa", "ed25519")])
@pytest_twisted.ensureDeferred
async def test_relayed_mail_arrives_signed_and_the_local_copy_does_not(
    tmp_path: Path, servers: list[Server], types: tuple[str, ...]
) -> None:
    peer = start_peer(Script(extensions=["PIPELINING", "8BITMIME", "SIZE 10000000"]))
    try:
        server = relay_server(tmp_path, servers, peer.number)
        (server.data_dir).mkdir(mode=0o700)
        zone = Zone()
        selectors = [zone.keygen(server, "example.org", "--type", kind) for kind in types]
        server.start()
        send(server, "alice@example.org", ["bob@remote.test", "alice@example.org"], BODY)
        await eventually(lambda: len(peer.factory.messages) == 1, "the relayed message")
        [message] = peer.factory.messages
        algorithms = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}
        assert verify_all(message, zone) == [
            (b"example.org", s.encode(), algorithms[t])
            for s, t in zip(selectors, types, strict=True)
        ]
        for tags in signatures(message):
            assert tags[b"c"] == b"relaxed/relaxed"
            signed = [h.strip() for h in tags[b"h"].split(b":")]
            assert signed == [
                b"from",
                b"from",
                b"subject",
                b"date",
                b"to",
                b"message-id",
                b"mime-version",
                b"content-type",
            ]
        assert message.content.startswith(b"DKIM-Signature: v=1; a=")  # on top of Received
        assert message.mail_line.endswith(f" SIZE={len(message.content)}")  # counted too
        [local] = server.maildir_new()
        assert b"DKIM-Signature" not in local.read_bytes()  # the local copy is not signed
        await eventually(lambda: queued(server) == [], "an empty queue")
        assert "DKIM signing for 1 domain(s): example.org" in server.log()
    finally:
        await peer.stop()


@pytest_twisted.ensureDeferred
async def test_only_the_domains_with_keys_are_signed_and_bounces_are_signed_too(
    tmp_path: Path, servers: list[Server]
) -> None:
    script = Script(rcpt={"nobody@remote.test": [b"550 5.1.1 No such user here"]})
    peer = start_peer(script)
    try:
        server = relay_server(tmp_path, servers, peer.number, SMTP_LOG_LEVEL="debug")
        server.data_dir.mkdir(mode=0o700)
        zone = Zone()
        selector = zone.keygen(server, "example.org", "--type", "ed25519").encode()
        zone.keygen(server, "sender.example", "--type", "rsa")
        server.start()
        unkeyed = BODY.replace(b"alice@example.org>", b"carol@other.example>")
        send(server, "carol@other.example", ["bob@remote.test"], unkeyed)  # 1: no key at all
        await eventually(lambda: len(peer.factory.messages) == 1, "the unsigned message")
        # 2: From: has no key, MAIL FROM's domain has one: signed by it (not DMARC-aligned).
        send(server, "dave@sender.example", ["bob@remote.test"], unkeyed)
        await eventually(lambda: len(peer.factory.messages) == 2, "the second message")
        # 3: bounced by the peer; the DSN from <> to the remote sender goes out signed by the
        # host name's domain (mx.example.org: example.org's key).
        send(server, "eve@remote.test", ["nobody@remote.test"], BODY)
        await eventually(lambda: len(peer.factory.messages) == 3, "the DSN")
        first, second, dsn = peer.factory.messages
        assert b"DKIM-Signature" not in first.content
        assert verify_all(second, zone)[0][0] == b"sender.example"
        assert (dsn.sender, dsn.recipients) == ("", ["eve@remote.test"])
        report = email.message_from_bytes(dsn.content, policy=email.policy.default)
        assert report["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.example.org"
        assert verify_all(dsn, zone) == [(b"example.org", selector, b"ed25519-sha256")]
        await eventually(lambda: queued(server) == [], "an empty queue")
        assert re.search(r"not DKIM-signed: no key for From other\.example", server.log())
    finally:
        await peer.stop()


@pytest_twisted.ensureDeferred
async def test_the_signature_is_made_once_and_sent_again_after_a_deferral(
    tmp_path: Path, servers: list[Server]
) -> None:
    script = Script(
        rcpt={"bob@remote.test": [b"451 4.3.0 Try again later", OK_RCPT]},
        extensions=["PIPELINING", "8BITMIME", "SIZE 10000000"],
    )
    peer = start_peer(script)
    try:
        server = relay_server(tmp_path, servers, peer.number, SMTP_LOG_LEVEL="debug")
        server.data_dir.mkdir(mode=0o700)
        zone = Zone()
        zone.keygen(server, "example.org")
        server.start()
        send(server, "alice@example.org", ["bob@remote.test"], BODY)
        await eventually(
            lambda: [r["state"] for m in queued(server) for r in m["recipients"]] == ["deferred"],
            "a deferred recipient",
        )
        [record] = queued(server)
        stored = record["relay_headers"]
        assert stored.startswith("DKIM-Signature: v=1; a=rsa-sha256;") and stored.endswith("\n")
        assert record["wire_size"] > record["size"]  # the signature counts on the wire
        flushed = queue_cli(server, "flush")
        assert flushed.returncode == 0, flushed.stderr
        await eventually(lambda: len(peer.factory.messages) == 1, "the relayed message")
        [message] = peer.factory.messages
        assert message.content.startswith(stored.replace("\n", "\r\n").encode())
        assert message.mail_line.endswith(f" SIZE={len(message.content)}")
        assert verify_all(message, zone)
        assert server.log().count("DKIM-signed by") == 1  # one signing, two attempts
    finally:
        await peer.stop()


def start_submission_server(
    tmp_path: Path, made: list[Server], relay_port: int, **env: str
) -> tuple[Server, CertFiles]:
    certs = CertFiles(tmp_path / "tls")
    server = relay_server(
        tmp_path,
        made,
        relay_port,
        SMTP_TRUSTED_NETWORKS="",  # relaying needs AUTH here
        SMTP_ENABLE_TLS="true",
        SMTP_TLS_CERT=str(certs.chain),
        SMTP_TLS_KEY=str(certs.key),
        SMTP_ENABLE_AUTH="true",
        SMTP_MAILBOXES="",
        **CHEAP_ARGON2,
        **env,
    )
    server.data_dir.mkdir(mode=0o700)
    return server, certs


def submit(server: Server, certs: CertFiles, sender: str, body: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=30) as client:
        client.starttls(context=certs.client_context())
        client.ehlo("laptop.example.net")
        assert client.login("alice@example.org", PASSWORD)[0] == 235
        assert client.sendmail(sender, ["bob@remote.test"], body) == {}


@pytest_twisted.ensureDeferred
async def test_an_account_gets_its_own_domains_signature_and_no_other(
    tmp_path: Path, servers: list[Server]
) -> None:
    peer = start_peer()
    try:
        server, certs = start_submission_server(tmp_path, servers, peer.number)
        zone = Zone()
        selector = zone.keygen(server, "example.org", "--type", "ed25519").encode()
        zone.keygen(server, "bank.example", "--type", "ed25519")  # another customer's domain
        server.start()
        users(server, "add", "alice@example.org", password=PASSWORD)
        submit(server, certs, "alice@example.org", BODY)
        forged = BODY.replace(b"Alice <alice@example.org>", b"The Bank <ceo@bank.example>")
        submit(server, certs, "alice@example.org", forged)
        await eventually(lambda: len(peer.factory.messages) == 2, "both messages")
        own, other = peer.factory.messages
        assert verify_all(own, zone)[0][0] == b"example.org"
        # The bank's key never signs alice's mail; her own domain's (MAIL FROM) does.
        assert verify_all(other, zone) == [(b"example.org", selector, b"ed25519-sha256")]
    finally:
        await peer.stop()


@pytest_twisted.ensureDeferred
async def test_new_keys_sign_without_a_restart(tmp_path: Path, servers: list[Server]) -> None:
    peer = start_peer()
    try:
        server = relay_server(tmp_path, servers, peer.number)
        server.data_dir.mkdir(mode=0o700)
        server.start()
        assert "no active DKIM key: nothing is signed" in server.log()
        send(server, "alice@example.org", ["bob@remote.test"], BODY)
        await eventually(lambda: len(peer.factory.messages) == 1, "the unsigned message")
        zone = Zone()
        made = dkim_cli(server, "keygen", "example.org", "--type", "ed25519")  # told the server
        assert made.returncode == 0, made.stderr
        assert "the running server reloaded its keys: DKIM signing for 1 domain(s)" in made.stderr
        zone.records.update(_records(made.stdout))
        send(server, "alice@example.org", ["bob@remote.test"], BODY)
        await eventually(lambda: len(peer.factory.messages) == 2, "the signed message")
        assert b"DKIM-Signature" not in peer.factory.messages[0].content
        assert verify_all(peer.factory.messages[1], zone)

        # Taken away behind the server's back, then SIGHUP: nothing is signed any more.
        for path in (server.data_dir / "dkim" / "example.org").iterdir():
            path.unlink()
        server.signal(signal.SIGHUP)
        await eventually(lambda: server.log().count("nothing is signed") == 2, "the reload")
        send(server, "alice@example.org", ["bob@remote.test"], BODY)
        await eventually(lambda: len(peer.factory.messages) == 3, "the third message")
        assert b"DKIM-Signature" not in peer.factory.messages[2].content

        # A broken key file at SIGHUP: refused, the keys in use stay.
        (server.data_dir / "dkim" / "example.org" / "s1.rsa.key").write_text("junk")
        server.signal(signal.SIGHUP)
        await eventually(lambda: "DKIM keys not reloaded" in server.log(), "the refusal")
        assert "s1.rsa.key: not a PEM private key" in server.log()
    finally:
        await peer.stop()


def _records(output: str) -> dict[bytes, bytes]:
    records = {}
    for line in output.splitlines():
        if line and not line.startswith(";"):
            name = line.split()[0].rstrip(".").encode()
            records[name] = "".join(ZONE_STRING.findall(line)).encode()
    return records


def test_a_broken_key_stops_the_start_with_one_line(tmp_path: Path, servers: list[Server]) -> None:
    server = relay_server(tmp_path, servers, 9)
    folder = server.data_dir / "dkim" / "example.org"
    folder.mkdir(parents=True, mode=0o700)
    (folder / "s1.ed25519.key").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n")
    with pytest.raises(AssertionError, match="twistd exited"):
        server.start()
    lines = [line for line in server.output().splitlines() if "s1.ed25519.key" in line]
    assert lines == [f"mailsrv: DKIM key {folder / 's1.ed25519.key'}: not a PEM private key"]
    checked = subprocess.run(
        [MAILSRV, "check-config", "-q"], env=server.env(), capture_output=True, text=True
    )
    assert (checked.returncode, checked.stderr) == (2, lines[0] + "\n")


def test_list_shows_every_key_and_json(tmp_path: Path, servers: list[Server]) -> None:
    server = relay_server(tmp_path, servers, 9)
    server.data_dir.mkdir(mode=0o700)
    empty = dkim_cli(server, "list")
    assert (empty.returncode, empty.stdout) == (
        0,
        "No DKIM keys (mailsrv dkim keygen DOMAIN makes one)\n",
    )
    zone = Zone()
    first = zone.keygen(server, "example.org")
    zone.keygen(server, "example.org", "--selector", "next")
    listing = dkim_cli(server, "list")
    assert listing.returncode == 0, listing.stderr
    header, *rows = listing.stdout.splitlines()
    assert header.split() == ["DOMAIN", "SELECTOR", "TYPE", "STATE", "CREATED"]
    assert [row.split()[:4] for row in rows] == [
        ["example.org", "next", "rsa-2048", "-"],
        ["example.org", first, "rsa-2048", "active"],
    ]
    assert all(row.endswith(" UTC") for row in rows)
    data = json.loads(dkim_cli(server, "list", "--json").stdout)
    assert [(k["selector"], k["active"], k["bits"]) for k in data] == [
        ("next", False, 2048),
        (first, True, 2048),
    ]
    assert data[1]["record"].encode() == zone.records[f"{first}._domainkey.example.org".encode()]
