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
from twisted.internet.defer import Deferred, succeed

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


def spf_answer(passes: bool, asked: list[str]) -> Any:
    def ask() -> Deferred[bool]:
        asked.append("asked")
        return succeed(passes)

    return ask


@pytest_twisted.ensureDeferred
async def test_a_sender_passing_spf_for_a_seen_domain_is_not_delayed(store: Any) -> None:
    greylist = Greylist(store)
    asked: list[str] = []
    first = await greylist.attempt(T, 1000.0, S, spf_answer(True, asked))
    assert not first.passed and asked == [], "remote.test is not seen yet: SPF is not asked"
    assert (await greylist.attempt(T, 1300.0, S, spf_answer(True, asked))).passed
    assert asked == [], "a passing triplet needs no SPF"
    carol = dataclasses.replace(T, sender="carol@remote.test", recipient="dave@example.org")
    exempt = await greylist.attempt(carol, 1400.0, S, spf_answer(True, asked))
    assert (exempt.passed, exempt.exempt, asked) == (True, True, ["asked"])
    assert (await greylist.attempt(carol, 1401.0, S)).passed, "and remembered as passed"
    forger = dataclasses.replace(T, sender="eve@remote.test")
    assert not (await greylist.attempt(forger, 1500.0, S, spf_answer(False, asked))).passed
    stranger = dataclasses.replace(T, sender="x@else.test")
    assert not (await greylist.attempt(stranger, 1500.0, S, spf_answer(True, asked))).passed
    null_sender = dataclasses.replace(T, sender="")
    assert not (await greylist.attempt(null_sender, 1500.0, S, spf_answer(True, asked))).passed
    assert asked == ["asked", "asked"], "neither the stranger nor the null sender was asked"
    # The domain is seen for the lifetime after its last passing message (carol at 1401).
    end = 1401.0 + S.lifetime
    assert await greylist.expire(end + 1) >= 1
    latecomer = dataclasses.replace(T, sender="zed@remote.test")
    assert not (await greylist.attempt(latecomer, end + 2, S, spf_answer(True, asked))).passed


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
