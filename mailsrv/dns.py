"""The server's one DNS resolver: twisted.names, with timeouts and a small TTL-honouring cache.

Every part that asks DNS (the relay's next hop, SPF, DKIM, DMARC and ARC verification, DNSBL
lookups) uses the one :class:`ServerResolver` that the composition root (:mod:`mailsrv.tap`)
builds from ``dns_servers``, so there is one setting and one cache.  A lookup goes through:

1. the hosts file (names and addresses only);
2. the cache: an answer is served from memory until its smallest TTL runs out (capped at
   :data:`CACHE_MAX_TTL`); a name that does not exist or has no records of the type is
   remembered for its SOA's negative TTL (RFC 2308, capped at :data:`NEGATIVE_MAX_TTL`); at
   most :data:`CACHE_ENTRIES` entries, the oldest dropped first, so names chosen by clients
   (HELO names, sender domains) cannot grow it without bound;
3. the DNS servers: ``dns_servers`` or, when empty, those of ``/etc/resolv.conf``, each query
   retransmitted on the given timeouts.

Twisted's own ``CacheResolver`` in a ``ResolverChain`` is never fed (the chain does not hand
answers back to it), hence the small cache here.  Expired entries are dropped when met, not
on timers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.names import client as dns_client
from twisted.names import dns, error, hosts, resolve
from twisted.names.common import ResolverBase
from twisted.python.failure import Failure

from mailsrv.config import Config, split_host_port

DEFAULT_DNS_TIMEOUTS = (1.0, 3.0, 11.0, 45.0)
"""Retransmission timeouts of one query (those of ``twisted.names.client``)."""
CACHE_ENTRIES = 10_000
CACHE_MAX_TTL = 3600.0
NEGATIVE_MAX_TTL = 300.0

_Answer = tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]


def dns_servers_of(config: Config) -> list[tuple[str, int]]:
    """``dns_servers`` as (address, port) pairs; empty means resolv.conf's."""
    return [split_host_port(server, 53) for server in config.dns_servers]


@dataclass
class _Entry:
    expires: float
    stored: float
    answer: _Answer | None  # None: the name does not exist (NXDOMAIN)
    failure: Failure | None = None


def _negative_ttl(authority: Sequence[dns.RRHeader]) -> float | None:
    """The negative-caching TTL from the SOA of an authority section (RFC 2308 section 5)."""
    for record in authority:
        if isinstance(record.payload, dns.Record_SOA):
            return float(min(record.ttl, record.payload.minimum))
    return None


def _aged(records: Sequence[dns.RRHeader], elapsed: int) -> list[dns.RRHeader]:
    return [
        dns.RRHeader(r.name.name, r.type, r.cls, max(0, r.ttl - elapsed), r.payload, r.auth)
        for r in records
    ]


class CachingResolver(ResolverBase):
    """Answers from memory while they are fresh, else asks ``upstream`` and remembers.

    See the module docstring for what is kept and for how long; ``clock`` decides.
    """

    def __init__(
        self,
        upstream: Any,
        clock: IReactorTime,
        max_entries: int = CACHE_ENTRIES,
        max_ttl: float = CACHE_MAX_TTL,
        negative_ttl: float = NEGATIVE_MAX_TTL,
    ) -> None:
        super().__init__()
        self._upstream = upstream
        self._clock = clock
        self._max_entries = max_entries
        self._max_ttl = max_ttl
        self._negative_ttl = negative_ttl
        self._entries: OrderedDict[tuple[bytes, int, int], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[_Answer]:
        key = (name.lower().rstrip(b"."), cls, type)
        now = self._clock.seconds()
        entry = self._entries.get(key)
        if entry is not None and entry.expires > now:
            if entry.failure is not None:
                return fail(entry.failure)
            assert entry.answer is not None
            elapsed = int(now - entry.stored)
            answers, authority, additional = entry.answer
            aged = (_aged(answers, elapsed), _aged(authority, elapsed), _aged(additional, elapsed))
            return succeed(aged)
        if entry is not None:
            del self._entries[key]
        asked: Deferred[_Answer] = self._upstream.query(dns.Query(name, type, cls), timeout)
        asked.addCallbacks(self._answered, self._failed, callbackArgs=(key,), errbackArgs=(key,))
        return asked

    def _store(self, key: tuple[bytes, int, int], entry: _Entry) -> None:
        self._entries.pop(key, None)
        self._entries[key] = entry
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def _answered(self, answer: _Answer, key: tuple[bytes, int, int]) -> _Answer:
        answers, authority, _additional = answer
        now = self._clock.seconds()
        if answers:
            ttl = min(float(min(r.ttl for r in answers)), self._max_ttl)
        else:  # NODATA: cached for the negative TTL, when the server gave one
            ttl = min(_negative_ttl(authority) or 0.0, self._negative_ttl)
        if ttl > 0:
            self._store(key, _Entry(now + ttl, now, answer))
        return answer

    def _failed(self, failure: Failure, key: tuple[bytes, int, int]) -> Failure:
        if failure.check(error.DNSNameError):
            args = failure.value.args if failure.value is not None else ()
            message = args[0] if args else None
            ttl = min(_negative_ttl(getattr(message, "authority", ())) or 0.0, self._negative_ttl)
            if ttl > 0:
                now = self._clock.seconds()
                self._store(key, _Entry(now + ttl, now, None, failure))
        return failure


def make_resolver(
    reactor: Any,
    servers: Sequence[tuple[str, int]] = (),
    resolv_conf: str = "/etc/resolv.conf",
    hosts_file: str = "/etc/hosts",
    timeouts: Sequence[float] = DEFAULT_DNS_TIMEOUTS,
) -> ResolverBase:
    """A twisted.names resolver: the hosts file, then the cache in front of ``servers`` (or
    resolv.conf's), with the reactor, the servers and the retransmission timeouts explicit."""
    if servers:
        upstream = dns_client.Resolver(
            servers=list(servers), timeout=tuple(timeouts), reactor=reactor
        )
    else:
        upstream = dns_client.Resolver(resolv=resolv_conf, timeout=tuple(timeouts), reactor=reactor)
    return resolve.ResolverChain(
        [hosts.Resolver(hosts_file.encode()), CachingResolver(upstream, reactor)]
    )


class ServerResolver(ResolverBase):
    """The server's resolver (an ``IResolver``): :func:`make_resolver` for ``dns_servers``,
    rebuilt (with an empty cache) when a reload changes them."""

    def __init__(
        self,
        reactor: Any,
        servers: Sequence[tuple[str, int]] = (),
        resolv_conf: str = "/etc/resolv.conf",
        hosts_file: str = "/etc/hosts",
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._resolv_conf = resolv_conf
        self._hosts_file = hosts_file
        self.servers = list(servers)
        self._chain = make_resolver(reactor, self.servers, resolv_conf, hosts_file)

    def reconfigure(self, servers: Sequence[tuple[str, int]]) -> None:
        """Ask ``servers`` from now on (lookups in flight finish where they started)."""
        self.servers = list(servers)
        self._chain = make_resolver(
            self._reactor, self.servers, self._resolv_conf, self._hosts_file
        )

    def reload_step(self, config: Config, changed: frozenset[str]) -> Callable[[], None] | None:
        """A reload's DNS part (a :data:`mailsrv.reload.ReloadStep`): the new ``dns_servers``."""
        if "dns_servers" not in changed:
            return None
        servers = dns_servers_of(config)
        return lambda: self.reconfigure(servers)

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[_Answer]:
        answer: Deferred[_Answer] = self._chain.query(dns.Query(name, type, cls), timeout)
        return answer
