"""Composition of the relay: the queue store, next hop, client, scheduler and their settings.

:func:`build_relay` is called by the composition root (:mod:`mailsrv.tap`) with the reactor;
everything it builds receives the reactor as clock and TCP connector, and the I/O thread pool
for blocking work.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from mailsrv.config import Config, split_host_port
from mailsrv.ops.metrics import Metrics
from mailsrv.relay.connector import Connector
from mailsrv.relay.courier import ClientConnector
from mailsrv.relay.options import mx_options, smarthost_options
from mailsrv.relay.queue_store import FileQueueStore
from mailsrv.relay.resolver import NextHop, make_resolver
from mailsrv.relay.retry import RetryPolicy
from mailsrv.relay.scheduler import RelayScheduler, SchedulerSettings, SubmitDsns
from mailsrv.threads import RunInThread


@dataclass(frozen=True)
class Relay:
    """The relay's parts that the rest of the tree refers to."""

    store: FileQueueStore
    scheduler: RelayScheduler


def build_relay(
    config: Config,
    reactor: Any,
    run_in_thread: RunInThread,
    store: FileQueueStore,
    submit_dsns: SubmitDsns,
    metrics: Metrics | None = None,
) -> Relay:
    """The scheduler over ``store``, delivering through a smarthost or by MX as configured.

    The queue is recovered from disk here, before the reactor runs: nothing is staged while
    the recovery removes what interrupted writes left."""
    rng = random.SystemRandom()
    servers = [split_host_port(server, 53) for server in config.dns_servers]
    smarthost = split_host_port(config.relay_host, 25) if config.relay_host else None
    next_hop = NextHop(
        make_resolver(reactor, servers),
        reactor,
        rng,
        mx_port=config.relay_mx_port,
        timeout=config.relay_dns_timeout,
        smarthost=smarthost,
    )
    connector = ClientConnector(
        Connector(reactor, mx_options(config), run_in_thread),
        Connector(reactor, smarthost_options(config), run_in_thread) if smarthost else None,
    )
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
    scheduler = RelayScheduler(
        store,
        next_hop,
        connector,
        retry,
        reactor,
        rng,
        submit_dsns,
        settings,
        loaded=store.load_now(),
        metrics=metrics,
    )
    return Relay(store, scheduler)
