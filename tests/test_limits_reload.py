"""Limits every session shares, changed by a reload: the counts so far stay, the new caps apply
to the next decision (over real sockets for the connection cap; on ``task.Clock`` for rates
and AUTH budgets)."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest_twisted
from twisted.internet import task

from mailsrv.shared_limits import CONNECTION_RATE, LocalLimits
from tests.conftest import make_config, run_client, start_server

UNTRUSTED = "192.0.2.10"


def greeting(port: int) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock, sock.recv(512)


@pytest_twisted.ensureDeferred
async def test_a_lowered_per_ip_cap_refuses_the_next_connection_not_the_open_ones(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, trusted_networks=(), max_connections_per_ip=5)
    running = await start_server(config)
    sockets = []
    try:
        for _ in range(2):
            sock, greeting_line = await run_client(greeting, running.port)
            sockets.append(sock)
            assert greeting_line.startswith(b"220 ")
        running.server.reconfigure(dataclasses.replace(config, max_connections_per_ip=2))
        sock, refused = await run_client(greeting, running.port)
        sockets.append(sock)
        assert refused.startswith(b"421 4.7.0 "), refused
        running.server.reconfigure(dataclasses.replace(config, max_connections_per_ip=3))
        sock, admitted = await run_client(greeting, running.port)
        sockets.append(sock)
        assert admitted.startswith(b"220 "), "raised again: room for one more"
    finally:
        for sock in sockets:
            sock.close()
        await running.service.stopService()


def test_rates_and_auth_budgets_take_the_new_values_and_keep_their_counts(
    tmp_path: Path,
) -> None:
    clock = task.Clock()
    config = make_config(
        tmp_path, connection_rate_per_ip=10, message_rate_per_ip=10, auth_max_failures_per_ip=5
    )
    limits = LocalLimits(config, clock)
    for _ in range(3):
        assert limits.check_admission(UNTRUSTED, trusted=False) is None
        limits.release(UNTRUSTED)
        assert limits.message_rate.allow(UNTRUSTED)
    for _ in range(3):
        attempt = limits.auth_throttle.begin(UNTRUSTED, "alice@example.org", count_ip=True)
        assert not isinstance(attempt, str)
        limits.auth_throttle.finish(attempt, "failure")
    assert limits.auth_throttle.client_refusal(UNTRUSTED) is None

    lowered = dataclasses.replace(
        config, connection_rate_per_ip=3, message_rate_per_ip=3, auth_max_failures_per_ip=3
    )
    limits.reconfigure(lowered)
    assert limits.check_admission(UNTRUSTED, trusted=False) == CONNECTION_RATE
    assert not limits.message_rate.allow(UNTRUSTED)
    assert limits.auth_throttle.client_refusal(UNTRUSTED) is not None, "3 failures: used up"
