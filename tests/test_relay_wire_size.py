"""The size a next hop's SIZE limit is compared with: the message as it goes on the wire.

A message is stored with LF line ends and our ``Return-Path``; on the wire it has CRLF and no
Return-Path (RFC 1870 counts CRLF but not the doubled dots).  The session counts that size as
the body arrives, the queue record keeps it, and the client compares it: a message exactly at
a peer's limit goes, one byte over it bounces ``5.3.4`` without being sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task, threads
from zope.interface import implementer

from mailsrv.delivery.committer import GroupCommitter
from mailsrv.delivery.envelope import AcceptedMessage, Recipient, RemoteRoute
from mailsrv.delivery.fssync import filesystem_syncer
from mailsrv.delivery.maildir import MaildirSink, MaildirStore
from mailsrv.delivery.sinks import Failures, ICommitSink, StagedMessage
from mailsrv.relay.body import wire_form, wire_size
from mailsrv.relay.connector import Connector, deliver_once
from mailsrv.relay.options import TLS_NONE, ClientOptions
from mailsrv.relay.records import QueueRecord
from mailsrv.relay.resolver import Candidate
from mailsrv.relay.scheduler import outbound_message
from mailsrv.smtp.server import SMTPServer
from tests.conftest import make_config
from tests.relay_peer import Script, start_peer, unstuff
from tests.test_session_protocol import Client, run_now

BODIES = {
    "plain": b"Subject: s\r\n\r\nhello\r\n",
    "dots": b"Subject: s\r\n\r\n..\r\n...x\r\n.\r\n",  # stuffed by the client: '.', '..x'
    "empty": b"",
    "no-headers": b"just a line\r\n",
    "many-short-lines": b"Subject: s\r\n\r\n" + b"x\r\n" * 3000,
    "long-line": b"Subject: s\r\n\r\n" + b"y" * 10000 + b"\r\nend\r\n",
    "bare-lf": b"Subject: s\n\nbare\nline ends\rand a CR\r\n",
}


@implementer(ICommitSink)
class Recorder:
    """Keeps each committed message and its stored body."""

    name = "recorder"

    def __init__(self) -> None:
        self.stored: list[tuple[AcceptedMessage, bytes]] = []

    def write(self, batch: Sequence[StagedMessage]) -> Failures:
        self.stored += [(s.message, s.body.read_bytes()) for s in batch]
        return {}

    def rollback(self, staged: StagedMessage) -> None:
        """Nothing to undo."""

    def committed(self, messages: Sequence[AcceptedMessage]) -> None:
        """Nothing to hand on."""


def accept(tmp_path: Path, body: bytes, **config: Any) -> tuple[AcceptedMessage, bytes]:
    """``body`` through a real in-memory session: the accepted message and its stored form."""
    settings = make_config(tmp_path, **config)
    recorder = Recorder()
    store = MaildirStore(settings.mail_dir, settings.server_name)
    sync = filesystem_syncer(settings.spool_dir, settings.mail_dir)
    committer = GroupCommitter.inline([MaildirSink(store), recorder], sync)
    committer.startService()
    clock = task.Clock()
    clock.advance(1_800_000_000)
    server = SMTPServer(settings, clock, run_now, committer)
    server.spool.prepare()
    client = Client(server, "192.0.2.9", 40000)
    client.transaction("sender@remote.test", "bob@example.org")
    reply = client.data(body)
    assert reply.startswith(b"250 "), reply
    client.lose()
    [(message, stored)] = recorder.stored
    return message, stored


def on_the_wire(stored: bytes) -> bytes:
    """What a peer receives and counts: the DATA payload unstuffed, CRLF."""
    return unstuff(wire_form(stored))[0]


@pytest.mark.parametrize("name", sorted(BODIES))
def test_the_session_counts_the_size_on_the_wire(tmp_path: Path, name: str) -> None:
    config = {"bare_line_endings": "normalize"} if name == "bare-lf" else {}
    message, stored = accept(tmp_path, BODIES[name], **config)
    assert message.size == len(stored)
    assert message.wire_size == len(on_the_wire(stored)) == wire_size(stored)
    assert message.wire_size != message.size  # the stored form is not what is counted


@pytest.mark.parametrize("name", sorted(BODIES))
def test_wire_size_of_a_stored_body(name: str) -> None:
    stored = b"Return-Path: <a@b.example>\n" + BODIES[name].replace(b"\r\n", b"\n")
    assert wire_size(stored) == len(on_the_wire(stored))


def _remote(message: AcceptedMessage) -> AcceptedMessage:
    return replace(message, recipients=(Recipient("bob@example.net", RemoteRoute("example.net")),))


@pytest_twisted.ensureDeferred
async def test_a_message_exactly_at_the_peers_limit_goes_one_byte_over_bounces(
    tmp_path: Path,
) -> None:
    from twisted.internet import reactor

    message, stored = accept(tmp_path, BODIES["many-short-lines"])
    record = QueueRecord.from_message(_remote(message))
    assert record is not None and record.wire_size is not None
    limit = record.size_on_wire
    assert len(stored) < limit - 1000, "the stored form is much smaller: LF, not CRLF"
    path = tmp_path / "stored"
    path.write_bytes(stored)
    outbound = outbound_message(record, ["bob@example.net"], path)
    options = ClientOptions(hostname="relay.example.org", tls=TLS_NONE)
    connector = Connector(reactor, options, threads.deferToThread, clock=task.Clock())
    for offered, delivered in ((limit, True), (limit - 1, False)):
        peer = start_peer(Script(extensions=["PIPELINING", f"SIZE {offered}"]))
        try:
            candidate = Candidate("mx.peer.test", "127.0.0.1", peer.number)
            [result] = await deliver_once(connector, [candidate], outbound)
        finally:
            await peer.stop()
        if delivered:
            assert result.delivered, result
            [received] = peer.factory.messages
            assert received.mail_line == f"MAIL FROM:<sender@remote.test> SIZE={limit}"
            assert len(received.content) == limit
        else:
            assert (result.code, result.enhanced, result.permanent) == (552, "5.3.4", True)
            assert peer.factory.messages == []
