"""Secrets at rest: what mailsrv creates is private whatever the umask; loose modes are reported."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.logger import capturedLogs

from mailsrv.config import Config
from mailsrv.delivery.maildir import MaildirStore
from mailsrv.delivery.spool import Spool
from mailsrv.filemodes import (
    create_private_file,
    loose_modes,
    make_private_dirs,
    private_paths,
    warn_loose_modes,
)
from tests.conftest import make_config

MAILSRV = Path(sys.executable).parent / "mailsrv"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """Umask 0: whatever is private below is private because the code asked for it."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_private_dirs_and_files(tmp_path: Path, permissive_umask: None) -> None:
    created = make_private_dirs(tmp_path / "a" / "b" / "c")
    assert created == [tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"]
    assert [mode(path) for path in created] == [0o700] * 3
    assert make_private_dirs(tmp_path / "a" / "b") == []  # already there
    assert create_private_file(tmp_path / "a" / "f")
    assert mode(tmp_path / "a" / "f") == 0o600
    assert not create_private_file(tmp_path / "a" / "f")  # left alone
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        make_private_dirs(tmp_path / "file")


def test_spool_and_maildirs_are_private(tmp_path: Path, permissive_umask: None) -> None:
    data = tmp_path / "data"
    Spool(data / "spool", defer.maybeDeferred).prepare()
    store = MaildirStore(data / "mail", "mx.example.org")
    store.ensure(store.maildir("alice@example.org"))
    for path in (data, data / "spool", data / "spool" / "incoming", data / "mail"):
        assert mode(path) == 0o700, path
    maildir = store.maildir("alice@example.org")
    for path in (maildir.parent, maildir, maildir / "new", maildir / "tmp", maildir / "cur"):
        assert mode(path) == 0o700, path


@pytest_twisted.ensureDeferred
async def test_sqlite_files_are_private(tmp_path: Path, permissive_umask: None) -> None:
    from twisted.internet import reactor

    from mailsrv.auth.sqlite_store import SQLiteUserStore

    path = tmp_path / "data" / "mailsrv.db"
    store = SQLiteUserStore(path, reactor)
    await store.open()
    try:
        await store.add_account("alice@example.org", "$argon2id$x", None, False, 1.0)
        files = [path, path.with_name("mailsrv.db-wal"), path.with_name("mailsrv.db-shm")]
        assert [mode(p) for p in files] == [0o600] * 3
        assert mode(path.parent) == 0o700
    finally:
        await store.close()


def test_users_command_creates_a_private_database(tmp_path: Path) -> None:
    """``mailsrv users`` run by hand (umask 022, the usual) leaves nothing readable."""
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTP_")}
    env.update(SMTP_DATA_DIR=str(data), SMTP_ARGON2_TIME_COST="1", SMTP_ARGON2_MEMORY_KIB="8")
    env["SMTP_ARGON2_PARALLELISM"] = "1"
    done = subprocess.run(
        [str(MAILSRV), "users", "add", "alice@example.org", "--password-stdin"],
        input="a long enough password\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
        umask=0o022,
    )
    assert done.returncode == 0, done.stderr
    assert mode(data) == 0o700
    assert mode(data / "mailsrv.db") == 0o600


def test_loose_modes_are_found_and_logged(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    data = Path(config.data_dir)
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    config.sqlite_path.write_bytes(b"")
    config.sqlite_path.chmod(0o644)
    config.spool_dir.mkdir(mode=0o700)
    assert loose_modes(private_paths(config)) == [(data, 0o755), (config.sqlite_path, 0o644)]
    with capturedLogs() as events:
        assert warn_loose_modes(config) == 2
    lines = [event["log_format"].format(**event) for event in events]
    assert lines == [
        f"{data} has mode 0755: group and others should have no access (chmod go-rwx)",
        f"{config.sqlite_path} has mode 0644: group and others should have no access"
        " (chmod go-rwx)",
    ]
    assert all(event["log_level"].name == "warn" for event in events)
    data.chmod(0o700)
    config.sqlite_path.chmod(0o600)
    assert loose_modes(private_paths(config)) == []


def test_private_paths_without_sqlite(tmp_path: Path) -> None:
    config: Config = dataclasses.replace(make_config(tmp_path), db_url="postgresql://x/y")
    assert not any(path.name.startswith("mailsrv.db") for path in private_paths(config))
