"""The user store on SQLite: one dedicated writer thread, WAL, ``BEGIN IMMEDIATE`` writes.

Every call runs in a private ``ThreadPool(1, 1)`` on one connection opened inside that thread,
so calls from this process are serialised and never block the reactor.  Other processes (the
``mailsrv users`` command while the server runs) share the file through WAL and
``busy_timeout``: writers take the write lock up front (``BEGIN IMMEDIATE``), so a transaction
never fails half-way on a lock upgrade, and readers see a consistent snapshot (``BEGIN``).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailsrv.auth import migrations as m
from mailsrv.auth.store import Account, IUserStore, StoreError
from mailsrv.filemodes import create_private_file, make_private_dirs
from mailsrv.screening import greylist

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000


@implementer(IUserStore, greylist.IGreylistStore)
class SQLiteUserStore:
    """Accounts and aliases in an SQLite file (created with its directory on open)."""

    def __init__(self, path: str | Path, reactor: IReactorFromThreads) -> None:
        self.path = Path(path)
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="mailsrv-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._started = False

    # --- plumbing ---------------------------------------------------------------------------

    def _call(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        if not self._started:
            return fail(StoreError("the user store is not open"))
        return deferToThreadPool(self._reactor, self._pool, function, *args)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("the user store is closed")
        return self._conn

    def _write(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``function(conn, *args)`` in the writer thread inside BEGIN IMMEDIATE..COMMIT."""

        def transaction() -> T:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = function(conn, *args)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result

        return self._call(transaction)

    def _read(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``function(conn, *args)`` in the writer thread on one read snapshot."""

        def snapshot() -> T:
            conn = self._connection()
            conn.execute("BEGIN")
            try:
                return function(conn, *args)
            finally:
                conn.execute("COMMIT")

        return self._call(snapshot)

    # --- lifecycle --------------------------------------------------------------------------

    def open(self) -> Deferred[None]:
        """Start the thread, open the file (creating its directory) and migrate."""
        if self._started:
            return succeed(None)
        self._pool.start()
        self._started = True
        d = self._call(self._open)

        def failed(reason: Any) -> Any:
            self._started = False
            self._pool.stop()
            return reason

        d.addErrback(failed)
        return d

    def _open(self) -> None:
        make_private_dirs(self.path.parent)
        create_private_file(self.path)  # 0600; SQLite gives -wal and -shm the same mode
        conn = sqlite3.connect(
            str(self.path),
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS:d}")
            _enable_wal(conn)
            conn.execute("PRAGMA foreign_keys=ON")
            m.apply_sqlite(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def close(self) -> Deferred[None]:
        """Close the connection inside its thread, then stop the thread."""
        if not self._started:
            return succeed(None)
        d = self._call(self._close)

        def stop(result: Any) -> Any:
            self._started = False
            self._pool.stop()
            return result

        d.addBoth(stop)
        return d

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def schema_version(self) -> Deferred[int]:
        """The recorded schema version (for tests and diagnostics)."""
        return self._read(m.sqlite_version)

    # --- reads ------------------------------------------------------------------------------

    def get_account(self, login: str) -> Deferred[Account | None]:
        key = m.lookup_key(login)
        if key is None:
            return succeed(None)
        return self._read(_get, key)

    def find_owner(self, address: str) -> Deferred[Account | None]:
        key = m.lookup_key(address)
        if key is None:
            return succeed(None)
        return self._read(_find_owner, key)

    def list_accounts(self) -> Deferred[list[Account]]:
        return self._read(_list_accounts)

    def list_aliases(self) -> Deferred[list[tuple[str, str]]]:
        return self._read(_list_aliases)

    # --- writes -----------------------------------------------------------------------------

    def add_account(
        self, login: str, password_hash: str, cram_md5: str | None, send_as_any: bool, now: float
    ) -> Deferred[Account]:
        try:
            key = m.new_address(login)
        except StoreError as e:
            return fail(e)
        return self._write(_add_account, key, password_hash, cram_md5, send_as_any, now)

    def delete_account(self, login: str) -> Deferred[None]:
        return self._write(_delete_account, _key_or_empty(login), login)

    def set_password(
        self, login: str, password_hash: str, cram_md5: str | None, now: float
    ) -> Deferred[None]:
        return self._write(
            _update,
            _key_or_empty(login),
            login,
            "UPDATE accounts SET password_hash = ?, cram_md5 = ?, updated = ? WHERE login = ?",
            (password_hash, cram_md5, now),
        )

    def replace_hash(self, login: str, old_hash: str, new_hash: str, now: float) -> Deferred[bool]:
        return self._write(_replace_hash, _key_or_empty(login), old_hash, new_hash, now)

    def set_enabled(self, login: str, enabled: bool, now: float) -> Deferred[None]:
        return self._write(
            _update,
            _key_or_empty(login),
            login,
            "UPDATE accounts SET enabled = ?, updated = ? WHERE login = ?",
            (enabled, now),
        )

    def set_send_as_any(self, login: str, allowed: bool, now: float) -> Deferred[None]:
        return self._write(
            _update,
            _key_or_empty(login),
            login,
            "UPDATE accounts SET send_as_any = ?, updated = ? WHERE login = ?",
            (allowed, now),
        )

    def add_alias(self, address: str, login: str, now: float) -> Deferred[None]:
        try:
            key = m.new_address(address)
        except StoreError as e:
            return fail(e)
        return self._write(_add_alias, key, _key_or_empty(login), login, now)

    def remove_alias(self, address: str) -> Deferred[None]:
        return self._write(_remove_alias, _key_or_empty(address), address)

    # --- greylisting (mailsrv.screening.greylist) -------------------------------------------

    def greylist_attempt(
        self, key: str, now: float, delay: float, expiry: float, lifetime: float
    ) -> Deferred[greylist.Seen]:
        params = greylist.attempt_parameters(key, now, delay, expiry, lifetime)
        return self._write(_greylist_attempt, params)

    def greylist_pass(self, key: str, now: float, lifetime: float) -> Deferred[None]:
        return self._write(_execute, greylist.TRIPLET_PASSES_SQLITE, (now + lifetime, key))

    def greylist_domain_passed(self, domain: str, now: float, lifetime: float) -> Deferred[None]:
        return self._write(_execute, greylist.DOMAIN_PASSED_SQLITE, (domain, now + lifetime))

    def greylist_domain_seen(self, domain: str, now: float) -> Deferred[bool]:
        return self._read(_exists, greylist.DOMAIN_SEEN_SQLITE, (domain, now))

    def greylist_expire(self, now: float) -> Deferred[int]:
        return self._write(_greylist_expire, now)


# --- the SQL, run in the writer thread ---------------------------------------------------------


def _key_or_empty(address: str) -> str:
    """The stored form of ``address``, or "" (which matches nothing) when it is invalid."""
    return m.lookup_key(address) or ""


def _aliases_of(conn: sqlite3.Connection, login: str) -> tuple[str, ...]:
    rows = conn.execute("SELECT address FROM aliases WHERE login = ?", (login,)).fetchall()
    return tuple(sorted(row[0] for row in rows))


def _get(conn: sqlite3.Connection, login: str) -> Account | None:
    row = conn.execute(m.SELECT_ACCOUNTS + " WHERE login = ?", (login,)).fetchone()
    return m.account_from_row(row, _aliases_of(conn, login)) if row else None


def _find_owner(conn: sqlite3.Connection, address: str) -> Account | None:
    row = conn.execute(
        "SELECT login FROM accounts WHERE login = ? UNION ALL "
        "SELECT login FROM aliases WHERE address = ?",
        (address, address),
    ).fetchone()
    return _get(conn, row[0]) if row else None


def _list_accounts(conn: sqlite3.Connection) -> list[Account]:
    rows = conn.execute(m.SELECT_ACCOUNTS).fetchall()
    alias_rows = conn.execute("SELECT address, login FROM aliases").fetchall()
    return m.accounts_with_aliases(rows, alias_rows)


def _list_aliases(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    rows = conn.execute("SELECT address, login FROM aliases").fetchall()
    return sorted((address, login) for address, login in rows)


def _alias_owner(conn: sqlite3.Connection, address: str) -> str | None:
    row = conn.execute("SELECT login FROM aliases WHERE address = ?", (address,)).fetchone()
    return str(row[0]) if row else None


def _login_exists(conn: sqlite3.Connection, login: str) -> bool:
    return conn.execute("SELECT 1 FROM accounts WHERE login = ?", (login,)).fetchone() is not None


def _add_account(
    conn: sqlite3.Connection,
    login: str,
    password_hash: str,
    cram_md5: str | None,
    send_as_any: bool,
    now: float,
) -> Account:
    if _login_exists(conn, login):
        raise m.user_exists(login)
    owner = _alias_owner(conn, login)
    if owner is not None:
        raise m.address_is_alias(login, owner)
    try:
        conn.execute(
            "INSERT INTO accounts (login, password_hash, cram_md5, enabled, send_as_any, created,"
            " updated) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (login, password_hash, cram_md5, True, send_as_any, now, now),
        )
    except sqlite3.IntegrityError:
        raise m.user_exists(login) from None
    return Account(login, password_hash, cram_md5, True, send_as_any, (), now, now)


def _delete_account(conn: sqlite3.Connection, login: str, given: str) -> None:
    # The aliases go with the account: ON DELETE CASCADE (foreign_keys=ON).
    if conn.execute("DELETE FROM accounts WHERE login = ?", (login,)).rowcount != 1:
        raise m.no_such_user(login or given)


def _update(
    conn: sqlite3.Connection, login: str, given: str, sql: str, values: tuple[Any, ...]
) -> None:
    if conn.execute(sql, (*values, login)).rowcount != 1:
        raise m.no_such_user(login or given)


def _replace_hash(
    conn: sqlite3.Connection, login: str, old_hash: str, new_hash: str, now: float
) -> bool:
    cursor = conn.execute(
        "UPDATE accounts SET password_hash = ?, updated = ? WHERE login = ? AND password_hash = ?",
        (new_hash, now, login, old_hash),
    )
    return cursor.rowcount == 1


def _add_alias(conn: sqlite3.Connection, address: str, login: str, given: str, now: float) -> None:
    if not _login_exists(conn, login):
        raise m.no_such_user(login or given)
    if _login_exists(conn, address):
        raise m.address_is_user(address)
    if _alias_owner(conn, address) is not None:
        raise m.alias_exists(address)
    try:
        conn.execute(
            "INSERT INTO aliases (address, login, created) VALUES (?, ?, ?)", (address, login, now)
        )
    except sqlite3.IntegrityError:
        raise m.alias_exists(address) from None


def _remove_alias(conn: sqlite3.Connection, address: str, given: str) -> None:
    if conn.execute("DELETE FROM aliases WHERE address = ?", (address,)).rowcount != 1:
        raise m.no_such_alias(address or given)


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL (persistent, so only the first opener really changes it).

    Changing the journal mode needs an exclusive lock and SQLite may refuse it at once
    ("database is locked") while another process opens the same file, without calling the busy
    handler; retry for up to the busy timeout.  This runs in the store's own thread, never on
    the reactor.
    """
    pause = threading.Event()
    for _ in range(BUSY_TIMEOUT_MS // 20):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
            pause.wait(0.02)
    conn.execute("PRAGMA journal_mode=WAL")


def _greylist_attempt(conn: sqlite3.Connection, params: dict[str, object]) -> greylist.Seen:
    row = conn.execute(greylist.ATTEMPT_SQLITE, params).fetchone()
    return greylist.seen_from_row(tuple(row))


def _greylist_expire(conn: sqlite3.Connection, now: float) -> int:
    triplets = conn.execute(greylist.EXPIRE_SQLITE, (now,)).rowcount
    return triplets + conn.execute(greylist.EXPIRE_DOMAINS_SQLITE, (now,)).rowcount


def _execute(conn: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> None:
    conn.execute(sql, params)


def _exists(conn: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> bool:
    return conn.execute(sql, params).fetchone() is not None
