"""A foreign MTA as the next hop: our client relays to a throwaway Postfix on loopback.

The Postfix instance has its own config, queue and Maildir under a temporary directory, listens
on a free port of 127.0.0.1 only, and is stopped (and its processes killed if need be) after the
test.  Without Postfix installed the test is skipped, except under CI (``$CI`` set), where it
fails: CI installs Debian's postfix package and must run it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import task, threads

from mailsrv.relay.connector import Connector
from mailsrv.relay.message import OutboundMessage, OutboundRecipient
from mailsrv.relay.options import TLS_MAY, ClientOptions
from mailsrv.relay.resolver import Candidate

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
local     unix  - n n - - local
virtual   unix  - n n - - virtual
lmtp      unix  - - n - - lmtp
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def _available() -> str | None:
    """Why a throwaway Postfix cannot run here, or None."""
    if not os.path.exists(POSTFIX):
        return "postfix is not installed (Debian package postfix)"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "no postfix user"
    if os.geteuid() != 0:
        return "a Postfix instance needs root"
    return None


@dataclass
class Postfix:
    top: Path
    port: int
    master_pid: int

    def maildir(self, local: str) -> Path:
        return self.top / "mail" / "example.net" / local / "new"

    def run(self, action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.top / "etc"), action],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            check=False,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


@pytest.fixture
def postfix() -> Iterator[Postfix]:
    why = _available()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Postfix test: {why}")
        pytest.skip(why)
    owner = pwd.getpwnam("postfix")
    top = Path(tempfile.mkdtemp(prefix="mailsrv-postfix-"))
    top.chmod(0o755)  # the postfix user must reach its queue and Maildir
    for name in ("etc", "spool", "data", "mail"):
        (top / name).mkdir()
    for name in ("data", "mail"):
        os.chown(top / name, owner.pw_uid, owner.pw_gid)
    port = _free_port()
    (top / "etc" / "main.cf").write_text(
        f"""\
compatibility_level = 3.6
queue_directory = {top}/spool
data_directory = {top}/data
mail_owner = postfix
setgid_group = postdrop
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
maillog_file = {top}/maillog
maillog_file_prefixes = {top}
myhostname = postfix.relay-test.invalid
mydomain = relay-test.invalid
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
mynetworks = 127.0.0.0/8
virtual_mailbox_domains = example.net
virtual_mailbox_base = {top}/mail
virtual_mailbox_maps = inline:{{ bob@example.net=example.net/bob/ }}
virtual_uid_maps = static:{owner.pw_uid}
virtual_gid_maps = static:{owner.pw_gid}
virtual_minimum_uid = 1
message_size_limit = 10240000
alias_maps =
alias_database =
biff = no
smtputf8_enable = yes
"""
    )
    (top / "etc" / "master.cf").write_text(MASTER_CF.format(port=port))
    instance = Postfix(top, port, 0)
    started = instance.run("start")
    try:
        assert started.returncode == 0, f"postfix start: {started.stdout}{started.stderr}"
        pidfile = top / "spool" / "pid" / "master.pid"
        deadline = time.monotonic() + 15
        while not instance.master_pid and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                instance.master_pid = int(pidfile.read_text().strip())
            if not instance.master_pid:
                time.sleep(0.05)  # a foreign process starting up, outside the reactor
        assert instance.master_pid, "Postfix wrote no master.pid"
        yield instance
    finally:
        instance.run("stop")
        deadline = time.monotonic() + 15
        while instance.master_pid and time.monotonic() < deadline:
            try:
                os.kill(instance.master_pid, 0)
            except ProcessLookupError:
                instance.master_pid = 0
            else:
                time.sleep(0.05)
        if instance.master_pid:  # never leave a Postfix running
            instance.run("abort")
            for pid in [*_children(instance.master_pid), instance.master_pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(top, ignore_errors=True)


STORED = (
    b"Return-Path: <alice@example.org>\n"
    b"Received: from client.test ([127.0.0.1])\n\tby mx.example.org (mailsrv) with ESMTPA id Q1;\n"
    b"\tTue, 14 Nov 2023 19:26:40 +0000\n"
    b"From: alice@example.org\nTo: bob@example.net\nSubject: via postfix\n"
    b"Message-ID: <pf1@example.org>\nDate: Tue, 14 Nov 2023 19:26:40 +0000\n"
    b"\n.\nfirst line was a dot\n"
    + b"".join(b"line %05d\n.\n..two\n" % n for n in range(3000))
    + b"MAIL FROM:<evil@example.org>\n.\nlast\n"
)


@pytest_twisted.ensureDeferred
async def test_postfix_receives_what_we_relay(postfix: Postfix, tmp_path: Path) -> None:
    from twisted.internet import reactor

    body = tmp_path / "body"
    body.write_bytes(STORED)
    message = OutboundMessage(
        "Q1",
        "alice@example.org",
        (OutboundRecipient("bob@example.net"), OutboundRecipient("nobody@example.net")),
        body,
        len(STORED),
    )
    options = ClientOptions("relay.example.org", tls=TLS_MAY, chunk_size=16384)
    connector = Connector(reactor, options, threads.deferToThread, clock=task.Clock())
    connection = await connector.connect(Candidate("postfix.test", "127.0.0.1", postfix.port))
    assert {"PIPELINING", "SIZE", "8BITMIME", "DSN", "SMTPUTF8"} <= set(connection.extensions)
    results = await connection.deliver(message)
    await connection.close()
    bob, nobody = results
    assert bob.delivered and bob.code == 250 and bob.enhanced == "2.0.0"
    assert (nobody.code, nobody.enhanced, nobody.permanent) == (550, "5.1.1", True)

    maildir = postfix.maildir("bob")
    for _ in range(300):  # Postfix delivers to the Maildir on its own schedule
        if maildir.exists() and any(maildir.iterdir()):
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    [delivered] = list(maildir.iterdir())
    stored_there = delivered.read_bytes()
    ours = STORED.split(b"\n", 1)[1]  # what we sent, Return-Path dropped, in LF form
    assert stored_there.endswith(ours)
    assert stored_there.count(b"Message-ID: <pf1@example.org>") == 1
    headers = stored_there[: len(stored_there) - len(ours)]
    assert b"Return-Path: <alice@example.org>" in headers  # Postfix's own, not a second one
    assert stored_there.count(b"Return-Path:") == 1
