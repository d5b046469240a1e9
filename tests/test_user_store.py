"""One behaviour suite for the user store, run against SQLite and against PostgreSQL.

Both implementations must behave identically, so every test here runs on both (``backend`` is
parametrized); only the restart and outage tests are PostgreSQL-specific.
"""

from __future__ import annotations

import sqlite3
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import gatherResults
from zope.interface.verify import verifyObject

from mailsrv.auth import cram, migrations
from mailsrv.auth.pg_store import PostgresUserStore
from mailsrv.auth.sqlite_store import SQLiteUserStore
from mailsrv.auth.store import Account, DuplicateAccount, IUserStore, StoreError, UnknownAccount
from mailsrv.pgsql import is_connection_error

ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.net"


LATEST = migrations.latest("sqlite")
assert LATEST == migrations.latest("postgresql")


@dataclass
class Backend:
    """How to make stores on one test database, and how to look inside it."""

    name: str
    make: Callable[[], Any]
    query: Callable[[str], list[tuple[Any, ...]]]
    cluster: Any = None


def _sqlite_query(path: Path) -> Callable[[str], list[tuple[Any, ...]]]:
    def query(sql: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(path)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    return query


def _pg_query(dsn: str) -> Callable[[str], list[tuple[Any, ...]]]:
    def query(sql: str) -> list[tuple[Any, ...]]:
        conn = psycopg2.connect(dsn)
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql)
                return list(cursor.fetchall())
        finally:
            conn.close()

    return query


def _backend(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if name == "sqlite":
        path = tmp_path / "not-yet" / "users.db"  # the store creates the directory
        return Backend("sqlite", lambda: SQLiteUserStore(path, reactor), _sqlite_query(path))
    cluster = request.getfixturevalue("pg_cluster")
    dsn = cluster.create_database()
    return Backend("postgresql", lambda: PostgresUserStore(dsn, reactor), _pg_query(dsn), cluster)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each store implementation, on a fresh database."""
    return _backend(request.param, request, tmp_path)


@pytest.fixture
def pg_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """PostgreSQL only, for the reconnection tests."""
    return _backend("postgresql", request, tmp_path)


@pytest_twisted.async_yield_fixture
async def store(backend: Backend) -> Any:
    opened = backend.make()
    await opened.open()
    yield opened
    await opened.close()


async def add(store: Any, login: str, hashed: str = "h1", now: float = 100.0) -> Account:
    account: Account = await store.add_account(login, hashed, None, False, now)
    return account


async def raises(exception: type[Exception], d: Any) -> Exception:
    """Await ``d`` and return the exception it fails with (which must be ``exception``)."""
    try:
        await d
    except exception as e:
        return e
    raise AssertionError(f"expected {exception.__name__}")


# --- accounts ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_provides_the_interface(store: Any) -> None:
    assert verifyObject(IUserStore, store)


@pytest_twisted.ensureDeferred
async def test_add_and_get(store: Any) -> None:
    created = await store.add_account("Alice@Example.ORG", "h1", None, True, 100.5)
    assert created == Account(ALICE, "h1", None, True, True, (), 100.5, 100.5)
    got = await store.get_account("ALICE@example.org")
    assert got == created
    assert got.addresses == (ALICE,)
    assert isinstance(got.created, float) and isinstance(got.enabled, bool)
    assert await store.get_account(BOB) is None


@pytest_twisted.ensureDeferred
async def test_duplicate_login_refused_case_insensitively(store: Any) -> None:
    await add(store, ALICE)
    error = await raises(DuplicateAccount, add(store, "ALICE@example.ORG", "h2"))
    assert str(error) == f"user {ALICE} already exists"
    assert (await store.get_account(ALICE)).password_hash == "h1"


@pytest_twisted.ensureDeferred
async def test_invalid_addresses(store: Any) -> None:
    for bad in ("alice", "@example.org", "alice@", "al ice@example.org", "a@b@-bad-.org"):
        error = await raises(StoreError, store.add_account(bad, "h", None, False, 1.0))
        assert not isinstance(error, DuplicateAccount | UnknownAccount)
        assert "invalid address" in str(error)
        assert await store.get_account(bad) is None
        assert await store.find_owner(bad) is None
    await add(store, ALICE)
    error = await raises(StoreError, store.add_alias("not an address", ALICE, 1.0))
    assert "invalid address" in str(error)
    assert await store.list_accounts() == [await store.get_account(ALICE)]


@pytest_twisted.ensureDeferred
async def test_delete(store: Any) -> None:
    await add(store, ALICE)
    await add(store, BOB)
    await store.delete_account("Alice@example.org")
    assert await store.get_account(ALICE) is None
    assert [a.login for a in await store.list_accounts()] == [BOB]
    error = await raises(UnknownAccount, store.delete_account(ALICE))
    assert str(error) == f"no such user {ALICE}"


@pytest_twisted.ensureDeferred
async def test_unknown_account_operations(store: Any) -> None:
    for operation in (
        store.delete_account(ALICE),
        store.set_password(ALICE, "h", None, 2.0),
        store.set_enabled(ALICE, False, 2.0),
        store.set_send_as_any(ALICE, True, 2.0),
        store.add_alias("info@example.org", ALICE, 2.0),
        store.delete_account("garbage"),
    ):
        assert "no such user" in str(await raises(UnknownAccount, operation))
    assert await store.replace_hash(ALICE, "h1", "h2", 2.0) is False
    assert await store.find_owner(ALICE) is None
    error = await raises(UnknownAccount, store.remove_alias("info@example.org"))
    assert str(error) == "no such alias info@example.org"


# --- aliases ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_aliases(store: Any) -> None:
    await add(store, ALICE)
    await add(store, BOB)
    await store.add_alias("Info@Example.ORG", "ALICE@example.org", 200.0)
    await store.add_alias("sales@example.org", ALICE, 201.0)
    alice = await store.get_account(ALICE)
    assert alice.aliases == ("info@example.org", "sales@example.org")
    assert alice.addresses == (ALICE, "info@example.org", "sales@example.org")
    assert alice.updated == 100.0  # aliases are not account changes
    assert (await store.find_owner("INFO@example.org")).login == ALICE
    assert await store.find_owner("info@example.org") == alice
    assert (await store.find_owner("Bob@Example.org")).login == BOB
    assert await store.find_owner("nobody@example.org") is None
    assert await store.list_aliases() == [
        ("info@example.org", ALICE),
        ("sales@example.org", ALICE),
    ]

    error = await raises(DuplicateAccount, store.add_alias("info@example.org", BOB, 3.0))
    assert str(error) == "alias info@example.org already exists"
    error = await raises(DuplicateAccount, store.add_alias("BOB@example.org", ALICE, 3.0))
    assert str(error) == f"{BOB} is already a user login"
    error = await raises(DuplicateAccount, add(store, "Info@example.org"))
    assert str(error) == f"info@example.org is already an alias of {ALICE}"
    assert (await store.find_owner("info@example.org")).login == ALICE

    await store.remove_alias("SALES@example.org")
    assert (await store.get_account(ALICE)).aliases == ("info@example.org",)
    assert await store.find_owner("sales@example.org") is None
    await raises(UnknownAccount, store.remove_alias("sales@example.org"))


@pytest_twisted.ensureDeferred
async def test_deleting_an_account_deletes_its_aliases(store: Any) -> None:
    await add(store, ALICE)
    await add(store, BOB)
    await store.add_alias("info@example.org", ALICE, 2.0)
    await store.add_alias("bob.smith@example.org", BOB, 2.0)
    await store.delete_account(ALICE)
    assert await store.find_owner("info@example.org") is None
    assert await store.list_aliases() == [("bob.smith@example.org", BOB)]
    await store.add_alias("info@example.org", BOB, 3.0)  # the address is free again
    assert (await store.find_owner("info@example.org")).login == BOB


# --- passwords, flags -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_set_password(store: Any) -> None:
    await add(store, ALICE, "h1", now=100.0)
    context = cram.make_context("secret")
    await store.set_password("Alice@example.org", "h2", context, 300.0)
    alice = await store.get_account(ALICE)
    assert (alice.password_hash, alice.cram_md5, alice.created, alice.updated) == (
        "h2",
        context,
        100.0,
        300.0,
    )
    await store.set_password(ALICE, "h3", None, 301.0)
    assert (await store.get_account(ALICE)).cram_md5 is None


@pytest_twisted.ensureDeferred
async def test_replace_hash_is_compare_and_set(store: Any) -> None:
    await add(store, ALICE, "old", now=100.0)
    assert await store.replace_hash(ALICE, "stale", "new", 200.0) is False
    alice = await store.get_account(ALICE)
    assert (alice.password_hash, alice.updated) == ("old", 100.0)
    assert await store.replace_hash("ALICE@example.org", "old", "new", 200.0) is True
    alice = await store.get_account(ALICE)
    assert (alice.password_hash, alice.updated) == ("new", 200.0)
    assert await store.replace_hash(ALICE, "old", "newer", 201.0) is False
    assert (await store.get_account(ALICE)).password_hash == "new"


@pytest_twisted.ensureDeferred
async def test_enable_disable_and_send_as_any(store: Any) -> None:
    await add(store, ALICE, now=100.0)
    await store.set_enabled(ALICE, False, 150.0)
    alice = await store.get_account(ALICE)
    assert (alice.enabled, alice.updated) == (False, 150.0)
    assert (await store.find_owner(ALICE)).enabled is False  # disabled accounts are still found
    await store.set_enabled("Alice@Example.org", True, 160.0)
    assert (await store.get_account(ALICE)).enabled is True
    await store.set_send_as_any(ALICE, True, 170.0)
    alice = await store.get_account(ALICE)
    assert (alice.send_as_any, alice.updated, alice.created) == (True, 170.0, 100.0)
    await store.set_send_as_any(ALICE, False, 171.0)
    assert (await store.get_account(ALICE)).send_as_any is False


@pytest_twisted.ensureDeferred
async def test_list_ordering(store: Any) -> None:
    assert await store.list_accounts() == []
    assert await store.list_aliases() == []
    for login in ("zed@example.org", CAROL, "Bob@example.org", "alice@example.org", "a.b@x.org"):
        await add(store, login)
    await store.add_alias("z-info@example.org", ALICE, 2.0)
    await store.add_alias("a-info@example.org", ALICE, 2.0)
    await store.add_alias("postmaster@example.net", CAROL, 2.0)
    accounts = await store.list_accounts()
    assert [a.login for a in accounts] == [
        "a.b@x.org",
        ALICE,
        BOB,
        CAROL,
        "zed@example.org",
    ]
    assert accounts[1].aliases == ("a-info@example.org", "z-info@example.org")
    assert accounts[3].aliases == ("postmaster@example.net",)
    assert accounts[0].aliases == ()
    assert [alias for alias, _ in await store.list_aliases()] == [
        "a-info@example.org",
        "postmaster@example.net",
        "z-info@example.org",
    ]


# --- schema -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_migrations_are_idempotent_on_reopen(backend: Backend) -> None:
    first = backend.make()
    await first.open()
    assert await first.schema_version() == LATEST
    await add(first, ALICE)
    await first.close()
    again = backend.make()
    await again.open()
    try:
        assert await again.schema_version() == LATEST
        assert (await again.get_account(ALICE)).login == ALICE
    finally:
        await again.close()
    assert backend.query("SELECT version FROM schema_version") == [(LATEST,)]


@pytest_twisted.ensureDeferred
async def test_concurrent_openers_migrate_once(backend: Backend) -> None:
    stores = [backend.make() for _ in range(3)]
    try:
        await gatherResults([s.open() for s in stores])
        await add(stores[0], ALICE)
        for s in stores:
            assert await s.schema_version() == LATEST
            assert (await s.get_account(ALICE)).login == ALICE
    finally:
        await gatherResults([s.close() for s in stores])
    assert backend.query("SELECT version FROM schema_version") == [(LATEST,)]


@pytest_twisted.ensureDeferred
async def test_close_releases_threads(backend: Backend) -> None:
    before = {t.ident for t in threading.enumerate()}
    opened = backend.make()
    await opened.open()
    await add(opened, ALICE)
    await opened.close()
    assert {t.ident for t in threading.enumerate() if t.is_alive()} <= before
    assert not reactor.getDelayedCalls() or all(
        "mailsrv" not in repr(call.func) for call in reactor.getDelayedCalls()
    )


# --- PostgreSQL restart -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_survives_a_postgresql_restart(pg_backend: Backend) -> None:
    backend = pg_backend
    opened = backend.make()
    await opened.open()
    try:
        await add(opened, ALICE)
        restart = await threads.deferToThread(
            subprocess.run, backend.cluster.restart_command(), capture_output=True, timeout=60
        )
        assert restart.returncode == 0, restart.stderr
        account = None
        for _attempt in range(3):
            try:
                account = await opened.get_account(ALICE)
                break
            except Exception as e:
                assert is_connection_error(e), e
        assert account is not None and account.login == ALICE
        for _attempt in range(3):
            try:
                await add(opened, BOB)
                break
            except Exception as e:
                assert is_connection_error(e), e
        assert (await opened.get_account(BOB)).login == BOB
    finally:
        await opened.close()


@pytest_twisted.ensureDeferred
async def test_calls_made_while_postgresql_is_down_wait_for_it(pg_backend: Backend) -> None:
    backend = pg_backend
    cluster = backend.cluster
    opened = backend.make()
    await opened.open()
    try:
        await add(opened, ALICE)
        stop = cluster.pg_ctl("-w", "-m", "fast", "stop")
        stopped = await threads.deferToThread(subprocess.run, stop, capture_output=True)
        assert stopped.returncode == 0, stopped.stderr
        # Issued while the server is down: the connections are known dead, so nothing is sent;
        # both calls wait for a reconnect and then run once.
        read = opened.get_account(ALICE)
        write = opened.add_account(BOB, "h", None, False, 5.0)
        await threads.deferToThread(cluster.start)
        assert (await read).login == ALICE
        assert (await write).login == BOB
        assert [a.login for a in await opened.list_accounts()] == [ALICE, BOB]
    finally:
        await opened.close()


@pytest_twisted.ensureDeferred
async def test_schema_version_fails_at_once_while_postgresql_is_down(own_pg_cluster: Any) -> None:
    # The readiness probe's query: it must say "unreachable" now, not wait for a reconnect
    # as the other reads do (their wait here would be a minute).
    cluster = own_pg_cluster
    opened = PostgresUserStore(cluster.create_database(), reactor, reconnect_wait=60.0)
    await opened.open()
    try:
        version = await opened.schema_version()
        assert version > 0
        await threads.deferToThread(cluster.stop)
        started = reactor.seconds()
        error = await raises(StoreError, opened.schema_version())
        assert reactor.seconds() - started < 5
        assert str(error).startswith("no connection to PostgreSQL, reconnecting")
        read = opened.get_account(ALICE)  # an ordinary read waits for the database instead
        await threads.deferToThread(cluster.start)
        assert await read is None
        assert await opened.schema_version() == version
    finally:
        await opened.close()
