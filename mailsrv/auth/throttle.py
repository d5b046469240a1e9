"""Failed-AUTH throttling per client and per account.

Each failure is remembered for ``window`` seconds.  Failures make the next ``535`` reply wait
longer (0.5 s doubling up to 8 s), which costs an attacker time but the server no CPU; once a
client or an account reaches its limit, AUTH is refused before any password is checked
(``421``/``454 4.7.0``) until old failures leave the window.  Argon2 costs real CPU per attempt,
so this is what keeps a password-guessing storm from starving honest sessions.

*Who is one client*: an IPv4 address, or the /64 an IPv6 address is in (whoever holds one
IPv6 address usually holds its whole /64).  Connection caps (:mod:`mailsrv.shared_limits`) stay
per address.  *Who is one account*: the identity :mod:`mailsrv.auth.account_identity`
resolves, so every spelling of a login and every alias share one budget.

An attempt is counted as a failure when it *starts* (:meth:`AuthThrottle.begin`), so attempts
running at once cannot all slip past a limit while their hashes are computed.  How it ends
(:meth:`AuthThrottle.finish`) decides what stays counted: a success takes both counts back; a
wrong password keeps both; an attempt refused for room at the hash threads, or dropped because
its client left, keeps the client's count (a storm of them is the client's doing) but gives the
account its count back (no password was judged); a backend error takes both back.  A client
has at most ``max_in_flight`` attempts between start and reply; one more is refused and counted
against the client.  The state holds at most ``max_keys`` clients and ``max_keys`` accounts: a
new one past that is refused (fail closed) until old ones expire.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from mailsrv.limits import RateLimiter

_BASE_DELAY = 0.5
_MAX_DELAY = 8.0

# Longest key kept (UTF-8 octets): an identity or a client's address text.
MAX_KEY_OCTETS = 255

# Why :meth:`AuthThrottle.begin` refuses an attempt before any password work.
IP_THROTTLED = "auth-ip-throttled"
ACCOUNT_THROTTLED = "auth-account-throttled"
CLIENT_BUSY = "auth-client-busy"
STATE_FULL = "auth-throttle-full"

# How an admitted attempt ended (:meth:`AuthThrottle.finish`).
SUCCEEDED = "succeeded"
REJECTED = "rejected"  # the password (or CRAM-MD5 answer) was wrong
NOT_CHECKED = "not-checked"  # refused by the hash queue, or the client left while it waited
BACKEND_ERROR = "backend-error"


def client_key(ip: str) -> str:
    """Who counts as one client for AUTH failures: the address, or for IPv6 its /64."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(frozen=True)
class AuthAttempt:
    """One admitted AUTH attempt, counted as a failure until :meth:`AuthThrottle.finish`.

    ``priority`` is how many failures its client and account had before it (lower goes first
    to the hash threads, see :class:`mailsrv.auth.hashqueue.HashQueue`).
    """

    client: str
    identity: str
    client_mark: float | None  # when its client failure was recorded (None: client not counted)
    identity_mark: float
    priority: int


@dataclass(frozen=True)
class ThrottleCensus:
    """Who the AUTH throttle holds back now.

    *Locked*: at the limit, so AUTH is refused before any password work until failures leave
    the window.  *Delayed*: failures on record but below the limit, so the next failure is
    answered late.  Clients are as :func:`client_key` counts them (IPv6: per /64).
    """

    clients_locked: int
    clients_delayed: int
    accounts_locked: int
    accounts_delayed: int


class AuthThrottle:
    """Counts AUTH failures by client and by account within a sliding window."""

    def __init__(
        self,
        clock: IReactorTime,
        per_ip: int,
        per_account: int,
        window: float,
        max_in_flight: int = 3,
        max_keys: int | None = None,
    ) -> None:
        self._by_ip = RateLimiter(clock, per_ip, window, max_keys)
        self._by_account = RateLimiter(clock, per_account, window, max_keys)
        self.max_in_flight = max_in_flight
        self._in_flight: dict[str, int] = {}

    def reconfigure(self, per_ip: int, per_account: int, window: float, max_in_flight: int) -> None:
        """A reload: new budgets and window from the next decision on; failures are kept."""
        self._by_ip.limit, self._by_ip.window = per_ip, window
        self._by_account.limit, self._by_account.window = per_account, window
        self.max_in_flight = max_in_flight

    def ip_blocked(self, ip: str) -> bool:
        """True when the client of ``ip`` has used up its failures."""
        return self._by_ip.count(client_key(ip)) >= self._by_ip.limit

    def client_refusal(self, ip: str) -> str | None:
        """Whether an untrusted client may start an AUTH exchange: None, or why not.

        Asked before the exchange, so a client over its limits costs no look-up; a client with
        too many attempts in flight is counted a failure for asking.
        """
        client = client_key(ip)
        if self._by_ip.count(client) >= self._by_ip.limit:
            return IP_THROTTLED
        if self._in_flight.get(client, 0) >= self.max_in_flight:
            self._by_ip.record(client)
            return CLIENT_BUSY
        return None

    def account_blocked(self, identity: str) -> bool:
        """True when ``identity`` has used up its failures (whoever tried)."""
        return self._by_account.count(identity) >= self._by_account.limit

    def in_flight(self, ip: str) -> int:
        """Attempts of the client of ``ip`` between :meth:`begin` and :meth:`finish`."""
        return self._in_flight.get(client_key(ip), 0)

    def tracked(self) -> tuple[int, int]:
        """How many clients and accounts have failures on record."""
        return len(self._by_ip), len(self._by_account)

    def census(self) -> ThrottleCensus:
        """Clients and accounts with failures in the window, locked out or only delayed."""
        ips, ips_locked = self._by_ip.census()
        accounts, accounts_locked = self._by_account.census()
        return ThrottleCensus(
            ips_locked, ips - ips_locked, accounts_locked, accounts - accounts_locked
        )

    def begin(self, ip: str, identity: str, count_ip: bool = True) -> AuthAttempt | str:
        """Admit one attempt (counted as a failure from now on), or say why not."""
        client = client_key(ip)
        if max(len(client.encode()), len(identity.encode())) > MAX_KEY_OCTETS:
            return STATE_FULL
        if count_ip and self._by_ip.count(client) >= self._by_ip.limit:
            return IP_THROTTLED
        if self._by_account.count(identity) >= self._by_account.limit:
            return ACCOUNT_THROTTLED
        if count_ip and self._in_flight.get(client, 0) >= self.max_in_flight:
            self._by_ip.record(client)
            return CLIENT_BUSY
        client_new = count_ip and not self._by_ip.knows(client)
        if (client_new and self._by_ip.full()) or (
            not self._by_account.knows(identity) and self._by_account.full()
        ):
            return STATE_FULL
        priority = self._by_account.count(identity)
        client_mark = None
        if count_ip:
            priority += self._by_ip.count(client)
            client_mark = self._by_ip.record(client)
            self._in_flight[client] = self._in_flight.get(client, 0) + 1
        identity_mark = self._by_account.record(identity)
        assert identity_mark is not None  # room was checked above
        return AuthAttempt(client, identity, client_mark, identity_mark, priority)

    def failure_delay(self, attempt: AuthAttempt) -> float:
        """How long to wait before answering a failed ``attempt`` (its failure stays counted)."""
        failures = max(
            self._by_ip.count(attempt.client) if attempt.client_mark is not None else 0,
            self._by_account.count(attempt.identity),
        )
        delay: float = min(_MAX_DELAY, _BASE_DELAY * 2.0 ** max(0, failures - 1))
        return delay

    def finish(self, attempt: AuthAttempt, outcome: str) -> None:
        """The attempt was answered; ``outcome`` (SUCCEEDED, ...) decides what stays counted."""
        if attempt.client_mark is not None:
            left = self._in_flight.get(attempt.client, 0) - 1
            if left > 0:
                self._in_flight[attempt.client] = left
            else:
                self._in_flight.pop(attempt.client, None)
            if outcome in (SUCCEEDED, BACKEND_ERROR):
                self._by_ip.withdraw(attempt.client, attempt.client_mark)
        if outcome != REJECTED:
            self._by_account.withdraw(attempt.identity, attempt.identity_mark)

    def expire(self) -> None:
        """Forget failures that left the window (run on a timer)."""
        self._by_ip.expire()
        self._by_account.expire()
