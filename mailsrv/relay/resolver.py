"""The next hop: a smarthost, or the recipient domain's mail exchangers found with twisted.names.

For direct delivery (RFC 5321 section 5.1): the MX records by preference, in random order among
equal preferences; no MX record means the domain itself is the one implicit MX; a null MX (RFC
7505, a single ``MX 0 .``) means the domain takes no mail.  Each MX host is resolved to its IPv6
and IPv4 addresses, which are tried in turn (alternating families, so one broken family does not
stall delivery).  NXDOMAIN and null MX are permanent; SERVFAIL, timeouts and other DNS trouble are
temporary.  The answer is a :class:`Route`: the MX-rollup destination key and the ordered
connection candidates; or a :class:`NextHopError` carrying the reply for every recipient.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.names import dns, error

from mailsrv.dns import DEFAULT_DNS_TIMEOUTS, make_resolver
from mailsrv.relay import replies
from mailsrv.relay.destinations import mx_destination, smarthost_destination
from mailsrv.smtp.replies import Reply

__all__ = [
    "DEFAULT_DNS_TIMEOUTS",  # their old home, for importers: see mailsrv.dns
    "Candidate",
    "NextHop",
    "NextHopError",
    "Route",
    "make_resolver",
]


class NextHopError(Exception):
    """No next hop for now (temporary) or ever (permanent); ``reply`` says which and why."""

    def __init__(self, reply: Reply, detail: str = "") -> None:
        super().__init__(
            f"{reply.code} {reply.enhanced} {reply.text}" + (f": {detail}" if detail else "")
        )
        self.reply = reply if not detail else reply.with_text(f"{reply.text}: {detail}")

    @property
    def permanent(self) -> bool:
        """True when retrying cannot help (a 5xx reply)."""
        return self.reply.code >= 500


@dataclass(frozen=True)
class Candidate:
    """One place to connect to: the next hop's host name, one of its addresses, the port."""

    host: str
    address: str
    port: int


@dataclass(frozen=True)
class Route:
    """Where a domain's mail goes: its destination key, MX hosts in order, and candidates."""

    destination: str
    mx_hosts: tuple[str, ...]
    candidates: tuple[Candidate, ...]


def _ascii_domain(domain: str) -> str:
    name = domain.strip().rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise NextHopError(replies.BAD_DOMAIN, domain) from None
    if not name or len(name) > 253 or any(not 0 < len(label) <= 63 for label in name.split(".")):
        raise NextHopError(replies.BAD_DOMAIN, domain)
    return name


def _literal(domain: str) -> str | None:
    """The IP address of a domain literal ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]``, else None."""
    if not domain.startswith("["):
        return None
    inner = domain[1:-1] if domain.endswith("]") else ""
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        raise NextHopError(replies.BAD_DOMAIN, domain) from None


class _Lookup:
    """One classified DNS answer: records, or whether the name is missing or the lookup failed."""

    def __init__(self, records: list[Any], missing: bool = False, failure: str = "") -> None:
        self.records = records
        self.missing = missing  # NXDOMAIN
        self.failure = failure  # temporary trouble, for the reply text


class NextHop:
    """Finds the route for a recipient domain.

    ``resolver`` is a twisted.names ``IResolver`` (the server's
    :class:`mailsrv.dns.ServerResolver`); ``clock`` bounds each lookup to ``timeout`` seconds;
    ``rng`` orders MX hosts of equal preference.  With
    ``smarthost`` (``(host, port)``) every domain routes to it and MX records are not looked up;
    a smarthost given by address has one route for good, made once.
    """

    def __init__(
        self,
        resolver: Any,
        clock: IReactorTime,
        rng: random.Random,
        mx_port: int = 25,
        timeout: float = 60.0,
        smarthost: tuple[str, int] | None = None,
    ) -> None:
        self._resolver = resolver
        self._clock = clock
        self._rng = rng
        self._mx_port = mx_port
        self._timeout = timeout
        self._smarthost = smarthost
        self._smarthost_route: Route | None = None
        if smarthost is not None and _ip_address(smarthost[0]) is not None:
            host, port = smarthost
            candidates = (Candidate(host, str(_ip_address(host)), port),)
            self._smarthost_route = Route(smarthost_destination(host, port), (host,), candidates)

    async def route(self, domain: str) -> Route:
        """The route for ``domain``; raises :class:`NextHopError`."""
        if self._smarthost_route is not None:
            return self._smarthost_route
        if self._smarthost is not None:
            host, port = self._smarthost
            candidates = await self._candidates([host], port)
            return Route(smarthost_destination(host, port), (host,), candidates)
        literal = _literal(domain)
        if literal is not None:
            return Route(
                f"literal:{literal}", (domain,), (Candidate(domain, literal, self._mx_port),)
            )
        name = _ascii_domain(domain)
        mx_hosts = await self.mx_hosts(name)
        candidates = await self._candidates(mx_hosts, self._mx_port)
        return Route(mx_destination(mx_hosts), mx_hosts, candidates)

    async def mx_hosts(self, domain: str) -> tuple[str, ...]:
        """The domain's MX host names in the order to try them (implicit MX: the domain)."""
        found = await self._lookup(self._resolver.lookupMailExchange, domain)
        if found.missing:
            raise NextHopError(replies.NO_SUCH_DOMAIN, domain)
        if found.failure:
            raise NextHopError(replies.DNS_TEMPORARY, f"MX {domain}: {found.failure}")
        records = [
            (r.payload.preference, r.payload.name.name.decode("ascii", "replace").lower())
            for r in found.records
            if r.type == dns.MX
        ]
        if not records:
            return (domain,)  # RFC 5321 section 5.1: the implicit MX
        real = [(pref, host.rstrip(".")) for pref, host in records if host.rstrip(".")]
        if not real:
            raise NextHopError(replies.NULL_MX, domain)  # RFC 7505
        self._rng.shuffle(real)
        real.sort(key=lambda record: record[0])  # stable: random within a preference
        return tuple(dict.fromkeys(host for _pref, host in real))

    async def addresses(self, host: str) -> tuple[str, ...]:
        """IPv6 and IPv4 addresses of ``host``, alternating families (IPv6 first)."""
        found = await self._addresses(host)
        if not found[0] and found[1]:
            raise NextHopError(replies.DNS_TEMPORARY, f"{host}: {found[1]}")
        return found[0]

    async def _addresses(self, host: str) -> tuple[tuple[str, ...], str]:
        """(addresses, failure text if a lookup failed temporarily)."""
        address = _ip_address(host)
        if address is not None:
            return (str(address),), ""
        name = _ascii_domain(host)
        v6, v4 = await defer.gatherResults(
            [
                defer.Deferred.fromCoroutine(self._lookup(self._resolver.lookupIPV6Address, name)),
                defer.Deferred.fromCoroutine(self._lookup(self._resolver.lookupAddress, name)),
            ]
        )
        six = [
            socket.inet_ntop(socket.AF_INET6, r.payload.address)
            for r in v6.records
            if r.type == dns.AAAA
        ]
        four = [r.payload.dottedQuad() for r in v4.records if r.type == dns.A]
        mixed: list[str] = []
        for index in range(max(len(six), len(four))):
            mixed.extend(family[index] for family in (six, four) if index < len(family))
        return tuple(dict.fromkeys(mixed)), v6.failure or v4.failure

    async def _candidates(self, hosts_in_order: Sequence[str], port: int) -> tuple[Candidate, ...]:
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self._addresses(host)) for host in hosts_in_order]
        )
        candidates: list[Candidate] = []
        failures = []
        for host, (addresses, failure) in zip(hosts_in_order, results, strict=True):
            candidates.extend(Candidate(host, address, port) for address in addresses)
            if failure:
                failures.append(f"{host}: {failure}")
        if candidates:
            return tuple(dict.fromkeys(candidates))
        if failures:
            raise NextHopError(replies.DNS_TEMPORARY, "; ".join(failures))
        raise NextHopError(replies.NO_ADDRESS, ", ".join(hosts_in_order))

    async def _lookup(self, method: Callable[[str], Any], name: str) -> _Lookup:
        """Run one lookup, bounded by the timeout, and classify its outcome."""
        d = method(name)
        d.addTimeout(self._timeout, self._clock)
        try:
            answers, _authority, _additional = await d
        except defer.CancelledError:
            raise  # the caller gave up: not a DNS answer
        except error.DNSNameError:
            return _Lookup([], missing=True)
        except error.DNSServerError:
            return _Lookup([], failure="server failure (SERVFAIL)")
        except (defer.TimeoutError, error.DNSQueryTimeoutError):
            return _Lookup([], failure="timed out")
        except error.DNSQueryRefusedError:
            return _Lookup([], failure="query refused")
        except error.DomainError:
            return _Lookup([], missing=True)
        except Exception as e:  # any other DNS trouble is temporary
            return _Lookup([], failure=type(e).__name__)
        return _Lookup(list(answers))


def _ip_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an IP address, or None when it is a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
