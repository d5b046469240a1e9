"""The start-up summary: one log line saying where mail goes and what is on, once ready.

Logged when the user store has opened (so "ready" is true), after the listeners bound their
ports: the data directory, the local domains, how many mailboxes the configuration declares and
how many accounts the store holds, whether TLS and AUTH are on, and each listener with its
address.  This line is where the listeners are announced (Twisted's own "... starting on"
lines are filtered out in :mod:`mailsrv.logsetup`).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from mailsrv import __version__
from mailsrv.auth.portal import UserStoreService
from mailsrv.config import Config
from mailsrv.preflight import StoreFacts
from mailsrv.smtp.listeners import SMTPListenerService

_log = Logger(namespace="mailsrv")


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def listener_addresses(listening: dict[str, Any]) -> dict[str, str]:
    """``{"mx": "[::]:2525", ...}`` for listening ports (``IListeningPort`` values)."""
    addresses = {}
    for name, port in listening.items():
        host = port.getHost()
        addresses[name] = f"[{host.host}]:{host.port}"
    return addresses


class StartupSummary(Service):
    """Logs the summary once ``store_service`` has opened the store; start it after the store
    and the listeners."""

    def __init__(
        self,
        config: Config,
        store: StoreFacts,
        store_service: UserStoreService,
        smtp: SMTPListenerService,
    ) -> None:
        self.config = config
        self.store = store
        self._store_service = store_service
        self._smtp = smtp
        self.setName("startup-summary")

    def startService(self) -> None:
        super().startService()
        ready = self._store_service.ready
        if ready is not None:
            ready.addCallback(self._store_done)

    def _store_done(self, _: object) -> None:
        if self._store_service.opened:
            self.log_summary()

    def log_summary(self) -> None:
        """Log the line."""
        config = self.config
        listeners = listener_addresses(self._smtp.listening)
        _log.info(
            "mailsrv {version} ready: mail for {local_domains} in {data_dir};"
            " {mailboxes} mailbox(es) configured, {accounts} account(s) in {store};"
            " TLS {tls}, AUTH {auth}; listening: {listening}",
            version=__version__,
            local_domains=",".join(config.local_domains),
            data_dir=config.data_dir,
            mailboxes=len(config.mailboxes),
            aliases=len(config.aliases),
            accounts=self.store.accounts or 0,
            store=self.store.location,
            tls=_on(config.enable_tls),
            auth=_on(config.enable_auth),
            listening=", ".join(f"{name} {address}" for name, address in listeners.items()),
            listeners=listeners,
        )
