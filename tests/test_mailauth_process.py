"""Inbound mail authentication in a real ``twistd mailsrv``: composed by the composition root,
asking the DNS server named by SMTP_DNS_SERVERS (a twisted.names server in the test's reactor),
the verdict in the stored message and in the webhook payload, DMARC enforced."""

from __future__ import annotations

import smtplib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted

from tests.mailauth_dns import start_auth_dns
from tests.mailauth_rig import HELO, SERVFAIL, message, sign, zone
from tests.relay_dns import DNSServer
from tests.test_process import Server, free_port
from tests.test_relay_process import eventually
from tests.test_webhook_process import config_file
from tests.webhook_rig import Listening, check_signed, start_receiver


@pytest_twisted.async_yield_fixture
async def dns_server() -> AsyncIterator[DNSServer]:
    running = start_auth_dns(zone(), servfail=SERVFAIL)
    yield running
    await running.stop()


@pytest_twisted.async_yield_fixture
async def receiver() -> AsyncIterator[Listening]:
    listening = start_receiver()
    yield listening
    await listening.stop()


def send(port: int, content: bytes, sender: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname=HELO, timeout=60) as client:
        try:
            client.sendmail(sender, ["alice@example.org"], content)
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error
    return 250, b""


@pytest_twisted.ensureDeferred
async def test_checked_refused_and_reported_by_a_real_server(
    tmp_path: Path, servers: list[Server], dns_server: DNSServer, receiver: Listening
) -> None:
    config = config_file(tmp_path, {"name": "app", "url": receiver.url("/hook")})
    server = Server(
        workdir=tmp_path,
        data_dir=tmp_path / "data",
        port=(port := free_port()),
        submission_port=free_port(port),
        extra_env={
            "SMTP_CONFIG": str(config),
            "SMTP_TRUSTED_NETWORKS": "",
            "SMTP_DNS_SERVERS": f"127.0.0.1:{dns_server.port}",
            "SMTP_DMARC_ENFORCE": "true",
        },
    )
    servers.append(server)
    server.start()
    from twisted.internet import threads

    code, _ = await threads.deferToThread(send, server.port, sign(message()), "alice@example.test")
    assert code == 250
    refused = await threads.deferToThread(send, server.port, message(), "bob@fail.test")
    assert refused == (550, b"5.7.1 Message refused by the DMARC policy of example.test")
    [stored] = sorted((server.data_dir / "mail" / "example.org" / "alice" / "new").iterdir())
    lines = stored.read_bytes().split(b"\n")
    assert lines[1] == b"Authentication-Results: mx.example.org;"
    assert b"\tdmarc=pass (p=reject pct=100 dis=none) header.from=example.test;" in lines
    await eventually(lambda: len(receiver.receiver.seen) == 1, "the webhook")
    event = check_signed(receiver.receiver.seen[0])
    authentication = event["data"]["authentication"]
    assert authentication["dmarc"]["result"] == "pass"
    assert [(d["result"], d["domain"]) for d in authentication["dkim"]] == [
        ("pass", "example.test")
    ]
    assert authentication["spf"]["mailfrom"]["result"] == "pass"
    assert "checked " in server.log() and "security authentication-refused" in server.log()
