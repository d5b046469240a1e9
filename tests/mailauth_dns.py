"""A real twisted.names DNS server on loopback for the mail authentication tests.

The :mod:`tests.relay_dns` server, plus what these tests need from a server:

* NXDOMAIN answers carry the zone's SOA in the authority section, as real servers send them
  (Twisted's own server leaves it out), so negative caching can be seen;
* names in ``slow`` are answered after that many seconds, or never (``None``): a DNS server
  that stalls on some names, as a broken authoritative server does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from twisted.internet.error import CannotListenError
from twisted.names import dns

from tests.relay_dns import DNSServer, MemoryAuthority, Records, _ServFailFactory


class AuthDNSFactory(_ServFailFactory):
    """See the module docstring."""

    def __init__(
        self,
        authority: MemoryAuthority,
        servfail: Iterable[str],
        slow: Mapping[str, float | None],
        reactor: Any,
    ) -> None:
        super().__init__([authority], servfail)
        self._authority = authority
        self._slow = {name.lower().encode(): delay for name, delay in slow.items()}
        self._reactor = reactor
        self.stalled: list[str] = []

    def handleQuery(self, message: Any, protocol: Any, address: Any) -> Any:
        name = message.queries[0].name.name.lower()
        if name in self._slow:
            delay = self._slow[name]
            self.stalled.append(name.decode())
            if delay is None:
                return None
            self._reactor.callLater(delay, super().handleQuery, message, protocol, address)
            return None
        return super().handleQuery(message, protocol, address)

    def gotResolverError(self, failure: Any, protocol: Any, message: Any, address: Any) -> None:
        if not failure.check(dns.DomainError, dns.AuthoritativeDomainError):
            super().gotResolverError(failure, protocol, message, address)
            return
        origin, soa = self._authority.soa
        response = self._responseFromMessage(
            message=message,
            rCode=dns.ENAME,
            authority=[dns.RRHeader(origin, dns.SOA, dns.IN, soa.ttl, soa, auth=True)],
        )
        self.sendReply(protocol, response, address)


def txt(*strings: str | bytes, ttl: int | None = None) -> dns.Record_TXT:
    """One TXT record; each string longer than 255 bytes is split, as publishing tools do."""
    pieces: list[bytes] = []
    for text in strings:
        data = text.encode() if isinstance(text, str) else text
        pieces.extend([data[i : i + 255] for i in range(0, len(data), 255)] or [b""])
    return dns.Record_TXT(*pieces, ttl=ttl)


def start_auth_dns(
    records: Records,
    servfail: Iterable[str] = (),
    slow: Mapping[str, float | None] | None = None,
    origin: str = "test",
) -> DNSServer:
    """Serve ``records`` for ``origin`` over UDP and TCP on one free port of 127.0.0.1."""
    from twisted.internet import reactor

    factory = AuthDNSFactory(MemoryAuthority(origin, records), servfail, slow or {}, reactor)
    for _ in range(50):
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        port = udp.getHost().port
        try:
            tcp = reactor.listenTCP(port, factory, interface="127.0.0.1")
        except CannotListenError:
            udp.stopListening()
            continue
        return DNSServer(port, factory, [udp, tcp])
    raise RuntimeError("no port free for both UDP and TCP")
