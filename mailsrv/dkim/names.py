"""What a DKIM signing domain and selector may be, in the one form keys are stored under.

A domain is stored as its lower-case A-label (:func:`mailsrv.identity.canonical_domain`, so
``Bücher.Example`` and ``xn--bcher-kva.example`` are one domain, and ``d=`` is always ASCII),
with at least two labels and a top-level label that is not a number (no IP addresses).  A
selector is one DNS label (letters, digits, inner hyphens, up to 63), lower case; dotted
sub-selectors are not offered.  Both are safe as file names.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from mailsrv.identity import InvalidAddress, canonical_domain

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class DkimError(Exception):
    """A DKIM operation was refused; the message is one line for the operator."""


def signing_domain(text: str) -> str:
    """The stored form of the domain ``text``; :class:`DkimError` if it cannot sign."""
    try:
        domain = canonical_domain(text)
    except InvalidAddress:
        raise DkimError(f"invalid domain {text!r}") from None
    labels = domain.split(".")
    if len(labels) < 2 or labels[-1].isdigit():
        raise DkimError(f"invalid domain {text!r}: expected a name like example.org")
    return domain


def selector_name(text: str) -> str:
    """The stored form of the selector ``text``; :class:`DkimError` if it is not one label."""
    selector = text.strip().lower()
    if not _LABEL.fullmatch(selector):
        raise DkimError(
            f"invalid selector {text!r}: expected one DNS label (letters, digits, inner hyphens)"
        )
    return selector


def default_selector(now: float, type_tag: str) -> str:
    """The selector ``mailsrv dkim keygen`` picks: ``s`` + year and month + the key type's
    letter (``s202612r`` for RSA, ``s202612e`` for Ed25519): dated, so a rotation gets a new
    one, and never the same for two types (one selector names one key in DNS)."""
    return f"s{datetime.fromtimestamp(now, UTC):%Y%m}{type_tag}"


def parent_domains(domain: str) -> list[str]:
    """``domain`` and its parents with at least two labels, nearest first:
    ``a.b.example.org`` -> ``a.b.example.org``, ``b.example.org``, ``example.org``."""
    labels = domain.split(".")
    return [".".join(labels[n:]) for n in range(len(labels) - 1)]
