"""SPF, DKIM, DMARC and ARC verdicts from the Verifier, with its real thread pool and the
server's resolver asking a real twisted.names server on loopback; messages signed by dkimpy
with keys the tests make.  The time budget with task.Clock: a DNS server that never answers
ends in temperror when the clock says the budget is over, not before."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.names import dns

from mailsrv.dns import ServerResolver
from mailsrv.mailauth.checks import Facts
from mailsrv.mailauth.verdict import ARCResult, DKIMResult, SPFResult, Verdict
from mailsrv.mailauth.verifier import Verifier
from tests.mailauth_dns import start_auth_dns
from tests.mailauth_rig import (
    AUTHSERV_ID,
    CLIENT_IP,
    HELO,
    SERVFAIL,
    arc_seal,
    lf,
    message,
    sign,
    zone,
)
from tests.relay_dns import DNSServer, start_black_hole


@pytest_twisted.async_yield_fixture
async def dns_server() -> AsyncIterator[DNSServer]:
    running = start_auth_dns(zone(), servfail=SERVFAIL)
    yield running
    await running.stop()


def hosts_file(tmp_path: Path) -> str:
    path = tmp_path / "hosts"
    path.write_text("")
    return str(path)


@pytest_twisted.async_yield_fixture
async def verifier(dns_server: DNSServer, tmp_path: Path) -> AsyncIterator[Verifier]:
    from twisted.internet import reactor

    resolver = ServerResolver(reactor, [dns_server.address], hosts_file=hosts_file(tmp_path))
    running = Verifier(reactor, resolver, threads=2)
    running.startService()
    yield running
    running.stopService()


async def verify(
    verifier: Verifier,
    content: bytes,
    sender: str = "alice@example.test",
    helo: str = HELO,
    ip: str = CLIENT_IP,
    budget: float = 30.0,
) -> Verdict:
    verdict: Verdict = await verifier.verify(
        Facts(ip, helo, sender, AUTHSERV_ID), lf(content), budget
    )
    return verdict


# --- SPF ---------------------------------------------------------------------------------------

PASS_NONE = ("pass", "none")
SPF_CASES = [
    ("pass", "alice@example.test", HELO, CLIENT_IP, ("pass", "pass")),
    ("fail from another address", "alice@example.test", HELO, "192.0.2.9", ("fail", "fail")),
    ("fail", "alice@fail.test", HELO, CLIENT_IP, ("fail", "pass")),
    ("softfail", "alice@soft.test", HELO, CLIENT_IP, ("softfail", "pass")),
    ("neutral", "alice@neutral.test", HELO, CLIENT_IP, ("neutral", "pass")),
    ("no SPF record", "alice@nospf.test", HELO, CLIENT_IP, ("none", "pass")),
    ("no such domain", "alice@nowhere.test", HELO, CLIENT_IP, ("none", "pass")),
    ("include answers SERVFAIL", "alice@broken-spf.test", HELO, CLIENT_IP, ("temperror", "pass")),
    ("null sender: the HELO identity", "", HELO, CLIENT_IP, ("pass", "pass")),
    (
        "HELO is an address literal",
        "alice@example.test",
        "[127.0.0.1]",
        CLIENT_IP,
        ("pass", "none"),
    ),
    ("HELO without a dot", "alice@example.test", "localhost", CLIENT_IP, PASS_NONE),
]


@pytest.mark.parametrize(
    ("sender", "helo", "ip", "expected"),
    [case[1:] for case in SPF_CASES],
    ids=[case[0] for case in SPF_CASES],
)
@pytest_twisted.ensureDeferred
async def test_spf_of_mail_from_and_helo(
    verifier: Verifier, sender: str, helo: str, ip: str, expected: tuple[str, str]
) -> None:
    verdict = await verify(verifier, message(), sender=sender, helo=helo, ip=ip)
    assert (verdict.spf_mailfrom.result, verdict.spf_helo.result) == expected, verdict
    assert verdict.spf_mailfrom.domain == (sender.rpartition("@")[2] if sender else helo)


# --- DKIM --------------------------------------------------------------------------------------


def dkim_results(verdict: Verdict) -> list[tuple[str, str, str, str]]:
    return [(d.result, d.domain, d.selector, d.algorithm) for d in verdict.dkim]


@pytest_twisted.ensureDeferred
async def test_rsa_and_ed25519_signatures_each_pass(verifier: Verifier) -> None:
    signed = sign(sign(message()), selector="ed", algorithm="ed25519-sha256")
    verdict = await verify(verifier, signed)
    assert dkim_results(verdict) == [
        ("pass", "example.test", "ed", "ed25519-sha256"),
        ("pass", "example.test", "sel", "rsa-sha256"),
    ]
    assert all(len(d.signature) == 12 for d in verdict.dkim)
    assert verdict.dkim[0].identity == "@example.test"


def modified_body(content: bytes) -> bytes:
    return content.replace(b"Hello.", b"Hello!")


def second_from(content: bytes) -> bytes:
    return b"From: Mallory <m@evil.test>\r\n" + content


OVERSIGNED = ("from", "from", "to", "subject", "date", "message-id")

DKIM_CASES = [
    ("no signature", message(), []),
    ("modified body", modified_body(sign(message())), [("fail", "body hash mismatch")]),
    ("missing key", sign(message(), selector="gone"), [("permerror", "no key")]),
    ("revoked key", sign(message(), selector="revoked"), [("permerror", "unusable key")]),
    (
        "key lookup SERVFAIL",
        sign(message(), domain="servfail.test"),
        [("temperror", "key lookup failed")],
    ),
    ("oversigned From", sign(message(), headers=OVERSIGNED), [("pass", "")]),
    (
        "a From added over an oversigned From",
        second_from(sign(message(), headers=OVERSIGNED)),
        [("fail", "signature did not verify")],
    ),
    (
        "a From added when From was signed once (dkimpy checks every From)",
        second_from(sign(message())),
        [("fail", "signature did not verify")],
    ),
    (
        "a signature that does not parse",
        message(extra=b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test\r\n"),
        [("neutral", "bad signature")],
    ),
    (
        "one good, one bad",
        sign(modified_body(sign(message(), selector="ed", algorithm="ed25519-sha256"))),
        [("pass", ""), ("fail", "body hash mismatch")],
    ),
]


@pytest.mark.parametrize(
    ("content", "expected"),
    [case[1:] for case in DKIM_CASES],
    ids=[case[0] for case in DKIM_CASES],
)
@pytest_twisted.ensureDeferred
async def test_dkim_outcomes(
    verifier: Verifier, content: bytes, expected: list[tuple[str, str]]
) -> None:
    verdict = await verify(verifier, content)
    assert [(d.result, d.reason.partition(":")[0]) for d in verdict.dkim] == expected


# --- DMARC -------------------------------------------------------------------------------------

FAILS = "bob@fail.test"  # a MAIL FROM whose SPF fails: only DKIM can align
DMARC_CASES = [
    ("aligned DKIM", sign(message()), "bob@fail.test", ("pass", "example.test", "reject", 100)),
    ("aligned SPF", message(), "bob@example.test", ("pass", "example.test", "reject", 100)),
    ("neither aligned", message(), "bob@fail.test", ("fail", "example.test", "reject", 100)),
    (
        "DKIM of another domain",
        sign(message(from_domain="quarantine.test")),
        "bob@fail.test",
        ("fail", "quarantine.test", "quarantine", 100),
    ),
    (
        "subdomain: org domain record, relaxed alignment",
        sign(message(from_domain="news.example.test")),
        "bob@fail.test",
        ("pass", "news.example.test", "reject", 100),
    ),
    (
        "subdomain SPF, relaxed",
        message(from_domain="news.example.test"),
        "bob@example.test",
        ("pass", "news.example.test", "reject", 100),
    ),
    (
        "subdomain, strict alignment",
        sign(message(from_domain="news.strict.test"), domain="strict.test"),
        "bob@news.strict.test",  # SPF passes for news.strict.test: strictly aligned
        ("pass", "news.strict.test", "reject", 100),
    ),
    (
        "strict alignment refuses the org domain's signature",
        sign(message(from_domain="news.strict.test"), domain="strict.test"),
        "bob@fail.test",
        ("fail", "news.strict.test", "reject", 100),
    ),
    (
        "pct=0",
        message(from_domain="pct0.test"),
        "bob@fail.test",
        ("fail", "pct0.test", "reject", 0),
    ),
    (
        "no record",
        message(from_domain="nodmarc.test"),
        "bob@fail.test",
        ("none", "nodmarc.test", "", 100),
    ),
    (
        "two records",
        message(from_domain="twice.test"),
        "bob@fail.test",
        ("none", "twice.test", "", 100),
    ),
    (
        "bad record",
        message(from_domain="bad.test"),
        "bob@fail.test",
        ("permerror", "bad.test", "", 100),
    ),
    (
        "a non-DMARC TXT beside the record",
        message(from_domain="other.test"),
        "bob@fail.test",
        ("fail", "other.test", "quarantine", 100),
    ),
    (
        "policy lookup SERVFAIL",
        message(from_domain="servfail.test"),
        "bob@fail.test",
        ("temperror", "servfail.test", "", 100),
    ),
    (
        "DKIM temperror is no fail",
        sign(message(), domain="servfail.test"),
        "bob@fail.test",
        ("temperror", "example.test", "reject", 100),
    ),
    (
        "the strictest of two From domains",
        message(extra=b"").replace(
            b"From: Sender <alice@example.test>", b"From: a@nodmarc.test, b@example.test"
        ),
        "bob@fail.test",
        ("fail", "example.test", "reject", 100),
    ),
    (
        "no From",
        message().replace(b"From: Sender <alice@example.test>\r\n", b""),
        "bob@fail.test",
        ("permerror", "", "", 100),
    ),
]


@pytest.mark.parametrize(
    ("content", "sender", "expected"),
    [case[1:] for case in DMARC_CASES],
    ids=[case[0] for case in DMARC_CASES],
)
@pytest_twisted.ensureDeferred
async def test_dmarc_outcomes(
    verifier: Verifier, content: bytes, sender: str, expected: tuple[str, str, str, int]
) -> None:
    verdict = await verify(verifier, content, sender=sender)
    dmarc = verdict.dmarc
    assert (dmarc.result, dmarc.from_domain, dmarc.policy, dmarc.pct) == expected
    assert dmarc.disposition == "none"  # the policy decides that (mailsrv.mailauth.policy)


# --- ARC ---------------------------------------------------------------------------------------


def tampered(content: bytes) -> bytes:
    return content.replace(b"Subject: a test", b"Subject: a changed test")


ARC_CASES = [
    ("no chain", message(), "none"),
    ("a valid chain", arc_seal(message()), "pass"),
    ("changed after sealing", tampered(arc_seal(message())), "fail"),
    ("a seal by a missing key", arc_seal(message()).replace(b"s=arc", b"s=gone"), "fail"),
]


@pytest.mark.parametrize(
    ("content", "expected"), [case[1:] for case in ARC_CASES], ids=[case[0] for case in ARC_CASES]
)
@pytest_twisted.ensureDeferred
async def test_arc_chain_validation(verifier: Verifier, content: bytes, expected: str) -> None:
    verdict = await verify(verifier, content)
    assert verdict.arc.result == expected


# --- the time budget ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_silent_dns_server_ends_in_temperror_when_the_budget_is_over(
    tmp_path: Path,
) -> None:
    from twisted.internet import reactor

    port, hole = start_black_hole()
    clock = task.Clock()
    resolver = ServerResolver(
        reactor, [("127.0.0.1", port.getHost().port)], hosts_file=hosts_file(tmp_path)
    )
    verifier = Verifier(reactor, resolver, threads=1, clock=clock)
    verifier.startService()
    try:
        pending = verifier.verify(
            Facts(CLIENT_IP, HELO, "alice@example.test", AUTHSERV_ID), lf(sign(message())), 5.0
        )
        while not getattr(hole, "received", 0):  # the SPF query really went out
            await task.deferLater(reactor, 0.01, lambda: None)
        clock.advance(4.9)
        assert not pending.called
        clock.advance(0.1)
        assert pending.called
        verdict = await pending
    finally:
        clock.advance(10)  # the worker's lookups time out too, so its thread ends
        verifier.stopService()
        await port.stopListening()
    assert verdict.spf_mailfrom == SPFResult("temperror", reason="time budget used up")
    assert verdict.dkim == (DKIMResult("temperror", reason="time budget used up"),)
    assert verdict.arc == ARCResult("none")  # no ARC set: known without DNS
    assert (verdict.dmarc.result, verdict.dmarc.from_domain) == ("temperror", "example.test")


@pytest_twisted.ensureDeferred
async def test_what_finished_in_time_is_kept(dns_server: DNSServer, tmp_path: Path) -> None:
    """SPF and DKIM answered; the DMARC record's server stalls: only DMARC is temperror."""
    from twisted.internet import reactor

    slow = start_auth_dns(zone(), slow={"_dmarc.example.test": None})
    resolver = ServerResolver(reactor, [slow.address], hosts_file=hosts_file(tmp_path))
    verifier = Verifier(reactor, resolver, threads=1)
    verifier.startService()
    try:
        verdict = await verifier.verify(
            Facts(CLIENT_IP, HELO, "alice@example.test", AUTHSERV_ID), lf(sign(message())), 1.0
        )
    finally:
        verifier.stopService()
        await slow.stop()
    assert set(slow.factory.stalled) == {"_dmarc.example.test"}  # asked, maybe twice
    assert verdict.spf_mailfrom.result == "pass"
    assert dkim_results(verdict) == [("pass", "example.test", "sel", "rsa-sha256")]
    assert verdict.dmarc.result == "temperror"


@pytest_twisted.ensureDeferred
async def test_a_full_pool_answers_temperror_at_once(tmp_path: Path) -> None:
    from twisted.internet import reactor

    port, _hole = start_black_hole()
    clock = task.Clock()
    resolver = ServerResolver(
        reactor, [("127.0.0.1", port.getHost().port)], hosts_file=hosts_file(tmp_path)
    )
    verifier = Verifier(reactor, resolver, threads=1, clock=clock, max_waiting=0)
    verifier.startService()
    facts = Facts(CLIENT_IP, HELO, "alice@example.test", AUTHSERV_ID)
    try:
        first = verifier.verify(facts, lf(message()), 5.0)
        second = verifier.verify(facts, lf(message()), 5.0)
        assert second.called
        verdict = await second
        assert verdict.spf_mailfrom.reason == "checks busy"
    finally:
        clock.advance(10)
        await first
        verifier.stopService()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_answers_are_cached_between_messages(
    verifier: Verifier, dns_server: DNSServer
) -> None:
    for _ in range(3):
        await verify(verifier, sign(message()))
    asked = [name for name, qtype, _ in dns_server.factory.queries if qtype == dns.TXT]
    assert asked.count("sel._domainkey.example.test") == 1
    assert asked.count("_dmarc.example.test") == 1


def test_the_facts_are_plain_values() -> None:
    facts: Any = Facts(CLIENT_IP, HELO, "", AUTHSERV_ID)
    assert facts.sender == ""
