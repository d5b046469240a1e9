"""The user store contract: accounts and aliases, the same behaviour on SQLite and PostgreSQL.

Every method returns a Deferred and never blocks the reactor.  Addresses and logins are stored
in canonical form (``mailsrv.identity``: NFC, lower-cased, IDN domains as A-labels).  An alias
maps one address to one account; an account also receives mail for its own login address.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import Deferred
from zope.interface import Interface


class StoreError(Exception):
    """A user-store operation was refused; the message is one line for the operator."""


class DuplicateAccount(StoreError):
    """The login or address is already taken."""


class UnknownAccount(StoreError):
    """No such account or alias."""


@dataclass(frozen=True)
class Account:
    """One user account."""

    login: str
    password_hash: str
    cram_md5: str | None
    enabled: bool
    send_as_any: bool
    aliases: tuple[str, ...]
    created: float
    updated: float

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address this account owns: its login and its aliases."""
        return (self.login, *self.aliases)


class IUserStore(Interface):
    """Accounts and aliases (see the module docstring)."""

    def open() -> Deferred[None]:
        """Connect and apply pending schema migrations."""

    def schema_version() -> Deferred[int]:
        """The recorded schema version: one cheap query (diagnostics, and the readiness check
        of the ops listener, which only needs the store to answer)."""

    def close() -> Deferred[None]:
        """Release connections and threads."""

    def get_account(login: str) -> Deferred[Account | None]:
        """The account with this login, or None."""

    def find_owner(address: str) -> Deferred[Account | None]:
        """The account receiving mail for ``address`` (its login or one of its aliases)."""

    def add_account(
        login: str, password_hash: str, cram_md5: str | None, send_as_any: bool, now: float
    ) -> Deferred[Account]:
        """Create an enabled account; DuplicateAccount if the login or an alias has it."""

    def delete_account(login: str) -> Deferred[None]:
        """Remove an account and its aliases; UnknownAccount if absent."""

    def set_password(
        login: str, password_hash: str, cram_md5: str | None, now: float
    ) -> Deferred[None]:
        """Replace the password hash and CRAM-MD5 context; UnknownAccount if absent."""

    def replace_hash(login: str, old_hash: str, new_hash: str, now: float) -> Deferred[bool]:
        """Upgrade a hash only if it is still ``old_hash`` (rehash on login); True if changed."""

    def set_enabled(login: str, enabled: bool, now: float) -> Deferred[None]:
        """Enable or disable an account; UnknownAccount if absent."""

    def set_send_as_any(login: str, allowed: bool, now: float) -> Deferred[None]:
        """Allow or forbid sending as addresses the account does not own."""

    def list_accounts() -> Deferred[list[Account]]:
        """Every account, ordered by login."""

    def add_alias(address: str, login: str, now: float) -> Deferred[None]:
        """Make ``address`` deliver to ``login``; DuplicateAccount if the address is taken,
        UnknownAccount if the account is absent."""

    def remove_alias(address: str) -> Deferred[None]:
        """Remove an alias; UnknownAccount if absent."""

    def list_aliases() -> Deferred[list[tuple[str, str]]]:
        """Every ``(alias, login)`` pair, ordered by alias."""
