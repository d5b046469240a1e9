"""Log output: ``twisted.logger`` events, filtered by level, as text lines or JSON lines.

Modules log structured events with ``Logger()``; this module only decides where they go.  No
event carries a message body or a credential: the SMTP session logs envelope facts only.

Field values are escaped here, in one place, for both formats (see :func:`escape`): a HELO name,
an address, an AUTH login or a command line from a client can hold control characters, and
none of them reaches the output raw, whatever field a future event carries them in.  Only
what the code itself wrote (the format string, Twisted's level, namespace and traceback) is
left as it is.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable
from typing import IO

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    eventAsJSON,
    eventAsText,
)
from zope.interface import implementer

# C0 controls, DEL, C1 controls (NEL U+0085, CSI U+009B...), the Unicode line and paragraph
# separators, the bidirectional embedding/override/isolate controls (text that reorders itself
# on screen), lone surrogates (undecodable bytes of a file name) and the backslash itself, so
# that every escape in the output stands for exactly one character of the input.
_UNSAFE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
# The same without the backslash, for text that is already escaped (``repr`` of a list).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with every unsafe character as a Python-style escape (``\\x1b``, ``\\u2028``).

    Unsafe: C0 controls (``\\t``, ``\\n``, ``\\r`` by name), DEL, C1 controls, U+2028 and
    U+2029, the bidirectional controls U+202A-U+202E and U+2066-U+2069, lone surrogates, and
    ``\\`` (as ``\\\\``, so an escape in the output is never ambiguous).
    """
    if text.isprintable() and "\\" not in text:
        return text  # the common case, checked in C
    return _UNSAFE.sub(_escape_one, text)


def _escape_rendered(text: str) -> str:
    """Escape the controls in text rendered from a non-string (``repr`` escaped its own)."""
    return _CONTROL.sub(_escape_one, text)


class _Escaped:
    """A field value that is not a string: escaped once it is rendered as text.

    ``{value}``, ``{value!r}``, ``{value.attribute}``, ``{value[key]}`` and Twisted's
    ``{value()}`` all give escaped text, so a format can use any of them.
    """

    __slots__ = ("_value",)

    def __init__(self, value: object) -> None:
        self._value = value

    def __format__(self, spec: str) -> str:
        return _escape_rendered(format(self._value, spec))

    def __str__(self) -> str:
        return _escape_rendered(str(self._value))

    def __repr__(self) -> str:
        return _escape_rendered(repr(self._value))

    def __getattr__(self, name: str) -> object:
        return safe_value(getattr(self._value, name))

    def __getitem__(self, key: object) -> object:
        return safe_value(self._value[key])  # type: ignore[index]

    def __call__(self) -> object:
        return safe_value(self._value())  # type: ignore[operator]


_PLAIN_TYPES = (int, float, bool, type(None))


def safe_value(value: object) -> object:
    """``value`` ready to be formatted into a log line: strings escaped, numbers as they are,
    anything else wrapped so that whatever it renders to is escaped."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, _PLAIN_TYPES):
        return value
    return _Escaped(value)


class _EscapedFields:
    """The event as ``str.format_map`` sees it: every field through :func:`safe_value`."""

    __slots__ = ("_event",)

    def __init__(self, event: LogEvent) -> None:
        self._event = event

    def __getitem__(self, key: str) -> object:
        value = self._event[key]
        if type(value) is str and value.isprintable() and "\\" not in value:
            return value  # the common case, without a call
        return safe_value(value)


# What Twisted or the code itself put in an event, never a client: left as it is.
_METADATA = frozenset(
    {
        "log_format",
        "log_level",
        "log_logger",
        "log_source",
        "log_time",
        "log_failure",
        "log_namespace",
        "log_flattened",
        "log_trace",
    }
)


def escaped_event(event: LogEvent) -> dict[str, object]:
    """A copy of ``event`` with every field value through :func:`safe_value` (for Twisted's
    own formatter, which takes a dict)."""
    return {k: v if k in _METADATA else safe_value(v) for k, v in event.items()}


def _json_value(value: object) -> object:
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, _PLAIN_TYPES):
        return value
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_value(item) for item in value]
    if isinstance(value, dict):
        return {escape(k) if isinstance(k, str) else k: _json_value(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return escape(value.decode("utf-8", "surrogateescape"))
    return _Escaped(value)


def json_safe_event(event: LogEvent) -> dict[str, object]:
    """A copy of ``event`` whose strings, also inside lists and dicts, are escaped: a JSON
    consumer (``jq -r``) gets the same escaped text as the text format shows."""
    return {k: v if k in _METADATA else _json_value(v) for k, v in event.items()}


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
    (call syntax, failures, legacy events) through Twisted's own ``eventAsText``.  Either way
    the field values are escaped, and lines after the first (a traceback, a format with a
    newline) are indented with a tab.
    """
    format_time = SecondCachedTime()

    def format_event(event: LogEvent) -> str:
        log_format = event.get("log_format")
        if isinstance(log_format, str) and "log_failure" not in event:
            try:
                text = log_format.format_map(_EscapedFields(event))
            except Exception:
                text = None
            if text is not None:
                system = event.get("log_system")
                if system is None:
                    level = event.get("log_level")
                    name = level.name if level is not None else "-"
                    system = f"{event.get('log_namespace', '-')}#{name}"
                else:
                    system = _escape_rendered(str(system))
                text = text.replace("\n", "\n\t")
                return f"{format_time(event.get('log_time'))} [{system}] {text}\n"
        text = eventAsText(escaped_event(event), includeTimestamp=True, formatTime=format_time)
        if not text:
            return ""
        # A traceback spans lines: each one after the first is indented, so no line of it can
        # pass for an event of its own.
        lines = text.rstrip("\n").split("\n")
        return "\n\t".join(_escape_rendered(line) for line in lines) + "\n"

    return format_event


def json_line_formatter(event: LogEvent) -> str:
    """One event as one line of JSON (field values escaped as in text, see the module doc)."""
    return eventAsJSON(json_safe_event(event)) + "\n"


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


# Twisted's tcp.Port and unix.Port log "<factory> starting on <port or path>" (a legacy
# log.msg) when they listen; mailsrv announces its listeners and its control socket itself
# (mailsrv.startup, the queue control service), so each would show twice.
_PORT_STARTING = re.compile(r"\S.* starting on (?:\d+|'[^']*')")


@implementer(ILogFilterPredicate)
class DropPortAnnouncements:
    """Filters out Twisted's own "... starting on <port>" lines."""

    def __call__(self, event: LogEvent) -> PredicateResult:
        if event.get("log_namespace") == "log_legacy":
            text = event.get("log_text")
            if isinstance(text, str) and _PORT_STARTING.fullmatch(text):
                drop: PredicateResult = PredicateResult.no
                return drop
        keep: PredicateResult = PredicateResult.maybe
        return keep


class LevelFilter:
    """The level below which events are dropped; :meth:`set` changes it (a reload)."""

    def __init__(self, level: str) -> None:
        self.level = level
        self.predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[level])

    def set(self, level: str) -> None:
        """Drop events below ``level`` from now on (one of the ``log_level`` choices)."""
        self.predicate.setLogLevelForNamespace("", _LEVELS[level])
        self.level = level


def make_observer(
    level: str | LevelFilter,
    fmt: str,
    stream: IO[str] | ReopenableLogFile | None = None,
    call_later: Callable[..., object] | None = None,
) -> ILogObserver:
    """An observer writing ``fmt`` ("text" or "json") lines at ``level`` or above to ``stream``.

    ``call_later`` lets lines from the reactor thread share one flush per reactor turn; a
    :class:`LevelFilter` given as ``level`` can change the level while the observer runs.
    """
    out = sys.stdout if stream is None else stream
    formatter = json_line_formatter if fmt == "json" else text_line_formatter()
    base = LineObserver(out, formatter, call_later)
    levels = level if isinstance(level, LevelFilter) else LevelFilter(level)
    return FilteringLogObserver(base, [levels.predicate, DropPortAnnouncements()])
