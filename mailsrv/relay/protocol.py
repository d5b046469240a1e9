"""Reading the next hop's replies and matching them to our commands, strictly in order.

:class:`ReplyReader` is the Twisted protocol under an outbound connection.  It frames the byte
stream into (multi-line) SMTP replies and hands each to the oldest waiting :meth:`expect`, so
pipelined commands get their replies in the order they were sent (RFC 2920).  Only the oldest
waiter's timer runs: a pipelined RCPT's timeout starts when the reply before it has come.  A
reply nobody waits for, a malformed or overlong reply, a timeout or a lost connection fails every
waiter, and the connection is dropped; nothing from the peer can make it hang.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from mailsrv.smtp.replies import Reply

MAX_LINE = 4096
MAX_LINES = 200
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class ServerReply:
    """One reply from the peer: its code and the text of each line (code and dash removed)."""

    code: int
    lines: tuple[str, ...]

    @property
    def enhanced(self) -> str:
        """The RFC 3463 enhanced status code of the first line, or ""."""
        match = _ENHANCED.match(self.lines[0]) if self.lines else None
        if match is None or int(match.group(1)) != self.code // 100:
            return ""
        return ".".join(match.group(1, 2, 3))

    @property
    def text(self) -> str:
        """All lines joined by spaces, the enhanced codes left out."""
        parts = []
        for line in self.lines:
            match = _ENHANCED.match(line)
            parts.append(line[match.end() :] if match else line)
        return " ".join(part for part in parts if part)

    def as_reply(self) -> Reply:
        """The reply in the shape of the relay's own replies."""
        return Reply(self.code, self.enhanced, self.text)


class ReplyTimeout(Exception):
    """No reply (or no progress) in time; ``what`` names the step."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class ConnectionLostError(Exception):
    """The connection went away; ``reason`` is Twisted's Failure for it."""

    def __init__(self, reason: Failure, what: str = "") -> None:
        super().__init__(f"connection lost: {reason.getErrorMessage()}")
        self.reason = reason
        self.what = what


class ProtocolViolation(Exception):
    """The peer sent something that is not a well-formed reply in its place."""


@dataclass
class _Waiter:
    deferred: Deferred[ServerReply]
    timeout: float | None
    what: str


class ReplyReader(Protocol):
    """Frames replies and serves them to waiters in order; see the module docstring."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._buffer = b""
        self._lines: list[str] = []
        self._code = 0
        self._waiters: deque[_Waiter] = deque()
        self._timer: IDelayedCall | None = None
        self._error: Exception | None = None
        self.connected = False
        self.lost: Deferred[None] = Deferred()

    # -- the caller's side -----------------------------------------------------------------------

    def expect(self, timeout: float | None, what: str) -> Deferred[ServerReply]:
        """A Deferred for the next reply not yet claimed; ``timeout`` None arms no timer."""
        if self._error is not None:
            d: Deferred[ServerReply] = Deferred()
            d.errback(self._error)
            return d
        waiter = _Waiter(Deferred(), timeout, what)
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            self._arm()
        return waiter.deferred

    def set_timeout(self, timeout: float, what: str) -> None:
        """Give the oldest waiter a timer now (the final dot's reply, once the body is out)."""
        if self._waiters:
            self._waiters[0].timeout = timeout
            self._waiters[0].what = what
            self._arm()

    def send(self, data: bytes) -> None:
        """Write command bytes."""
        if self.transport is not None and self._error is None:
            self.transport.write(data)

    def abort(self, error: Exception) -> None:
        """Fail every waiter with ``error`` and drop the connection at once."""
        if self._error is None:
            self._error = error
        self._fail_all(self._error)
        if self.transport is not None and self.connected:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    @property
    def failed(self) -> Exception | None:
        """Why the connection is unusable, or None."""
        return self._error

    # -- Twisted's side --------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._buffer += data
        while self._error is None:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE:
                    self.abort(ProtocolViolation("reply line too long"))
                return
            line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
            if len(line) > MAX_LINE:
                self.abort(ProtocolViolation("reply line too long"))
                return
            self._line(line.rstrip(b"\r"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        if self._error is None:
            what = self._waiters[0].what if self._waiters else ""
            self._error = ConnectionLostError(reason, what)
        self._fail_all(self._error)
        self.lost.callback(None)

    # -- framing ---------------------------------------------------------------------------------

    def _line(self, raw: bytes) -> None:
        text = _UNPRINTABLE.sub("?", raw.decode("utf-8", "replace"))
        if len(text) < 3 or not text[:3].isdigit() or text[3:4] not in ("", " ", "-"):
            self.abort(ProtocolViolation(f"malformed reply line {text[:80]!r}"))
            return
        code = int(text[:3])
        if not 200 <= code <= 599 or (self._lines and code != self._code):
            self.abort(ProtocolViolation(f"unexpected reply code in {text[:80]!r}"))
            return
        self._code = code
        self._lines.append(text[4:])
        if len(self._lines) > MAX_LINES:
            self.abort(ProtocolViolation("reply has too many lines"))
            return
        if text[3:4] != "-":
            reply = ServerReply(code, tuple(self._lines))
            self._lines = []
            self._deliver(reply)

    def _deliver(self, reply: ServerReply) -> None:
        if not self._waiters:
            self.abort(ProtocolViolation(f"unexpected reply {reply.code} {reply.text[:80]!r}"))
            return
        waiter = self._waiters.popleft()
        self._arm()
        waiter.deferred.callback(reply)

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._waiters and self._waiters[0].timeout is not None:
            head = self._waiters[0]
            assert head.timeout is not None
            self._timer = self._clock.callLater(head.timeout, self._timed_out, head)

    def _timed_out(self, waiter: _Waiter) -> None:
        self._timer = None
        self.abort(ReplyTimeout(waiter.what))

    def _fail_all(self, error: Exception) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            waiter.deferred.errback(error)


def describe(error: BaseException) -> str:
    """A short text for an error while talking to the peer (for replies and logs)."""
    if isinstance(error, ReplyTimeout):
        return f"timed out waiting for {error.what}"
    if isinstance(error, ConnectionLostError):
        suffix = f" while waiting for {error.what}" if error.what else ""
        return f"{error.reason.getErrorMessage()}{suffix}"
    return str(error) or type(error).__name__


def is_tls_failure(error: BaseException) -> bool:
    """True when the connection died in a TLS handshake or certificate check."""
    if not isinstance(error, ConnectionLostError):
        return False
    value: Any = error.reason.value
    if isinstance(value, SSL.Error):
        return True
    return type(value).__name__ in ("VerificationError", "CertificateError")
