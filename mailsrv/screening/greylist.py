"""Greylisting: the first attempt of an unknown (client network, sender, recipient) triplet is
deferred with ``451 4.7.1``; a real MTA retries, most spam software does not.

The triplet's client is its /24 (IPv4) or /64 (IPv6) network, because large senders retry from
another address of the same pool.  A retry after ``delay`` and before ``expiry`` (counted from
the first attempt) passes, and the triplet is then remembered for ``lifetime`` (renewed by each
later message), so a correspondent is delayed once.  A first attempt whose retry window has
passed starts over.

A sender domain whose mail has passed is *seen* for ``lifetime`` too.  A new triplet whose
sender's domain is seen and whose sender passes SPF (the caller's ``exempt`` check, asked only
then) passes at once: a known correspondent writing to someone new, or from a new address of
its domain, is not delayed, and a forger of that domain fails SPF.

The state lives in the user store's database (:class:`IGreylistStore`: SQLite or PostgreSQL),
so several nodes behind one MX share it; a timer removes the expired rows.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from zope.interface import Interface


@dataclass(frozen=True)
class GreylistSettings:
    """The three times of greylisting, in seconds."""

    delay: float = 300.0
    expiry: float = 86_400.0
    lifetime: float = 36 * 86_400.0


@dataclass(frozen=True)
class Triplet:
    """What one greylisting decision is about."""

    network: str
    sender: str
    recipient: str

    @property
    def key(self) -> str:
        """The triplet as one database key."""
        return f"{self.network} {self.sender or '<>'} {self.recipient}"


@dataclass(frozen=True)
class Seen:
    """The stored state after an attempt: passed, or first seen at ``first_seen``."""

    passed: bool
    first_seen: float


class IGreylistStore(Interface):
    """Greylisting state shared by every node (the user store's database)."""

    def greylist_attempt(
        key: str, now: float, delay: float, expiry: float, lifetime: float
    ) -> Deferred[Seen]:
        """Record one attempt of triplet ``key`` at ``now``, atomically: a new triplet is
        stored as first seen now; a retry after ``delay`` (and before ``expiry`` since the
        first) passes and is kept until ``now + lifetime``; an expired one starts over."""

    def greylist_pass(key: str, now: float, lifetime: float) -> Deferred[None]:
        """Triplet ``key`` (recorded by an attempt) passes now, kept until ``now + lifetime``."""

    def greylist_domain_passed(domain: str, now: float, lifetime: float) -> Deferred[None]:
        """Mail from ``domain`` passed at ``now``: the domain is seen until ``now + lifetime``."""

    def greylist_domain_seen(domain: str, now: float) -> Deferred[bool]:
        """Whether mail from ``domain`` passed within its lifetime."""

    def greylist_expire(now: float) -> Deferred[int]:
        """Remove the triplets and domains whose time ran out; how many."""


def client_network(ip: str) -> str:
    """``ip``'s /24 (IPv4, also when IPv4-mapped) or /64 (IPv6) network, as text."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if isinstance(address, ipaddress.IPv4Address) else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


@dataclass(frozen=True)
class Verdict:
    """Pass, or wait: ``retry_in`` seconds until a retry can pass."""

    passed: bool
    retry_in: float = 0.0
    exempt: bool = False
    """Passed at once because its sender passed SPF for a seen domain."""


def sender_domain(sender: str) -> str:
    """The domain of ``sender`` in lower case ("" for the null sender)."""
    return sender.rpartition("@")[2].lower() if "@" in sender else ""


class Greylist:
    """Decides triplets against ``store`` (see the module docstring)."""

    def __init__(self, store: IGreylistStore) -> None:
        self._store = store

    def attempt(
        self,
        triplet: Triplet,
        now: float,
        settings: GreylistSettings,
        exempt: Callable[[], Deferred[bool]] | None = None,
    ) -> Deferred[Verdict]:
        """Record an attempt of ``triplet``; its verdict.  ``exempt`` says whether the sender
        passes SPF; it is asked only for a triplet that would wait and whose sender's domain
        is seen."""
        return Deferred.fromCoroutine(self._attempt(triplet, now, settings, exempt))

    async def _attempt(
        self,
        triplet: Triplet,
        now: float,
        settings: GreylistSettings,
        exempt: Callable[[], Deferred[bool]] | None,
    ) -> Verdict:
        state = await self._store.greylist_attempt(
            triplet.key, now, settings.delay, settings.expiry, settings.lifetime
        )
        domain = sender_domain(triplet.sender)
        if state.passed:
            if domain:
                await self._store.greylist_domain_passed(domain, now, settings.lifetime)
            return Verdict(True)
        if (
            domain
            and exempt is not None
            and await self._store.greylist_domain_seen(domain, now)
            and await exempt()
        ):
            await self._store.greylist_pass(triplet.key, now, settings.lifetime)
            await self._store.greylist_domain_passed(domain, now, settings.lifetime)
            return Verdict(True, exempt=True)
        return Verdict(False, max(0.0, state.first_seen + settings.delay - now))

    def expire(self, now: float) -> Deferred[int]:
        """Remove what ran out (called on a timer)."""
        return self._store.greylist_expire(now)


# --- the SQL both stores run (SQLite names parameters :name, psycopg2 %(name)s) ---------------

_ATTEMPT = """
INSERT INTO greylist (triplet, first_seen, passed, expires)
VALUES ({key}, {now}, 0, {now} + {expiry})
ON CONFLICT (triplet) DO UPDATE SET
    first_seen = CASE WHEN greylist.expires <= {now} THEN {now} ELSE greylist.first_seen END,
    passed = CASE
        WHEN greylist.expires <= {now} THEN 0
        WHEN greylist.passed = 1 OR {now} - greylist.first_seen >= {delay} THEN 1
        ELSE 0 END,
    expires = CASE
        WHEN greylist.expires <= {now} THEN {now} + {expiry}
        WHEN greylist.passed = 1 OR {now} - greylist.first_seen >= {delay} THEN {now} + {lifetime}
        ELSE greylist.expires END
RETURNING passed, first_seen
"""
_NAMES = ("key", "now", "delay", "expiry", "lifetime")

ATTEMPT_SQLITE = _ATTEMPT.format(**{name: f":{name}" for name in _NAMES})
"""One attempt, atomically (the old row's values on the right of every ``SET``)."""
ATTEMPT_POSTGRESQL = _ATTEMPT.format(**{name: f"%({name})s" for name in _NAMES})
EXPIRE_SQLITE = "DELETE FROM greylist WHERE expires <= ?"
EXPIRE_POSTGRESQL = "DELETE FROM greylist WHERE expires <= %s"
EXPIRE_DOMAINS_SQLITE = "DELETE FROM greylist_domains WHERE expires <= ?"
EXPIRE_DOMAINS_POSTGRESQL = "DELETE FROM greylist_domains WHERE expires <= %s"
TRIPLET_PASSES_SQLITE = "UPDATE greylist SET passed = 1, expires = ? WHERE triplet = ?"
TRIPLET_PASSES_POSTGRESQL = "UPDATE greylist SET passed = 1, expires = %s WHERE triplet = %s"
_DOMAIN_PASSED = """
INSERT INTO greylist_domains (domain, expires) VALUES ({p}, {p})
ON CONFLICT (domain) DO UPDATE SET expires = excluded.expires
"""
DOMAIN_PASSED_SQLITE = _DOMAIN_PASSED.format(p="?")
"""(domain, expires): the domain seen until then (an upsert)."""
DOMAIN_PASSED_POSTGRESQL = _DOMAIN_PASSED.format(p="%s")
DOMAIN_SEEN_SQLITE = "SELECT 1 FROM greylist_domains WHERE domain = ? AND expires > ?"
DOMAIN_SEEN_POSTGRESQL = "SELECT 1 FROM greylist_domains WHERE domain = %s AND expires > %s"


def attempt_parameters(
    key: str, now: float, delay: float, expiry: float, lifetime: float
) -> dict[str, object]:
    """The parameters of :data:`ATTEMPT_SQLITE` and :data:`ATTEMPT_POSTGRESQL`."""
    return {"key": key, "now": now, "delay": delay, "expiry": expiry, "lifetime": lifetime}


def seen_from_row(row: tuple[object, ...]) -> Seen:
    """The :class:`Seen` of the row the attempt returned."""
    passed, first_seen = row
    return Seen(bool(passed), float(first_seen))  # type: ignore[arg-type]
