# ruff: noqa: F811  (the store fixtures come from tests.test_user_store)
"""Greylisting against both real user stores (SQLite and PostgreSQL), with explicit times, and
the session's RCPT step over real sockets."""

from __future__ import annotations

import dataclasses
import smtplib
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from mailsrv.auth.sqlite_store import SQLiteUserStore
from mailsrv.screening.greylist import Greylist, GreylistSettings, Triplet, client_network
from mailsrv.smtp import replies
from tests.conftest import make_config, run_client, start_server
from tests.test_user_store import Backend, backend, store  # noqa: F401 (fixtures)

T = Triplet("192.0.2.0/24", "bob@remote.test", "alice@example.org")
S = GreylistSettings(delay=300, expiry=3600, lifetime=86_400)


@pytest_twisted.ensureDeferred
async def test_first_attempt_waits_retry_after_the_delay_passes_and_is_remembered(
    store: Any,
) -> None:
    greylist = Greylist(store)
    first = await greylist.attempt(T, 1000.0, S)
    assert (first.passed, first.retry_in) == (False, 300.0)
    early = await greylist.attempt(T, 1100.0, S)
    assert (early.passed, early.retry_in) == (False, 200.0), "counted from the first attempt"
    assert (await greylist.attempt(T, 1300.0, S)).passed
    assert (await greylist.attempt(T, 1300.0 + 80_000, S)).passed, "renewed lifetime"
    other = dataclasses.replace(T, recipient="bob@example.org")
    assert not (await greylist.attempt(other, 1300.0, S)).passed, "another triplet"


@pytest_twisted.ensureDeferred
async def test_a_retry_after_the_expiry_starts_over_and_expired_rows_go(store: Any) -> None:
    greylist = Greylist(store)
    await greylist.attempt(T, 1000.0, S)
    late = await greylist.attempt(T, 1000.0 + 3600 + 1, S)
    assert (late.passed, late.retry_in) == (False, 300.0)
    assert await greylist.expire(1000.0 + 3600 + 1) == 0
    assert await greylist.expire(1000.0 + 2 * 3600 + 2) == 1
    assert not (await greylist.attempt(T, 9000.0, S)).passed


@pytest.mark.parametrize(
    ("ip", "network"),
    [
        ("192.0.2.77", "192.0.2.0/24"),
        ("::ffff:192.0.2.77", "192.0.2.0/24"),
        ("2001:db8:1:2:3::9", "2001:db8:1:2::/64"),
    ],
)
def test_the_client_is_its_network(ip: str, network: str) -> None:
    assert client_network(ip) == network


@pytest_twisted.ensureDeferred
async def test_rcpt_is_greylisted_then_passes_and_trusted_clients_are_not(tmp_path: Path) -> None:
    from twisted.internet import reactor

    db = SQLiteUserStore(tmp_path / "users.db", reactor)
    await db.open()
    config = make_config(tmp_path, trusted_networks=(), greylist=True, greylist_delay=0.0)
    running = await start_server(config)
    running.server.greylist = Greylist(db)
    try:

        def send() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
                client.ehlo("client.example")
                client.mail("bob@remote.test")
                return client.rcpt("alice@example.org")

        code, text = await run_client(send)
        assert (code, text.split(b" ")[0]) == (451, b"4.7.1"), text
        assert text.startswith(b"4.7.1 Greylisted, try again in ")
        code, _ = await run_client(send)
        assert code == 250, "the retry passes (delay 0 here)"
        running.server.reconfigure(dataclasses.replace(config, greylist=False))
        assert replies.GREYLISTED.code == 451
    finally:
        await running.service.stopService()
        await db.close()
