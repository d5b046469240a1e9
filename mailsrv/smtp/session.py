"""The ESMTP session (RFC 5321): a hardened state machine written on ``twisted.internet.protocol``.

Why not Twisted's stock ``ESMTP``: it answers pipelined commands out of order when checks are
asynchronous, drops back to command mode after a 16 KiB DATA line (smuggling), never clears an
overlong command line, stores bare CR/LF verbatim and lacks SIZE, PIPELINING and enhanced codes
(see ``shared/twisted-notes.md``).  This session instead:

* frames commands on CRLF only, with a bounded buffer whatever the client sends;
* runs exactly one command at a time, so replies stay in order while a check is asynchronous;
* streams DATA through :class:`~mailsrv.smtp.data.BodyDecoder` into the spool, so only
  ``CRLF.CRLF`` ends a message and memory stays flat for any size;
* replies with codes from :mod:`mailsrv.smtp.replies` only, with enhanced status codes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsrv.auth.mechanisms import Exchange
from mailsrv.auth.realm import ANONYMOUS_SENDER, Sender
from mailsrv.delivery.envelope import (
    AcceptedMessage,
    ClientFacts,
    DsnRequest,
    LocalRoute,
    Recipient,
    RemoteRoute,
    Ret,
)
from mailsrv.delivery.sinks import SinkUnavailable
from mailsrv.delivery.spool import SpoolFile
from mailsrv.limits import normalize_ip
from mailsrv.mailauth.checks import Facts
from mailsrv.mailauth.inbound import CheckOutcome, InboundCheck
from mailsrv.mailauth.verdict import Verdict
from mailsrv.screening.greylist import Verdict as GreylistVerdict
from mailsrv.shared_limits import CONNECTION_LIMIT, CONNECTION_RATE, IP_CONNECTION_LIMIT
from mailsrv.smtp import replies
from mailsrv.smtp.address import (
    Address,
    AddressError,
    ParameterSyntaxError,
    parse_path_argument,
    sanitize_for_header,
)
from mailsrv.smtp.data import BodyDecoder, BodyProblem
from mailsrv.smtp.deadlines import IDLE, Deadlines
from mailsrv.smtp.parameters import (
    MAIL_PARAMETERS,
    RCPT_PARAMETERS,
    ParameterError,
    parse_parameters,
)
from mailsrv.smtp.policy import RecipientDecision, remote_domain
from mailsrv.smtp.replies import Reply, Response
from mailsrv.smtp.screening import DNSBL_REFUSAL, ScreeningSteps
from mailsrv.smtp.security import SecurityCommands
from mailsrv.smtp.server import SMTPServer
from mailsrv.tls import describe_session

_log = Logger(namespace="mailsrv.smtp")

_CRLF = b"\r\n"
_PIPELINE_HIGH_WATER = 256 * 1024
_CLOSE_GRACE = 10.0
_COMMANDS = frozenset(
    {
        "EHLO",
        "HELO",
        "MAIL",
        "RCPT",
        "DATA",
        "RSET",
        "NOOP",
        "QUIT",
        "VRFY",
        "HELP",
        "STARTTLS",
        "AUTH",
    }
)
_FORBIDDEN_IN_COMMANDS = re.compile(rb"[\r\n\x00]")
_NOT_IMPLEMENTED_VERBS = frozenset({"EXPN", "TURN", "ETRN", "ATRN", "BDAT", "SEND", "SOML", "SAML"})

_TRANSACTION_VERBS = frozenset({"MAIL", "RCPT", "DATA"})  # their refusals count as rejections


def reply_class(reply: Reply) -> str:
    """The ``class`` label of a refusal: its enhanced status code (a bounded set), else 4xx/5xx."""
    return reply.enhanced or f"{reply.code // 100}xx"


_REFUSALS = {
    CONNECTION_LIMIT: replies.TOO_MANY_CONNECTIONS,
    IP_CONNECTION_LIMIT: replies.TOO_MANY_CONNECTIONS_FROM_IP,
    CONNECTION_RATE: replies.CONNECTION_RATE_EXCEEDED,
}

_BODY_PROBLEM_REPLIES = {
    BodyProblem.BARE_LINE_ENDING: replies.BARE_LINE_ENDING,
    BodyProblem.NUL: replies.NUL_IN_MESSAGE,
    BodyProblem.TOO_BIG: replies.MESSAGE_TOO_BIG,
}


def _cancel(timer: IDelayedCall | None) -> None:
    """Cancel ``timer`` if it is still pending."""
    if timer is not None and timer.active():
        timer.cancel()


@functools.lru_cache(maxsize=4)
def _header_date(seconds: int) -> str:
    """RFC 5322 date for the Received header (cached: one formatting per second)."""
    return format_datetime(datetime.fromtimestamp(seconds, UTC))


@dataclass
class Transaction:
    """One mail transaction: MAIL, its RCPTs and, once DATA starts, the spool file."""

    sender: Address | None
    smtputf8: bool
    started: float
    recipients: list[Address] = field(default_factory=list)
    accepted: list[Recipient] = field(default_factory=list)  # each RCPT with its route
    body_8bit: bool = False
    envid: str | None = None
    ret: Ret | None = None
    queue_id: str = ""
    spool_file: SpoolFile | None = None
    trace_wire_size: int = 0  # our trace headers on the wire to a next hop (CRLF, no Return-Path)
    trace: bytes = b""  # our trace headers, at the start of the spool file
    check: InboundCheck | None = None  # SPF/DKIM/DMARC/ARC (mailsrv.mailauth), when they apply

    @property
    def sender_text(self) -> str:
        """The reverse-path as text ('' for the null sender)."""
        return "" if self.sender is None else str(self.sender)


@implementer(IHandshakeListener)
class SMTPSession(SecurityCommands, ScreeningSteps, Protocol):
    """One client connection.  See the module docstring for the design."""

    transport: Any = None  # an ITCPTransport (or TLS) that is also an IPushProducer

    def __init__(
        self,
        server: SMTPServer,
        listener: str,
        implicit_tls: bool = False,
        preadmitted: bool = False,
    ) -> None:
        self.server = server
        self.config = server.config  # the session keeps the view it started with (reload)
        self.policy = server.policy
        self.clock = server.clock
        self.listener = listener
        self._metrics = server.metrics.listener(listener)
        self.peer_ip = ""
        self.trusted = False
        self.helo: str | None = None
        self.spf_passed: dict[str, bool] = {}
        self.esmtp = False
        self.offered: frozenset[str] = frozenset()  # EHLO keywords, for MAIL/RCPT parameters
        self.transaction: Transaction | None = None
        self.tls_active = implicit_tls
        self._tls_up = False  # the TLS handshake has completed (implicit TLS or STARTTLS)
        self.sender: Sender = ANONYMOUS_SENDER
        self._auth_exchange: Exchange | None = None
        self._auth_mechanism = ""
        self.messages_accepted = 0
        self.errors = 0
        self._buffer = b""
        self._busy = False
        self._processing = False
        self._discarding = False
        self._decoder: BodyDecoder | None = None
        self._closing = False
        self._draining = False
        self._counted = False
        self._preadmitted = preadmitted  # counted by mailsrv.smtp.admission before TLS
        self._pause_reasons: set[str] = set()
        self._deadlines = Deadlines(self.clock, self._timeouts, self._timed_out)
        self._data_timer: IDelayedCall | None = None
        self._abort_timer: IDelayedCall | None = None
        self._started = 0.0
        self._max_buffered_line = max(
            self.config.max_line_length,
            self.config.max_mail_line_length,
            self.config.max_auth_line_length,
        )

    # -- connection lifecycle -------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._started = self.clock.seconds()
        self.peer_ip = normalize_ip(getattr(self.transport.getPeer(), "host", ""))
        self.trusted = self.peer_ip in self.server.trusted
        self.server.session_started(self)
        self._metrics.current.inc()
        if self._preadmitted:
            self._admitted(None)
            return
        self._metrics.connections.inc()  # implicit TLS: counted by mailsrv.smtp.admission
        if self.server.draining:
            self._metrics.refused("shutting-down")
            self._close(replies.SERVICE_UNAVAILABLE)
            return
        self._busy = True  # nothing the client sends is read before the greeting
        admitted: Deferred[Any] = self.server.limits.admit(self.peer_ip, self.trusted)
        admitted.addCallbacks(self._admitted, self._admission_failed)

    def _admitted(self, refusal: str | None) -> None:
        if self._closing:  # gone while we asked
            if refusal is None:
                self.server.limits.release(self.peer_ip)
            return
        if refusal is not None:
            self.server.security_event(refusal, self.peer_ip)
            self._metrics.refused(refusal)
            self._close(_REFUSALS[refusal])
            return
        self._counted = True
        screening = self._dnsbl_check()
        if screening is not None:
            screening.addCallback(self._send_greeting)
            return
        self._send_greeting(None)

    def _send_greeting(self, refusal: Reply | None) -> None:
        """The greeting: ``220``, or the screening's refusal (after which only QUIT works)."""
        if self._closing:
            return
        self._busy = False
        self._deadlines.client_turn()
        if refusal is not None:
            self._metrics.refused(DNSBL_REFUSAL)
            self._send(refusal.format())
        else:
            self._send(f"220 {self.server.hostname} ESMTP mailsrv ready\r\n".encode())
        self._process()

    def _admission_failed(self, failure: Failure) -> None:
        _log.failure("admission check failed", failure)
        if not self._closing:
            self._close(replies.LOCAL_ERROR)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._deadlines.stop()
        for timer in (self._data_timer, self._abort_timer):
            _cancel(timer)
        self._closing = True
        self._abandon_transaction()
        if self.tls_active and not self._tls_up:
            self.server.metrics.tls_handshake(self.listener, "none", "failed")
        if self._counted:
            self.server.metrics.session_ended(
                self.listener, self._tls_up, self.sender.authenticated
            )
            self.server.limits.release(self.peer_ip)
            self._counted = False
            _log.info(
                "session closed {client_ip} helo={helo} messages={messages} errors={errors}",
                client_ip=self.peer_ip,
                listener=self.listener,
                helo=self.helo,
                messages=self.messages_accepted,
                errors=self.errors,
                duration=round(self.clock.seconds() - self._started, 3),
            )
        self._metrics.current.dec()
        self.server.session_ended(self)

    def drain(self) -> None:
        """Server shutdown: close now if idle, else right after the transaction in flight."""
        self._draining = True
        if not self._closing and not self._busy and self._idle():
            self._close(replies.SERVICE_UNAVAILABLE)

    def shutdown_now(self) -> None:
        """Grace period over: 421 and close, whatever is in flight."""
        if not self._closing:
            self._close(replies.SERVICE_UNAVAILABLE)
        elif self.transport is not None:
            self.transport.abortConnection()

    def _close(self, reply: Reply | None = None) -> None:
        if self._closing:
            return
        if reply is not None:
            self._send(reply.format())
        self._closing = True
        self._deadlines.stop()
        self._abandon_transaction()
        self._buffer = b""
        if self.tls_active and not self._tls_up:
            # The handshake never finished: nothing written can reach the client, and a TLS
            # close would wait for it.  Free the slot now.
            self.transport.abortConnection()
            return
        self.transport.loseConnection()
        self._abort_timer = self.clock.callLater(_CLOSE_GRACE, self._abort)

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: TLS is up; what was written meanwhile is on its way."""
        self._tls_up = True
        described = describe_session(self.transport) or ""
        version = described.partition(" ")[0] or "unknown"
        self.server.metrics.tls_handshake(self.listener, version, "ok")

    def _abort(self) -> None:
        self._abort_timer = None
        self.transport.abortConnection()

    def _timeouts(self) -> tuple[float, float]:
        """(idle, command) timeouts now: shorter while the server is under stress."""
        idle, command = self.config.idle_timeout, self.config.command_timeout
        if self.server.stressed:
            stress = self.config.stress_timeout
            return min(idle, stress), min(command, stress)
        return idle, command

    def timeouts_changed(self) -> None:
        """The server entered stress: apply the shorter timeouts to this session now."""
        self._deadlines.timeouts_changed()

    def _timed_out(self, kind: str) -> None:
        _log.info(
            "{kind} timeout {client_ip}",
            kind=kind,
            client_ip=self.peer_ip,
            stressed=self.server.stressed,
        )
        self._close(replies.IDLE_TIMEOUT if kind == IDLE else replies.COMMAND_TIMEOUT)

    def _turn(self) -> None:
        """After a command or a message: whose turn it is decides which deadlines run."""
        if self._closing:
            return
        if self._busy:
            self._deadlines.server_turn()
        else:
            self._deadlines.client_turn(command_line=self._decoder is None)

    def _data_timeout(self) -> None:
        self._data_timer = None
        _log.info("DATA timeout {client_ip}", client_ip=self.peer_ip)
        self._close(replies.DATA_TIMEOUT)

    def _pause(self, reason: str) -> None:
        if not self._pause_reasons:
            self.transport.pauseProducing()
        self._pause_reasons.add(reason)

    def _resume(self, reason: str) -> None:
        if reason in self._pause_reasons:
            self._pause_reasons.discard(reason)
            if not self._pause_reasons and not self._closing:
                self.transport.resumeProducing()

    # -- input framing --------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._deadlines.input_received()
        self._buffer = self._buffer + data if self._buffer else data
        self._process()

    def _process(self) -> None:
        # A reply whose Deferred fired synchronously calls back in here (via _async_reply); let
        # the loop already running continue instead of recursing once per pipelined command.
        if self._processing:
            return
        self._processing = True
        try:
            self._process_buffer()
        finally:
            self._processing = False

    def _process_buffer(self) -> None:
        while self._buffer and not self._busy and not self._closing:
            if self._decoder is not None:
                chunk, self._buffer = self._buffer, b""
                rest = self._decoder.feed(chunk)
                if rest is not None:
                    self._buffer = rest
                    self._end_of_data()
                    self._turn()
                continue
            if self._discarding:
                cut = self._buffer.find(_CRLF)
                if cut < 0:
                    self._buffer = self._buffer[-1:] if self._buffer.endswith(b"\r") else b""
                    break
                self._buffer = self._buffer[cut + 2 :]
                self._discarding = False
                self._turn()
                continue
            cut = self._buffer.find(_CRLF)
            if cut < 0:
                if len(self._buffer) > self._max_buffered_line:
                    self._discarding = True
                    self._buffer = self._buffer[-1:] if self._buffer.endswith(b"\r") else b""
                    self._respond(replies.LINE_TOO_LONG)
                break
            line, self._buffer = self._buffer[:cut], self._buffer[cut + 2 :]
            self._command_received(line)
            self._turn()
        if len(self._buffer) > _PIPELINE_HIGH_WATER:
            self._pause("pipeline")
        elif "pipeline" in self._pause_reasons:
            self._resume("pipeline")

    def _line_limit(self, verb: str) -> int:
        if verb in ("MAIL", "RCPT"):
            return self.config.max_mail_line_length
        if verb == "AUTH":
            return self.config.max_auth_line_length
        return self.config.max_line_length

    def _command_received(self, line: bytes) -> None:
        if self._auth_exchange is not None:
            self._auth_response(line)
            return
        if _FORBIDDEN_IN_COMMANDS.search(line) is not None:
            self._respond(replies.BAD_CHARACTERS)
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._respond(replies.BAD_CHARACTERS)
            return
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        if len(line) + 2 > self._line_limit(verb):
            self._respond(replies.LINE_TOO_LONG)
            return
        if self.refused_at_greeting and verb != "QUIT":
            self._respond(replies.REFUSED_SESSION)
            return
        handler: Callable[[str], Response | Deferred[Response]] | None = (
            getattr(self, "do_" + verb, None) if verb in _COMMANDS else None
        )
        if handler is None:
            _log.debug("unknown command {verb} from {client_ip}", verb=verb, client_ip=self.peer_ip)
            self._respond(
                replies.NOT_IMPLEMENTED
                if verb in _NOT_IMPLEMENTED_VERBS
                else replies.UNKNOWN_COMMAND
            )
            return
        try:
            result = handler(argument.strip(" "))
        except Exception:
            _log.failure("command {verb} failed", verb=verb)
            result = replies.LOCAL_ERROR
        if isinstance(result, Deferred):
            self._busy = True
            result.addErrback(self._command_failed, verb)
            if verb in _TRANSACTION_VERBS:
                result.addCallback(self._async_transaction_reply)
            else:
                result.addCallback(self._async_reply)
        else:
            if verb in _TRANSACTION_VERBS:
                self._count_refusal(result)
            self._respond(result)

    def _count_refusal(self, response: Response) -> Response:
        """Count a 4xx/5xx reply to MAIL, RCPT or DATA as a rejection (passes it on)."""
        if isinstance(response, Reply) and response.code >= 400:
            self._metrics.rejected(reply_class(response))
        return response

    def _async_transaction_reply(self, response: Response) -> None:
        """:meth:`_async_reply` for MAIL, RCPT and DATA, counting a refusal (one callback)."""
        self._count_refusal(response)
        self._async_reply(response)

    def _command_failed(self, failure: Failure, verb: str) -> Reply:
        _log.failure("command {verb} failed", failure, verb=verb)
        return replies.LOCAL_ERROR

    def _async_reply(self, response: Response) -> None:
        self._busy = False
        if self._closing:
            return
        self._respond(response)
        self._turn()
        self._process()

    # -- output ---------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        self.transport.write(data)

    def _respond(self, response: Response) -> None:
        if response is None or self._closing:
            return
        if isinstance(response, bytes):
            self._send(response)  # EHLO/HELO lines and 334 challenges
        else:
            self._send(response.format())
            if response.code >= 500:
                self.errors += 1
                if self.errors >= self.config.max_errors:
                    self.server.security_event("too-many-errors", self.peer_ip, errors=self.errors)
                    self._close(replies.TOO_MANY_ERRORS)
                    return
        if self._draining and self._idle():
            self._close(replies.SERVICE_UNAVAILABLE)

    def _idle(self) -> bool:
        """No transaction, DATA or AUTH exchange in progress: safe to close for a drain."""
        return self.transaction is None and self._decoder is None and self._auth_exchange is None

    # -- commands -------------------------------------------------------------------------------

    def _ehlo_lines(self) -> list[str]:
        lines = [
            "PIPELINING",
            f"SIZE {self.config.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "DSN",
            "SMTPUTF8",
        ]
        if self.server.tls is not None and not self.tls_active:
            lines.append("STARTTLS")
        mechanisms = self._auth_mechanisms()
        if mechanisms and (self.tls_active or self.config.allow_plaintext_auth):
            lines.append("AUTH " + " ".join(mechanisms))
        return lines

    def _greet(self, argument: str, esmtp: bool) -> Response:
        if not argument or " " in argument:
            return replies.HELO_SYNTAX
        self._reset_transaction()
        self.helo = argument
        self.esmtp = esmtp
        greeting = f"{self.server.hostname} Hello {argument} [{self.peer_ip}]"
        if not esmtp:
            self.offered = frozenset()
            return f"250 {greeting}\r\n".encode()
        extensions = self._ehlo_lines()
        self.offered = frozenset(line.partition(" ")[0] for line in extensions)
        lines = [greeting, *extensions]
        return "".join(
            f"250{'-' if i < len(lines) - 1 else ' '}{line}\r\n" for i, line in enumerate(lines)
        ).encode()

    def do_EHLO(self, argument: str) -> Response:
        """EHLO: start an extended session; lists the extensions."""
        return self._greet(argument, esmtp=True)

    def do_HELO(self, argument: str) -> Response:
        """HELO: start a plain SMTP session."""
        return self._greet(argument, esmtp=False)

    def do_MAIL(self, argument: str) -> Response | Deferred[Response]:
        """MAIL FROM: start a transaction."""
        if self.helo is None:
            return replies.NEED_HELO
        if self.transaction is not None:
            return replies.NESTED_MAIL
        if self._auth_required() and not self.sender.authenticated:
            return replies.AUTH_REQUIRED
        try:
            path = parse_path_argument(argument, "FROM:", allow_null=True)
            params = parse_parameters(
                path.params, MAIL_PARAMETERS, self._offered(), replies.MAIL_SYNTAX
            )
        except AddressError:
            return replies.MAIL_SYNTAX
        except ParameterError as e:
            return e.reply
        size = params.get("SIZE")
        if isinstance(size, int) and size > self.config.max_message_size:
            return replies.MESSAGE_TOO_BIG
        # RFC 4954 section 5: every client is treated as not trusted to vouch for a message's
        # submitter, so a valid AUTH= (given or not, authenticated or not) is read and dropped;
        # a relay that authenticates to the next hop sends AUTH=<>.
        smtputf8 = "SMTPUTF8" in params
        if path.address is not None and not path.address.is_ascii and not smtputf8:
            return replies.NON_ASCII_ADDRESS
        if self._auth_required() and not self.sender.authenticated:
            return replies.AUTH_REQUIRED
        sender_text = None if path.address is None else str(path.address)
        if not self.sender.may_send_as(sender_text):
            self.server.security_event(
                "sender-mismatch", self.peer_ip, login=self.sender.login, sender=sender_text
            )
            return replies.SENDER_NOT_OWNED
        transaction = Transaction(path.address, smtputf8, self.clock.seconds())
        transaction.body_8bit = params.get("BODY") == "8BITMIME"
        envid, ret = params.get("ENVID"), params.get("RET")
        transaction.envid = envid if isinstance(envid, str) else None
        transaction.ret = ret if isinstance(ret, Ret) else None
        if self.trusted:
            return self._start_transaction(True, transaction)
        allowed: Deferred[Any] = self.server.limits.allow_message(self.peer_ip)
        started: Deferred[Response] = allowed.addCallback(self._start_transaction, transaction)
        return started

    def _offered(self) -> frozenset[str]:
        """The extensions whose MAIL/RCPT parameters this session may use (none after HELO)."""
        return self.offered if self.esmtp else frozenset()

    def _start_transaction(self, allowed: bool, transaction: Transaction) -> Response:
        if not allowed:
            self.server.security_event("message-rate", self.peer_ip)
            return replies.MESSAGE_RATE_EXCEEDED
        self.transaction = transaction
        return replies.SENDER_OK

    def do_RCPT(self, argument: str) -> Response | Deferred[Response]:
        """RCPT TO: add a recipient, if policy accepts it."""
        transaction = self.transaction
        if transaction is None:
            return replies.NEED_MAIL
        try:
            path = parse_path_argument(argument, "TO:", allow_null=False)
            params = parse_parameters(
                path.params, RCPT_PARAMETERS, self._offered(), replies.RCPT_SYNTAX
            )
        except ParameterSyntaxError:
            return replies.RCPT_SYNTAX
        except AddressError:
            return replies.BAD_RECIPIENT_SYNTAX
        except ParameterError as e:
            return e.reply
        address = path.address
        assert address is not None
        if not address.domain and self.policy.primary_domain:
            # RFC 5321 section 4.5.1: <postmaster> alone means the postmaster of this server;
            # trace headers and logs show the address it was taken to mean.
            address = replace(address, domain=self.policy.primary_domain)
        if not address.is_ascii and not transaction.smtputf8:
            return replies.NON_ASCII_ADDRESS
        if len(transaction.recipients) >= self.config.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        notify, orcpt = params.get("NOTIFY"), params.get("ORCPT")
        dsn = DsnRequest(
            notify if isinstance(notify, frozenset) else frozenset(),
            orcpt if isinstance(orcpt, tuple) else None,
        )
        decision = self.policy.resolve(address)
        if not isinstance(decision, Deferred):
            return self._recipient_decided(decision, transaction, address, dsn)
        decided: Deferred[Response] = decision.addCallback(
            self._recipient_decided, transaction, address, dsn
        )
        return decided

    def _may_relay(self) -> bool:
        """Authenticated users and trusted networks may send to other domains (if relaying)."""
        return self.server.relay and (self.sender.authenticated or self.trusted)

    def _recipient_decided(
        self,
        decision: RecipientDecision,
        transaction: Transaction,
        address: Address,
        dsn: DsnRequest,
    ) -> Response | Deferred[Response]:
        if transaction is not self.transaction:
            return replies.NEED_MAIL
        if decision.accepted and self._greylisting_applies():
            return self._greylist(transaction.sender_text, str(address)).addCallback(
                self._greylist_decided, decision, transaction, address, dsn
            )
        if decision.accepted:
            transaction.recipients.append(address)
            route: LocalRoute | RemoteRoute = LocalRoute(decision.mailboxes)
            transaction.accepted.append(Recipient(str(address), route, dsn))
            return decision.reply
        if decision.reply is replies.RELAY_DENIED and self._may_relay():
            domain = remote_domain(address)
            if domain is not None:
                transaction.recipients.append(address)
                transaction.accepted.append(Recipient(str(address), RemoteRoute(domain), dsn))
                return replies.RECIPIENT_OK
        if decision.reply in (replies.RELAY_DENIED, replies.RELAY_TRICK):
            self.server.security_event(
                "relay-denied", self.peer_ip, recipient=str(address), login=self.sender.login
            )
            if decision.reply is replies.RELAY_DENIED and self.sender.authenticated:
                return replies.RELAY_NOT_AVAILABLE
        return decision.reply

    def _greylist_decided(
        self,
        verdict: GreylistVerdict,
        decision: RecipientDecision,
        transaction: Transaction,
        address: Address,
        dsn: DsnRequest,
    ) -> Response:
        if transaction is not self.transaction:
            return replies.NEED_MAIL
        if not verdict.passed:
            return self._greylisted_reply(verdict, transaction.sender_text, str(address))
        transaction.recipients.append(address)
        transaction.accepted.append(Recipient(str(address), LocalRoute(decision.mailboxes), dsn))
        return decision.reply

    def do_DATA(self, argument: str) -> Response:
        """DATA: receive the message body."""
        if argument:
            return replies.NO_ARGUMENTS
        transaction = self.transaction
        if transaction is None:
            return replies.NEED_MAIL
        if not transaction.recipients:
            return replies.NEED_RCPT
        transaction.queue_id = self.server.new_queue_id()
        spool_file = self.server.spool.open(
            transaction.queue_id, lambda: self._pause("spool"), lambda: self._resume("spool")
        )
        transaction.spool_file = spool_file
        trace = transaction.trace = self._trace_headers(transaction) + self.dnsbl_header()
        spool_file.write(trace)
        received = trace.partition(b"\n")[2]  # a relay drops Return-Path and sends CRLF
        transaction.trace_wire_size = len(received) + received.count(b"\n")
        body_sink: Callable[[bytes], None] = spool_file.write
        inbound = self.server.inbound
        if inbound is not None and self.screened():
            facts = Facts(
                self.peer_ip, self.helo or "", transaction.sender_text, inbound.authserv_id
            )
            transaction.check = inbound.start(facts, transaction.queue_id)
            body_sink = transaction.check.body_sink(spool_file.write)
        self._decoder = BodyDecoder(
            body_sink,
            self.config.max_message_size,
            normalize_line_endings=self.config.bare_line_endings == "normalize",
        )
        self._data_timer = self.clock.callLater(self.config.data_timeout, self._data_timeout)
        return replies.START_DATA

    def _trace_headers(self, transaction: Transaction) -> bytes:
        """``Return-Path`` and ``Received`` (RFC 5321 section 4.4), with LF line endings."""
        protocol = ("UTF8SMTP" if transaction.smtputf8 else "ESMTP") if self.esmtp else "SMTP"
        if self.esmtp:
            protocol += ("S" if self.tls_active else "") + (
                "A" if self.sender.authenticated else ""
            )
        helo = sanitize_for_header(self.helo or "")
        tls = describe_session(self.transport) if self.tls_active else None
        tls_comment = f"\n\t(using {tls})" if tls else ""
        stamp = _header_date(int(self.clock.seconds()))
        recipient = ""
        if len(transaction.recipients) == 1:
            recipient = f"\n\tfor <{transaction.recipients[0]}>"
        return (
            f"Return-Path: <{transaction.sender_text}>\n"
            f"Received: from {helo} ([{self.peer_ip}]){tls_comment}\n"
            f"\tby {self.server.hostname} (mailsrv) with {protocol} id {transaction.queue_id}"
            f"{recipient};\n\t{stamp}\n"
        ).encode()

    def _end_of_data(self) -> None:
        decoder, transaction = self._decoder, self.transaction
        assert decoder is not None and transaction is not None
        assert transaction.spool_file is not None
        self._decoder = None
        self._stop_data_timer()
        if decoder.problem is not None:
            reply = _BODY_PROBLEM_REPLIES[decoder.problem]
            self._metrics.rejected(reply_class(reply))
            self._log_message(transaction, decoder.size, f"rejected: {decoder.problem.value}")
            self._reset_transaction()
            self._respond(reply)
            return
        self._busy = True
        spool_file, transaction.spool_file = transaction.spool_file, None
        if transaction.check is not None:
            checked = transaction.check.finish(spool_file, transaction.trace)
            replied: Deferred[Response] = checked.addCallbacks(
                self._checked,
                self._message_failed,
                callbackArgs=(transaction, spool_file, decoder.size),
                errbackArgs=(transaction, spool_file, decoder.size),
            )
            replied.addCallback(self._async_reply)
            return
        message = self._accepted_message(
            transaction, spool_file.size, transaction.trace_wire_size + decoder.size
        )
        self._commit(message, transaction, spool_file, decoder.size).addCallback(self._async_reply)

    def _commit(
        self, message: AcceptedMessage, transaction: Transaction, spool_file: SpoolFile, size: int
    ) -> Deferred[Response]:
        """Make ``message`` durable; fires with the reply (250 once synced, else 451/452)."""
        committed: Deferred[Any] = self.server.commit(message, spool_file)
        replied: Deferred[Response] = committed.addCallbacks(
            self._message_committed,
            self._message_failed,
            callbackArgs=(transaction, size, self.clock.seconds()),
            errbackArgs=(transaction, spool_file, size),
        )
        return replied

    def _checked(
        self, outcome: CheckOutcome, transaction: Transaction, spool_file: SpoolFile, size: int
    ) -> Response | Deferred[Response]:
        """The checks are done: refuse, or commit with the verdict (see mailsrv.mailauth)."""
        if self._closing:  # the client left before a reply: nothing was acknowledged
            spool_file.discard()
            return None
        if outcome.refusal is not None:
            spool_file.discard()
            self.server.security_event(
                "authentication-refused",
                self.peer_ip,
                reply=f"{outcome.refusal.code} {outcome.refusal.enhanced}",
                sender=transaction.sender_text,
            )
            self._metrics.rejected(reply_class(outcome.refusal))
            self._log_message(transaction, size, f"refused: {outcome.refusal.text}")
            if transaction is self.transaction:
                self.transaction = None
            return outcome.refusal
        wire_size = transaction.trace_wire_size + size + outcome.wire_delta
        message = self._accepted_message(
            transaction, spool_file.size, wire_size, authentication=outcome.verdict
        )
        return self._commit(message, transaction, spool_file, size)

    def _accepted_message(
        self,
        transaction: Transaction,
        size: int,
        wire_size: int,
        authentication: Verdict | None = None,
    ) -> AcceptedMessage:
        """The transaction as the value every commit sink reads (``size``: the stored body;
        ``wire_size``: its size on the wire to a next hop, ``decoder.size`` counting CRLF)."""
        if authentication is not None and self.dnsbl_results:
            authentication = replace(authentication, dnsbl=self.dnsbl_results)
        tls = describe_session(self.transport) if self.tls_active else None
        tls_version, _, tls_cipher = (tls or "").partition(" ")
        client = ClientFacts(
            ip=self.peer_ip,
            helo=self.helo or "",
            listener=self.listener,
            login=self.sender.login,
            tls_version=tls_version or None,
            tls_cipher=tls_cipher or None,
            trusted=self.trusted,
        )
        return AcceptedMessage(
            queue_id=transaction.queue_id,
            sender=transaction.sender_text,
            recipients=tuple(transaction.accepted),
            client=client,
            received_at=self.clock.seconds(),
            size=size,
            smtputf8=transaction.smtputf8,
            body_8bit=transaction.body_8bit,
            envid=transaction.envid,
            ret=transaction.ret,
            wire_size=wire_size,
            authentication=authentication,
        )

    def _message_committed(
        self, _: object, transaction: Transaction, size: int, ended: float
    ) -> Response:
        self.messages_accepted += 1
        self._metrics.accepted.inc()
        metrics = self.server.metrics
        metrics.message_size.observe(size)
        metrics.accept_latency.observe(self.clock.seconds() - ended)
        self._log_message(transaction, size, "accepted")
        if transaction is self.transaction:
            self.transaction = None
        return replies.MESSAGE_ACCEPTED.with_text(
            replies.MESSAGE_ACCEPTED.text.format(queue_id=transaction.queue_id)
        )

    def _message_failed(
        self, failure: Failure, transaction: Transaction, spool_file: SpoolFile, size: int
    ) -> Response:
        if failure.check(SinkUnavailable):
            _log.warn(
                "could not store message {queue_id}: {error}",
                queue_id=transaction.queue_id,
                error=str(failure.value),
            )
        else:
            _log.failure(
                "could not store message {queue_id}", failure, queue_id=transaction.queue_id
            )
        self._log_message(transaction, size, "failed: local error")
        spool_file.discard()
        if transaction is self.transaction:
            self.transaction = None
        reply = (
            replies.STORAGE_ERROR
            if isinstance(failure.value, OSError) and failure.value.errno == 28
            else replies.LOCAL_ERROR
        )
        self._metrics.rejected(reply_class(reply))
        return reply

    def _log_message(self, transaction: Transaction, size: int, result: str) -> None:
        _log.info(
            "message {queue_id} {result} from {client_ip} <{sender}> to {recipients} size={size}",
            queue_id=transaction.queue_id,
            result=result,
            client_ip=self.peer_ip,
            helo=self.helo,
            sender=transaction.sender_text,
            recipients=[str(r) for r in transaction.recipients],
            size=size,
            duration=round(self.clock.seconds() - transaction.started, 3),
        )

    def do_RSET(self, argument: str) -> Response:
        """RSET: abandon the transaction."""
        if argument:
            return replies.NO_ARGUMENTS
        self._reset_transaction()
        return replies.RESET_OK

    def do_NOOP(self, argument: str) -> Response:
        """NOOP: do nothing (RFC 5321 allows and ignores an argument)."""
        return replies.OK

    def do_QUIT(self, argument: str) -> Response:
        """QUIT: say goodbye and close."""
        if argument:
            return replies.NO_ARGUMENTS
        self._close(replies.BYE)
        return None

    def do_VRFY(self, argument: str) -> Response:
        """VRFY: never confirms users (no address harvesting), per RFC 5321 section 3.5.3."""
        if not argument:
            return replies.SYNTAX_ERROR
        return replies.CANNOT_VRFY

    def do_HELP(self, argument: str) -> Response:
        """HELP: a pointer to the RFC."""
        return replies.HELP

    # -- transaction state ----------------------------------------------------------------------

    def _stop_data_timer(self) -> None:
        _cancel(self._data_timer)
        self._data_timer = None

    def _reset_transaction(self) -> None:
        self._abandon_transaction()
        self.transaction = None

    def _abandon_transaction(self) -> None:
        """Drop DATA in progress, if any, and its spool file."""
        transaction = self.transaction
        self._decoder = None
        self._stop_data_timer()
        if transaction is not None and transaction.spool_file is not None:
            transaction.spool_file.discard()
            transaction.spool_file = None
        if "spool" in self._pause_reasons:
            self._resume("spool")
