"""SIGHUP reloads a real ``twistd mailsrv``'s relay, webhook endpoints and log level: real SMTP
peers (smarthosts) and a real twisted.web receiver in the test's reactor, smtplib as the
client.  Waits are bounded (``eventually``); nothing is timed."""

from __future__ import annotations

import json
import signal
import smtplib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted

from tests.relay_peer import start_peer
from tests.test_process import Server, free_port
from tests.test_relay_process import eventually
from tests.webhook_rig import SECRET, Listening, check_signed, start_receiver

BODY = b"From: Alice <alice@example.org>\r\nSubject: reload\r\n\r\nhello\r\n"


@pytest_twisted.async_yield_fixture
async def receiver() -> AsyncIterator[Listening]:
    listening = start_receiver()
    yield listening
    await listening.stop()


def relay_config(smarthost: int, hook_url: str | None = None, log_level: str = "info") -> str:
    text = f'relay_host = "127.0.0.1:{smarthost}"\nrelay_tls = "none"\nlog_level = "{log_level}"\n'
    if hook_url:
        text += (
            f'[[webhooks]]\nname = "app"\nurl = {json.dumps(hook_url)}\n'
            f'secrets = [{json.dumps(SECRET)}]\nevents = ["message.queued"]\n'
        )
    return text


def send(server: Server, recipient: str) -> None:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.sendmail("alice@example.org", [recipient], BODY)  # loopback is trusted


async def reloaded(server: Server, times: int) -> None:
    await eventually(
        lambda: server.log().count("configuration reloaded:") >= times, f"reload {times}"
    )


@pytest_twisted.ensureDeferred
async def test_sighup_moves_the_relay_to_a_new_smarthost_and_adds_a_webhook(
    tmp_path: Path, servers: list[Server], receiver: Listening
) -> None:
    first, second = start_peer(), start_peer()
    try:
        config = tmp_path / "mailsrv.toml"
        config.write_text(relay_config(first.number))
        server = Server(
            workdir=tmp_path,
            data_dir=tmp_path / "data",
            port=(port := free_port()),
            submission_port=free_port(port),
            extra_env={"SMTP_CONFIG": str(config)},
        )
        servers.append(server)
        server.start()
        send(server, "carol@remote.test")
        await eventually(lambda: len(first.factory.messages) == 1, "relayed to the first")

        config.write_text(relay_config(second.number, receiver.url("/hook"), "debug"))
        server.signal(signal.SIGHUP)
        await reloaded(server, 1)
        line = next(line for line in server.log().splitlines() if "configuration reloaded:" in line)
        assert "relay_host" in line and "webhooks" in line and "log_level" in line, line
        assert "needs a restart" not in line, line

        send(server, "dave@remote.test")
        await eventually(lambda: len(second.factory.messages) == 1, "relayed to the second")
        assert len(first.factory.messages) == 1, "nothing more to the old smarthost"
        await eventually(lambda: len(receiver.receiver.seen) == 1, "the new endpoint's event")
        event = check_signed(receiver.receiver.seen[0])
        assert event["type"] == "message.queued"
        assert [r["address"] for r in event["data"]["envelope"]["rcpt_to"]] == ["dave@remote.test"]
        assert "#debug]" in server.log(), "debug lines are written after the reload"

        # A CA file that cannot be read refuses the whole reload: the relay stays.
        broken = relay_config(first.number).replace('relay_tls = "none"', 'relay_tls = "starttls"')
        config.write_text(broken + f'relay_ca_file = "{tmp_path / "missing.pem"}"\n')
        server.signal(signal.SIGHUP)
        await eventually(lambda: "configuration reload refused" in server.log(), "the refusal")
        assert "missing.pem" in server.log()
        send(server, "erin@remote.test")
        await eventually(lambda: len(second.factory.messages) == 2, "still the second")
        assert len(first.factory.messages) == 1
    finally:
        await first.stop()
        await second.stop()
