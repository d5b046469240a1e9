"""Abuse limits: concurrent-connection caps, sliding-window rates and trusted networks.

All state is in memory and keyed by client IP.  Windows take their time from an injected
``IReactorTime`` and forget idle keys on a timer (:meth:`RateLimiter.expire`), so memory stays
bounded however many addresses knock.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from mailsrv.config import Network


def normalize_ip(host: str) -> str:
    """The canonical text of a peer address; IPv4-mapped IPv6 (``::ffff:a.b.c.d``) becomes IPv4."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class TrustedNetworks:
    """Membership test for a list of CIDR networks (IPv4-mapped IPv6 understood)."""

    def __init__(self, networks: Iterable[Network]) -> None:
        self._networks = tuple(networks)
        self._cache: dict[str, bool] = {}

    def __contains__(self, host: str) -> bool:
        known = self._cache.get(host)
        if known is not None:
            return known
        try:
            address = ipaddress.ip_address(normalize_ip(host))
        except ValueError:
            return False
        found = any(address in network for network in self._networks)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[host] = found
        return found


class RateLimiter:
    """At most ``limit`` events per key within any ``window`` seconds (a sliding log)."""

    def __init__(
        self, clock: IReactorTime, limit: int, window: float, max_keys: int | None = None
    ) -> None:
        self._clock = clock
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._events: dict[str, deque[float]] = {}

    def _trim(self, events: deque[float], now: float) -> None:
        horizon = now - self.window
        while events and events[0] <= horizon:
            events.popleft()

    def allow(self, key: str) -> bool:
        """Record one event for ``key`` if the limit allows it; return whether it did."""
        now = self._clock.seconds()
        events = self._events.get(key)
        if events is None:
            if self.full():
                return False
            events = self._events[key] = deque()
        self._trim(events, now)
        if len(events) >= self.limit:
            return False
        events.append(now)
        return True

    def record(self, key: str) -> float | None:
        """Record one event for ``key`` whatever the limit; returns its time (for
        :meth:`withdraw`), or None when ``key`` is new and ``max_keys`` keys are already held."""
        now = self._clock.seconds()
        events = self._events.get(key)
        if events is None:
            if self.full():
                return None
            events = self._events[key] = deque()
        self._trim(events, now)
        events.append(now)
        return now

    def withdraw(self, key: str, when: float) -> None:
        """Take back the event :meth:`record` recorded at ``when`` (if still in the window)."""
        events = self._events.get(key)
        if events is None:
            return
        try:
            events.remove(when)
        except ValueError:
            pass
        if not events:
            del self._events[key]

    def full(self) -> bool:
        """True when ``max_keys`` keys are held, so no new key can be recorded."""
        return self.max_keys is not None and len(self._events) >= self.max_keys

    def knows(self, key: str) -> bool:
        """True when ``key`` has state (events not yet expired)."""
        return key in self._events

    def count(self, key: str) -> int:
        """Events for ``key`` within the window."""
        events = self._events.get(key)
        if not events:
            return 0
        self._trim(events, self._clock.seconds())
        return len(events)

    def census(self) -> tuple[int, int]:
        """How many keys have events within the window, and how many of those are at the
        limit (one walk over the keys, which also drops the events that left the window)."""
        horizon = self._clock.seconds() - self.window
        active = at_limit = 0
        for events in self._events.values():
            while events and events[0] <= horizon:
                events.popleft()
            if events:
                active += 1
                if len(events) >= self.limit:
                    at_limit += 1
        return active, at_limit

    def expire(self) -> None:
        """Forget keys whose events have all left the window (call periodically)."""
        now = self._clock.seconds()
        for key in list(self._events):
            events = self._events[key]
            self._trim(events, now)
            if not events:
                del self._events[key]

    def __len__(self) -> int:
        return len(self._events)


@dataclass
class ConnectionCounter:
    """Concurrent sessions in all and per client IP."""

    max_total: int
    max_per_ip: int
    total: int = 0

    def __post_init__(self) -> None:
        self._per_ip: dict[str, int] = {}

    def per_ip(self, host: str) -> int:
        """Open sessions from ``host``."""
        return self._per_ip.get(host, 0)

    def total_full(self) -> bool:
        """True when no more sessions may open at all."""
        return self.total >= self.max_total

    def ip_full(self, host: str) -> bool:
        """True when ``host`` has as many sessions as it may."""
        return self._per_ip.get(host, 0) >= self.max_per_ip

    def opened(self, host: str) -> None:
        """Count a session from ``host``."""
        self.total += 1
        self._per_ip[host] = self._per_ip.get(host, 0) + 1

    def closed(self, host: str) -> None:
        """Uncount a session from ``host``."""
        self.total -= 1
        left = self._per_ip.get(host, 0) - 1
        if left > 0:
            self._per_ip[host] = left
        else:
            self._per_ip.pop(host, None)

    def tracked_ips(self) -> int:
        """How many addresses have a session open."""
        return len(self._per_ip)
