"""How long a session waits for its client: the idle and command-line deadlines, on one timer.

Two clocks run while it is the client's turn to speak (the server has answered and waits):

* **idle**: silence.  Every byte the client sends restarts it.
* **command**: a whole command line (or AUTH response line), from the moment the server was
  ready for it to its CRLF.  Bytes do not restart it, so a client that trickles one byte
  every few seconds cannot hold a connection slot for ever (RFC 5321 section 4.5.3.2.7 asks
  for at least five minutes for the next command, which is the default).  In DATA only the
  idle clock runs; the session's DATA timer bounds the whole body.

While the server is busy on the client's behalf (a lookup, AUTH, the commit before ``250``)
neither clock runs: a slow disk must not turn into a ``421`` after the message was stored.

The timeouts may change while the session lives (the server shortens them under stress: see
:mod:`mailsrv.smtp.server`).  One ``DelayedCall`` serves both clocks.  It is never later than
the earliest deadline, but may be earlier: input only records the time (one ``seconds()``
call), and a timer that fires before any deadline has passed re-arms itself for the new
earliest one.  The timeouts are read again whenever the timer is armed or fires; a server
entering stress calls :meth:`Deadlines.timeouts_changed`, so shorter timeouts are never
missed, and longer ones (stress over) take effect when the timer next fires.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

IDLE = "idle"
COMMAND = "command"

_SLACK = 0.001  # a timer may fire a hair before its deadline (float rounding)


class Deadlines:
    """The idle and command deadlines of one session (see the module docstring)."""

    def __init__(
        self,
        clock: IReactorTime,
        timeouts: Callable[[], tuple[float, float]],
        expired: Callable[[str], None],
    ) -> None:
        """``timeouts()`` gives the current (idle, command) timeouts in seconds;
        ``expired(kind)`` is called once, with :data:`IDLE` or :data:`COMMAND`."""
        self._clock = clock
        self._timeouts = timeouts
        self._expired = expired
        self._timer: IDelayedCall | None = None
        self._timer_at = 0.0
        self._idle, self._command = timeouts()  # as of the last time the timer was armed
        self._last_input = 0.0
        self._line_started: float | None = None
        self._server_busy = False

    def client_turn(self, command_line: bool = True) -> None:
        """The server waits for the client: a command line (``command_line``) or DATA."""
        now = self._clock.seconds()
        self._last_input = now
        self._line_started = now if command_line else None
        self._server_busy = False
        if self._timer is None:
            self._arm(now)
            return
        due = now + (min(self._idle, self._command) if command_line else self._idle)
        if self._timer_at > due:  # the timer must never be later than a deadline
            self._timer.reset(due - now)
            self._timer_at = due

    def server_turn(self) -> None:
        """The server works on the client's behalf: no deadline runs until ``client_turn``."""
        self._server_busy = True

    def input_received(self) -> None:
        """The client sent bytes: the idle clock starts again."""
        self._last_input = self._clock.seconds()

    def timeouts_changed(self) -> None:
        """The timeouts may be shorter now: move the timer to the new earliest deadline."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._arm(self._clock.seconds())

    def stop(self) -> None:
        """The session is closing: no more deadlines."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _due(self, now: float) -> tuple[float, str]:
        if self._server_busy:
            return now + self._idle, ""
        due, kind = self._last_input + self._idle, IDLE
        if self._line_started is not None and self._line_started + self._command < due:
            due, kind = self._line_started + self._command, COMMAND
        return due, kind

    def _arm(self, now: float) -> None:
        self._idle, self._command = self._timeouts()
        due, _ = self._due(now)
        self._timer_at = max(now, due)
        self._timer = self._clock.callLater(self._timer_at - now, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        self._idle, self._command = self._timeouts()
        due, kind = self._due(now)
        if kind and now + _SLACK >= due:
            self._expired(kind)
        else:
            self._arm(now)
