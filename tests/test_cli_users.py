"""``mailsrv users`` end to end: the installed console script in a subprocess, on SQLite and on
PostgreSQL (``SMTP_DB_URL``), with a cheap Argon2 profile.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import select
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from mailsrv.auth import cram
from mailsrv.auth.factory import open_user_store
from mailsrv.auth.passwords import CHEAP_PROFILE, PasswordHasher
from mailsrv.config import load

MAILSRV = Path(sys.executable).parent / "mailsrv"
ALICE = "alice@example.org"
BOB = "bob@example.org"
PLAINTEXT = "Tr0ub4dor&3 plaintext"


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Cli:
    """Runs ``mailsrv`` against one database and looks inside that database."""

    backend: str
    env: dict[str, str]
    data_dir: Path
    dsn: str = ""

    def __call__(self, *args: str, stdin: str | None = None, **env: str) -> Result:
        done = subprocess.run(
            [str(MAILSRV), *args],
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            env={**self.env, **env},
            timeout=60,
            start_new_session=True,  # no controlling terminal: the prompt cannot be used
        )
        assert "Traceback" not in done.stderr, done.stderr
        return Result(done.returncode, done.stdout, done.stderr)

    def ok(self, *args: str, stdin: str | None = None) -> str:
        result = self(*args, stdin=stdin)
        assert result.code == 0, result
        return result.out

    def rows(self) -> list[tuple[Any, ...]]:
        """Every accounts row: (login, password_hash, cram_md5, enabled, send_as_any)."""
        sql = "SELECT login, password_hash, cram_md5, enabled, send_as_any FROM accounts"
        if self.backend == "sqlite":
            conn = sqlite3.connect(self.data_dir / "mailsrv.db")
            try:
                return [(*r[:3], bool(r[3]), bool(r[4])) for r in conn.execute(sql + " ORDER BY 1")]
            finally:
                conn.close()
        pg = psycopg2.connect(self.dsn)
        try:
            with pg.cursor() as cursor:
                cursor.execute(sql + " ORDER BY 1")
                return list(cursor.fetchall())
        finally:
            pg.close()

    def row(self, login: str) -> tuple[Any, ...]:
        (found,) = [r for r in self.rows() if r[0] == login]
        return found


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTP_")}
    env.update(
        SMTP_DATA_DIR=str(data_dir),
        SMTP_ARGON2_TIME_COST="1",
        SMTP_ARGON2_MEMORY_KIB="8",
        SMTP_ARGON2_PARALLELISM="1",
    )
    return env


@pytest.fixture(params=["sqlite", "postgresql"])
def cli(request: pytest.FixtureRequest, tmp_path: Path) -> Cli:
    data_dir = tmp_path / "data"
    env = _env(data_dir)
    if request.param == "sqlite":
        return Cli("sqlite", env, data_dir)
    dsn = request.getfixturevalue("pg_cluster").create_database()
    env["SMTP_DB_URL"] = dsn
    return Cli("postgresql", env, data_dir, dsn)


@pytest.fixture
def sqlite_cli(tmp_path: Path) -> Cli:
    """For the checks that do not depend on the database."""
    return Cli("sqlite", _env(tmp_path / "data"), tmp_path / "data")


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


# --- on both databases -------------------------------------------------------------------------


def test_add_stores_argon2id_and_cram_md5_never_the_plaintext(cli: Cli) -> None:
    out = cli.ok(
        "users",
        "add",
        "Alice@Example.ORG",
        "--password-stdin",
        "--cram-md5",
        stdin=PLAINTEXT + "\n",
    )
    assert one_line(out) == f"user {ALICE} added"
    _, password_hash, context, enabled, send_as_any = cli.row(ALICE)
    assert password_hash.startswith("$argon2id$")
    assert PasswordHasher(CHEAP_PROFILE).verify(PLAINTEXT, password_hash).ok
    challenge = b"<1896.697170952@mx.example.org>"
    expected = hmac.new(PLAINTEXT.encode(), challenge, hashlib.md5).hexdigest()
    assert cram.expected_response(context, challenge) == expected
    assert (enabled, send_as_any) == (True, False)
    assert PLAINTEXT not in repr(cli.rows())
    if cli.backend == "sqlite":
        for path in cli.data_dir.glob("mailsrv.db*"):
            assert PLAINTEXT.encode() not in path.read_bytes()

    show = cli.ok("users", "show", ALICE)
    assert f"login:       {ALICE}" in show
    assert "enabled:     yes" in show and "cram-md5:    yes" in show
    assert "send-as-any: no" in show and "aliases:     -" in show
    assert re.search(r"created: +\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", show)
    assert re.search(r"updated: +\d{4}-\d\d-\d\dT", show)
    assert password_hash not in show and "$argon2" not in show and context not in show
    assert cli.ok("users", "list") == f"{ALICE}\tenabled\n"


def test_refusals_are_one_line_and_exit_1(cli: Cli) -> None:
    cli.ok("users", "add", ALICE, "--password-stdin", stdin="pw1\n")
    checks = [
        (("users", "add", "ALICE@example.org", "--password-stdin"), f"user {ALICE} already exists"),
        (("users", "show", BOB), f"no such user {BOB}"),
        (("users", "delete", BOB), f"no such user {BOB}"),
        (("users", "enable", BOB), f"no such user {BOB}"),
        (("users", "disable", BOB), f"no such user {BOB}"),
        (("users", "passwd", BOB, "--password-stdin"), f"no such user {BOB}"),
        (
            ("users", "add", "not-an-address", "--password-stdin"),
            "invalid address 'not-an-address'",
        ),
        (("users", "show", "alice@"), "invalid address 'alice@'"),
        (("users", "alias", "add", "info@example.org", BOB), f"no such user {BOB}"),
        (("users", "alias", "delete", "info@example.org"), "no such alias info@example.org"),
    ]
    for args, message in checks:
        result = cli(*args, stdin="pw2\n")
        assert (result.code, one_line(result.err)) == (1, f"mailsrv: {message}"), args
        assert result.out == ""
    assert [r[0] for r in cli.rows()] == [ALICE]
    assert PasswordHasher(CHEAP_PROFILE).verify("pw1", cli.row(ALICE)[1]).ok


def test_enable_disable_passwd_delete(cli: Cli) -> None:
    cli.ok("users", "add", BOB, "--password-stdin", "--send-as-any", stdin="first\n")
    cli.ok("users", "add", ALICE, "--password-stdin", stdin="other\n")
    assert cli.row(BOB)[4] is True
    assert one_line(cli.ok("users", "disable", BOB)) == f"user {BOB} disabled"
    assert cli.ok("users", "list") == f"{ALICE}\tenabled\n{BOB}\tdisabled\n"
    assert "enabled:     no" in cli.ok("users", "show", BOB)
    assert one_line(cli.ok("users", "enable", BOB)) == f"user {BOB} enabled"
    assert cli.row(BOB)[3] is True

    out = cli.ok(
        "users", "passwd", "Bob@example.org", "--password-stdin", "--cram-md5", stdin="second\n"
    )
    assert one_line(out) == f"password of {BOB} changed"
    _, password_hash, context, _, _ = cli.row(BOB)
    hasher = PasswordHasher(CHEAP_PROFILE)
    assert (
        hasher.verify("second", password_hash).ok and not hasher.verify("first", password_hash).ok
    )
    assert context == cram.make_context("second")
    result = cli("users", "passwd", BOB, "--password-stdin", stdin="third\n")
    assert result.code == 0 and "CRAM-MD5 secret of bob@example.org was removed" in result.err
    assert cli.row(BOB)[2] is None

    assert one_line(cli.ok("users", "delete", BOB)) == f"user {BOB} deleted"
    assert cli.ok("users", "list") == f"{ALICE}\tenabled\n"


def test_aliases(cli: Cli) -> None:
    cli.ok("users", "add", ALICE, "--password-stdin", stdin="pw\n")
    cli.ok("users", "add", BOB, "--password-stdin", stdin="pw\n")
    out = cli.ok("users", "alias", "add", "Info@Example.org", ALICE)
    assert one_line(out) == f"alias info@example.org -> {ALICE} added"
    cli.ok("users", "alias", "add", "sales@example.org", ALICE)
    assert cli.ok("users", "alias", "list") == (
        f"info@example.org\t{ALICE}\nsales@example.org\t{ALICE}\n"
    )
    assert "aliases:     info@example.org, sales@example.org" in cli.ok("users", "show", ALICE)
    for args, message in [
        (("info@example.org", BOB), "alias info@example.org already exists"),
        ((BOB, ALICE), f"{BOB} is already a user login"),
        (("bad address", ALICE), "invalid address 'bad address'"),
    ]:
        result = cli("users", "alias", "add", *args)
        assert (result.code, one_line(result.err)) == (1, f"mailsrv: {message}")
    result = cli("users", "add", "info@example.org", "--password-stdin", stdin="pw\n")
    assert (result.code, one_line(result.err)) == (
        1,
        f"mailsrv: info@example.org is already an alias of {ALICE}",
    )
    assert one_line(cli.ok("users", "alias", "delete", "sales@example.org")) == (
        "alias sales@example.org deleted"
    )
    cli.ok("users", "delete", ALICE)  # takes its aliases with it
    assert cli.ok("users", "alias", "list") == ""


@pytest_twisted.ensureDeferred
async def test_works_while_the_server_has_the_store_open(cli: Cli) -> None:
    server_store = open_user_store(load(None, cli.env), reactor)
    await server_store.open()
    try:
        await server_store.add_account(ALICE, "h", None, False, 1.0)
        result = await threads.deferToThread(
            cli, "users", "add", BOB, "--password-stdin", stdin="pw\n"
        )
        assert result.code == 0, result
        assert (await server_store.get_account(BOB)).password_hash.startswith("$argon2id$")
        listed = await threads.deferToThread(cli.ok, "users", "list")
        assert listed == f"{ALICE}\tenabled\n{BOB}\tenabled\n"
    finally:
        await server_store.close()


# --- independent of the database ---------------------------------------------------------------


def test_empty_or_missing_password_refused(sqlite_cli: Cli) -> None:
    for stdin in ("\n", ""):
        result = sqlite_cli("users", "add", ALICE, "--password-stdin", stdin=stdin)
        assert (result.code, one_line(result.err)) == (1, "mailsrv: empty password refused")
    assert sqlite_cli.rows() == []


def test_without_a_terminal_the_prompt_is_refused(sqlite_cli: Cli) -> None:
    result = sqlite_cli("users", "add", ALICE, stdin="pw\n")
    assert result.code == 2
    assert (
        one_line(result.err) == "mailsrv: no terminal to ask for the password: use --password-stdin"
    )


def test_config_and_usage_errors_exit_2(sqlite_cli: Cli, tmp_path: Path) -> None:
    result = sqlite_cli("users", "list", SMTP_PORT="many")
    assert result.code == 2
    assert one_line(result.err) == "mailsrv: environment SMTP_PORT: expected an integer, got 'many'"
    result = sqlite_cli("--config", str(tmp_path / "missing.toml"), "users", "list")
    assert (result.code, one_line(result.err)) == (
        2,
        f"mailsrv: config file {tmp_path / 'missing.toml'}: not found",
    )
    result = sqlite_cli("users", "list", SMTP_DB_URL="mysql://x/y")
    assert (result.code, one_line(result.err)) == (
        2,
        "mailsrv: db_url: expected a postgresql:// URL",
    )
    for args in (("users",), ("users", "add"), ("users", "frob"), ("users", "alias")):
        assert sqlite_cli(*args).code == 2
    assert "--password" not in sqlite_cli("users", "add", "--help").out.replace(
        "--password-stdin", ""
    )


def test_unreachable_database_is_one_line(sqlite_cli: Cli) -> None:
    result = sqlite_cli("users", "list", SMTP_DB_URL="postgresql://u:secret@127.0.0.1:1/db")
    assert result.code == 1
    line = one_line(result.err)
    assert line.startswith("mailsrv: cannot open the user store postgresql://u:***@127.0.0.1:1/db:")
    assert "secret" not in line


# --- the terminal prompt -----------------------------------------------------------------------

# Started as a session leader without a terminal, this opens the pty (which makes it the
# controlling terminal, so getpass can use /dev/tty) and becomes mailsrv.
_TAKE_TTY = (
    "import os, sys; os.close(os.open(os.ttyname(0), os.O_RDWR));"
    " os.execv(sys.argv[1], sys.argv[1:])"
)


def run_on_terminal(env: dict[str, str], args: list[str], answers: list[str]) -> tuple[int, str]:
    """Run mailsrv on a pseudo-terminal, typing each answer after the next prompt."""
    pty = pytest.importorskip("pty")
    try:
        master, slave = pty.openpty()
    except OSError as e:
        pytest.skip(f"no pseudo-terminal: {e}")
    process = subprocess.Popen(
        [sys.executable, "-c", _TAKE_TTY, str(MAILSRV), *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    output = b""
    deadline = time.monotonic() + 30
    pending = list(answers)
    prompts_seen = 0
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"timed out; output so far: {output!r}")
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            output += chunk
            if pending and output.count(b"assword: ") > prompts_seen:
                prompts_seen += 1
                os.write(master, pending.pop(0).encode() + b"\n")
    finally:
        os.close(master)
    return process.wait(timeout=30), output.decode(errors="replace")


def test_password_prompt_on_a_terminal(sqlite_cli: Cli) -> None:
    args = ["users", "add", ALICE]
    code, output = run_on_terminal(sqlite_cli.env, args, [PLAINTEXT, PLAINTEXT])
    assert code == 0, output
    assert "Password: " in output and "Repeat password: " in output
    assert PLAINTEXT not in output  # not echoed
    assert f"user {ALICE} added" in output
    assert PasswordHasher(CHEAP_PROFILE).verify(PLAINTEXT, sqlite_cli.row(ALICE)[1]).ok

    code, output = run_on_terminal(sqlite_cli.env, ["users", "passwd", ALICE], ["one", "two"])
    assert code == 1 and "mailsrv: the passwords do not match" in output
    assert PasswordHasher(CHEAP_PROFILE).verify(PLAINTEXT, sqlite_cli.row(ALICE)[1]).ok


# --- users import ------------------------------------------------------------------------------


def exported_hashes() -> dict[str, str]:
    """Hashes as other servers export them, each of the password ``PLAINTEXT``."""
    from passlib.hash import argon2, bcrypt, sha512_crypt

    return {
        "argon2id": argon2.using(type="ID", rounds=1, memory_cost=8, parallelism=1).hash(PLAINTEXT),
        "bcrypt": "{BLF-CRYPT}" + bcrypt.using(rounds=4).hash(PLAINTEXT),
        "sha512": "{SHA512-CRYPT}" + sha512_crypt.using(rounds=1000).hash(PLAINTEXT),
        "sha512-bare": sha512_crypt.using(rounds=1000).hash(PLAINTEXT),
    }


def test_import_keeps_existing_hashes_that_still_verify(cli: Cli, tmp_path: Path) -> None:
    from mailsrv.auth.passwords import CHEAP_PROFILE, PasswordHasher

    hashes = exported_hashes()
    path = tmp_path / "accounts.csv"
    path.write_text(
        "address,hash,enabled\n"
        f"a1@example.org,{hashes['argon2id']},true\n"
        f"B2@Example.ORG,{hashes['bcrypt']},yes\n"
        f"c3@example.org,{hashes['sha512']},false\n"
        f"d4@example.org,{hashes['sha512-bare']}\n"
    )
    out = cli.ok("users", "import", str(path))
    assert one_line(out) == "imported 4 account(s); 0 row(s) rejected"
    rows = {r[0]: r for r in cli.rows()}
    assert set(rows) == {"a1@example.org", "b2@example.org", "c3@example.org", "d4@example.org"}
    assert rows["b2@example.org"][1] == hashes["bcrypt"], "stored as given, prefix and all"
    assert [rows[k][3] for k in sorted(rows)] == [True, True, False, True]
    hasher = PasswordHasher(CHEAP_PROFILE)
    for login, row in rows.items():
        assert hasher.verify(PLAINTEXT, row[1]).ok, login
        assert not hasher.verify("wrong", row[1]).ok, login


def test_import_json_lines_and_stdin(cli: Cli) -> None:
    hashes = exported_hashes()
    lines = [
        json.dumps({"address": "j1@example.org", "hash": hashes["bcrypt"]}),
        json.dumps({"address": "j2@example.org", "hash": hashes["argon2id"], "enabled": False}),
    ]
    out = cli.ok("users", "import", "-", stdin="\n".join(lines) + "\n")
    assert one_line(out) == "imported 2 account(s); 0 row(s) rejected"
    assert [(r[0], r[3]) for r in cli.rows()] == [
        ("j1@example.org", True),
        ("j2@example.org", False),
    ]


def test_import_rejects_bad_rows_one_line_each_and_dry_run_writes_nothing(
    sqlite_cli: Cli, tmp_path: Path
) -> None:
    hashes = exported_hashes()
    sqlite_cli.ok("users", "add", "taken@example.org", "--password-stdin", stdin="pw\n")
    path = tmp_path / "accounts.csv"
    path.write_text(
        "# exported from the old server\n"
        f"good@example.org,{hashes['bcrypt']}\n"  # line 2
        "plain@example.org,secret\n"  # 3: a plaintext password, not a hash
        f"argon2i@example.org,{hashes['argon2id'].replace('argon2id', 'argon2i')}\n"  # 4
        f"not an address,{hashes['bcrypt']}\n"  # 5
        f"taken@example.org,{hashes['bcrypt']}\n"  # 6
        f"GOOD@example.org,{hashes['sha512']}\n"  # 7: the same login again
        f"flag@example.org,{hashes['bcrypt']},maybe\n"  # 8
        "onlyone@example.org\n"  # 9
        "$6$salt\n"  # 10
    )
    before = sqlite_cli.rows()
    dry = sqlite_cli("users", "import", str(path), "--dry-run")
    assert dry.code == 1
    assert dry.out == "would import 1 account(s); 8 row(s) rejected\n"
    assert sqlite_cli.rows() == before, "a dry run writes nothing"
    errors = dry.err.splitlines()
    assert [e.split(": line ")[1].split(":")[0] for e in errors[:-1]] == [
        "3",
        "4",
        "5",
        "6",
        "7",
        "8",
        "9",
        "10",
    ]
    assert "is also on line 2" in errors[4] and "already exists" in errors[3]
    assert errors[-1] == f"mailsrv: 8 row(s) of {path} not imported"
    real = sqlite_cli("users", "import", str(path))
    assert real.code == 1 and real.out == "imported 1 account(s); 8 row(s) rejected\n"
    assert [r[0] for r in sqlite_cli.rows()] == ["good@example.org", "taken@example.org"]


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "No such file or directory"), (b"\xff\xfe", "not UTF-8 text")],
)
def test_import_of_a_missing_or_binary_file_is_one_line(
    sqlite_cli: Cli, tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "accounts.csv"
    if content is not None:
        path.write_bytes(content)
    result = sqlite_cli("users", "import", str(path))
    assert result.code == 2
    assert one_line(result.err) == f"mailsrv: {path}: {message}"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_run_as_root_it_writes_as_the_database_owner() -> None:
    """An operator's ``sudo mailsrv users add`` must not leave a database the server, running
    as its own user, cannot open."""
    nobody = 65534
    top = Path(tempfile.mkdtemp(prefix="mailsrv-owner-"))  # pytest's tmp is root-only (0700)
    try:
        top.chmod(0o755)
        data_dir = top / "data"
        data_dir.mkdir()
        os.chown(data_dir, nobody, nobody)
        users = Cli("sqlite", _env(data_dir), data_dir)
        users.ok("users", "add", "alice@example.org", "--password-stdin", stdin="pw-one\n")
        created = sorted(p.name for p in data_dir.iterdir() if p.stat().st_uid != nobody)
        assert created == [], f"written as root: {created}"
        users.ok("users", "passwd", "alice@example.org", "--password-stdin", stdin="pw-two\n")
        assert (data_dir / "mailsrv.db").stat().st_uid == nobody
    finally:
        shutil.rmtree(top)
