"""The server's Prometheus metrics: one registry of our own, and the metric objects in it.

The composition root builds one :class:`Metrics` and hands it to the components that count
things (the SMTP sessions and listeners, the group committer); a
component built without one (tests) makes a private instance, so the counting code has no
``if metrics`` branches.  The registry is not prometheus_client's global one, so two servers
in one process (tests) never share counters.

Label values are bounded: listener names, refusal reasons, reply codes from the one table in
:mod:`mailsrv.smtp.replies`, SASL mechanism names.  Never an
address, a host name or an IP.  Hot paths use label children prepared once
(:meth:`Metrics.listener`), not a ``.labels()`` look-up per event.

The metrics are :mod:`mailsrv.ops.families` (plain numbers the reactor thread updates, made
into samples when a scrape collects them), not prometheus_client's locked objects: an update
costs an attribute increment.  prometheus_client renders the exposition and gives the
process collector.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import generate_latest

from mailsrv.ops.families import (
    CounterFamily,
    CounterValue,
    GaugeFamily,
    GaugeValue,
    HistogramFamily,
)

if TYPE_CHECKING:
    from mailsrv.auth.throttle import ThrottleCensus

PREFIX = "mailsrv"

_SIZE_BUCKETS = tuple(float(2**n) for n in range(10, 28, 2))  # 1 KiB .. 64 MiB, x4 each
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)


@dataclass
class ListenerMetrics:
    """The label children of one SMTP listener, prepared once and kept by its sessions."""

    name: str
    metrics: Metrics
    connections: CounterValue
    current: GaugeValue
    accepted: CounterValue
    _refused: dict[str, CounterValue] = field(default_factory=dict)
    _rejected: dict[str, CounterValue] = field(default_factory=dict)

    def refused(self, reason: str) -> None:
        """Count a connection refused before the greeting (``reason``: a limit's name)."""
        child = self._refused.get(reason)
        if child is None:
            child = self._refused[reason] = self.metrics.connections_refused.labels(
                self.name, reason
            )
        child.inc()

    def rejected(self, reply_class: str) -> None:
        """Count a transaction reply of 4xx/5xx (``reply_class``: e.g. ``5.1.1`` or ``5xx``)."""
        child = self._rejected.get(reply_class)
        if child is None:
            child = self._rejected[reply_class] = self.metrics.messages_rejected.labels(
                self.name, reply_class
            )
        child.inc()


class Metrics:
    """Every metric the server exports, in a registry of its own (see the module docstring).

    ``process``: also export the process collector's CPU, memory and file-descriptor metrics.
    """

    def __init__(self, process: bool = False) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        if process:
            ProcessCollector(registry=registry)
        self.connections = CounterFamily(
            f"{PREFIX}_connections",
            "SMTP connections accepted by the listener (before admission)",
            ["listener"],
            registry=registry,
        )
        self.connections_current = GaugeFamily(
            f"{PREFIX}_connections_current",
            "SMTP sessions open now",
            ["listener"],
            registry=registry,
        )
        self.connections_refused = CounterFamily(
            f"{PREFIX}_connections_refused",
            "SMTP connections refused by a connection cap or rate, by limit",
            ["listener", "reason"],
            registry=registry,
        )
        self.messages_accepted = CounterFamily(
            f"{PREFIX}_messages_accepted",
            "Messages committed and answered 250",
            ["listener"],
            registry=registry,
        )
        self.messages_rejected = CounterFamily(
            f"{PREFIX}_messages_rejected",
            "4xx/5xx replies to MAIL, RCPT, DATA and the end of DATA, by enhanced status code",
            ["listener", "class"],
            registry=registry,
        )
        self.message_size = HistogramFamily(
            f"{PREFIX}_message_size_bytes",
            "Size of accepted messages as received (bytes)",
            buckets=_SIZE_BUCKETS,
            registry=registry,
        )
        self.accept_latency = HistogramFamily(
            f"{PREFIX}_accept_latency_seconds",
            "Time from the end of DATA to the 250 (the durable commit)",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.commit_batch = HistogramFamily(
            f"{PREFIX}_commit_batch_messages",
            "Messages per group-commit batch",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.auth_attempts = CounterFamily(
            f"{PREFIX}_auth_attempts",
            "SMTP AUTH attempts, by SASL mechanism and result",
            ["mechanism", "result"],
            registry=registry,
        )
        self.tls_handshakes = CounterFamily(
            f"{PREFIX}_tls_handshakes",
            "Server-side TLS handshakes (implicit TLS and STARTTLS), by protocol version and "
            "result (ok, or failed: the connection ended before the handshake did)",
            ["listener", "version", "result"],
            registry=registry,
        )
        self.sessions = CounterFamily(
            f"{PREFIX}_sessions",
            "SMTP sessions that were admitted, counted when they end: by listener, whether TLS "
            "was up and whether the client authenticated",
            ["listener", "tls", "auth"],
            registry=registry,
        )
        self.throttled_clients = GaugeFamily(
            f"{PREFIX}_throttled_clients",
            "Clients (kind=ip: an IPv4 address or an IPv6 /64) and accounts (kind=account) with"
            " failed AUTHs in the window: state=locked (at the limit: AUTH refused until they"
            " age out) or state=delayed (below it: each failure answered late)",
            ["kind", "state"],
            registry=registry,
        )
        self.security_events = CounterFamily(
            f"{PREFIX}_security_events",
            "Security events as logged (refusals by a limit or throttle, AUTH failures, relay"
            " and sender refusals), by event",
            ["event"],
            registry=registry,
        )
        self.tls_certificate_expiry = GaugeFamily(
            f"{PREFIX}_tls_certificate_expiry_timestamp_seconds",
            "When the server's TLS certificate in use expires (Unix time; 0 without TLS)",
            registry=registry,
        )
        self.relay_queue = GaugeFamily(
            f"{PREFIX}_relay_queue_recipients",
            "Recipients in the relay queue, by state (pending, deferred, held)",
            ["state"],
            registry=registry,
        )
        self.relay_queue_messages = GaugeFamily(
            f"{PREFIX}_relay_queue_messages",
            "Messages in the relay queue",
            registry=registry,
        )
        self.relay_oldest_age = GaugeFamily(
            f"{PREFIX}_relay_oldest_message_age_seconds",
            "Age of the oldest message in the relay queue (0 when it is empty)",
            registry=registry,
        )
        self.relay_attempts = CounterFamily(
            f"{PREFIX}_relay_attempts",
            "Relay delivery attempts per recipient, by result (sent, deferred, bounced)",
            ["result"],
            registry=registry,
        )
        self.webhook_deliveries = CounterFamily(
            f"{PREFIX}_webhook_deliveries",
            "Webhook delivery attempts, by endpoint and result (delivered, retry, dead, disabled)",
            ["endpoint", "result"],
            registry=registry,
        )
        self.webhook_latency = HistogramFamily(
            f"{PREFIX}_webhook_latency_seconds",
            "Time from a webhook request to its response (or failure), by endpoint",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.webhook_dead_letters = CounterFamily(
            f"{PREFIX}_webhook_dead_letters",
            "Webhook events that became dead letters, by endpoint",
            ["endpoint"],
            registry=registry,
        )
        self._listeners: dict[str, ListenerMetrics] = {}
        self._security_events: dict[str, CounterValue] = {}
        self._before_scrape: list[Callable[[], None]] = []

    def listener(self, name: str) -> ListenerMetrics:
        """The prepared children of listener ``name`` (built on first use, then shared)."""
        found = self._listeners.get(name)
        if found is None:
            found = self._listeners[name] = ListenerMetrics(
                name,
                self,
                self.connections.labels(name),
                self.connections_current.labels(name),
                self.messages_accepted.labels(name),
            )
        return found

    def tls_handshake(self, listener: str, version: str, result: str) -> None:
        """Count one TLS handshake (``version``: e.g. ``TLSv1.3``, or ``none`` if it failed)."""
        self.tls_handshakes.labels(listener, version, result).inc()

    def session_ended(self, listener: str, tls: bool, auth: bool) -> None:
        """Count one admitted session as it ends."""
        self.sessions.labels(listener, "yes" if tls else "no", "yes" if auth else "no").inc()

    def auth_attempt(self, mechanism: str, result: str) -> None:
        """Count one AUTH attempt (``mechanism`` is one the server offers: a bounded set)."""
        self.auth_attempts.labels(mechanism or "none", result).inc()

    def security_event(self, event: str) -> None:
        """Count one security event (``event``: one of the server's fixed event names)."""
        child = self._security_events.get(event)
        if child is None:
            child = self._security_events[event] = self.security_events.labels(event)
        child.inc()

    def set_throttled(self, census: ThrottleCensus) -> None:
        """Set the throttled-clients gauge from the AUTH throttle's census."""
        gauge = self.throttled_clients
        gauge.labels("ip", "locked").set(census.clients_locked)
        gauge.labels("ip", "delayed").set(census.clients_delayed)
        gauge.labels("account", "locked").set(census.accounts_locked)
        gauge.labels("account", "delayed").set(census.accounts_delayed)

    def before_scrape(self, refresh: Callable[[], None]) -> None:
        """Call ``refresh`` on the reactor before each scrape (gauges read from a component's
        in-memory state, which only the reactor thread may walk)."""
        self._before_scrape.append(refresh)

    def refresh(self) -> None:
        """Run the :meth:`before_scrape` callbacks (reactor thread, before :meth:`render`)."""
        for refresh in self._before_scrape:
            refresh()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (blocking: run it in a thread)."""
        return generate_latest(self.registry)
