"""Which keys sign a message, and the signing itself (dkimpy).

**The signing domain.**  DMARC looks for a passing signature whose ``d=`` is the RFC 5322
``From:`` domain (or shares its organisational domain), so that domain's key signs when it
has one.  When it has none, the envelope sender's (``MAIL FROM``) domain's key signs instead,
as the big sending services do: the signature is then not aligned for DMARC, but it still
says who sent the message, and receivers that want every message signed (Gmail's and
Yahoo's 2024 sender rules) get one.  Either domain's key may be the key of a parent domain
(:meth:`~mailsrv.dkim.keys.KeyRing.find`: ``example.org`` signs for ``news.example.org``).
For an authenticated user the ``From:`` domain counts only when it is the login's domain,
the envelope sender's domain, or under one of them, so one account cannot get another
domain's signature on a message by writing that domain into ``From:``; a message from a
trusted network is the network's word, as with OpenDKIM's ``InternalHosts``.  No key found:
the message goes unsigned.

**The signature.**  ``rsa-sha256`` and ``ed25519-sha256`` (RFC 8463), ``c=relaxed/relaxed``,
``h=`` listing each of :data:`SIGNED_FIELDS` as many times as the message has it, and
``From`` once more (oversigned: a ``From:`` added on the way breaks the signature).  The
content signed is the stored message with its line ends as the relay sends them (every CRLF,
bare CR or bare LF one line end), so what the next hop receives verifies.  ``t=`` is dkimpy's
(the system clock); no ``x=``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from email.parser import HeaderParser
from email.policy import compat32
from email.utils import getaddresses

from mailsrv.dkim.keys import KeyRing, SigningKey
from mailsrv.dkim.names import DkimError, signing_domain

SIGNED_FIELDS = (
    "from",
    "subject",
    "date",
    "to",
    "cc",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "reply-to",
    "in-reply-to",
    "references",
)
"""The header fields signed when present (``From`` always, and once more)."""

HEAD_LIMIT = 64 * 1024
"""How much of a message is read to find its ``From:`` field."""

_LINE_ENDING = re.compile(rb"\r\n?|\n")


def signed_fields(names: Iterable[bytes | str]) -> list[bytes]:
    """The ``h=`` list for a message whose header fields are ``names`` (in any case)."""
    counts = Counter(
        (name.decode("ascii", "replace") if isinstance(name, bytes) else name).lower()
        for name in names
    )
    fields: list[bytes] = []
    for name in SIGNED_FIELDS:
        fields.extend([name.encode("ascii")] * (counts[name] + (name == "from")))
    return fields


def sign_message(content: bytes, keys: Sequence[SigningKey]) -> bytes:
    """The ``DKIM-Signature`` fields for ``content`` by each of ``keys``, in order, as header
    lines with LF line ends (the stored form).  Raises dkimpy's errors for a message it cannot
    parse."""
    import dkim  # here, not at the top: 0.3 s of imports a server without keys never needs

    if b"\r" in content:
        content = _LINE_ENDING.sub(b"\n", content)
    message = dkim.DKIM(content, linesep=b"\n")
    include = signed_fields(name for name, _value in message.headers)
    signatures = []
    for key in keys:
        signature: bytes = message.sign(
            key.selector.encode("ascii"),
            key.domain.encode("ascii"),
            key.private,
            signature_algorithm=key.algorithm.encode("ascii"),
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=include,
        )
        signatures.append(signature)
    return b"".join(signatures)


def read_spooled(path: str, rest: bytes, limit: int | None = None) -> bytes:
    """A message whose start is in the file ``path`` (if it was written yet) and whose end,
    ``rest``, is still in memory (the spool file before the committer finishes it); with
    ``limit``, only about that much of its start."""
    try:
        with open(path, "rb") as f:
            written = f.read() if limit is None else f.read(limit)
    except FileNotFoundError:
        written = b""  # all of it is in memory still
    if limit is not None and len(written) >= limit:
        return written
    return written + rest


def sign_spooled(path: str, rest: bytes, keys: Sequence[SigningKey]) -> bytes:
    """:func:`sign_message` of a spooled message (see :func:`read_spooled`): plain values in
    and out, so it can run in a worker process."""
    return sign_message(read_spooled(path, rest), keys)


def from_domain(head: bytes) -> str | None:
    """The domain of the first address in the ``From:`` field of the header section ``head``
    (stored form, A-label), or None if there is none that can sign."""
    end = head.find(b"\n\n")
    text = (head if end < 0 else head[: end + 1]).decode("utf-8", "replace")
    fields = HeaderParser(policy=compat32).parsestr(text, headersonly=True)
    for _name, address in getaddresses([str(v) for v in fields.get_all("From") or []]):
        if "@" in address:
            return _domain(address)
    return None


def from_domain_of_spooled(path: str, rest: bytes) -> str | None:
    """:func:`from_domain` of a spooled message (blocking: reads its start)."""
    return from_domain(read_spooled(path, rest, HEAD_LIMIT))


def choose_keys(
    ring: KeyRing, header_from: str | None, sender: str, login: str | None
) -> tuple[SigningKey, ...]:
    """The keys that sign a message (see the module docstring): ``header_from`` is its
    ``From:`` domain, ``sender`` its envelope sender (``""`` for a bounce), ``login`` the
    account that sent it (None: a trusted network, or mailsrv itself)."""
    sender_domain = _domain(sender)
    claims = []
    if header_from is not None:
        owners = [d for d in (_domain(login or ""), sender_domain) if d is not None]
        if login is None or any(_within(header_from, owner) for owner in owners):
            claims.append(header_from)
    if sender_domain is not None:
        claims.append(sender_domain)
    for domain in claims:
        keys = ring.find(domain)
        if keys:
            return keys
    return ()


def _domain(address: str) -> str | None:
    """The signing-domain form of ``address``'s domain, or None."""
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return None
    try:
        return signing_domain(domain)
    except DkimError:
        return None


def _within(domain: str, owner: str) -> bool:
    return domain == owner or domain.endswith("." + owner)
