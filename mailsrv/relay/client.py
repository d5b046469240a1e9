"""The outbound ESMTP client: one reusable connection to a next hop, several messages on it.

:class:`~mailsrv.relay.connector.Connector` opens an :class:`SMTPConnection`.  Opening means
greeting, EHLO
(HELO if EHLO is refused), STARTTLS as the TLS mode says, and AUTH PLAIN or LOGIN when
credentials are set, only ever over TLS.  :meth:`SMTPConnection.deliver` sends one message in
transactions of at most ``recipients_per_transaction`` recipients, MAIL, RCPTs and DATA in one
write when the peer offers PIPELINING, and answers one :class:`RecipientResult` per recipient;
RSET comes before every later transaction (in the same write as MAIL when pipelining: RFC 2920
lets RSET stand anywhere in a group), the idle timer closes a connection nobody uses, and
:meth:`SMTPConnection.close` says QUIT.

The client does nothing on a connection between ``deliver`` calls (but the idle QUIT), so the
scheduler can make each result durable before it hands over the next message.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from mailsrv.relay import replies
from mailsrv.relay.body import BodySender, TransmissionStopped
from mailsrv.relay.envelope import (
    EnvelopeError,
    check_address,
    mail_command,
    needs_smtputf8,
    rcpt_command,
)
from mailsrv.relay.message import OutboundMessage, OutboundRecipient, RecipientResult
from mailsrv.relay.options import TLS_IMPLICIT, TLS_MAY, TLS_NONE, TLS_REQUIRE, ClientOptions
from mailsrv.relay.protocol import (
    ConnectionLostError,
    ProtocolViolation,
    ReplyReader,
    ReplyTimeout,
    ServerReply,
    describe,
    is_tls_failure,
)
from mailsrv.relay.resolver import Candidate
from mailsrv.relay.tlsclient import ClientTLS, tls_version
from mailsrv.smtp.replies import Reply
from mailsrv.threads import RunInThread


class SessionError(Exception):
    """The session with the next hop failed; ``reply`` is what every affected recipient gets."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.code} {reply.enhanced} {reply.text}")
        self.reply = reply


class _BodyUnreadable(Exception):
    """The stored body could not be read while it was being sent."""


def with_detail(template: Reply, detail: str) -> Reply:
    """``template`` with ``": detail"`` added to its text (unchanged when ``detail`` is empty)."""
    return template.with_text(f"{template.text}: {detail}") if detail else template


def _reply_for(exc: BaseException) -> Reply:
    """The relay's reply for an error while talking to the peer."""
    if isinstance(exc, SessionError):
        return exc.reply
    if isinstance(exc, _BodyUnreadable):
        return with_detail(replies.BODY_UNREADABLE, str(exc))
    if isinstance(exc, ReplyTimeout):
        return with_detail(replies.TIMEOUT, exc.what)
    if isinstance(exc, ProtocolViolation):
        return with_detail(replies.PROTOCOL_ERROR, str(exc))
    if is_tls_failure(exc):
        return with_detail(replies.TLS_FAILED, describe(exc))
    if isinstance(exc, ConnectionLostError):
        return with_detail(replies.CONNECTION_LOST, describe(exc))
    return with_detail(replies.PROTOCOL_ERROR, describe(exc))


def _peer(template: Reply, reply: ServerReply) -> Reply:
    """A made-up reply that quotes the peer's."""
    return with_detail(
        template, f"{reply.code} {reply.as_reply().enhanced} {reply.text}".replace("  ", " ")
    )


def _ok(reply: ServerReply | None) -> bool:
    return reply is not None and 200 <= reply.code < 300


class SMTPConnection:
    """One open session with a next hop; see the module docstring.  Made by :class:`Connector`."""

    def __init__(
        self,
        protocol: ReplyReader,
        candidate: Candidate,
        options: ClientOptions,
        clock: IReactorTime,
        run_in_thread: RunInThread,
        tls: ClientTLS | None,
        starttls: bool = True,
    ) -> None:
        self.candidate = candidate
        self.extensions: dict[str, str] = {}
        self.tls_version: str | None = None
        self.transactions = 0
        self._protocol = protocol
        self._options = options
        self._clock = clock
        self._run = run_in_thread
        self._tls = tls
        self._starttls = starttls
        self._busy = False
        self._closing = False
        self._idle: IDelayedCall | None = None
        self._block_timer: IDelayedCall | None = None

    # -- state ------------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """True when another :meth:`deliver` can run on this connection now."""
        return (
            bool(self._protocol.connected)
            and self._protocol.failed is None
            and not self._closing
            and not self._busy
        )

    def when_closed(self) -> defer.Deferred[None]:
        """Fires once the connection is gone."""
        d: defer.Deferred[None] = defer.Deferred()

        def fire(result: object) -> object:
            d.callback(None)
            return result

        self._protocol.lost.addBoth(fire)
        return d

    def close(self) -> defer.Deferred[None]:
        """QUIT (when the session is healthy) and close; fires once it is gone."""
        self._cancel_idle()
        if not self._closing:
            self._closing = True
            if self._protocol.connected and self._protocol.failed is None and not self._busy:
                quit_reply = self._command(b"QUIT\r\n", self._options.timeouts.command, "QUIT")
                quit_reply.addBoth(lambda _result: self._drop())
            else:
                self._drop()
        return self.when_closed()

    def _drop(self) -> None:
        transport = self._protocol.transport
        if transport is not None and self._protocol.connected:
            transport.loseConnection()

    # -- opening ----------------------------------------------------------------------------------

    async def open(self) -> None:
        """Greeting, EHLO/HELO, STARTTLS, AUTH; raises :class:`SessionError` (and closes)."""
        try:
            await self._open()
        except Exception as e:
            reply = _reply_for(e)
            self._protocol.abort(SessionError(reply))
            raise SessionError(reply) from None
        self._arm_idle()

    async def _open(self) -> None:
        timeouts = self._options.timeouts
        greeting = await self._protocol.expect(timeouts.greeting, "the greeting")
        if greeting.code != 220:
            await self._quit_quietly()
            raise SessionError(_peer(replies.GREETING_REFUSED, greeting))
        implicit = self._options.tls == TLS_IMPLICIT
        if implicit:
            self.tls_version = tls_version(self._protocol.transport)
        await self._hello()
        mode = self._options.tls if self._starttls else TLS_NONE
        if mode in (TLS_MAY, TLS_REQUIRE):
            if "STARTTLS" in self.extensions:
                reply = await self._command(b"STARTTLS\r\n", timeouts.command, "STARTTLS")
                if reply.code == 220:
                    assert self._tls is not None
                    self._protocol.transport.startTLS(  # type: ignore[union-attr]
                        self._tls.creator(self.candidate.host.strip("[]"))
                    )
                    try:
                        await self._hello()
                    except ConnectionLostError as e:
                        # Lost during the handshake or right after it: a TLS failure, whether
                        # our side found the certificate wanting or the peer gave up.
                        raise SessionError(with_detail(replies.TLS_FAILED, describe(e))) from None
                    self.tls_version = tls_version(self._protocol.transport)
                elif mode == TLS_REQUIRE:
                    await self._quit_quietly()
                    raise SessionError(_peer(replies.TLS_NOT_OFFERED, reply))
            elif mode == TLS_REQUIRE:
                await self._quit_quietly()
                raise SessionError(replies.TLS_NOT_OFFERED)
        if self._options.user:
            await self._authenticate()

    async def _hello(self) -> None:
        name = self._options.hostname.encode("idna")
        command = self._options.timeouts.command
        reply = await self._command(b"EHLO " + name + b"\r\n", command, "the EHLO reply")
        if reply.code == 250:
            self.extensions = _extensions(reply.lines[1:])
            return
        if 500 <= reply.code < 600 and reply.code != 554:
            reply = await self._command(b"HELO " + name + b"\r\n", command, "the HELO reply")
            if reply.code == 250:
                self.extensions = {}
                return
        await self._quit_quietly()
        raise SessionError(_peer(replies.GREETING_REFUSED, reply))

    async def _authenticate(self) -> None:
        # Never log these lines: they carry the password.
        if self.tls_version is None:
            await self._quit_quietly()
            raise SessionError(replies.AUTH_NEEDS_TLS)
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        user, password = self._options.user.encode(), self._options.password.encode()
        timeout = self._options.timeouts.command
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            reply = await self._command(b"AUTH PLAIN " + token + b"\r\n", timeout, "AUTH")
        elif "LOGIN" in mechanisms:
            reply = await self._command(b"AUTH LOGIN\r\n", timeout, "AUTH")
            for secret in (user, password):
                if reply.code != 334:
                    break
                reply = await self._command(base64.b64encode(secret) + b"\r\n", timeout, "AUTH")
        else:
            await self._quit_quietly()
            raise SessionError(replies.AUTH_NOT_OFFERED)
        if reply.code != 235:
            await self._quit_quietly()
            raise SessionError(_peer(replies.AUTH_REFUSED, reply))

    async def _quit_quietly(self) -> None:
        """QUIT before giving up on a session the peer spoiled (errors do not matter)."""
        try:
            await self._command(b"QUIT\r\n", min(self._options.timeouts.command, 30.0), "QUIT")
        except Exception:  # noqa: S110  (the session is being dropped anyway)
            pass
        self._closing = True
        self._drop()

    # -- delivering -------------------------------------------------------------------------------

    async def deliver(self, message: OutboundMessage) -> list[RecipientResult]:
        """Send ``message``; one result per recipient, in the order of ``message.recipients``."""
        if self._busy:
            raise RuntimeError("one delivery at a time on a connection")
        self._busy = True
        self._cancel_idle()
        try:
            return await self._deliver(message)
        finally:
            self._busy = False
            if self.usable:
                self._arm_idle()

    async def _deliver(self, message: OutboundMessage) -> list[RecipientResult]:
        results: dict[int, RecipientResult] = {}
        everyone = list(enumerate(message.recipients))
        refusal = self._refusal(message)
        if refusal is not None:
            return [self._result(r.address, refusal) for r in message.recipients]
        sendable = []
        for index, recipient in everyone:
            try:
                check_address(recipient.address)
            except EnvelopeError:
                results[index] = self._result(recipient.address, replies.BAD_RECIPIENT)
            else:
                sendable.append((index, recipient))
        size = self._options.recipients_per_transaction
        for start in range(0, len(sendable), size):
            batch = sendable[start : start + size]
            try:
                if self._protocol.failed is not None or not self._protocol.connected:
                    raise SessionError(replies.CONNECTION_CLOSED)
                pipelining = "PIPELINING" in self.extensions
                if self.transactions and not pipelining:
                    await self._rset()
                results.update(
                    await self._transaction(message, batch, rset=bool(self.transactions))
                )
            except SessionError as e:
                results.update((i, self._result(r.address, e.reply)) for i, r in batch)
        return [results[index] for index, _r in everyone]

    def _refusal(self, message: OutboundMessage) -> Reply | None:
        """A reply for every recipient when the message cannot go to this peer at all."""
        if self._protocol.failed is not None or not self._protocol.connected or self._closing:
            return replies.CONNECTION_CLOSED
        if message.sender:
            try:
                check_address(message.sender)
            except EnvelopeError:
                return replies.BAD_SENDER
        if needs_smtputf8(message) and "SMTPUTF8" not in self.extensions:
            return replies.NEEDS_SMTPUTF8
        limit = self.extensions.get("SIZE", "").strip()
        if limit.isdigit() and int(limit) > 0 and message.size > int(limit):
            return with_detail(replies.TOO_BIG_FOR_PEER, f"{message.size} > {limit} bytes")
        return None

    async def _rset(self) -> None:
        await self._rset_done(self._command(b"RSET\r\n", self._options.timeouts.command, "RSET"))

    async def _rset_done(self, waiting: defer.Deferred[ServerReply]) -> None:
        """The RSET reply must be a 250; otherwise the session is dropped (SessionError)."""
        try:
            reply = await waiting
        except Exception as e:
            raise SessionError(_reply_for(e)) from None
        if reply.code != 250:
            self._protocol.abort(ProtocolViolation("RSET refused"))
            raise SessionError(_peer(replies.PROTOCOL_ERROR, reply))

    async def _transaction(
        self,
        message: OutboundMessage,
        batch: list[tuple[int, OutboundRecipient]],
        rset: bool = False,
    ) -> dict[int, RecipientResult]:
        """One transaction; with PIPELINING and ``rset``, the RSET goes first in its group."""
        timeouts = self._options.timeouts
        mail = mail_command(message, self.extensions)
        rcpts = [rcpt_command(recipient, self.extensions) for _i, recipient in batch]
        mail_reply: ServerReply | None = None
        rcpt_replies: list[ServerReply | None] = [None] * len(batch)
        data_reply: ServerReply | None = None
        failure: Reply | None = None
        if "PIPELINING" in self.extensions:
            reset = self._protocol.expect(timeouts.command, "RSET") if rset else None
            waiting = [self._protocol.expect(timeouts.mail, "the MAIL reply")]
            waiting += [self._protocol.expect(timeouts.rcpt, "a RCPT reply") for _ in rcpts]
            waiting.append(self._protocol.expect(timeouts.data, "the DATA reply"))
            self._protocol.send(
                (b"RSET\r\n" if rset else b"") + mail + b"".join(rcpts) + b"DATA\r\n"
            )
            if reset is not None:
                try:
                    await self._rset_done(reset)
                except SessionError:
                    # The session is dropped: the replies still awaited fail with it.
                    await defer.DeferredList(waiting, consumeErrors=True)
                    raise
            outcomes: list[tuple[bool, Any]] = await defer.DeferredList(waiting, consumeErrors=True)
            got = [value if ok else None for ok, value in outcomes]
            mail_reply, rcpt_replies, data_reply = got[0], got[1:-1], got[-1]
            failed = [value for ok, value in outcomes if not ok]
            if failed:
                failure = _reply_for(failed[0].value)
        else:
            try:
                mail_reply = await self._command(mail, timeouts.mail, "the MAIL reply")
                if _ok(mail_reply):
                    for n, line in enumerate(rcpts):
                        rcpt_replies[n] = await self._command(line, timeouts.rcpt, "a RCPT reply")
                    if any(_ok(r) for r in rcpt_replies):
                        data_reply = await self._command(
                            b"DATA\r\n", timeouts.data, "the DATA reply"
                        )
            except Exception as e:
                failure = _reply_for(e)
        self.transactions += 1
        results: dict[int, RecipientResult] = {}
        accepted = []
        for n, (index, recipient) in enumerate(batch):
            refused = mail_reply if not _ok(mail_reply) else rcpt_replies[n]
            if refused is not None and not _ok(refused):
                results[index] = self._result(recipient.address, refused.as_reply())
            elif refused is None:
                results[index] = self._result(recipient.address, failure or replies.PROTOCOL_ERROR)
            else:
                accepted.append((index, recipient))
        outcome = await self._data_phase(message, accepted, data_reply, failure)
        for index, recipient in accepted:
            results[index] = self._result(recipient.address, outcome)
        return results

    async def _data_phase(
        self,
        message: OutboundMessage,
        accepted: list[tuple[int, OutboundRecipient]],
        data_reply: ServerReply | None,
        failure: Reply | None,
    ) -> Reply:
        """The reply for every accepted recipient (the body goes out here)."""
        if failure is not None:
            return failure
        if not accepted:
            if data_reply is not None and data_reply.code == 354:
                # RFC 2920: a 354 although no recipient was accepted; end the empty message.
                await self._end_empty_data()
            return replies.PROTOCOL_ERROR  # not used: nobody is accepted
        if data_reply is None:
            return replies.PROTOCOL_ERROR
        if data_reply.code != 354:
            return data_reply.as_reply()
        if message.may_send is not None and not message.may_send():
            # Closing without the final dot makes the peer discard what it has (RFC 5321
            # 4.1.1.4): the node that holds the lease now sends the message instead.
            self._protocol.abort(ProtocolViolation("lease lost before DATA"))
            return replies.LEASE_LOST
        try:
            final = await self._send_body(message)
        except Exception as e:
            return _reply_for(e)
        return final.as_reply()

    async def _end_empty_data(self) -> None:
        try:
            await self._command(b".\r\n", self._options.timeouts.data_done, "the final dot reply")
        except Exception:  # noqa: S110  (the connection is already marked failed)
            pass

    async def _send_body(self, message: OutboundMessage) -> ServerReply:
        timeouts = self._options.timeouts
        final = self._protocol.expect(None, "the reply to the final dot")
        transport = self._protocol.transport
        assert transport is not None
        sender = BodySender(
            message.body_path,
            transport,  # type: ignore[arg-type]
            self._run,
            on_progress=self._kick_block_timer,
            chunk_size=self._options.chunk_size,
            headers=message.headers,
        )
        self._block_timer = self._clock.callLater(timeouts.data_block, self._block_timed_out)

        def sent(_written: int) -> None:
            self._cancel_block_timer()
            if not final.called:
                self._protocol.set_timeout(timeouts.data_done, "the reply to the final dot")

        def not_sent(reason: Any) -> None:
            self._cancel_block_timer()
            if not final.called and not reason.check(TransmissionStopped):
                # Part of the body is out and the rest cannot follow: the data cannot be ended
                # cleanly, so drop the connection rather than send a truncated message.
                self._protocol.abort(_BodyUnreadable(reason.getErrorMessage()))

        sent_d = sender.start()
        sent_d.addCallbacks(sent, not_sent)
        reply = await final
        if not sent_d.called:
            # The peer answered before the end of the data: nothing more it says can be trusted.
            sender.stop()
            self._protocol.abort(ProtocolViolation("reply before the end of the data"))
            if reply.code < 400:
                raise ProtocolViolation(f"{reply.code} before the end of the data")
        return reply

    def _kick_block_timer(self) -> None:
        if self._block_timer is not None and self._block_timer.active():
            self._block_timer.reset(self._options.timeouts.data_block)

    def _cancel_block_timer(self) -> None:
        if self._block_timer is not None and self._block_timer.active():
            self._block_timer.cancel()
        self._block_timer = None

    def _block_timed_out(self) -> None:
        self._block_timer = None
        self._protocol.abort(ReplyTimeout("the peer to take the message data"))

    # -- helpers ----------------------------------------------------------------------------------

    def _command(self, line: bytes, timeout: float, what: str) -> defer.Deferred[ServerReply]:
        waiting = self._protocol.expect(timeout, what)
        self._protocol.send(line)
        return waiting

    def _result(self, recipient: str, reply: Reply) -> RecipientResult:
        return RecipientResult(
            recipient=recipient,
            code=reply.code,
            enhanced=reply.enhanced,
            text=reply.text,
            permanent=reply.code >= 500,
            remote_mta=self.candidate.host,
            remote_address=self.candidate.address,
            tls=self.tls_version,
            dsn_passed_on="DSN" in self.extensions,
        )

    def _arm_idle(self) -> None:
        self._cancel_idle()
        idle = self._options.timeouts.idle
        if idle <= 0:
            self.close()
        else:
            self._idle = self._clock.callLater(idle, self._idle_expired)

    def _cancel_idle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    def _idle_expired(self) -> None:
        self._idle = None
        self.close()


def _extensions(lines: Sequence[str]) -> dict[str, str]:
    """EHLO keywords (upper-cased) and their parameters (old ``AUTH=LOGIN`` lines merged in)."""
    found: dict[str, str] = {}
    for line in lines:
        keyword, _sep, params = line.strip().partition(" ")
        keyword, equals, first = keyword.upper().partition("=")
        if equals:
            params = f"{first} {params}"
        if keyword:
            found[keyword] = " ".join(filter(None, [found.get(keyword, ""), params.strip()]))
    return found
