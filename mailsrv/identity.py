"""Canonical mailbox addresses: the one form that config, stores, logins and Maildirs use.

Every place that compares, stores or looks up an address (local domains, configured mailboxes
and aliases, account and alias keys in both user stores, AUTH logins, ``MAIL FROM`` ownership,
``RCPT TO`` resolution, the admin command) calls :func:`canonical_address` or
:func:`canonical_domain`, so two spellings of one mailbox always meet.

The rules (README, "Accounts and AUTH"):

* Surrounding whitespace goes; one trailing dot on the domain goes.
* The domain is stored as its IDNA 2008 A-label (``xn--bcher-kva.example``), lower case.  A
  U-label (``bücher.example``, any case, NFC or not) is mapped with UTS #46 and encoded with
  the ``idna`` package, so both forms name one domain.  The A-label is the stored form because
  it is the one spelling every equivalent input maps to, it is what DNS uses, and it keeps the
  domain level of the Maildir tree ASCII (``mail/xn--bcher-kva.example/...``; ASCII domains are
  unchanged).  All-ASCII labels keep today's letter-digit-hyphen rule, so names such as
  ``r3---sn.example`` that strict IDNA 2008 refuses still work.
* The local part is NFC-normalised and lower-cased with ``str.lower`` (Unicode toLowerCase,
  the mapping PRECIS chose in RFC 8264 over case folding): ``Jörg`` and ``JÖRG`` are one
  mailbox, ``ß`` stays ``ß`` (case folding would turn it into ``ss``, another mailbox).
  A quoted local part is unquoted first; the result must still be a dot-atom.
* Compatibility characters are refused in local parts (NFKC must not change the NFC form:
  fullwidth letters, ligatures, superscripts...), as PRECIS's IdentifierClass refuses them,
  and so are controls, format characters (zero-width, bidi), spaces, private-use and
  unassigned code points.
* Anywhere in the address, a non-ASCII character that NFKC, lower-casing or the UTS #46 mapping
  would turn into ASCII (or into nothing) is refused: the KELVIN SIGN, fullwidth letters,
  the ``fi`` ligature, the ideographic full stop, a soft hyphen.  So no non-ASCII spelling
  ever reaches an ASCII mailbox or domain.

Invalid input raises :class:`InvalidAddress` (a ``ValueError``); its ``reason`` says which
Unicode rule refused it, or is empty for plain syntax errors.
"""

from __future__ import annotations

import re
import unicodedata

import idna

MAX_LOCAL_PART = 64  # octets of UTF-8 (RFC 5321 section 4.5.3.1.1, RFC 6531 section 3.3)
MAX_DOMAIN = 253  # octets of the A-label form, without the trailing dot

_ASCII_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
# RFC 5322 atext without "%" (a relay trick) and "/" (a path separator in the Maildir tree).
_ASCII_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyz0123456789!#$&'*+=?^_`{|}~-")
# Unicode general categories refused in local parts: controls, format characters, surrogates,
# private use, unassigned (also noncharacters), and every kind of space or separator.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})
_QUOTED_PAIR = re.compile(r"\\(.)")


class InvalidAddress(ValueError):
    """Not something that can name a mailbox here.

    ``reason`` is a short phrase for the Unicode rule that refused it (``""`` for syntax).
    """

    def __init__(self, text: str, reason: str = "") -> None:
        super().__init__(f"invalid address {text!r}" + (f" ({reason})" if reason else ""))
        self.text = text
        self.reason = reason


def _describe(char: str) -> str:
    return f"U+{ord(char):04X} {unicodedata.name(char, 'unnamed character')}"


def _ascii_fold(char: str) -> str:
    """What becomes of the non-ASCII ``char`` under NFKC + lower-casing or UTS #46 mapping:
    ``"vanish"``, ``"fold to ASCII"``, or ``""`` when it stays non-ASCII."""
    folded = [unicodedata.normalize("NFKC", char).lower()]
    try:
        folded.append(idna.uts46_remap(char, std3_rules=False))
    except idna.IDNAError:
        pass  # disallowed in domains; the local-part rules decide on their own
    if "" in folded:
        return "vanish"
    return "fold to ASCII" if any(text.isascii() for text in folded) else ""


def _refuse_ascii_folds(text: str, whole: str) -> None:
    for char in text:
        if not char.isascii() and (fold := _ascii_fold(char)):
            raise InvalidAddress(whole, f"{_describe(char)} would {fold}")


def canonical_domain(text: str, *, whole: str | None = None) -> str:
    """The stored form of a domain: lower-case A-label; :class:`InvalidAddress` if invalid.

    ``whole`` is the text to quote in the error (the full address, when part of one).
    """
    shown = text if whole is None else whole
    name = text.strip()
    name = name[:-1] if name.endswith(".") else name
    if not name:
        raise InvalidAddress(shown)
    _refuse_ascii_folds(name, shown)
    if not name.isascii():
        try:
            name = idna.uts46_remap(name, std3_rules=True)
        except idna.IDNAError as error:
            raise InvalidAddress(shown, f"not an IDNA 2008 domain: {error}") from None
    labels = []
    for label in name.lower().split("."):
        labels.append(_canonical_label(label, shown))
    result = ".".join(labels)
    if len(result) > MAX_DOMAIN:
        raise InvalidAddress(shown, "domain too long")
    return result


def _canonical_label(label: str, shown: str) -> str:
    if label.isascii() and not label.startswith("xn--"):
        if not _ASCII_LABEL.fullmatch(label):
            raise InvalidAddress(shown)
        return label
    try:
        ulabel = idna.ulabel(label) if label.isascii() else label
        if ulabel.isascii():
            raise InvalidAddress(shown, f"{label!r} is not a valid A-label")
        alabel = idna.alabel(ulabel).decode("ascii")
    except idna.IDNAError as error:
        raise InvalidAddress(shown, f"not an IDNA 2008 domain: {error}") from None
    if label.isascii() and alabel != label:
        raise InvalidAddress(shown, f"{label!r} is not a canonical A-label")
    return alabel


def display_domain(domain: str) -> str:
    """The U-label form of a canonical domain, for people (ASCII domains are returned as is)."""
    return ".".join(
        idna.ulabel(label) if label.startswith("xn--") else label for label in domain.split(".")
    )


def display_address(address: str) -> str:
    """A canonical ``local@domain`` with its domain in U-label form, for people."""
    local, _, domain = address.rpartition("@")
    return f"{local}@{display_domain(domain)}"


def canonical_local(text: str, *, whole: str | None = None) -> str:
    """The stored form of a local part (NFC, lower-cased); :class:`InvalidAddress` if invalid."""
    shown = text if whole is None else whole
    local = text
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        local = _QUOTED_PAIR.sub(r"\1", local[1:-1])
    _refuse_ascii_folds(local, shown)
    composed = unicodedata.normalize("NFC", local)
    if unicodedata.normalize("NFKC", composed) != composed:
        culprit = next(c for c in composed if unicodedata.normalize("NFKC", c) != c)
        raise InvalidAddress(shown, f"compatibility character {_describe(culprit)}")
    result = unicodedata.normalize("NFC", composed.lower())
    for atom in result.split("."):
        if not atom:
            raise InvalidAddress(shown)
        for char in atom:
            if char.isascii():
                if char not in _ASCII_ATEXT:
                    raise InvalidAddress(shown)
            elif unicodedata.category(char) in _REFUSED_CATEGORIES:
                raise InvalidAddress(shown, f"{_describe(char)} is not allowed")
    if len(result.encode("utf-8")) > MAX_LOCAL_PART:
        raise InvalidAddress(shown, f"local part over {MAX_LOCAL_PART} octets")
    if result.isascii() and not local.isascii():  # belt and braces for the rule above
        raise InvalidAddress(shown, "non-ASCII spelling of an ASCII local part")
    return result


def canonical_address(text: str) -> str:
    """The stored form of ``local@domain``; :class:`InvalidAddress` if it cannot be a mailbox."""
    stripped = text.strip()
    local, sep, domain = stripped.rpartition("@")
    if not sep or not local:
        raise InvalidAddress(text)
    return f"{canonical_local(local, whole=text)}@{canonical_domain(domain, whole=text)}"
