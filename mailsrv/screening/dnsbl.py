"""DNS blocklists (RFC 5782): is the connecting client listed by any of the configured zones?

A client ``192.0.2.99`` is looked up as the A record of ``99.2.0.192.<zone>``; an IPv6 client
by its 32 nibbles in reverse order.  An answer in ``127.0.0.0/8`` means listed, with the
answer's addresses as the return codes; ``127.255.255.0/24`` is where the large lists put their
error codes (a query from a public resolver, too many queries), so such an answer is *not* a
listing and is logged, as is any answer outside ``127.0.0.0/8``.  No answer (NXDOMAIN, no A
record), a DNS failure or a lookup slower than the timeout is not a listing either: a
blocklist that cannot be asked never turns mail away.

Every zone is asked at once, each lookup bounded by the same timeout on the injected clock.
Answers are cached by the server's resolver (:mod:`mailsrv.dns`: for their TTL, "no such
name" for the zone's negative TTL), so a client that connects again is not asked about again.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import dns, error

_log = Logger(namespace="mailsrv.screening")

REFUSE = "refuse"
TAG = "tag"
ACTIONS = (REFUSE, TAG)

_LISTED = ipaddress.IPv4Network("127.0.0.0/8")
_ERROR_CODES = ipaddress.IPv4Network("127.255.255.0/24")


@dataclass(frozen=True)
class Zone:
    """One blocklist zone and what a listing in it does: refuse the client, or only tag."""

    name: str
    action: str = REFUSE


@dataclass(frozen=True)
class Listing:
    """The client is listed in ``zone`` with these return codes (e.g. ``127.0.0.2``)."""

    zone: Zone
    codes: tuple[str, ...]

    def describe(self) -> str:
        """``zone=code,code`` for a header or a log line."""
        return f"{self.zone.name}={','.join(self.codes)}"


def query_name(ip: str, zone: str) -> str:
    """The name to look up for ``ip`` in ``zone`` (ValueError if ``ip`` is not an address)."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if isinstance(address, ipaddress.IPv4Address):
        labels = reversed(str(address).split("."))
    else:
        labels = reversed(address.exploded.replace(":", ""))
    return ".".join(labels) + "." + zone


class DnsblChecker:
    """Asks ``resolver`` (an ``IResolver``) whether clients are listed (see the module)."""

    def __init__(self, resolver: Any, clock: IReactorTime) -> None:
        self._resolver = resolver
        self._clock = clock

    def listings(self, ip: str, zones: Sequence[Zone], timeout: float) -> Deferred[list[Listing]]:
        """The zones among ``zones`` that list ``ip``, in their order.  Never fails."""
        lookups = [self._codes(ip, zone.name, timeout) for zone in zones]
        gathered: Deferred[list[tuple[bool, Any]]] = defer.DeferredList(lookups, consumeErrors=True)

        def listed(results: list[tuple[bool, Any]]) -> list[Listing]:
            found = []
            for zone, (ok, codes) in zip(zones, results, strict=True):
                if ok and codes:
                    found.append(Listing(zone, codes))
            return found

        return gathered.addCallback(listed)

    def _codes(self, ip: str, zone: str, timeout: float) -> Deferred[tuple[str, ...]]:
        try:
            name = query_name(ip, zone)
        except ValueError:
            return defer.succeed(())  # not an IP client (a UNIX socket in tests): not listed
        asked: Deferred[Any] = self._resolver.lookupAddress(name, timeout=(timeout,))
        asked.addTimeout(timeout, self._clock)
        asked.addCallbacks(
            self._answered,
            self._failed,
            callbackArgs=(zone, ip),
            errbackArgs=(zone, ip),
        )
        return asked

    def _answered(self, result: Any, zone: str, ip: str) -> tuple[str, ...]:
        answers = result[0]
        codes: list[str] = []
        for record in answers:
            if record.type != dns.A:
                continue
            code = ipaddress.IPv4Address(record.payload.dottedQuad())
            if code in _ERROR_CODES or code not in _LISTED:
                _log.warn(
                    "DNSBL {zone} answered {code} for {client_ip}: not a listing (an error "
                    "code, e.g. queries from a public resolver are refused)",
                    zone=zone,
                    code=str(code),
                    client_ip=ip,
                )
                continue
            codes.append(str(code))
        return tuple(sorted(set(codes)))

    def _failed(self, failure: Any, zone: str, ip: str) -> tuple[str, ...]:
        if failure.check(error.DNSNameError):
            return ()
        reason = "timed out" if failure.check(defer.TimeoutError) else failure.getErrorMessage()
        _log.info(
            "DNSBL {zone} lookup for {client_ip} failed ({reason}): taken as not listed",
            zone=zone,
            client_ip=ip,
            reason=reason or type(failure.value).__name__,
        )
        return ()
