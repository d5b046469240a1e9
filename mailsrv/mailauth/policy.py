"""What to do with a message once it is checked: deliver, deliver marked, or refuse.

* DMARC (``dmarc_enforce``, off by default): a message that fails DMARC for a domain whose
  policy is ``reject`` is refused (550 5.7.1); ``quarantine`` is delivered with the headers
  ``X-Spam-Flag: YES`` and ``X-Mailsrv-DMARC: quarantine`` (what mail filters and clients sort
  on).  ``pct`` (RFC 7489 section 6.3) is honoured: a failing message not sampled in gets the
  next less strict policy (``reject`` becomes ``quarantine``, ``quarantine`` becomes nothing).
  With enforcement off every message is delivered and the verdict says ``dis=none``.
* SPF (``spf_reject_fail``, off by default): a MAIL FROM that fails SPF (``-all``) is refused
  (550 5.7.23) on its own; by default DMARC alone decides, since forwarded mail fails SPF.
* A temporary error (``temperror``) never refuses or delays a message: it is delivered with
  the verdict in its header, whatever the settings.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mailsrv.mailauth.checks import with_disposition
from mailsrv.mailauth.verdict import Verdict
from mailsrv.smtp import replies
from mailsrv.smtp.replies import Reply

QUARANTINE_HEADERS = b"X-Spam-Flag: YES\nX-Mailsrv-DMARC: quarantine\n"
_LESS_STRICT = {"reject": "quarantine", "quarantine": "none"}


@dataclass(frozen=True)
class Decision:
    """The verdict with its DMARC disposition, and a refusal or the headers to add."""

    verdict: Verdict
    refusal: Reply | None = None
    headers: bytes = b""


class InboundPolicy:
    """Decides per message (see the module docstring); ``rng`` samples ``pct``."""

    def __init__(self, dmarc_enforce: bool, spf_reject_fail: bool, rng: random.Random) -> None:
        self.dmarc_enforce = dmarc_enforce
        self.spf_reject_fail = spf_reject_fail
        self._rng = rng

    def decide(self, verdict: Verdict) -> Decision:
        """The decision for ``verdict``."""
        dmarc = verdict.dmarc
        requested = "none"
        if dmarc.result == "fail" and dmarc.policy in _LESS_STRICT:
            requested = dmarc.policy
            if dmarc.pct < 100 and not self._rng.random() * 100 < dmarc.pct:
                requested = _LESS_STRICT[requested]
        disposition = requested if self.dmarc_enforce else "none"
        decided = with_disposition(verdict, disposition)
        spf = verdict.spf_mailfrom
        if self.spf_reject_fail and spf.result == "fail":
            reply = replies.SPF_REJECTED
            return Decision(decided, reply.with_text(reply.text.format(domain=spf.domain)))
        if disposition == "reject":
            reply = replies.DMARC_REJECTED
            return Decision(decided, reply.with_text(reply.text.format(domain=dmarc.from_domain)))
        if disposition == "quarantine":
            return Decision(decided, headers=QUARANTINE_HEADERS)
        return Decision(decided)
