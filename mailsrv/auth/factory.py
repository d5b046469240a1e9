"""Build the user store and the password hasher from the configuration.

The server (``mailsrv.tap``) and the ``mailsrv users`` command both come through here, so they
always agree on which database holds the accounts and how passwords are hashed.
"""

from __future__ import annotations

from typing import Any

from mailsrv.auth.passwords import Argon2Profile, PasswordHasher
from mailsrv.auth.store import IUserStore
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
