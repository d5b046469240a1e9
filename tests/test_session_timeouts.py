"""Slow clients cannot hold every slot: the command-line deadline and stress timeouts.

In memory, on a ``task.Clock``: a client that trickles bytes gets ``421 4.4.2`` when its command
line is not complete in ``command_timeout`` (however recent its last byte); near the connection
cap every session's idle and command timeouts shrink to ``stress_timeout``; time the server
spends working (a slow commit, a delayed AUTH answer) never counts against the client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from mailsrv.auth.realm import MailRealm
from mailsrv.delivery.committer import GroupCommitter
from mailsrv.delivery.fssync import filesystem_syncer
from mailsrv.delivery.maildir import MaildirSink, MaildirStore
from mailsrv.smtp import replies
from mailsrv.smtp.server import SMTPServer
from tests.test_session_protocol import (
    SIMPLE_BODY,
    Client,
    Harness,
    matches,
    run_now,
)


class SlowCommitter(GroupCommitter):
    """The inline committer, but every commit takes ``delay`` seconds of ``clock`` to answer."""

    def __init__(self, sinks: Any, sync: Any, clock: task.Clock, delay: float) -> None:
        super().__init__(None, sinks, sync)
        self._slow_clock, self._delay = clock, delay

    def commit(self, message: Any, spool_file: Any) -> defer.Deferred[Any]:
        done: defer.Deferred[Any] = super().commit(message, spool_file)
        return done.addCallback(
            lambda result: task.deferLater(self._slow_clock, self._delay, lambda: result)
        )


class SlowDiskHarness(Harness):
    """A harness whose commits take ``delay`` seconds of the fake clock (a slow disk)."""

    def __init__(self, tmp_path: Path, delay: float, **overrides: Any) -> None:
        super().__init__(tmp_path, **overrides)
        store = MaildirStore(self.config.mail_dir, self.config.server_name)
        sync = filesystem_syncer(self.config.spool_dir, self.config.mail_dir)
        self.committer = SlowCommitter([MaildirSink(store)], sync, self.clock, delay)
        self.committer.startService()
        self.server = SMTPServer(self.config, self.clock, run_now, self.committer)


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def factory(slow_disk: float | None = None, **overrides: Any) -> Harness:
        harness = (
            Harness(tmp_path, **overrides)
            if slow_disk is None
            else SlowDiskHarness(tmp_path, slow_disk, **overrides)
        )
        made.append(harness)
        return harness

    yield factory
    for harness in made:
        harness.close_all()
        harness.clock.advance(3600)


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def trickle(h: Harness, c: Client, data: bytes, every: float) -> bytes:
    """Send ``data`` one byte per ``every`` seconds; return what the server wrote meanwhile."""
    out = b""
    for i in range(len(data)):
        if c.closing:
            break
        out += c.send(data[i : i + 1])
        h.clock.advance(every)
        out += c.transport.value()
        c.transport.clear()
    return out


def test_command_timeout_is_a_setting_with_rfc_default(make: Callable[..., Harness]) -> None:
    h = make()
    assert h.config.command_timeout == 300.0  # RFC 5321 section 4.5.3.2.7
    assert (replies.COMMAND_TIMEOUT.code, replies.COMMAND_TIMEOUT.enhanced) == (421, "4.4.2")


# --- the command-line deadline --------------------------------------------------------------------


def test_trickled_command_line_hits_the_deadline(
    make: Callable[..., Harness], log_events: list[dict[str, Any]]
) -> None:
    h = make(idle_timeout=300, command_timeout=60)
    c = h.connect()
    out = b""
    for _ in range(11):
        out += c.send(b"x")
        h.clock.advance(5)
    assert out == b""
    h.clock.advance(4.99)
    assert c.transport.value() == b"" and not c.closing
    h.clock.advance(0.01)  # 60 s after the greeting, though the last byte came 5 s ago
    assert c.transport.value() == replies.COMMAND_TIMEOUT.format()
    assert c.closing
    [event] = [e for e in log_events if e.get("kind") == "command"]
    assert event["client_ip"] == c.proto.peer_ip and event["stressed"] is False


def test_deadline_counts_from_when_the_server_is_ready(make: Callable[..., Harness]) -> None:
    h = make(idle_timeout=300, command_timeout=60)
    c = h.connect()
    h.clock.advance(50)
    assert c.cmd("EHLO client.test").startswith(b"250-")
    c.send(b"NO")
    h.clock.advance(59)
    assert c.transport.value() == b""
    assert c.send(b"OP\r\n") == replies.OK.format()  # in time: 59 s after the EHLO reply
    c.send(b"N")
    h.clock.advance(60)
    assert c.transport.value() == replies.COMMAND_TIMEOUT.format()


def test_silence_is_an_idle_timeout(make: Callable[..., Harness]) -> None:
    h = make()  # idle and command timeouts both 300 s
    c = h.connect()
    h.clock.advance(299.9)
    assert c.transport.value() == b""
    h.clock.advance(0.1)
    assert c.transport.value() == replies.IDLE_TIMEOUT.format()


def test_idle_timeout_shorter_than_the_command_deadline(make: Callable[..., Harness]) -> None:
    h = make(idle_timeout=10, command_timeout=60)
    c = h.connect()
    assert trickle(h, c, b"NOOP", every=9) == b""
    h.clock.advance(1)
    assert c.transport.value() == replies.IDLE_TIMEOUT.format()


def test_pipelined_commands_each_meet_the_deadline(make: Callable[..., Harness]) -> None:
    h = make(command_timeout=5)
    c = h.connect()
    for _ in range(20):
        h.clock.advance(4)
        assert c.send(b"NOOP\r\nNOOP\r\n") == replies.OK.format() * 2
    assert not c.closing


def test_overlong_line_being_discarded_is_still_one_line(make: Callable[..., Harness]) -> None:
    h = make(command_timeout=30)
    c = h.connect()
    assert c.send(b"A" * 13000) == replies.LINE_TOO_LONG.format()
    for _ in range(5):
        h.clock.advance(5)
        assert c.send(b"A" * 1000) == b""
    h.clock.advance(5)
    assert c.transport.value() == replies.COMMAND_TIMEOUT.format()


def test_auth_response_lines_have_the_deadline(make: Callable[..., Harness]) -> None:
    h = make(command_timeout=20, enable_auth=True, allow_plaintext_auth=True)
    h.server.portal = Portal(MailRealm(None), [InMemoryUsernamePasswordDatabaseDontUse()])
    c = h.connect()
    c.ehlo()
    assert c.cmd("AUTH LOGIN") == b"334 VXNlcm5hbWU6\r\n"
    out = trickle(h, c, b"dXNlcg==", every=3)  # 24 s for an 8-byte line
    assert out == replies.COMMAND_TIMEOUT.format()
    assert c.closing


def test_data_is_bounded_by_the_data_timeout_not_the_command_deadline(
    make: Callable[..., Harness],
) -> None:
    h = make(command_timeout=5, idle_timeout=300, data_timeout=600)
    c = h.connect()
    c.transaction()
    assert matches(c.cmd("DATA"), replies.START_DATA)
    for _ in range(10):
        h.clock.advance(4)
        assert c.send(b"a line of the body\r\n") == b""
    assert matches(c.send(b".\r\n"), replies.MESSAGE_ACCEPTED)
    c.send(b"NO")
    h.clock.advance(5)
    assert c.transport.value() == replies.COMMAND_TIMEOUT.format()


def test_time_the_server_works_does_not_count(make: Callable[..., Harness]) -> None:
    """A commit that takes 20 s (a slow disk) still gets its 250 with 5 s timeouts."""
    h = make(slow_disk=20, command_timeout=5, idle_timeout=5)
    c = h.connect()
    c.transaction()
    assert matches(c.cmd("DATA"), replies.START_DATA)
    assert c.send(SIMPLE_BODY + b".\r\n") == b""
    h.clock.advance(19)
    assert c.transport.value() == b"" and not c.closing
    h.clock.advance(1)
    assert matches(c.transport.value(), replies.MESSAGE_ACCEPTED)
    assert len(h.messages("alice@example.org")) == 1
    c.transport.clear()
    h.clock.advance(5)  # the client's turn again: its clocks start at the reply
    assert c.transport.value() == replies.IDLE_TIMEOUT.format()


def test_delayed_auth_failure_does_not_count(make: Callable[..., Harness]) -> None:
    """Failed AUTHs are answered later and later (0.5 s doubling); with 2 s timeouts the
    fourth answer waits 4 s, and the client still gets its 535, not a 421."""
    h = make(command_timeout=2, idle_timeout=2, enable_auth=True, allow_plaintext_auth=True)
    checker = InMemoryUsernamePasswordDatabaseDontUse(erin=b"right")
    h.server.portal = Portal(MailRealm(None), [checker])
    c = h.connect()
    c.ehlo()
    for delay in (0.5, 1, 2, 4):
        assert c.cmd("AUTH PLAIN AGVyaW4Ad3Jvbmc=") == b""  # \0erin\0wrong
        h.clock.advance(delay)
        assert c.transport.value() == replies.AUTH_FAILED.format()
        c.transport.clear()
    assert not c.closing


# --- stress ---------------------------------------------------------------------------------------


def test_stress_shrinks_the_timeouts_of_open_sessions(
    make: Callable[..., Harness], log_events: list[dict[str, Any]]
) -> None:
    h = make(max_connections=10, stress_threshold=50, stress_timeout=10)
    quiet = [h.connect(f"198.51.100.{i}") for i in range(4)]
    h.clock.advance(20)
    assert not h.server.stressed
    assert all(not client.closing for client in quiet)
    newcomer = h.connect("198.51.100.9")  # the fifth of 10: 50 %
    assert h.server.stressed
    [event] = [e for e in log_events if e.get("log_format", "").startswith("under stress")]
    assert event["sessions"] == 5 and event["timeout"] == 10
    h.clock.advance(0)
    for client in quiet:  # silent for 20 s, more than the 10 s they are allowed now
        assert client.transport.value() == replies.IDLE_TIMEOUT.format()
    assert not newcomer.closing
    h.clock.advance(9.9)
    assert not newcomer.closing
    h.clock.advance(0.1)
    assert newcomer.transport.value() == replies.IDLE_TIMEOUT.format()


def test_stress_sheds_tricklers_and_keeps_talkers(make: Callable[..., Harness]) -> None:
    h = make(max_connections=4, stress_threshold=50, stress_timeout=10, command_timeout=300)
    talker, trickler = h.connect("198.51.100.1"), h.connect("198.51.100.2")
    assert h.server.stressed
    out = b""
    for _ in range(6):
        assert talker.cmd("NOOP") == replies.OK.format()
        out += trickler.send(b"x")
        h.clock.advance(3)
        out += trickler.transport.value()
    assert out == replies.COMMAND_TIMEOUT.format()  # 10 s after its greeting
    assert trickler.closing and not talker.closing


def test_stress_ends_a_tenth_below_the_threshold(make: Callable[..., Harness]) -> None:
    h = make(max_connections=100, stress_threshold=50, stress_timeout=10)
    clients = [h.connect(f"10.0.{i // 200}.{i % 200 + 1}") for i in range(49)]
    assert not h.server.stressed
    clients.append(h.connect("10.9.9.9"))
    assert h.server.stressed
    for _ in range(5):  # 50 -> 45 sessions: still under stress
        clients.pop().lose()
        assert h.server.stressed
    clients.pop().lose()  # 44
    assert not h.server.stressed
    late = h.connect("10.9.9.10")
    assert not h.server.stressed
    h.clock.advance(299)
    assert late.transport.value() == b""  # the normal 300 s idle timeout again
    h.clock.advance(1)
    assert late.transport.value() == replies.IDLE_TIMEOUT.format()


@pytest.mark.parametrize(
    ("max_connections", "threshold", "stress_at"),
    [(1000, 80, 800), (1, 80, 1), (3, 50, 2), (10, 100, 10), (7, 1, 1)],
)
def test_stress_threshold_is_a_share_of_max_connections(
    make: Callable[..., Harness], max_connections: int, threshold: int, stress_at: int
) -> None:
    h = make(max_connections=max_connections, stress_threshold=threshold)
    for i in range(stress_at - 1):
        h.connect(f"10.1.{i // 200}.{i % 200 + 1}")
        assert not h.server.stressed
    h.connect("10.2.0.1")
    assert h.server.stressed


def test_stress_after_refused_connections_still_frees_slots(make: Callable[..., Harness]) -> None:
    """At the cap, newcomers get 421; the quiet sessions holding the slots go within 10 s."""
    h = make(max_connections=3, stress_threshold=100, stress_timeout=10)
    holders = [h.connect(f"198.51.100.{i}") for i in range(1, 4)]
    refused = h.connect("198.51.100.9")
    assert refused.greeting == replies.TOO_MANY_CONNECTIONS.format()
    refused.lose()
    h.clock.advance(10)
    for client in holders:
        assert client.transport.value() == replies.IDLE_TIMEOUT.format()
        client.lose()
    assert h.connect("198.51.100.9").greeting.startswith(b"220 ")
