"""SPF (RFC 7208) of the MAIL FROM and HELO identities, evaluated by pyspf.

pyspf asks DNS through its module-level ``spf.DNSLookup`` function, the seam its own tests use
to feed it records.  This module points that function, once, at :func:`_lookup`, which answers
from the :class:`~mailsrv.mailauth.lookups.ThreadLookups` of the check running in the calling
thread (a context variable set around each evaluation), so each message's lookups go through
the server's resolver within that message's budget, and a thread with no check running gets
``temperror`` rather than the system resolver.  pyspf's own overall timer is off
(``querytime=0``); the budget is ours.
"""

from __future__ import annotations

import contextvars
import socket
from typing import Any

import spf
from twisted.names import dns

from mailsrv.mailauth.lookups import DNSTemporaryError, ThreadLookups, ascii_name
from mailsrv.mailauth.verdict import SPFResult

_current: contextvars.ContextVar[ThreadLookups] = contextvars.ContextVar("mailsrv_spf_lookups")

_TYPES = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "PTR": dns.PTR, "TXT": dns.TXT}


def _value(record: dns.RRHeader) -> Any:
    """A record as pyspf's DNS drivers give it."""
    payload = record.payload
    if isinstance(payload, dns.Record_A):
        return payload.dottedQuad()
    if isinstance(payload, dns.Record_AAAA):
        return socket.inet_ntop(socket.AF_INET6, payload.address)
    if isinstance(payload, dns.Record_MX):
        return (payload.preference, payload.name.name.decode("ascii", "replace"))
    if isinstance(payload, dns.Record_TXT):
        return tuple(payload.data)
    if isinstance(payload, dns.Record_PTR | dns.Record_CNAME):
        return payload.name.name.decode("ascii", "replace")
    return None


_KINDS = {
    dns.A: "A",
    dns.AAAA: "AAAA",
    dns.MX: "MX",
    dns.TXT: "TXT",
    dns.PTR: "PTR",
    dns.CNAME: "CNAME",
}


def _lookup(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> list[Any]:
    """pyspf's ``DNSLookup``: ``[((name, type), value), ...]``, CNAMEs included."""
    lookups = _current.get(None)
    if lookups is None:
        raise spf.TempError("DNS: no lookups for this thread")
    kind = _TYPES.get(qtype)
    if kind is None:
        return []  # the SPF RR type (99) and others RFC 7208 no longer asks for
    try:
        records = lookups.query(name, kind)
    except DNSTemporaryError as e:
        raise spf.TempError(f"DNS {e}") from None
    answers = []
    for record in records:
        value = _value(record)
        if value is not None and record.type in _KINDS:
            owner = record.name.name.decode("ascii", "replace").rstrip(".")
            answers.append(((owner, _KINDS[record.type]), value))
    return answers


spf.DNSLookup = _lookup


def _domain(address: str) -> str:
    return address.rpartition("@")[2]


def _is_domain(helo: str) -> bool:
    """RFC 7208 section 2.3: only a fully qualified domain name is a HELO identity."""
    name = ascii_name(helo)
    return name is not None and "." in name and not helo.startswith("[")


def check(
    lookups: ThreadLookups, ip: str, sender: str, helo: str, receiver: str
) -> tuple[SPFResult, SPFResult]:
    """(MAIL FROM, HELO) results.  Worker thread.

    A null reverse-path has the MAIL FROM identity ``postmaster@<HELO>`` (RFC 7208 2.4), so
    both results are then the HELO's.
    """
    token = _current.set(lookups)
    try:
        helo_result = SPFResult("none", helo, "HELO is not a domain name")
        if _is_domain(helo):
            helo_result = _evaluate(ip, "", helo, receiver, helo)
        if not sender:
            return helo_result, helo_result
        return _evaluate(ip, sender, helo, receiver, _domain(sender)), helo_result
    finally:
        _current.reset(token)


def check_mailfrom(
    lookups: ThreadLookups, ip: str, sender: str, helo: str, receiver: str
) -> SPFResult:
    """The MAIL FROM identity's result alone, of a non-null ``sender`` (greylisting's
    exemption, at RCPT).  Worker thread."""
    token = _current.set(lookups)
    try:
        return _evaluate(ip, sender, helo, receiver, _domain(sender))
    finally:
        _current.reset(token)


def _evaluate(ip: str, sender: str, helo: str, receiver: str, domain: str) -> SPFResult:
    try:
        query = spf.query(i=ip, s=sender, h=helo, receiver=receiver, querytime=0)
        result, _code, explanation = query.check()
    except Exception as e:  # pyspf on input it did not expect: no verdict, not a crash
        return SPFResult("permerror", domain, f"SPF evaluation failed: {type(e).__name__}")
    result = str(result).lower()
    if result not in ("none", "neutral", "pass", "fail", "softfail", "temperror", "permerror"):
        result = "permerror"
    return SPFResult(result, domain.lower(), str(explanation or "")[:200])
