"""The verdict of one message's checks: SPF for both identities, each DKIM signature, DMARC, ARC.

Immutable values (they travel inside :class:`~mailsrv.delivery.envelope.AcceptedMessage`), one
per method, with the RFC 8601 result words (``pass``, ``fail``, ``temperror`` ...).  The same
JSON object is what the webhook outbox stores and what the ``authentication`` field of a
``message.received`` payload carries (see ``mailsrv/webhook/schema/event-v1.json``);
:meth:`Verdict.from_dict` reads it back strictly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mailsrv.jsonstore.fields import Fields, RecordError

SPF_RESULTS = ("none", "neutral", "pass", "fail", "softfail", "temperror", "permerror")
DKIM_RESULTS = ("none", "pass", "fail", "policy", "neutral", "temperror", "permerror")
DMARC_RESULTS = ("none", "pass", "fail", "temperror", "permerror")
ARC_RESULTS = ("none", "pass", "fail", "temperror")
POLICIES = ("", "none", "quarantine", "reject")
DISPOSITIONS = ("none", "quarantine", "reject")


@dataclass(frozen=True)
class SPFResult:
    """SPF (RFC 7208) for one identity: ``domain`` is the one checked (``""`` when none)."""

    result: str
    domain: str = ""
    reason: str = ""


@dataclass(frozen=True)
class DKIMResult:
    """One DKIM signature (RFC 6376): its ``d=``, ``s=``, ``a=``, ``i=`` and the start of its
    ``b=`` (``signature``, RFC 6008's ``header.b``)."""

    result: str
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    identity: str = ""
    signature: str = ""
    reason: str = ""


@dataclass(frozen=True)
class DMARCResult:
    """DMARC (RFC 7489) for the From domain.

    ``policy`` is what the domain's record asks for this message (``p=``, or ``sp=`` for a
    subdomain without a record of its own; ``""`` when unknown), ``pct`` its sampling rate,
    and ``disposition`` what this server did: ``none`` unless ``dmarc_enforce`` is on.
    """

    result: str
    from_domain: str = ""
    policy: str = ""
    pct: int = 100
    disposition: str = "none"
    reason: str = ""


@dataclass(frozen=True)
class ARCResult:
    """The ARC chain's validation (RFC 8617); no chain is ``none``."""

    result: str
    reason: str = ""


@dataclass(frozen=True)
class DNSBLResult:
    """One blocklist zone's answer about the client at connect: listed (with the return
    codes, e.g. ``127.0.0.2``) or not, and what a listing there does (``refuse`` or ``tag``)."""

    zone: str
    listed: bool
    codes: tuple[str, ...] = ()
    action: str = "refuse"


DNSBL_ACTIONS = ("refuse", "tag")


@dataclass(frozen=True)
class Verdict:
    """Everything the checks found; what the ``Authentication-Results`` header says, and the
    blocklists' answers at connect (``dnsbl``: empty when none was asked)."""

    spf_mailfrom: SPFResult
    spf_helo: SPFResult
    dkim: tuple[DKIMResult, ...]
    dmarc: DMARCResult
    arc: ARCResult
    dnsbl: tuple[DNSBLResult, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (stored with the outbox entry; the webhook's ``authentication``)."""
        return {
            "spf": {"mailfrom": _spf_dict(self.spf_mailfrom), "helo": _spf_dict(self.spf_helo)},
            "dkim": [
                {
                    "result": d.result,
                    "domain": d.domain,
                    "selector": d.selector,
                    "algorithm": d.algorithm,
                    "identity": d.identity,
                    "signature": d.signature,
                    "reason": d.reason,
                }
                for d in self.dkim
            ],
            "dmarc": {
                "result": self.dmarc.result,
                "from_domain": self.dmarc.from_domain,
                "policy": self.dmarc.policy,
                "pct": self.dmarc.pct,
                "disposition": self.dmarc.disposition,
                "reason": self.dmarc.reason,
            },
            "arc": {"result": self.arc.result, "reason": self.arc.reason},
        } | (
            {
                "dnsbl": [
                    {"zone": d.zone, "listed": d.listed, "codes": list(d.codes), "action": d.action}
                    for d in self.dnsbl
                ]
            }
            if self.dnsbl
            else {}
        )

    @classmethod
    def from_dict(cls, raw: object, where: str) -> Verdict:
        """The verdict stored as ``raw`` (RecordError naming the bad field)."""
        keys = {"spf", "dkim", "dmarc", "arc"}
        if isinstance(raw, dict) and "dnsbl" in raw:
            keys.add("dnsbl")
        top = Fields(raw, where, frozenset(keys))
        dnsbl_raw = top.value("dnsbl") if "dnsbl" in keys else []
        if not isinstance(dnsbl_raw, list):
            raise top.bad("dnsbl", "a list")
        spf = Fields(top.value("spf"), f"{where}.spf", frozenset(("mailfrom", "helo")))
        dkim_raw = top.value("dkim")
        if not isinstance(dkim_raw, list):
            raise top.bad("dkim", "a list")
        return cls(
            spf_mailfrom=_spf_from(spf.value("mailfrom"), f"{where}.spf.mailfrom"),
            spf_helo=_spf_from(spf.value("helo"), f"{where}.spf.helo"),
            dkim=tuple(_dkim_from(item, f"{where}.dkim[{n}]") for n, item in enumerate(dkim_raw)),
            dmarc=_dmarc_from(top.value("dmarc"), f"{where}.dmarc"),
            arc=_arc_from(top.value("arc"), f"{where}.arc"),
            dnsbl=tuple(
                _dnsbl_from(item, f"{where}.dnsbl[{n}]") for n, item in enumerate(dnsbl_raw)
            ),
        )


def _spf_dict(spf: SPFResult) -> dict[str, str]:
    return {"result": spf.result, "domain": spf.domain, "reason": spf.reason}


def _word(fields: Fields, key: str, allowed: tuple[str, ...]) -> str:
    value = fields.text(key, allow_empty=True)
    if value not in allowed:
        raise RecordError(f"{fields.where}.{key}: {value!r} is not one of {', '.join(allowed)}")
    return value


def _spf_from(raw: object, where: str) -> SPFResult:
    f = Fields(raw, where, frozenset(("result", "domain", "reason")))
    return SPFResult(
        _word(f, "result", SPF_RESULTS),
        f.text("domain", allow_empty=True),
        f.text("reason", allow_empty=True),
    )


_DKIM_KEYS = frozenset(
    ("result", "domain", "selector", "algorithm", "identity", "signature", "reason")
)


def _dkim_from(raw: object, where: str) -> DKIMResult:
    f = Fields(raw, where, _DKIM_KEYS)
    return DKIMResult(
        _word(f, "result", DKIM_RESULTS),
        *(f.text(key, allow_empty=True) for key in _DKIM_FIELDS),
    )


_DKIM_FIELDS = ("domain", "selector", "algorithm", "identity", "signature", "reason")
_DMARC_KEYS = frozenset(("result", "from_domain", "policy", "pct", "disposition", "reason"))


def _dmarc_from(raw: object, where: str) -> DMARCResult:
    f = Fields(raw, where, _DMARC_KEYS)
    pct = f.count("pct")
    if pct > 100:
        raise f.bad("pct", "a percentage")
    return DMARCResult(
        _word(f, "result", DMARC_RESULTS),
        f.text("from_domain", allow_empty=True),
        _word(f, "policy", POLICIES),
        pct,
        _word(f, "disposition", DISPOSITIONS),
        f.text("reason", allow_empty=True),
    )


def _arc_from(raw: object, where: str) -> ARCResult:
    f = Fields(raw, where, frozenset(("result", "reason")))
    return ARCResult(_word(f, "result", ARC_RESULTS), f.text("reason", allow_empty=True))


def _dnsbl_from(raw: object, where: str) -> DNSBLResult:
    f = Fields(raw, where, frozenset(("zone", "listed", "codes", "action")))
    listed, codes = f.value("listed"), f.value("codes")
    if not isinstance(listed, bool):
        raise f.bad("listed", "true or false")
    if not isinstance(codes, list) or not all(isinstance(code, str) for code in codes):
        raise f.bad("codes", "a list of strings")
    return DNSBLResult(f.text("zone"), listed, tuple(codes), _word(f, "action", DNSBL_ACTIONS))
