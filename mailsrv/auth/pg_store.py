"""The user store on PostgreSQL, through :class:`mailsrv.pgsql.Database` (txpostgres:
asynchronous psycopg2, no threads; reconnecting connections, see that module).

Transactions: reads are single statements; every write is one transaction (txpostgres
``runInteraction``: BEGIN, the statements, COMMIT, or ROLLBACK on any error).  Writes that
create an address take a transaction-scoped advisory lock on it first, so "an address is a
login or an alias, never both" holds under concurrent writers.  Unique violations (23505)
become :class:`DuplicateAccount`.  Migrations run on open, serialised between openers by
``pg_advisory_xact_lock``.
"""

from __future__ import annotations

import functools
from typing import Any

import psycopg2
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mailsrv.auth import migrations as m
from mailsrv.auth.store import Account, IUserStore, StoreError
from mailsrv.pgsql import Database, unreachable
from mailsrv.screening import greylist

UNIQUE_VIOLATION = "23505"
FOREIGN_KEY_VIOLATION = "23503"
# First key of the two-key advisory locks taken on an address while it is being claimed.
_ADDRESS_LOCK_SPACE = 0x6D61696C  # "mail"

# Accounts with their aliases, one statement (one snapshot) each.
_ACCOUNT_QUERY = (
    "SELECT a.login, a.password_hash, a.cram_md5, a.enabled, a.send_as_any, a.created,"
    " a.updated, ARRAY(SELECT address FROM aliases WHERE aliases.login = a.login)"
    " FROM accounts a"
)
_ACCOUNT_BY_LOGIN = (
    "SELECT a.login, a.password_hash, a.cram_md5, a.enabled, a.send_as_any, a.created,"
    " a.updated, ARRAY(SELECT address FROM aliases WHERE aliases.login = a.login)"
    " FROM accounts a WHERE a.login = %s"
)
_ACCOUNT_BY_ADDRESS = (
    "SELECT a.login, a.password_hash, a.cram_md5, a.enabled, a.send_as_any, a.created,"
    " a.updated, ARRAY(SELECT address FROM aliases WHERE aliases.login = a.login)"
    " FROM accounts a"
    " WHERE a.login = %s OR a.login = (SELECT login FROM aliases WHERE address = %s)"
)


@implementer(IUserStore, greylist.IGreylistStore)
class PostgresUserStore(Database):
    """Accounts and aliases in PostgreSQL (``dsn``: a libpq URL or key=value string)."""

    def __init__(
        self, dsn: str, reactor: Any, pool_size: int = 3, reconnect_wait: float = 10.0
    ) -> None:
        super().__init__(
            dsn,
            reactor,
            m.apply_postgresql,
            "the user store",
            StoreError,
            pool_size,
            reconnect_wait,
        )

    def schema_version(self) -> Deferred[int]:
        """The recorded schema version (diagnostics, and the ops listener's readiness check).

        Unlike the other reads it does not wait for a lost connection to come back: with no
        live connection it fails at once with a StoreError that says so, so ``/readyz``
        answers 503 with the reason instead of waiting out its timeout.
        """
        sql = "SELECT max(version) FROM schema_version"
        d = Deferred.fromCoroutine(
            self._retrying(lambda pool: pool.runQuery(sql), idempotent=True, wait=0.0)
        )
        return d.addCallbacks(
            lambda rows: int(rows[0][0]) if rows and rows[0][0] else 0,
            functools.partial(unreachable, error=StoreError),
        )

    # --- reads ------------------------------------------------------------------------------

    def get_account(self, login: str) -> Deferred[Account | None]:
        key = m.lookup_key(login)
        if key is None:
            return succeed(None)
        return self.query(_ACCOUNT_BY_LOGIN, (key,)).addCallback(_first)

    def find_owner(self, address: str) -> Deferred[Account | None]:
        key = m.lookup_key(address)
        if key is None:
            return succeed(None)
        return self.query(_ACCOUNT_BY_ADDRESS, (key, key)).addCallback(_first)

    def list_accounts(self) -> Deferred[list[Account]]:
        def accounts(rows: list[Any]) -> list[Account]:
            found = [m.account_from_row(row[:7], tuple(sorted(row[7]))) for row in rows]
            return sorted(found, key=lambda account: account.login)

        return self.query(_ACCOUNT_QUERY).addCallback(accounts)

    def list_aliases(self) -> Deferred[list[tuple[str, str]]]:
        d = self.query("SELECT address, login FROM aliases")
        return d.addCallback(lambda rows: sorted((str(a), str(b)) for a, b in rows))

    # --- writes -----------------------------------------------------------------------------

    def add_account(
        self, login: str, password_hash: str, cram_md5: str | None, send_as_any: bool, now: float
    ) -> Deferred[Account]:
        try:
            key = m.new_address(login)
        except StoreError as e:
            return _failed(e)
        return self.transaction(_add_account, key, password_hash, cram_md5, send_as_any, now)

    def delete_account(self, login: str) -> Deferred[None]:
        key = _key_or_empty(login)
        # The aliases go with the account: ON DELETE CASCADE.
        return self.transaction(
            _update_one,
            "DELETE FROM accounts WHERE login = %s",
            (key,),
            m.no_such_user(key or login),
        )

    def set_password(
        self, login: str, password_hash: str, cram_md5: str | None, now: float
    ) -> Deferred[None]:
        key = _key_or_empty(login)
        return self.transaction(
            _update_one,
            "UPDATE accounts SET password_hash = %s, cram_md5 = %s, updated = %s WHERE login = %s",
            (password_hash, cram_md5, now, key),
            m.no_such_user(key or login),
        )

    def replace_hash(self, login: str, old_hash: str, new_hash: str, now: float) -> Deferred[bool]:
        return self.transaction(_replace_hash, _key_or_empty(login), old_hash, new_hash, now)

    def set_enabled(self, login: str, enabled: bool, now: float) -> Deferred[None]:
        key = _key_or_empty(login)
        return self.transaction(
            _update_one,
            "UPDATE accounts SET enabled = %s, updated = %s WHERE login = %s",
            (enabled, now, key),
            m.no_such_user(key or login),
        )

    def set_send_as_any(self, login: str, allowed: bool, now: float) -> Deferred[None]:
        key = _key_or_empty(login)
        return self.transaction(
            _update_one,
            "UPDATE accounts SET send_as_any = %s, updated = %s WHERE login = %s",
            (allowed, now, key),
            m.no_such_user(key or login),
        )

    def add_alias(self, address: str, login: str, now: float) -> Deferred[None]:
        try:
            key = m.new_address(address)
        except StoreError as e:
            return _failed(e)
        owner = _key_or_empty(login)
        return self.transaction(_add_alias, key, owner, m.no_such_user(owner or login), now)

    def remove_alias(self, address: str) -> Deferred[None]:
        key = _key_or_empty(address)
        return self.transaction(
            _update_one,
            "DELETE FROM aliases WHERE address = %s",
            (key,),
            m.no_such_alias(key or address),
        )

    # --- greylisting (mailsrv.screening.greylist) -------------------------------------------

    def greylist_attempt(
        self, key: str, now: float, delay: float, expiry: float, lifetime: float
    ) -> Deferred[greylist.Seen]:
        # One statement in autocommit: repeating it after a lost answer records one more
        # attempt of the same second, which changes no verdict.
        params = greylist.attempt_parameters(key, now, delay, expiry, lifetime)
        d = Deferred.fromCoroutine(
            self._retrying(
                lambda pool: pool.runQuery(greylist.ATTEMPT_POSTGRESQL, params), idempotent=True
            )
        )
        return d.addCallback(lambda rows: greylist.seen_from_row(tuple(rows[0])))

    def greylist_pass(self, key: str, now: float, lifetime: float) -> Deferred[None]:
        return self._operation(greylist.TRIPLET_PASSES_POSTGRESQL, (now + lifetime, key))

    def greylist_domain_passed(self, domain: str, now: float, lifetime: float) -> Deferred[None]:
        return self._operation(greylist.DOMAIN_PASSED_POSTGRESQL, (domain, now + lifetime))

    def greylist_domain_seen(self, domain: str, now: float) -> Deferred[bool]:
        rows = self.query(greylist.DOMAIN_SEEN_POSTGRESQL, (domain, now))
        return rows.addCallback(lambda found: bool(found))

    def greylist_expire(self, now: float) -> Deferred[int]:
        return self.transaction(_greylist_expire, now)

    def _operation(self, sql: str, params: tuple[Any, ...]) -> Deferred[None]:
        """A single statement in autocommit whose repetition changes nothing (so it is
        retried once after a reconnect, like a read)."""
        done = Deferred.fromCoroutine(
            self._retrying(lambda pool: pool.runOperation(sql, params), idempotent=True)
        )
        return done.addCallback(lambda _: None)


# --- helpers and transactions ------------------------------------------------------------------


def _failed(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d


def _key_or_empty(address: str) -> str:
    """The stored form of ``address``, or "" (which matches nothing) when it is invalid."""
    return m.lookup_key(address) or ""


def _first(rows: list[Any]) -> Account | None:
    if not rows:
        return None
    row = rows[0]
    return m.account_from_row(row[:7], tuple(sorted(row[7])))


async def _lock_address(cursor: Any, address: str) -> None:
    await cursor.execute(
        "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_ADDRESS_LOCK_SPACE, address)
    )


async def _alias_owner(cursor: Any, address: str) -> str | None:
    await cursor.execute("SELECT login FROM aliases WHERE address = %s", (address,))
    row = cursor.fetchone()
    return str(row[0]) if row else None


async def _login_exists(cursor: Any, login: str) -> bool:
    await cursor.execute("SELECT 1 FROM accounts WHERE login = %s", (login,))
    return cursor.fetchone() is not None


async def _add_account(
    cursor: Any, login: str, password_hash: str, cram_md5: str | None, send_as_any: bool, now: float
) -> Account:
    await _lock_address(cursor, login)
    if await _login_exists(cursor, login):
        raise m.user_exists(login)
    owner = await _alias_owner(cursor, login)
    if owner is not None:
        raise m.address_is_alias(login, owner)
    try:
        await cursor.execute(
            "INSERT INTO accounts (login, password_hash, cram_md5, enabled, send_as_any, created,"
            " updated) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (login, password_hash, cram_md5, True, send_as_any, now, now),
        )
    except psycopg2.IntegrityError as e:
        if e.pgcode == UNIQUE_VIOLATION:
            raise m.user_exists(login) from None
        raise
    return Account(login, password_hash, cram_md5, True, send_as_any, (), now, now)


async def _update_one(cursor: Any, sql: str, params: tuple[Any, ...], missing: Exception) -> None:
    await cursor.execute(sql, params)
    if cursor.rowcount != 1:
        raise missing


async def _replace_hash(cursor: Any, login: str, old_hash: str, new_hash: str, now: float) -> bool:
    await cursor.execute(
        "UPDATE accounts SET password_hash = %s, updated = %s"
        " WHERE login = %s AND password_hash = %s",
        (new_hash, now, login, old_hash),
    )
    return bool(cursor.rowcount == 1)


async def _add_alias(cursor: Any, address: str, login: str, missing: Exception, now: float) -> None:
    await _lock_address(cursor, address)
    if not await _login_exists(cursor, login):
        raise missing
    if await _login_exists(cursor, address):
        raise m.address_is_user(address)
    if await _alias_owner(cursor, address) is not None:
        raise m.alias_exists(address)
    try:
        await cursor.execute(
            "INSERT INTO aliases (address, login, created) VALUES (%s, %s, %s)",
            (address, login, now),
        )
    except psycopg2.IntegrityError as e:
        if e.pgcode == UNIQUE_VIOLATION:
            raise m.alias_exists(address) from None
        if e.pgcode == FOREIGN_KEY_VIOLATION:
            raise missing from None
        raise


async def _greylist_expire(cursor: Any, now: float) -> int:
    await cursor.execute(greylist.EXPIRE_POSTGRESQL, (now,))
    triplets = int(cursor.rowcount)
    await cursor.execute(greylist.EXPIRE_DOMAINS_POSTGRESQL, (now,))
    return triplets + int(cursor.rowcount)
