"""Destinations: which recipients share connections, and which next hops are resting.

MX rollup (KumoMTA's "site name"): the destination of a domain is the sorted set of its MX host
names, so domains hosted by the same provider share one destination queue, one concurrency limit
and one set of connections.  A smarthost is one destination for everything.

:class:`DeadDestinations` is Postfix's dead-destination cache: a destination that just failed is
suspended for a while, so its whole backlog waits instead of trying, one by one, a host that is
down.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from mailsrv.smtp.replies import Reply


def _name(host: str) -> str:
    return host.strip().lower().rstrip(".")


def mx_destination(mx_hosts: Iterable[str]) -> str:
    """The destination key of a domain with these MX host names (order and case ignored)."""
    hosts = sorted({_name(host) for host in mx_hosts})
    if not hosts:
        raise ValueError("a destination needs at least one host")
    return "mx:" + ",".join(hosts)


def smarthost_destination(host: str, port: int) -> str:
    """The destination key of the smarthost ``host:port``."""
    return f"relay:{_name(host)}:{port}"


@dataclass(frozen=True)
class Suspension:
    """A suspended destination: until when, and the reply that made it so."""

    until: float
    reply: Reply


class DeadDestinations:
    """Destination key -> suspended until a time (read from the injected clock)."""

    def __init__(self, clock: IReactorTime, hold: float = 300.0) -> None:
        self._clock = clock
        self.hold = hold
        self._dead: dict[str, Suspension] = {}

    def suspend(self, destination: str, reply: Reply, hold: float | None = None) -> Suspension:
        """Suspend ``destination`` for ``hold`` seconds (default: the cache's)."""
        until = self._clock.seconds() + (self.hold if hold is None else hold)
        suspension = Suspension(until, reply)
        self._dead[destination] = suspension
        return suspension

    def suspended(self, destination: str) -> Suspension | None:
        """The destination's suspension if it is still in force, else None."""
        suspension = self._dead.get(destination)
        if suspension is not None and suspension.until <= self._clock.seconds():
            del self._dead[destination]
            return None
        return suspension

    def revive(self, destination: str) -> None:
        """Forget a suspension (a delivery to it succeeded, or an operator flushed)."""
        self._dead.pop(destination, None)

    def prune(self) -> None:
        """Drop every suspension that has run out (bounds the memory)."""
        now = self._clock.seconds()
        self._dead = {key: s for key, s in self._dead.items() if s.until > now}

    def __len__(self) -> int:
        return len(self._dead)
