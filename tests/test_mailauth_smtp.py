"""Inbound mail authentication over real sockets: smtplib against an in-process server whose
checks ask a real twisted.names server on loopback.

What a client sees (250, or 550 5.7.1 for DMARC p=reject when enforcing), what is stored (one
Authentication-Results header after Return-Path, forged ones removed, quarantine headers), that
trusted and authenticated clients are neither checked nor marked (no DNS query at all), and
that a DNS server that never answers costs the budget and ends in temperror, not a stall.
"""

from __future__ import annotations

import base64
import random
import smtplib
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import authres
import authres.arc
import authres.dkim_b
import authres.dmarc
import pytest_twisted
from zope.interface import implementer

from mailsrv.auth.passwords import CHEAP_PROFILE, PasswordHasher
from mailsrv.auth.portal import build_portal
from mailsrv.auth.sqlite_store import SQLiteUserStore
from mailsrv.delivery.envelope import AcceptedMessage
from mailsrv.delivery.sinks import Failures, ICommitSink, StagedMessage
from mailsrv.dns import ServerResolver
from mailsrv.mailauth.inbound import InboundChecks
from mailsrv.mailauth.policy import InboundPolicy
from mailsrv.mailauth.verdict import DNSBLResult
from mailsrv.mailauth.verifier import Verifier
from mailsrv.screening.dnsbl import DnsblChecker
from mailsrv.screening.greylist import Greylist
from mailsrv.smtp import replies
from mailsrv.smtp.policy import RecipientPolicy
from tests.conftest import RunningServer, make_config, run_client, start_server
from tests.mailauth_dns import start_auth_dns
from tests.mailauth_rig import HELO, SERVFAIL, message, sign, zone
from tests.relay_dns import DNSServer, start_black_hole

FEATURES = authres.FeatureContext(authres.dkim_b, authres.dmarc, authres.arc)
PASSWORD = "correct horse battery"


@implementer(ICommitSink)
class Recorder:
    """A commit sink that keeps the accepted messages (to read their sizes and verdicts)."""

    name = "recorder"

    def __init__(self) -> None:
        self.messages: list[AcceptedMessage] = []

    def write(self, batch: Sequence[StagedMessage]) -> Failures:
        self.messages.extend(staged.message for staged in batch)
        return {}

    def rollback(self, staged: StagedMessage) -> None:
        pass

    def committed(self, messages: Sequence[AcceptedMessage]) -> None:
        pass


@pytest_twisted.async_yield_fixture
async def dns_server() -> AsyncIterator[DNSServer]:
    running = start_auth_dns(zone(), servfail=SERVFAIL)
    yield running
    await running.stop()


class Rig:
    """Starts servers on the test DNS server and stops them afterwards."""

    def __init__(self, tmp_path: Path, dns_address: tuple[str, int]) -> None:
        self.tmp_path = tmp_path
        self.dns_address = dns_address
        self.running: list[RunningServer] = []
        self.recorder = Recorder()

    async def serve(
        self,
        enforce: bool = False,
        spf_reject: bool = False,
        budget: float = 30.0,
        portal: Any = None,
        policy: Any = None,
        **overrides: Any,
    ) -> RunningServer:
        from twisted.internet import reactor

        overrides.setdefault("trusted_networks", ())  # 127.0.0.1 is an ordinary client here
        config = make_config(self.tmp_path / f"s{len(self.running)}", **overrides)
        hosts = self.tmp_path / "hosts"
        hosts.write_text("")
        resolver = ServerResolver(reactor, [self.dns_address], hosts_file=str(hosts))
        inbound = InboundChecks(
            Verifier(reactor, resolver, threads=2),
            InboundPolicy(enforce, spf_reject, random.Random(1)),
            config.server_name,
            budget,
        )
        running = await start_server(config, inbound=inbound, portal=portal, policy=policy)
        running.server.dnsbl = DnsblChecker(resolver, reactor)
        committer = running.server.committer
        committer.sinks = (*committer.sinks, self.recorder)
        self.running.append(running)
        return running

    async def stop(self) -> None:
        for running in self.running:
            await running.service.stopService()


@pytest_twisted.async_yield_fixture
async def rig(tmp_path: Path, dns_server: DNSServer) -> AsyncIterator[Rig]:
    made = Rig(tmp_path, dns_server.address)
    yield made
    await made.stop()


def send(
    port: int,
    content: bytes,
    sender: str = "alice@example.test",
    helo: str = HELO,
    login: str | None = None,
) -> tuple[int, bytes]:
    """One message over SMTP; the reply to DATA (or to the refused command)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=60) as client:
        if login is not None:
            client.ehlo()
            code, reply = client.docmd(
                "AUTH", "PLAIN " + base64.b64encode(f"\0{login}\0{PASSWORD}".encode()).decode()
            )
            assert code == 235, reply
        try:
            client.sendmail(sender, ["alice@example.org"], content)
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error
        except smtplib.SMTPSenderRefused as e:
            return e.smtp_code, e.smtp_error
        return 250, b""


def header_lines(stored: bytes) -> list[bytes]:
    return stored.split(b"\n\n", 1)[0].split(b"\n")


def results_of(stored: bytes) -> list[tuple[str, str]]:
    """(method, result) of our Authentication-Results header in a stored message."""
    ours = [h for h in fields(stored, b"authentication-results") if b"mx.example.org;" in h]
    assert len(ours) == 1, stored[:2000]
    parsed = FEATURES.parse(ours[0].decode().replace("\n\t", " "))
    assert parsed.authserv_id == "mx.example.org"
    return [(r.method, r.result) for r in parsed.results]


def fields(stored: bytes, name: bytes) -> list[bytes]:
    """The (folded) header fields called ``name``."""
    found: list[bytes] = []
    current = False
    for line in header_lines(stored):
        if line[:1] in (b" ", b"\t"):
            if current:
                found[-1] += b"\n" + line
            continue
        current = line.lower().startswith(name + b":")
        if current:
            found.append(line)
    return found


@pytest_twisted.ensureDeferred
async def test_a_signed_message_gets_one_header_right_after_return_path(rig: Rig) -> None:
    running = await rig.serve()
    code, _ = await run_client(send, running.port, sign(message()))
    assert code == 250
    [path] = running.maildir_files("alice@example.org")
    stored = path.read_bytes()
    lines = header_lines(stored)
    assert lines[0] == b"Return-Path: <alice@example.test>"
    assert lines[1] == b"Authentication-Results: mx.example.org;"
    assert lines[7].startswith(b"Received: from mail.example.test ([127.0.0.1])")
    assert results_of(stored) == [
        ("spf", "pass"),
        ("spf", "pass"),
        ("dkim", "pass"),
        ("dmarc", "pass"),
        ("arc", "none"),
    ]
    assert path.name.endswith(f",S={len(stored)}")
    [accepted] = rig.recorder.messages
    assert accepted.size == len(stored)
    on_the_wire = stored.partition(b"\n")[2].replace(b"\n", b"\r\n")  # a relay drops Return-Path
    assert accepted.wire_size == len(on_the_wire)
    assert accepted.authentication is not None
    assert accepted.authentication.dmarc.result == "pass"


def rcpt(port: int, sender: str) -> int:
    """MAIL FROM ``sender``, RCPT alice@example.org: the RCPT reply code."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname=HELO, timeout=60) as client:
        client.ehlo()
        client.mail(sender)
        return int(client.rcpt("alice@example.org")[0])


@pytest_twisted.ensureDeferred
async def test_greylisting_spares_senders_passing_spf_for_a_seen_domain(rig: Rig) -> None:
    from twisted.internet import reactor

    db = SQLiteUserStore(rig.tmp_path / "greylist.db", reactor)
    await db.open()
    try:
        running = await rig.serve(greylist=True, greylist_delay=0.0)
        running.server.greylist = Greylist(db)
        for domain in ("example.test", "fail.test"):  # both seen: delayed once, then passed
            assert await run_client(rcpt, running.port, f"first@{domain}") == 451
            assert await run_client(rcpt, running.port, f"first@{domain}") == 250
        # A new sender of a seen domain passes at once when SPF passes (example.test allows
        # 127.0.0.1), and waits like anyone when it fails (fail.test is "-all").
        assert await run_client(rcpt, running.port, "second@example.test") == 250
        assert await run_client(rcpt, running.port, "second@fail.test") == 451
        assert await run_client(rcpt, running.port, "someone@nospf.test") == 451, "not seen"
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_the_dnsbl_answers_travel_with_the_verdict(rig: Rig) -> None:
    running = await rig.serve(dnsbl_zones=(("bl.test", "tag"), ("clean.test", "refuse")))
    code, _ = await run_client(send, running.port, sign(message()))
    assert code == 250
    [accepted] = rig.recorder.messages
    assert accepted.authentication is not None
    assert accepted.authentication.dnsbl == (
        DNSBLResult("bl.test", True, ("127.0.0.4",), "tag"),
        DNSBLResult("clean.test", False, (), "refuse"),
    )
    [path] = running.maildir_files("alice@example.org")
    assert b"X-Mailsrv-DNSBL: bl.test=127.0.0.4\n" in path.read_bytes()


@pytest_twisted.ensureDeferred
async def test_dmarc_reject_is_only_reported_when_not_enforcing(rig: Rig) -> None:
    running = await rig.serve(enforce=False)
    code, _ = await run_client(send, running.port, message(), "bob@fail.test")
    assert code == 250
    [stored] = running.messages("alice@example.org")
    assert ("dmarc", "fail") in results_of(stored)
    assert b"dmarc=fail (p=reject pct=100 dis=none)" in stored
    assert not fields(stored, b"x-spam-flag")


@pytest_twisted.ensureDeferred
async def test_dmarc_reject_is_refused_when_enforcing(rig: Rig) -> None:
    running = await rig.serve(enforce=True)
    code, text = await run_client(send, running.port, message(), "bob@fail.test")
    reply = replies.DMARC_REJECTED
    assert (code, text) == (
        reply.code,
        f"{reply.enhanced} {reply.text}".format(domain="example.test").encode(),
    )
    assert running.messages("alice@example.org") == []
    assert list(running.server.spool.incoming.iterdir()) == []
    # the session goes on: an aligned message from the same client passes
    code, _ = await run_client(send, running.port, sign(message()), "bob@fail.test")
    assert code == 250


@pytest_twisted.ensureDeferred
async def test_quarantine_is_delivered_marked_when_enforcing(rig: Rig) -> None:
    running = await rig.serve(enforce=True)
    code, _ = await run_client(send, running.port, message(from_domain="quarantine.test"))
    assert code == 250
    [stored] = running.messages("alice@example.org")
    assert fields(stored, b"x-spam-flag") == [b"X-Spam-Flag: YES"]
    assert fields(stored, b"x-mailsrv-dmarc") == [b"X-Mailsrv-DMARC: quarantine"]
    assert b"dmarc=fail (p=quarantine pct=100 dis=quarantine)" in stored


@pytest_twisted.ensureDeferred
async def test_pct_0_turns_reject_into_quarantine(rig: Rig) -> None:
    running = await rig.serve(enforce=True)
    code, _ = await run_client(send, running.port, message(from_domain="pct0.test"))
    assert code == 250
    [stored] = running.messages("alice@example.org")
    assert b"dmarc=fail (p=reject pct=0 dis=quarantine)" in stored
    assert fields(stored, b"x-spam-flag") == [b"X-Spam-Flag: YES"]


@pytest_twisted.ensureDeferred
async def test_spf_fail_is_refused_only_when_asked(rig: Rig) -> None:
    lenient = await rig.serve()
    assert (await run_client(send, lenient.port, sign(message()), "bob@fail.test"))[0] == 250
    strict = await rig.serve(spf_reject=True)
    code, text = await run_client(send, strict.port, sign(message()), "bob@fail.test")
    assert (code, text[:8]) == (550, b"5.7.23 S")
    assert strict.messages("alice@example.org") == []


@pytest_twisted.ensureDeferred
async def test_forged_results_with_our_id_are_removed_and_others_kept(rig: Rig) -> None:
    running = await rig.serve()
    forged = (
        b"Authentication-Results: mx.example.org; dmarc=pass header.from=bank.test\r\n"
        b"Authentication-Results: (we vouch)\r\n MX.EXAMPLE.ORG; dkim=pass\r\n"
        b"Authentication-Results: relay.example.net; spf=pass smtp.mailfrom=x.test\r\n"
    )
    code, _ = await run_client(send, running.port, sign(message(extra=forged)))
    assert code == 250
    [stored] = running.messages("alice@example.org")
    found = fields(stored, b"authentication-results")
    assert len(found) == 2
    assert found[0].startswith(b"Authentication-Results: mx.example.org;\n\tspf=pass")
    assert found[1] == b"Authentication-Results: relay.example.net; spf=pass smtp.mailfrom=x.test"
    assert b"bank.test" not in stored and b"we vouch" not in stored
    assert ("dkim", "pass") in results_of(stored)  # the forged fields were not signed
    [accepted] = rig.recorder.messages
    assert accepted.size == len(stored)
    assert accepted.wire_size == len(stored.partition(b"\n")[2].replace(b"\n", b"\r\n"))


@pytest_twisted.ensureDeferred
async def test_a_large_message_gets_its_header_on_disk(rig: Rig) -> None:
    running = await rig.serve()
    body = b"".join(b"line %07d of a long message\r\n" % n for n in range(40_000))  # ~1.2 MB
    code, _ = await run_client(send, running.port, sign(message(body=body)))
    assert code == 250
    [path] = running.maildir_files("alice@example.org")
    stored = path.read_bytes()
    assert header_lines(stored)[1] == b"Authentication-Results: mx.example.org;"
    assert ("dkim", "pass") in results_of(stored)
    assert stored.endswith(body.replace(b"\r\n", b"\n"))
    assert path.name.endswith(f",S={len(stored)}")
    assert list(running.server.spool.incoming.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_trusted_clients_are_not_checked(rig: Rig, dns_server: DNSServer) -> None:
    running = await rig.serve(trusted_networks=make_config(Path("x")).trusted_networks)
    forged = b"Authentication-Results: mx.example.org; dmarc=pass\r\n"
    code, _ = await run_client(send, running.port, message(extra=forged), "bob@fail.test")
    assert code == 250
    [stored] = running.messages("alice@example.org")
    assert fields(stored, b"authentication-results") == [forged.rstrip(b"\r\n")]
    assert dns_server.factory.queries == []
    [accepted] = rig.recorder.messages
    assert accepted.authentication is None


@pytest_twisted.ensureDeferred
async def test_authenticated_clients_are_not_checked(rig: Rig, dns_server: DNSServer) -> None:
    from twisted.internet import reactor, threads

    from mailsrv.auth.sqlite_store import SQLiteUserStore

    store = SQLiteUserStore(rig.tmp_path / "users.db", reactor)
    await store.open()
    try:
        hasher = PasswordHasher(CHEAP_PROFILE)
        await store.add_account("alice@example.org", hasher.hash(PASSWORD), None, True, 0.0)
        portal = build_portal(store, hasher, threads.deferToThread, reactor)
        config = make_config(rig.tmp_path, enable_auth=True, allow_plaintext_auth=True)
        running = await rig.serve(
            portal=portal,
            policy=RecipientPolicy(config, store),
            enable_auth=True,
            allow_plaintext_auth=True,
        )
        code, _ = await run_client(
            send, running.port, message(), "bob@fail.test", login="alice@example.org"
        )
        assert code == 250
        [stored] = running.messages("alice@example.org")
        assert fields(stored, b"authentication-results") == []
        assert dns_server.factory.queries == []
    finally:
        await rig.stop()
        rig.running.clear()
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_dns_server_that_never_answers_costs_the_budget_not_a_stall(
    tmp_path: Path,
) -> None:
    port, hole = start_black_hole()
    silent = Rig(tmp_path, ("127.0.0.1", port.getHost().port))
    try:
        running = await silent.serve(budget=1.0)
        started = time.monotonic()
        code, _ = await run_client(send, running.port, sign(message()))
        elapsed = time.monotonic() - started
        assert code == 250
        assert elapsed < 30  # the budget is 1 s; generous for a loaded machine
        assert hole.received
        [stored] = running.messages("alice@example.org")
        assert results_of(stored) == [
            ("spf", "temperror"),
            ("spf", "temperror"),
            ("dkim", "temperror"),
            ("dmarc", "temperror"),
            ("arc", "none"),
        ]
    finally:
        await silent.stop()
        await port.stopListening()
