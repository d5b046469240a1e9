"""Composition of the relay: the queue store, next hop, client, scheduler and their settings.

:func:`build_relay` is called by the composition root (:mod:`mailsrv.tap`) with the reactor;
everything it builds receives the reactor as clock and TCP connector, and the I/O thread pool
for blocking work.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mailsrv.config import Config, ConfigError, split_host_port
from mailsrv.dns import dns_servers_of, make_resolver
from mailsrv.ops.metrics import Metrics
from mailsrv.relay.bounces import DsnSubmitter
from mailsrv.relay.connector import Connector
from mailsrv.relay.courier import ClientConnector
from mailsrv.relay.options import mx_options, smarthost_options
from mailsrv.relay.queue_store import IQueueStore
from mailsrv.relay.resolver import NextHop
from mailsrv.relay.retry import RetryPolicy
from mailsrv.relay.scheduler import RelayScheduler, SchedulerSettings
from mailsrv.relay.tlsclient import TLSClientConfigError
from mailsrv.threads import RunInThread

RELAY_SETTINGS = frozenset(
    {
        "relay_host",
        "relay_user",
        "relay_password",
        "relay_tls",
        "relay_ca_file",
        "relay_mx_tls",
        "relay_mx_port",
        "relay_dns_timeout",
        "relay_min_backoff",
        "relay_max_backoff",
        "relay_queue_lifetime",
        "relay_delay_warning",
        "relay_recipients_per_transaction",
        "relay_destination_concurrency",
        "relay_concurrency",
        "relay_connect_timeout",
        "relay_greeting_timeout",
        "relay_command_timeout",
        "relay_mail_timeout",
        "relay_rcpt_timeout",
        "relay_data_timeout",
        "relay_data_block_timeout",
        "relay_data_done_timeout",
        "relay_connection_idle",
        "relay_bounce_size_limit",
    }
)
"""The reloadable settings the relay's parts are built from (``dns_servers`` is the shared
resolver's own reload step, :class:`mailsrv.dns.ServerResolver`)."""


@dataclass(frozen=True)
class RelayParts:
    """What the scheduler delivers with, built from the configuration."""

    next_hop: NextHop
    connector: ClientConnector
    retry: RetryPolicy
    settings: SchedulerSettings


def relay_parts(
    config: Config, reactor: Any, run_in_thread: RunInThread, resolver: Any = None
) -> RelayParts:
    """The next hop, connectors, retry policy and scheduler settings of ``config``.

    ``resolver`` is the server's (:class:`mailsrv.dns.ServerResolver`); without one, one is
    made for ``dns_servers``.  Reads ``relay_ca_file`` (blocking); raises
    :class:`ConfigError` with one line when it cannot be used."""
    rng = random.SystemRandom()
    smarthost = split_host_port(config.relay_host, 25) if config.relay_host else None
    next_hop = NextHop(
        resolver if resolver is not None else make_resolver(reactor, dns_servers_of(config)),
        reactor,
        rng,
        mx_port=config.relay_mx_port,
        timeout=config.relay_dns_timeout,
        smarthost=smarthost,
    )
    try:
        connector = ClientConnector(
            Connector(reactor, mx_options(config), run_in_thread),
            Connector(reactor, smarthost_options(config), run_in_thread) if smarthost else None,
        )
    except TLSClientConfigError as e:
        raise ConfigError(str(e)) from None
    retry = RetryPolicy(
        min_backoff=config.relay_min_backoff,
        max_backoff=config.relay_max_backoff,
        lifetime=config.relay_queue_lifetime,
    )
    settings = SchedulerSettings(
        per_destination=config.relay_destination_concurrency,
        total=config.relay_concurrency,
        max_recipients=config.relay_recipients_per_transaction,
        idle_timeout=config.relay_connection_idle,
        stop_grace=config.shutdown_grace,
        delay_warning=config.relay_delay_warning,
    )
    return RelayParts(next_hop, connector, retry, settings)


@dataclass(frozen=True)
class Relay:
    """The relay's parts that the rest of the tree refers to."""

    store: IQueueStore
    scheduler: RelayScheduler
    bounces: DsnSubmitter
    rebuild: Callable[[Config], RelayParts]

    def reload_step(self, config: Config, changed: frozenset[str]) -> Callable[[], None] | None:
        """A reload's relay part (a :data:`mailsrv.reload.ReloadStep`): the next attempts use
        ``config``'s relay settings when they changed."""
        if not changed & RELAY_SETTINGS:
            return None
        parts = self.rebuild(config)

        def install() -> None:
            self.scheduler.reconfigure(parts.next_hop, parts.connector, parts.retry, parts.settings)
            self.bounces.reconfigure(config.relay_bounce_size_limit, config.relay_queue_lifetime)

        return install


def build_relay(
    config: Config,
    reactor: Any,
    run_in_thread: RunInThread,
    store: IQueueStore,
    bounces: DsnSubmitter,
    metrics: Metrics | None = None,
    resolver: Any = None,
) -> Relay:
    """The scheduler over ``store``, delivering through a smarthost or by MX as configured,
    its DSNs composed by ``bounces``.

    The queue is recovered from disk here, before the reactor runs: nothing is staged while
    the recovery removes what interrupted writes left.  Raises :class:`ConfigError` when
    ``relay_ca_file`` cannot be used."""
    parts = relay_parts(config, reactor, run_in_thread, resolver)
    scheduler = RelayScheduler(
        store,
        parts.next_hop,
        parts.connector,
        parts.retry,
        reactor,
        random.SystemRandom(),
        bounces,
        parts.settings,
        loaded=store.load_now(),
        metrics=metrics,
    )
    rebuild = functools.partial(
        relay_parts, reactor=reactor, run_in_thread=run_in_thread, resolver=resolver
    )
    return Relay(store, scheduler, bounces, rebuild)
