"""Composition of the webhooks: the outbox stores, the commit sink, the dispatcher and the
sender, the relay outcome listener and the control-socket actions.

:func:`build_webhooks` is called by the composition root (:mod:`mailsrv.tap`) with the
reactor, before it runs: the outbox is recovered from disk here, so nothing is staged while the
recovery removes what interrupted writes left.  Everything is built even with no endpoint
configured, so that entries left from an earlier configuration stay visible to
``mailsrv webhooks``; the sink then writes nothing.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mailsrv.config import Config, ConfigError
from mailsrv.jsonstore.spares import SparePool
from mailsrv.ops.metrics import Metrics
from mailsrv.pgsql import Database
from mailsrv.threads import RunInThread
from mailsrv.webhook.actions import OutboxActions
from mailsrv.webhook.build import PayloadBuilder
from mailsrv.webhook.control import Handler, handlers
from mailsrv.webhook.delivery import InProcessDelivery, WorkerDelivery
from mailsrv.webhook.dispatcher import WebhookDispatcher
from mailsrv.webhook.endpoint_state import DisabledEndpoints, EndpointStates
from mailsrv.webhook.outbox_store import Outbox, OutboxStore
from mailsrv.webhook.pg_outbox import (
    ClusterDisabledEndpoints,
    ClusterOutboxStore,
    OutboxClaimer,
    OutboxPart,
)
from mailsrv.webhook.relay_events import RelayEvents
from mailsrv.webhook.sender import WebhookSender
from mailsrv.webhook.sink import MaildirPaths, OutboxSink
from mailsrv.webhook.trust import TrustError

ENDPOINTS_DIR = "endpoints"
"""Where, under the outbox, disabled endpoints are remembered."""

WEBHOOK_SETTINGS = frozenset({"webhook_url", "webhook_secret", "webhooks"})
"""The settings that name the endpoints."""


@dataclass(frozen=True)
class Webhooks:
    """The webhook parts that the rest of the tree refers to."""

    store: Outbox
    states: EndpointStates
    sink: OutboxSink
    """The commit sink of the file outbox; with the outbox in the queue database it only
    makes the entries, which :attr:`part` writes in the queue's transaction."""
    dispatcher: WebhookDispatcher
    relay_events: RelayEvents
    """The relay scheduler's outcome listener (not listening while no endpoint wants relay
    outcomes)."""
    actions: OutboxActions
    control: dict[str, Handler]
    delivery: InProcessDelivery | WorkerDelivery
    part: OutboxPart | None = None
    """With the outbox in the queue database: its part of every commit transaction."""
    claimer: OutboxClaimer | None = None
    """With the outbox in the queue database: this node's claims and leases (a service)."""

    def reload_step(self, config: Config, changed: frozenset[str]) -> Callable[[], None] | None:
        """A reload's webhook part (a :data:`mailsrv.reload.ReloadStep`): the endpoints of
        ``config`` when they changed, their CA bundles read now (a bad one refuses the
        reload)."""
        if not changed & WEBHOOK_SETTINGS:
            return None
        endpoints = config.webhook_endpoints
        try:
            install_clients = self.delivery.renewed(endpoints)
        except TrustError as e:
            raise ConfigError(f"webhooks: ca_file: {e}") from None

        def install() -> None:
            install_clients()
            self.sink.reconfigure(endpoints)
            self.relay_events.reconfigure(endpoints)
            self.actions.reconfigure(endpoints)
            self.dispatcher.reconfigure(endpoints)

        return install


def open_stores(
    config: Config, run_in_thread: RunInThread, body_spares: SparePool | None = None
) -> tuple[OutboxStore, DisabledEndpoints]:
    """The outbox and the disabled-endpoint store of ``config``'s data directory."""
    store = OutboxStore(config.outbox_dir, run_in_thread, body_spares=body_spares)
    return store, DisabledEndpoints(config.outbox_dir / ENDPOINTS_DIR, run_in_thread)


def open_cluster_stores(
    config: Config, database: Database, clock: Any, run_in_thread: RunInThread
) -> tuple[ClusterOutboxStore, ClusterDisabledEndpoints]:
    """The outbox and the disabled endpoints in the queue database ``database``."""
    store = ClusterOutboxStore(
        database,
        config.queue_node_name,
        clock,
        run_in_thread,
        config.outbox_cache_dir,
        lease=config.queue_lease,
    )
    return store, ClusterDisabledEndpoints(database)


def build_webhooks(
    config: Config,
    reactor: Any,
    run_in_thread: RunInThread,
    run_in_worker: RunInThread | None,
    maildir_paths: MaildirPaths,
    metrics: Metrics | None = None,
    body_spares: SparePool | None = None,
    queue_database: Database | None = None,
) -> Webhooks:
    """Every webhook part for ``config``: ``run_in_thread`` does the outbox's file work;
    ``run_in_worker`` (:meth:`mailsrv.processes.ProcessPoolService.run`) makes whole attempts
    in worker processes, or, if None, payloads are parsed in threads and POSTed from this
    reactor.  With ``queue_database`` (``queue_url``), the outbox is in that database, shared
    with the other nodes."""
    endpoints = config.webhook_endpoints
    store: OutboxStore | ClusterOutboxStore
    states: DisabledEndpoints | ClusterDisabledEndpoints
    if queue_database is not None:
        store, states = open_cluster_stores(config, queue_database, reactor, run_in_thread)
    else:
        store, states = open_stores(config, run_in_thread, body_spares)
    loaded = store.load_now()
    disabled = states.load_now()
    delivery: InProcessDelivery | WorkerDelivery
    if run_in_worker is not None:
        delivery = WorkerDelivery(run_in_worker, store.body_path, reactor)
        delivery.renewed(endpoints)  # the CA bundles are read once at start: a bad one stops it
    else:
        sender = WebhookSender(reactor)
        for endpoint in endpoints:
            sender.prepare(endpoint)
        delivery = InProcessDelivery(sender, PayloadBuilder(store, run_in_thread))
    dispatcher = WebhookDispatcher(
        store,
        states,
        endpoints,
        delivery,
        reactor,
        random.SystemRandom(),
        loaded=loaded,
        disabled=disabled,
        stop_grace=config.shutdown_grace,
        metrics=metrics,
    )
    file_store = store if isinstance(store, OutboxStore) else None
    sink = OutboxSink(file_store, endpoints, maildir_paths)
    sink.listen(dispatcher.added)
    relay_events = RelayEvents(store, endpoints, dispatcher.added, reactor)
    actions = OutboxActions(store, states, endpoints, reactor, dispatcher)
    part = claimer = None
    if isinstance(store, ClusterOutboxStore) and isinstance(states, ClusterDisabledEndpoints):
        part = OutboxPart(store, sink)
        claimer = OutboxClaimer(store, states, dispatcher, reactor, poll=config.queue_poll)
    return Webhooks(
        store,
        states,
        sink,
        dispatcher,
        relay_events,
        actions,
        handlers(actions),
        delivery,
        part,
        claimer,
    )
