"""Log output: level filtering, text lines with a per-second time cache, JSON lines, escaping."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import pytest
from twisted.logger import Logger, LogPublisher

from mailsrv.logsetup import (
    SecondCachedTime,
    escape,
    json_line_formatter,
    make_observer,
    text_line_formatter,
)


def _logger(level: str, fmt: str) -> tuple[Logger, io.StringIO]:
    out = io.StringIO()
    publisher = LogPublisher(make_observer(level, fmt, out))
    return Logger(namespace="mailsrv.smtp", observer=publisher), out


def test_text_lines_have_time_system_and_message() -> None:
    log, out = _logger("info", "text")
    log.info("message {queue_id} accepted", queue_id="Q1")
    log.debug("not shown")
    line = out.getvalue()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[mailsrv\.smtp#info\] message Q1 accepted\n",
        line,
    )


def test_failures_carry_their_traceback() -> None:
    log, out = _logger("warn", "text")
    try:
        raise ValueError("broken disk")
    except ValueError:
        log.failure("could not store message")
    text = out.getvalue()
    assert "[mailsrv.smtp#critical] could not store message" in text
    assert "ValueError: broken disk" in text


def test_json_lines_each_parse_and_keep_fields() -> None:
    log, out = _logger("info", "json")
    log.info("message {queue_id}", queue_id="Q2", size=12)
    log.warn("security {event}", event="relay-denied")
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["log_level"]["name"] for e in events] == ["info", "warn"]
    assert events[0]["queue_id"] == "Q2" and events[0]["size"] == 12


def test_time_cache_changes_with_the_second() -> None:
    cached = SecondCachedTime()
    now = 1_800_000_000.25
    first = cached(now)
    assert cached(now + 0.5) == first
    assert cached(now + 1) != first
    assert first == time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(int(now)))
    assert cached(None) == "-"


class CountingStream(io.StringIO):
    """A text stream that counts flushes."""

    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_reactor_thread_lines_share_one_flush_per_turn() -> None:
    from twisted.internet import task

    clock = task.Clock()
    out = CountingStream()
    log = Logger(
        namespace="mailsrv.smtp",
        observer=LogPublisher(make_observer("info", "text", out, clock.callLater)),
    )
    for n in range(5):
        log.info("event {n}", n=n)
    assert out.getvalue().count("\n") == 5
    assert out.flushes == 0
    clock.advance(0)
    assert out.flushes == 1
    log.info("one more")
    clock.advance(0)
    assert out.flushes == 2


def test_lines_from_other_threads_are_flushed_at_once() -> None:
    import threading

    from twisted.internet import task

    out = CountingStream()
    log = Logger(
        namespace="mailsrv.delivery",
        observer=LogPublisher(make_observer("info", "text", out, task.Clock().callLater)),
    )
    worker = threading.Thread(target=log.info, args=("from a thread",))
    worker.start()
    worker.join()
    assert out.flushes == 1 and "from a thread" in out.getvalue()


def test_formats_beyond_plain_fields_fall_back_to_twisted() -> None:
    log, out = _logger("info", "text")
    log.info("called {value()} and repr {text!r}", value=lambda: 42, text="x")
    log.info("line one\nline two")
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("called 42 and repr 'x'")
    assert lines[1].endswith("line one") and lines[2] == "\tline two"


# --- nothing a client sends reaches the output raw ------------------------------------------

# (name, character, how it must appear in the output)
UNSAFE = [
    ("NUL", "\x00", "\\x00"),
    ("BEL", "\x07", "\\x07"),
    ("TAB", "\t", "\\t"),
    ("LF", "\n", "\\n"),
    ("CR", "\r", "\\r"),
    ("ESC", "\x1b", "\\x1b"),
    ("US", "\x1f", "\\x1f"),
    ("DEL", "\x7f", "\\x7f"),
    ("C1-PAD", "\x80", "\\x80"),
    ("C1-NEL", "\x85", "\\x85"),
    ("C1-CSI", "\x9b", "\\x9b"),
    ("C1-APC", "\x9f", "\\x9f"),
    ("LINE-SEPARATOR", "\u2028", "\\u2028"),
    ("PARAGRAPH-SEPARATOR", "\u2029", "\\u2029"),
    ("BIDI-OVERRIDE", "\u202e", "\\u202e"),
    ("BIDI-ISOLATE", "\u2066", "\\u2066"),
    ("SURROGATE", "\udcff", "\\udcff"),
    ("BACKSLASH", "\\", "\\\\"),
]
UNSAFE_IDS = [case[0] for case in UNSAFE]
RAW = [case[1] for case in UNSAFE if case[1] != "\\"]


def _no_raw(text: str) -> None:
    """Only the line ends the formatter wrote itself: no unsafe character anywhere else."""
    body = text[:-1] if text.endswith("\n") else text
    found = [c for c in RAW if c in body.replace("\n\t", "")]
    assert not found, f"raw {found!r} in {text!r}"


@pytest.mark.parametrize(("char", "shown"), [c[1:] for c in UNSAFE], ids=UNSAFE_IDS)
def test_escape_each_unsafe_character(char: str, shown: str) -> None:
    assert escape(f"a{char}b") == f"a{shown}b"
    assert escape(char * 2) == shown * 2


def test_escape_keeps_printable_text_and_non_ascii() -> None:
    for text in ("alice@example.org", "jörg@bücher.example", "用户@例子.广告", "a b'c\"d", ""):
        assert escape(text) == text


@pytest.mark.parametrize(("char", "shown"), [c[1:] for c in UNSAFE], ids=UNSAFE_IDS)
def test_text_lines_escape_every_field(char: str, shown: str) -> None:
    log, out = _logger("info", "text")
    log.info("session {client_ip} helo={helo}", client_ip="192.0.2.1", helo=f"evil{char}host")
    line = out.getvalue()
    assert line.endswith(f"] session 192.0.2.1 helo=evil{shown}host\n")
    assert line.count("\n") == 1
    _no_raw(line)


@pytest.mark.parametrize(("char", "shown"), [c[1:] for c in UNSAFE], ids=UNSAFE_IDS)
def test_json_lines_escape_every_field(char: str, shown: str) -> None:
    log, out = _logger("info", "json")
    log.info(
        "message from <{sender}> to {recipients}",
        sender=f"a{char}b@example.org",
        recipients=[f"c{char}d@example.org"],
        extra={"login": f"e{char}f"},
        not_in_format=f"g{char}h",
    )
    line = out.getvalue()
    assert line.count("\n") == 1
    _no_raw(line)
    event = json.loads(line)
    assert event["sender"] == f"a{shown}b@example.org"
    assert event["recipients"] == [f"c{shown}d@example.org"]
    assert event["extra"] == {"login": f"e{shown}f"}
    assert event["not_in_format"] == f"g{shown}h"
    assert event["log_flattened"]["sender!:"] == f"a{shown}b@example.org"
    _no_raw_in_values(event)


def _no_raw_in_values(value: object) -> None:
    if isinstance(value, str):
        assert not [c for c in RAW if c in value], value
    elif isinstance(value, dict):
        for key, item in value.items():
            _no_raw_in_values(key)
            _no_raw_in_values(item)
    elif isinstance(value, list):
        for item in value:
            _no_raw_in_values(item)


class Nasty:
    """An object whose text forms carry raw control characters."""

    attribute = "attr\x1b[2J"

    def __str__(self) -> str:
        return "str\x1b]0;owned\x07\u2028"

    def __repr__(self) -> str:
        return "repr\r\n2030-01-01T00:00:00+0000 [mailsrv#critical] forged"

    def __call__(self) -> str:
        return "called\x9b31m"


def test_text_escapes_lists_objects_and_every_format_syntax() -> None:
    log, out = _logger("info", "text")
    log.info("to {recipients}", recipients=["a\x1b@example.org", "b\u2028@example.org"])
    log.info("object {thing} {thing!r} {thing.attribute}", thing=Nasty())
    log.info("called {thing()}", thing=Nasty())  # Twisted's formatter, not str.format_map
    lines = out.getvalue().splitlines(keepends=True)
    assert len(lines) == 3, lines
    assert lines[0].endswith("] to ['a\\x1b@example.org', 'b\\u2028@example.org']\n")
    assert lines[1].endswith(
        "] object str\\x1b]0;owned\\x07\\u2028"
        " repr\\r\\n2030-01-01T00:00:00+0000 [mailsrv#critical] forged attr\\x1b[2J\n"
    )
    assert lines[2].endswith("] called called\\x9b31m\n")
    for line in lines:
        _no_raw(line)


def test_legacy_and_printed_events_are_escaped() -> None:
    from twisted.logger import LogLevel

    formatter = text_line_formatter()
    legacy = {
        "log_format": "{log_text}",
        "log_text": "Factory starting on 25\x1b[1A\nforged line",
        "log_namespace": "log_legacy",
        "log_system": "SMTPFactory,0,\x1b]2;t\x07",
        "log_level": LogLevel.info,
        "log_time": 1_800_000_000.0,
    }
    line = formatter(legacy)
    assert line.endswith(
        " [SMTPFactory,0,\\x1b]2;t\\x07] Factory starting on 25\\x1b[1A\\nforged line\n"
    )
    _no_raw(line)
    assert json.loads(json_line_formatter(legacy))["log_text"] == (
        "Factory starting on 25\\x1b[1A\\nforged line"
    )


def test_a_failure_cannot_forge_log_lines() -> None:
    log, out = _logger("info", "text")
    try:
        raise ValueError("bad input\n2030-01-01T00:00:00+0000 [mailsrv#info] forged\x1b[8m")
    except ValueError:
        log.failure("command {verb} failed", verb="X\x1bY")
    text = out.getvalue()
    first, *rest = text.splitlines()
    assert first.endswith("] command X\\x1bY failed")
    assert rest and all(line.startswith("\t") for line in rest), rest
    assert "ValueError: bad input\n\t2030" in text
    assert text.endswith("forged\\x1b[8m\n")
    assert "\t2030-01-01T00:00:00+0000 [mailsrv#info] forged\\x1b[8m" in text
    _no_raw(text)


def test_security_events_show_their_fields_in_text(tmp_path: Path) -> None:
    from twisted.internet import defer, task
    from twisted.logger import globalLogPublisher

    from mailsrv.delivery.committer import GroupCommitter
    from mailsrv.delivery.fssync import filesystem_syncer
    from mailsrv.delivery.maildir import MaildirSink, MaildirStore
    from mailsrv.smtp.server import SMTPServer
    from tests.conftest import make_config

    config = make_config(tmp_path)
    sink = MaildirSink(MaildirStore(config.mail_dir, config.server_name))
    committer = GroupCommitter.inline([sink], filesystem_syncer(config.spool_dir, config.mail_dir))
    server = SMTPServer(config, task.Clock(), defer.maybeDeferred, committer)
    out = io.StringIO()
    observer = make_observer("info", "text", out)
    globalLogPublisher.addObserver(observer)
    try:
        server.security_event("auth-failure", "192.0.2.7", login="eve\x1b@x", mechanism="PLAIN")
        server.security_event("relay-denied", "192.0.2.8", recipient="a@b.test", login=None)
        server.security_event("message-rate", "192.0.2.9")
    finally:
        globalLogPublisher.removeObserver(observer)
    lines = out.getvalue().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [
        "security auth-failure from 192.0.2.7 login=eve\\x1b@x mechanism=PLAIN",
        "security relay-denied from 192.0.2.8 recipient=a@b.test",
        "security message-rate from 192.0.2.9",
    ]
    assert all("[mailsrv.security#warn]" in line for line in lines)
