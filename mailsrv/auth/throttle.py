"""Failed-AUTH throttling per client IP and per account.

Each failure is remembered for ``window`` seconds.  Failures make the next ``535`` reply wait
longer (``delay``: 0.5 s doubling up to 8 s), which costs an attacker time but the server no CPU;
once an IP or an account reaches its limit, AUTH is refused before any password is checked
(``454``/``421 4.7.0``) until old failures leave the window.  Argon2 costs real CPU per attempt,
so this is what keeps a password-guessing storm from starving honest sessions.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from mailsrv.limits import RateLimiter

_BASE_DELAY = 0.5
_MAX_DELAY = 8.0


class AuthThrottle:
    """Counts AUTH failures by IP and by account within a sliding window."""

    def __init__(self, clock: IReactorTime, per_ip: int, per_account: int, window: float) -> None:
        self._by_ip = RateLimiter(clock, per_ip, window)
        self._by_account = RateLimiter(clock, per_account, window)

    def ip_blocked(self, ip: str) -> bool:
        """True when ``ip`` has used up its failures."""
        return self._by_ip.count(ip) >= self._by_ip.limit

    def account_blocked(self, login: str) -> bool:
        """True when ``login`` has used up its failures (whoever tried)."""
        return self._by_account.count(login.lower()) >= self._by_account.limit

    def failed(self, ip: str, login: str | None, count_ip: bool = True) -> float:
        """Record one failure; returns how long to wait before answering it."""
        if count_ip:
            self._by_ip.record(ip)
        if login:
            self._by_account.record(login.lower())
        failures = max(self._by_ip.count(ip), self._by_account.count((login or "").lower()))
        delay: float = min(_MAX_DELAY, _BASE_DELAY * 2.0 ** max(0, failures - 1))
        return delay

    def expire(self) -> None:
        """Forget failures that left the window (run on a timer)."""
        self._by_ip.expire()
        self._by_account.expire()
