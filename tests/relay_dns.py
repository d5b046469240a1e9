"""A real twisted.names authoritative DNS server on 127.0.0.1, UDP and TCP on one port.

:func:`start_dns` serves the zone ``test`` from an in-memory authority (a ``FileAuthority``
fed from a dict, the way ``PySourceAuthority`` is fed from a file); names listed in
``servfail`` get SERVFAIL.  :func:`start_black_hole` is a UDP port that never answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.names import authority, dns, server

Records = Mapping[str, Sequence[Any]]


class MemoryAuthority(authority.FileAuthority):
    """An authority for ``origin`` whose records come from a ``{name: [Record_*]}`` mapping."""

    def __init__(self, origin: str, records: Records) -> None:
        super().__init__((origin, records))

    def loadFile(self, filename: Any) -> None:
        origin, records = filename
        self.soa = (
            origin.encode(),
            dns.Record_SOA(
                mname=b"ns." + origin.encode(),
                rname=b"root." + origin.encode(),
                serial=1,
                refresh=60,
                retry=60,
                expire=60,
                minimum=60,
                ttl=60,
            ),
        )
        self.records = {name.lower().encode(): list(rrs) for name, rrs in records.items()}
        self.records.setdefault(origin.encode(), []).append(self.soa[1])


class _ServFailFactory(server.DNSServerFactory):
    """Answers SERVFAIL for some names, as a broken upstream would, and truncates UDP answers.

    Twisted's server never truncates (twisted#6949); a real one cuts a UDP answer at 512 bytes
    when the query had no EDNS, and the resolver then asks again over TCP.
    """

    def __init__(self, authorities: list[Any], servfail: Iterable[str]) -> None:
        super().__init__(authorities=authorities)
        self._servfail = {name.lower().encode() for name in servfail}
        self.queries: list[tuple[str, int, str]] = []  # (name, type, "udp"/"tcp")

    def handleQuery(self, message: Any, protocol: Any, address: Any) -> Any:
        query = message.queries[0]
        transport = "udp" if isinstance(protocol, dns.DNSDatagramProtocol) else "tcp"
        self.queries.append((query.name.name.decode(), query.type, transport))
        if query.name.name.lower() in self._servfail:
            response = self._responseFromMessage(message=message, rCode=dns.ESERVER)
            self.sendReply(protocol, response, address)
            return None
        return super().handleQuery(message, protocol, address)

    def sendReply(self, protocol: Any, message: Any, address: Any) -> None:
        if isinstance(protocol, dns.DNSDatagramProtocol) and not message.maxSize:
            message.maxSize = 512
        super().sendReply(protocol, message, address)


@dataclass
class DNSServer:
    """A running server: its port, the queries it saw, and its listening ports to stop."""

    port: int
    factory: _ServFailFactory
    listening: list[Any]

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def stop(self) -> None:
        for port in self.listening:
            await port.stopListening()


def start_dns(records: Records, servfail: Iterable[str] = (), origin: str = "test") -> DNSServer:
    """Serve ``records`` for ``origin`` over UDP and TCP on the same free port of 127.0.0.1."""
    from twisted.internet import reactor

    factory = _ServFailFactory([MemoryAuthority(origin, records)], servfail)
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


class _Silent(DatagramProtocol):
    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received = getattr(self, "received", 0) + 1


def start_black_hole() -> tuple[Any, _Silent]:
    """A UDP port on 127.0.0.1 that reads queries and never answers."""
    from twisted.internet import reactor

    protocol = _Silent()
    return reactor.listenUDP(0, protocol, interface="127.0.0.1"), protocol
