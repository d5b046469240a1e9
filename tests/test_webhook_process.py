"""Webhooks end to end: a real ``twistd mailsrv``, smtplib as the sender, real twisted.web
receivers (in the test's reactor) as the applications, ``mailsrv webhooks`` as the operator,
SIGKILL while events are pending.

Nothing here measures time: what is checked is that events and SMTP replies arrive, and with
which ids.  Waits are bounded (``eventually``)."""

from __future__ import annotations

import json
import signal
import smtplib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted

from tests.relay_peer import start_peer
from tests.test_process import Server, free_port
from tests.test_relay_process import eventually
from tests.webhook_rig import HANG, SECRET, Answer, Listening, check_signed, start_receiver

MAILSRV = str(Path(sys.executable).parent / "mailsrv")
BODY = b"From: Bob <bob@remote.test>\r\nSubject: webhook me\r\n\r\nhello\r\n"


@pytest_twisted.async_yield_fixture
async def receivers() -> AsyncIterator[list[Listening]]:
    made: list[Listening] = []
    yield made
    for listening in made:
        await listening.stop()


def config_file(tmp_path: Path, *tables: dict[str, Any]) -> Path:
    """A TOML file with one ``[[webhooks]]`` table per endpoint (secret: SECRET)."""
    lines = []
    for table in tables:
        lines.append("[[webhooks]]")
        for key, value in {"secrets": [SECRET], **table}.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    path = tmp_path / "mailsrv.toml"
    path.write_text("\n".join(lines))
    return path


def webhook_server(tmp_path: Path, made: list[Server], config: Path, **env: str) -> Server:
    server = Server(
        workdir=tmp_path,
        data_dir=tmp_path / "data",
        port=(port := free_port()),
        submission_port=free_port(port),
        extra_env={"SMTP_CONFIG": str(config), **env},
    )
    made.append(server)
    return server


def webhooks_cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MAILSRV, "webhooks", *args],
        env=server.env(),
        cwd=server.workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def entries(server: Server) -> list[dict[str, Any]]:
    listing = webhooks_cli(server, "list", "--json")
    assert listing.returncode == 0, listing.stderr
    found: list[dict[str, Any]] = json.loads(listing.stdout)["entries"]
    return found


def send(server: Server, recipients: list[str], sender: str = "bob@remote.test") -> None:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.sendmail(sender, recipients, BODY)


QUICK = [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]


@pytest_twisted.ensureDeferred
async def test_400_dead_letter_redriven_while_the_server_runs(
    tmp_path: Path, servers: list[Server], receivers: list[Listening]
) -> None:
    receiver = start_receiver()
    receivers.append(receiver)
    receiver.receiver.script("/hook", Answer(400))
    config = config_file(tmp_path, {"name": "app", "url": receiver.url("/hook")})
    server = webhook_server(tmp_path, servers, config)
    server.start()
    send(server, ["alice@example.org"])
    await eventually(lambda: [e["state"] for e in entries(server)] == ["dead"], "a dead letter")
    (dead,) = entries(server)
    assert dead["last_status"] == 400 and dead["attempts"] == 1
    redriven = webhooks_cli(server, "redrive", "--all")
    assert (redriven.returncode, redriven.stdout) == (0, "1 dead-lettered event(s) redriven\n")
    await eventually(lambda: [e["state"] for e in entries(server)] == ["done"], "delivered")
    first, second = receiver.receiver.seen
    assert first.webhook_id == second.webhook_id == dead["event_id"]
    event = check_signed(second)
    assert event["type"] == "message.received"
    assert event["data"]["envelope"]["mail_from"] == "bob@remote.test"
    shown = webhooks_cli(server, "show", dead["event_id"])
    assert shown.returncode == 0 and '"state": "done"' in shown.stdout
    bad = webhooks_cli(server, "show", "evt_" + "0" * 32)
    assert (bad.returncode, bad.stdout) == (1, "")
    assert bad.stderr == f"mailsrv: no such webhook event evt_{'0' * 32}\n"
    log = server.log()
    assert f"webhook {dead['event_id']} to app: 400 in " in log
    assert f"webhook {dead['event_id']} to app: 200 in " in log


@pytest_twisted.ensureDeferred
async def test_sigkill_with_events_pending_then_delivered_after_restart_with_the_same_ids(
    tmp_path: Path, servers: list[Server], receivers: list[Listening]
) -> None:
    receiver = start_receiver()
    receivers.append(receiver)
    await receiver.stop()  # the application is down
    config = config_file(
        tmp_path, {"name": "app", "url": receiver.url("/hook"), "retry_schedule": QUICK}
    )
    server = webhook_server(tmp_path, servers, config)
    server.start()
    for _ in range(3):
        send(server, ["alice@example.org"])
    await eventually(
        lambda: len(entries(server)) == 3 and all(e["attempts"] >= 1 for e in entries(server)),
        "three events tried and pending",
    )
    pending = {e["event_id"] for e in entries(server) if e["state"] == "pending"}
    assert len(pending) == 3
    server.signal(signal.SIGKILL)
    server.wait()
    receiver.start()  # the application is back, on the same port
    server.start()
    await eventually(lambda: {s.webhook_id for s in receiver.receiver.seen} == pending, "all 3")
    await eventually(lambda: {e["state"] for e in entries(server)} == {"done"}, "all done")
    for seen in receiver.receiver.seen:
        check_signed(seen)


@pytest_twisted.ensureDeferred
async def test_a_receiver_that_never_answers_delays_neither_smtp_nor_another_endpoint(
    tmp_path: Path, servers: list[Server], receivers: list[Listening]
) -> None:
    receiver = start_receiver()
    receivers.append(receiver)
    receiver.receiver.script("/stuck", *[HANG] * 50)
    config = config_file(
        tmp_path,
        {"name": "stuck", "url": receiver.url("/stuck"), "concurrency": 2, "timeout": 300},
        {"name": "live", "url": receiver.url("/live")},
    )
    server = webhook_server(tmp_path, servers, config)
    server.start()
    for _ in range(6):
        send(server, ["alice@example.org"])  # each reply arrives: sendmail returns

    def states() -> list[tuple[str, str]]:
        return sorted((e["endpoint"], e["state"]) for e in entries(server))

    expected = [("live", "done")] * 6 + [("stuck", "pending")] * 6
    await eventually(lambda: states() == expected, "six events delivered to live")
    assert len(receiver.receiver.at("/stuck")) == 2, "the stuck endpoint holds only its lane"
    assert len(server.maildir_new()) == 6
    for seen in receiver.receiver.at("/live"):
        check_signed(seen)


@pytest_twisted.ensureDeferred
async def test_relayed_mail_gives_queued_then_delivered_events(
    tmp_path: Path, servers: list[Server], receivers: list[Listening]
) -> None:
    receiver = start_receiver()
    receivers.append(receiver)
    peer = start_peer()
    try:
        config = config_file(tmp_path, {"name": "feed", "url": receiver.url("/feed")})
        server = webhook_server(
            tmp_path,
            servers,
            config,
            SMTP_RELAY_HOST=f"127.0.0.1:{peer.number}",
            SMTP_RELAY_TLS="none",
        )
        server.start()
        send(server, ["carol@remote.test"], sender="alice@example.org")
        await eventually(lambda: len(receiver.receiver.seen) == 2, "two events")
        events = sorted((check_signed(s) for s in receiver.receiver.seen), key=lambda e: e["type"])
        delivered, queued = events
        assert (queued["type"], delivered["type"]) == ("message.queued", "message.delivered")
        assert delivered["data"]["recipient"] == "carol@remote.test"
        assert delivered["data"]["queue_id"] == queued["data"]["queue_id"]
        assert delivered["data"]["reply"]["code"] == 250
        assert delivered["data"]["attempts"] == 1
        assert len(peer.factory.messages) == 1
    finally:
        await peer.stop()
