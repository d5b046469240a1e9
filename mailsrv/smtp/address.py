"""RFC 5321 paths and ESMTP parameters: parsing MAIL FROM and RCPT TO arguments.

The parser is strict where strictness stops abuse (relay tricks, header injection) and lenient
where real clients differ harmlessly (a space after ``FROM:``, case of keywords).  Non-ASCII
addresses are recognised so the session can refuse them unless SMTPUTF8 (RFC 6531) was declared.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"'
_LABEL = (
    r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]*[A-Za-z0-9\u0080-\U0010ffff])?"
)
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_ADDRESS_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"
_ADL = rf"@{_DOMAIN}(?:,@{_DOMAIN})*:"
_PATH = re.compile(
    rf"<(?P<adl>{_ADL})?(?P<local>{_DOT_STRING}|{_QUOTED})@(?P<domain>{_DOMAIN}|{_ADDRESS_LITERAL})>"
)
_PARAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*(?:=[\x21-\x3c\x3e-\x7e]+)?")

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class AddressError(ValueError):
    """The path or its parameters are not valid RFC 5321 syntax."""


class ParameterSyntaxError(AddressError):
    """The path is fine but the ESMTP parameters after it are not ``KEY[=value]`` words."""


@dataclass(frozen=True)
class Address:
    """A parsed mailbox.  ``domain`` is lower-cased; ``local`` keeps its case."""

    local: str
    domain: str
    source_route: bool = False

    @property
    def is_ascii(self) -> bool:
        """True when no part of the address needs SMTPUTF8."""
        return self.local.isascii() and self.domain.isascii()

    @property
    def is_quoted(self) -> bool:
        """True for a quoted-string local part."""
        return self.local.startswith('"')

    @property
    def has_routing(self) -> bool:
        """Source routes, ``%``-hacks, bang paths and quoted ``@``: ways to smuggle a relay."""
        return self.source_route or any(c in self.local for c in "%!@")

    @property
    def is_domain_literal(self) -> bool:
        """True for ``user@[192.0.2.1]``."""
        return self.domain.startswith("[")

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


NULL_SENDER = None


@dataclass(frozen=True)
class PathArgument:
    """The parsed argument of MAIL FROM or RCPT TO: a path (None for ``<>``) and parameters."""

    address: Address | None
    params: dict[str, str | None]


def _check_literal(literal: str) -> None:
    inner = literal[1:-1]
    if inner.lower().startswith("ipv6:"):
        ipaddress.IPv6Address(inner[5:])
    elif ":" not in inner:
        ipaddress.IPv4Address(inner)
    # RFC 5321 General-address-literal: tag ":" content, accepted as is.


def parse_params(text: str) -> dict[str, str | None]:
    """ESMTP parameters ``KEY[=value]`` separated by spaces; keys upper-cased."""
    params: dict[str, str | None] = {}
    for word in text.split(" "):
        if not word:
            continue
        if not _PARAM.fullmatch(word):
            raise ParameterSyntaxError(f"bad parameter {word[:40]!r}")
        key, sep, value = word.partition("=")
        key = key.upper()
        if key in params:
            raise ParameterSyntaxError(f"duplicate parameter {key[:40]}")
        params[key] = value if sep else None
    return params


def parse_path_argument(text: str, prefix: str, allow_null: bool) -> PathArgument:
    """Parse ``FROM:<path> params`` (``prefix`` = ``"FROM:"``) or ``TO:<path> params``.

    ``allow_null`` admits the null reverse-path ``<>`` (MAIL only).  ``<postmaster>`` without a
    domain (RFC 5321 section 4.5.1) is returned with an empty domain for the caller to complete.
    """
    if text[: len(prefix)].upper() != prefix:
        raise AddressError("missing " + prefix)
    rest = text[len(prefix) :].lstrip(" ")
    if allow_null and rest.startswith("<>"):
        return PathArgument(None, parse_params(rest[2:]))
    if rest[:12].lower() == "<postmaster>" and not allow_null:
        return PathArgument(Address("postmaster", ""), parse_params(rest[12:]))
    match = _PATH.match(rest)
    if match is None:
        raise AddressError("bad path")
    after = rest[match.end() :]
    if after and not after.startswith(" "):
        raise AddressError("junk after path")
    return PathArgument(_address(match), parse_params(after))


def _address(match: re.Match[str]) -> Address:
    """The :class:`Address` of a ``_PATH`` match, with its lengths and literal checked."""
    local, domain = match.group("local"), match.group("domain")
    if len(local.encode()) > MAX_LOCAL_PART or len(domain.encode()) > MAX_DOMAIN:
        raise AddressError("address too long")
    if match.end() - match.start() > MAX_PATH + 2:
        raise AddressError("path too long")
    if domain.startswith("["):
        try:
            _check_literal(domain)
        except ValueError:
            raise AddressError("bad address literal") from None
    return Address(local, domain.lower(), source_route=match.group("adl") is not None)


def parse_addr_spec(text: str) -> Address:
    """A bare ``local@domain`` (no angle brackets, no source route), as in ``AUTH=`` values."""
    if len(text) > MAX_PATH:
        raise AddressError("address too long")
    match = _PATH.fullmatch(f"<{text}>")
    if match is None or match.group("adl") is not None:
        raise AddressError("bad mailbox")
    return _address(match)


_HELO_DOMAIN = re.compile(rf"{_DOMAIN}\.?|{_ADDRESS_LITERAL}")


def is_valid_helo(name: str) -> bool:
    """True when ``name`` is a domain or an address literal (what EHLO/HELO must carry)."""
    return bool(_HELO_DOMAIN.fullmatch(name)) and len(name) <= MAX_DOMAIN


_SAFE_HELO = re.compile(r"[^A-Za-z0-9.\-:\[\]]")


def sanitize_for_header(name: str) -> str:
    """A HELO name made safe to print in a Received header (no spaces, parens or controls)."""
    cleaned = _SAFE_HELO.sub("_", name)[:MAX_DOMAIN]
    return cleaned or "unknown"
