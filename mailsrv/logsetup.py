"""Log output: ``twisted.logger`` events, filtered by level, as text lines or JSON lines.

Modules log structured events with ``Logger()``; this module only decides where they go.  No
event carries a message body or a credential: the SMTP session logs envelope facts only.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import IO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsJSON,
    eventAsText,
)
from zope.interface import implementer

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}


class SecondCachedTime:
    """RFC 3339 local timestamps, formatted once per second.

    Twisted's default time formatting rebuilds a time zone object for every event; with two
    events per message that was a tenth of the reactor thread's time under load.
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._text = "-"

    def __call__(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))
        return self._text


def text_line_formatter() -> Callable[[LogEvent], str]:
    """Formats one event as ``<time> [<system>] <message>`` plus a traceback if any.

    Plain ``{field}`` formats (all of mailsrv's) go through ``str.format_map``; anything else
    (call syntax, failures, legacy events) through Twisted's own ``eventAsText``.
    """
    format_time = SecondCachedTime()

    def format_event(event: LogEvent) -> str:
        log_format = event.get("log_format")
        if isinstance(log_format, str) and "log_failure" not in event:
            try:
                text = log_format.format_map(event)
            except Exception:
                text = None
            if text is not None:
                system = event.get("log_system")
                if system is None:
                    level = event.get("log_level")
                    name = level.name if level is not None else "-"
                    system = f"{event.get('log_namespace', '-')}#{name}"
                text = text.replace("\n", "\n\t")
                return f"{format_time(event.get('log_time'))} [{system}] {text}\n"
        text = eventAsText(event, includeTimestamp=True, formatTime=format_time)
        return text + "\n" if text else ""

    return format_event


def json_line_formatter(event: LogEvent) -> str:
    """One event as one line of JSON."""
    return eventAsJSON(event) + "\n"


@implementer(ILogObserver)
class LineObserver:
    """Writes formatted events to a stream.

    With ``call_later`` (the reactor's), lines written in the reactor thread are flushed once at
    the end of the reactor turn instead of once each: under load that is one write system call
    for many events.  Lines from other threads are flushed at once.
    """

    def __init__(
        self,
        stream: IO[str] | ReopenableLogFile,
        format_event: Callable[[LogEvent], str],
        call_later: Callable[..., object] | None = None,
    ) -> None:
        self._stream = stream
        self._format = format_event
        self._call_later = call_later
        self._reactor_thread = threading.get_ident()
        self._flush_pending = False

    def __call__(self, event: LogEvent) -> None:
        text = self._format(event)
        if not text:
            return
        self._stream.write(text)
        if self._call_later is None or threading.get_ident() != self._reactor_thread:
            self._stream.flush()
        elif not self._flush_pending:
            self._flush_pending = True
            self._call_later(0, self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        self._stream.flush()


class ReopenableLogFile:
    """A log file opened for appending that can be reopened after logrotate moved it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[str] = self._open()

    def _open(self) -> IO[str]:
        return open(self.path, "a", encoding="utf-8")

    def write(self, text: str) -> int:
        return self._file.write(text)

    def flush(self) -> None:
        self._file.flush()

    def reopen(self) -> None:
        """Close and open the path again (after logrotate renamed the old file)."""
        old, self._file = self._file, self._open()
        old.close()


def make_observer(
    level: str,
    fmt: str,
    stream: IO[str] | ReopenableLogFile | None = None,
    call_later: Callable[..., object] | None = None,
) -> ILogObserver:
    """An observer writing ``fmt`` ("text" or "json") lines at ``level`` or above to ``stream``.

    ``call_later`` lets lines from the reactor thread share one flush per reactor turn.
    """
    out = sys.stdout if stream is None else stream
    formatter = json_line_formatter if fmt == "json" else text_line_formatter()
    base = LineObserver(out, formatter, call_later)
    predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[level])
    return FilteringLogObserver(base, [predicate])
