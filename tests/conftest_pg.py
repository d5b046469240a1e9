"""A throwaway PostgreSQL cluster for the test session (loaded from tests/conftest.py).

``pg_cluster`` (session scope) runs ``initdb`` into a temporary directory (as the ``postgres``
user when the tests run as root: initdb refuses root), starts it on a free port of 127.0.0.1
with ``fsync=off``, and stops it (``-m fast``) at the end.  ``pg_dsn`` gives every test a fresh,
empty database; ``own_pg_cluster`` is a cluster of one test's own, which it may stop and
start.  Without the server binaries the PostgreSQL tests are skipped with a reason, except
under CI (``$CI`` set), where they fail instead: CI must never skip them.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def find_bindir() -> Path | None:
    """The PostgreSQL server binaries: $PG_BINDIR, the newest /usr/lib/postgresql/*, PATH."""
    candidates = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    versions.sort(key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates.extend(Path(p) for p in reversed(versions))
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class PgCluster:
    """A running throwaway cluster."""

    bindir: Path
    root: Path
    port: int
    user: str = "test"
    _counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        return self.root / "log"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def _as_owner(self, *args: str) -> list[str]:
        command = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *command]
        return command

    def pg_ctl(self, *args: str) -> list[str]:
        """A pg_ctl command line for this cluster (always with -l: see twisted-notes §4)."""
        return self._as_owner("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), *args)

    def restart_command(self) -> list[str]:
        return self.pg_ctl("restart", "-m", "fast", "-w")

    def create_database(self) -> str:
        """A new empty database; returns its DSN."""
        import psycopg2

        name = f"t_{next(self._counter)}"
        conn = psycopg2.connect(self.dsn())
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE {name}")
        finally:
            conn.close()
        return self.dsn(name)

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off"
        )
        subprocess.run(
            self.pg_ctl("-w", "-t", "60", "-o", options, "start"),
            check=True,
            capture_output=True,
            timeout=90,
        )

    def stop(self) -> None:
        subprocess.run(
            self.pg_ctl("-w", "-m", "fast", "stop"), check=False, capture_output=True, timeout=60
        )

    def log_tail(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL tests skipped: {reason}")


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[PgCluster]:
    """initdb a new cluster in a temporary directory, start it, and stop and remove it after
    (skip, or fail under CI, without the binaries)."""
    bindir = find_bindir()
    if bindir is None:
        _unavailable("no PostgreSQL server binaries (initdb, pg_ctl); install postgresql")
        raise AssertionError("unreachable")
    root = Path(tempfile.mkdtemp(prefix="mailsrv-pg-"))
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            _unavailable("running as root and there is no postgres user to run initdb")
            raise AssertionError("unreachable") from None
        os.chown(root, owner.pw_uid, owner.pw_gid)
    cluster = PgCluster(bindir, root, _free_port())
    try:
        subprocess.run(
            cluster._as_owner(
                "initdb",
                "-D",
                str(cluster.data),
                "-A",
                "trust",
                "-U",
                cluster.user,
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        for attempt in range(3):
            try:
                cluster.start()
                break
            except subprocess.CalledProcessError:
                if attempt == 2:
                    raise
                cluster.port = _free_port()  # lost a race for the port: try another
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        output = getattr(e, "stderr", b"") or b""
        log = cluster.log_tail()
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(
            f"cannot start PostgreSQL: {e}\n{output.decode(errors='replace')}\n{log}",
            pytrace=False,
        )
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """Start a throwaway PostgreSQL cluster for the whole session."""
    with throwaway_cluster() as cluster:
        yield cluster


@pytest.fixture
def own_pg_cluster() -> Iterator[PgCluster]:
    """A cluster of this test's own, which it may stop and start without disturbing the
    session's cluster (about a second to make)."""
    with throwaway_cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_dsn(pg_cluster: PgCluster) -> str:
    """The DSN of a fresh, empty database in the session cluster."""
    return pg_cluster.create_database()
