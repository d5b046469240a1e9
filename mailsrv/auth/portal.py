"""The one cred Portal every listener shares, and the service that opens the user store."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailsrv.auth.checker import AccountChecker
from mailsrv.auth.factory import describe_error
from mailsrv.auth.passwords import PasswordHasher
from mailsrv.auth.realm import MailRealm
from mailsrv.auth.store import IUserStore
from mailsrv.delivery.spool import RunInThread

_log = Logger(namespace="mailsrv.auth")


def build_portal(
    store: IUserStore, hasher: PasswordHasher, run_in_thread: RunInThread, clock: IReactorTime
) -> Portal:
    """A Portal whose realm hands out Sender avatars: anonymous, or an account after AUTH."""
    checker = AccountChecker(store, hasher, run_in_thread, clock)
    return Portal(MailRealm(store), [checker, AllowAnonymousAccess()])


class UserStoreService(Service):
    """Opens a store (the user store; the shared queue's database) on start, applying its
    migrations, and closes it on stop; a store that cannot be opened stops the server."""

    def __init__(
        self, store: Any, on_failure: Any, where: str = "", label: str = "user store"
    ) -> None:
        self.store = store
        self._on_failure = on_failure
        self._where = where
        self._label = label
        self.ready: Deferred[None] | None = None
        self.opened = False
        self.setName(label.replace(" ", "-"))

    def startService(self) -> None:
        super().startService()
        self.ready = maybeDeferred(self.store.open)
        self.ready.addCallbacks(self._opened, self._failed)

    def _opened(self, _: object) -> None:
        self.opened = True

    def _failed(self, failure: Any) -> None:
        _log.critical(
            "cannot open the {label} {store}: {error}",
            label=self._label,
            store=self._where,
            error=describe_error(failure.value),
        )
        self._on_failure()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return maybeDeferred(self.store.close)
