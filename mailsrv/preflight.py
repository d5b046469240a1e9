"""Start-up checks: what the configuration needs from the machine, checked before anything runs.

:mod:`mailsrv.config` checks the values; this module checks that the world agrees with them:
the data directory, the user database (the SQLite file or the PostgreSQL server), the TLS pair,
the Argon2 parameters and the DKIM keys.  ``twistd mailsrv`` and ``mailsrv check-config`` both call
:func:`check`, so a configuration that check-config passes starts, and both print the same one
line (a :class:`PreflightError`) when it does not.

Nothing here creates or changes anything: missing directories and a missing SQLite file are
fine when they can be created (the server creates them), and the database is read, never
migrated (a newer mailsrv's check-config must not upgrade the schema under an older server).
Blocking on purpose: it runs before the reactor does.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mailsrv.auth import migrations
from mailsrv.auth.factory import describe_error, make_hasher, store_location
from mailsrv.auth.passwords import PasswordHasher
from mailsrv.config import Config, display_path
from mailsrv.dkim.keys import KeyDirectory, KeyRing
from mailsrv.dkim.names import DkimError
from mailsrv.tls import ReloadingServerTLS, TLSConfigError
from mailsrv.trust import TrustError, load_trust_root

PG_CONNECT_TIMEOUT = 10  # seconds; libpq's connect_timeout


class PreflightError(Exception):
    """The machine does not fit the configuration; the message is one line for the operator."""


@dataclass(frozen=True)
class StoreFacts:
    """What the user database holds, for the start-up log."""

    location: str
    accounts: int | None  # None: the database does not exist yet (it is created at start)


@dataclass(frozen=True)
class Checked:
    """The results of :func:`check`, ready for the service tree to use."""

    tls: ReloadingServerTLS | None
    hasher: PasswordHasher
    store: StoreFacts
    dkim: KeyRing = field(default_factory=KeyRing)


def check(config: Config) -> Checked:
    """Every check, in the order an operator would fix them; PreflightError on the first."""
    check_data_dir(config)
    if not config.db_url:
        check_sqlite_path(config.sqlite_path)
    tls = check_tls(config)
    check_trust_files(config)
    hasher = check_argon2(config)
    dkim = check_dkim_keys(config)
    return Checked(tls, hasher, check_store(config), dkim)


# --- directories --------------------------------------------------------------------------------


def _stat(label: str, path: Path) -> os.stat_result | None:
    """``path``'s status, None if it does not exist, PreflightError if it cannot be reached."""
    try:
        return path.stat()
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise PreflightError(f"{label}: {_shown(path)}: a parent is not a directory") from None
    except PermissionError:
        raise PreflightError(
            f"{label}: {_shown(path)}: permission denied on a parent directory"
        ) from None
    except OSError as e:
        raise PreflightError(f"{label}: {_shown(path)}: {e.strerror}") from None


def _shown(path: Path | str) -> str:
    return display_path(str(path))


def _creatable(label: str, path: Path) -> None:
    """The missing ``path`` can be created: its nearest existing ancestor is a writable
    directory."""
    parent = path.parent
    while _stat(label, parent) is None and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PreflightError(f"{label}: {_shown(path)}: {_shown(parent)} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PreflightError(
            f"{label}: {_shown(path)}: cannot be created, {_shown(parent)} is not writable"
        )


def _usable_dir(label: str, path: Path) -> None:
    """``path`` is a directory this process can list and write, or can be created."""
    status = _stat(label, path)
    if status is None:
        _creatable(label, path)
        return
    if not path.is_dir():
        raise PreflightError(f"{label}: {_shown(path)}: not a directory")
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise PreflightError(f"{label}: {_shown(path)}: not writable")


def check_data_dir(config: Config) -> None:
    """The data directory and the parts of it the server writes (spool, Maildirs)."""
    for path in (
        Path(config.data_dir),
        config.spool_dir,
        config.spool_dir / "incoming",
        config.mail_dir,
    ):
        _usable_dir("data_dir", path)


def check_sqlite_path(path: Path) -> None:
    """The SQLite file is a writable file in a writable directory, or can be created."""
    status = _stat("db_path", path)
    if status is None:
        _creatable("db_path", path)
        return
    if path.is_dir():
        raise PreflightError(f"db_path: {_shown(path)}: is a directory")
    if not os.access(path, os.R_OK | os.W_OK):
        raise PreflightError(f"db_path: {_shown(path)}: not writable")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise PreflightError(
            f"db_path: {_shown(path)}: its directory is not writable (SQLite keeps its journal"
            " there)"
        )


# --- TLS and Argon2 -------------------------------------------------------------------------


def check_tls(config: Config) -> ReloadingServerTLS | None:
    """The TLS pair loaded as the server loads it, when TLS is on."""
    if not config.enable_tls:
        return None
    try:
        return ReloadingServerTLS(config.tls_cert, config.tls_key)
    except TLSConfigError as e:
        raise PreflightError(str(e)) from None


def check_trust_files(config: Config) -> None:
    """The CA bundle relay TLS verifies against (``relay_ca_file``) holds readable PEM
    certificates (a webhook endpoint's ``ca_file`` is read with the configuration)."""
    if config.relay_ca_file:
        try:
            load_trust_root(config.relay_ca_file)
        except TrustError as e:
            raise PreflightError(f"relay_ca_file: {e}") from None


def check_dkim_keys(config: Config) -> KeyRing:
    """The DKIM keys under ``<data_dir>/dkim``, each readable and usable (none is fine)."""
    try:
        return KeyDirectory(config.dkim_dir).load()
    except DkimError as e:
        raise PreflightError(str(e)) from None


def check_argon2(config: Config) -> PasswordHasher:
    """The hasher, built (one hash computed) with the configured cost."""
    try:
        return make_hasher(config)
    except MemoryError:
        raise PreflightError(
            f"argon2_memory_kib: cannot allocate {config.argon2_memory_kib} KiB for one hash"
        ) from None
    except ValueError as e:
        raise PreflightError(f"argon2: {e}") from None


# --- the user database ----------------------------------------------------------------------


def check_store(config: Config) -> StoreFacts:
    """Reach the user database and read its schema version and account count (no writes)."""
    where = store_location(config)
    try:
        accounts = _pg_accounts(config.db_url) if config.db_url else _sqlite_accounts(config)
    except (migrations.MigrationError, _DatabaseProblem) as e:
        raise PreflightError(f"{_label(config)}: {where}: {e}") from None
    except Exception as e:
        raise PreflightError(f"{_label(config)}: {where}: {describe_error(e)}") from None
    return StoreFacts(where, accounts)


class _DatabaseProblem(Exception):
    """The database cannot be used as it is (the message says why)."""


def _label(config: Config) -> str:
    return "db_url" if config.db_url else "db_path"


def _sqlite_accounts(config: Config) -> int | None:
    path = config.sqlite_path
    if not path.exists():
        return None
    uri = "file:" + quote(os.fsencode(path)) + "?mode=rw"
    conn = sqlite3.connect(uri, uri=True, timeout=5, isolation_level=None)
    try:
        version = migrations.sqlite_version(conn)
        migrations.pending("sqlite", version)  # MigrationError if newer than this mailsrv
        if version == 0:
            return 0
        return int(conn.execute("SELECT count(*) FROM accounts").fetchone()[0])
    finally:
        conn.close()


def _pg_accounts(dsn: str) -> int | None:
    import psycopg2

    try:
        conn: Any = psycopg2.connect(dsn, connect_timeout=PG_CONNECT_TIMEOUT)
    except psycopg2.Error as e:
        first_line = " ".join(str(e).split("\n", 1)[0].split()) or type(e).__name__
        raise _DatabaseProblem(f"cannot connect: {first_line}") from None
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT to_regclass('schema_version') IS NOT NULL")
            version = 0
            if cursor.fetchone()[0]:
                cursor.execute("SELECT max(version) FROM schema_version")
                version = int(cursor.fetchone()[0] or 0)
            if migrations.pending("postgresql", version):  # MigrationError if newer than us
                cursor.execute(
                    "SELECT current_user, current_schema(), current_schema() IS NOT NULL"
                    " AND has_schema_privilege(current_schema(), 'CREATE')"
                )
                user, schema, may_create = cursor.fetchone()
                if not may_create:
                    raise _DatabaseProblem(
                        f"the schema needs creating or upgrading, but role {user} may not"
                        f" create tables in schema {schema or '(none on the search_path)'}"
                    )
            if version == 0:
                return 0
            cursor.execute("SELECT count(*) FROM accounts")
            return int(cursor.fetchone()[0])
    finally:
        conn.rollback()
        conn.close()
