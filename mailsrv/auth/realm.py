"""The cred realm: who a session is, and so what it may do.

Every session has a :class:`Sender` avatar.  Anonymous (``login is None``): may deliver to local
recipients only.  Authenticated: may also send to other domains (once outbound relay exists),
and only from its own addresses unless the account may send as anyone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.cred.checkers import ANONYMOUS
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface, implementer

from mailsrv.auth.store import IUserStore
from mailsrv.identity import InvalidAddress, canonical_address


class ISender(Interface):
    """The avatar interface: the identity a session sends mail as."""

    login = Attribute("The account's login, or None for an anonymous client")

    def may_send_as(address: str | None) -> bool:
        """Whether MAIL FROM:<address> is allowed for this identity."""


@implementer(ISender)
@dataclass(frozen=True)
class Sender:
    """A session's identity (see the module docstring)."""

    login: str | None
    addresses: frozenset[str] = frozenset()
    send_as_any: bool = False

    @property
    def authenticated(self) -> bool:
        """True after a successful AUTH."""
        return self.login is not None

    def may_send_as(self, address: str | None) -> bool:
        """Anonymous clients and send-as-any accounts may use any sender; others their own.

        ``address`` is compared in canonical form (``mailsrv.identity``), as the store keeps it.
        """
        if self.login is None or self.send_as_any or address is None:
            return True
        try:
            return canonical_address(address) in self.addresses
        except InvalidAddress:
            return False


ANONYMOUS_SENDER = Sender(None)


def _logout() -> None:
    """Nothing to release when a session ends."""


@implementer(IRealm)
class MailRealm:
    """Hands out :class:`Sender` avatars; accounts come from the user store."""

    def __init__(self, store: IUserStore | None) -> None:
        self._store = store

    def requestAvatar(self, avatarId: Any, mind: object, *interfaces: Any) -> Any:
        if ISender not in interfaces:
            raise NotImplementedError("mailsrv only hands out ISender avatars")
        if avatarId is ANONYMOUS or self._store is None:
            return (ISender, ANONYMOUS_SENDER, _logout)
        login = avatarId.decode() if isinstance(avatarId, bytes) else str(avatarId)
        found: Deferred[Any] = self._store.get_account(login)

        def build(account: Any) -> tuple[Any, Sender, Any]:
            if account is None:
                raise LookupError(f"account {login} vanished during login")
            sender = Sender(account.login, frozenset(account.addresses), account.send_as_any)
            return (ISender, sender, _logout)

        return found.addCallback(build)
