"""Build the user store and the password hasher from the configuration.

The server (``mailsrv.tap``), the start-up checks and the ``mailsrv`` commands all come through
here, so they agree on which database holds the accounts, how passwords are hashed, and how a
store error is told in one line.
"""

from __future__ import annotations

import sqlite3
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mailsrv.auth.passwords import Argon2Profile, PasswordHasher
from mailsrv.auth.store import IUserStore, StoreError
from mailsrv.config import Config


def open_user_store(config: Config, reactor: Any) -> IUserStore:
    """The configured store, not yet opened: PostgreSQL if ``db_url`` is set, else SQLite.

    Call ``open()`` on the result (``UserStoreService`` does, for the server).
    """
    if config.db_url:
        from mailsrv.auth.pg_store import PostgresUserStore

        return PostgresUserStore(config.db_url, reactor)
    from mailsrv.auth.sqlite_store import SQLiteUserStore

    return SQLiteUserStore(config.sqlite_path, reactor)


def argon2_profile(config: Config) -> Argon2Profile:
    """The Argon2id cost parameters from the ``argon2_*`` settings."""
    return Argon2Profile(
        time_cost=config.argon2_time_cost,
        memory_kib=config.argon2_memory_kib,
        parallelism=config.argon2_parallelism,
    )


def make_hasher(config: Config) -> PasswordHasher:
    """A :class:`PasswordHasher` with the configured Argon2id profile (blocking to build)."""
    return PasswordHasher(argon2_profile(config))


def store_location(config: Config) -> str:
    """Where the accounts live, for messages: the SQLite path or the URL without password."""
    if not config.db_url:
        return str(config.sqlite_path)
    url = urlsplit(config.db_url)
    if url.password is not None:
        netloc = url.netloc.rpartition("@")
        url = url._replace(netloc=f"{url.username or ''}:***@{netloc[2]}")
    return urlunsplit(url._replace(query=""))


def describe_error(error: BaseException) -> str:
    """One line for ``error``: the store's own message, or the database's first line."""
    if isinstance(error, StoreError):
        return str(error)
    text = " ".join(str(error).split("\n", 1)[0].split()) or type(error).__name__
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    if isinstance(error, sqlite3.Error):
        return f"database error: {text}"
    try:
        import psycopg2
        from txpostgres.reconnection import ConnectionDead
    except ImportError:  # pragma: no cover - both are dependencies
        return f"error: {text}"
    if isinstance(error, psycopg2.Error):
        return f"database error: {text}"
    if isinstance(error, ConnectionDead):
        return "database error: the connection to PostgreSQL is lost"
    return f"unexpected error: {type(error).__name__}: {text}"
