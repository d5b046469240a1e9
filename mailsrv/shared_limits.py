"""Limits every session of a server must see alike: connection caps, per-IP rates, AUTH failures.

Sessions ask through :class:`ILimits`, whose answers are Deferreds, so the state can live
elsewhere than in the session's own process (another worker process, or a store shared by
several nodes) without changing the session.  :class:`LocalLimits` keeps it in memory here; its
Deferreds fire at once.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

from mailsrv.auth.throttle import AuthAttempt, AuthThrottle, ThrottleCensus
from mailsrv.config import Config
from mailsrv.limits import ConnectionCounter, RateLimiter

# Why a connection is refused at connect time (None: admitted).
CONNECTION_LIMIT = "connection-limit"
IP_CONNECTION_LIMIT = "ip-connection-limit"
CONNECTION_RATE = "connection-rate"


class ILimits(Interface):
    """Admission and rate decisions shared by every process of one server."""

    def admit(ip: str, trusted: bool) -> Deferred[str | None]:
        """Count a new session from ``ip``; a refusal reason instead if a limit is reached."""

    def release(ip: str) -> None:
        """A session admitted earlier has ended."""

    def allow_message(ip: str) -> Deferred[bool]:
        """Count one message (MAIL) from an untrusted ``ip``; False when over its rate."""

    def auth_client_refusal(ip: str) -> Deferred[str | None]:
        """Whether the untrusted client of ``ip`` (IPv6: its /64) may start an AUTH: None, or
        why not (it used up its failures, or has too many AUTHs in progress)."""

    def auth_begin(ip: str, identity: str, trusted: bool) -> Deferred[AuthAttempt | str]:
        """Admit one AUTH attempt against account ``identity``, counted as failed until
        :meth:`auth_finished`; or a refusal reason (see :mod:`mailsrv.auth.throttle`)."""

    def auth_failure_delay(attempt: AuthAttempt) -> Deferred[float]:
        """The attempt failed: how long to wait before answering it."""

    def auth_finished(attempt: AuthAttempt, outcome: str) -> None:
        """The attempt was answered; ``outcome`` decides which of its counts stay."""


@implementer(ILimits)
class LocalLimits:
    """The authoritative limit state, in the main process."""

    def __init__(self, config: Config, clock: IReactorTime) -> None:
        self.connections = ConnectionCounter(config.max_connections, config.max_connections_per_ip)
        self.connection_rate = RateLimiter(clock, config.connection_rate_per_ip, config.rate_window)
        self.message_rate = RateLimiter(clock, config.message_rate_per_ip, config.rate_window)
        self.auth_throttle = AuthThrottle(
            clock,
            config.auth_max_failures_per_ip,
            config.auth_max_failures_per_account,
            config.auth_failure_window,
            max_in_flight=config.auth_max_in_flight_per_client,
            max_keys=config.auth_throttle_max_keys,
        )

    def reconfigure(self, config: Config) -> None:
        """A reload: the new limits apply from the next decision on; counts are kept."""
        self.connections.max_total = config.max_connections
        self.connections.max_per_ip = config.max_connections_per_ip
        for limiter, limit in (
            (self.connection_rate, config.connection_rate_per_ip),
            (self.message_rate, config.message_rate_per_ip),
        ):
            limiter.limit, limiter.window = limit, config.rate_window
        self.auth_throttle.reconfigure(
            config.auth_max_failures_per_ip,
            config.auth_max_failures_per_account,
            config.auth_failure_window,
            config.auth_max_in_flight_per_client,
        )

    def check_admission(self, ip: str, trusted: bool) -> str | None:
        """The synchronous core of :meth:`admit`."""
        if self.connections.total_full():
            return CONNECTION_LIMIT
        if not trusted:
            if self.connections.ip_full(ip):
                return IP_CONNECTION_LIMIT
            if not self.connection_rate.allow(ip):
                return CONNECTION_RATE
        self.connections.opened(ip)
        return None

    def admit(self, ip: str, trusted: bool) -> Deferred[str | None]:
        return succeed(self.check_admission(ip, trusted))

    def release(self, ip: str) -> None:
        self.connections.closed(ip)

    def allow_message(self, ip: str) -> Deferred[bool]:
        return succeed(self.message_rate.allow(ip))

    def auth_client_refusal(self, ip: str) -> Deferred[str | None]:
        return succeed(self.auth_throttle.client_refusal(ip))

    def auth_begin(self, ip: str, identity: str, trusted: bool) -> Deferred[AuthAttempt | str]:
        return succeed(self.auth_throttle.begin(ip, identity, count_ip=not trusted))

    def auth_failure_delay(self, attempt: AuthAttempt) -> Deferred[float]:
        return succeed(self.auth_throttle.failure_delay(attempt))

    def auth_finished(self, attempt: AuthAttempt, outcome: str) -> None:
        self.auth_throttle.finish(attempt, outcome)

    def census(self) -> ThrottleCensus:
        """Who the AUTH throttle holds back now (for the metrics, at each scrape)."""
        return self.auth_throttle.census()

    def expire(self) -> None:
        """Forget state that left its window (run on a timer in the main process)."""
        self.connection_rate.expire()
        self.message_rate.expire()
        self.auth_throttle.expire()
