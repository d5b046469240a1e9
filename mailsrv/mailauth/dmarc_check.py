"""DMARC (RFC 7489): the From domain's policy, and whether SPF or DKIM passed aligned with it.

Policy discovery (section 6.6.3) is done here with the thread's lookups: the ``_dmarc`` TXT
record of the From domain; when there is none, that of its organizational domain (the
registrable domain by the Public Suffix List that ``publicsuffixlist`` ships and keeps current),
whose ``sp=`` then applies.  Records that do not start with ``v=DMARC1`` are ignored; several
DMARC records mean no policy.  The ``dmarc`` library parses the record (unknown or bad tags are
dropped, a record without a valid ``p=`` is a ``permerror``) and evaluates relaxed or strict
alignment of the SPF-authenticated MAIL FROM domain and of each passing DKIM ``d=``.  An
identifier that is itself a public suffix never aligns (the library's relaxed rule would let a
parent domain align with its subdomains, and a public suffix is no organizational domain).

A failure while SPF or a DKIM signature had a temporary error is ``temperror``, not ``fail``:
a DNS hiccup never turns into a rejection.  A From field with several domains is evaluated for
each (section 6.6.1); the strictest failure wins.  ``pct`` and the disposition are applied by
:mod:`mailsrv.mailauth.policy`; the result here carries the policy and ``pct`` it found.
"""

from __future__ import annotations

import re
from email import policy as email_policy
from email.parser import BytesHeaderParser

import dmarc
from publicsuffixlist import PublicSuffixList

from mailsrv.mailauth.lookups import DNSTemporaryError, ThreadLookups, ascii_name
from mailsrv.mailauth.verdict import DKIMResult, DMARCResult, SPFResult

_DMARC_RECORD = re.compile(rb"^\s*v\s*=\s*DMARC1\s*(;|$)")


class OrgDomains:
    """Organizational domains (RFC 7489 section 3.2) from the Public Suffix List.

    Loading the list takes some 75 ms: build one, at start.  ``get_public_suffix`` is the name
    the ``dmarc`` library calls it by (it means the registrable domain).
    """

    def __init__(self, psl: PublicSuffixList | None = None) -> None:
        self._psl = psl if psl is not None else PublicSuffixList()

    def org_domain(self, domain: str) -> str:
        """The registrable domain of ``domain`` (``domain`` itself when it is a suffix)."""
        return self._psl.privatesuffix(domain) or domain

    def get_public_suffix(self, domain: str) -> str:
        return self.org_domain(domain)

    def is_suffix(self, domain: str) -> bool:
        """True when ``domain`` is a public suffix (``com``, ``co.uk``, ``github.io``)."""
        return self._psl.privatesuffix(domain) is None


def from_domains(header: bytes) -> list[str] | str:
    """The domains of the From field(s) of a header section, in ASCII; or why there is none."""
    parsed = BytesHeaderParser(policy=email_policy.default).parsebytes(header)
    fields = parsed.get_all("From") or []
    if not fields:
        return "no From field"
    domains: list[str] = []
    for field in fields:
        for address in getattr(field, "addresses", ()):
            domain = ascii_name(address.domain) if address.domain else None
            if domain is None:
                return "a From address without a usable domain"
            domains.append(domain)
    return list(dict.fromkeys(domains)) or "no address in the From field"


def _rank(result: DMARCResult) -> int:
    """How strict a result is, for a From field with several domains."""
    if result.result == "fail":
        return {"reject": 6, "quarantine": 5}.get(result.policy, 3)
    return {"temperror": 4, "permerror": 2, "pass": 1}.get(result.result, 0)


def evaluate(
    header: bytes,
    spf_mailfrom: SPFResult,
    dkim_results: tuple[DKIMResult, ...],
    lookups: ThreadLookups,
    orgs: OrgDomains,
) -> DMARCResult:
    """The DMARC result of a message (its header section given).  Worker thread."""
    domains = from_domains(header)
    if isinstance(domains, str):
        return DMARCResult("permerror", reason=domains)
    results = [_one(domain, spf_mailfrom, dkim_results, lookups, orgs) for domain in domains]
    return max(results, key=_rank)


def _discover(domain: str, lookups: ThreadLookups) -> list[bytes]:
    return [r for r in lookups.text(f"_dmarc.{domain}") if _DMARC_RECORD.match(r)]


def _one(
    domain: str,
    spf_mailfrom: SPFResult,
    dkim_results: tuple[DKIMResult, ...],
    lookups: ThreadLookups,
    orgs: OrgDomains,
) -> DMARCResult:
    org = orgs.org_domain(domain)
    try:
        records = _discover(domain, lookups)
        at_org = False
        if not records and org != domain:
            records, at_org = _discover(org, lookups), True
    except DNSTemporaryError as e:
        return DMARCResult("temperror", domain, reason=f"policy lookup: {e}")
    if len(records) != 1:
        return DMARCResult("none", domain, reason="several DMARC records" if records else "")
    text = records[0].decode("utf-8", "replace")
    library = dmarc.DMARC(publicsuffix=orgs)
    try:
        found = library.parse_record(
            text, domain=domain, org_domain=org if at_org else None, strict=False
        )
    except dmarc.RecordSyntaxError as e:
        return DMARCResult("permerror", domain, reason=f"bad record: {e}"[:200])
    published = found.p
    if at_org and found.sp is not dmarc.DMARCDisposition.UNSPECIFIED:
        published = found.sp
    policy = str(published.value)
    pct = max(0, min(100, found.pct))
    spf = None
    if (
        spf_mailfrom.result == "pass"
        and spf_mailfrom.domain
        and not orgs.is_suffix(spf_mailfrom.domain)
    ):
        spf = dmarc.SPF(spf_mailfrom.domain, dmarc.SPFResult.PASS)
    signatures = [
        dmarc.DKIM(d.domain, dmarc.DKIMResult.PASS, d.selector)
        for d in dkim_results
        if d.result == "pass" and d.domain and not orgs.is_suffix(d.domain)
    ]
    evaluated = library.get_result(
        found, auth_results=dmarc.AuthResults(spf=spf, dkim=signatures or None)
    )
    if evaluated.result is dmarc.DMARCResult.PASS:
        return DMARCResult("pass", domain, policy, pct)
    temporary = spf_mailfrom.result == "temperror" or any(
        d.result == "temperror" for d in dkim_results
    )
    if temporary:
        return DMARCResult("temperror", domain, policy, pct, reason="SPF or DKIM temperror")
    return DMARCResult("fail", domain, policy, pct, reason="no aligned SPF or DKIM pass")
