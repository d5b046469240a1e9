"""The session's screening steps on the MX port: DNSBL before the greeting, greylisting at RCPT.

Mixed into :class:`~mailsrv.smtp.session.SMTPSession`.  Neither applies to trusted networks,
authenticated users or the submission ports (see :mod:`mailsrv.screening`).  A client that a
refusing zone lists gets a ``554 5.7.1`` greeting naming the zone; after it, as RFC 5321
section 3.1 asks, the session waits for QUIT and answers every other command with ``503``.
A listing in a zone that only tags is written into the message's trace header instead
(``X-Mailsrv-DNSBL``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsrv.mailauth.verdict import DNSBLResult, SPFResult
from mailsrv.screening.dnsbl import REFUSE, Listing, Zone
from mailsrv.screening.greylist import GreylistSettings, Triplet, Verdict, client_network
from mailsrv.smtp import replies
from mailsrv.smtp.replies import Reply

if TYPE_CHECKING:
    from mailsrv.config import Config
    from mailsrv.smtp.server import SMTPServer

_log = Logger(namespace="mailsrv.smtp")

DNSBL_REFUSAL = "dnsbl"
"""The ``reason`` label of a connection refused because a blocklist lists its client."""


class ScreeningSteps:
    """DNSBL and greylisting for one session (the attributes come from the session)."""

    server: SMTPServer
    config: Config
    listener: str
    peer_ip: str
    trusted: bool
    sender: Any
    dnsbl_listings: tuple[Listing, ...] = ()
    """Listings of this client in zones that only tag (for the trace header)."""
    dnsbl_results: tuple[DNSBLResult, ...] = ()
    """Every zone's answer (for the webhook payload's ``authentication.dnsbl``)."""
    spf_passed: dict[str, bool]
    """Senders whose SPF was asked for greylisting's exemption, and the answer (per session)."""
    helo: str | None
    refused_at_greeting: bool = False

    def screened(self) -> bool:
        """Whether this session's mail is screened and checked (DNSBL, greylisting, the inbound
        SPF/DKIM/DMARC checks): the MX listener, a client neither trusted nor authenticated."""
        return self.listener == "mx" and not self.trusted and not self.sender.authenticated

    # -- DNSBL -----------------------------------------------------------------------------

    def _dnsbl_check(self) -> Deferred[Reply | None] | None:
        """Ask the blocklists about the client (None: nothing to ask); fires with the refusal
        greeting, or None to greet as usual."""
        checker = self.server.dnsbl
        if checker is None or not self.config.dnsbl_zones or not self.screened():
            return None
        zones = [Zone(name, action) for name, action in self.config.dnsbl_zones]
        asked = checker.listings(self.peer_ip, zones, self.config.dnsbl_timeout)
        return asked.addCallbacks(self._dnsbl_listed, self._dnsbl_failed, callbackArgs=(zones,))

    def _dnsbl_listed(self, listings: list[Listing], zones: list[Zone]) -> Reply | None:
        codes = {listing.zone.name: listing.codes for listing in listings}
        self.dnsbl_results = tuple(
            DNSBLResult(zone.name, zone.name in codes, codes.get(zone.name, ()), zone.action)
            for zone in zones
        )
        refusing = [listing for listing in listings if listing.zone.action == REFUSE]
        self.dnsbl_listings = tuple(listing for listing in listings if listing not in refusing)
        if self.dnsbl_listings:
            _log.info(
                "client {client_ip} listed (tagged): {listings}",
                client_ip=self.peer_ip,
                listings=" ".join(listing.describe() for listing in self.dnsbl_listings),
            )
        if not refusing:
            return None
        first = refusing[0]
        self.server.security_event(
            "dnsbl-listed",
            self.peer_ip,
            zone=first.zone.name,
            codes=",".join(first.codes),
            listener=self.listener,
        )
        self.refused_at_greeting = True
        return replies.DNSBL_LISTED.with_text(
            replies.DNSBL_LISTED.text.format(client_ip=self.peer_ip, zone=first.zone.name)
        )

    def _dnsbl_failed(self, failure: Failure) -> None:
        _log.failure("DNSBL check failed; the client is greeted as not listed", failure)
        return None

    def dnsbl_header(self) -> bytes:
        """The trace header of the tagging listings (empty when none), LF-terminated."""
        if not self.dnsbl_listings:
            return b""
        shown = "; ".join(listing.describe() for listing in self.dnsbl_listings)
        return f"X-Mailsrv-DNSBL: {shown}\n".encode("ascii")

    # -- greylisting -----------------------------------------------------------------------

    def _greylisting_applies(self) -> bool:
        return self.config.greylist and self.server.greylist is not None and self.screened()

    def _greylist(self, sender: str, recipient: str) -> Deferred[Verdict]:
        """The greylisting verdict of this client, ``sender`` and ``recipient``.  A store that
        cannot answer lets the recipient pass (logged): greylisting only delays spam."""
        greylist = self.server.greylist
        assert greylist is not None
        settings = GreylistSettings(
            self.config.greylist_delay, self.config.greylist_expiry, self.config.greylist_lifetime
        )
        try:
            triplet = Triplet(client_network(self.peer_ip), sender.lower(), recipient.lower())
        except ValueError:  # not an IP client
            return succeed(Verdict(True))
        verdict = greylist.attempt(
            triplet, self.server.clock.seconds(), settings, self._spf_exemption(sender)
        )

        def unanswered(failure: Failure) -> Verdict:
            _log.failure("greylisting store failed; the recipient passes", failure)
            return Verdict(True)

        return verdict.addErrback(unanswered)

    def _spf_exemption(self, sender: str) -> Callable[[], Deferred[bool]] | None:
        """Whether ``sender`` passes SPF, asked once per session and sender (None: not
        asked at all, as when the inbound checks are off, or for the null sender)."""
        inbound = self.server.inbound
        if inbound is None or not sender:
            return None

        def passes() -> Deferred[bool]:
            known = self.spf_passed.get(sender)
            if known is not None:
                return succeed(known)
            asked = inbound.verifier.spf_mailfrom(
                self.peer_ip, sender, self.helo or "", self.config.server_name, inbound.budget
            )

            def passed(result: SPFResult) -> bool:
                self.spf_passed[sender] = result.result == "pass"
                return self.spf_passed[sender]

            return asked.addCallback(passed)

        return passes

    def _greylisted_reply(self, verdict: Verdict, sender: str, recipient: str) -> Reply:
        wait = max(1, int(verdict.retry_in + 0.999))
        _log.info(
            "greylisted {client_ip} sender=<{sender}> recipient={recipient}: retry in {seconds} s",
            client_ip=self.peer_ip,
            sender=sender,
            recipient=recipient,
            seconds=wait,
        )
        return replies.GREYLISTED.with_text(replies.GREYLISTED.text.format(seconds=wait))
