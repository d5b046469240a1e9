"""In-memory protocol tests of :class:`mailsrv.smtp.session.SMTPSession`.

Every test drives a real session over a ``StringTransport`` with a ``task.Clock``; the disk work
(spool, the committer's batch, Maildir delivery) runs for real under ``tmp_path``, synchronously
(``GroupCommitter.inline``), so a reply is on the "wire" as soon as ``dataReceived`` returns.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, error, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python import failure

from mailsrv.delivery.committer import GroupCommitter
from mailsrv.delivery.fssync import filesystem_syncer
from mailsrv.delivery.maildir import MaildirSink, MaildirStore
from mailsrv.smtp import replies
from mailsrv.smtp.replies import Reply
from mailsrv.smtp.server import SMTPServer
from mailsrv.smtp.session import SMTPSession
from tests.conftest import make_config

UNTRUSTED_IP = "203.0.113.5"
CRLF = b"\r\n"

_ENHANCED_LINE = re.compile(rb"^\d{3}[ -]\d\.\d{1,3}\.\d{1,3} ")


def run_now(f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    """``run_in_thread`` for tests: the disk work runs for real, synchronously."""
    return defer.maybeDeferred(f, *args, **kwargs)


def split_replies(data: bytes) -> list[bytes]:
    """Whole replies (multi-line ones joined), each with its CRLFs."""
    result: list[bytes] = []
    current = b""
    for line in data.split(CRLF)[:-1]:
        current += line + CRLF
        if line[3:4] != b"-":
            result.append(current)
            current = b""
    assert current == b"", f"incomplete multi-line reply: {current!r}"
    assert data == b"".join(result), f"trailing partial reply in {data!r}"
    return result


def matches(data: bytes, reply: Reply) -> bool:
    """True when ``data`` is one single-line reply with ``reply``'s codes (any text)."""
    prefix = f"{reply.code} {reply.enhanced} " if reply.enhanced else f"{reply.code} "
    return data.startswith(prefix.encode()) and data.endswith(CRLF) and data.count(CRLF) == 1


def queue_id_of(data: bytes) -> str:
    """The queue id from a ``250 2.0.0 OK: queued as <id>`` reply."""
    match = re.fullmatch(rb"250 2\.0\.0 OK: queued as ([0-9A-Z]+)\r\n", data)
    assert match is not None, data
    return match.group(1).decode()


def body_of(message: bytes) -> bytes:
    """A stored message without the trace headers the server prepended."""
    lines = message.split(b"\n")
    assert lines[0].startswith(b"Return-Path: <") and lines[1].startswith(b"Received: from ")
    # Return-Path, Received, "by ... id X", optional "for <rcpt>;", the date
    count = 5 if lines[3].startswith(b"\tfor <") else 4
    return b"\n".join(lines[count:])


class Client:
    """One session over a StringTransport; ``send`` returns what the server wrote."""

    def __init__(self, server: SMTPServer, host: str, port: int) -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        self.proto = SMTPSession(server, "mx")
        self.proto.makeConnection(self.transport)
        self.greeting = self.transport.value()
        self.transport.clear()
        self.lost = False

    def send(self, data: bytes) -> bytes:
        """Feed raw bytes in one ``dataReceived``; return (and clear) the server's output."""
        self.transport.clear()
        self.proto.dataReceived(data)
        out: bytes = self.transport.value()
        self.transport.clear()
        return out

    def send_bytewise(self, data: bytes) -> bytes:
        """Feed ``data`` one byte at a time; return everything written meanwhile."""
        self.transport.clear()
        for i in range(len(data)):
            self.proto.dataReceived(data[i : i + 1])
        out: bytes = self.transport.value()
        self.transport.clear()
        return out

    def cmd(self, line: str | bytes) -> bytes:
        """Send one command line (CRLF added)."""
        raw = line.encode() if isinstance(line, str) else line
        return self.send(raw + CRLF)

    def ehlo(self, name: str = "client.test") -> bytes:
        reply = self.cmd(f"EHLO {name}")
        assert reply.startswith(b"250-"), reply
        return reply

    def transaction(self, sender: str = "sender@remote.test", *rcpts: str) -> None:
        """EHLO (if needed), MAIL and RCPTs, each asserted to succeed."""
        if self.proto.helo is None:
            self.ehlo()
        assert matches(self.cmd(f"MAIL FROM:<{sender}>"), replies.SENDER_OK)
        for rcpt in rcpts or ("alice@example.org",):
            assert matches(self.cmd(f"RCPT TO:<{rcpt}>"), replies.RECIPIENT_OK), rcpt

    def data(self, body: bytes) -> bytes:
        """DATA, then ``body`` and the end-of-data marker; returns the final reply."""
        assert matches(self.cmd("DATA"), replies.START_DATA)
        return self.send(body + b".\r\n")

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        """What the reactor would do once the transport closed."""
        if not self.lost:
            self.lost = True
            self.proto.connectionLost(failure.Failure(error.ConnectionDone()))


class Harness:
    """A real :class:`SMTPServer` on a fake clock, with files under ``tmp_path``."""

    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        self.config = make_config(tmp_path, **overrides)
        self.clock = task.Clock()
        store = MaildirStore(self.config.mail_dir, self.config.server_name)
        sync = filesystem_syncer(self.config.spool_dir, self.config.mail_dir)
        self.committer = GroupCommitter.inline([MaildirSink(store)], sync)
        self.committer.startService()
        self.server = SMTPServer(self.config, self.clock, run_now, self.committer)
        self.server.spool.prepare()
        self.clients: list[Client] = []
        self._port = 40000

    def connect(self, host: str = UNTRUSTED_IP) -> Client:
        self._port += 1
        client = Client(self.server, host, self._port)
        self.clients.append(client)
        return client

    def maildir_files(self, mailbox: str) -> list[Path]:
        local, _, domain = mailbox.partition("@")
        folder = self.config.mail_dir / domain / local / "new"
        return sorted(folder.iterdir()) if folder.exists() else []

    def messages(self, mailbox: str) -> list[bytes]:
        return [p.read_bytes() for p in self.maildir_files(mailbox)]

    def all_messages(self) -> list[Path]:
        root = self.config.mail_dir
        return sorted(root.glob("*/*/new/*")) if root.exists() else []

    def spool_files(self) -> list[Path]:
        return sorted(self.server.spool.incoming.iterdir())

    def close_all(self) -> None:
        for client in self.clients:
            client.lose()


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    """``make(**config_overrides)`` builds a :class:`Harness`; sessions are closed after."""
    made: list[Harness] = []

    def factory(**overrides: Any) -> Harness:
        harness = Harness(tmp_path, **overrides)
        made.append(harness)
        return harness

    yield factory
    for harness in made:
        harness.close_all()
        harness.clock.advance(3600)  # fire or cancel whatever timers are left


@pytest.fixture
def h(make: Callable[..., Harness]) -> Harness:
    return make()


@pytest.fixture
def c(h: Harness) -> Client:
    return h.connect()


SIMPLE_BODY = b"Subject: test\r\n\r\nhello\r\n"


# --- greeting and EHLO/HELO ----------------------------------------------------------------------


def test_greeting_is_220_with_hostname(c: Client) -> None:
    assert c.greeting == b"220 mx.example.org ESMTP mailsrv ready\r\n"


def test_ehlo_lists_extensions(h: Harness, c: Client) -> None:
    reply = c.cmd("EHLO client.test")
    lines = reply.split(CRLF)[:-1]
    assert lines[0] == b"250-mx.example.org Hello client.test [203.0.113.5]"
    assert all(line.startswith(b"250-") for line in lines[:-1])
    assert lines[-1].startswith(b"250 ")
    keywords = [line[4:] for line in lines[1:]]
    assert keywords == [
        b"PIPELINING",
        f"SIZE {h.config.max_message_size}".encode(),
        b"8BITMIME",
        b"ENHANCEDSTATUSCODES",
        b"DSN",
        b"SMTPUTF8",
    ]


def test_ehlo_size_follows_config(make: Callable[..., Harness]) -> None:
    client = make(max_message_size=4096).connect()
    assert b"250-SIZE 4096\r\n" in client.ehlo()


def test_helo_is_one_line(c: Client) -> None:
    assert c.cmd("HELO client.test") == b"250 mx.example.org Hello client.test [203.0.113.5]\r\n"


@pytest.mark.parametrize("line", ["EHLO", "EHLO ", "HELO", "EHLO two words"])
def test_ehlo_without_single_argument_is_501(c: Client, line: str) -> None:
    assert c.cmd(line) == replies.HELO_SYNTAX.format()
    assert c.proto.helo is None


def test_second_ehlo_resets_transaction(c: Client) -> None:
    c.transaction()
    c.ehlo("again.test")
    assert c.proto.transaction is None
    assert c.cmd("RCPT TO:<alice@example.org>") == replies.NEED_MAIL.format()
    assert matches(c.cmd("MAIL FROM:<sender@remote.test>"), replies.SENDER_OK)


# --- command sequence and simple commands -------------------------------------------------------


def test_mail_before_helo(c: Client) -> None:
    reply = c.cmd("MAIL FROM:<a@b.test>")
    assert reply == replies.NEED_HELO.format()
    assert reply.startswith(b"503 5.5.1 ")


def test_rcpt_before_mail(c: Client) -> None:
    c.ehlo()
    assert c.cmd("RCPT TO:<alice@example.org>") == replies.NEED_MAIL.format()


@pytest.mark.parametrize("with_mail", [False, True])
def test_data_before_rcpt(c: Client, with_mail: bool) -> None:
    c.ehlo()
    if with_mail:
        assert matches(c.cmd("MAIL FROM:<a@b.test>"), replies.SENDER_OK)
        assert c.cmd("DATA") == replies.NEED_RCPT.format()
    else:
        assert c.cmd("DATA") == replies.NEED_MAIL.format()
    assert c.cmd("DATA").startswith(b"503 5.5.1 ")


def test_nested_mail(c: Client) -> None:
    c.transaction()
    assert c.cmd("MAIL FROM:<other@b.test>") == replies.NESTED_MAIL.format()


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        ("FOO", replies.UNKNOWN_COMMAND),
        ("FOO bar", replies.UNKNOWN_COMMAND),
        ("AUTH PLAIN", replies.NOT_IMPLEMENTED),  # no AUTH configured
        ("STARTTLS", replies.NOT_IMPLEMENTED),  # no TLS configured
        ("", replies.UNKNOWN_COMMAND),
        ("EXPN staff", replies.NOT_IMPLEMENTED),
        ("expn staff", replies.NOT_IMPLEMENTED),
        ("TURN", replies.NOT_IMPLEMENTED),
        ("BDAT 10 LAST", replies.NOT_IMPLEMENTED),
        ("RSET now", replies.NO_ARGUMENTS),
        ("QUIT now", replies.NO_ARGUMENTS),
        ("DATA now", replies.NO_ARGUMENTS),
        ("NOOP", replies.OK),
        ("NOOP anything at all", replies.OK),
        ("noop", replies.OK),
        ("VRFY alice", replies.CANNOT_VRFY),
        ("VRFY", replies.SYNTAX_ERROR),
        ("HELP", replies.HELP),
        ("HELP MAIL", replies.HELP),
        ("RSET", replies.RESET_OK),
    ],
)
def test_simple_commands(c: Client, line: str, reply: Reply) -> None:
    c.ehlo()
    assert c.cmd(line) == reply.format()
    assert not c.closing


def test_simple_command_codes() -> None:
    assert (replies.UNKNOWN_COMMAND.code, replies.UNKNOWN_COMMAND.enhanced) == (500, "5.5.1")
    assert replies.NOT_IMPLEMENTED.code == 502
    assert replies.CANNOT_VRFY.code == 252
    assert replies.HELP.code == 214
    assert replies.NO_ARGUMENTS.code == 501


@pytest.mark.parametrize(
    "line",
    [
        "MAIL",
        "MAIL FROM",
        "MAIL FROM:",
        "MAIL FROM:a@b.test",
        "MAIL FROM:<a@b.test",
        "MAIL FROM:<a@@b.test>",
        "MAIL FROM:<a@b.test>junk",
        "MAIL TO:<a@b.test>",
        "MAIL FROM:<a@b.test> SIZE=10 SIZE=20",
        "MAIL FROM:<a@b.test> =x",
    ],
)
def test_bad_mail_syntax(c: Client, line: str) -> None:
    c.ehlo()
    reply = c.cmd(line)
    assert reply.startswith(b"501 5."), reply
    assert c.proto.transaction is None


@pytest.mark.parametrize(
    "line",
    [
        "RCPT",
        "RCPT TO:",
        "RCPT TO:alice@example.org",
        "RCPT TO:<alice@example.org",
        "RCPT TO:<>",
        "RCPT FROM:<alice@example.org>",
        "RCPT TO:<alice@example.org>junk",
        "RCPT TO:<alice@[999.1.1.1]>",
    ],
)
def test_bad_rcpt_syntax(c: Client, line: str) -> None:
    c.transaction("sender@remote.test", "alice@example.org")
    reply = c.cmd(line)
    assert reply.startswith(b"501 5."), reply
    assert c.proto.transaction is not None and len(c.proto.transaction.recipients) == 1


def test_quit_says_bye_and_closes(c: Client) -> None:
    c.ehlo()
    assert c.cmd("QUIT") == replies.BYE.format()
    assert c.closing
    assert c.cmd("NOOP") == b""  # nothing more is answered


def test_quit_in_pipeline_drops_what_follows(c: Client) -> None:
    assert c.send(b"NOOP\r\nQUIT\r\nNOOP\r\nHELP\r\n") == (
        replies.OK.format() + replies.BYE.format()
    )
    assert c.closing


def test_every_reply_has_an_enhanced_code(h: Harness, c: Client) -> None:
    script = [
        b"EHLO client.test",
        b"HELO client.test",
        b"NOOP",
        b"HELP",
        b"VRFY alice",
        b"VRFY",
        b"EXPN x",
        b"BOGUS",
        b"RCPT TO:<alice@example.org>",
        b"DATA",
        b"MAIL FROM:<sender@remote.test> SIZE=100",
        b"MAIL FROM:<other@remote.test>",
        b"RCPT TO:<nobody@example.org>",
        b"RCPT TO:<alice@remote.test>",
        b"RCPT TO:<alice@example.org>",
        b"RSET",
        b"MAIL FROM:<sender@remote.test> FOO=1",
        b"MAIL FROM:<sender@remote.test>",
        b"RCPT TO:<alice@example.org>",
        b"DATA",
        b"Subject: x\r\n\r\nbody\r\n.",
        b"MAIL FROM:<sender@remote.test> SIZE=999999999999",
        b"NOOP \xff",
        b"QUIT",
    ]
    output = c.send(b"".join(line + CRLF for line in script))
    assert c.closing
    lines = output.split(CRLF)[:-1]
    checked = 0
    for line in lines:
        if line.startswith(b"250") and b"Hello client.test" in line:
            continue
        if line.startswith(b"250-") or line == b"250 SMTPUTF8":
            continue  # EHLO keywords
        if line.startswith(b"354 "):
            continue
        assert _ENHANCED_LINE.match(line), line
        checked += 1
    assert checked == len(script) - 3  # minus EHLO, HELO and the DATA that got 354
    assert len(h.messages("alice@example.org")) == 1


# --- MAIL parameters: SIZE, BODY, SMTPUTF8 ------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "reply"),
    [
        ("SIZE={max_plus_one}", replies.MESSAGE_TOO_BIG),
        ("SIZE=999999999999999999999999", replies.MESSAGE_TOO_BIG),
        ("SIZE={max}", replies.SENDER_OK),
        ("SIZE=0", replies.SENDER_OK),
        ("size=100", replies.SENDER_OK),
        ("SIZE", replies.MAIL_SYNTAX),
        ("SIZE=-1", replies.MAIL_SYNTAX),
        ("SIZE=1k", replies.MAIL_SYNTAX),
        ("BODY=8BITMIME", replies.SENDER_OK),
        ("BODY=7BIT", replies.SENDER_OK),
        ("body=8bitmime", replies.SENDER_OK),
        ("BODY=BINARYMIME", replies.MAIL_SYNTAX),
        ("BODY", replies.MAIL_SYNTAX),
        ("SMTPUTF8", replies.SENDER_OK),
        ("SMTPUTF8=yes", replies.MAIL_SYNTAX),
        ("FOO=bar", replies.UNKNOWN_PARAMETER),
        ("RET=HDRS", replies.SENDER_OK),  # DSN (RFC 3461)
        ("RET=NONE", replies.MAIL_SYNTAX),
        ("SIZE=10 BODY=8BITMIME SMTPUTF8", replies.SENDER_OK),
        ("SIZE=10 AUTH=<>", replies.UNKNOWN_PARAMETER),
    ],
)
def test_mail_parameters(h: Harness, c: Client, params: str, reply: Reply) -> None:
    size = h.config.max_message_size
    params = params.format(max=size, max_plus_one=size + 1)
    c.ehlo()
    assert c.cmd(f"MAIL FROM:<a@b.test> {params}") == reply.format()
    assert (c.proto.transaction is not None) == (reply == replies.SENDER_OK)


def test_size_too_big_codes(h: Harness, c: Client) -> None:
    c.ehlo()
    reply = c.cmd(f"MAIL FROM:<a@b.test> SIZE={h.config.max_message_size + 1}")
    assert reply.startswith(b"552 5.3.4 ")


def test_unknown_parameter_codes(c: Client) -> None:
    c.ehlo()
    assert c.cmd("MAIL FROM:<a@b.test> XFOO").startswith(b"555 5.5.4 ")


@pytest.mark.parametrize("params", ["SIZE=10", "BODY=8BITMIME", "SMTPUTF8"])
def test_mail_parameters_need_ehlo(c: Client, params: str) -> None:
    c.cmd("HELO client.test")
    assert c.cmd(f"MAIL FROM:<a@b.test> {params}") == replies.UNKNOWN_PARAMETER.format()
    assert matches(c.cmd("MAIL FROM:<a@b.test>"), replies.SENDER_OK)


def test_unknown_rcpt_parameters_are_refused(c: Client) -> None:
    c.transaction()
    assert c.cmd("RCPT TO:<bob@example.org> X-NOTIFY=NEVER") == (replies.UNKNOWN_PARAMETER.format())
    assert matches(c.cmd("RCPT TO:<bob@example.org> NOTIFY=NEVER"), replies.RECIPIENT_OK)


def test_null_sender_accepted_and_delivered(h: Harness, c: Client) -> None:
    c.ehlo()
    assert matches(c.cmd("MAIL FROM:<>"), replies.SENDER_OK)
    assert matches(c.cmd("RCPT TO:<alice@example.org>"), replies.RECIPIENT_OK)
    assert matches(c.data(SIMPLE_BODY), replies.MESSAGE_ACCEPTED)
    assert h.messages("alice@example.org")[0].startswith(b"Return-Path: <>\n")


@pytest.mark.parametrize(
    "line",
    [
        "MAIL FROM:<jörg@remote.test>",
        "MAIL FROM:<user@bücher.test>",
        "MAIL FROM:<jörg@remote.test> BODY=8BITMIME",
    ],
)
def test_non_ascii_sender_needs_smtputf8(c: Client, line: str) -> None:
    c.ehlo()
    reply = c.cmd(line)
    assert reply == replies.NON_ASCII_ADDRESS.format()
    assert reply.startswith(b"553 5.6.7 ")


def test_non_ascii_recipient_needs_smtputf8(c: Client) -> None:
    c.transaction()
    assert c.cmd("RCPT TO:<jörg@example.org>") == replies.NON_ASCII_ADDRESS.format()


def test_non_ascii_recipient_with_smtputf8_is_looked_up(c: Client) -> None:
    c.ehlo()
    assert matches(c.cmd("MAIL FROM:<a@b.test> SMTPUTF8"), replies.SENDER_OK)
    assert c.cmd("RCPT TO:<jörg@example.org>") == replies.NO_SUCH_USER.format()


def test_smtputf8_sender_is_delivered(h: Harness, c: Client) -> None:
    c.ehlo()
    assert matches(c.cmd("MAIL FROM:<jörg@bücher.test> SMTPUTF8"), replies.SENDER_OK)
    assert matches(c.cmd("RCPT TO:<alice@example.org>"), replies.RECIPIENT_OK)
    assert matches(c.data("Subject: grüße\r\n\r\nÄpfel\r\n".encode()), replies.MESSAGE_ACCEPTED)
    (message,) = h.messages("alice@example.org")
    text = message.decode("utf-8")
    assert text.startswith("Return-Path: <jörg@bücher.test>\n")
    assert " with UTF8SMTP id " in text
    assert text.endswith("Subject: grüße\n\nÄpfel\n")


def test_plain_esmtp_and_smtp_protocol_names(h: Harness) -> None:
    esmtp = h.connect()
    esmtp.transaction()
    assert matches(esmtp.data(SIMPLE_BODY), replies.MESSAGE_ACCEPTED)
    smtp = h.connect()
    smtp.cmd("HELO old.test")
    smtp.transaction()
    assert matches(smtp.data(SIMPLE_BODY), replies.MESSAGE_ACCEPTED)
    first, second = (m.decode() for m in h.messages("alice@example.org"))
    protocols = sorted(re.findall(r" with (\w+) id ", first + second))
    assert protocols == ["ESMTP", "SMTP"]


@pytest.mark.parametrize("line", [b"NOOP \xff", b"EHLO \xc3\x28", b"MAIL FROM:<\xe9@b.test>"])
def test_invalid_utf8_in_command(c: Client, line: bytes) -> None:
    assert c.cmd(line) == replies.BAD_CHARACTERS.format()


# --- recipients ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rcpt", "reply"),
    [
        ("<nobody@example.org>", replies.NO_SUCH_USER),
        ("<carol@example.org>", replies.NO_SUCH_USER),
        ("<alice@remote.test>", replies.RELAY_DENIED),
        ("<alice@example.org.remote.test>", replies.RELAY_DENIED),
        ("<alice@[127.0.0.1]>", replies.RELAY_DENIED),
        ("<user%remote.test@example.org>", replies.RELAY_TRICK),
        ("<remote.test!user@example.org>", replies.RELAY_TRICK),
        ("<@hop.test:alice@example.org>", replies.RELAY_TRICK),
        ("<@hop.test,@hop2.test:alice@example.org>", replies.RELAY_TRICK),
        ('<"alice@remote.test"@example.org>', replies.RELAY_TRICK),
        ("<alice@remote.test@example.org>", replies.BAD_RECIPIENT_SYNTAX),
    ],
)
def test_refused_recipients(h: Harness, c: Client, rcpt: str, reply: Reply) -> None:
    c.transaction()
    answer = c.cmd(f"RCPT TO:{rcpt}")
    assert answer == reply.format()
    assert answer[:1] == b"5"
    assert c.proto.transaction is not None and len(c.proto.transaction.recipients) == 1


def test_refused_recipient_codes() -> None:
    assert (replies.NO_SUCH_USER.code, replies.NO_SUCH_USER.enhanced) == (550, "5.1.1")
    assert (replies.RELAY_DENIED.code, replies.RELAY_DENIED.enhanced) == (554, "5.7.1")
    assert replies.BAD_RECIPIENT_SYNTAX.code == 501


def test_relay_tricks_deliver_nothing(h: Harness, c: Client) -> None:
    c.ehlo()
    c.cmd("MAIL FROM:<a@b.test>")
    for rcpt in (
        "<user%remote.test@example.org>",
        "<remote.test!user@example.org>",
        "<@hop.test:alice@example.org>",
        '<"alice@remote.test"@example.org>',
    ):
        assert c.cmd(f"RCPT TO:{rcpt}")[:1] == b"5"
    assert c.cmd("DATA") == replies.NEED_RCPT.format()
    assert h.all_messages() == []


@pytest.mark.parametrize(
    ("rcpt", "mailbox"),
    [
        ("<postmaster@example.org>", "postmaster@example.org"),
        ("<postmaster@example.net>", "postmaster@example.net"),
        ("<PostMaster@Example.NET>", "postmaster@example.net"),
        ("<postmaster>", "postmaster@example.org"),
        ("<Postmaster>", "postmaster@example.org"),
        ("<ALICE@EXAMPLE.ORG>", "alice@example.org"),
        ("<Alice@Example.Org>", "alice@example.org"),
        ('<"alice"@example.org>', "alice@example.org"),
        ("<carol@example.net>", "carol@example.net"),
        (" <alice@example.org>", "alice@example.org"),
    ],
)
def test_accepted_recipients_are_delivered(h: Harness, c: Client, rcpt: str, mailbox: str) -> None:
    c.ehlo()
    c.cmd("MAIL FROM:<a@b.test>")
    assert c.cmd(f"RCPT TO:{rcpt}") == replies.RECIPIENT_OK.format()
    assert matches(c.data(SIMPLE_BODY), replies.MESSAGE_ACCEPTED)
    assert len(h.messages(mailbox)) == 1
    assert len(h.all_messages()) == 1


def test_alias_delivers_one_copy_to_each_target(h: Harness, c: Client) -> None:
    c.transaction("a@b.test", "info@example.org")
    assert matches(c.data(SIMPLE_BODY), replies.MESSAGE_ACCEPTED)
    assert len(h.messages("alice@example.org")) == 1
    assert len(h.messages("bob@example.org")) == 1
    assert h.messages("info@example.org") == []


def test_alias_and_direct_recipient_still_one_copy(h: Harness, c: Client) -> None:
    c.transaction("a@b.test", "info@example.org", "alice@example.org", "ALICE@example.org")
    assert matches(c.data(SIMPLE_BODY), replies.MESSAGE_ACCEPTED)
    assert len(h.messages("alice@example.org")) == 1
    assert len(h.messages("bob@example.org")) == 1


def test_max_recipients(make: Callable[..., Harness]) -> None:
    h = make(max_recipients=3)
    c = h.connect()
    c.transaction("a@b.test", "alice@example.org", "bob@example.org", "carol@example.net")
    reply = c.cmd("RCPT TO:<postmaster@example.org>")
    assert reply == replies.TOO_MANY_RECIPIENTS.format()
    assert reply.startswith(b"452 4.5.3 ")
    assert matches(c.data(SIMPLE_BODY), replies.MESSAGE_ACCEPTED)
    assert len(h.all_messages()) == 3
    assert h.messages("postmaster@example.org") == []


# --- pipelining ----------------------------------------------------------------------------------

PIPELINE = (
    b"EHLO client.test\r\n"
    b"MAIL FROM:<sender@remote.test>\r\n"
    b"RCPT TO:<alice@example.org>\r\n"
    b"RCPT TO:<bob@example.org>\r\n"
    b"DATA\r\n"
    b"Subject: pipelined\r\n\r\nline one\r\n..dot\r\n"
    b".\r\n"
    b"QUIT\r\n"
)


def _check_pipeline_output(h: Harness, c: Client, output: bytes) -> None:
    got = split_replies(output)
    assert len(got) == 7, got
    assert got[0].startswith(b"250-mx.example.org Hello client.test")
    assert got[1] == replies.SENDER_OK.format()
    assert got[2] == replies.RECIPIENT_OK.format()
    assert got[3] == replies.RECIPIENT_OK.format()
    assert got[4] == replies.START_DATA.format()
    queue_id = queue_id_of(got[5])
    assert got[6] == replies.BYE.format()
    assert c.closing
    for mailbox in ("alice@example.org", "bob@example.org"):
        (message,) = h.messages(mailbox)
        assert f" id {queue_id};".encode() in message or f" id {queue_id}\n".encode() in message
        assert message.endswith(b"Subject: pipelined\n\nline one\n.dot\n")


def test_pipelining_in_one_chunk(h: Harness, c: Client) -> None:
    _check_pipeline_output(h, c, c.send(PIPELINE))


def test_pipelining_one_byte_at_a_time(h: Harness, c: Client) -> None:
    _check_pipeline_output(h, c, c.send_bytewise(PIPELINE))


@pytest.mark.parametrize("size", [3, 7, 64])
def test_pipelining_in_odd_chunks(h: Harness, c: Client, size: int) -> None:
    c.transport.clear()
    for i in range(0, len(PIPELINE), size):
        c.proto.dataReceived(PIPELINE[i : i + size])
    _check_pipeline_output(h, c, c.transport.value())


def test_long_pipeline_of_many_transactions(make: Callable[..., Harness]) -> None:
    """Hundreds of pipelined commands whose checks complete synchronously stay in order."""
    h = make(max_recipients=100, max_errors=1000)
    c = h.connect()
    c.ehlo()
    batch = b"MAIL FROM:<a@b.test>\r\n" + b"RCPT TO:<alice@example.org>\r\n" * 100 + b"RSET\r\n"
    output = c.send(batch * 10 + b"NOOP\r\n")
    got = split_replies(output)
    expected = (
        [replies.SENDER_OK.format()]
        + [replies.RECIPIENT_OK.format()] * 100
        + [replies.RESET_OK.format()]
    ) * 10 + [replies.OK.format()]
    assert got == expected
    assert not c.closing


def test_many_pipelined_messages(h: Harness) -> None:
    c = h.connect("127.0.0.1")
    c.ehlo()
    one = (
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nSubject: n\r\n\r\nx\r\n.\r\n"
    )
    got = split_replies(c.send(one * 50))
    assert len(got) == 200
    assert all(matches(r, replies.MESSAGE_ACCEPTED) for r in got[3::4])
    assert len(h.messages("bob@example.org")) == 50


# --- DATA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "stored"),
    [
        (b"..x\r\n", b".x\n"),
        (b"..\r\n", b".\n"),
        (b"a\r\n..\r\nb\r\n", b"a\n.\nb\n"),
        (b"...\r\n", b"..\n"),
        (b"x.\r\n.y\r\n", b"x.\ny\n"),
        (b" .\r\n", b" .\n"),
        (b"", b""),
        (b"\r\n", b"\n"),
        (b"no final newline\r\n", b"no final newline\n"),
    ],
)
def test_dot_unstuffing(h: Harness, c: Client, body: bytes, stored: bytes) -> None:
    c.transaction()
    assert matches(c.data(body), replies.MESSAGE_ACCEPTED)
    (message,) = h.messages("alice@example.org")
    assert body_of(message) == stored


def test_empty_message(h: Harness, c: Client) -> None:
    c.transaction()
    assert c.cmd("DATA") == replies.START_DATA.format()
    reply = c.send(b".\r\n")
    assert matches(reply, replies.MESSAGE_ACCEPTED)
    (message,) = h.messages("alice@example.org")
    assert message.startswith(b"Return-Path: <sender@remote.test>\nReceived: ")


def test_354_then_body(h: Harness, c: Client) -> None:
    c.transaction()
    assert c.cmd("DATA") == b"354 End data with <CR><LF>.<CR><LF>\r\n"
    assert c.send(b"Subject: x\r\n\r\n") == b""
    assert c.send(b"partial") == b""
    assert c.send(b" line\r\n") == b""
    assert matches(c.send(b".\r\n"), replies.MESSAGE_ACCEPTED)
    assert h.messages("alice@example.org")[0].endswith(b"Subject: x\n\npartial line\n")


def test_commands_are_not_seen_inside_data(h: Harness, c: Client) -> None:
    c.transaction()
    body = b"QUIT\r\nRSET\r\nMAIL FROM:<x@y.test>\r\n.\r\n"
    assert matches(c.data(body[: -len(b".\r\n")]), replies.MESSAGE_ACCEPTED)
    assert not c.closing
    assert h.messages("alice@example.org")[0].endswith(b"QUIT\nRSET\nMAIL FROM:<x@y.test>\n")


def test_message_too_big(make: Callable[..., Harness]) -> None:
    h = make(max_message_size=2048)
    c = h.connect()
    c.transaction()
    assert c.cmd("DATA") == replies.START_DATA.format()
    for _ in range(10):
        assert c.send(b"x" * 298 + CRLF) == b""  # nothing until the final dot
    reply = c.send(b".\r\n")
    assert reply == replies.MESSAGE_TOO_BIG.format()
    assert reply.startswith(b"552 5.3.4 ")
    assert h.all_messages() == []
    assert h.spool_files() == []
    assert c.proto.transaction is None
    assert c.cmd("NOOP") == replies.OK.format()
    c.transaction()
    assert matches(c.data(b"small\r\n"), replies.MESSAGE_ACCEPTED)
    assert len(h.messages("alice@example.org")) == 1


def test_too_big_message_already_spooled_is_removed(make: Callable[..., Harness]) -> None:
    h = make(max_message_size=300 * 1024)
    c = h.connect()
    c.transaction()
    c.cmd("DATA")
    assert c.send((b"w" * 1022 + CRLF) * 280) == b""  # 280 KiB: on disk already
    assert len(h.spool_files()) == 1
    assert c.send((b"w" * 1022 + CRLF) * 280) == b""
    assert c.send(b".\r\n") == replies.MESSAGE_TOO_BIG.format()
    assert h.spool_files() == []
    assert h.all_messages() == []


def test_refused_message_then_pipelined_commands(h: Harness, c: Client) -> None:
    c.transaction()
    c.cmd("DATA")
    out = c.send(b"bad\nbody\r\n.\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<bob@example.org>\r\n")
    assert split_replies(out) == [
        replies.BARE_LINE_ENDING.format(),
        replies.SENDER_OK.format(),
        replies.RECIPIENT_OK.format(),
    ]
    assert matches(c.data(SIMPLE_BODY), replies.MESSAGE_ACCEPTED)
    assert len(h.messages("bob@example.org")) == 1
    assert h.messages("alice@example.org") == []


def test_message_exactly_max_size_is_accepted(make: Callable[..., Harness]) -> None:
    h = make(max_message_size=2048)
    c = h.connect()
    c.transaction()
    body = (b"y" * 1022 + CRLF) * 2  # 2048 octets on the wire, dot excluded
    assert matches(c.data(body), replies.MESSAGE_ACCEPTED)
    c.transaction()
    assert c.data(body + b"z\r\n") == replies.MESSAGE_TOO_BIG.format()
    assert len(h.messages("alice@example.org")) == 1


SMUGGLE_ENDINGS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r"]
SMUGGLE_VARIANTS = SMUGGLE_ENDINGS + [e.replace(b".", b"\x00.") for e in SMUGGLE_ENDINGS]
SMUGGLED = (
    b"MAIL FROM:<evil@remote.test>\r\n"
    b"RCPT TO:<bob@example.org>\r\n"
    b"DATA\r\n"
    b"Subject: smuggled\r\n\r\nowned\r\n"
)


def _smuggling_body(ending: bytes) -> bytes:
    return b"Subject: real\r\n\r\nhello" + ending + SMUGGLED + b".\r\n"


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("ending", SMUGGLE_VARIANTS, ids=repr)
def test_smuggling_is_refused(h: Harness, c: Client, ending: bytes, bytewise: bool) -> None:
    c.transaction("sender@remote.test", "alice@example.org")
    assert c.cmd("DATA") == replies.START_DATA.format()
    body = _smuggling_body(ending)
    output = c.send_bytewise(body) if bytewise else c.send(body)
    got = split_replies(output)
    assert len(got) == 1, got
    assert matches(got[0], replies.BARE_LINE_ENDING)  # 554 5.6.0 (NUL_IN_MESSAGE: same codes)
    assert (replies.NUL_IN_MESSAGE.code, replies.NUL_IN_MESSAGE.enhanced) == (554, "5.6.0")
    assert b"250" not in output
    assert h.all_messages() == []
    assert h.spool_files() == []
    # Back in command mode with no transaction: the smuggled commands were never run.
    assert c.proto.transaction is None
    assert c.cmd("RCPT TO:<bob@example.org>") == replies.NEED_MAIL.format()
    assert c.cmd("NOOP") == replies.OK.format()


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("ending", SMUGGLE_VARIANTS, ids=repr)
def test_smuggling_normalized_is_one_message(
    make: Callable[..., Harness], ending: bytes, bytewise: bool
) -> None:
    h = make(bare_line_endings="normalize")
    c = h.connect()
    c.transaction("sender@remote.test", "alice@example.org")
    assert c.cmd("DATA") == replies.START_DATA.format()
    body = _smuggling_body(ending)
    output = c.send_bytewise(body) if bytewise else c.send(body)
    got = split_replies(output)
    assert len(got) == 1, got
    queue_id_of(got[0])
    (message,) = h.messages("alice@example.org")
    assert b"\r" not in message
    assert b"\x00" not in message
    assert message.count(b"Subject: smuggled") == 1
    assert message.endswith(
        b"MAIL FROM:<evil@remote.test>\nRCPT TO:<bob@example.org>\n"
        b"DATA\nSubject: smuggled\n\nowned\n"
    )
    assert h.messages("bob@example.org") == []
    assert c.proto.transaction is None


@pytest.mark.parametrize(
    "body",
    [
        b"bare\nLF\r\n",
        b"bare\rCR\r\n",
        b"at end\n",
        b"nul\x00byte\r\n",
        b"\n",
        b"x\r\r\n",
    ],
)
def test_bare_line_endings_and_nul_refused(h: Harness, c: Client, body: bytes) -> None:
    c.transaction()
    reply = c.data(body + CRLF)
    assert matches(reply, replies.BARE_LINE_ENDING)
    assert h.all_messages() == []


def test_long_data_line_stays_in_data(h: Harness, c: Client) -> None:
    c.transaction()
    assert c.cmd("DATA") == replies.START_DATA.format()
    line = b"".join(b"%07d " % i for i in range(12_800))  # 102400 octets, no CRLF
    assert len(line) == 100 * 1024
    output = c.send(b"Subject: long\r\n\r\n" + line + b"\r\nQUIT\r\n")
    assert output == b""
    assert not c.closing
    reply = c.send(b".\r\n")
    assert matches(reply, replies.MESSAGE_ACCEPTED)
    (message,) = h.messages("alice@example.org")
    assert message.endswith(b"Subject: long\n\n" + line + b"\nQUIT\n")


def test_long_data_line_in_small_chunks(h: Harness, c: Client) -> None:
    c.transaction()
    assert c.cmd("DATA") == replies.START_DATA.format()
    bare_cr_line = b"ab.\r" * 5000  # bare CRs inside a long line are still caught
    body = b"..start " + b"y" * 9000 + b"\r\n" + b"z" * 9000 + b"\r\n.\r\n"
    out = b""
    for i in range(0, len(body), 1000):
        out += c.send(body[i : i + 1000])
    assert matches(out, replies.MESSAGE_ACCEPTED)
    (message,) = h.messages("alice@example.org")
    assert message.endswith(b"\n.start " + b"y" * 9000 + b"\n" + b"z" * 9000 + b"\n")
    c.transaction()
    assert c.data(bare_cr_line + CRLF) == replies.BARE_LINE_ENDING.format()


# --- trace headers and the stored file -----------------------------------------------------------


def test_received_header_and_stored_file(h: Harness, c: Client) -> None:
    c.transaction("sender@remote.test", "alice@example.org")
    reply = c.data(b"Subject: trace\r\n\r\nbody line\r\n")
    queue_id = queue_id_of(reply)
    (path,) = h.maildir_files("alice@example.org")
    message = path.read_bytes()
    lines = message.split(b"\n")
    assert lines[0] == b"Return-Path: <sender@remote.test>"
    assert lines[1] == b"Received: from client.test ([203.0.113.5])"
    assert lines[2] == f"\tby mx.example.org (mailsrv) with ESMTP id {queue_id}".encode()
    assert lines[3] == b"\tfor <alice@example.org>;"
    assert re.fullmatch(rb"\t\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d \+0000", lines[4]), lines[4]
    assert message.endswith(b"\nSubject: trace\n\nbody line\n")
    assert b"\r\n" not in message and b"\r" not in message
    assert path.name.endswith(f",S={path.stat().st_size}")
    assert path.stat().st_size == len(message)


def test_received_header_without_for_when_several_recipients(h: Harness, c: Client) -> None:
    c.transaction("s@remote.test", "alice@example.org", "bob@example.org")
    queue_id = queue_id_of(c.data(SIMPLE_BODY))
    for mailbox in ("alice@example.org", "bob@example.org"):
        (message,) = h.messages(mailbox)
        assert f"with ESMTP id {queue_id};\n\t".encode() in message
        assert b"for <" not in message


@pytest.mark.parametrize(
    ("helo", "shown"),
    [
        ("evil(;)", "evil___"),
        ("a;b(c)d", "a_b_c_d"),
        ("[192.0.2.1]", "[192.0.2.1]"),
        ('x"y<z>', "x_y_z_"),
        ("ok.example", "ok.example"),
    ],
)
def test_helo_is_sanitised_in_received(h: Harness, c: Client, helo: str, shown: str) -> None:
    c.ehlo(helo)
    c.transaction()
    assert matches(c.data(SIMPLE_BODY), replies.MESSAGE_ACCEPTED)
    (message,) = h.messages("alice@example.org")
    received = message.split(b"\n")[1]
    assert received == f"Received: from {shown} ([203.0.113.5])".encode()


def test_queue_ids_are_unique(h: Harness, c: Client) -> None:
    ids = set()
    for _ in range(20):
        c.transaction()
        ids.add(queue_id_of(c.data(SIMPLE_BODY)))
    assert len(ids) == 20
    names = [p.name for p in h.maildir_files("alice@example.org")]
    assert len(set(names)) == 20


# --- command line limits -------------------------------------------------------------------------


def test_command_line_limit_is_512_with_crlf(c: Client) -> None:
    assert c.cmd("NOOP " + "x" * 505) == replies.OK.format()  # 510 + CRLF = 512
    reply = c.cmd("NOOP " + "x" * 506)
    assert reply == replies.LINE_TOO_LONG.format()
    assert reply.startswith(b"500 5.5.2 ")
    assert c.cmd("NOOP") == replies.OK.format()


def test_mail_line_may_be_longer(c: Client) -> None:
    c.ehlo()
    head = "MAIL FROM:<a@b.test> SIZE="
    line = head + "0" * (1500 - len(head) - 3) + "100"
    assert len(line) == 1500
    assert c.cmd(line) == replies.SENDER_OK.format()
    c.cmd("RSET")
    line = head + "0" * (2046 - len(head) - 3) + "100"
    assert c.cmd(line) == replies.SENDER_OK.format()  # 2046 + CRLF = 2048
    c.cmd("RSET")
    assert c.cmd(line + "0") == replies.LINE_TOO_LONG.format()
    assert c.proto.transaction is None
    rcpt = "RCPT TO:<alice@example.org>" + " " * 2100
    c.cmd("MAIL FROM:<a@b.test>")
    assert c.cmd(rcpt) == replies.LINE_TOO_LONG.format()


def test_endless_line_is_bounded(c: Client) -> None:
    c.ehlo()
    chunk = b"A" * 65536
    total = 0
    output = b""
    while total < 5 * 1024 * 1024:
        output += c.send(chunk)
        total += len(chunk)
        assert len(c.proto._buffer) <= c.proto._max_buffered_line
    assert output == replies.LINE_TOO_LONG.format()
    assert output.startswith(b"500 5.5.2 ")
    # The long line ends at its CRLF; the next line is a command again.
    assert c.send(b"tail of the line\r\n") == b""
    assert c.cmd("NOOP") == replies.OK.format()
    assert not c.closing


def test_endless_line_with_cr_at_chunk_boundary(c: Client) -> None:
    c.ehlo()
    assert c.send(b"B" * 20000 + b"\r") == replies.LINE_TOO_LONG.format()
    assert c.send(b"\nNOOP\r\n") == replies.OK.format()


@pytest.mark.parametrize(
    "line",
    [b"NO\x00OP", b"NOOP \x00", b"NOOP\nNOOP", b"NOOP\rx", b"\nNOOP", b"MAIL FROM:<a@b.test>\n"],
)
def test_bad_characters_in_command(c: Client, line: bytes) -> None:
    c.ehlo()
    reply = c.cmd(line)
    assert reply == replies.BAD_CHARACTERS.format()
    assert reply.startswith(b"500 5.5.2 ")
    assert c.proto.transaction is None


def test_bare_lf_does_not_end_a_command(c: Client) -> None:
    assert c.send(b"NOOP\nNOOP\n") == b""
    assert c.send(b"\r\n") == replies.BAD_CHARACTERS.format()


# --- error limit ---------------------------------------------------------------------------------


def test_too_many_errors_closes(make: Callable[..., Harness]) -> None:
    h = make(max_errors=5)
    c = h.connect()
    for _ in range(4):
        assert c.cmd("BOGUS") == replies.UNKNOWN_COMMAND.format()
        assert not c.closing
    reply = c.cmd("BOGUS")
    assert reply == replies.UNKNOWN_COMMAND.format() + replies.TOO_MANY_ERRORS.format()
    assert replies.TOO_MANY_ERRORS.code == 421 and replies.TOO_MANY_ERRORS.enhanced == "4.7.0"
    assert c.closing
    assert c.cmd("NOOP") == b""


def test_too_many_errors_in_one_pipeline(make: Callable[..., Harness]) -> None:
    h = make(max_errors=5)
    c = h.connect()
    c.ehlo()
    out = c.send(b"MAIL FROM:<a@b.test>\r\n" + b"RCPT TO:<x@remote.test>\r\n" * 10 + b"NOOP\r\n")
    got = split_replies(out)
    assert got == (
        [replies.SENDER_OK.format()]
        + [replies.RELAY_DENIED.format()] * 5
        + [replies.TOO_MANY_ERRORS.format()]
    )
    assert c.closing


def test_successful_commands_do_not_count_as_errors(make: Callable[..., Harness]) -> None:
    h = make(max_errors=5)
    c = h.connect()
    for _ in range(4):
        c.cmd("BOGUS")
    for _ in range(50):
        assert c.cmd("NOOP") == replies.OK.format()
    assert not c.closing


# --- timeouts ------------------------------------------------------------------------------------


def test_idle_timeout(make: Callable[..., Harness]) -> None:
    h = make(idle_timeout=60)
    c = h.connect()
    h.clock.advance(50)
    assert c.cmd("EHLO client.test").startswith(b"250-")
    h.clock.advance(59)
    assert c.transport.value() == b"" and not c.closing
    h.clock.advance(1)
    assert c.transport.value() == replies.IDLE_TIMEOUT.format()
    assert replies.IDLE_TIMEOUT.code == 421 and replies.IDLE_TIMEOUT.enhanced == "4.4.2"
    assert c.closing
    assert not c.transport.disconnected
    h.clock.advance(10)  # the close grace: a client that never reads gets aborted
    assert c.transport.disconnected
    c.lose()
    assert h.server.limits.connections.total == 0
    assert h.clock.getDelayedCalls() == []


def test_idle_timeout_before_helo(make: Callable[..., Harness]) -> None:
    h = make(idle_timeout=30)
    c = h.connect()
    h.clock.advance(30)
    assert c.transport.value() == replies.IDLE_TIMEOUT.format()
    assert c.closing


def test_data_timeout_removes_spool_file(make: Callable[..., Harness]) -> None:
    h = make(data_timeout=30, idle_timeout=300)
    c = h.connect()
    c.transaction()
    assert c.cmd("DATA") == replies.START_DATA.format()
    line = b"z" * 998 + CRLF
    for _ in range(3):
        assert c.send(line * 100) == b""  # ~300 KB: the spool file is on disk
        h.clock.advance(9)
    assert len(h.spool_files()) == 1
    assert not c.closing
    h.clock.advance(3)
    assert c.transport.value() == replies.DATA_TIMEOUT.format()
    assert replies.DATA_TIMEOUT.code == 421
    assert c.closing
    assert h.spool_files() == []
    assert h.all_messages() == []
    assert c.send(b".\r\n") == b""
    c.lose()
    assert h.spool_files() == []


def test_data_timer_is_cancelled_after_data(make: Callable[..., Harness]) -> None:
    h = make(data_timeout=30, idle_timeout=300)
    c = h.connect()
    c.transaction()
    assert matches(c.data(SIMPLE_BODY), replies.MESSAGE_ACCEPTED)
    h.clock.advance(100)
    assert c.transport.value() == b"" and not c.closing


def test_connection_lost_mid_data_removes_spool_file(h: Harness, c: Client) -> None:
    c.transaction()
    c.cmd("DATA")
    c.send((b"q" * 998 + CRLF) * 300)
    assert len(h.spool_files()) == 1
    c.lose()
    assert h.spool_files() == []
    assert h.all_messages() == []
    assert h.server.sessions == set()


# --- limits at connect ---------------------------------------------------------------------------


def test_max_connections(make: Callable[..., Harness]) -> None:
    h = make(max_connections=2)
    first, second = h.connect(), h.connect("127.0.0.1")
    assert first.greeting.startswith(b"220 ") and second.greeting.startswith(b"220 ")
    third = h.connect("198.51.100.7")
    assert third.greeting == replies.TOO_MANY_CONNECTIONS.format()
    assert third.greeting.startswith(b"421 4.7.0 ")
    assert third.closing
    trusted = h.connect("127.0.0.1")
    assert trusted.greeting == replies.TOO_MANY_CONNECTIONS.format()
    third.lose()
    trusted.lose()
    assert h.server.limits.connections.total == 2
    first.lose()
    assert h.connect("198.51.100.7").greeting.startswith(b"220 ")


def test_max_connections_per_ip(make: Callable[..., Harness]) -> None:
    h = make(max_connections_per_ip=1)
    first = h.connect()
    assert first.greeting.startswith(b"220 ")
    second = h.connect()
    assert second.greeting == replies.TOO_MANY_CONNECTIONS_FROM_IP.format()
    assert second.greeting.startswith(b"421 4.7.0 ")
    assert second.closing
    local = [h.connect("127.0.0.1") for _ in range(3)]
    assert all(client.greeting.startswith(b"220 ") for client in local)
    assert h.connect("198.51.100.7").greeting.startswith(b"220 ")
    second.lose()
    first.lose()
    assert h.connect().greeting.startswith(b"220 ")


def test_connection_rate(make: Callable[..., Harness]) -> None:
    h = make(connection_rate_per_ip=2, rate_window=60)
    for client in (h.connect(), h.connect()):
        assert client.greeting.startswith(b"220 ")
        client.lose()
    h.clock.advance(30)
    third = h.connect()
    assert third.greeting == replies.CONNECTION_RATE_EXCEEDED.format()
    assert third.greeting.startswith(b"421 4.7.0 ")
    assert third.closing
    third.lose()
    assert all(h.connect("127.0.0.1").greeting.startswith(b"220 ") for _ in range(5))
    assert h.connect("198.51.100.7").greeting.startswith(b"220 ")
    h.clock.advance(31)
    assert h.connect().greeting.startswith(b"220 ")


def test_expire_limits_forgets_old_state(make: Callable[..., Harness]) -> None:
    h = make(connection_rate_per_ip=2, message_rate_per_ip=5, rate_window=60)
    for host in ("203.0.113.5", "203.0.113.6", "203.0.113.7"):
        client = h.connect(host)
        client.transaction()
        client.lose()
    assert len(h.server.limits.connection_rate) == 3
    assert len(h.server.limits.message_rate) == 3
    h.server.expire_limits()
    assert len(h.server.limits.connection_rate) == 3
    h.clock.advance(61)
    h.server.expire_limits()
    assert len(h.server.limits.connection_rate) == 0
    assert len(h.server.limits.message_rate) == 0


def test_message_rate(make: Callable[..., Harness]) -> None:
    h = make(message_rate_per_ip=1, rate_window=60)
    c = h.connect()
    c.transaction()
    assert matches(c.data(SIMPLE_BODY), replies.MESSAGE_ACCEPTED)
    reply = c.cmd("MAIL FROM:<a@b.test>")
    assert reply == replies.MESSAGE_RATE_EXCEEDED.format()
    assert reply.startswith(b"451 4.7.1 ")
    assert c.proto.transaction is None
    other = h.connect()  # the rate is per IP, not per session
    other.ehlo()
    assert other.cmd("MAIL FROM:<a@b.test>") == replies.MESSAGE_RATE_EXCEEDED.format()
    trusted = h.connect("127.0.0.1")
    for _ in range(3):
        trusted.transaction()
        assert trusted.cmd("RSET") == replies.RESET_OK.format()
    h.clock.advance(61)
    c.transaction()


# --- drain ---------------------------------------------------------------------------------------


def test_drain_closes_idle_session_now(h: Harness, c: Client) -> None:
    c.ehlo()
    done = h.server.drain(30)
    assert c.transport.value() == replies.SERVICE_UNAVAILABLE.format()
    assert replies.SERVICE_UNAVAILABLE.code == 421
    assert replies.SERVICE_UNAVAILABLE.enhanced == "4.3.2"
    assert c.closing
    fired: list[object] = []
    done.addCallback(fired.append)
    assert fired == []
    c.lose()
    assert fired == [None]
    assert h.clock.getDelayedCalls() == []


def test_drain_without_sessions_fires_at_once(h: Harness) -> None:
    fired: list[object] = []
    h.server.drain(30).addCallback(fired.append)
    assert fired == [None]


def test_drain_refuses_new_connections(h: Harness) -> None:
    h.server.drain(30)
    late = h.connect()
    assert late.greeting == replies.SERVICE_UNAVAILABLE.format()
    assert late.closing


def test_drain_lets_transaction_finish(h: Harness, c: Client) -> None:
    c.transaction()
    done = h.server.drain(30)
    fired: list[object] = []
    done.addCallback(fired.append)
    assert c.transport.value() == b"" and not c.closing
    assert c.cmd("DATA") == replies.START_DATA.format()
    assert c.send(SIMPLE_BODY) == b""
    got = split_replies(c.send(b".\r\n"))
    assert len(got) == 2
    queue_id_of(got[0])
    assert got[1] == replies.SERVICE_UNAVAILABLE.format()
    assert c.closing
    assert len(h.messages("alice@example.org")) == 1
    assert fired == []
    c.lose()
    assert fired == [None]


def test_drain_closes_after_rset(h: Harness, c: Client) -> None:
    c.transaction()
    h.server.drain(30)
    assert c.cmd("NOOP") == replies.OK.format()
    assert c.cmd("RSET") == replies.RESET_OK.format() + replies.SERVICE_UNAVAILABLE.format()
    assert c.closing


def test_drain_closes_after_ehlo_resets_transaction(h: Harness, c: Client) -> None:
    c.transaction()
    h.server.drain(30)
    reply = c.cmd("EHLO again.test")
    assert reply.startswith(b"250-")
    assert reply.endswith(replies.SERVICE_UNAVAILABLE.format())
    assert c.closing


def test_drain_after_refused_message(make: Callable[..., Harness]) -> None:
    h = make(max_message_size=2048)
    c = h.connect()
    c.transaction()
    c.cmd("DATA")
    h.server.drain(30)
    out = c.send(b"x" * 3000 + b"\r\n.\r\n")
    assert out == replies.MESSAGE_TOO_BIG.format() + replies.SERVICE_UNAVAILABLE.format()
    assert c.closing


def test_drain_grace_expires(h: Harness) -> None:
    idle = h.connect()
    idle.ehlo()
    stuck = h.connect("127.0.0.1")
    stuck.transaction()
    stuck.cmd("DATA")
    stuck.send((b"s" * 998 + CRLF) * 300)
    assert len(h.spool_files()) == 1
    done = h.server.drain(30)
    fired: list[object] = []
    done.addCallback(fired.append)
    assert idle.transport.value() == replies.SERVICE_UNAVAILABLE.format()
    idle.lose()
    assert fired == []
    h.clock.advance(29)
    assert stuck.transport.value() == b"" and not stuck.closing
    h.clock.advance(1)
    assert stuck.transport.value() == replies.SERVICE_UNAVAILABLE.format()
    assert stuck.closing
    assert h.spool_files() == []
    assert h.all_messages() == []
    assert fired == []
    stuck.lose()
    assert fired == [None]
    assert h.server.sessions == set()
    assert h.server.limits.connections.total == 0


def test_drain_grace_aborts_sessions_already_closing(h: Harness) -> None:
    c = h.connect()
    c.ehlo()
    c.cmd("QUIT")
    done = h.server.drain(5)
    fired: list[object] = []
    done.addCallback(fired.append)
    assert not c.transport.disconnected
    h.clock.advance(5)
    assert c.transport.disconnected  # aborted
    c.lose()
    assert fired == [None]


def test_drain_waits_for_every_session(h: Harness) -> None:
    clients = [h.connect(f"198.51.100.{i}") for i in range(1, 4)]
    for client in clients:
        client.ehlo()
    fired: list[object] = []
    h.server.drain(30).addCallback(fired.append)
    for client in clients:
        assert client.closing
    for client in clients[:-1]:
        client.lose()
        assert fired == []
    clients[-1].lose()
    assert fired == [None]
