"""The AUTH throttle's parts on their own: keys, counting at the start, caps, the hash queue.

Time comes from ``task.Clock``; the hash queue is driven with Deferreds the test fires; the
thread pool bound runs real threads.  End-to-end behaviour over sockets is in test_auth.py.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.portal import Portal
from twisted.internet import defer, task
from twisted.internet.address import IPv6Address
from twisted.internet.testing import StringTransport

from mailsrv.auth.account_identity import MAX_LOGIN_OCTETS, AccountIdentities, login_text
from mailsrv.auth.hashqueue import NO_ACCOUNT_RANK, HashQueue, priority
from mailsrv.auth.realm import MailRealm
from mailsrv.auth.throttle import (
    ACCOUNT_THROTTLED,
    BACKEND_ERROR,
    CLIENT_BUSY,
    IP_THROTTLED,
    MAX_KEY_OCTETS,
    NOT_CHECKED,
    REJECTED,
    STATE_FULL,
    SUCCEEDED,
    AuthAttempt,
    AuthThrottle,
    client_key,
)
from mailsrv.limits import RateLimiter
from mailsrv.shared_limits import IP_CONNECTION_LIMIT, LocalLimits
from mailsrv.smtp import replies
from mailsrv.smtp.session import SMTPSession
from mailsrv.threads import PoolFull, ThreadPoolService
from tests.conftest import make_config
from tests.test_session_protocol import Harness

WINDOW = 900.0


def make_throttle(clock: task.Clock, **overrides: Any) -> AuthThrottle:
    settings: dict[str, Any] = {"per_ip": 5, "per_account": 5, "window": WINDOW}
    settings.update(overrides)
    return AuthThrottle(clock, **settings)


def admitted(result: AuthAttempt | str) -> AuthAttempt:
    assert isinstance(result, AuthAttempt), result
    return result


# --- who is one client -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2:0:0:0:1", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:198.51.100.7", "198.51.100.7"),
        ("::1", "::/64"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_client_key_is_the_address_or_its_ipv6_slash_64(ip: str, key: str) -> None:
    assert client_key(ip) == key


def test_ipv6_failures_count_per_slash_64() -> None:
    clock = task.Clock()
    throttle = make_throttle(clock, per_ip=3, max_in_flight=10)
    for host in ("2001:db8:1:2::a", "2001:db8:1:2::b", "2001:db8:1:2:8000::1"):
        throttle.finish(admitted(throttle.begin(host, f"user-{host}")), REJECTED)
    # every address of that /64 is blocked, whatever address it uses next
    assert throttle.ip_blocked("2001:db8:1:2::c")
    assert throttle.begin("2001:db8:1:2:ffff::9", "someone") == IP_THROTTLED
    # the neighbouring /64 and an IPv4 client are not
    assert not throttle.ip_blocked("2001:db8:1:3::a")
    admitted(throttle.begin("2001:db8:1:3::a", "someone"))
    admitted(throttle.begin("203.0.113.9", "someone"))


def test_ipv6_in_flight_counts_per_slash_64() -> None:
    throttle = make_throttle(task.Clock(), max_in_flight=2)
    admitted(throttle.begin("2001:db8:1:2::a", "a"))
    admitted(throttle.begin("2001:db8:1:2::b", "b"))
    assert throttle.begin("2001:db8:1:2::c", "c") == CLIENT_BUSY
    assert throttle.in_flight("2001:db8:1:2::d") == 2
    admitted(throttle.begin("2001:db8:1:3::c", "c"))


def test_connection_caps_stay_per_address_in_one_slash_64(tmp_path: Any) -> None:
    config = make_config(tmp_path, max_connections_per_ip=1, connection_rate_per_ip=1)
    limits = LocalLimits(config, task.Clock())
    assert limits.check_admission("2001:db8:1:2::a", trusted=False) is None
    assert limits.check_admission("2001:db8:1:2::b", trusted=False) is None
    assert limits.check_admission("2001:db8:1:2::a", trusted=False) == IP_CONNECTION_LIMIT
    limits.release("2001:db8:1:2::a")
    assert limits.connections.per_ip("2001:db8:1:2::b") == 1


# --- the same through sessions: AUTH refused for the /64, connections per address -------------


class V6Client:
    """A session from an IPv6 address over a StringTransport."""

    def __init__(self, harness: Harness, host: str) -> None:
        self.transport = StringTransport(peerAddress=IPv6Address("TCP", host, 40000))
        self.proto = SMTPSession(harness.server, "submission")
        self.proto.makeConnection(self.transport)
        self.greeting = self.transport.value()
        self.transport.clear()

    def cmd(self, line: str) -> bytes:
        self.transport.clear()
        self.proto.dataReceived(line.encode() + b"\r\n")
        out: bytes = self.transport.value()
        return out


@pytest.fixture
def v6(tmp_path: Any) -> Any:
    harness = Harness(
        tmp_path,
        trusted_networks=(),
        enable_auth=True,
        allow_plaintext_auth=True,
        max_connections_per_ip=1,
        auth_max_failures_per_ip=2,
    )
    # A real Portal (no checker is reached here: every AUTH below stops before credentials).
    harness.server.portal = Portal(MailRealm(None), [])
    clients: list[V6Client] = []

    def connect(host: str) -> V6Client:
        client = V6Client(harness, host)
        clients.append(client)
        return client

    yield harness, connect
    for client in clients:
        client.proto.connectionLost(None)  # type: ignore[arg-type]
    harness.clock.advance(3600)


def test_sessions_from_one_slash_64_share_auth_failures_not_connection_caps(v6: Any) -> None:
    harness, connect = v6
    throttle = harness.server.limits.auth_throttle
    for _ in range(2):
        throttle.finish(admitted(throttle.begin("2001:db8:1:2::a", "x")), REJECTED)
    first = connect("2001:db8:1:2::a")
    second = connect("2001:db8:1:2::b")  # another address of that /64: admitted (per address)
    other = connect("2001:db8:1:3::a")
    assert first.greeting.startswith(b"220 ") and second.greeting.startswith(b"220 ")
    again = connect("2001:db8:1:2::a")  # the same address twice: the per-address cap
    assert again.greeting == replies.TOO_MANY_CONNECTIONS_FROM_IP.format()
    for client in (second, other):
        assert client.cmd("EHLO client.test").startswith(b"250-")
    assert second.cmd("AUTH PLAIN") == replies.AUTH_IP_THROTTLED.format()
    assert other.cmd("AUTH PLAIN") == b"334 \r\n"


# --- counted when the attempt starts -----------------------------------------------------------


def test_attempts_count_as_failures_from_their_start() -> None:
    throttle = make_throttle(task.Clock(), per_ip=3, per_account=100, max_in_flight=100)
    running = [admitted(throttle.begin("203.0.113.9", f"u{i}")) for i in range(3)]
    # three hashes still running: the fourth is refused although none has failed yet
    assert throttle.begin("203.0.113.9", "u3") == IP_THROTTLED
    for attempt in running:
        throttle.finish(attempt, SUCCEEDED)  # all three were right after all
    assert throttle.tracked() == (0, 0)
    admitted(throttle.begin("203.0.113.9", "u3"))


def test_account_attempts_count_from_their_start() -> None:
    throttle = make_throttle(task.Clock(), per_account=2, max_in_flight=100)
    admitted(throttle.begin("203.0.113.1", "erin@example.org"))
    admitted(throttle.begin("203.0.113.2", "erin@example.org"))
    assert throttle.begin("203.0.113.3", "erin@example.org") == ACCOUNT_THROTTLED
    # a trusted client (not counted per client) is still held to the account's budget
    assert throttle.begin("127.0.0.1", "erin@example.org", count_ip=False) == ACCOUNT_THROTTLED


def test_priority_is_the_failures_before_the_attempt() -> None:
    clock = task.Clock()
    throttle = make_throttle(clock, per_ip=10, per_account=10, max_in_flight=10)
    assert admitted(throttle.begin("203.0.113.9", "a@example.org")).priority == 0
    assert admitted(throttle.begin("203.0.113.9", "a@example.org")).priority == 2
    assert admitted(throttle.begin("203.0.113.9", "b@example.org")).priority == 2
    assert admitted(throttle.begin("198.51.100.1", "b@example.org")).priority == 1
    assert admitted(throttle.begin("198.51.100.2", "c@example.org", count_ip=False)).priority == 0


def test_in_flight_limit_per_client_until_the_reply() -> None:
    throttle = make_throttle(task.Clock(), per_ip=100, max_in_flight=2)
    first = admitted(throttle.begin("203.0.113.9", "a"))
    admitted(throttle.begin("203.0.113.9", "b"))
    assert throttle.begin("203.0.113.9", "c") == CLIENT_BUSY
    assert throttle.client_refusal("203.0.113.9") == CLIENT_BUSY  # asked before the exchange
    assert throttle.in_flight("203.0.113.9") == 2
    assert throttle.client_refusal("203.0.113.10") is None
    admitted(throttle.begin("203.0.113.10", "c"))  # another client is not affected
    admitted(throttle.begin("203.0.113.9", "c", count_ip=False))  # trusted: no such limit
    throttle.finish(first, REJECTED)
    admitted(throttle.begin("203.0.113.9", "c"))


def test_asking_past_the_in_flight_limit_counts_against_the_client() -> None:
    throttle = make_throttle(task.Clock(), per_ip=4, max_in_flight=1)
    admitted(throttle.begin("203.0.113.9", "a"))
    assert throttle.begin("203.0.113.9", "a") == CLIENT_BUSY
    assert throttle.client_refusal("203.0.113.9") == CLIENT_BUSY
    assert throttle.begin("203.0.113.9", "a") == CLIENT_BUSY
    # one attempt in flight and three refused: the client's four failures are used up
    assert throttle.client_refusal("203.0.113.9") == IP_THROTTLED
    assert not throttle.account_blocked("a")


@pytest.mark.parametrize(
    ("outcome", "client_counts", "account_counts"),
    [
        (SUCCEEDED, 0, 0),
        (REJECTED, 1, 1),
        (NOT_CHECKED, 1, 0),  # refused by the hash queue, or the client left while waiting
        (BACKEND_ERROR, 0, 0),
    ],
)
def test_how_an_attempt_ends_decides_what_stays_counted(
    outcome: str, client_counts: int, account_counts: int
) -> None:
    throttle = make_throttle(task.Clock(), per_ip=1, per_account=1)
    attempt = admitted(throttle.begin("203.0.113.9", "erin@example.org"))
    assert throttle.ip_blocked("203.0.113.9") and throttle.account_blocked("erin@example.org")
    throttle.finish(attempt, outcome)
    assert throttle.in_flight("203.0.113.9") == 0
    assert throttle.ip_blocked("203.0.113.9") is bool(client_counts)
    assert throttle.account_blocked("erin@example.org") is bool(account_counts)


# --- bounded state -----------------------------------------------------------------------------


def test_client_key_cap_refuses_new_clients_until_old_ones_expire() -> None:
    clock = task.Clock()
    throttle = make_throttle(clock, per_ip=5, per_account=100, max_in_flight=5, max_keys=3)
    for n in range(3):
        throttle.finish(admitted(throttle.begin(f"203.0.113.{n}", "a")), REJECTED)
    assert throttle.begin("203.0.113.50", "a") == STATE_FULL
    assert throttle.tracked() == (3, 1)
    still_running = admitted(throttle.begin("203.0.113.1", "a"))  # a known client goes on
    clock.advance(WINDOW + 1)
    throttle.expire()
    assert throttle.tracked() == (0, 0)
    admitted(throttle.begin("203.0.113.50", "a"))
    throttle.finish(still_running, SUCCEEDED)  # its failure already expired: nothing to undo
    assert throttle.tracked() == (1, 1)


def test_account_key_cap_refuses_new_accounts() -> None:
    clock = task.Clock()
    throttle = make_throttle(clock, per_ip=100, max_in_flight=100, max_keys=2)
    throttle.finish(admitted(throttle.begin("203.0.113.1", "a", count_ip=False)), REJECTED)
    throttle.finish(admitted(throttle.begin("203.0.113.1", "b", count_ip=False)), REJECTED)
    assert throttle.begin("203.0.113.1", "c", count_ip=False) == STATE_FULL
    admitted(throttle.begin("203.0.113.1", "a", count_ip=False))
    assert throttle.tracked() == (0, 2)


@pytest.mark.parametrize(
    ("identity", "refused"),
    [
        ("x" * MAX_KEY_OCTETS, False),
        ("x" * (MAX_KEY_OCTETS + 1), True),
        ("é" * (MAX_KEY_OCTETS // 2), False),  # 254 octets
        ("é" * (MAX_KEY_OCTETS // 2 + 1), True),  # 256 octets though 128 characters
    ],
)
def test_throttle_key_length_cap(identity: str, refused: bool) -> None:
    throttle = make_throttle(task.Clock())
    result = throttle.begin("203.0.113.9", identity)
    assert (result == STATE_FULL) is refused
    assert throttle.tracked() == ((0, 0) if refused else (1, 1))


LOGIN_TEXTS = [
    (b"erin@example.org", "erin@example.org"),
    (b" \terin@example.org \t", "erin@example.org"),
    ("\u212aate@example.org".encode(), "\u212aate@example.org"),  # the store folds the case
    (b"a" * MAX_LOGIN_OCTETS, "a" * MAX_LOGIN_OCTETS),
    (b"a" * (MAX_LOGIN_OCTETS + 1), None),
    (b" " * 200 + b"a" * 60, None),  # measured before the trim
    (b"erin\xff@example.org", None),
    (b"\xc3@example.org", None),  # truncated UTF-8
    (b"\xed\xa0\x80@example.org", None),  # an encoded surrogate is not UTF-8
]


@pytest.mark.parametrize(("raw", "text"), LOGIN_TEXTS)
def test_login_text_refuses_undecodable_and_oversized_names(raw: bytes, text: str | None) -> None:
    assert login_text(raw) == text


def test_rate_limiter_withdraw_takes_back_one_event() -> None:
    clock = task.Clock()
    limiter = RateLimiter(clock, 10, 60, max_keys=1)
    first = limiter.record("a")
    clock.advance(1)
    second = limiter.record("a")
    assert first is not None and second is not None
    assert limiter.record("b") is None  # no room for a second key
    assert not limiter.allow("b")
    limiter.withdraw("a", first)
    assert limiter.count("a") == 1
    limiter.withdraw("a", first)  # twice: nothing more to take back
    assert limiter.count("a") == 1
    limiter.withdraw("a", second)
    assert len(limiter) == 0
    assert limiter.record("b") is not None


# --- identities without a store ---------------------------------------------------------------


def test_names_that_match_no_account_share_bounded_buckets() -> None:
    identities = AccountIdentities(None, buckets=16)
    seen: set[str] = set()
    for n in range(500):
        seen.add(identities.resolve(f"guess{n}@example.org").result)
    assert len(seen) <= 16
    assert all(key.startswith("unknown#") and "@" not in key for key in seen)
    one = identities.resolve("Guess1@Example.org.").result
    assert one == identities.resolve("guess1@example.org").result  # canonical form first


# --- the hash queue ----------------------------------------------------------------------------


class Works:
    """Credential checks whose end the test decides: each returns a Deferred it holds."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.pending: dict[str, defer.Deferred[str]] = {}

    def check(self, name: str) -> Callable[[], defer.Deferred[str]]:
        def run() -> defer.Deferred[str]:
            self.started.append(name)
            self.pending[name] = defer.Deferred()
            return self.pending[name]

        return run

    def finish(self, name: str) -> None:
        self.pending.pop(name).callback(name)


def outcome(d: defer.Deferred[Any]) -> list[Any]:
    """What ``d`` has fired with so far: [], [result] or [the exception type]."""
    got: list[Any] = []
    d.addCallbacks(got.append, lambda f: got.append(f.type))
    return got


def test_hash_queue_runs_best_priority_first_and_refuses_when_full() -> None:
    works = Works()
    queue = HashQueue(concurrency=1, size=3)
    results = {}
    results["first"] = outcome(queue.submit(5, works.check("first")))
    results["late"] = outcome(queue.submit(4, works.check("late")))
    results["clean"] = outcome(queue.submit(0, works.check("clean")))
    results["late2"] = outcome(queue.submit(4, works.check("late2")))
    assert works.started == ["first"]
    # full: an attempt that ranks no better than the worst waiting is refused at once...
    results["refused"] = outcome(queue.submit(4, works.check("refused")))
    assert results["refused"] == [PoolFull]
    # ...one that ranks better takes the place of the worst waiting (the latest among equals)
    results["clean2"] = outcome(queue.submit(1, works.check("clean2")))
    assert results["late2"] == [PoolFull]
    assert queue.waiting == 3
    for name in ("first", "clean", "clean2", "late"):
        works.finish(name)
    assert works.started == ["first", "clean", "clean2", "late"]
    assert [results[n] for n in ("first", "clean", "clean2", "late")] == [
        ["first"],
        ["clean"],
        ["clean2"],
        ["late"],
    ]
    assert queue.running == 0 and queue.waiting == 0


def test_names_without_an_account_rank_after_every_check_that_can_succeed() -> None:
    identities = AccountIdentities(None)
    unknown = identities.resolve("guess@example.org").result
    assert not identities.is_account(unknown)
    assert identities.is_account("erin@example.org")
    ranks = [priority(0, is_account=False), priority(50, is_account=True), priority(0, True)]
    assert sorted(ranks) == [0, 50, NO_ACCOUNT_RANK]
    works = Works()
    queue = HashQueue(concurrency=1, size=3)
    outcome(queue.submit(0, works.check("running")))
    outcome(queue.submit(priority(0, False), works.check("guess")))
    outcome(queue.submit(priority(7, True), works.check("account")))
    for name in ("running", "account"):
        works.finish(name)
    assert works.started == ["running", "account", "guess"]


def test_one_hash_thread_is_kept_for_clean_records() -> None:
    works = Works()
    queue = HashQueue(concurrency=2, size=4)
    outcome(queue.submit(3, works.check("guess1")))
    outcome(queue.submit(1, works.check("guess2")))  # a failure on record: waits
    assert works.started == ["guess1"] and queue.waiting == 1
    clean = outcome(queue.submit(0, works.check("clean")))  # starts at once on the kept thread
    assert works.started == ["guess1", "clean"]
    outcome(queue.submit(0, works.check("clean2")))  # both threads busy: waits, first in line
    works.finish("clean")
    assert clean == ["clean"]
    assert works.started == ["guess1", "clean", "clean2"]
    works.finish("guess1")
    assert works.started[-1] == "guess2"
    works.finish("clean2")
    works.finish("guess2")
    assert queue.running == 0 and queue.waiting == 0


def test_hash_queue_of_size_zero_only_runs() -> None:
    works = Works()
    queue = HashQueue(concurrency=2, size=0)
    outcome(queue.submit(0, works.check("a")))
    outcome(queue.submit(0, works.check("b")))
    assert outcome(queue.submit(0, works.check("c"))) == [PoolFull]
    works.finish("a")
    assert outcome(queue.submit(0, works.check("d"))) == []
    assert works.started == ["a", "b", "d"]


def test_hash_queue_drops_checks_whose_session_went_away() -> None:
    works = Works()
    queue = HashQueue(concurrency=1, size=2)
    outcome(queue.submit(0, works.check("running")))
    gone = outcome(queue.submit(0, works.check("gone"), wanted=lambda: False))
    kept = outcome(queue.submit(0, works.check("kept")))
    works.finish("running")
    assert gone == [defer.CancelledError]
    assert works.started == ["running", "kept"]
    works.finish("kept")
    assert kept == ["kept"]


def test_hash_queue_frees_its_thread_when_a_check_fails() -> None:
    queue = HashQueue(concurrency=1, size=1)

    def broken() -> defer.Deferred[str]:
        raise ValueError("store down")

    assert outcome(queue.submit(0, broken)) == [ValueError]
    assert queue.running == 0
    assert outcome(queue.submit(0, lambda: defer.succeed("ok"))) == ["ok"]


# --- the hash pool's own bound (real threads) ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_thread_pool_bound_refuses_at_once() -> None:
    from twisted.internet import reactor

    pool = ThreadPoolService(reactor, "test-hash", 1, max_pending=2)
    pool.startService()
    gate = threading.Event()
    try:
        held = pool.run(gate.wait, 30)
        queued = pool.run(lambda: "queued")
        refused = outcome(pool.run(lambda: "never"))
        assert refused == [PoolFull]
        assert pool.pending == 2
        gate.set()
        assert await held is True
        assert await queued == "queued"
        assert pool.pending == 0
        assert await pool.run(lambda: "again") == "again"
    finally:
        gate.set()
        pool.stopService()


def _own_priority() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
@pytest_twisted.ensureDeferred
async def test_thread_pool_can_run_at_a_lower_cpu_priority() -> None:
    from twisted.internet import reactor

    base = _own_priority()
    niced = ThreadPoolService(reactor, "test-niced", 1, nice=5)
    plain = ThreadPoolService(reactor, "test-plain", 1)
    for pool in (niced, plain):
        pool.startService()
    try:
        assert await niced.run(_own_priority) == min(19, base + 5)
        assert await niced.run(_own_priority) == min(19, base + 5)  # once per thread, not per job
        assert await plain.run(_own_priority) == base
        assert _own_priority() == base  # the reactor thread keeps its priority
    finally:
        for pool in (niced, plain):
            pool.stopService()
