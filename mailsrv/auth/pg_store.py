"""The user store on PostgreSQL, through txpostgres (asynchronous psycopg2, no threads).

Reconnects: every pooled connection carries a dead-connection detector.  When PostgreSQL goes
away (restart, failover, a killed backend) the connection is marked dead and reconnects in the
background with a short backoff (0, 0.1, 0.2, 0.4 ... 5 s).  Queries prefer live connections.
A read that fails because its connection died is retried once, after waiting (up to
``reconnect_wait`` seconds) for a connection to come back.  A write is retried only when it
certainly never reached the server (the connection was already known to be dead); otherwise the
error goes to the caller, because a lost COMMIT reply leaves the outcome unknown.

Transactions: reads are single statements; every write is one transaction (txpostgres
``runInteraction``: BEGIN, the statements, COMMIT, or ROLLBACK on any error).  Writes that
create an address take a transaction-scoped advisory lock on it first, so "an address is a
login or an alias, never both" holds under concurrent writers.  Unique violations (23505)
become :class:`DuplicateAccount`.  Migrations run on open, serialised between openers by
``pg_advisory_xact_lock``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import psycopg2
from twisted.internet.defer import Deferred, FirstError, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import reconnection, txpostgres
from zope.interface import implementer

from mailsrv.auth import migrations as m
from mailsrv.auth.store import Account, IUserStore, StoreError
from mailsrv.screening import greylist

T = TypeVar("T")

_log = Logger(namespace="mailsrv.auth")

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


def _backoff() -> Iterator[float]:
    """Reconnection delays: at once, then doubling from 0.1 s up to 5 s, for ever."""
    yield 0.0
    delay = 0.1
    while True:
        yield delay
        delay = min(delay * 2, 5.0)


def is_connection_error(error: BaseException) -> bool:
    """True when ``error`` means the connection is unusable (not a problem with the query)."""
    if isinstance(error, reconnection.ConnectionDead | txpostgres.RollbackFailed):
        return True
    if isinstance(error, psycopg2.InterfaceError):
        return True
    if isinstance(error, psycopg2.OperationalError):
        code = error.pgcode or ""
        # No SQLSTATE: the socket broke.  08: connection exception.  57P0x: admin shutdown,
        # crash shutdown, cannot connect now (starting up).
        return not code or code.startswith("08") or code.startswith("57P")
    return False


def _never_sent(error: BaseException) -> bool:
    """True when the failed statement certainly never reached the server."""
    return isinstance(error, reconnection.ConnectionDead | psycopg2.InterfaceError)


class _Detector(reconnection.DeadConnectionDetector):  # type: ignore[misc]
    """Reconnects its connection with a short backoff; stoppable, so close() leaves no timers."""

    def __init__(self, reactor: Any, on_recovered: Callable[[], None]) -> None:
        super().__init__(deathChecker=self._is_dead, reconnectionIterator=_backoff, reactor=reactor)
        self._on_recovered = on_recovered
        self._stopped = False
        self._pending: IDelayedCall | None = None

    def _is_dead(self, failure: Failure) -> bool:
        return isinstance(failure.value, BaseException) and is_connection_error(failure.value)

    def startReconnecting(self, f: Failure) -> None:
        if self._stopped:
            return
        message = f.getErrorMessage().strip().splitlines()
        _log.warn(
            "PostgreSQL connection lost ({error}); reconnecting",
            error=message[0] if message else repr(f.value),
        )
        self._schedule(self.reconnectionIterator())

    def _schedule(self, delays: Iterator[float]) -> None:
        if not self._stopped:
            self._pending = self.reactor.callLater(next(delays), self._attempt, delays)

    def _attempt(self, delays: Iterator[float]) -> None:
        self._pending = None
        if self._stopped:
            return
        d = Deferred.fromCoroutine(self._reconnect())
        d.addCallbacks(self._reconnected, lambda _: self._schedule(delays))

    async def _reconnect(self) -> None:
        await self.reconnect()

    def _reconnected(self, _: object) -> None:
        if self._stopped:
            self.reconnectable.close()
            return
        _log.info("PostgreSQL connection re-established")
        self.connectionRecovered()
        self._on_recovered()

    def stop(self) -> None:
        """No more reconnection attempts."""
        self._stopped = True
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None


class _Connection(txpostgres.Connection):  # type: ignore[misc]
    """A connection that reports a server-side disconnect while idle to its detector quietly."""

    def doRead(self) -> object:
        try:
            return super().doRead()
        except psycopg2.Error as e:
            # The server closed an idle connection (restart, pg_terminate_backend).  Returning
            # the error makes the reactor call connectionLost (-> the detector reconnects)
            # instead of logging an "Unhandled Error" traceback.
            return e

    def is_live(self) -> bool:
        conn = self._connection
        return conn is not None and not conn.closed and not self.detector.connectionIsDead

    def close(self) -> None:
        if self._connection is not None:
            super().close()


class _Pool(txpostgres.ConnectionPool):  # type: ignore[misc]
    """A txpostgres pool of reconnecting connections that hands out live ones first."""

    def __init__(self, reactor: Any, dsn: str, size: int, on_change: Callable[[], None]):
        self.reactor = reactor
        self._on_change = on_change  # a connection came back to life or back to the pool
        super().__init__(None, dsn, min=size, application_name="mailsrv")
        self.all: list[_Connection] = list(self.connections)

    def connectionFactory(self, reactor: Any, cooperator: Any) -> _Connection:
        return _Connection(reactor, cooperator, detector=_Detector(reactor, self._on_change))

    def has_idle_live(self) -> bool:
        return any(c.is_live() for c in self.connections)

    def _putBackAndPassthrough(self, result: object, connection: _Connection) -> object:
        self.connections.add(connection)
        self._on_change()
        return result

    def _take(self) -> _Connection:
        live = [c for c in self.connections if c.is_live()]
        chosen: _Connection = live[0] if live else next(iter(self.connections))
        self.connections.remove(chosen)
        return chosen

    def _runQuery(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        c = self._take()
        return c.runQuery(*args, **kwargs).addBoth(self._putBackAndPassthrough, c)  # type: ignore[no-any-return]

    def _runOperation(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        c = self._take()
        return c.runOperation(*args, **kwargs).addBoth(self._putBackAndPassthrough, c)  # type: ignore[no-any-return]

    def _runInteraction(self, interaction: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        c = self._take()
        d = c.runInteraction(interaction, *args, **kwargs)
        return d.addBoth(self._putBackAndPassthrough, c)  # type: ignore[no-any-return]

    def close(self) -> None:
        for c in self.all:
            c.detector.stop()
        for c in self.all:
            c.close()


@implementer(IUserStore, greylist.IGreylistStore)
class PostgresUserStore:
    """Accounts and aliases in PostgreSQL (``dsn``: a libpq URL or key=value string)."""

    def __init__(
        self, dsn: str, reactor: Any, pool_size: int = 3, reconnect_wait: float = 10.0
    ) -> None:
        self.dsn = dsn
        self._reactor = reactor
        self._pool_size = pool_size
        self.reconnect_wait = reconnect_wait
        self._pool: _Pool | None = None
        self._opening: list[Deferred[None]] | None = None
        self._waiters: list[Deferred[None]] = []
        self._closed = False

    # --- lifecycle --------------------------------------------------------------------------

    def open(self) -> Deferred[None]:
        """Connect the pool and apply pending migrations."""
        return Deferred.fromCoroutine(self._open())

    async def _open(self) -> None:
        if self._pool is not None or self._opening is not None:
            return
        self._closed = False
        self._opening = []
        pool = _Pool(self._reactor, self.dsn, self._pool_size, self._wake)
        try:
            try:
                await pool.start()
            except FirstError as e:
                e.subFailure.raiseException()
            await pool.runInteraction(_interaction(m.apply_postgresql))
        except BaseException as e:
            pool.close()
            self._finish_opening(e)
            raise
        if self._closed:  # close() was called while we were opening
            pool.close()
            self._finish_opening(StoreError("closed"))
            return
        self._pool = pool
        self._finish_opening(None)

    def _finish_opening(self, error: BaseException | None) -> None:
        waiters, self._opening = self._opening or [], None
        for d in waiters:
            if error is None:
                d.callback(None)
            else:
                d.errback(StoreError(f"the user store could not be opened: {error}"))

    def close(self) -> Deferred[None]:
        """Stop reconnecting and close every connection."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        self._wake()
        return succeed(None)

    async def _ready(self) -> _Pool:
        if self._pool is None and self._opening is not None:
            d: Deferred[None] = Deferred()
            self._opening.append(d)
            await d
        if self._pool is None:
            raise StoreError("the user store is not open")
        return self._pool

    # --- retries ----------------------------------------------------------------------------

    def _wake(self) -> None:
        """A connection recovered or was returned to the pool: let waiting calls try again."""
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if not d.called:
                d.callback(None)

    async def _wait_for_connection(self, pool: _Pool, deadline: float) -> None:
        """Wait until an idle live connection may exist (or ``deadline``)."""
        if pool.has_idle_live():
            return
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        delay = max(0.0, deadline - self._reactor.seconds())
        timer = self._reactor.callLater(delay, _release, d)
        try:
            await d
        finally:
            if timer.active():
                timer.cancel()

    async def _retrying(
        self,
        operation: Callable[[_Pool], Deferred[T]],
        idempotent: bool,
        wait: float | None = None,
    ) -> T:
        """Run ``operation``; on a dead connection wait for a reconnect and try again.

        Attempts that never reached the server are repeated until ``wait`` seconds (default
        ``reconnect_wait``) run out.  An idempotent read that failed after it was sent is
        retried once more; a write that failed after it was sent is not retried (its COMMIT
        may have happened).
        """
        deadline = self._reactor.seconds() + (self.reconnect_wait if wait is None else wait)
        sent_retry = idempotent
        while True:
            pool = await self._ready()
            try:
                return await operation(pool)
            except Exception as e:
                if _never_sent(e):
                    pass
                elif sent_retry and is_connection_error(e):
                    sent_retry = False
                else:
                    raise
                if self._reactor.seconds() >= deadline:
                    raise
            await self._wait_for_connection(pool, deadline)

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> Deferred[list[Any]]:
        """An idempotent single-statement read, retried once after a reconnect."""
        return Deferred.fromCoroutine(
            self._retrying(lambda pool: pool.runQuery(sql, params), idempotent=True)
        )

    def _transaction(
        self, function: Callable[..., Coroutine[Any, Any, T]], *args: Any
    ) -> Deferred[T]:
        """Run ``function(cursor, *args)`` in one transaction (a write: not blindly retried)."""
        return Deferred.fromCoroutine(
            self._retrying(
                lambda pool: pool.runInteraction(_interaction(function, *args)),
                idempotent=False,
            )
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
            lambda rows: int(rows[0][0]) if rows and rows[0][0] else 0, _unreachable
        )

    # --- reads ------------------------------------------------------------------------------

    def get_account(self, login: str) -> Deferred[Account | None]:
        key = m.lookup_key(login)
        if key is None:
            return succeed(None)
        return self._query(_ACCOUNT_BY_LOGIN, (key,)).addCallback(_first)

    def find_owner(self, address: str) -> Deferred[Account | None]:
        key = m.lookup_key(address)
        if key is None:
            return succeed(None)
        return self._query(_ACCOUNT_BY_ADDRESS, (key, key)).addCallback(_first)

    def list_accounts(self) -> Deferred[list[Account]]:
        def accounts(rows: list[Any]) -> list[Account]:
            found = [m.account_from_row(row[:7], tuple(sorted(row[7]))) for row in rows]
            return sorted(found, key=lambda account: account.login)

        return self._query(_ACCOUNT_QUERY).addCallback(accounts)

    def list_aliases(self) -> Deferred[list[tuple[str, str]]]:
        d = self._query("SELECT address, login FROM aliases")
        return d.addCallback(lambda rows: sorted((str(a), str(b)) for a, b in rows))

    # --- writes -----------------------------------------------------------------------------

    def add_account(
        self, login: str, password_hash: str, cram_md5: str | None, send_as_any: bool, now: float
    ) -> Deferred[Account]:
        try:
            key = m.new_address(login)
        except StoreError as e:
            return _failed(e)
        return self._transaction(_add_account, key, password_hash, cram_md5, send_as_any, now)

    def delete_account(self, login: str) -> Deferred[None]:
        key = _key_or_empty(login)
        # The aliases go with the account: ON DELETE CASCADE.
        return self._transaction(
            _update_one,
            "DELETE FROM accounts WHERE login = %s",
            (key,),
            m.no_such_user(key or login),
        )

    def set_password(
        self, login: str, password_hash: str, cram_md5: str | None, now: float
    ) -> Deferred[None]:
        key = _key_or_empty(login)
        return self._transaction(
            _update_one,
            "UPDATE accounts SET password_hash = %s, cram_md5 = %s, updated = %s WHERE login = %s",
            (password_hash, cram_md5, now, key),
            m.no_such_user(key or login),
        )

    def replace_hash(self, login: str, old_hash: str, new_hash: str, now: float) -> Deferred[bool]:
        return self._transaction(_replace_hash, _key_or_empty(login), old_hash, new_hash, now)

    def set_enabled(self, login: str, enabled: bool, now: float) -> Deferred[None]:
        key = _key_or_empty(login)
        return self._transaction(
            _update_one,
            "UPDATE accounts SET enabled = %s, updated = %s WHERE login = %s",
            (enabled, now, key),
            m.no_such_user(key or login),
        )

    def set_send_as_any(self, login: str, allowed: bool, now: float) -> Deferred[None]:
        key = _key_or_empty(login)
        return self._transaction(
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
        return self._transaction(_add_alias, key, owner, m.no_such_user(owner or login), now)

    def remove_alias(self, address: str) -> Deferred[None]:
        key = _key_or_empty(address)
        return self._transaction(
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
        rows = self._query(greylist.DOMAIN_SEEN_POSTGRESQL, (domain, now))
        return rows.addCallback(lambda found: bool(found))

    def greylist_expire(self, now: float) -> Deferred[int]:
        return self._transaction(_greylist_expire, now)

    def _operation(self, sql: str, params: tuple[Any, ...]) -> Deferred[None]:
        """A single statement in autocommit whose repetition changes nothing (so it is
        retried once after a reconnect, like a read)."""
        done = Deferred.fromCoroutine(
            self._retrying(lambda pool: pool.runOperation(sql, params), idempotent=True)
        )
        return done.addCallback(lambda _: None)


# --- helpers and transactions ------------------------------------------------------------------


def _unreachable(failure: Failure) -> Failure:
    """A connection error as a StoreError that says the database is unreachable."""
    error = failure.value
    if not isinstance(error, BaseException) or not is_connection_error(error):
        return failure
    lines = str(error).strip().splitlines()
    why = f": {lines[0]}" if lines else ""
    return Failure(StoreError(f"no connection to PostgreSQL, reconnecting{why}"))


def _release(d: Deferred[None]) -> None:
    if not d.called:
        d.callback(None)


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


def _interaction(
    function: Callable[..., Coroutine[Any, Any, T]], *args: Any
) -> Callable[[Any], Deferred[T]]:
    """A txpostgres interaction running the coroutine ``function(cursor, *args)``."""
    return lambda cursor: Deferred.fromCoroutine(function(cursor, *args))


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
