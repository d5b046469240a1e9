"""End-to-end smoke test: smtplib delivers to a Maildir over loopback."""

from __future__ import annotations

import smtplib

import pytest_twisted

from tests.conftest import RunningServer, run_client


def _send(port: int) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port) as client:
        return client.sendmail(
            "sender@remote.test",
            ["alice@example.org", "info@example.org"],
            b"Subject: t\r\n\r\nhi\r\n",
        )


@pytest_twisted.ensureDeferred
async def test_smtplib_delivers_to_maildir(smtp: RunningServer) -> None:
    refused = await run_client(_send, smtp.port)
    assert refused == {}
    alice = smtp.messages("alice@example.org")
    bob = smtp.messages("bob@example.org")
    assert len(alice) == 1 and len(bob) == 1
    assert alice[0].startswith(b"Return-Path: <sender@remote.test>\nReceived: from ")
    assert alice[0].endswith(b"Subject: t\n\nhi\n")
