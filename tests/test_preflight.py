"""Start-up checks: every broken data dir, database, TLS pair and Argon2 cost, from both commands.

Each case runs ``mailsrv check-config`` and ``twistd -n mailsrv`` as real processes and expects
the same single line from both, a non-zero exit, no traceback, and never "configuration OK".
Cases about permissions need an unprivileged process: as root they run under ``setpriv``
without the capabilities that bypass file permissions.
"""

from __future__ import annotations

import dataclasses
import os
import pty
import shlex
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from mailsrv.auth import migrations
from mailsrv.config import SETTINGS
from mailsrv.preflight import PreflightError, StoreFacts, check, check_store
from tests.conftest import make_config
from tests.test_config import MAILSRV
from tests.test_process import EXIT_TIMEOUT, TWISTD, base_env, free_port
from tests.test_tls import CertFiles, encrypt_key

CHEAP_ARGON2 = {
    "SMTP_ARGON2_TIME_COST": "1",
    "SMTP_ARGON2_MEMORY_KIB": "8",
    "SMTP_ARGON2_PARALLELISM": "1",
}
# Without these the process is an ordinary user as far as file permissions go.
UNPRIVILEGED = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]


def start_env(tmp: Path, **overrides: str) -> dict[str, str]:
    """A configuration that starts (apart from what ``overrides`` breaks)."""
    env = base_env(
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=str(free_port()),
        SMTP_SUBMISSION_PORT="0",
        SMTP_LOCAL_DOMAINS="example.org",
        SMTP_DATA_DIR=str(tmp / "data"),
        **CHEAP_ARGON2,
    )
    if "smtps_port" in SETTINGS:
        env["SMTP_SMTPS_PORT"] = "0"
    env.update(overrides)
    return env


def _prefix(unprivileged: bool) -> list[str]:
    if not unprivileged or os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot test file permissions")
    return UNPRIVILEGED


def run_both(
    env: dict[str, str], cwd: Path, unprivileged: bool = False
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """``mailsrv check-config`` and ``twistd -n mailsrv`` with ``env``."""
    prefix = _prefix(unprivileged)

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*prefix, *command],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=EXIT_TIMEOUT,
            check=False,
        )

    return run(MAILSRV, "check-config"), run(TWISTD, "-n", "--pidfile=", "mailsrv")


def assert_one_line(
    checked: subprocess.CompletedProcess[str],
    started: subprocess.CompletedProcess[str],
    expected: str,
) -> None:
    """Both commands refused the configuration with exactly ``mailsrv: <expected>``."""
    for result in (checked, started):
        assert "Traceback" not in result.stdout + result.stderr, result.stderr
        assert "configuration OK" not in result.stdout + result.stderr
    assert (checked.returncode, checked.stdout, checked.stderr) == (2, "", f"mailsrv: {expected}\n")
    assert started.returncode != 0
    assert started.stderr.splitlines() == [f"mailsrv: {expected}"], started.stderr
    assert started.stdout == ""


# --- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One broken start: ``setup(tmp)`` returns the environment changes."""

    id: str
    setup: Callable[[Path], dict[str, str]]
    expected: str  # {tmp} is the test's directory
    unprivileged: bool = False


def _mkdir(path: Path, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    return path


def _file(path: Path, content: bytes = b"", mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    path.chmod(mode)
    return path


def _chmod(path: Path, mode: int) -> Path:
    path.chmod(mode)
    return path


def _data(path: Path) -> dict[str, str]:
    return {"SMTP_DATA_DIR": str(path)}


def _db(path: Path) -> dict[str, str]:
    return {"SMTP_DB_PATH": str(path)}


def _sqlite(path: Path, schema_version: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    try:
        if schema_version is not None:
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO schema_version VALUES (?)", (schema_version,))
            conn.commit()
    finally:
        conn.close()
    return path


def _tls(tmp: Path, damage: Callable[[CertFiles], None] | None = None) -> dict[str, str]:
    certs = CertFiles(tmp / "tls", trustme.KeyType.RSA)
    if damage is not None:
        damage(certs)
    return {
        "SMTP_ENABLE_TLS": "true",
        "SMTP_TLS_CERT": str(certs.chain),
        "SMTP_TLS_KEY": str(certs.key),
    }


def _other_key(certs: CertFiles) -> None:
    other = trustme.CA().issue_cert("mx.example.org")
    certs.key.write_bytes(other.private_key_pem.bytes())


UNDECODABLE = "bad-\udcff\udcfe"  # bytes 0xff 0xfe in a file name, as Python decodes them

CASES = [
    Case(
        "data-dir-is-a-file",
        lambda t: _data(_file(t / "data")),
        "data_dir: {tmp}/data: not a directory",
    ),
    Case(
        "data-dir-parent-is-a-file",
        lambda t: _data(_file(t / "file") / "data"),
        "data_dir: {tmp}/file/data: a parent is not a directory",
    ),
    Case(
        "data-dir-not-writable",
        lambda t: _data(_mkdir(t / "data", 0o500)),
        "data_dir: {tmp}/data: not writable",
        unprivileged=True,
    ),
    Case(
        "data-dir-cannot-be-created",
        lambda t: _data(_mkdir(t / "readonly", 0o500) / "data"),
        "data_dir: {tmp}/readonly/data: cannot be created, {tmp}/readonly is not writable",
        unprivileged=True,
    ),
    Case(
        "data-dir-under-unreadable-parent",
        lambda t: _data(_chmod(_mkdir(t / "closed" / "data").parent, 0o000) / "data"),
        "data_dir: {tmp}/closed/data: permission denied on a parent directory",
        unprivileged=True,
    ),
    Case(
        "spool-is-a-file",
        lambda t: _data(_file(t / "data" / "spool").parent),
        "data_dir: {tmp}/data/spool: not a directory",
    ),
    Case(
        "maildirs-not-writable",
        lambda t: _data(_mkdir(t / "data" / "mail", 0o500).parent),
        "data_dir: {tmp}/data/mail: not writable",
        unprivileged=True,
    ),
    Case(
        "data-dir-undecodable-name",
        lambda t: _data(_file(t / UNDECODABLE)),
        "data_dir: {tmp}/bad-\\xff\\xfe: not a directory",
    ),
    Case(
        "db-path-is-a-directory",
        lambda t: _db(_mkdir(t / "users.db")),
        "db_path: {tmp}/users.db: is a directory",
    ),
    Case(
        "db-file-not-writable",
        lambda t: _db(_chmod(_sqlite(t / "db" / "users.db"), 0o400)),
        "db_path: {tmp}/db/users.db: not writable",
        unprivileged=True,
    ),
    Case(
        "db-directory-not-writable",
        lambda t: _db(_chmod(_sqlite(t / "db" / "users.db").parent, 0o500) / "users.db"),
        "db_path: {tmp}/db/users.db: its directory is not writable"
        " (SQLite keeps its journal there)",
        unprivileged=True,
    ),
    Case(
        "db-cannot-be-created",
        lambda t: _db(_mkdir(t / "db", 0o500) / "users.db"),
        "db_path: {tmp}/db/users.db: cannot be created, {tmp}/db is not writable",
        unprivileged=True,
    ),
    Case(
        "db-not-sqlite",
        lambda t: _db(_file(t / "users.db", b"this is not a database, just text\n" * 40)),
        "db_path: {tmp}/users.db: database error: file is not a database",
    ),
    Case(
        "db-schema-newer",
        lambda t: _db(_sqlite(t / "users.db", schema_version=99)),
        "db_path: {tmp}/users.db: database schema version 99 is newer than this mailsrv"
        " (knows 3): upgrade mailsrv",
    ),
    Case(
        "db-url-unreachable",
        lambda t: {"SMTP_DB_URL": f"postgresql://mailsrv@127.0.0.1:{_closed_port(t)}/mailsrv"},
        "db_url: postgresql://mailsrv@127.0.0.1:{port}/mailsrv: cannot connect: connection to"
        ' server at "127.0.0.1", port {port} failed: Connection refused',
    ),
    Case(
        "db-url-password-not-shown",
        lambda t: {"SMTP_DB_URL": f"postgresql://u:s3cret@127.0.0.1:{_closed_port(t)}/db"},
        "db_url: postgresql://u:***@127.0.0.1:{port}/db: cannot connect: connection to"
        ' server at "127.0.0.1", port {port} failed: Connection refused',
    ),
    Case(
        "cert-missing",
        lambda t: _tls(t, lambda c: c.chain.unlink()),
        "tls_cert: {tmp}/tls/chain.pem: no such file",
    ),
    Case(
        "key-missing",
        lambda t: _tls(t, lambda c: c.key.unlink()),
        "tls_key: {tmp}/tls/key.pem: no such file",
    ),
    Case(
        "cert-unreadable",
        lambda t: _tls(t, lambda c: c.chain.chmod(0o000)),
        "tls_cert: {tmp}/tls/chain.pem: cannot read: Permission denied",
        unprivileged=True,
    ),
    Case(
        "key-unreadable",
        lambda t: _tls(t, lambda c: c.key.chmod(0o000)),
        "tls_key: {tmp}/tls/key.pem: cannot read: Permission denied",
        unprivileged=True,
    ),
    Case(
        "cert-garbage",
        lambda t: _tls(t, lambda c: c.chain.write_text("garbage\n")),
        "tls_cert: {tmp}/tls/chain.pem: not a PEM certificate chain (no start line)",
    ),
    Case(
        "key-garbage",
        lambda t: _tls(t, lambda c: c.key.write_text("garbage\n")),
        "tls_key: {tmp}/tls/key.pem: not a PEM private key",
    ),
    Case(
        "key-mismatched",
        lambda t: _tls(t, _other_key),
        "tls_key: {tmp}/tls/key.pem: does not match the certificate",
    ),
    Case(
        "key-needs-a-passphrase",
        lambda t: _tls(t, lambda c: encrypt_key(c.key)),
        "tls_key: {tmp}/tls/key.pem: the key is protected by a passphrase, which mailsrv cannot"
        " ask for; decrypt it (openssl pkey -in KEY -out NEW) and keep it readable to mailsrv"
        " only",
    ),
    Case(
        "cert-path-undecodable",
        lambda t: {**_tls(t), "SMTP_TLS_CERT": str(t / f"{UNDECODABLE}.pem")},
        "tls_cert: {tmp}/bad-\\xff\\xfe.pem: no such file",
    ),
    Case(
        "key-path-undecodable",
        lambda t: {**_tls(t), "SMTP_TLS_KEY": str(t / f"{UNDECODABLE}.key")},
        "tls_key: {tmp}/bad-\\xff\\xfe.key: no such file",
    ),
    Case(
        "argon2-time-cost-0",
        lambda t: {"SMTP_ARGON2_TIME_COST": "0"},
        "environment SMTP_ARGON2_TIME_COST: must be between 1 and 100, got 0",
    ),
    Case(
        "argon2-memory-too-small",
        lambda t: {"SMTP_ARGON2_MEMORY_KIB": "4"},
        "environment SMTP_ARGON2_MEMORY_KIB: must be between 8 and 4194304, got 4",
    ),
    Case(
        "argon2-memory-below-8-per-lane",
        lambda t: {"SMTP_ARGON2_MEMORY_KIB": "16", "SMTP_ARGON2_PARALLELISM": "4"},
        "environment SMTP_ARGON2_MEMORY_KIB: must be at least 8 KiB per lane"
        " (32 for argon2_parallelism 4), got 16",
    ),
    Case(
        "argon2-lanes-raised-past-memory",
        lambda t: {"SMTP_ARGON2_PARALLELISM": "2"},
        "environment SMTP_ARGON2_MEMORY_KIB: must be at least 8 KiB per lane"
        " (16 for argon2_parallelism 2), got 8",
    ),
    Case(
        "argon2-parallelism-0",
        lambda t: {"SMTP_ARGON2_PARALLELISM": "0"},
        "environment SMTP_ARGON2_PARALLELISM: must be between 1 and 64, got 0",
    ),
    Case(
        "argon2-time-cost-huge",
        lambda t: {"SMTP_ARGON2_TIME_COST": "1000"},
        "environment SMTP_ARGON2_TIME_COST: must be between 1 and 100, got 1000",
    ),
    Case(
        "relay-ca-file-missing",
        lambda t: {"SMTP_RELAY_HOST": "smarthost.example", "SMTP_RELAY_CA_FILE": f"{t}/ca.pem"},
        "relay_ca_file: {tmp}/ca.pem: No such file or directory",
    ),
    Case(
        "relay-ca-file-not-pem",
        lambda t: {"SMTP_RELAY_CA_FILE": str(_file(t / "ca.pem", b"not a certificate"))},
        "relay_ca_file: {tmp}/ca.pem: no PEM certificate in it",
    ),
    Case(
        "local-domains-empty",
        lambda t: {"SMTP_LOCAL_DOMAINS": ""},
        "environment SMTP_LOCAL_DOMAINS: empty: at least one local domain is needed",
    ),
    Case(
        "local-domains-only-commas",
        lambda t: {"SMTP_LOCAL_DOMAINS": " , ,"},
        "environment SMTP_LOCAL_DOMAINS: empty: at least one local domain is needed",
    ),
]


def _closed_port(tmp: Path) -> int:
    """A port nothing listens on (remembered for the expected message)."""
    port = free_port()
    (tmp / "closed-port").write_text(str(port))
    return port


def _open_up(root: Path) -> None:
    """Give the owner back every permission the case took, so tmp_path can be removed."""
    for folder, dirs, files in os.walk(root, topdown=True):
        for name in dirs + files:
            path = Path(folder) / name
            if not path.is_symlink():
                path.chmod(0o700)
        dirs[:] = [d for d in dirs if os.access(Path(folder) / d, os.X_OK)]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_broken_start_is_one_line_from_both_commands(tmp_path: Path, case: Case) -> None:
    cwd = _mkdir(tmp_path / "cwd")
    try:
        env = start_env(tmp_path, **case.setup(tmp_path))
        checked, started = run_both(env, cwd, case.unprivileged)
    finally:
        _open_up(tmp_path)
    port = (tmp_path / "closed-port").read_text() if (tmp_path / "closed-port").exists() else ""
    assert_one_line(checked, started, case.expected.format(tmp=tmp_path, port=port))
    assert not (tmp_path / "data" / "mailsrv.db").exists()  # nothing was created


def test_the_table_starts_when_nothing_is_broken(tmp_path: Path) -> None:
    """The base configuration of the table is good: each case fails for its own reason."""
    cwd = _mkdir(tmp_path / "cwd")
    env = start_env(tmp_path, **_tls(tmp_path))
    checked = subprocess.run(
        [MAILSRV, "check-config", "-q"], env=env, cwd=cwd, capture_output=True, text=True
    )
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")


def test_undecodable_tls_paths_that_exist_work(tmp_path: Path) -> None:
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/tls-\xff"))
    certs = CertFiles(folder)
    env = start_env(
        tmp_path,
        SMTP_ENABLE_TLS="true",
        SMTP_TLS_CERT=str(certs.chain),
        SMTP_TLS_KEY=str(certs.key),
    )
    result = subprocess.run(
        [MAILSRV, "check-config"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert f"SMTP_TLS_CERT={tmp_path}/tls-\\xff/chain.pem" in result.stdout.splitlines()
    assert result.stderr == "configuration OK\n"


# --- a passphrase never prompts, on a terminal or not ------------------------------------------


def _on_a_terminal(command: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run ``command`` under ``script`` (a pty as its controlling terminal) whose own input is a
    terminal that never types anything: a prompt would wait forever (and time out here)."""
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen(
            ["script", "-qec", shlex.join(command), "/dev/null"],
            env=env,
            cwd=cwd,
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            output, _ = process.communicate(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            raise AssertionError(f"no exit: waiting for input? {output!r}") from None
    finally:
        os.close(master)
        os.close(slave)
    return process.returncode, output.decode(errors="replace")


@pytest.mark.skipif(shutil.which("script") is None, reason="script(1) not installed")
def test_passphrase_key_gives_one_line_on_a_terminal(tmp_path: Path) -> None:
    env = start_env(tmp_path, **_tls(tmp_path, lambda c: encrypt_key(c.key)))
    expected = f"mailsrv: tls_key: {tmp_path}/tls/key.pem: the key is protected by a passphrase"
    for command in ([MAILSRV, "check-config"], [TWISTD, "-n", "--pidfile=", "mailsrv"]):
        started = time.monotonic()
        status, output = _on_a_terminal(command, env, tmp_path)
        assert status != 0, output
        lines = [line for line in output.replace("\r", "").split("\n") if line]
        assert len(lines) == 1 and lines[0].startswith(expected), output
        assert "pass phrase" not in output.lower() and "Traceback" not in output
        assert time.monotonic() - started < 15


def test_passphrase_key_with_stdin_closed_or_a_silent_pipe(tmp_path: Path) -> None:
    env = start_env(tmp_path, **_tls(tmp_path, lambda c: encrypt_key(c.key)))
    silent_read, silent_write = os.pipe()  # open, never written: a read would wait forever
    try:
        for stdin in (subprocess.DEVNULL, silent_read):
            for command in ([MAILSRV, "check-config"], [TWISTD, "-n", "--pidfile=", "mailsrv"]):
                result = subprocess.run(
                    command,
                    env=env,
                    cwd=tmp_path,
                    stdin=stdin,
                    capture_output=True,
                    text=True,
                    timeout=EXIT_TIMEOUT,
                    check=False,
                )
                assert result.returncode != 0
                assert result.stdout == ""
                assert result.stderr.count("\n") == 1
                assert "protected by a passphrase" in result.stderr
    finally:
        os.close(silent_read)
        os.close(silent_write)


# --- PostgreSQL: a role that cannot create the tables -----------------------------------------


def test_postgresql_role_without_create_privilege(tmp_path: Path, pg_dsn: str) -> None:
    import psycopg2

    conn = psycopg2.connect(pg_dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute("DROP ROLE IF EXISTS mailsrv_reader")
            cursor.execute("CREATE ROLE mailsrv_reader LOGIN")
    finally:
        conn.close()
    dsn = pg_dsn.replace("//test@", "//mailsrv_reader@")
    checked, started = run_both(start_env(tmp_path, SMTP_DB_URL=dsn), tmp_path)
    assert_one_line(
        checked,
        started,
        f"db_url: {dsn}: the schema needs creating or upgrading, but role mailsrv_reader may"
        " not create tables in schema public",
    )


# --- in-process: what check() returns ----------------------------------------------------------


def test_check_counts_accounts_and_hands_over_the_tls_pair(tmp_path: Path) -> None:
    certs = CertFiles(tmp_path / "tls")
    config = make_config(
        tmp_path,
        enable_tls=True,
        tls_cert=str(certs.chain),
        tls_key=str(certs.key),
        argon2_time_cost=1,
        argon2_memory_kib=8,
        argon2_parallelism=1,
    )
    checked = check(config)
    assert checked.tls is not None and checked.tls.cert_path == str(certs.chain)
    assert checked.hasher.profile.memory_kib == 8
    assert checked.store == StoreFacts(str(config.sqlite_path), None)  # created at start
    assert not config.sqlite_path.exists() and not Path(config.data_dir).exists()
    _sqlite(config.sqlite_path)
    assert check_store(config).accounts == 0  # an empty file: migrated at start
    conn = sqlite3.connect(config.sqlite_path, isolation_level=None)
    try:
        migrations.apply_sqlite(conn)
        conn.execute(
            "INSERT INTO accounts VALUES ('alice@example.org', 'x', NULL, 1, 0, 0, 0),"
            " ('bob@example.org', 'y', NULL, 1, 0, 0, 0)"
        )
    finally:
        conn.close()
    assert check_store(config).accounts == 2
    with pytest.raises(PreflightError) as caught:
        check_store(dataclasses.replace(config, db_url="postgresql://x@127.0.0.1:1/x"))
    assert str(caught.value).startswith("db_url: postgresql://x@127.0.0.1:1/x: cannot connect: ")
