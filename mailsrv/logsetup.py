"""Log output: ``twisted.logger`` events, filtered by level, as text lines or JSON lines.

Modules log structured events with ``Logger()``; this module only decides where they go.  No
event carries a message body or a credential: the SMTP session logs envelope facts only.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsText,
    jsonFileLogObserver,
)

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
    """Formats one event as ``<time> [<system>] <message>`` plus a traceback if any."""
    format_time = SecondCachedTime()

    def format_event(event: LogEvent) -> str:
        text = eventAsText(event, includeTimestamp=True, formatTime=format_time)
        return text + "\n" if text else ""

    return format_event


def make_observer(level: str, fmt: str, stream: IO[str] | None = None) -> ILogObserver:
    """An observer writing ``fmt`` ("text" or "json") lines at ``level`` or above to ``stream``."""
    out = sys.stdout if stream is None else stream
    if fmt == "json":
        base = jsonFileLogObserver(out, recordSeparator="")
    else:
        base = FileLogObserver(out, text_line_formatter())
    predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[level])
    return FilteringLogObserver(base, [predicate])
