"""DKIM records and signatures: what keygen prints is what a verifier (dkimpy) needs, the
signature verifies on the message as the relay sends it, and the right key signs."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dkim
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer
from twisted.logger import capturedLogs
from zope.interface.verify import verifyObject

from mailsrv.delivery.envelope import (
    AcceptedMessage,
    ClientFacts,
    LocalRoute,
    Recipient,
    RemoteRoute,
)
from mailsrv.delivery.sinks import ICommitPreparer, PendingBody
from mailsrv.dkim.keys import KeyDirectory, KeyRing, KeyType, StoredKey
from mailsrv.dkim.record import compare, txt_strings, txt_value, zone_line
from mailsrv.dkim.signer import DkimSigner, signs_for
from mailsrv.dkim.signing import (
    choose_keys,
    from_domain,
    sign_message,
    sign_spooled,
    signed_fields,
)
from mailsrv.relay.body import wire_form
from mailsrv.relay.bounces import DSN_LISTENER
from tests.test_relay_body import unstuff

RSA, ED = KeyType.RSA, KeyType.ED25519


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory) -> KeyRing:
    keys = KeyDirectory(tmp_path_factory.mktemp("keys") / "dkim")
    keys.create("example.org", "s1", RSA)
    keys.create("example.org", "e1", ED)
    keys.create("example.org", "s2", RSA)  # inactive: the next one
    keys.create("only-ed.example", "e1", ED)
    keys.create("sender.example", "s1", RSA)
    return keys.load()


def key(ring: KeyRing, domain: str, selector: str) -> StoredKey:
    found = ring.get(domain, selector)
    assert found is not None
    return found


ZONE_STRING = re.compile(r'"([^"]*)"')


def dns_from_zone_lines(*lines: str) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` answering from zone lines as ``zone_line`` prints them."""
    records = {}
    for line in lines:
        name = line.split()[0]
        records[name.encode()] = "".join(ZONE_STRING.findall(line)).encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    return dnsfunc


# --- the record ------------------------------------------------------------------------------


def test_the_record_is_cut_into_strings_of_255_bytes_at_most(ring: KeyRing) -> None:
    rsa_key = key(ring, "example.org", "s1")
    value = txt_value(rsa_key)
    assert value.startswith("v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA")
    strings = txt_strings(value)
    assert len(strings) == 2 and all(len(s.encode()) <= 255 for s in strings)
    assert "".join(strings) == value
    line = zone_line(rsa_key)
    assert line.startswith('s1._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; p=')
    assert ZONE_STRING.findall(line) == strings
    ed_value = txt_value(key(ring, "example.org", "e1"))
    assert re.fullmatch(r"v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}=", ed_value)


def published(key: StoredKey, **tags: str) -> bytes:
    fields = {"v": "DKIM1", "k": key.type.value, "p": base64.b64encode(key.public).decode()}
    fields.update(tags)
    return "; ".join(f"{k}={v}" for k, v in fields.items() if v != "-").encode()


def test_compare_a_published_record_with_the_key(ring: KeyRing) -> None:
    rsa_key, other = key(ring, "example.org", "s1"), key(ring, "example.org", "s2")
    ed_key = key(ring, "example.org", "e1")
    spki = serialization.load_der_public_key(rsa_key.public)
    pkcs1 = spki.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    folded = txt_value(rsa_key).replace("p=", "p=\t").encode()
    cases = [
        ([txt_value(rsa_key).encode()], True, "the published record matches the key"),
        ([folded], True, "matches"),  # whitespace inside p= is allowed
        ([published(rsa_key, v="-", k="-")], True, "matches"),  # v= and k= are optional
        ([published(rsa_key, p=base64.b64encode(pkcs1).decode())], True, "matches"),
        ([published(rsa_key, h="sha1:sha256", s="email")], True, "matches"),
        ([txt_value(ed_key).encode()], False, "the record is for k=ed25519, the key is rsa"),
        ([published(other)], False, "the record holds a different public key"),
        ([published(rsa_key, p="")], False, "the record revokes the key (empty p=)"),
        ([published(rsa_key, p="!!!")], False, "the record's p= is not base64"),
        ([published(rsa_key, h="sha1")], False, "the record's h= does not allow sha256"),
        ([published(rsa_key, s="tlsrpt")], False, "the record's s= does not allow email"),
        ([], False, "no TXT record at s1._domainkey.example.org"),
        ([b"v=spf1 -all"], False, "is not a DKIM key record"),
        ([published(rsa_key), published(other)], False, "2 DKIM key records at"),
        ([b"just text", published(rsa_key)], True, "matches"),
    ]
    for records, matches, reason in cases:
        verdict = compare(rsa_key, records)
        assert (verdict.matches, reason in verdict.reason) == (matches, True), (records, verdict)


# --- signing ---------------------------------------------------------------------------------

STORED = (
    b"Return-Path: <alice@example.org>\n"
    b"Received: from laptop (127.0.0.1) by mx.example.org; Mon, 1 Jan 2026 00:00:00 +0000\n"
    b"From: Alice <alice@example.org>\n"
    b"To: bob@remote.test\n"
    b"To: carol@remote.test\n"
    b"Subject: signed\n"
    b"Date: Mon, 1 Jan 2026 00:00:00 +0000\n"
    b"Message-ID: <1@example.org>\n"
    b"X-Mailer: not signed\n"
    b"\n"
    b".a line that starts with a dot\n"
    b"trailing space   \n"
)


def received(stored: bytes, headers: bytes) -> bytes:
    """What the next hop stores: the wire form of the stored body with ``headers`` on top."""
    return unstuff(wire_form(stored, headers)).replace(b"\n", b"\r\n")


@pytest.mark.parametrize(
    "selectors",
    [("s1",), ("e1",), ("s1", "e1")],
    ids=["rsa", "ed25519", "both"],
)
def test_the_signature_verifies_on_the_message_as_the_relay_sends_it(
    ring: KeyRing, selectors: tuple[str, ...]
) -> None:
    keys = [key(ring, "example.org", s) for s in selectors]
    headers = sign_message(STORED, [k.signing for k in keys])
    assert headers.count(b"DKIM-Signature:") == len(keys)
    assert b"\r" not in headers and headers.endswith(b"\n")
    message = received(STORED, headers)
    dnsfunc = dns_from_zone_lines(*(zone_line(k) for k in keys))
    verifier = dkim.DKIM(message)
    for index, stored_key in enumerate(keys):
        assert verifier.verify(idx=index, dnsfunc=dnsfunc), stored_key.selector
        fields = verifier.signature_fields
        assert fields[b"a"] == stored_key.type.algorithm.encode()
        assert fields[b"c"] == b"relaxed/relaxed"
        assert (fields[b"d"], fields[b"s"]) == (b"example.org", stored_key.selector.encode())
        signed = [h.strip() for h in fields[b"h"].split(b":")]
        assert signed == [b"from", b"from", b"subject", b"date", b"to", b"to", b"message-id"]
    assert b"a=rsa-sha256" in headers.split(b"DKIM-Signature:")[1] or selectors == ("e1",)
    # A header added on the way: an oversigned From breaks it, an unsigned field does not.
    assert not dkim.verify(b"From: mallory@evil.test\r\n" + message, dnsfunc=dnsfunc)
    assert dkim.verify(b"X-Spam: no\r\n" + message, dnsfunc=dnsfunc)
    changed = message.replace(b"trailing space", b"trailing spade")
    assert not dkim.verify(changed, dnsfunc=dnsfunc)


def test_bare_line_ends_are_signed_as_the_relay_sends_them(ring: KeyRing) -> None:
    stored = STORED.replace(b"trailing space   \n", b"one\rtwo\r\nthree")
    signing = key(ring, "example.org", "e1")
    headers = sign_message(stored, [signing.signing])
    dnsfunc = dns_from_zone_lines(zone_line(signing))
    assert dkim.verify(received(stored, headers), dnsfunc=dnsfunc)


def test_a_spooled_message_is_signed_from_the_file_and_the_part_in_memory(
    ring: KeyRing, tmp_path: Path
) -> None:
    signing = key(ring, "example.org", "s1")
    path = tmp_path / "spooled"
    path.write_bytes(STORED[:100])
    headers = sign_spooled(str(path), STORED[100:], (signing.signing,))
    dnsfunc = dns_from_zone_lines(zone_line(signing))
    assert dkim.verify(received(STORED, headers), dnsfunc=dnsfunc)
    in_memory = sign_spooled(str(tmp_path / "not written yet"), STORED, (signing.signing,))
    assert dkim.verify(received(STORED, in_memory), dnsfunc=dnsfunc)


def test_signed_fields_lists_each_present_field_and_from_once_more() -> None:
    names = [b"Received", b"FROM", b"Cc", b"cc", b"Content-Type", b"X-Other", b"References"]
    assert signed_fields(names) == [
        b"from",
        b"from",
        b"cc",
        b"cc",
        b"content-type",
        b"references",
    ]
    assert signed_fields([]) == [b"from"]  # no From: still oversigned against adding one


@pytest.mark.parametrize(
    ("head", "domain"),
    [
        (b"From: alice@Example.ORG\n\n", "example.org"),
        (b'From: "Doe, Jane" <jane@example.org>\n\n', "example.org"),
        (b"From: =?utf-8?q?J=C3=B6rg?= <j@example.org>, other@example.net\n\n", "example.org"),
        (b"Subject: x\nfrom: \n  folded@example.org\n\nFrom: body@example.net\n", "example.org"),
        ("From: jörg@bücher.example\n\n".encode(), "xn--bcher-kva.example"),
        (b"From: undisclosed-recipients:;\n\n", None),
        (b"From: nobody\n\n", None),
        (b"From: a@1.2.3.4\n\n", None),
        (b"Subject: no from\n\n", None),
        (b"From: \xff\xfe@\xff.example\n\n", None),
        (b"", None),
    ],
)
def test_the_from_domain(head: bytes, domain: str | None) -> None:
    assert from_domain(head) == domain


@pytest.mark.parametrize(
    ("header_from", "sender", "login", "signer"),
    [
        # Trusted network or mailsrv itself (no login): the From: domain's key, else MAIL FROM's.
        ("example.org", "alice@example.org", None, "example.org"),
        ("news.example.org", "", None, "example.org"),  # a parent's key; a DSN from <>
        ("example.net", "alice@sender.example", None, "sender.example"),
        ("only-ed.example", "alice@sender.example", None, "only-ed.example"),
        (None, "alice@sender.example", None, "sender.example"),
        ("example.net", "alice@example.net", None, None),
        (None, "", None, None),
        # An account: the From: domain only when it is the login's or MAIL FROM's (or under).
        ("example.org", "alice@example.org", "alice@example.org", "example.org"),
        ("news.example.org", "alice@example.org", "alice@example.org", "example.org"),
        ("example.org", "alice@sender.example", "alice@sender.example", "sender.example"),
        ("example.org", "app@example.org", "app@sender.example", "example.org"),
        ("example.org", "x@remote.test", "mallory@remote.test", None),
    ],
)
def test_which_key_signs(
    ring: KeyRing, header_from: str | None, sender: str, login: str | None, signer: str | None
) -> None:
    keys = choose_keys(ring, header_from, sender, login)
    assert {k.domain for k in keys} == ({signer} if signer else set())
    if signer == "example.org":
        assert [k.selector for k in keys] == ["s1", "e1"]  # both active keys, RSA first


# --- the commit step -------------------------------------------------------------------------


def message_from(client: ClientFacts, remote: bool = True) -> AcceptedMessage:
    route = RemoteRoute("remote.test") if remote else LocalRoute(("alice@example.org",))
    recipient = "bob@remote.test" if remote else "alice@example.org"
    return AcceptedMessage(
        "Q1", "alice@example.org", (Recipient(recipient, route),), client, 0.0, len(STORED)
    )


TRUSTED = ClientFacts("127.0.0.1", "laptop", "mx", trusted=True)
ACCOUNT = ClientFacts("192.0.2.7", "laptop", "submission", login="alice@example.org")
DSN = ClientFacts("127.0.0.1", "mx.example.org", DSN_LISTENER)
STRANGER = ClientFacts("192.0.2.9", "mx.remote.test", "mx")


def test_only_relayed_mail_from_accounts_trusted_networks_and_mailsrv_is_signed() -> None:
    assert signs_for(message_from(TRUSTED))
    assert signs_for(message_from(ACCOUNT))
    assert signs_for(message_from(DSN))
    assert not signs_for(message_from(STRANGER))  # MX mail (and its alias forwarding)
    assert not signs_for(message_from(TRUSTED, remote=False))  # stays here


def run_now(function: Callable[..., object], *args: object) -> Any:
    return defer.maybeDeferred(function, *args)


@pytest_twisted.ensureDeferred
async def test_the_signer_adds_the_signature_or_goes_without_it(
    ring: KeyRing, tmp_path: Path
) -> None:
    signer = DkimSigner(KeyDirectory(tmp_path / "none"), ring, run_now, run_now)
    assert verifyObject(ICommitPreparer, signer)
    body = PendingBody(tmp_path / "not written yet", STORED)
    assert signer.prepare(message_from(STRANGER), body) is None
    signed = signer.prepare(message_from(TRUSTED), body)
    assert signed is not None
    message = await signed
    zone = dns_from_zone_lines(*(zone_line(k) for k in ring.keys if k.domain == "example.org"))
    assert dkim.verify(received(STORED, message.relay_headers), dnsfunc=zone)
    # A header dkimpy cannot parse: the message goes unsigned, with a warning.
    broken = PendingBody(body.path, STORED.replace(b"X-Mailer: not signed\n", b"no colon\n"))
    with capturedLogs() as events:
        unsigned = await signer.prepare(message_from(TRUSTED), broken)  # type: ignore[misc]
    assert unsigned.relay_headers == b""
    [warning] = [e for e in events if "without a DKIM signature" in e["log_format"]]
    assert "MessageFormatError" in warning["error"]
    assert (signer.signed, signer.unsigned) == (1, 1)
    # No key at all: nothing to do for anyone.
    empty = DkimSigner(KeyDirectory(tmp_path / "none"), KeyRing(), run_now, run_now)
    assert empty.prepare(message_from(TRUSTED), body) is None
