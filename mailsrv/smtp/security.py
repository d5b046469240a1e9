"""STARTTLS and AUTH for the ESMTP session (RFC 3207, RFC 4954), as a mixin of SMTPSession.

STARTTLS throws away whatever the client pipelined after it (CVE-2011-0411 class) and resets the
session.  AUTH runs a SASL mechanism from :mod:`mailsrv.auth.mechanisms` line by line, checks the
credentials through the server's one cred Portal, and asks the shared limits before and after:
a throttled IP or account is refused without any password work, and each failure is answered
late (see :mod:`mailsrv.auth.throttle`).
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsrv.auth.mechanisms import MECHANISMS, Exchange, MalformedResponse
from mailsrv.auth.realm import ANONYMOUS_SENDER, ISender, Sender
from mailsrv.smtp import replies
from mailsrv.smtp.replies import Reply, Response

if TYPE_CHECKING:
    from mailsrv.config import Config
    from mailsrv.smtp.server import SMTPServer

_log = Logger(namespace="mailsrv.smtp")


def _decode_sasl(data: bytes) -> bytes | None:
    """Strict base64 (RFC 4954); ``=`` alone is an empty response; None if malformed."""
    data = data.strip()
    if data == b"=":
        return b""
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):
        return None


class SecurityCommands:
    """STARTTLS and AUTH; the rest of the session lives in :class:`SMTPSession`."""

    if TYPE_CHECKING:
        server: SMTPServer
        config: Config
        clock: Any
        transport: Any
        listener: str
        peer_ip: str
        trusted: bool
        helo: str | None
        esmtp: bool
        transaction: Any
        tls_active: bool
        sender: Sender
        _buffer: bytes
        _busy: bool
        _auth_exchange: Exchange | None
        _auth_mechanism: str

        def _send(self, data: bytes) -> None: ...
        def _respond(self, response: Response) -> None: ...
        def _close(self, reply: Reply | None = None) -> None: ...
        def _reset_transaction(self) -> None: ...
        def _command_failed(self, failure: Failure, verb: str) -> Reply: ...
        def _async_reply(self, response: Response) -> None: ...

    def _auth_mechanisms(self) -> list[str]:
        """Mechanisms this listener offers (whether TLS is up yet or not)."""
        if self.server.portal is None or not self.config.enable_auth:
            return []
        if self.listener == "mx" and not self.config.auth_on_mx:
            return []
        mechanisms = ["PLAIN", "LOGIN"]
        if self.config.enable_cram_md5:
            mechanisms.append("CRAM-MD5")
        return mechanisms

    def _auth_required(self) -> bool:
        """Submission listeners require AUTH before MAIL when AUTH is available."""
        return self.listener != "mx" and bool(self._auth_mechanisms())

    # -- TLS and authentication -----------------------------------------------------------------

    def do_STARTTLS(self, argument: str) -> Response:
        """STARTTLS (RFC 3207): discard pipelined input, upgrade, forget the whole session."""
        if argument:
            return replies.NO_ARGUMENTS
        if self.server.tls is None:
            return replies.NOT_IMPLEMENTED
        if self.tls_active:
            return replies.TLS_ALREADY_ACTIVE
        if self.helo is None:
            return replies.NEED_HELO
        if self.transaction is not None:
            return replies.NOT_IN_TRANSACTION
        # CVE-2011-0411 class: anything the client sent after STARTTLS in plaintext is dropped.
        self._buffer = b""
        self._send(replies.READY_FOR_TLS.format())
        self.transport.startTLS(self.server.tls)
        self.tls_active = True
        self.helo = None
        self.esmtp = False
        self.sender = ANONYMOUS_SENDER
        self._reset_transaction()
        return None

    def do_AUTH(self, argument: str) -> Response | Deferred[Response]:
        """AUTH (RFC 4954): PLAIN, LOGIN, CRAM-MD5; only over TLS unless configured otherwise."""
        mechanisms = self._auth_mechanisms()
        if not mechanisms:
            return replies.NOT_IMPLEMENTED
        if not self.tls_active and not self.config.allow_plaintext_auth:
            return replies.ENCRYPTION_REQUIRED
        if self.helo is None or not self.esmtp:
            return replies.NEED_HELO
        if self.sender.authenticated:
            return replies.ALREADY_AUTHENTICATED
        if self.transaction is not None:
            return replies.NOT_IN_TRANSACTION
        mechanism, _, initial_text = argument.partition(" ")
        mechanism = mechanism.upper()
        if not mechanism or " " in initial_text.strip():
            return replies.AUTH_SYNTAX
        if mechanism not in mechanisms:
            return replies.AUTH_MECHANISM_UNKNOWN
        initial: bytes | None = None
        if initial_text:
            initial = _decode_sasl(initial_text.encode("ascii", "replace"))
            if initial is None:
                return replies.AUTH_MALFORMED
        if self.trusted:
            return self._start_auth(False, mechanism, initial)
        blocked: Deferred[Any] = self.server.limits.auth_ip_blocked(self.peer_ip)
        started: Deferred[Response] = blocked.addCallback(self._start_auth, mechanism, initial)
        return started

    def _start_auth(
        self, ip_blocked: bool, mechanism: str, initial: bytes | None
    ) -> Response | Deferred[Response]:
        if ip_blocked:
            self.server.security_event("auth-ip-throttled", self.peer_ip)
            self._close(replies.AUTH_IP_THROTTLED)
            return None
        self._auth_mechanism = mechanism
        self._auth_exchange = MECHANISMS[mechanism](initial, self.server.hostname)
        return self._auth_step(None)

    def _auth_response(self, line: bytes) -> None:
        """One client line inside an AUTH exchange."""
        if len(line) + 2 > self.config.max_auth_line_length:
            self._auth_exchange = None
            self._respond(replies.LINE_TOO_LONG)
            return
        if line.strip() == b"*":
            self._auth_exchange = None
            self._respond(replies.AUTH_ABORTED)
            return
        decoded = _decode_sasl(line)
        if decoded is None:
            self._auth_exchange = None
            self._respond(replies.AUTH_MALFORMED)
            return
        result = self._auth_step(decoded)
        if isinstance(result, Deferred):
            self._busy = True
            result.addErrback(self._command_failed, "AUTH")
            result.addCallback(self._async_reply)
        else:
            self._respond(result)

    def _auth_step(self, response: bytes | None) -> Response | Deferred[Response]:
        """Advance the mechanism: a 334 challenge, a syntax error, or credentials to check."""
        exchange = self._auth_exchange
        assert exchange is not None
        try:
            challenge = next(exchange) if response is None else exchange.send(response)
        except StopIteration as done:
            self._auth_exchange = None
            return self._check_credentials(done.value)
        except MalformedResponse:
            self._auth_exchange = None
            return replies.AUTH_MALFORMED
        return f"334 {base64.b64encode(challenge).decode()}\r\n".encode()

    def _check_credentials(self, credentials: Any) -> Deferred[Response]:
        login = credentials.username.decode("utf-8", "replace").lower()
        blocked: Deferred[Any] = self.server.limits.auth_account_blocked(login)
        checked: Deferred[Response] = blocked.addCallback(self._login, credentials, login)
        return checked

    def _login(self, account_blocked: bool, credentials: Any, login: str) -> Any:
        if account_blocked:
            self.server.security_event("auth-account-throttled", self.peer_ip, login=login)
            return replies.AUTH_ACCOUNT_THROTTLED
        portal = self.server.portal
        assert portal is not None
        result: Deferred[Any] = portal.login(credentials, None, ISender)
        return result.addCallbacks(self._auth_succeeded, self._auth_failed, errbackArgs=(login,))

    def _auth_succeeded(self, avatar: tuple[Any, Sender, Any]) -> Response:
        _interface, sender, _logout = avatar
        self.sender = sender
        _log.info(
            "auth success {login} from {client_ip} via {mechanism}",
            login=sender.login,
            client_ip=self.peer_ip,
            mechanism=self._auth_mechanism,
            listener=self.listener,
        )
        return replies.AUTH_OK

    def _auth_failed(self, failure: Failure, login: str) -> Response | Deferred[Response]:
        if not failure.check(UnauthorizedLogin):
            _log.failure("authentication backend error", failure)
            return replies.AUTH_TEMPORARY_FAILURE
        self.server.security_event(
            "auth-failure", self.peer_ip, login=login, mechanism=self._auth_mechanism
        )
        delay: Deferred[Any] = self.server.limits.auth_failed(self.peer_ip, login, not self.trusted)
        return delay.addCallback(
            lambda seconds: task.deferLater(self.clock, seconds, lambda: replies.AUTH_FAILED)
        )
