"""The operator commands README.rst documents, run as written (paths swapped for the test's).

The backup commands are taken from the README itself, so a change there that breaks them
fails here: SQLite's online backup (the ``sqlite3`` CLI and the Python one-liner) of a
database the user store has open, with its latest writes still in the ``-wal`` file, and
``pg_dump``/``pg_restore`` of a PostgreSQL user store.  The production configuration example
must load as written.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from mailsrv.auth.pg_store import PostgresUserStore
from mailsrv.auth.sqlite_store import SQLiteUserStore
from mailsrv.config import load

README = Path(__file__).resolve().parent.parent / "README.rst"
LIVE_DB = "/var/lib/mailsrv/mailsrv.db"
BACKUP_DB = "/var/backups/mailsrv/mailsrv.db"
PG_DUMP = "/var/backups/mailsrv/mailsrv.pgdump"

ACCOUNTS = [
    ("alice@example.org", "$2b$04$EOC19BX1NDv1xGHiw9sfpeE/58N/YekuheXHRp5885RARTOiBGdcG"),
    ("bob@example.org", "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"),
]


def readme_command(prefix: str) -> str:
    """The one command line of the README that starts with ``prefix`` (it may be repeated)."""
    lines = {line.strip() for line in README.read_text(encoding="utf-8").splitlines()}
    found = sorted(line for line in lines if line.startswith(prefix))
    assert len(found) == 1, f"expected one README line starting with {prefix!r}, got {found}"
    return found[0]


def as_argv(line: str, swaps: dict[str, str]) -> list[str]:
    """The line's words without ``sudo -u USER``, each word's paths swapped."""
    words = shlex.split(line)
    if words[:2] == ["sudo", "-u"]:
        words = words[3:]
    for old, new in swaps.items():
        words = [word.replace(old, new) for word in words]
    return words


async def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    result: subprocess.CompletedProcess[bytes] = await threads.deferToThread(
        subprocess.run, argv, capture_output=True, timeout=60, check=False, **kwargs
    )
    assert result.returncode == 0, result.stderr
    return result


async def fill(store: Any) -> None:
    await store.open()
    for login, hashed in ACCOUNTS:
        await store.add_account(login, hashed, None, False, 100.0)
    await store.add_alias("info@example.org", "alice@example.org", 100.0)


async def contents(store: Any) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The accounts (login, hash) and the aliases of a store, which is then closed."""
    await store.open()
    try:
        accounts = [(a.login, a.password_hash) for a in await store.list_accounts()]
        return accounts, await store.list_aliases()
    finally:
        await store.close()


SQLITE_BACKUPS = [
    pytest.param(
        "sudo -u mailsrv sqlite3 ",
        marks=pytest.mark.skipif(shutil.which("sqlite3") is None, reason="no sqlite3 command"),
        id="sqlite3",
    ),
    pytest.param("sudo -u mailsrv /opt/mailsrv/bin/python -c ", id="python"),
]


@pytest.mark.parametrize("prefix", SQLITE_BACKUPS)
@pytest_twisted.ensureDeferred
async def test_the_sqlite_online_backup_copies_a_database_in_use(
    tmp_path: Path, prefix: str
) -> None:
    live = tmp_path / "var" / "mailsrv.db"
    copy = tmp_path / "backups" / "mailsrv.db"
    copy.parent.mkdir()
    store = SQLiteUserStore(live, reactor)
    await fill(store)
    try:
        # The store is open and its writes are still in the write-ahead log, not the file.
        assert live.with_name("mailsrv.db-wal").stat().st_size > 0
        python = "/opt/mailsrv/bin/python"
        swaps = {LIVE_DB: str(live), BACKUP_DB: str(copy), python: sys.executable}
        await run(as_argv(readme_command(prefix), swaps))
    finally:
        await store.close()
    accounts, aliases = await contents(SQLiteUserStore(copy, reactor))
    assert accounts == ACCOUNTS
    assert aliases == [("info@example.org", "alice@example.org")]


def with_word(words: list[str], old: str, new: str) -> list[str]:
    """``words`` with the one word ``old`` replaced by ``new``."""
    assert words.count(old) == 1, (old, words)
    return [new if word == old else word for word in words]


@pytest_twisted.ensureDeferred
async def test_pg_dump_and_pg_restore_as_documented(pg_cluster: Any, tmp_path: Path) -> None:
    source, target = pg_cluster.create_database(), pg_cluster.create_database()
    await fill(PostgresUserStore(source, reactor))
    dump_file = tmp_path / "mailsrv.pgdump"
    dump_line, _, written_to = readme_command("sudo -u postgres pg_dump ").partition(" > ")
    assert written_to == PG_DUMP
    # The database named "mailsrv" is the test's, given by its URL; the binaries the cluster's.
    dump = with_word(as_argv(dump_line, {}), "mailsrv", source)
    dump_file.write_bytes((await run([str(pg_cluster.bindir / dump[0]), *dump[1:]])).stdout)
    restore = as_argv(readme_command("sudo -u postgres pg_restore "), {PG_DUMP: str(dump_file)})
    restore = with_word(restore, "--role=mailsrv", f"--role={pg_cluster.user}")
    restore = with_word(restore, "mailsrv", target)  # the one after -d
    await run([str(pg_cluster.bindir / restore[0]), *restore[1:]])
    accounts, aliases = await contents(PostgresUserStore(target, reactor))
    assert accounts == ACCOUNTS
    assert aliases == [("info@example.org", "alice@example.org")]


def documented_config() -> str:
    """The production example configuration of 'Running under systemd'."""
    text = README.read_text(encoding="utf-8")
    start = text.index('       hostname = "mx.example.org"\n')
    end = text.index("\n\n", start)
    return "\n".join(line.strip() for line in text[start:end].splitlines()) + "\n"


def test_the_production_example_configuration_loads(tmp_path: Path) -> None:
    path = tmp_path / "mailsrv.toml"
    path.write_text(documented_config(), encoding="utf-8")
    config = load(str(path), {})
    assert (config.port, config.submission_port, config.smtps_port) == (25, 587, 465)
    assert config.local_domains == ("example.org",)
    assert config.enable_tls and config.enable_auth
    assert config.tls_cert == "/etc/mailsrv/tls/fullchain.pem"
    assert config.metrics_port == 9025
