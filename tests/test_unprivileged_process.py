"""``twistd mailsrv`` as an unprivileged user: private file modes and all-or-nothing delivery.

The tests may run as root, which ignores directory permissions; the server here drops to
``nobody`` (umask 022, the usual default) in a data directory it owns, so a Maildir whose
``new/`` is ``0500`` really refuses the link.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import smtplib
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_process import Server, free_port, message, wait_for

ALICE = "alice@example.org"
BOB = "bob@example.org"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def unprivileged() -> tuple[tuple[int, int] | None, list[str]]:
    """(uid, gid) of ``nobody`` and the ``setpriv`` prefix that drops to it, when the tests run
    as root; (None, []) when they already run unprivileged.

    When the interpreter lives where ``nobody`` cannot reach it (a Python under ``/root``), the
    server keeps CAP_DAC_READ_SEARCH, which lets it read and search any path but not write: the
    write checks this test is about still apply.
    """
    if os.geteuid() != 0:
        return None, []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv is needed to run the server as another user")
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user to run the server as")
    prefix = [setpriv, f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]
    interpreter = Path(os.path.realpath(sys.executable))
    if any(not mode(parent) & stat.S_IXOTH for parent in interpreter.parents):
        prefix += ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    return (entry.pw_uid, entry.pw_gid), [*prefix, "--"]


@pytest.fixture
def server() -> Iterator[Server]:
    user, prefix = unprivileged()
    base = Path(tempfile.mkdtemp(prefix="mailsrv-unprivileged-"))
    if user is not None:
        os.chown(base, *user)
    port = free_port()
    server = Server(
        workdir=base,
        data_dir=base / "data",
        port=port,
        submission_port=free_port(port),
        extra_env={"SMTP_MAILBOXES": f"{ALICE},{BOB}"},
        command_prefix=prefix,
    )
    umask = os.umask(0o022)  # the usual default, inherited by the server
    try:
        yield server
    finally:
        os.umask(umask)
        server.kill()
        shutil.rmtree(base, ignore_errors=True)


def send(port: int, token: str, recipients: tuple[str, ...] = (ALICE, BOB)) -> int:
    """One transaction; the DATA reply code."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("bob@remote.test")[0] == 250
        for recipient in recipients:
            assert client.rcpt(recipient)[0] == 250
        code, _ = client.data(message(token))
        return code


def new(server: Server, mailbox: str) -> Path:
    local, _, domain = mailbox.partition("@")
    return server.data_dir / "mail" / domain / local / "new"


def copies(server: Server, mailbox: str, token: str) -> int:
    return sum(f"END {token}\n".encode() in p.read_bytes() for p in new(server, mailbox).iterdir())


def test_private_modes_and_all_or_nothing(server: Server) -> None:
    server.start()
    assert send(server.port, "first-3c1a") == 250
    data = server.data_dir
    owner = (unprivileged()[0] or (os.geteuid(), 0))[0]

    # Everything the server made is its own and private, though its umask is 022.
    directories = [data, data / "spool", server.incoming, data / "mail", data / "mail/example.org"]
    for mailbox in (ALICE, BOB):
        maildir = new(server, mailbox).parent
        directories += [maildir, maildir / "new", maildir / "tmp", maildir / "cur"]
    files = [*new(server, ALICE).iterdir(), *new(server, BOB).iterdir()]
    database = data / "mailsrv.db"
    files += [database, data / "mailsrv.db-wal", data / "mailsrv.db-shm"]
    assert {path: mode(path) for path in directories} == dict.fromkeys(directories, 0o700)
    assert {path: mode(path) for path in files} == dict.fromkeys(files, 0o600)
    assert {path.stat().st_uid for path in directories + files} == {owner}

    # bob's Maildir refuses writes: the message reaches neither mailbox, and the client is told
    # to try again.
    new(server, BOB).chmod(0o500)
    try:
        assert send(server.port, "second-77e0") == 451
        assert (copies(server, ALICE, "second-77e0"), copies(server, BOB, "second-77e0")) == (0, 0)
        wait_for(lambda: list(server.incoming.iterdir()) == [], 10, "the spool file's removal")
    finally:
        new(server, BOB).chmod(0o700)
    # The retry, once the Maildir is fixed: exactly one copy each.
    assert send(server.port, "second-77e0") == 250
    assert (copies(server, ALICE, "second-77e0"), copies(server, BOB, "second-77e0")) == (1, 1)
    assert len(list(new(server, ALICE).iterdir())) == len(list(new(server, BOB).iterdir())) == 2

    # A Maildir removed while the server runs is made again by the next delivery.
    shutil.rmtree(new(server, ALICE).parent)
    assert send(server.port, "third-0b9d", (ALICE,)) == 250
    assert copies(server, ALICE, "third-0b9d") == 1
    assert mode(new(server, ALICE)) == 0o700
    assert server.stop() in (-signal.SIGTERM, 128 + signal.SIGTERM)

    # Modes loosened by hand are reported at the next start (and left alone).
    data.chmod(0o755)
    database.chmod(0o644)
    server.start()
    log = server.log()
    assert f"{data} has mode 0755: group and others should have no access" in log
    assert f"{database} has mode 0644: group and others should have no access" in log
    assert server.stop() in (-signal.SIGTERM, 128 + signal.SIGTERM)
    assert mode(data) == 0o755
