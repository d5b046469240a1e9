"""The ``Authentication-Results`` header (RFC 8601): ours, rendered; forged ones, removed.

:func:`render` turns a :class:`~mailsrv.mailauth.verdict.Verdict` into the one header this
server adds, with its host name as authserv-id, one result per line::

    Authentication-Results: mx.example.org;
        spf=pass smtp.mailfrom=example.com;
        spf=none smtp.helo=mail.example.com;
        dkim=pass header.d=example.com header.s=sel header.a=rsa-sha256 header.b=Hk2r9YmP;
        dmarc=pass (p=reject pct=100 dis=none) header.from=example.com;
        arc=none

(each continuation line starts with a tab).  Each result clause is rendered by ``authres``
(the quoting of values); reason texts from outside (an SPF record's explanation, a library's
message) are cut to printable ASCII first.

:class:`ForgedResultsFilter` sits between the DATA decoder and the spool file of a message
that is checked: every ``Authentication-Results`` field of the header section whose authserv-id
is ours is dropped as it streams by (RFC 8601 section 5), so no downstream reader can mistake
a sender's claim for our verdict.  Fields with another authserv-id, and everything after the
header section, pass untouched; memory stays bounded (only the start of an
``Authentication-Results`` field is held, until its authserv-id has been read).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import Enum

from authres.core import AuthenticationResult, AuthenticationResultProperty

from mailsrv.mailauth.verdict import DKIMResult, SPFResult, Verdict

HEADER_NAME = "Authentication-Results"
_NAME = HEADER_NAME.lower().encode()
_HOLD_LIMIT = 8192  # an Authentication-Results field whose authserv-id is not read by then
_NAME_LIMIT = 998  # a header line without a colon by then is not a field (RFC 5322 2.1.1)
_UNSAFE = re.compile(r"[^\x20-\x7e]|[@\"\\()]")


def _text(value: str, limit: int = 120) -> str:
    """Printable ASCII without quotes, parentheses or ``@``, at most ``limit`` characters."""
    return _UNSAFE.sub("?", " ".join(value.split()))[:limit]


def _clause(
    method: str,
    result: str,
    properties: list[tuple[str, str, str]],
    comment: str = "",
    reason: str = "",
) -> str:
    clause = AuthenticationResult(
        method,
        result=result,
        result_comment=_text(comment) or None,
        reason=_text(reason) or None,
        properties=[
            AuthenticationResultProperty(ptype, name, value)
            for ptype, name, value in properties
            if value
        ],
    )
    return str(clause)


def _spf(identity: str, spf: SPFResult) -> str:
    key = "mailfrom" if identity == "mailfrom" else "helo"
    return _clause("spf", spf.result, [("smtp", key, spf.domain)], reason=spf.reason)


def _dkim(dkim: DKIMResult) -> str:
    properties = [
        ("header", "d", dkim.domain),
        ("header", "s", dkim.selector),
        ("header", "a", dkim.algorithm),
        ("header", "b", dkim.signature),
    ]
    return _clause("dkim", dkim.result, properties, reason=dkim.reason)


def render(authserv_id: str, verdict: Verdict) -> bytes:
    """Our ``Authentication-Results`` header for ``verdict``, LF line ends (stored form)."""
    clauses = [_spf("mailfrom", verdict.spf_mailfrom), _spf("helo", verdict.spf_helo)]
    clauses += [_dkim(d) for d in verdict.dkim] or [_clause("dkim", "none", [])]
    dmarc = verdict.dmarc
    policy = ""
    if dmarc.policy:
        policy = f"p={dmarc.policy} pct={dmarc.pct} dis={dmarc.disposition}"
    clauses.append(
        _clause(
            "dmarc",
            dmarc.result,
            [("header", "from", dmarc.from_domain)],
            comment=policy,
            reason=dmarc.reason if dmarc.result != "pass" else "",
        )
    )
    clauses.append(_clause("arc", verdict.arc.result, [], reason=verdict.arc.reason))
    lines = ";\n\t".join([_text(authserv_id, 255), *clauses])
    return f"{HEADER_NAME}: {lines}\n".encode("ascii", "replace")


# --- the authserv-id of a header someone else wrote --------------------------------------------


class _Read(Enum):
    FOUND = "found"
    MORE = "need more"  # the value so far is only whitespace and comments
    NONE = "none"  # the whole value has no authserv-id


_SPACE = b" \t\r\n"
_TOKEN_END = b' \t\r\n;()"'


def authserv_id_of(value: bytes, complete: bool) -> tuple[_Read, bytes]:
    """The authserv-id at the start of an ``Authentication-Results`` value (lower case).

    Skips comments (nested, with quoted pairs) and folding whitespace, then reads a token or a
    quoted string.  ``complete``: ``value`` is the whole field value, not its start.
    """
    i, depth, end = 0, 0, len(value)
    while i < end:
        c = value[i]
        if depth:
            if c == 0x5C:  # backslash: a quoted pair
                i += 2
                continue
            depth += {0x28: 1, 0x29: -1}.get(c, 0)
            i += 1
        elif c in _SPACE:
            i += 1
        elif c == 0x28:
            depth, i = 1, i + 1
        else:
            break
    if i >= end:
        return (_Read.NONE if complete else _Read.MORE), b""
    if value[i] == 0x22:  # a quoted string
        found, j = bytearray(), i + 1
        while j < end and value[j] != 0x22:
            if value[j] == 0x5C and j + 1 < end:
                j += 1
            found.append(value[j])
            j += 1
        if j >= end and not complete:
            return _Read.MORE, b""
        return _Read.FOUND, bytes(found).lower()
    j = i
    while j < end and value[j] not in _TOKEN_END:
        j += 1
    if j >= end and not complete:
        return _Read.MORE, b""
    return _Read.FOUND, value[i:j].lower()


def _same_id(found: bytes, ours: bytes) -> bool:
    return found.rstrip(b".") == ours


# --- the filter --------------------------------------------------------------------------------


class _Mode(Enum):
    KEEP = "keep"  # the current field goes on to the spool
    DROP = "drop"  # the current field is ours, forged: dropped
    HOLD = "hold"  # an Authentication-Results field whose authserv-id is not read yet


class ForgedResultsFilter:
    """Removes ``Authentication-Results`` fields claiming ``authserv_id`` from a streamed
    message (LF line ends, as the DATA decoder gives it); see the module docstring.

    ``removed_bytes`` and ``removed_lines`` say how much was dropped (the stored size and the
    size on the wire, where each line end is two bytes, shrink by that).
    """

    def __init__(self, write: Callable[[bytes], None], authserv_id: str) -> None:
        self._write = write
        self._ours = authserv_id.lower().rstrip(".").encode("ascii", "replace")
        self._body = False
        self._line = b""  # the start of the current line, not yet classified
        self._mid_line = False  # the current line has been classified, its start handled
        self._mode = _Mode.KEEP
        self._held = b""  # the Authentication-Results field so far (HOLD)
        self.removed_bytes = 0
        self.removed_lines = 0
        self.removed_fields = 0

    def write(self, data: bytes) -> None:
        """Pass on ``data``, less what belongs to a forged field."""
        if self._body:
            self._write(data)
            return
        out: list[bytes] = []
        pos = 0
        while pos < len(data) and not self._body:
            cut = data.find(b"\n", pos)
            piece = data[pos:] if cut < 0 else data[pos : cut + 1]
            pos += len(piece)
            self._piece(piece, piece.endswith(b"\n"), out)
        if pos < len(data):
            out.append(data[pos:])
        if out:
            self._write(b"".join(out))

    def close(self) -> None:
        """The message has ended: settle a field still held and pass on what is left."""
        out: list[bytes] = []
        if self._line:
            line, self._line = self._line, b""
            self._classified(line, self._classify(line, complete=True) or "end", out)
        if self._mode is _Mode.HOLD:
            self._settle(complete=True, out=out)
        if out:
            self._write(b"".join(out))

    # -- one piece of a line (the whole rest of it when ``complete``) ---------------------------

    def _piece(self, piece: bytes, complete: bool, out: list[bytes]) -> None:
        if self._mid_line:
            self._continue(piece, out)
        else:
            line = self._line + piece
            kind = self._classify(line, complete)
            if kind is None:  # not enough of the line yet to tell what it is
                self._line = line
                return
            self._line = b""
            self._classified(line, kind, out)
        self._mid_line = not complete and not self._body

    def _classify(self, line: bytes, complete: bool) -> str | None:
        if line in (b"\n", b"\r\n"):
            return "end"
        if line[:1] in (b" ", b"\t"):
            return "continuation"
        colon = line.find(b":")
        if colon >= 0:
            return "ar" if line[:colon].strip().lower() == _NAME else "field"
        if complete or len(line) > _NAME_LIMIT:
            return "end"  # not a header field: the body starts here (as email parsers read it)
        return None

    def _classified(self, line: bytes, kind: str, out: list[bytes]) -> None:
        if kind == "continuation":
            self._continue(line, out)
            return
        if self._mode is _Mode.HOLD:  # the field held so far ended with this line
            self._settle(complete=True, out=out)
        if kind == "end":
            self._body = True
            out.append(line)
        elif kind == "ar":
            self._mode, self._held = _Mode.HOLD, line
            self._settle(complete=False, out=out)
        else:
            self._mode = _Mode.KEEP
            out.append(line)

    def _continue(self, piece: bytes, out: list[bytes]) -> None:
        if self._mode is _Mode.KEEP:
            out.append(piece)
        elif self._mode is _Mode.DROP:
            self._dropped(piece)
        else:
            self._held += piece
            self._settle(complete=False, out=out)

    def _settle(self, complete: bool, out: list[bytes]) -> None:
        """Decide on the held field once its authserv-id is known (or it is too long)."""
        value = self._held.partition(b":")[2]
        state, found = authserv_id_of(value, complete)
        if state is _Read.MORE and len(self._held) <= _HOLD_LIMIT:
            return
        held, self._held = self._held, b""
        if (state is _Read.FOUND and _same_id(found, self._ours)) or state is _Read.MORE:
            self._mode = _Mode.DROP  # ours, or hiding its authserv-id behind 8 KiB of comments
            self.removed_fields += 1
            self._dropped(held)
        else:
            self._mode = _Mode.KEEP
            out.append(held)

    def _dropped(self, data: bytes) -> None:
        self.removed_bytes += len(data)
        self.removed_lines += data.count(b"\n")
