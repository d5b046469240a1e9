"""STARTTLS and AUTH for the ESMTP session (RFC 3207, RFC 4954), as a mixin of SMTPSession.

STARTTLS throws away whatever the client pipelined after it (CVE-2011-0411 class) and resets the
session.  AUTH runs a SASL mechanism from :mod:`mailsrv.auth.mechanisms` line by line,
resolves the user name to its account (:mod:`mailsrv.auth.account_identity`, so every
spelling shares one budget), asks the shared limits to admit the attempt, waits its turn at the
hash threads (:mod:`mailsrv.auth.hashqueue`) and checks the credentials through the server's
one cred Portal.  A throttled client or account, a client with too many attempts in progress
and a full hash queue are refused without any password work; each failure is answered late
(see :mod:`mailsrv.auth.throttle`).
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsrv.auth.account_identity import login_text
from mailsrv.auth.hashqueue import priority
from mailsrv.auth.mechanisms import MECHANISMS, Exchange, MalformedResponse
from mailsrv.auth.realm import ANONYMOUS_SENDER, ISender, Sender
from mailsrv.auth.store import StoreError
from mailsrv.auth.throttle import (
    ACCOUNT_THROTTLED,
    BACKEND_ERROR,
    IP_THROTTLED,
    NOT_CHECKED,
    REJECTED,
    SUCCEEDED,
    AuthAttempt,
)
from mailsrv.smtp import replies
from mailsrv.smtp.replies import Reply, Response
from mailsrv.threads import PoolFull

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
        _closing: bool
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
            return self._start_auth(None, mechanism, initial)
        refusal: Deferred[Any] = self.server.limits.auth_client_refusal(self.peer_ip)
        started: Deferred[Response] = refusal.addCallback(self._start_auth, mechanism, initial)
        return started

    def _start_auth(
        self, refusal: str | None, mechanism: str, initial: bytes | None
    ) -> Response | Deferred[Response]:
        if refusal is not None:
            self.server.security_event(refusal, self.peer_ip)
            throttled = refusal == IP_THROTTLED
            self.server.metrics.auth_attempt(mechanism, "throttled" if throttled else "busy")
            if throttled:
                self._close(replies.AUTH_IP_THROTTLED)
                return None
            return replies.AUTH_BUSY
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

    def _check_credentials(self, credentials: Any) -> Response | Deferred[Response]:
        """Resolve whose account this is, ask the throttle, then queue for the hash threads."""
        name = login_text(credentials.username)
        if name is None:  # refused before any state is kept for it
            self.server.metrics.auth_attempt(self._auth_mechanism, "failure")
            return replies.AUTH_BAD_USER_NAME
        resolved: Deferred[Any] = self.server.identities.resolve(name)
        checked: Deferred[Response] = resolved.addCallbacks(
            self._begin_attempt,
            self._identity_failed,
            callbackArgs=(credentials, name),
            errbackArgs=(name,),
        )
        return checked

    def _identity_failed(self, failure: Failure, name: str) -> Response:
        self.server.metrics.auth_attempt(self._auth_mechanism, "error")
        self._backend_failed(failure, name, "cannot look up the account of an AUTH attempt")
        return replies.AUTH_TEMPORARY_FAILURE

    def _backend_failed(self, failure: Failure, name: str, unexpected: str) -> None:
        """Log why an AUTH attempt could not be checked: a store that cannot answer (the
        database is down) in one line, anything else with its traceback."""
        if failure.check(StoreError):
            _log.warn(
                "authentication of {login} from {client_ip} not possible now: {error}",
                login=name,
                client_ip=self.peer_ip,
                error=str(failure.value),
            )
        else:
            _log.failure(unexpected, failure)

    def _begin_attempt(self, identity: str, credentials: Any, name: str) -> Deferred[Response]:
        begun: Deferred[Any] = self.server.limits.auth_begin(self.peer_ip, identity, self.trusted)
        admitted: Deferred[Response] = begun.addCallback(self._login, credentials, name)
        return admitted

    def _login(self, attempt: AuthAttempt | str, credentials: Any, name: str) -> Any:
        if isinstance(attempt, str):
            self.server.security_event(attempt, self.peer_ip, login=name)
            throttled = attempt in (IP_THROTTLED, ACCOUNT_THROTTLED)
            outcome = "throttled" if throttled else "busy"
            self.server.metrics.auth_attempt(self._auth_mechanism, outcome)
            if attempt == IP_THROTTLED:
                self._close(replies.AUTH_IP_THROTTLED)
                return None
            return (
                replies.AUTH_ACCOUNT_THROTTLED
                if attempt == ACCOUNT_THROTTLED
                else replies.AUTH_BUSY
            )
        portal = self.server.portal
        assert portal is not None
        result: Deferred[Any] = self.server.hash_queue.submit(
            priority(attempt.priority, self.server.identities.is_account(attempt.identity)),
            lambda: portal.login(credentials, None, ISender),
            wanted=lambda: not self._closing,
        )
        return result.addCallbacks(
            self._auth_succeeded,
            self._auth_failed,
            callbackArgs=(attempt,),
            errbackArgs=(attempt, name),
        )

    def _auth_succeeded(self, avatar: tuple[Any, Sender, Any], attempt: AuthAttempt) -> Response:
        self.server.limits.auth_finished(attempt, SUCCEEDED)
        _interface, sender, _logout = avatar
        self.sender = sender
        self.server.metrics.auth_attempt(self._auth_mechanism, "success")
        _log.info(
            "auth success {login} from {client_ip} via {mechanism}",
            login=sender.login,
            client_ip=self.peer_ip,
            mechanism=self._auth_mechanism,
            listener=self.listener,
        )
        return replies.AUTH_OK

    def _auth_failed(
        self, failure: Failure, attempt: AuthAttempt, name: str
    ) -> Response | Deferred[Response]:
        if failure.check(PoolFull, CancelledError):
            self.server.limits.auth_finished(attempt, NOT_CHECKED)
            if failure.check(CancelledError):
                return None  # the session went away while it waited
            self.server.security_event("auth-hash-queue-full", self.peer_ip, login=name)
            self.server.metrics.auth_attempt(self._auth_mechanism, "busy")
            return replies.AUTH_BUSY
        if not failure.check(UnauthorizedLogin):
            self.server.limits.auth_finished(attempt, BACKEND_ERROR)
            self.server.metrics.auth_attempt(self._auth_mechanism, "error")
            self._backend_failed(failure, name, "authentication backend error")
            return replies.AUTH_TEMPORARY_FAILURE
        self.server.security_event(
            "auth-failure", self.peer_ip, login=name, mechanism=self._auth_mechanism
        )
        self.server.metrics.auth_attempt(self._auth_mechanism, "failure")
        delay: Deferred[Any] = self.server.limits.auth_failure_delay(attempt)
        return delay.addCallback(
            lambda seconds: task.deferLater(self.clock, seconds, self._answer_failure, attempt)
        )

    def _answer_failure(self, attempt: AuthAttempt) -> Response:
        # The attempt stays in flight (and counted) until this late answer.
        self.server.limits.auth_finished(attempt, REJECTED)
        return replies.AUTH_FAILED
