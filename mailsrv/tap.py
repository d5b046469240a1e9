"""The composition root: ``twistd mailsrv`` options and the service tree.

This is the only module that touches the global reactor; everything below it receives the
reactor (as clock, thread runner, TCP listener) and the :class:`~mailsrv.config.Config`.
"""

from __future__ import annotations

import os
import resource
import signal
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import inlineCallbacks
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from mailsrv import __version__
from mailsrv.auth.portal import UserStoreService, build_portal
from mailsrv.config import SETTINGS, Config, ConfigError, env_name, flag_name, load
from mailsrv.delivery.committer import GroupCommitter, filesystem_syncer
from mailsrv.logsetup import ReopenableLogFile, make_observer
from mailsrv.smtp.listeners import SMTPListenerService
from mailsrv.smtp.policy import RecipientPolicy
from mailsrv.smtp.server import SMTPServer
from mailsrv.threads import ThreadPoolService
from mailsrv.tls import CertificateWatcher, ReloadingServerTLS, TLSConfigError

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
        self.setName("mailsrv")

    def setServiceParent(self, parent: Any) -> None:
        # twistd asks the application for its log observer after makeService; give it ours.
        if hasattr(parent, "setComponent"):
            call_later = self._reactor.callLater if self._reactor is not None else None
            observer = make_observer(
                self.config.log_level, self.config.log_format, self._log_stream, call_later
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


def raise_file_limit(wanted: int) -> None:
    """Raise the open-file soft limit towards ``wanted`` (each session is one descriptor)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, wanted)) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def build_service(config: Config, reactor: Any) -> MailService:
    """Compose the service tree for ``config`` on ``reactor`` (SystemExit on a bad setup)."""
    from mailsrv.auth.factory import make_hasher, open_user_store
    from mailsrv.auth.identity import AccountIdentities

    reload_hooks: list[Any] = []
    log_stream = None
    if config.log_file:
        try:
            log_stream = ReopenableLogFile(config.log_file)
        except OSError as e:
            raise SystemExit(f"mailsrv: log_file: {config.log_file}: {e.strerror}") from None
        reload_hooks.append(log_stream.reopen)
    root = MailService(config, reactor, log_stream)
    threads = ThreadPoolService(reactor, "mailsrv-io", config.io_threads)
    threads.setServiceParent(root)
    hash_threads = ThreadPoolService(
        reactor,
        "mailsrv-hash",
        config.auth_hash_threads,
        max_pending=config.auth_hash_threads + config.auth_hash_queue,
        nice=10,  # hashing takes the CPU the reactor leaves, not the reactor's share
    )
    hash_threads.setServiceParent(root)
    store = open_user_store(config, reactor)
    UserStoreService(store, on_failure=lambda: _stop(reactor)).setServiceParent(root)
    portal = build_portal(store, make_hasher(config), hash_threads.run, reactor)
    tls = None
    if config.enable_tls:
        try:
            tls = ReloadingServerTLS(config.tls_cert, config.tls_key)
        except TLSConfigError as e:
            raise SystemExit(f"mailsrv: {e}") from None
        CertificateWatcher(tls, reactor, config.tls_reload_interval).setServiceParent(root)
        reload_hooks.append(tls.reload)
    policy = RecipientPolicy(config, store)
    server = SMTPServer(
        config,
        reactor,
        threads.run,
        policy=policy,
        tls=tls,
        portal=portal,
        identities=AccountIdentities(store),
    )
    server.committer = GroupCommitter(reactor, server.store, filesystem_syncer(config.spool_dir))
    server.committer.setServiceParent(root)
    stale = server.spool.prepare()
    if stale:
        _log.warn("removed {count} unacknowledged spool file(s)", count=stale)
    wanted = {"mx": config.port, "submission": config.submission_port}
    if tls is not None:
        wanted["smtps"] = config.smtps_port
    ports = {name: port for name, port in wanted.items() if port}
    SMTPListenerService(reactor, server, ports).setServiceParent(root)
    if reload_hooks:
        install_reload_signal(reload_hooks, reactor)
    return root


def _stop(reactor: Any) -> None:
    if reactor.running:
        reactor.stop()


def install_reload_signal(hooks: list[Any], reactor: Any) -> None:
    """SIGHUP runs ``hooks`` in the reactor thread: reload the TLS certificate, reopen the log."""

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
    except ConfigError as e:
        raise SystemExit(f"mailsrv: {e}") from None
    raise_file_limit(config.max_connections * 2 + 256)
    return build_service(config, reactor)
