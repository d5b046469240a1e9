"""The metrics themselves: plain-number families expose what prometheus_client's objects do,
and the AUTH throttle's census, in the unit and in a scrape after real AUTH failures.

The scrape test runs the SMTP server and the ops HTTP listener in the test reactor on real
sockets, with the server's time on a ``task.Clock``: failed AUTHs are answered late, and the
test moves the clock to release each answer and, later, to age the failures out.
"""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import task, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall

from mailsrv.auth.sqlite_store import SQLiteUserStore
from mailsrv.auth.throttle import REJECTED, AuthThrottle, ThrottleCensus
from mailsrv.limits import RateLimiter
from mailsrv.ops.families import CounterFamily, GaugeFamily, HistogramFamily
from mailsrv.ops.http import OpsHTTPService, OpsResource
from mailsrv.ops.metrics import Metrics
from mailsrv.smtp import replies
from tests.conftest import RawClient, run_client
from tests.test_auth import PASSWORD, b64, start_auth_server
from tests.test_tls import CertFiles

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# --- the families against prometheus_client's own objects --------------------------------------

BUCKETS = (0.5, 1.0, 4.0)
# (what, labels, its prometheus_client object, its family, what is done to each)
Operation = Callable[[Any], None]
PARITY: list[tuple[str, list[str], Callable[..., Any], Callable[..., Any], list[Operation]]] = [
    ("counter", [], Counter, CounterFamily, [lambda m: m.inc(), lambda m: m.inc(2.5)]),
    (
        "counter with labels",
        ["listener", "reason"],
        Counter,
        CounterFamily,
        [
            lambda m: m.labels("mx", "connection-rate").inc(),
            lambda m: m.labels("mx", "connection-rate").inc(),
            lambda m: m.labels("submission", "shutting-down").inc(3),
            lambda m: m.labels("smtps", "ip-connection-limit"),  # made, never counted
        ],
    ),
    ("gauge", [], Gauge, GaugeFamily, [lambda m: m.set(7), lambda m: m.set(1.9e9)]),
    (
        "gauge with labels",
        ["state"],
        Gauge,
        GaugeFamily,
        [
            lambda m: m.labels("pending").inc(),
            lambda m: m.labels("pending").inc(),
            lambda m: m.labels("pending").dec(),
            lambda m: m.labels("held").set(-2),
        ],
    ),
    (
        "histogram",
        [],
        lambda *a, **kw: Histogram(*a, buckets=BUCKETS, **kw),
        lambda *a, **kw: HistogramFamily(*a, buckets=BUCKETS, **kw),
        # on a bound, between bounds, below the first, above the last, zero
        [lambda m, v=v: m.observe(v) for v in (0.5, 0.75, 0.1, 99.0, 0.0, 1.0, 4.0)],
    ),
    (
        "histogram with labels",
        ["endpoint"],
        lambda *a, **kw: Histogram(*a, buckets=BUCKETS, **kw),
        lambda *a, **kw: HistogramFamily(*a, buckets=BUCKETS, **kw),
        [
            lambda m: m.labels("a").observe(0.2),
            lambda m: m.labels("b").observe(5),
            lambda m: m.labels("a").observe(1.0),
        ],
    ),
]


def exposition(make: Callable[..., Any], labels: list[str], operations: list[Operation]) -> str:
    registry = CollectorRegistry()
    metric = make("mailsrv_thing", "What is counted", labels, registry=registry)
    for operation in operations:
        operation(metric)
    text = generate_latest(registry).decode()
    return "".join(line + "\n" for line in text.splitlines() if "_created" not in line)


@pytest.mark.parametrize(
    ("labels", "library", "family", "operations"),
    [row[1:] for row in PARITY],
    ids=[row[0] for row in PARITY],
)
def test_a_family_exposes_what_the_prometheus_client_object_does(
    labels: list[str],
    library: Callable[..., Any],
    family: Callable[..., Any],
    operations: list[Operation],
) -> None:
    expected = exposition(library, labels, operations)
    assert "mailsrv_thing" in expected
    assert exposition(family, labels, operations) == expected
    assert exposition(family, labels, []) == exposition(library, labels, [])


BAD_USES: list[tuple[str, Callable[[], Any]]] = [
    ("too few label values", lambda: CounterFamily("x", "d", ["a", "b"]).labels("1")),
    ("too many label values", lambda: GaugeFamily("x", "d", ["a"]).labels("1", "2")),
    ("labels on an unlabelled family", lambda: CounterFamily("x", "d").labels("1")),
    ("unlabelled use of a labelled family", lambda: HistogramFamily("x", "d", ["a"]).observe(1)),
    ("a counter going down", lambda: CounterFamily("x", "d").inc(-1)),
]


@pytest.mark.parametrize("use", [row[1] for row in BAD_USES], ids=[row[0] for row in BAD_USES])
def test_misuse_of_a_family_is_a_value_error(use: Callable[[], Any]) -> None:
    with pytest.raises(ValueError):
        use()


def test_a_histogram_without_inf_gets_it() -> None:
    histogram = HistogramFamily("x", "d", buckets=(2.0, 1.0))
    histogram.observe(math.inf)
    (family,) = histogram.collect()
    buckets = [(s.labels["le"], s.value) for s in family.samples if s.name == "x_bucket"]
    assert buckets == [("1.0", 0.0), ("2.0", 0.0), ("+Inf", 1.0)]


# --- the census of the AUTH throttle ---------------------------------------------------------


def test_rate_limiter_census_counts_active_keys_and_those_at_the_limit() -> None:
    clock = task.Clock()
    limiter = RateLimiter(clock, limit=2, window=10.0)
    assert limiter.census() == (0, 0)
    limiter.record("a")
    limiter.record("a")
    limiter.record("b")
    assert limiter.census() == (2, 1)
    clock.advance(5)
    limiter.record("b")
    assert limiter.census() == (2, 2)
    clock.advance(5)  # the first events of a and b leave the window
    assert limiter.census() == (1, 0)
    clock.advance(5)
    assert limiter.census() == (0, 0)


def test_throttle_census_counts_clients_per_slash_64_and_accounts() -> None:
    clock = task.Clock()
    throttle = AuthThrottle(clock, per_ip=2, per_account=3, window=900.0, max_in_flight=10)
    for ip, account in [
        ("2001:db8:1:2::a", "erin"),
        ("2001:db8:1:2::b", "erin"),  # the same /64: its second failure, the limit
        ("203.0.113.9", "erin"),  # erin's third: the limit
        ("198.51.100.7", "sam"),
    ]:
        attempt = throttle.begin(ip, account)
        assert not isinstance(attempt, str), attempt
        throttle.finish(attempt, REJECTED)
    assert throttle.census() == ThrottleCensus(
        clients_locked=1, clients_delayed=2, accounts_locked=1, accounts_delayed=1
    )
    clock.advance(901)
    assert throttle.census() == ThrottleCensus(0, 0, 0, 0)


# --- a scrape after real AUTH failures --------------------------------------------------------


class WatchedClock(task.Clock):
    """A ``task.Clock`` that tells the test when something is scheduled ``delay`` seconds out
    (the late answer to a failed AUTH), so the test advances it exactly then."""

    def __init__(self) -> None:
        super().__init__()
        self._watch: list[tuple[float, Deferred[IDelayedCall]]] = []

    def scheduled(self, delay: float) -> Deferred[IDelayedCall]:
        d: Deferred[IDelayedCall] = Deferred()
        self._watch.append((delay, d))
        return d

    def callLater(self, delay: float, f: Any, *args: Any, **kw: Any) -> IDelayedCall:
        call = super().callLater(delay, f, *args, **kw)
        for entry in list(self._watch):
            if entry[0] == delay:
                self._watch.remove(entry)
                entry[1].callback(call)
        return call


def scrape(port: int) -> Samples:
    """GET /metrics over HTTP (blocking: run it in a thread), parsed back."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def throttled(samples: Samples) -> dict[tuple[str, str], float]:
    """The throttled-clients gauge: (kind, state) -> value."""
    return {
        (dict(labels)["kind"], dict(labels)["state"]): value
        for (name, labels), value in samples.items()
        if name == "mailsrv_throttled_clients"
    }


def gauge(ip_locked: int, ip_delayed: int, account_locked: int, account_delayed: int) -> Any:
    return {
        ("ip", "locked"): ip_locked,
        ("ip", "delayed"): ip_delayed,
        ("account", "locked"): account_locked,
        ("account", "delayed"): account_delayed,
    }


def plain(login: str, password: str) -> bytes:
    return b"AUTH PLAIN " + b64(f"\0{login}\0{password}".encode())


@pytest_twisted.ensureDeferred
async def test_scrape_counts_throttled_clients_and_throttle_events(tmp_path: Path) -> None:
    from twisted.internet import reactor

    clock = WatchedClock()
    store = SQLiteUserStore(tmp_path / "users.db", reactor)
    await store.open()
    server = await start_auth_server(
        tmp_path,
        store,
        CertFiles(tmp_path / "tls"),
        clock=clock,
        trusted_networks=(),
        allow_plaintext_auth=True,
        auth_max_failures_per_ip=3,
        auth_max_failures_per_account=2,
    )
    metrics: Metrics = server.running.server.metrics
    resource = OpsResource(metrics, lambda f, *a: threads.deferToThread(f, *a), {})
    ops = OpsHTTPService(reactor, "127.0.0.1", 0, resource, token_set=False)
    ops.startService()
    assert ops.listening is not None
    port = ops.listening.getHost().port
    client = RawClient(server.ports["submission"])
    try:
        await run_client(client.read_reply)
        await run_client(client.command, b"EHLO client.test")
        before = await run_client(scrape, port)
        assert throttled(before) == gauge(0, 0, 0, 0)

        async def fails(login: str, delay: float) -> None:
            """A wrong password: the 535 comes ``delay`` seconds later on the clock."""
            answered = run_client(client.command, plain(login, "wrong"))
            await clock.scheduled(delay)
            clock.advance(delay)
            assert await answered == replies.AUTH_FAILED.format()

        await fails("erin@example.org", 0.5)
        assert throttled(await run_client(scrape, port)) == gauge(0, 1, 0, 1)
        await fails("erin@example.org", 1.0)  # erin reaches the account limit
        assert throttled(await run_client(scrape, port)) == gauge(0, 1, 1, 0)
        refused = await run_client(client.command, plain("erin@example.org", PASSWORD))
        assert refused == replies.AUTH_ACCOUNT_THROTTLED.format()  # even the right password
        await fails("sam@example.org", 2.0)  # the client's third: the client limit
        assert throttled(await run_client(scrape, port)) == gauge(1, 0, 1, 1)
        refused = await run_client(client.command, plain("sam@example.org", PASSWORD))
        assert refused == replies.AUTH_IP_THROTTLED.format()  # and the session is closed
        after = await run_client(scrape, port)

        def moved(name: str, **labels: str) -> float:
            key = (name, tuple(sorted(labels.items())))
            return after.get(key, 0.0) - before.get(key, 0.0)

        events = "mailsrv_security_events_total"
        assert moved(events, event="auth-failure") == 3
        assert moved(events, event="auth-account-throttled") == 1
        assert moved(events, event="auth-ip-throttled") == 1
        assert {
            dict(labels)["event"]
            for (name, labels), value in after.items()
            if name == events and value
        } == {"auth-failure", "auth-account-throttled", "auth-ip-throttled"}
        attempts = "mailsrv_auth_attempts_total"
        assert moved(attempts, mechanism="PLAIN", result="failure") == 3
        assert moved(attempts, mechanism="PLAIN", result="throttled") == 2
        assert moved(attempts, mechanism="PLAIN", result="success") == 0

        # The first failure (at 0 s) leaves the 900 s window: the client drops below its
        # limit, erin below hers; nothing was expired by a timer, the scrape counts afresh.
        clock.advance(900.2 - clock.seconds())
        assert throttled(await run_client(scrape, port)) == gauge(0, 1, 0, 2)
        clock.advance(10)
        assert throttled(await run_client(scrape, port)) == gauge(0, 0, 0, 0)
    finally:
        client.close()
        await ops.stopService()
        await server.running.service.stopService()
        await store.close()
