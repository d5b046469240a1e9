"""A small scriptable SMTP server on 127.0.0.1:0: the next hop in the relay client's tests.

It is a real Twisted server over real sockets (and real TLS with trustme certificates), written
to be told what to answer: a :class:`Script` gives the greeting, the EHLO keywords, queues of
replies for MAIL, RCPT (per address) and the final dot, where to fall silent, where to drop the
connection, and which credentials AUTH takes.  Everything it saw is recorded per session: each
read in command mode (to prove pipelining), the commands, the raw DATA bytes and the messages as
a receiving MTA would store them (CRLF checked, dots unstuffed).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol

from mailsrv.tls import describe_session

OK = b"250 2.0.0 OK"


@dataclass
class Script:
    """What the peer answers.  Reply queues are consumed one per use; the last one repeats."""

    greetings: list[bytes] = field(default_factory=lambda: [b"220 peer.test ESMTP ready"])
    extensions: list[str] = field(default_factory=lambda: ["PIPELINING", "8BITMIME"])
    ehlo: bytes | None = None  # a refusal instead of the 250 (the client then tries HELO)
    mail: list[bytes] = field(default_factory=lambda: [b"250 2.1.0 Sender OK"])
    rcpt: dict[str, list[bytes]] = field(default_factory=dict)  # address -> replies
    data: list[bytes] = field(default_factory=lambda: [b"354 Go ahead"])
    final: list[bytes] = field(default_factory=lambda: [b"250 2.0.0 Queued as X"])
    rset: list[bytes] = field(default_factory=lambda: [b"250 2.0.0 Reset"])
    silent: str = ""  # greeting | ehlo | mail | rcpt | data | final: never answer there
    drop_after_data_bytes: int | None = None  # abort the connection mid-DATA
    stall_data: bool = False  # stop reading once DATA starts
    data_delay: float = 0.0  # seconds before the reply to DATA
    reply_during_data: bytes | None = None  # answer before the final dot
    tls: Any = None  # a server connection creator: STARTTLS (or implicit TLS) possible
    credentials: dict[str, str] = field(default_factory=dict)  # AUTH required when set

    def next(self, queue: list[bytes]) -> bytes:
        return queue.pop(0) if len(queue) > 1 else queue[0]


@dataclass
class Message:
    """One message as received."""

    sender: str
    recipients: list[str]
    mail_line: str
    rcpt_lines: list[str]
    wire: bytes  # the DATA bytes exactly as sent, final dot included
    content: bytes  # unstuffed, CRLF
    bare_line_endings: bool


@dataclass
class Session:
    """Everything one connection did."""

    reads: list[bytes] = field(default_factory=list)  # each read in command mode
    commands: list[str] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    auth: list[tuple[str, str, str]] = field(default_factory=list)  # mechanism, user, password
    tls: str | None = None
    quit: bool = False
    closed: Deferred[None] = field(default_factory=Deferred)
    transport: Any = None


_END = b"\r\n.\r\n"


def unstuff(wire: bytes) -> tuple[bytes, bool]:
    """DATA bytes (with the final dot) -> content with CRLF line ends, and bare CR/LF seen?"""
    data = b"\r\n" + wire
    end = data.find(_END)
    assert end >= 0, "no end of data"
    content = data[2 : end + 2]
    bare = re.search(rb"\r(?!\n)|(?<!\r)\n", content) is not None
    lines = content.split(b"\r\n")[:-1] if content else []
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines), bare


class PeerProtocol(Protocol):
    """One session of the scripted peer."""

    def __init__(self, script: Script, session: Session, implicit_tls: bool) -> None:
        self.script = script
        self.session = session
        self.implicit_tls = implicit_tls
        self.buffer = b""
        self.in_data = False
        self.data = b""
        self.reset()

    def reset(self) -> None:
        self.sender: str | None = None
        self.recipients: list[str] = []
        self.mail_line = ""
        self.rcpt_lines: list[str] = []
        self.authenticated = False
        self.auth_login: list[str] | None = None

    def connectionMade(self) -> None:
        self.session.transport = self.transport
        if self.script.silent != "greeting":
            self.reply(self.script.next(self.script.greetings))

    def connectionLost(self, reason: Any = None) -> None:
        self.session.closed.callback(None)

    def reply(self, line: bytes) -> None:
        self.transport.write(line + b"\r\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.session.tls is None and (self.implicit_tls or getattr(self, "tls_started", False)):
            self.session.tls = describe_session(self.transport)
        if not self.in_data:
            self.session.reads.append(data)
        self.buffer += data
        self.process()

    def process(self) -> None:
        while self.buffer:
            if self.in_data:
                if not self.take_data():
                    return
                continue
            line, sep, rest = self.buffer.partition(b"\r\n")
            if not sep:
                return
            self.buffer = rest
            self.command(line.decode("utf-8", "replace"))

    def take_data(self) -> bool:
        self.data += self.buffer
        self.buffer = b""
        limit = self.script.drop_after_data_bytes
        if limit is not None and len(self.data) >= limit:
            self.transport.abortConnection()  # type: ignore[union-attr]
            return False
        if self.script.reply_during_data is not None:
            self.reply(self.script.reply_during_data)
            self.script.reply_during_data = None
        end = (b"\r\n" + self.data).find(_END)
        if end < 0:
            return False
        wire, self.buffer = self.data[: end + 3], self.data[end + 3 :]
        self.data, self.in_data = b"", False
        content, bare = unstuff(wire)
        assert self.sender is not None
        self.session.messages.append(
            Message(
                self.sender, self.recipients, self.mail_line, self.rcpt_lines, wire, content, bare
            )
        )
        self.reset_transaction()
        if self.script.silent != "final":
            self.reply(self.script.next(self.script.final))
        return True

    def reset_transaction(self) -> None:
        self.sender, self.recipients, self.mail_line, self.rcpt_lines = None, [], "", []

    def command(self, line: str) -> None:
        if self.auth_login is not None:
            self.auth_step(line)
            return
        self.session.commands.append(line)
        verb = line.split(" ", 1)[0].upper()
        handler: Callable[[str], None] | None = getattr(self, f"do_{verb}", None)
        if handler is None:
            self.reply(b"502 5.5.1 Not implemented")
            return
        handler(line)

    def do_EHLO(self, line: str) -> None:
        if self.script.silent == "ehlo":
            return
        if self.script.ehlo is not None:
            self.reply(self.script.ehlo)
            return
        keywords = [k for k in self.script.extensions if k != "STARTTLS" or self.can_starttls()]
        lines = [b"peer.test hello", *(k.encode() for k in keywords)]
        for n, text in enumerate(lines):
            self.reply(b"250" + (b" " if n == len(lines) - 1 else b"-") + text)

    def can_starttls(self) -> bool:
        return (
            self.script.tls is not None
            and not self.implicit_tls
            and not getattr(self, "tls_started", False)
        )

    def do_HELO(self, line: str) -> None:
        self.reply(b"250 peer.test")

    def do_STARTTLS(self, line: str) -> None:
        if not self.can_starttls():
            self.reply(b"454 4.7.0 TLS not available")
            return
        self.reply(b"220 2.0.0 Ready to start TLS")
        self.buffer = b""
        self.tls_started = True
        self.reset()
        self.transport.startTLS(self.script.tls)  # type: ignore[union-attr]

    def do_AUTH(self, line: str) -> None:
        words = line.split(" ")
        mechanism = words[1].upper() if len(words) > 1 else ""
        if mechanism == "PLAIN" and len(words) == 3:
            _authzid, user, password = base64.b64decode(words[2]).decode().split("\0")
            self.check_auth("PLAIN", user, password)
        elif mechanism == "LOGIN":
            self.auth_login = []
            self.reply(b"334 VXNlcm5hbWU6")
        else:
            self.reply(b"504 5.5.4 Unrecognized authentication mechanism")

    def auth_step(self, line: str) -> None:
        assert self.auth_login is not None
        self.auth_login.append(base64.b64decode(line).decode())
        if len(self.auth_login) == 1:
            self.reply(b"334 UGFzc3dvcmQ6")
            return
        user, password = self.auth_login
        self.auth_login = None
        self.check_auth("LOGIN", user, password)

    def check_auth(self, mechanism: str, user: str, password: str) -> None:
        self.session.auth.append((mechanism, user, password))
        if self.script.credentials.get(user) == password:
            self.authenticated = True
            self.reply(b"235 2.7.0 Authentication successful")
        else:
            self.reply(b"535 5.7.8 Authentication credentials invalid")

    def do_MAIL(self, line: str) -> None:
        if self.script.silent == "mail":
            return
        if self.script.credentials and not self.authenticated:
            self.reply(b"530 5.7.0 Authentication required")
            return
        reply = self.script.next(self.script.mail)
        if reply.startswith(b"2"):
            match = re.match(r"MAIL FROM:<([^>]*)>", line, re.I)
            self.sender = match.group(1) if match else "?"
            self.mail_line = line
        self.reply(reply)

    def do_RCPT(self, line: str) -> None:
        if self.script.silent == "rcpt":
            return
        if self.sender is None:
            self.reply(b"503 5.5.1 Need MAIL")
            return
        match = re.match(r"RCPT TO:<([^>]*)>", line, re.I)
        address = match.group(1) if match else "?"
        queue = self.script.rcpt.get(address, [b"250 2.1.5 Recipient OK"])
        reply = self.script.next(queue)
        if reply.startswith(b"2"):
            self.recipients.append(address)
            self.rcpt_lines.append(line)
        self.reply(reply)

    def do_DATA(self, line: str) -> None:
        if self.script.silent == "data":
            return
        if self.sender is None or not self.recipients:
            self.reply(b"554 5.5.1 No valid recipients")
            return
        reply = self.script.next(self.script.data)
        if self.script.data_delay:
            from twisted.internet import reactor

            reactor.callLater(self.script.data_delay, self._answer_data, reply)
            return
        self._answer_data(reply)

    def _answer_data(self, reply: bytes) -> None:
        if self.transport is None or not self.transport.connected:  # type: ignore[attr-defined]
            return
        self.reply(reply)
        if reply.startswith(b"354"):
            self.in_data = True
            if self.script.stall_data:
                self.transport.pauseProducing()  # type: ignore[union-attr]

    def do_RSET(self, line: str) -> None:
        self.reset_transaction()
        self.reply(self.script.next(self.script.rset))

    def do_NOOP(self, line: str) -> None:
        self.reply(OK)

    def do_QUIT(self, line: str) -> None:
        self.session.quit = True
        self.reply(b"221 2.0.0 Bye")
        self.transport.loseConnection()  # type: ignore[union-attr]


class PeerFactory(Factory):
    def __init__(self, script: Script, implicit_tls: bool = False) -> None:
        self.script = script
        self.implicit_tls = implicit_tls
        self.sessions: list[Session] = []
        self.waiting: list[tuple[int, Deferred[None]]] = []

    def buildProtocol(self, addr: Any) -> PeerProtocol:
        session = Session()
        self.sessions.append(session)
        for count, d in list(self.waiting):
            if len(self.sessions) >= count:
                self.waiting.remove((count, d))
                d.callback(None)
        return PeerProtocol(self.script, session, self.implicit_tls)

    def connections(self, count: int) -> Deferred[None]:
        """Fires once ``count`` sessions have started."""
        d: Deferred[None] = Deferred()
        if len(self.sessions) >= count:
            d.callback(None)
        else:
            self.waiting.append((count, d))
        return d

    @property
    def messages(self) -> list[Message]:
        return [m for s in self.sessions for m in s.messages]


@dataclass
class Peer:
    """A listening peer."""

    factory: PeerFactory
    port: Any

    @property
    def number(self) -> int:
        return int(self.port.getHost().port)

    @property
    def script(self) -> Script:
        return self.factory.script

    async def stop(self) -> None:
        await self.port.stopListening()
        for session in self.factory.sessions:
            if not session.closed.called:
                session.transport.abortConnection()  # a test left it open
                await session.closed


def start_peer(script: Script | None = None, implicit_tls: bool = False, port: int = 0) -> Peer:
    """Listen on 127.0.0.1 (``port`` 0: any free one)."""
    from twisted.internet import reactor

    factory = PeerFactory(script or Script(), implicit_tls)
    if implicit_tls:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        listening = reactor.listenTCP(
            port, TLSMemoryBIOFactory(factory.script.tls, False, factory), interface="127.0.0.1"
        )
    else:
        listening = reactor.listenTCP(port, factory, interface="127.0.0.1")
    return Peer(factory, listening)
