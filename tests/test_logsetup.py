"""Log output: level filtering, text lines with a per-second time cache, JSON lines."""

from __future__ import annotations

import io
import json
import re
import time

from twisted.logger import Logger, LogPublisher

from mailsrv.logsetup import SecondCachedTime, make_observer


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
