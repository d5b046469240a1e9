"""The outbound client against a real scripted SMTP peer on loopback (timers on task.Clock)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task, threads

from mailsrv.relay import replies
from mailsrv.relay.client import SessionError, SMTPConnection
from mailsrv.relay.connector import Connector, deliver_once
from mailsrv.relay.message import OutboundMessage, OutboundRecipient, RecipientResult
from mailsrv.relay.options import TLS_NONE, ClientOptions, Timeouts
from mailsrv.relay.resolver import Candidate
from mailsrv.smtp.replies import Reply
from tests.relay_peer import Peer, Script, start_peer

TRACE = (
    b"Return-Path: <alice@example.org>\n"
    b"Received: from client.test ([127.0.0.1])\n"
    b"\tby mx.example.org (mailsrv) with ESMTPA id Q1; Mon, 1 Jan 2024 00:00:00 +0000\n"
)
HEADERS = b"From: alice@example.org\nTo: bob@example.net\nSubject: test\n\n"


def wire_expected(stored: bytes) -> bytes:
    """What the next hop must store: the body without Return-Path, every line end CRLF."""
    assert stored.startswith(b"Return-Path:")
    body = stored.split(b"\n", 1)[1]
    body = re.sub(rb"\r\n?|\n", b"\r\n", body)
    return body if body.endswith(b"\r\n") else body + b"\r\n"


class Kit:
    """A folder for stored bodies, a clock, and connectors on the real reactor."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.clock = task.Clock()
        self.count = 0

    def store(self, body: bytes) -> Path:
        self.count += 1
        path = self.tmp_path / f"body-{self.count}"
        path.write_bytes(body)
        return path

    def message(
        self,
        body: bytes = TRACE + HEADERS + b"hello\n",
        recipients: Any = ("bob@example.net",),
        **kw: Any,
    ) -> OutboundMessage:
        path = self.store(body)
        rcpts = tuple(
            r if isinstance(r, OutboundRecipient) else OutboundRecipient(r) for r in recipients
        )
        kw.setdefault("size", len(body))
        return OutboundMessage("Q1", kw.pop("sender", "alice@example.org"), rcpts, path, **kw)

    def connector(self, **options: Any) -> Connector:
        from twisted.internet import reactor

        options.setdefault("hostname", "relay.example.org")
        options.setdefault("tls", TLS_NONE)
        return Connector(reactor, ClientOptions(**options), threads.deferToThread, clock=self.clock)


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return Kit(tmp_path)


@pytest_twisted.async_yield_fixture
async def peers() -> AsyncIterator[list[Peer]]:
    running: list[Peer] = []
    yield running
    for peer in running:
        await peer.stop()


def at(peer: Peer, host: str = "mx.peer.test") -> Candidate:
    return Candidate(host, "127.0.0.1", peer.number)


def peer_with(peers: list[Peer], **script: Any) -> Peer:
    peer = start_peer(Script(**script))
    peers.append(peer)
    return peer


def codes(results: list[RecipientResult]) -> list[tuple[str, int, str, bool]]:
    return [(r.recipient, r.code, r.enhanced, r.permanent) for r in results]


async def send(
    kit: Kit, peer: Peer, message: OutboundMessage, **options: Any
) -> list[RecipientResult]:
    return await deliver_once(kit.connector(**options), [at(peer)], message)


# --- the body arrives exactly, as one message ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_message_arrives_byte_identical(kit: Kit, peers: list[Peer]) -> None:
    peer = peer_with(peers)
    stored = TRACE + HEADERS + b".\n..\nline\n.leading dot\nend"
    results = await send(kit, peer, kit.message(stored))
    assert codes(results) == [("bob@example.net", 250, "2.0.0", False)]
    assert results[0].text == "Queued as X"
    assert (results[0].remote_mta, results[0].remote_address, results[0].tls) == (
        "mx.peer.test",
        "127.0.0.1",
        None,
    )
    [message] = peer.factory.messages
    assert message.content == wire_expected(stored)
    assert not message.bare_line_endings
    assert message.wire.endswith(b"\r\nend\r\n.\r\n")
    assert message.sender == "alice@example.org" and message.recipients == ["bob@example.net"]
    [session] = peer.factory.sessions
    assert session.commands[0] == "EHLO relay.example.org"
    assert session.quit


def _dots_at_boundaries(boundary: int) -> bytes:
    body = bytearray(TRACE + HEADERS)
    for n in range(1, 5):
        for offset in (-2, -1, 0, 1, 2):
            target = boundary * n + offset * 3 + 40
            # The wire offset differs from the stored one; put dots at both kinds of place.
            filler = max(1, target - len(body) - 1)
            body += b"x" * filler + b"\n.\n"
    body += b".\nMAIL FROM:<evil@example.net>\nRCPT TO:<victim@example.net>\nDATA\n"
    return bytes(body)


@pytest.mark.parametrize("chunk_size", [16384, 16383, 16385, 65536])
@pytest_twisted.ensureDeferred
async def test_dots_at_chunk_boundaries_stay_one_message(
    kit: Kit, peers: list[Peer], chunk_size: int
) -> None:
    peer = peer_with(peers)
    stored = _dots_at_boundaries(16384)
    # A '.' line right at each chunk boundary of the stored file, and 1, 2 bytes either side.
    for n in range(1, 4):
        for offset in (-2, -1, 0, 1, 2):
            position = 16384 * n + offset
            stored = stored[:position] + b"\n.\n" + stored[position:]
    results = await send(kit, peer, kit.message(stored), chunk_size=chunk_size)
    assert codes(results) == [("bob@example.net", 250, "2.0.0", False)]
    assert len(peer.factory.messages) == 1
    assert peer.factory.messages[0].content == wire_expected(stored)
    assert "MAIL FROM:<evil@example.net>" not in peer.factory.sessions[0].commands


@pytest_twisted.ensureDeferred
async def test_first_line_dot_and_bare_line_endings(kit: Kit, peers: list[Peer]) -> None:
    peer = peer_with(peers)
    stored = b"Return-Path: <alice@example.org>\n.\nbare\rcr\r\ncrlf\n\r.\r\nend\n"
    await send(kit, peer, kit.message(stored))
    [message] = peer.factory.messages
    assert not message.bare_line_endings
    assert message.content == b".\r\nbare\r\ncr\r\ncrlf\r\n\r\n.\r\nend\r\n"


@pytest_twisted.ensureDeferred
async def test_large_message_streams(kit: Kit, peers: list[Peer]) -> None:
    peer = peer_with(peers)
    stored = TRACE + HEADERS + b"0123456789abcdef.\n.x\n" * 200_000  # ~4 MiB
    results = await send(kit, peer, kit.message(stored))
    assert results[0].delivered
    assert peer.factory.messages[0].content == wire_expected(stored)


# --- pipelining -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pipelining_sends_the_envelope_in_one_write(kit: Kit, peers: list[Peer]) -> None:
    peer = peer_with(peers, extensions=["PIPELINING"])
    message = kit.message(recipients=("b1@example.net", "b2@example.net"))
    await send(kit, peer, message)
    reads = peer.factory.sessions[0].reads
    together = [r for r in reads if r.startswith(b"MAIL FROM")]
    assert together == [
        b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<b1@example.net>\r\n"
        b"RCPT TO:<b2@example.net>\r\nDATA\r\n"
    ]


@pytest_twisted.ensureDeferred
async def test_without_pipelining_one_command_at_a_time(kit: Kit, peers: list[Peer]) -> None:
    peer = peer_with(peers, extensions=["8BITMIME"])
    message = kit.message(recipients=("b1@example.net", "b2@example.net"))
    await send(kit, peer, message)
    reads = peer.factory.sessions[0].reads
    envelope = [r for r in reads if r[:4] in (b"MAIL", b"RCPT", b"DATA")]
    assert envelope == [
        b"MAIL FROM:<alice@example.org>\r\n",
        b"RCPT TO:<b1@example.net>\r\n",
        b"RCPT TO:<b2@example.net>\r\n",
        b"DATA\r\n",
    ]


# --- several messages on one connection ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pipelining_sends_rset_with_the_next_envelope(kit: Kit, peers: list[Peer]) -> None:
    peer = peer_with(peers, extensions=["PIPELINING"])
    connection = await kit.connector().connect(at(peer))
    for _ in range(2):
        [result] = await connection.deliver(kit.message())
        assert result.delivered
    await connection.close()
    [session] = peer.factory.sessions
    assert len(session.messages) == 2
    envelopes = [r for r in session.reads if b"MAIL FROM" in r]
    assert envelopes == [
        b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n",
        b"RSET\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n",
    ]


@pytest.mark.parametrize("pipelining", [True, False])
@pytest_twisted.ensureDeferred
async def test_refused_rset_drops_the_session_before_any_body(
    kit: Kit, peers: list[Peer], pipelining: bool
) -> None:
    peer = peer_with(
        peers,
        extensions=["PIPELINING"] if pipelining else [],
        rset=[b"500 5.5.1 RSET? never heard of it"],
    )
    connection = await kit.connector().connect(at(peer))
    [first] = await connection.deliver(kit.message())
    assert first.delivered
    [second] = await connection.deliver(kit.message())
    assert (second.code, second.enhanced, second.permanent) == (421, "4.5.0", False)
    assert "500 5.5.1 RSET? never heard of it" in second.text
    assert not connection.usable
    [session] = peer.factory.sessions
    assert len(session.messages) == 1  # the second body was never sent


@pytest.mark.parametrize("pipelining", [True, False])
@pytest_twisted.ensureDeferred
async def test_several_messages_over_one_connection(
    kit: Kit, peers: list[Peer], pipelining: bool
) -> None:
    peer = peer_with(peers, extensions=["PIPELINING"] if pipelining else [])
    connection = await kit.connector().connect(at(peer))
    for n in range(3):
        body = TRACE + HEADERS + f"message {n}\n".encode()
        results = await connection.deliver(kit.message(body))
        assert results[0].delivered
        assert connection.usable
    await connection.close()
    [session] = peer.factory.sessions
    assert [m.content.splitlines()[-1] for m in session.messages] == [
        b"message 0",
        b"message 1",
        b"message 2",
    ]
    verbs = [c.split(" ")[0].split(":")[0] for c in session.commands]
    assert verbs == ["EHLO"] + ["MAIL", "RCPT", "DATA"] + ["RSET", "MAIL", "RCPT", "DATA"] * 2 + [
        "QUIT"
    ]
    assert not connection.usable


@pytest_twisted.ensureDeferred
async def test_recipients_are_split_into_transactions(kit: Kit, peers: list[Peer]) -> None:
    peer = peer_with(peers)
    recipients = [f"r{n}@example.net" for n in range(5)]
    message = kit.message(recipients=recipients)
    results = await send(kit, peer, message, recipients_per_transaction=2)
    assert [r.recipient for r in results] == recipients and all(r.delivered for r in results)
    [session] = peer.factory.sessions
    assert [m.recipients for m in session.messages] == [
        recipients[0:2],
        recipients[2:4],
        recipients[4:],
    ]
    assert session.commands.count("RSET") == 2


# --- per-recipient results ------------------------------------------------------------------------

MIXED = {
    "ok@example.net": [b"250 2.1.5 OK"],
    "gone@example.net": [b"550 5.1.1 No such user"],
    "full@example.net": [b"452 4.2.2 Mailbox full"],
}


@pytest.mark.parametrize("pipelining", [True, False])
@pytest_twisted.ensureDeferred
async def test_mixed_recipient_results_in_one_transaction(
    kit: Kit, peers: list[Peer], pipelining: bool
) -> None:
    peer = peer_with(peers, extensions=["PIPELINING"] if pipelining else [], rcpt=dict(MIXED))
    message = kit.message(recipients=("gone@example.net", "ok@example.net", "full@example.net"))
    results = await send(kit, peer, message)
    assert codes(results) == [
        ("gone@example.net", 550, "5.1.1", True),
        ("ok@example.net", 250, "2.0.0", False),
        ("full@example.net", 452, "4.2.2", False),
    ]
    assert results[0].text == "No such user"
    [message_at_peer] = peer.factory.messages
    assert message_at_peer.recipients == ["ok@example.net"]


@pytest.mark.parametrize("pipelining", [True, False])
@pytest_twisted.ensureDeferred
async def test_all_recipients_refused_sends_no_body(
    kit: Kit, peers: list[Peer], pipelining: bool
) -> None:
    peer = peer_with(
        peers,
        extensions=["PIPELINING"] if pipelining else [],
        rcpt={"gone@example.net": [b"550 5.1.1 No such user"]},
    )
    connection = await kit.connector().connect(at(peer))
    results = await connection.deliver(kit.message(recipients=("gone@example.net",)))
    assert codes(results) == [("gone@example.net", 550, "5.1.1", True)]
    assert connection.usable  # the session goes on
    again = await connection.deliver(kit.message(recipients=("ok@example.net",)))
    assert again[0].delivered
    await connection.close()
    assert len(peer.factory.messages) == 1


# (script, reply every recipient gets, permanent)
REFUSALS = [
    ({"mail": [b"451 4.3.0 Try later"]}, (451, "4.3.0"), False),
    ({"mail": [b"553 5.7.1 Sender refused"]}, (553, "5.7.1"), True),
    ({"data": [b"451 4.3.0 No DATA now"]}, (451, "4.3.0"), False),
    ({"data": [b"554 5.5.1 No"]}, (554, "5.5.1"), True),
    ({"final": [b"452 4.3.1 Disk full"]}, (452, "4.3.1"), False),
    ({"final": [b"554 5.7.1 Spam"]}, (554, "5.7.1"), True),
    ({"final": [b"550 Rejected, no enhanced code"]}, (550, ""), True),
]


@pytest.mark.parametrize(("script", "reply", "permanent"), REFUSALS)
@pytest.mark.parametrize("pipelining", [True, False])
@pytest_twisted.ensureDeferred
async def test_refusals_reach_every_recipient(
    kit: Kit,
    peers: list[Peer],
    script: dict[str, Any],
    reply: tuple[int, str],
    permanent: bool,
    pipelining: bool,
) -> None:
    peer = peer_with(peers, extensions=["PIPELINING"] if pipelining else [], **script)
    results = await send(kit, peer, kit.message(recipients=("a@example.net", "b@example.net")))
    assert codes(results) == [(r, *reply, permanent) for r in ("a@example.net", "b@example.net")]
    assert not any(r.delivered for r in results)


@pytest_twisted.ensureDeferred
async def test_temporary_then_accepted_on_the_same_connection(kit: Kit, peers: list[Peer]) -> None:
    peer = peer_with(peers, final=[b"451 4.7.1 Greylisted, come back later", b"250 2.0.0 Queued"])
    connection = await kit.connector().connect(at(peer))
    first = await connection.deliver(kit.message())
    second = await connection.deliver(kit.message())
    await connection.close()
    assert codes(first) == [("bob@example.net", 451, "4.7.1", False)]
    assert codes(second) == [("bob@example.net", 250, "2.0.0", False)]


# --- addresses and extensions --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unsafe_recipient_is_refused_locally(kit: Kit, peers: list[Peer]) -> None:
    peer = peer_with(peers)
    message = kit.message(
        recipients=("ok@example.net", "x@example.net>\r\nRSET", "a b@example.net")
    )
    results = await send(kit, peer, message)
    assert codes(results)[1:] == [
        ("x@example.net>\r\nRSET", 553, "5.1.3", True),
        ("a b@example.net", 553, "5.1.3", True),
    ]
    assert results[0].delivered
    assert all(c.count("<") <= 1 for c in peer.factory.sessions[0].commands)
    assert "RSET" not in peer.factory.sessions[0].commands


@pytest_twisted.ensureDeferred
async def test_unsafe_sender_is_refused_for_everyone(kit: Kit, peers: list[Peer]) -> None:
    peer = peer_with(peers)
    results = await send(kit, peer, kit.message(sender="a@example.org> SIZE=1"))
    assert codes(results) == [("bob@example.net", 553, "5.1.7", True)]
    assert not any(c.startswith("MAIL") for c in peer.factory.sessions[0].commands)


@pytest_twisted.ensureDeferred
async def test_null_sender(kit: Kit, peers: list[Peer]) -> None:
    peer = peer_with(peers)
    results = await send(kit, peer, kit.message(sender=""))
    assert results[0].delivered
    assert peer.factory.messages[0].mail_line == "MAIL FROM:<>"


@pytest_twisted.ensureDeferred
async def test_size_over_the_peers_limit_is_permanent_and_nothing_is_sent(
    kit: Kit, peers: list[Peer]
) -> None:
    peer = peer_with(peers, extensions=["SIZE 1000", "PIPELINING"])
    big = kit.message(
        TRACE + HEADERS + b"x" * 2000 + b"\n", recipients=("a@example.net", "b@example.net")
    )
    results = await send(kit, peer, big)
    assert codes(results) == [
        ("a@example.net", 552, "5.3.4", True),
        ("b@example.net", 552, "5.3.4", True),
    ]
    assert not any(c.startswith("MAIL") for c in peer.factory.sessions[0].commands)
    small = kit.message(TRACE + HEADERS + b"x\n")
    assert (await send(kit, peer, small))[0].delivered
    assert peer.factory.messages[0].mail_line == f"MAIL FROM:<alice@example.org> SIZE={small.size}"


@pytest_twisted.ensureDeferred
async def test_smtputf8_is_required_when_the_envelope_needs_it(kit: Kit, peers: list[Peer]) -> None:
    without = peer_with(peers, extensions=["8BITMIME"])
    results = await send(kit, without, kit.message(recipients=("jörg@example.net",)))
    assert codes(results) == [("jörg@example.net", 553, "5.6.7", True)]
    assert not any(c.startswith("MAIL") for c in without.factory.sessions[0].commands)
    also = await send(kit, without, kit.message(smtputf8=True))
    assert codes(also) == [("bob@example.net", 553, "5.6.7", True)]
    with_it = peer_with(peers, extensions=["8BITMIME", "SMTPUTF8"])
    ok = await send(kit, with_it, kit.message(recipients=("jörg@example.net",)))
    assert ok[0].delivered
    message = with_it.factory.messages[0]
    assert message.mail_line == "MAIL FROM:<alice@example.org> SMTPUTF8"
    assert message.recipients == ["jörg@example.net"]


DSN_RECIPIENT = OutboundRecipient(
    "bob@example.net", ("SUCCESS", "DELAY"), "rfc822;Bob+x@example.net"
)


@pytest_twisted.ensureDeferred
async def test_dsn_parameters_passed_on_when_offered(kit: Kit, peers: list[Peer]) -> None:
    peer = peer_with(peers, extensions=["DSN", "8BITMIME"])
    message = kit.message(recipients=(DSN_RECIPIENT,), ret="HDRS", envid="env=1", eight_bit=True)
    [result] = await send(kit, peer, message)
    assert result.delivered and result.dsn_passed_on  # success reports are the peer's now
    [received] = peer.factory.messages
    assert (
        received.mail_line == "MAIL FROM:<alice@example.org> BODY=8BITMIME RET=HDRS ENVID=env+3D1"
    )
    assert received.rcpt_lines == [
        "RCPT TO:<bob@example.net> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Bob+2Bx@example.net"
    ]


@pytest_twisted.ensureDeferred
async def test_dsn_parameters_withheld_when_not_offered(kit: Kit, peers: list[Peer]) -> None:
    peer = peer_with(peers, extensions=["PIPELINING"])
    message = kit.message(recipients=(DSN_RECIPIENT,), ret="FULL", envid="e")
    [result] = await send(kit, peer, message)
    assert result.delivered and not result.dsn_passed_on  # we report "relayed" ourselves
    [received] = peer.factory.messages
    assert received.mail_line == "MAIL FROM:<alice@example.org>"
    assert received.rcpt_lines == ["RCPT TO:<bob@example.net>"]


@pytest_twisted.ensureDeferred
async def test_ehlo_refused_falls_back_to_helo(kit: Kit, peers: list[Peer]) -> None:
    peer = peer_with(peers, ehlo=b"502 5.5.1 EHLO not implemented")
    results = await send(kit, peer, kit.message())
    assert results[0].delivered
    commands = peer.factory.sessions[0].commands
    assert commands[:2] == ["EHLO relay.example.org", "HELO relay.example.org"]
    assert [r for r in peer.factory.sessions[0].reads if r.startswith(b"MAIL")] == [
        b"MAIL FROM:<alice@example.org>\r\n"
    ]  # no extension: no pipelining


# --- connection trouble ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_drop_mid_data_defers_every_recipient(kit: Kit, peers: list[Peer]) -> None:
    peer = peer_with(peers, drop_after_data_bytes=5000)
    connection = await kit.connector().connect(at(peer))
    message = kit.message(
        TRACE + HEADERS + b"line\n" * 20000, recipients=("a@example.net", "b@example.net")
    )
    results = await connection.deliver(message)
    assert codes(results) == [
        ("a@example.net", 421, "4.4.2", False),
        ("b@example.net", 421, "4.4.2", False),
    ]
    assert results[0].text.startswith(replies.CONNECTION_LOST.text)
    assert not connection.usable
    later = await connection.deliver(kit.message())
    assert codes(later) == [("bob@example.net", *_codes(replies.CONNECTION_CLOSED), False)]
    assert peer.factory.messages == []


def _codes(reply: Reply) -> tuple[int, str]:
    return reply.code, reply.enhanced


@pytest_twisted.ensureDeferred
async def test_peer_down_then_back(kit: Kit, peers: list[Peer]) -> None:
    peer = start_peer(Script())
    number = peer.number
    await peer.stop()
    candidate = Candidate("mx.peer.test", "127.0.0.1", number)
    results = await deliver_once(kit.connector(), [candidate], kit.message())
    assert codes(results) == [("bob@example.net", *_codes(replies.CONNECT_FAILED), False)]
    assert "connection refused" in results[0].text
    back = start_peer(Script(), port=number)
    peers.append(back)
    again = await deliver_once(kit.connector(), [candidate], kit.message())
    assert again[0].delivered


@pytest.mark.parametrize("greeting", [b"421 4.3.2 Busy, try later", b"554 5.7.1 Go away"])
@pytest_twisted.ensureDeferred
async def test_refused_greeting_moves_on_to_the_next_mx(
    kit: Kit, peers: list[Peer], greeting: bytes
) -> None:
    busy = peer_with(peers, greetings=[greeting])
    fine = peer_with(peers)
    results = await deliver_once(
        kit.connector(), [at(busy, "mx1.peer.test"), at(fine, "mx2.peer.test")], kit.message()
    )
    assert results[0].delivered and results[0].remote_mta == "mx2.peer.test"
    assert busy.factory.sessions[0].quit  # said goodbye to the refusing one


@pytest_twisted.ensureDeferred
async def test_all_mx_refusing_is_temporary(kit: Kit, peers: list[Peer]) -> None:
    one = peer_with(peers, greetings=[b"554 5.7.1 Go away"])
    two = peer_with(peers, greetings=[b"421 4.3.2 Busy"])
    results = await deliver_once(kit.connector(), [at(one), at(two)], kit.message())
    assert not results[0].permanent and results[0].code == 421
    assert "421 4.3.2 Busy" in results[0].text


@pytest_twisted.ensureDeferred
async def test_garbage_from_the_peer_is_a_protocol_error(kit: Kit, peers: list[Peer]) -> None:
    peer = peer_with(peers, greetings=[b"hello, I am not SMTP"])
    with pytest.raises(SessionError) as caught:
        await kit.connector().connect(at(peer))
    assert _codes(caught.value.reply) == _codes(replies.PROTOCOL_ERROR)


@pytest_twisted.ensureDeferred
async def test_reply_before_the_end_of_data(kit: Kit, peers: list[Peer]) -> None:
    peer = peer_with(peers, reply_during_data=b"554 5.7.1 Content refused")
    connection = await kit.connector().connect(at(peer))
    message = kit.message(TRACE + HEADERS + b"line\n" * 200000)
    results = await connection.deliver(message)
    assert codes(results) == [("bob@example.net", 554, "5.7.1", True)]
    assert not connection.usable


# --- timeouts (task.Clock) ------------------------------------------------------------------------


async def _spin(condition: Any) -> None:
    """Let the real reactor run (sockets, threads) until ``condition()``; bounded."""
    from twisted.internet import reactor

    for _ in range(500):
        if condition():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition never became true")


@pytest_twisted.ensureDeferred
async def test_greeting_timeout(kit: Kit, peers: list[Peer]) -> None:
    from twisted.internet import defer

    peer = peer_with(peers, silent="greeting")
    connecting = defer.Deferred.fromCoroutine(kit.connector().connect(at(peer)))
    await peer.factory.connections(1)
    # Connected: the connect timer is gone, the greeting timer runs.
    await _spin(lambda: [c.getTime() for c in kit.clock.getDelayedCalls()] == [300.0])
    kit.clock.advance(299)
    assert not connecting.called
    kit.clock.advance(1)
    with pytest.raises(SessionError) as caught:
        await connecting
    assert _codes(caught.value.reply) == _codes(replies.TIMEOUT)
    assert "greeting" in caught.value.reply.text


@pytest_twisted.ensureDeferred
async def test_final_dot_timeout_starts_after_the_body(kit: Kit, peers: list[Peer]) -> None:
    from twisted.internet import defer

    peer = peer_with(peers, silent="final")
    connection = await kit.connector().connect(at(peer))
    delivering = defer.Deferred.fromCoroutine(connection.deliver(kit.message()))
    await _spin(lambda: peer.factory.sessions[0].messages)  # the whole body arrived
    kit.clock.advance(599)
    assert not delivering.called
    kit.clock.advance(1)
    results = await delivering
    assert codes(results) == [("bob@example.net", *_codes(replies.TIMEOUT), False)]
    assert "final dot" in results[0].text


@pytest_twisted.ensureDeferred
async def test_stalled_peer_hits_the_data_block_timeout(kit: Kit, peers: list[Peer]) -> None:
    from twisted.internet import defer

    peer = peer_with(peers, stall_data=True)
    connection = await kit.connector().connect(at(peer), starttls=False)
    message = kit.message(
        TRACE + HEADERS + b"y" * 999 + b"\n" * 1 + (b"z" * 1023 + b"\n") * 24 * 1024
    )
    delivering = defer.Deferred.fromCoroutine(connection.deliver(message))
    transport: Any = connection._protocol.transport
    await _spin(lambda: transport.producerPaused)  # the socket buffers are full
    kit.clock.advance(179)
    assert not delivering.called
    kit.clock.advance(1)
    results = await delivering
    assert codes(results) == [("bob@example.net", *_codes(replies.TIMEOUT), False)]


@pytest_twisted.ensureDeferred
async def test_idle_connection_says_quit(kit: Kit, peers: list[Peer]) -> None:
    peer = peer_with(peers)
    connector = Connector(
        _reactor(),
        ClientOptions("relay.example.org", tls=TLS_NONE, timeouts=Timeouts(idle=7.0)),
        threads.deferToThread,
        clock=kit.clock,
    )
    connection: SMTPConnection = await connector.connect(at(peer))
    await connection.deliver(kit.message())
    kit.clock.advance(6.9)
    assert connection.usable
    kit.clock.advance(0.1)
    await connection.when_closed()
    assert peer.factory.sessions[0].quit


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest_twisted.ensureDeferred
async def test_connect_timeout(kit: Kit) -> None:
    """A listener whose accept queue is full never completes a handshake: the connect waits."""
    import socket

    from twisted.internet import defer

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):  # fill the accept queue (Linux admits backlog + 1)
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        connecting = defer.Deferred.fromCoroutine(
            kit.connector().connect(Candidate("mx.peer.test", "127.0.0.1", port))
        )
        await _spin(lambda: kit.clock.getDelayedCalls())
        kit.clock.advance(29)
        assert not connecting.called
        kit.clock.advance(1)
        with pytest.raises(SessionError) as caught:
            await connecting
        assert _codes(caught.value.reply) == _codes(replies.CONNECT_FAILED)
        assert "timed out" in caught.value.reply.text
    finally:
        for filler in fillers:
            filler.close()
        server.close()
