"""A key's DNS TXT record (RFC 6376 section 3.6.1, RFC 8463): what to publish, and whether a
published one matches.

The record of a key is ``v=DKIM1; k=rsa; p=<base64>`` at ``<selector>._domainkey.<domain>``,
where ``p=`` is the base64 of the public key: the DER SubjectPublicKeyInfo for RSA, the raw 32
bytes for Ed25519.  A TXT string holds at most 255 bytes, so a 2048-bit RSA record (about 410
bytes) is published as several strings of one record, which resolvers join
(:func:`zone_line` writes it that way, for a zone file or a DNS provider's form).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from dkim.util import InvalidTagValueList, parse_tag_value

from mailsrv.dkim.keys import KeyType, StoredKey

MAX_STRING = 255
_WHITESPACE = re.compile(rb"[ \t\r\n]+")


def txt_value(key: StoredKey) -> str:
    """The record's text, as one string."""
    return f"v=DKIM1; k={key.type.value}; p={base64.b64encode(key.public).decode('ascii')}"


def txt_strings(value: str) -> list[str]:
    """``value`` cut into the strings of one TXT record (at most 255 bytes each)."""
    return [value[n : n + MAX_STRING] for n in range(0, len(value), MAX_STRING)]


def zone_line(key: StoredKey) -> str:
    """The record as a zone-file line: ``<name>. IN TXT ( "..." "..." )``."""
    strings = " ".join(f'"{part}"' for part in txt_strings(txt_value(key)))
    return f"{key.dns_name}. IN TXT ( {strings} )"


@dataclass(frozen=True)
class Verdict:
    """Whether the published record matches the key, and why not (one phrase)."""

    matches: bool
    reason: str


def compare(key: StoredKey, records: Sequence[bytes]) -> Verdict:
    """How the TXT records found at the key's name (each one's strings joined) compare with
    ``key``."""
    if not records:
        return Verdict(False, f"no TXT record at {key.dns_name}")
    parsed = []
    for record in records:
        try:
            tags = parse_tag_value(record)
        except InvalidTagValueList:
            continue
        if tags.get(b"v", b"DKIM1") == b"DKIM1" and b"p" in tags:
            parsed.append(tags)
    if not parsed:
        return Verdict(False, f"the TXT record at {key.dns_name} is not a DKIM key record")
    if len(parsed) > 1:
        return Verdict(False, f"{len(parsed)} DKIM key records at {key.dns_name}: publish only one")
    [tags] = parsed
    published_type = tags.get(b"k", b"rsa").decode("ascii", "replace").lower()
    if published_type != key.type.value:
        return Verdict(False, f"the record is for k={published_type}, the key is {key.type.value}")
    value = _WHITESPACE.sub(b"", tags[b"p"])
    if not value:
        return Verdict(False, "the record revokes the key (empty p=)")
    try:
        public = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return Verdict(False, "the record's p= is not base64")
    if public not in _accepted_forms(key):
        return Verdict(False, "the record holds a different public key")
    hashes = tags.get(b"h")
    if hashes is not None and b"sha256" not in _list(hashes):
        return Verdict(False, "the record's h= does not allow sha256")
    services = tags.get(b"s")
    if services is not None and not {b"email", b"*"} & set(_list(services)):
        return Verdict(False, "the record's s= does not allow email")
    return Verdict(True, "the published record matches the key")


def _list(value: bytes) -> list[bytes]:
    return [item.strip().lower() for item in value.split(b":")]


def _accepted_forms(key: StoredKey) -> tuple[bytes, ...]:
    """The key's public key as a record may hold it (RSA: SubjectPublicKeyInfo, as RFC 6376
    says, or the bare PKCS#1 form some tools publish and verifiers accept)."""
    if key.type is not KeyType.RSA:
        return (key.public,)
    spki = serialization.load_der_public_key(key.public)
    pkcs1 = spki.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    return (key.public, pkcs1)
