"""The checks of one message, in order, in one worker thread: SPF (both identities), DKIM (every
signature), ARC, then DMARC from their results.

Each finished check is recorded in a :class:`Progress` as it completes, so that when the time
budget ends first the reactor side can still report what was found (:func:`unfinished`), and
every check not finished is ``temperror``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

from mailsrv.mailauth import dkim_check, dmarc_check, spf_check
from mailsrv.mailauth.lookups import ThreadLookups
from mailsrv.mailauth.verdict import ARCResult, DKIMResult, DMARCResult, SPFResult, Verdict


@dataclass(frozen=True)
class Facts:
    """What the checks know of the SMTP transaction: the client's address, its HELO, the MAIL
    FROM address (``""`` for the null sender) and this server's name (SPF's receiver)."""

    ip: str
    helo: str
    sender: str
    receiver: str


class Progress:
    """The checks finished so far; written by the worker thread, read by the reactor."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spf: tuple[SPFResult, SPFResult] | None = None
        self._dkim: tuple[DKIMResult, ...] | None = None
        self._arc: ARCResult | None = None
        self._from_domain = ""

    def spf(self, results: tuple[SPFResult, SPFResult]) -> None:
        with self._lock:
            self._spf = results

    def dkim(self, results: tuple[DKIMResult, ...]) -> None:
        with self._lock:
            self._dkim = results

    def arc(self, result: ARCResult) -> None:
        with self._lock:
            self._arc = result

    def from_domain(self, domain: str) -> None:
        with self._lock:
            self._from_domain = domain

    def snapshot(self, reason: str) -> Verdict:
        """A verdict of what is finished; ``temperror`` (because of ``reason``) for the rest."""
        with self._lock:
            spf, dkim, arc, from_domain = self._spf, self._dkim, self._arc, self._from_domain
        later = SPFResult("temperror", reason=reason)
        return Verdict(
            spf_mailfrom=spf[0] if spf else later,
            spf_helo=spf[1] if spf else later,
            dkim=dkim if dkim is not None else (DKIMResult("temperror", reason=reason),),
            dmarc=DMARCResult("temperror", from_domain, reason=reason),
            arc=arc if arc is not None else ARCResult("temperror", reason),
        )


def unfinished(progress: Progress, reason: str) -> Verdict:
    """The verdict when the checks did not finish (``reason``: why)."""
    return progress.snapshot(reason)


def run_checks(
    facts: Facts,
    message: bytes,
    lookups: ThreadLookups,
    progress: Progress,
    orgs: dmarc_check.OrgDomains,
) -> Verdict:
    """Every check of ``message`` (its content as received, LF line ends).  Worker thread."""
    header = dkim_check.header_section(message)
    domains = dmarc_check.from_domains(header)
    if isinstance(domains, list) and domains:
        progress.from_domain(domains[0])
    if not dkim_check.signed(header):  # what needs no DNS is known from the start
        progress.dkim(())
    if not dkim_check.sealed(header):
        progress.arc(ARCResult("none"))
    spf_mailfrom, spf_helo = spf_check.check(
        lookups, facts.ip, facts.sender, facts.helo, facts.receiver
    )
    progress.spf((spf_mailfrom, spf_helo))
    dkim_results = dkim_check.check_dkim(message, lookups)
    progress.dkim(dkim_results)
    arc = dkim_check.check_arc(message, lookups)
    progress.arc(arc)
    dmarc = dmarc_check.evaluate(header, spf_mailfrom, dkim_results, lookups, orgs)
    return Verdict(spf_mailfrom, spf_helo, dkim_results, dmarc, arc)


def with_disposition(verdict: Verdict, disposition: str) -> Verdict:
    """``verdict`` with what this server did about DMARC."""
    return replace(verdict, dmarc=replace(verdict.dmarc, disposition=disposition))
