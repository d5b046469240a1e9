"""Schema migrations for the user store: numbered SQL files, one directory per dialect.

``migrations/<dialect>/NNNN_name.sql`` (package data) are applied in order.  The highest
version applied is the single row of ``schema_version`` (created by ``0001``).  Each runner
applies every file above the recorded version and records the new version in one transaction,
so a failed migration leaves the schema as it was.  Both dialects must hold the same versions
with the same meaning.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from importlib import resources
from typing import Any

from mailsrv.auth.store import Account, DuplicateAccount, StoreError, UnknownAccount
from mailsrv.identity import InvalidAddress, canonical_address

DIALECTS = ("sqlite", "postgresql")
_FILE_NAME = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")

# pg_advisory_xact_lock key held while migrating ("mailsrv" + 0x01), so concurrent openers
# (several server nodes, the CLI) migrate one after the other.
PG_MIGRATION_LOCK = 0x6D61696C73727601


class MigrationError(StoreError):
    """The schema cannot be brought up to date (for example it is newer than this code)."""


@dataclass(frozen=True)
class MigrationSet:
    """One schema's migrations: ``migrations/<dialect>/`` of ``package``, the table whose one
    row is the version applied (created by the set's ``0001``), and the advisory lock key held
    while PostgreSQL is migrated."""

    package: str
    version_table: str
    lock: int


USER_STORE = MigrationSet("mailsrv.auth", "schema_version", PG_MIGRATION_LOCK)
"""The user store's schema (SQLite and PostgreSQL)."""


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file."""

    version: int
    name: str
    sql: str

    def statements(self) -> list[str]:
        """The file split into single statements (for drivers that run one at a time)."""
        return split_statements(self.sql)


def split_statements(script: str) -> list[str]:
    """Split an SQL script into complete statements, without their comment-only lines."""
    statements: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        if not current and (not line.strip() or line.lstrip().startswith("--")):
            continue
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        raise MigrationError(f"incomplete SQL statement at the end of a migration: {current!r}")
    return statements


def available(dialect: str, schema: MigrationSet = USER_STORE) -> list[Migration]:
    """Every migration of ``schema`` shipped for ``dialect``, in version order (1, 2, ...
    without gaps)."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown SQL dialect {dialect!r}")
    folder = resources.files(schema.package).joinpath("migrations", dialect)
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _FILE_NAME.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise MigrationError(
            f"{dialect} migrations are not numbered 1..n: {[m.name for m in found]}"
        )
    return found


def latest(dialect: str, schema: MigrationSet = USER_STORE) -> int:
    """The schema version this code expects."""
    return len(available(dialect, schema))


def pending(dialect: str, current: int, schema: MigrationSet = USER_STORE) -> list[Migration]:
    """The migrations above ``current``; MigrationError if the database is newer than we are."""
    migrations = available(dialect, schema)
    if current > len(migrations):
        raise MigrationError(
            f"database schema version {current} is newer than this mailsrv "
            f"(knows {len(migrations)}): upgrade mailsrv"
        )
    return [m for m in migrations if m.version > current]


# --- shared by both stores: key rules, row shape, messages -------------------------------------

# Every store selects accounts with exactly these columns, in this order.
SELECT_ACCOUNTS = (
    "SELECT login, password_hash, cram_md5, enabled, send_as_any, created, updated FROM accounts"
)


def new_address(text: str) -> str:
    """A login or alias about to be created, in canonical form (``mailsrv.identity``)."""
    try:
        return canonical_address(text)
    except InvalidAddress as error:
        raise StoreError(str(error)) from None


def lookup_key(text: str) -> str | None:
    """The stored (canonical) form of an address to look up; None when it cannot exist."""
    try:
        return canonical_address(text)
    except InvalidAddress:
        return None


def account_from_row(row: Any, aliases: tuple[str, ...]) -> Account:
    """An :class:`Account` from a row selected by ``SELECT_ACCOUNTS``."""
    login, password_hash, cram_md5, enabled, send_as_any, created, updated = row
    return Account(
        login=login,
        password_hash=password_hash,
        cram_md5=cram_md5,
        enabled=bool(enabled),
        send_as_any=bool(send_as_any),
        aliases=aliases,
        created=float(created),
        updated=float(updated),
    )


def accounts_with_aliases(rows: Any, alias_rows: Any) -> list[Account]:
    """Account rows joined with ``(address, login)`` alias rows, ordered by login.

    Sorting happens here (code point order), not in SQL, so both databases order alike
    whatever their collation.
    """
    owned: dict[str, list[str]] = {}
    for address, login in alias_rows:
        owned.setdefault(login, []).append(address)
    accounts = [account_from_row(row, tuple(sorted(owned.get(row[0], ())))) for row in rows]
    return sorted(accounts, key=lambda account: account.login)


def user_exists(login: str) -> DuplicateAccount:
    return DuplicateAccount(f"user {login} already exists")


def address_is_alias(address: str, owner: str) -> DuplicateAccount:
    return DuplicateAccount(f"{address} is already an alias of {owner}")


def alias_exists(address: str) -> DuplicateAccount:
    return DuplicateAccount(f"alias {address} already exists")


def address_is_user(address: str) -> DuplicateAccount:
    return DuplicateAccount(f"{address} is already a user login")


def no_such_user(login: str) -> UnknownAccount:
    return UnknownAccount(f"no such user {login}")


def no_such_alias(address: str) -> UnknownAccount:
    return UnknownAccount(f"no such alias {address}")


# --- SQLite: blocking, run in the store's writer thread ---------------------------------------


def sqlite_version(conn: sqlite3.Connection) -> int:
    """The recorded schema version (0 for an empty database)."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if not exists:
        return 0
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def apply_sqlite(conn: sqlite3.Connection) -> int:
    """Bring an autocommit (``isolation_level=None``) connection up to date; the new version."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = sqlite_version(conn)
        todo = pending("sqlite", current)
        for migration in todo:
            for statement in migration.statements():
                conn.execute(statement)
        if todo:
            current = todo[-1].version
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (current,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return current


# --- PostgreSQL: inside a txpostgres interaction (the caller's transaction) -------------------


async def postgresql_version(cursor: Any, schema: MigrationSet = USER_STORE) -> int:
    """The recorded schema version (0 for an empty database)."""
    await cursor.execute("SELECT to_regclass(%s) IS NOT NULL", (schema.version_table,))
    if not cursor.fetchone()[0]:
        return 0
    await cursor.execute(f"SELECT max(version) FROM {schema.version_table}")  # noqa: S608
    row = cursor.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


async def apply_postgresql(cursor: Any, schema: MigrationSet = USER_STORE) -> int:
    """Bring the database up to date inside the cursor's transaction; the new version.

    Takes a transaction-scoped advisory lock first, so concurrent migrators (several nodes
    starting at once, the CLI) wait for each other and the second one finds nothing left to do.
    """
    await cursor.execute("SELECT pg_advisory_xact_lock(%s)", (schema.lock,))
    current = await postgresql_version(cursor, schema)
    todo = pending("postgresql", current, schema)
    for migration in todo:
        await cursor.execute(migration.sql)
    if todo:
        current = todo[-1].version
        table = schema.version_table
        await cursor.execute(f"DELETE FROM {table}")  # noqa: S608
        await cursor.execute(f"INSERT INTO {table} (version) VALUES (%s)", (current,))  # noqa: S608
    return current
