"""ESMTP parameters of MAIL FROM and RCPT TO (RFC 5321 section 4.1.2): one table entry each.

Every value is bounded before it is parsed.  An entry names the extension that must have been
offered in EHLO, the longest value it reads (0: the keyword takes no value) and a parser that
raises only ``ValueError``; the length check runs first, so no value can make a parser do
unbounded work or raise anything else (``int()`` refuses more than 4300 digits, for one).
Adding a parameter, such as DSN's NOTIFY and ORCPT (RCPT) or RET and ENVID (MAIL), is one
more entry in :data:`MAIL_PARAMETERS` or :data:`RCPT_PARAMETERS`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass

from mailsrv.delivery.envelope import Notify, Ret
from mailsrv.smtp import replies
from mailsrv.smtp.address import MAX_PATH, AddressError, parse_addr_spec
from mailsrv.smtp.replies import Reply


class ParameterError(Exception):
    """A parameter is unknown here (``555``) or its value is malformed (``501``)."""

    def __init__(self, reply: Reply, keyword: str) -> None:
        super().__init__(f"{keyword}: {reply.text}")
        self.reply = reply
        self.keyword = keyword


@dataclass(frozen=True)
class Parameter:
    """How to read one ESMTP parameter."""

    extension: str
    """The EHLO keyword that must have been offered for the parameter to be known."""
    max_length: int
    """Longest value read, in characters (0 for a keyword that takes no value)."""
    parse: Callable[[str], object] | None = None
    """Turns the value (at most ``max_length`` long) into what the session uses; ValueError
    when malformed.  None for a keyword that takes no value (its parsed value is True)."""
    canonical: Callable[[str], str] | None = None
    """Applied before the length bound (it must be linear): what is not significant goes."""


_DIGITS = re.compile(r"[0-9]+")


def _drop_leading_zeros(value: str) -> str:
    """``007`` -> ``7``: leading zeros of a number (Postfix reads any number of them)."""
    return value.lstrip("0") or value[-1:]


def parse_size(value: str) -> int:
    """RFC 1870 ``size-value``: ASCII digits only (``str.isdigit`` also takes '²' and '٣')."""
    if not _DIGITS.fullmatch(value):
        raise ValueError("SIZE needs digits")
    return int(value)


_BODY_TYPES = frozenset({"7BIT", "8BITMIME"})


def parse_body(value: str) -> str:
    """RFC 6152 ``BODY=7BIT`` or ``BODY=8BITMIME`` (BINARYMIME needs CHUNKING: not offered)."""
    body = value.upper()
    if body not in _BODY_TYPES:
        raise ValueError("BODY must be 7BIT or 8BITMIME")
    return body


_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})*")
_HEXCHAR = re.compile(r"\+([0-9A-Fa-f]{2})")


def decode_xtext(value: str) -> str:
    """RFC 3461 section 4 xtext: ``+XX`` is the octet XX; the octets must be UTF-8.

    Lower-case hex digits are read too (RFC 3461 asks for upper case; Postfix reads both).
    """
    if not _XTEXT.fullmatch(value):
        raise ValueError("malformed xtext")
    if "+" not in value:
        return value
    raw = bytearray()
    position = 0
    for match in _HEXCHAR.finditer(value):
        raw += value[position : match.start()].encode("ascii")
        raw.append(int(match.group(1), 16))
        position = match.end()
    raw += value[position:].encode("ascii")
    return raw.decode("utf-8")  # UnicodeDecodeError is a ValueError


def parse_auth(value: str) -> str | None:
    """RFC 4954 section 5 ``AUTH=<>`` (None: submitter unknown) or ``AUTH=`` xtext addr-spec."""
    mailbox = decode_xtext(value)
    if mailbox == "<>":
        return None
    try:
        return str(parse_addr_spec(mailbox))
    except AddressError:
        raise ValueError("AUTH needs <> or an addr-spec") from None


def parse_ret(value: str) -> Ret:
    """RFC 3461 section 4.3 ``RET=FULL`` or ``RET=HDRS``."""
    try:
        return Ret(value.upper())
    except ValueError:
        raise ValueError("RET must be FULL or HDRS") from None


_PRINTABLE = re.compile(r"[\x20-\x7e]+")


def parse_envid(value: str) -> str:
    """RFC 3461 section 4.4 ``ENVID=``: xtext of printable ASCII, at most 100 characters."""
    envid = decode_xtext(value)
    if not _PRINTABLE.fullmatch(envid):
        raise ValueError("ENVID must be printable ASCII")
    return envid


_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def parse_notify(value: str) -> frozenset[Notify]:
    """RFC 3461 section 4.1 ``NOTIFY=NEVER`` or a list of SUCCESS, FAILURE, DELAY."""
    words = value.upper().split(",")
    if words == ["NEVER"]:
        return frozenset({Notify.NEVER})
    if len(set(words)) != len(words) or not set(words) <= _NOTIFY_WORDS:
        raise ValueError("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
    return frozenset(Notify(word) for word in words)


_ADDRESS_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_NO_CONTROLS = re.compile(r"[^\x00-\x1f\x7f]+")


def parse_orcpt(value: str) -> tuple[str, str]:
    """RFC 3461 section 4.2 ``ORCPT=addr-type;xtext`` as (lower-case type, decoded address)."""
    address_type, separator, encoded = value.partition(";")
    if not separator or not _ADDRESS_TYPE.fullmatch(address_type):
        raise ValueError("ORCPT needs addr-type;address")
    address = decode_xtext(encoded)
    if not _NO_CONTROLS.fullmatch(address):
        raise ValueError("ORCPT address must be printable")
    return address_type.lower(), address


MAIL_PARAMETERS: Mapping[str, Parameter] = {
    # RFC 1870 writes 1*20DIGIT; up to 32 significant digits are read so that an absurd size
    # still gets 552 (it is too big) rather than a syntax error.
    "SIZE": Parameter("SIZE", 32, parse_size, _drop_leading_zeros),
    "BODY": Parameter("8BITMIME", 16, parse_body),
    "SMTPUTF8": Parameter("SMTPUTF8", 0),
    # xtext takes up to three characters per octet of the at most MAX_PATH-octet mailbox.
    "AUTH": Parameter("AUTH", 3 * MAX_PATH, parse_auth),
    # RFC 3461: RET is FULL or HDRS; ENVID is at most 100 characters of xtext.
    "RET": Parameter("DSN", 4, parse_ret),
    "ENVID": Parameter("DSN", 100, parse_envid),
}
"""The MAIL FROM parameters mailsrv knows."""

RCPT_PARAMETERS: Mapping[str, Parameter] = {
    "NOTIFY": Parameter("DSN", len("SUCCESS,FAILURE,DELAY"), parse_notify),
    # RFC 3461 section 4.2: ORCPT is at most 500 characters.
    "ORCPT": Parameter("DSN", 500, parse_orcpt),
}
"""The RCPT TO parameters mailsrv knows (DSN, RFC 3461)."""


def parse_parameters(
    params: Mapping[str, str | None],
    table: Mapping[str, Parameter],
    offered: Container[str],
    syntax_reply: Reply,
) -> dict[str, object]:
    """The parsed value of each parameter, keyed by its (upper-case) keyword.

    ``params`` comes from :func:`mailsrv.smtp.address.parse_params`; ``offered`` holds the EHLO
    keywords of this session (nothing after HELO).  Raises :class:`ParameterError` with
    ``555 5.5.4`` for a keyword not in ``table`` or whose extension was not offered, and with
    ``syntax_reply`` (a ``501 5.5.4``) for a missing, unexpected, oversized or malformed value.
    """
    values: dict[str, object] = {}
    for keyword, value in params.items():
        spec = table.get(keyword)
        if spec is None or spec.extension not in offered:
            raise ParameterError(replies.UNKNOWN_PARAMETER, keyword)
        if spec.parse is None:
            if value is not None:
                raise ParameterError(syntax_reply, keyword)
            values[keyword] = True
            continue
        if value is not None and spec.canonical is not None:
            value = spec.canonical(value)
        if value is None or len(value) > spec.max_length:
            raise ParameterError(syntax_reply, keyword)
        try:
            values[keyword] = spec.parse(value)
        except ValueError:
            raise ParameterError(syntax_reply, keyword) from None
    return values
