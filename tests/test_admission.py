"""The implicit-TLS port refuses over-limit clients before any TLS work, over real sockets.

A refused client sends a real ClientHello and must get nothing back (no ServerHello) and the
server must not even create a TLS connection for it; the caps and rates still apply, and
their slots are released so that later clients get the full handshake and the greeting.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from mailsrv.shared_limits import CONNECTION_LIMIT, CONNECTION_RATE, IP_CONNECTION_LIMIT
from mailsrv.tls import ReloadingServerTLS
from tests.conftest import RunningServer, make_config, run_client, start_server
from tests.test_tls import HOSTNAME, CertFiles


class CountingTLS(ReloadingServerTLS):
    """The server's real TLS creator, counting the TLS connections it is asked for."""

    def __init__(self, chain: str, key: str) -> None:
        super().__init__(chain, key)
        self.connections = 0

    def serverConnectionForTLS(self, tlsProtocol: Any) -> Any:
        self.connections += 1
        return super().serverConnectionForTLS(tlsProtocol)


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def client_hello(context: ssl.SSLContext) -> bytes:
    """The bytes of a real ClientHello from ``context``."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=HOSTNAME)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def answer_to_hello(port: int, hello: bytes, timeout: float = 3.0) -> bytes:
    """Send a ClientHello on a raw socket: what the server sends until it closes (or timeout)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(hello)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return data
            except TimeoutError:
                return data + b"<still open>"
            if not chunk:
                return data
            data += chunk
    finally:
        sock.close()


def greeting_over_tls(port: int, context: ssl.SSLContext) -> tuple[socket.socket, bytes]:
    """A full implicit-TLS connection; returns it (open) and its greeting."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock = context.wrap_socket(raw, server_hostname=HOSTNAME)
    return sock, sock.recv(1024)


async def smtps_server(tmp_path: Path, certs: CertFiles, **limits: Any) -> RunningServer:
    config = make_config(
        tmp_path,
        enable_tls=True,
        tls_cert=str(certs.chain),
        tls_key=str(certs.key),
        trusted_networks=(),  # 127.0.0.1 is an ordinary client here
        **limits,
    )
    tls = CountingTLS(str(certs.chain), str(certs.key))
    return await start_server(config, listeners=("mx", "smtps"), tls=tls)


@pytest.mark.parametrize(
    ("limits", "event"),
    [
        ({"max_connections": 2}, CONNECTION_LIMIT),
        ({"max_connections_per_ip": 2}, IP_CONNECTION_LIMIT),
        ({"connection_rate_per_ip": 3}, CONNECTION_RATE),
    ],
    ids=["connection-limit", "ip-connection-limit", "connection-rate"],
)
@pytest_twisted.ensureDeferred
async def test_refused_smtps_client_gets_no_handshake(
    tmp_path: Path,
    log_events: list[dict[str, Any]],
    limits: dict[str, int],
    event: str,
) -> None:
    certs = CertFiles(tmp_path / "tls")
    running = await smtps_server(tmp_path, certs, **limits)
    tls: CountingTLS = running.server.tls
    port = running.ports["smtps"]
    context = certs.client_context()
    hello = client_hello(context)
    open_sockets = []
    try:
        # Admitted, the ClientHello gets a ServerHello (a TLS handshake record) at once.
        first = await run_client(answer_to_hello, port, hello, 1.0)
        assert first[:1] == b"\x16" and first.endswith(b"<still open>")
        await _wait_for(lambda: running.server.limits.connections.total == 0)
        for _ in range(2):  # two clients hold the two slots (or use up the rate)
            sock, greeting = await run_client(greeting_over_tls, port, context)
            open_sockets.append(sock)
            assert greeting.startswith(b"220 " + HOSTNAME.encode())
        assert tls.connections == 3
        # Over the limit: the same ClientHello gets nothing at all, and no TLS is set up.
        refused = await run_client(answer_to_hello, port, hello)
        assert refused == b""
        assert tls.connections == 3
        kinds = [e["event"] for e in log_events if "event" in e]
        assert kinds == [event]
        [logged] = [e for e in log_events if e.get("event") == event]
        assert logged["listener"] == "smtps"
        if event == CONNECTION_RATE:
            return
        # The refusal took no slot; ending a session frees one for a full handshake again.
        assert running.server.limits.connections.total == 2
        open_sockets.pop().close()
        await _wait_for(lambda: running.server.limits.connections.total == 1)
        sock, greeting = await run_client(greeting_over_tls, port, context)
        open_sockets.append(sock)
        assert greeting.startswith(b"220 ")
    finally:
        for sock in open_sockets:
            sock.close()
        await running.service.stopService()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl command not installed")
@pytest_twisted.ensureDeferred
async def test_openssl_s_client_sees_no_server_hello_when_refused(tmp_path: Path) -> None:
    certs = CertFiles(tmp_path / "tls")
    running = await smtps_server(tmp_path, certs, max_connections=1)
    port = running.ports["smtps"]

    def s_client() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(certs.ca_file)],
            input="QUIT\n",
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )

    try:
        sock, greeting = await run_client(greeting_over_tls, port, certs.client_context())
        try:
            assert greeting.startswith(b"220 ")
            result = await run_client(s_client)
        finally:
            sock.close()
    finally:
        await running.service.stopService()
    assert result.returncode != 0
    assert "SSL handshake has read 0 bytes" in result.stdout
    assert "220 " not in result.stdout


@pytest_twisted.ensureDeferred
async def test_admitted_smtps_client_still_gets_timeouts(tmp_path: Path) -> None:
    """A client that connects and never starts TLS is closed by the idle timeout."""
    certs = CertFiles(tmp_path / "tls")
    running = await smtps_server(tmp_path, certs, idle_timeout=1, command_timeout=1)
    try:
        silent = await run_client(answer_to_hello, running.ports["smtps"], b"", 5.0)
        await _wait_for(lambda: running.server.limits.connections.total == 0)
    finally:
        await running.service.stopService()
    assert silent == b""  # closed at once: the greeting waited for a handshake that never came


async def _wait_for(condition: Any, within: float = 5.0) -> None:
    from twisted.internet import reactor, task

    waited = 0.0
    while not condition():
        assert waited < within, "condition not met in time"
        await task.deferLater(reactor, 0.01, lambda: None)
        waited += 0.01
