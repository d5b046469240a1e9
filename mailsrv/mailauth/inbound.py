"""The checks of one message on the MX listener, from the start of DATA to the reply.

The session asks :class:`InboundChecks` for an :class:`InboundCheck` when DATA starts (only on
the MX listener, and only for clients that are neither authenticated nor in a trusted
network: those are not checked and get no header).  The check then:

1. while the body streams to the spool, drops the ``Authentication-Results`` fields that claim
   our authserv-id (:class:`~mailsrv.mailauth.header.ForgedResultsFilter`);
2. at the end of DATA, reads the message back (from memory for most messages) and has the
   :class:`~mailsrv.mailauth.verifier.Verifier` check it off the reactor, within the budget;
3. applies the policy (:mod:`mailsrv.mailauth.policy`): a refusal, or our
   ``Authentication-Results`` header (and the quarantine headers) inserted after the
   ``Return-Path`` line of the spool file, so that every Maildir copy, queue record and webhook
   payload has it.

The session then commits as for any message: the 250 still comes only after the sync.  The
header, like ``Received``, does not count against ``max_message_size`` (the client's data
does); the sizes reported (stored and on the wire) include it and exclude what was dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailsrv.delivery.spool import SpoolFile
from mailsrv.mailauth.checks import Facts
from mailsrv.mailauth.header import ForgedResultsFilter, render
from mailsrv.mailauth.policy import InboundPolicy
from mailsrv.mailauth.verdict import Verdict
from mailsrv.mailauth.verifier import Verifier
from mailsrv.smtp.replies import Reply

_log = Logger(namespace="mailsrv.mailauth")


@dataclass(frozen=True)
class CheckOutcome:
    """How a check ended: the verdict, and a refusal or how much the message grew on the wire
    (our headers in, forged ones out; CRLF counted as two bytes)."""

    verdict: Verdict
    refusal: Reply | None = None
    wire_delta: int = 0


class InboundChecks:
    """What the SMTP server holds for the checks: verifier, policy, authserv-id, budget."""

    def __init__(
        self, verifier: Verifier, policy: InboundPolicy, authserv_id: str, budget: float
    ) -> None:
        self.verifier = verifier
        self.policy = policy
        self.authserv_id = authserv_id
        self.budget = budget

    def start(self, facts: Facts, queue_id: str) -> InboundCheck:
        """The check of the message whose DATA starts now."""
        return InboundCheck(self, facts, queue_id)


class InboundCheck:
    """One message's check (see the module docstring)."""

    def __init__(self, checks: InboundChecks, facts: Facts, queue_id: str) -> None:
        self._checks = checks
        self._facts = facts
        self._queue_id = queue_id
        self._filter: ForgedResultsFilter | None = None

    def body_sink(self, write: Callable[[bytes], None]) -> Callable[[bytes], None]:
        """Where the decoded body goes: through the forged-header filter to ``write``."""
        self._filter = ForgedResultsFilter(write, self._checks.authserv_id)
        return self._filter.write

    def finish(self, spool_file: SpoolFile, trace: bytes) -> Deferred[CheckOutcome]:
        """Check the message in ``spool_file`` (``trace``: our trace headers at its start) and
        apply the policy; fails only when the spool file cannot be read."""
        if self._filter is not None:
            self._filter.close()
        verdict: Deferred[Verdict] = spool_file.read().addCallback(self._verify, trace)
        checked: Deferred[CheckOutcome] = verdict.addCallback(
            self._decide, spool_file, trace.find(b"\n") + 1
        )
        return checked

    def _verify(self, content: bytes, trace: bytes) -> Deferred[Verdict]:
        checks = self._checks
        return checks.verifier.verify(self._facts, content[len(trace) :], checks.budget)

    def _decide(self, verdict: Verdict, spool_file: SpoolFile, offset: int) -> CheckOutcome:
        decision = self._checks.policy.decide(verdict)
        verdict = decision.verdict
        removed = 0
        if self._filter is not None:
            removed = self._filter.removed_bytes + self._filter.removed_lines
            if self._filter.removed_fields:
                _log.info(
                    "removed {count} forged Authentication-Results from {client_ip}",
                    count=self._filter.removed_fields,
                    client_ip=self._facts.ip,
                    queue_id=self._queue_id,
                )
        _log.info(
            "checked {queue_id}: spf={spf} dkim={dkim} dmarc={dmarc} arc={arc}"
            " disposition={disposition}",
            queue_id=self._queue_id,
            spf=verdict.spf_mailfrom.result,
            spf_helo=verdict.spf_helo.result,
            dkim=",".join(f"{d.result}:{d.domain}" for d in verdict.dkim) or "none",
            dmarc=verdict.dmarc.result,
            dmarc_domain=verdict.dmarc.from_domain,
            dmarc_policy=verdict.dmarc.policy,
            arc=verdict.arc.result,
            disposition="refused" if decision.refusal else verdict.dmarc.disposition,
        )
        if decision.refusal is not None:
            return CheckOutcome(verdict, decision.refusal)
        added = render(self._checks.authserv_id, verdict) + decision.headers
        spool_file.insert(offset, added)
        return CheckOutcome(verdict, None, len(added) + added.count(b"\n") - removed)
