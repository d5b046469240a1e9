"""MAIL FROM and RCPT TO lines for the next hop, built only from addresses proven safe.

An address goes on the wire only if it is one RFC 5321 mailbox and nothing else: no CR, LF,
NUL or other control character, no ``<`` or ``>``, no source route, and no space outside a
quoted local part, so no stored address can close the path early, add parameters of its own
or start another command.  ESMTP parameters are added only for extensions the peer offered:
SIZE, BODY=8BITMIME, SMTPUTF8, and the RFC 3461 DSN parameters (RET, ENVID, NOTIFY, ORCPT, the
last two xtext-encoded).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from mailsrv.relay.message import OutboundMessage, OutboundRecipient
from mailsrv.smtp.address import AddressError, parse_path_argument

_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f<>]")
_NOTIFY_WORDS = {"SUCCESS", "FAILURE", "DELAY"}
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


class EnvelopeError(ValueError):
    """The address or parameter cannot be sent safely."""


def check_address(address: str) -> str:
    """``address`` if it is exactly one safe RFC 5321 mailbox; else :class:`EnvelopeError`."""
    if not address or _FORBIDDEN.search(address):
        raise EnvelopeError(f"forbidden characters in {address!r}")
    try:
        parsed = parse_path_argument(f"TO:<{address}>", "TO:", allow_null=False)
    except AddressError as e:
        raise EnvelopeError(f"{address!r}: {e}") from None
    if parsed.params or parsed.address is None or parsed.address.source_route:
        raise EnvelopeError(f"{address!r} is not one plain mailbox")
    if not parsed.address.domain or str(parsed.address).lower() != address.lower():
        raise EnvelopeError(f"{address!r} is not one plain mailbox")
    return address


def xtext(text: str) -> str:
    """RFC 3461 section 4: ``+`` , ``=``, controls, space and non-ASCII as ``+HH``."""
    out = []
    for byte in text.encode("utf-8"):
        out.append(
            chr(byte) if 0x21 <= byte <= 0x7E and byte not in (0x2B, 0x3D) else f"+{byte:02X}"
        )
    return "".join(out)


def needs_smtputf8(message: OutboundMessage) -> bool:
    """True when the envelope (or, as the message says, its content) needs SMTPUTF8."""
    return (
        message.smtputf8
        or not message.sender.isascii()
        or any(not r.address.isascii() for r in message.recipients)
    )


def mail_command(message: OutboundMessage, extensions: Mapping[str, str]) -> bytes:
    """The MAIL FROM line (CRLF included) for ``message`` to a peer with ``extensions``."""
    sender = check_address(message.sender) if message.sender else ""
    params = []
    if "SIZE" in extensions:
        params.append(f"SIZE={message.size}")
    if message.eight_bit and "8BITMIME" in extensions:
        params.append("BODY=8BITMIME")
    if needs_smtputf8(message) and "SMTPUTF8" in extensions:
        params.append("SMTPUTF8")
    if "DSN" in extensions:
        if message.ret in ("FULL", "HDRS"):
            params.append(f"RET={message.ret}")
        if message.envid:
            params.append(f"ENVID={xtext(message.envid)}")
    return _line(f"MAIL FROM:<{sender}>", params)


def rcpt_command(recipient: OutboundRecipient, extensions: Mapping[str, str]) -> bytes:
    """The RCPT TO line (CRLF included) for ``recipient``."""
    address = check_address(recipient.address)
    params = []
    if "DSN" in extensions:
        notify = _notify(recipient.notify)
        if notify:
            params.append(f"NOTIFY={notify}")
        orcpt = _orcpt(recipient.orcpt)
        if orcpt:
            params.append(f"ORCPT={orcpt}")
    return _line(f"RCPT TO:<{address}>", params)


def _notify(words: tuple[str, ...]) -> str:
    upper = [w.upper() for w in words]
    if upper == ["NEVER"]:
        return "NEVER"
    kept = [w for w in dict.fromkeys(upper) if w in _NOTIFY_WORDS]
    return ",".join(kept)


def _orcpt(orcpt: str | None) -> str:
    """``addr-type;xtext`` for an ORCPT given decoded (``rfc822;a@b``); "" if unusable."""
    if not orcpt:
        return ""
    addr_type, sep, value = orcpt.partition(";")
    if not sep or not _ADDR_TYPE.fullmatch(addr_type) or not value or not value.isascii():
        return ""  # RFC 6533's utf-8 form is not produced; the ORCPT is left out instead
    return f"{addr_type};{xtext(value)}"


def _line(command: str, params: list[str]) -> bytes:
    return (" ".join([command, *params]) + "\r\n").encode("utf-8")
