"""The rows of ``mailsrv users import FILE``: accounts with the password hashes they already have.

Two formats, told apart by the first character that is not blank:

* JSON lines: one object per line, ``{"address": ..., "hash": ..., "enabled": true}``
  (``enabled`` optional, default true);
* CSV: ``address,hash[,enabled]`` per line, an optional header row naming those columns,
  ``enabled`` as ``true``/``false``, ``yes``/``no`` or ``1``/``0`` (default true).  The hash
  may be quoted or not (an Argon2 PHC string has commas of its own).

Blank lines and lines starting with ``#`` are skipped.  A hash is taken only if the server can
verify it (:func:`mailsrv.auth.passwords.importable_scheme`: Argon2id PHC strings, bcrypt,
SHA512-crypt, with or without Dovecot ``{SCHEME}`` prefixes), so nobody's password is reset
and none becomes unusable.  Every row that cannot be taken is one :class:`Rejected` with its
line number and reason; the others are :class:`ImportRow`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass

from mailsrv.auth.passwords import importable_scheme
from mailsrv.identity import InvalidAddress, canonical_address

_TRUE = {"true", "yes", "1", "y", "on"}
_FALSE = {"false", "no", "0", "n", "off"}
_HEADER = ("address", "hash", "enabled")


@dataclass(frozen=True)
class ImportRow:
    """One account to create."""

    line: int
    login: str
    password_hash: str
    scheme: str
    enabled: bool


@dataclass(frozen=True)
class Rejected:
    """One row that cannot be imported, and why (one line)."""

    line: int
    reason: str


def _enabled(value: object) -> bool:
    if value is None or value == "":
        return True
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"enabled must be true or false, not {str(value)!r}")


def _row(line: int, address: object, password_hash: object, enabled: object) -> ImportRow:
    if not isinstance(address, str) or not address.strip():
        raise ValueError("no address")
    if not isinstance(password_hash, str) or not password_hash.strip():
        raise ValueError("no password hash")
    try:
        login = canonical_address(address.strip())
    except InvalidAddress as e:
        raise ValueError(str(e)) from None
    scheme = importable_scheme(password_hash)
    if scheme is None:
        raise ValueError(
            "the hash is not one mailsrv can verify (Argon2id, bcrypt or SHA512-crypt,"
            " optionally with a Dovecot {SCHEME} prefix)"
        )
    return ImportRow(line, login, password_hash.strip(), scheme, _enabled(enabled))


def parse_rows(text: str) -> tuple[list[ImportRow], list[Rejected]]:
    """The accounts in ``text`` (JSON lines or CSV, see the module docstring) and the rows
    rejected; a login given twice is rejected the second time."""
    rows: list[ImportRow] = []
    rejected: list[Rejected] = []
    seen: dict[str, int] = {}
    lines = text.splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    as_json = first.startswith("{")
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            if as_json:
                try:
                    item = json.loads(stripped)
                except json.JSONDecodeError as e:
                    raise ValueError(f"not JSON: {e.msg}") from None
                if not isinstance(item, dict):
                    raise ValueError("not a JSON object")
                unknown = sorted(set(item) - set(_HEADER))
                if unknown:
                    raise ValueError(f"unknown field(s) {', '.join(unknown)}")
                row = _row(number, item.get("address"), item.get("hash"), item.get("enabled"))
            else:
                (fields,) = list(csv.reader([raw]))
                fields = [f.strip() for f in fields]
                if tuple(f.lower() for f in fields) in (_HEADER, _HEADER[:2]) and not rows:
                    continue  # the header row
                if len(fields) < 2:
                    raise ValueError("expected address,hash[,enabled]")
                # Argon2's PHC string has commas of its own (m=...,t=...,p=...), and exports
                # rarely quote it: the hash is everything between the address and a final
                # enabled flag.
                last = fields[-1].lower()
                has_flag = len(fields) >= 3 and (last in _TRUE or last in _FALSE)
                middle = fields[1:-1] if has_flag else fields[1:]
                row = _row(number, fields[0], ",".join(middle), fields[-1] if has_flag else None)
        except ValueError as e:
            rejected.append(Rejected(number, str(e)))
            continue
        if row.login in seen:
            rejected.append(Rejected(number, f"{row.login} is also on line {seen[row.login]}"))
            continue
        seen[row.login] = number
        rows.append(row)
    return rows, rejected
