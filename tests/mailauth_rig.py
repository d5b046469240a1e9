"""What the mail authentication tests share: keys the tests make, a DNS zone publishing SPF,
DKIM and DMARC records for them, messages signed by dkimpy, and a verifier on that zone."""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import dkim
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.names import dns

from tests.mailauth_dns import txt

CLIENT_IP = "127.0.0.1"
HELO = "mail.example.test"
AUTHSERV_ID = "mx.example.org"


@dataclass(frozen=True)
class Keys:
    """An RSA-2048 and an Ed25519 key pair, with the DKIM TXT records of their public halves."""

    rsa_pem: bytes
    rsa_record: str
    ed_private: bytes  # base64 seed, as dkimpy takes it
    ed_record: str


@functools.cache
def keys() -> Keys:
    """The keys of this test run (made once: RSA key generation takes a while)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ed = nacl.signing.SigningKey.generate()
    return Keys(
        rsa_pem=pem,
        rsa_record="v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode(),
        ed_private=base64.b64encode(bytes(ed)),
        ed_record="v=DKIM1; k=ed25519; p=" + base64.b64encode(bytes(ed.verify_key)).decode(),
    )


def zone() -> dict[str, list[Any]]:
    """The ``test`` zone: SPF, DKIM and DMARC records of the test domains.

    ``example.test`` (p=reject) allows 127.0.0.1 and signs with ``sel`` (RSA), ``ed``
    (Ed25519) and ``arc`` (RSA, for ARC seals); ``strict.test`` wants strict alignment;
    ``quarantine.test``, ``pct0.test`` and ``nodmarc.test`` differ in their DMARC records;
    names under ``servfail.test`` answer SERVFAIL (see :data:`SERVFAIL`).
    """
    k = keys()
    return {
        # SPF
        "example.test": [txt("v=spf1 ip4:127.0.0.1 -all"), txt("an unrelated TXT record")],
        HELO: [txt("v=spf1 a -all"), dns.Record_A("127.0.0.1")],
        "fail.test": [txt("v=spf1 -all")],
        "soft.test": [txt("v=spf1 ~all")],
        "neutral.test": [txt("v=spf1 ?all")],
        "nospf.test": [dns.Record_A("192.0.2.1")],
        "broken-spf.test": [txt("v=spf1 include:servfail.test -all")],
        "strict.test": [txt("v=spf1 ip4:127.0.0.1 -all")],
        "news.strict.test": [txt("v=spf1 ip4:127.0.0.1 -all")],
        "quarantine.test": [txt("v=spf1 -all")],
        "pct0.test": [txt("v=spf1 -all")],
        "nodmarc.test": [txt("v=spf1 -all")],
        # a DNSBL that lists 127.0.0.1 (tagging, in the tests that use it)
        "1.0.0.127.bl.test": [dns.Record_A("127.0.0.4")],
        # DKIM keys
        "sel._domainkey.example.test": [txt(k.rsa_record)],
        "ed._domainkey.example.test": [txt(k.ed_record)],
        "arc._domainkey.example.test": [txt(k.rsa_record)],
        "sel._domainkey.strict.test": [txt(k.rsa_record)],
        "revoked._domainkey.example.test": [txt("v=DKIM1; k=rsa; p=")],
        # DMARC
        "_dmarc.example.test": [txt("v=DMARC1; p=reject; rua=mailto:dmarc@example.test")],
        "_dmarc.strict.test": [txt("v=DMARC1; p=reject; adkim=s; aspf=s")],
        "_dmarc.quarantine.test": [txt("v=DMARC1; p=quarantine")],
        "_dmarc.pct0.test": [txt("v=DMARC1; p=reject; pct=0")],
        "_dmarc.twice.test": [txt("v=DMARC1; p=reject"), txt("v=DMARC1; p=none")],
        "_dmarc.bad.test": [txt("v=DMARC1; p=bogus")],
        "_dmarc.other.test": [txt("not a DMARC record"), txt("v=DMARC1; p=quarantine")],
    }


SERVFAIL = ["servfail.test", "sel._domainkey.servfail.test", "_dmarc.servfail.test"]


def message(
    from_domain: str = "example.test",
    body: bytes = b"Hello.\r\n",
    extra: bytes = b"",
    local: str = "alice",
) -> bytes:
    """A message with CRLF line ends from ``local@from_domain`` to alice@example.org."""
    return (
        f"From: Sender <{local}@{from_domain}>\r\n"
        "To: alice@example.org\r\n"
        "Subject: a test\r\n"
        f"Date: {format_datetime(datetime(2026, 12, 1, 10, 0, tzinfo=UTC))}\r\n"
        "Message-ID: <1@example.test>\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


def sign(
    content: bytes,
    selector: str = "sel",
    domain: str = "example.test",
    algorithm: str = "rsa-sha256",
    headers: tuple[str, ...] = ("from", "to", "subject", "date", "message-id"),
) -> bytes:
    """``content`` with a DKIM-Signature by dkimpy on top (relaxed/relaxed)."""
    k = keys()
    key = k.ed_private if algorithm == "ed25519-sha256" else k.rsa_pem
    signature = dkim.sign(
        content,
        selector.encode(),
        domain.encode(),
        key,
        signature_algorithm=algorithm.encode(),
        include_headers=[h.encode() for h in headers],
        canonicalize=(b"relaxed", b"relaxed"),
    )
    return bytes(signature) + content


def arc_seal(content: bytes, results: str = "dkim=pass header.d=example.test") -> bytes:
    """``content`` as a forwarder ``forwarder.test`` passes it on: its Authentication-Results
    and an ARC set (instance 1) sealed with the ``arc`` key of example.test."""
    with_results = f"Authentication-Results: forwarder.test; {results}\r\n".encode() + content
    headers = dkim.arc_sign(
        with_results,
        b"arc",
        b"example.test",
        keys().rsa_pem,
        b"forwarder.test",
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return b"".join(headers) + with_results


def lf(content: bytes) -> bytes:
    """``content`` with LF line ends (how the spool stores a message)."""
    return content.replace(b"\r\n", b"\n")
