"""The composition root: ``twistd mailsrv`` options and the service tree.

This is the only module that touches the global reactor; everything below it receives the
reactor (as clock, thread runner, TCP listener) and the :class:`~mailsrv.config.Config`.
"""

from __future__ import annotations

import atexit
import functools
import os
import random
import resource
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import inlineCallbacks
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from mailsrv import __version__
from mailsrv.auth.portal import UserStoreService, build_portal
from mailsrv.auth.store import IUserStore
from mailsrv.config import (
    SETTINGS,
    Config,
    ConfigError,
    display_path,
    env_name,
    flag_name,
    load,
)
from mailsrv.delivery.committer import GroupCommitter
from mailsrv.delivery.fssync import filesystem_syncer
from mailsrv.delivery.maildir import MaildirSink, MaildirStore
from mailsrv.delivery.sinks import ICommitSink
from mailsrv.dkim.keys import KeyDirectory
from mailsrv.dkim.signer import DkimSigner
from mailsrv.dns import ServerResolver, dns_servers_of
from mailsrv.filemodes import warn_loose_modes
from mailsrv.jsonstore.spares import SparePool
from mailsrv.logsetup import LevelFilter, ReopenableLogFile, make_observer
from mailsrv.mailauth.inbound import InboundChecks
from mailsrv.mailauth.policy import InboundPolicy
from mailsrv.mailauth.verifier import Verifier
from mailsrv.ops import readiness
from mailsrv.ops.http import OpsHTTPService, OpsResource
from mailsrv.ops.metrics import Metrics
from mailsrv.preflight import Checked, PreflightError, check
from mailsrv.processes import ProcessPoolService
from mailsrv.relay.actions import StoreActions
from mailsrv.relay.bounces import DsnSubmitter
from mailsrv.relay.control import QueueControlService, socket_path_problem
from mailsrv.relay.local_success import LocalSuccessSink
from mailsrv.relay.pg_queue import (
    ClusterClaimer,
    ClusterQueueSink,
    ClusterQueueStore,
    CommitConnection,
    open_queue_database,
    queue_listener,
)
from mailsrv.relay.queue_lock import QueueBusy, QueueLock
from mailsrv.relay.queue_store import FileQueueStore, IQueueStore
from mailsrv.relay.service import build_relay
from mailsrv.relay.sink import QueueSink
from mailsrv.reload import ConfigReloader, ReloadStep
from mailsrv.screening.dnsbl import DnsblChecker
from mailsrv.screening.expiry import GreylistExpiry
from mailsrv.screening.greylist import Greylist, IGreylistStore
from mailsrv.smtp.listeners import SMTPListenerService
from mailsrv.smtp.policy import RecipientPolicy
from mailsrv.smtp.server import SMTPServer
from mailsrv.startup import StartupSummary
from mailsrv.threads import ThreadPoolService
from mailsrv.tls import CertificateWatcher, ReloadingServerTLS
from mailsrv.webhook.pg_outbox import outbox_listener
from mailsrv.webhook.service import build_webhooks

_log = Logger(namespace="mailsrv")


class Options(usage.Options):
    """``twistd mailsrv`` flags: ``--config`` plus one flag per setting (overrides everything)."""

    synopsis = "[options]"
    longdesc = (
        "Runs the mailsrv ESMTP server.  Settings come from defaults, then the config file "
        "(--config or $SMTP_CONFIG), then SMTP_* environment variables, then these flags."
    )
    optParameters = [
        ["config", "c", None, "TOML config file (default: $SMTP_CONFIG)"],
        *[
            [flag_name(key), None, None, f"{spec.metadata['doc']} [{env_name(key)}]"]
            for key, spec in SETTINGS.items()
        ],
    ]

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"mailsrv {__version__}")
        raise SystemExit(0)

    def flags(self) -> dict[str, object]:
        """The settings given as flags, keyed by setting name."""
        return {key: self[flag_name(key)] for key in SETTINGS}


class MailService(MultiService):
    """The root service: stops its children one by one, last started first.

    Ordered stop matters: the SMTP listener must finish draining sessions (which still commit
    messages through the I/O threads) before the thread pool stops.
    """

    def __init__(
        self, config: Config, reactor: Any = None, log_stream: ReopenableLogFile | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self._reactor = reactor
        self._log_stream = log_stream
        self.log_levels = LevelFilter(config.log_level)
        self.failed = False
        self.setName("mailsrv")

    def fail(self) -> None:
        """Stop, and make the process exit with status 1 (see :func:`exit_status_hook`)."""
        self.failed = True
        if self._reactor is not None and self._reactor.running:
            self._reactor.stop()

    def reload_step(self, config: Config, changed: frozenset[str]) -> Callable[[], None] | None:
        """A reload's log part (a :data:`mailsrv.reload.ReloadStep`): the new ``log_level``."""
        if "log_level" not in changed:
            return None
        return functools.partial(self.log_levels.set, config.log_level)

    def flush_logs(self) -> None:
        """Flush the log stream (before an exit that skips Python's own flushing)."""
        if self._log_stream is not None:
            self._log_stream.flush()

    def setServiceParent(self, parent: Any) -> None:
        # twistd asks the application for its log observer after makeService; give it ours.
        if hasattr(parent, "setComponent"):
            call_later = self._reactor.callLater if self._reactor is not None else None
            observer = make_observer(
                self.log_levels, self.config.log_format, self._log_stream, call_later
            )
            parent.setComponent(ILogObserver, observer)
        super().setServiceParent(parent)

    @inlineCallbacks
    def stopService(self) -> Any:
        Service.stopService(self)
        for child in reversed(list(self)):
            try:
                yield child.stopService()
            except Exception:
                _log.failure("error stopping {service}", service=child.name)
        _log.info("mailsrv stopped")
        # Reactor-thread log lines are flushed at the end of a reactor turn; the shutdown may
        # end before the next one.
        (self._log_stream or sys.stdout).flush()


def raise_file_limit(wanted: int) -> None:
    """Raise the open-file soft limit towards ``wanted`` (each session is one descriptor)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, wanted)) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def build_service(
    config: Config,
    reactor: Any,
    checked: Checked,
    reload_config: Callable[[Sequence[ReloadStep]], ConfigReloader] | None = None,
) -> MailService:
    """Compose the service tree for ``config`` on ``reactor`` (SystemExit on a bad setup).

    ``checked`` comes from :func:`mailsrv.preflight.check`: the TLS pair and the hasher it
    built, and what it found in the user store.
    """
    from mailsrv.auth.account_identity import AccountIdentities
    from mailsrv.auth.factory import open_user_store, store_location

    reload_hooks: list[Any] = []
    log_stream = None
    if config.log_file:
        try:
            log_stream = ReopenableLogFile(config.log_file)
        except OSError as e:
            raise SystemExit(f"mailsrv: log_file: {config.log_file}: {e.strerror}") from None
        reload_hooks.append(log_stream.reopen)
    root = MailService(config, reactor, log_stream)
    metrics = Metrics(process=True)
    resolver = ServerResolver(reactor, dns_servers_of(config))  # every DNS user shares it
    threads = ThreadPoolService(reactor, "mailsrv-io", config.io_threads)
    threads.setServiceParent(root)
    # Bodies the queue and the outbox were the last to hold become the next spool files'
    # inodes (mailsrv.jsonstore.spares): no inode freed and allocated per relayed message.
    body_spares = SparePool(config.spool_dir, empty_on_keep=True)
    queue_lock = take_queue(config)
    cluster: ClusterQueueStore | None = None
    queue_store: IQueueStore
    if config.queue_url:
        cluster = cluster_queue(config, reactor, threads.run)
        UserStoreService(
            cluster, root.fail, "(queue_url)", label="queue database"
        ).setServiceParent(root)
        queue_store = cluster
    else:
        queue_store = FileQueueStore(config.queue_dir, threads.run, body_spares=body_spares)
    hash_threads = ThreadPoolService(
        reactor,
        "mailsrv-hash",
        config.auth_hash_threads,
        max_pending=config.auth_hash_threads + config.auth_hash_queue,
        nice=10,  # hashing takes the CPU the reactor leaves, not the reactor's share
    )
    hash_threads.setServiceParent(root)
    store = open_user_store(config, reactor)
    store_service = UserStoreService(store, root.fail, store_location(config))
    store_service.setServiceParent(root)
    portal = build_portal(store, checked.hasher, hash_threads.run, reactor)
    tls = checked.tls
    if tls is not None:
        CertificateWatcher(tls, reactor, config.tls_reload_interval).setServiceParent(root)
        reload_hooks.append(tls.reload)
        metrics.before_scrape(functools.partial(export_certificate_expiry, tls, metrics))
    policy = RecipientPolicy(config, store)
    maildir_sink = MaildirSink(MaildirStore(config.mail_dir, config.server_name))
    local_success = LocalSuccessSink()
    # Webhook attempts are made whole in worker processes (started with the first event): the
    # email package's pure-Python parsing and the HTTP client use the other cores, not the
    # reactor's GIL (mailsrv.webhook.delivery).
    webhook_workers = ProcessPoolService(
        reactor, "mailsrv-webhook", 2, stop_grace=config.shutdown_grace
    )
    webhook_workers.setServiceParent(root)
    webhooks = build_webhooks(
        config,
        reactor,
        threads.run,
        webhook_workers.run,
        maildir_sink.delivered,
        metrics,
        body_spares=body_spares,
        queue_database=cluster.database if cluster is not None else None,
    )
    queue_sink: ClusterQueueSink | QueueSink
    sinks: list[ICommitSink]
    if cluster is not None:
        # The outbox's rows commit in the queue's transaction (mailsrv.webhook.pg_outbox).
        queue_sink = ClusterQueueSink(cluster, [webhooks.part] if webhooks.part else [])
        sinks = [maildir_sink, queue_sink, local_success]
    else:
        queue_sink = QueueSink(queue_store)
        sinks = [maildir_sink, queue_sink, local_success, webhooks.sink]
    sync = filesystem_syncer(config.spool_dir, config.mail_dir, config.queue_dir, config.outbox_dir)
    # DKIM signing runs in worker processes too: dkimpy's RSA is pure Python (mailsrv.dkim.signer).
    signing_workers = ProcessPoolService(reactor, "mailsrv-dkim-sign", 2)
    signing_workers.setServiceParent(root)
    signer = DkimSigner(
        KeyDirectory(config.dkim_dir), checked.dkim, threads.run, signing_workers.run
    )
    signer.setServiceParent(root)
    reload_hooks.append(signer.reload)
    committer = GroupCommitter(reactor, sinks, sync, metrics, preparers=[signer])
    committer.setServiceParent(root)
    server = SMTPServer(
        config,
        reactor,
        threads.run,
        committer,
        policy=policy,
        tls=tls,
        portal=portal,
        relay=True,
        identities=AccountIdentities(store),
        metrics=metrics,
        dnsbl=DnsblChecker(resolver, reactor),
        greylist=Greylist(IGreylistStore(store)),
        inbound=inbound_checks(config, reactor, resolver, root),
        spool_spares=body_spares,
    )
    GreylistExpiry(server, reactor).setServiceParent(root)
    bounces = DsnSubmitter(
        server,
        queue_store.body_path,
        threads.run,
        config.relay_bounce_size_limit,
        config.relay_queue_lifetime,
    )
    local_success.report_with(bounces.delivered)
    relay = build_relay(
        config, reactor, threads.run, queue_store, bounces, metrics, resolver=resolver
    )
    queue_sink.listen(relay.scheduler.queued)
    relay.scheduler.outcome_listener = webhooks.relay_events
    if cluster is not None:
        # Before the scheduler: it stops after it, releasing leases once nothing is in flight.
        claimer = ClusterClaimer(cluster, relay.scheduler, reactor, poll=config.queue_poll)
        claimer.setServiceParent(root)
        queue_listener(cluster.database.dsn, reactor, claimer.notified).setServiceParent(root)
    relay.scheduler.setServiceParent(root)
    if cluster is not None and webhooks.claimer is not None:
        # Before the dispatcher, for the same reason as the relay's claimer.
        webhooks.claimer.setServiceParent(root)
        outbox_listener(cluster.database.dsn, reactor, webhooks.claimer.notified).setServiceParent(
            root
        )
    webhooks.dispatcher.setServiceParent(root)
    actions = StoreActions(queue_store, reactor, threads.run, relay.scheduler)
    control = QueueControlService(
        config.queue_socket,
        actions,
        reactor,
        queue_lock,
        more={**webhooks.control, **signer.control},
    )
    control.setServiceParent(root)
    warn_loose_modes(config)
    try:
        stale = server.spool.prepare()
    except OSError as e:
        raise SystemExit(f"mailsrv: data_dir: {describe_os_error(e)}") from None
    if stale:
        _log.warn("removed {count} unacknowledged spool file(s)", count=stale)
    wanted = {"mx": config.port, "submission": config.submission_port}
    if tls is not None:
        wanted["smtps"] = config.smtps_port
    ports = {name: port for name, port in wanted.items() if port}
    smtp = SMTPListenerService(reactor, server, ports)
    smtp.setServiceParent(root)
    StartupSummary(config, checked.store, store_service, smtp).setServiceParent(root)
    if config.metrics_port:
        ops_http(config, reactor, metrics, threads, smtp, store, cluster).setServiceParent(root)
    if reload_config is not None:  # SIGHUP also re-reads the configuration (mailsrv.reload)
        steps = [
            root.reload_step,
            resolver.reload_step,
            server.reload_step,
            relay.reload_step,
            webhooks.reload_step,
        ]
        reload_hooks.append(reload_config(steps))
    if reload_hooks:
        install_reload_signal(reload_hooks, reactor)
    return root


def inbound_checks(
    config: Config, reactor: Any, resolver: ServerResolver, root: MailService
) -> InboundChecks | None:
    """SPF/DKIM/DMARC/ARC of MX mail (``auth_checks``), its verifier started with ``root``
    (before the listeners, so it stops after them)."""
    if not config.auth_checks or not config.port:
        return None
    verifier = Verifier(reactor, resolver, config.auth_check_threads)
    verifier.setServiceParent(root)
    policy = InboundPolicy(config.dmarc_enforce, config.spf_reject_fail, random.SystemRandom())
    return InboundChecks(verifier, policy, config.server_name, config.auth_check_timeout)


def export_certificate_expiry(tls: ReloadingServerTLS, metrics: Metrics) -> None:
    """Set the certificate-expiry gauge from the certificate in use (at each scrape)."""
    metrics.tls_certificate_expiry.set(tls.expires_at or 0)


def ops_http(
    config: Config,
    reactor: Any,
    metrics: Metrics,
    threads: ThreadPoolService,
    smtp: SMTPListenerService,
    store: IUserStore,
    cluster: ClusterQueueStore | None = None,
) -> OpsHTTPService:
    """The ops HTTP listener (/metrics, /healthz, /readyz) and its readiness checks (with a
    shared queue, its database too)."""
    checks = {
        "listeners": readiness.listeners_bound(smtp.unbound),
        "user_store": readiness.user_store(store.schema_version, reactor),
        "data_dir_writable": readiness.data_dir_writable(threads.run, config.data_dir),
        "data_dir_free_space": readiness.free_space(
            threads.run, config.data_dir, config.ready_min_free_bytes
        ),
    }
    if cluster is not None:
        checks["queue_database"] = readiness.user_store(cluster.schema_version, reactor)
    resource = OpsResource(metrics, threads.run, checks, config.metrics_token)
    return OpsHTTPService(
        reactor, config.metrics_host, config.metrics_port, resource, bool(config.metrics_token)
    )


def cluster_queue(config: Config, reactor: Any, run_in_thread: Any) -> ClusterQueueStore:
    """The relay queue in the PostgreSQL database ``queue_url``, shared with other nodes."""
    return ClusterQueueStore(
        open_queue_database(config.queue_url, reactor),
        CommitConnection(config.queue_url, reactor, config.queue_statement_timeout),
        config.queue_node_name,
        reactor,
        run_in_thread,
        config.queue_cache_dir,
        lease=config.queue_lease,
    )


def take_queue(config: Config) -> QueueLock:
    """Take the queue directory for this server (SystemExit with one line if another server
    has it, or the control socket's path cannot be used)."""
    problem = socket_path_problem(config.queue_socket)
    if problem:
        raise SystemExit(f"mailsrv: {problem}")
    lock = QueueLock(config.queue_dir)
    try:
        lock.acquire()
    except QueueBusy as e:
        raise SystemExit(f"mailsrv: {e}") from None
    except OSError as e:
        raise SystemExit(f"mailsrv: queue {config.queue_dir}: {e.strerror}") from None
    return lock


def describe_os_error(error: OSError) -> str:
    """``path: strerror`` for an OSError, paths shown as :func:`display_path` shows them."""
    where = f"{display_path(str(error.filename))}: " if error.filename else ""
    return f"{where}{error.strerror or error}"


def exit_status_hook(root: MailService) -> None:
    """At exit, turn a failed run into exit status 1.

    twistd returns normally once the reactor has stopped, whatever stopped it, so a store that
    cannot be opened would otherwise end with status 0 and a supervisor would not restart us.
    Registered with ``atexit`` when the tree is built, so it runs after twistd has removed its
    pid file and after the handlers registered later; the streams are flushed first.
    """
    if not root.failed:
        return
    root.flush_logs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(1)


def install_reload_signal(hooks: list[Any], reactor: Any) -> None:
    """SIGHUP runs ``hooks`` in the reactor thread: reload the TLS certificate, reopen the log,
    re-read the configuration."""

    def reload_all() -> None:
        for hook in hooks:
            try:
                hook()
            except Exception:
                _log.failure("SIGHUP reload failed")

    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(reload_all)

    signal.signal(signal.SIGHUP, handler)


def makeService(options: Options) -> MailService:
    """twistd entry point: merge the configuration and build the tree (exit on bad config)."""
    from twisted.internet import reactor

    try:
        config = load(options["config"], os.environ, options.flags())
        checked = check(config)
    except (ConfigError, PreflightError) as e:
        raise SystemExit(f"mailsrv: {e}") from None
    raise_file_limit(config.max_connections * 2 + 256)
    flags = options.flags()

    def reloader(steps: Sequence[ReloadStep]) -> ConfigReloader:
        return ConfigReloader(config, steps, options["config"], os.environ, flags)

    root = build_service(config, reactor, checked, reloader)
    atexit.register(exit_status_hook, root)
    return root
