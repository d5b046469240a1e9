"""DKIM (RFC 6376, RSA and Ed25519 per RFC 8463) for every signature, and ARC (RFC 8617) chain
validation, by dkimpy.

dkimpy verifies one signature per call (``DKIM.verify(idx)``) and answers only True or False,
so the outcome is classed here from what happened around it, as RFC 6376 section 6.1 and RFC
8601 section 2.7.1 name them:

* the signature's tags do not parse or are invalid (expired, unknown algorithm): ``neutral``;
* the key record lookup gave no answer now: ``temperror``;
* there is no key record, or it is unusable (revoked ``p=``, malformed, too small): ``permerror``;
* the body hash or the signature does not match: ``fail``; else ``pass``.

At most :data:`MAX_SIGNATURES` signatures are verified (RFC 6376 6.1 lets a verifier limit
them); ARC instances are bounded by dkimpy (50).
"""

from __future__ import annotations

import binascii
import re
from typing import Any

import dkim

from mailsrv.mailauth.lookups import DNSTemporaryError, ThreadLookups
from mailsrv.mailauth.verdict import ARCResult, DKIMResult

MAX_SIGNATURES = 10
_SIGNATURE_FIELD = re.compile(rb"^dkim-signature[ \t]*:", re.IGNORECASE | re.MULTILINE)
_SEAL_FIELD = re.compile(rb"^arc-seal[ \t]*:", re.IGNORECASE | re.MULTILINE)


class _KeyLookups:
    """dkimpy's ``dnsfunc``: the key records through the thread's lookups, remembering what
    the last lookup found."""

    def __init__(self, lookups: ThreadLookups) -> None:
        self._lookups = lookups
        self.temporary = False
        self.any_temporary = False
        self.record: bytes | None = None

    def __call__(self, name: bytes, timeout: Any = None) -> bytes | None:
        self.temporary, self.record = False, None
        try:
            records = self._lookups.text(name)
        except DNSTemporaryError as e:
            self.temporary = self.any_temporary = True
            raise dkim.DnsTimeoutError(str(e)) from None
        self.record = records[0] if records else None
        return self.record


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return " ".join(str(value).split())[:200]


def _signature_start(fields: dict[bytes, bytes]) -> str:
    """The first 12 characters of ``b=`` (RFC 6008 asks for at least 8)."""
    return re.sub(rb"\s+", b"", fields.get(b"b", b""))[:12].decode("ascii", "replace")


def header_section(message: bytes) -> bytes:
    """The header section of a message with LF line ends."""
    end = message.find(b"\n\n")
    return message if end < 0 else message[: end + 1]


def signed(header: bytes) -> bool:
    """True when a header section has a DKIM-Signature field."""
    return _SIGNATURE_FIELD.search(header) is not None


def sealed(header: bytes) -> bool:
    """True when a header section has an ARC set (an ARC-Seal field)."""
    return _SEAL_FIELD.search(header) is not None


def check_dkim(message: bytes, lookups: ThreadLookups) -> tuple[DKIMResult, ...]:
    """One result per DKIM-Signature field (top first).  Worker thread."""
    if not signed(header_section(message)):
        return ()
    try:
        verifier = dkim.DKIM(message, minkey=1024)
    except dkim.DKIMException as e:
        return (DKIMResult("permerror", reason=f"message not parsable: {_text(e)}"),)
    count = sum(1 for name, _value in verifier.headers if name.lower() == b"dkim-signature")
    return tuple(_one(verifier, index, lookups) for index in range(min(count, MAX_SIGNATURES)))


def _one(verifier: Any, index: int, lookups: ThreadLookups) -> DKIMResult:
    verifier.signature_fields = {}
    keys = _KeyLookups(lookups)
    try:
        verifier.verify_headerprep(index)
    except dkim.DKIMException as e:
        return _result(verifier, "neutral", f"bad signature: {_text(e)}")
    try:
        valid = verifier.verify(idx=index, dnsfunc=keys)
    except dkim.KeyFormatError as e:
        return _result(verifier, "permerror", f"unusable key: {_text(e)}")
    except dkim.ValidationError as e:
        return _result(verifier, "fail", _text(e).partition(" (")[0])
    except dkim.DKIMException as e:
        return _result(verifier, "permerror", _text(e))
    if valid:
        return _result(verifier, "pass")
    if keys.temporary:
        return _result(verifier, "temperror", "key lookup failed")
    if keys.record is None:
        return _result(verifier, "permerror", "no key")
    try:
        dkim.evaluate_pk(b"", keys.record)
    except (dkim.DKIMException, ValueError, TypeError, binascii.Error) as e:
        return _result(verifier, "permerror", f"unusable key: {_text(e)}")
    return _result(verifier, "fail", "signature did not verify")


def _result(verifier: Any, result: str, reason: str = "") -> DKIMResult:
    fields: dict[bytes, bytes] = verifier.signature_fields or {}
    return DKIMResult(
        result=result,
        domain=_text(fields.get(b"d", b"")).lower(),
        selector=_text(fields.get(b"s", b"")),
        algorithm=_text(fields.get(b"a", b"")).lower(),
        identity=_text(fields.get(b"i", b"")),
        signature=_signature_start(fields),
        reason=reason,
    )


def check_arc(message: bytes, lookups: ThreadLookups) -> ARCResult:
    """The ARC chain's validation: ``none`` without ARC sets.  Worker thread."""
    if not sealed(header_section(message)):
        return ARCResult("none")
    keys = _KeyLookups(lookups)
    try:
        chain, _results, reason = dkim.ARC(message, minkey=1024).verify(dnsfunc=keys)
    except dkim.DKIMException as e:
        return ARCResult("fail", _text(e))
    if chain == dkim.CV_Pass:
        return ARCResult("pass")
    if chain == dkim.CV_None:
        return ARCResult("none", _text(reason))
    if keys.any_temporary:
        return ARCResult("temperror", "key lookup failed")
    return ARCResult("fail", _text(reason))
