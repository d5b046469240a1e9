"""Shared fixtures: a real mailsrv SMTP server on 127.0.0.1:0 inside the test reactor.

Blocking clients (smtplib, raw sockets) must run in a thread (``run_client``) so the reactor,
which pytest-twisted runs in the same process, keeps serving.  Never import the reactor at module
level here: pytest-twisted installs it.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from mailsrv.config import Config, check

pytest_plugins = ["tests.conftest_pg"]


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    """A test configuration: data under ``tmp_path``, domain example.org, fast limits."""
    base = Config(
        host="127.0.0.1",
        port=0,
        submission_port=0,
        hostname="mx.example.org",
        data_dir=str(tmp_path / "data"),
        local_domains=("example.org", "example.net"),
        mailboxes=("alice@example.org", "bob@example.org", "carol@example.net"),
        aliases=(
            ("info@example.org", "alice@example.org"),
            ("info@example.org", "bob@example.org"),
        ),
        io_threads=4,
    )
    return dataclasses.replace(base, **overrides)


@dataclasses.dataclass
class RunningServer:
    """A started server: its config, shared state, ports and service."""

    config: Config
    server: Any
    service: Any
    ports: dict[str, int]

    @property
    def port(self) -> int:
        return self.ports["mx"]

    def maildir_files(self, mailbox: str, sub: str = "new") -> list[Path]:
        """Files in ``mailbox``'s Maildir ``sub`` folder, sorted by name."""
        local, _, domain = mailbox.partition("@")
        folder = self.config.mail_dir / domain / local / sub
        return sorted(folder.iterdir()) if folder.exists() else []

    def messages(self, mailbox: str) -> list[bytes]:
        """Contents of every delivered message of ``mailbox``."""
        return [p.read_bytes() for p in self.maildir_files(mailbox)]


async def start_server(
    config: Config,
    listeners: tuple[str, ...] = ("mx",),
    tls: Any = None,
    portal: Any = None,
    policy: Any = None,
    identities: Any = None,
    clock: Any = None,
    inbound: Any = None,
) -> RunningServer:
    """Start the SMTP service tree for ``config`` with ephemeral ports.

    ``tls`` is a :class:`mailsrv.tls.ReloadingServerTLS` (needed for STARTTLS and ``smtps``),
    ``portal`` a cred Portal (needed for AUTH), ``policy`` a RecipientPolicy (e.g. with a store),
    ``identities`` an AccountIdentities (the AUTH throttle's view of the store), ``clock`` the
    server's time (default: the reactor; a ``task.Clock`` drives timers and limits by hand
    while the sockets stay real), ``inbound`` the MX checks
    (:class:`mailsrv.mailauth.inbound.InboundChecks`; its verifier is started and stopped with
    the tree).
    """
    from twisted.internet import reactor

    from mailsrv.delivery.committer import GroupCommitter
    from mailsrv.delivery.fssync import filesystem_syncer
    from mailsrv.delivery.maildir import MaildirSink, MaildirStore
    from mailsrv.smtp.listeners import SMTPListenerService
    from mailsrv.smtp.server import SMTPServer
    from mailsrv.tap import MailService
    from mailsrv.threads import ThreadPoolService

    check(config if config.port else dataclasses.replace(config, port=1))  # 0 = ephemeral here
    root = MailService(config)
    threads = ThreadPoolService(reactor, "test-io", config.io_threads)
    threads.setServiceParent(root)
    if inbound is not None:
        inbound.verifier.setServiceParent(root)
    sinks = [MaildirSink(MaildirStore(config.mail_dir, config.server_name))]
    committer = GroupCommitter(reactor, sinks, filesystem_syncer(config.spool_dir, config.mail_dir))
    committer.setServiceParent(root)
    server = SMTPServer(
        config,
        reactor if clock is None else clock,
        threads.run,
        committer,
        policy=policy,
        tls=tls,
        portal=portal,
        identities=identities,
        inbound=inbound,
    )
    server.spool.prepare()
    service = SMTPListenerService(reactor, server, dict.fromkeys(listeners, 0))
    service.setServiceParent(root)
    root.startService()
    ports = {name: port.getHost().port for name, port in service.listening.items()}
    return RunningServer(config, server, root, ports)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest_twisted.async_yield_fixture
async def smtp(config: Config) -> Any:
    """A running server with the default test config; stopped (drained) afterwards."""
    running = await start_server(config)
    yield running
    await running.service.stopService()


def run_client(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking client function in a thread; returns a Deferred of its result."""
    from twisted.internet import threads

    return threads.deferToThread(function, *args, **kwargs)


class RawClient:
    """A blocking line-level SMTP client on a raw socket, for exact byte tests."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self) -> bytes:
        """One whole (possibly multi-line) reply, with its CRLFs."""
        lines = []
        while True:
            line = self.read_line()
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return b"".join(lines)

    def read_line(self) -> bytes:
        while b"\r\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                line, self._buf = self._buf, b""
                return line
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line + b"\r\n"

    def code(self) -> int:
        reply = self.read_reply()
        return int(reply[:3]) if reply[:3].isdigit() else -1

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.read_reply()

    def read_until_closed(self) -> bytes:
        data = self._buf
        self._buf = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def servers() -> Iterator[list[Any]]:
    """The ``tests.test_process.Server`` processes a test starts: killed at its end."""
    made: list[Any] = []
    yield made
    for server in made:
        server.kill()
