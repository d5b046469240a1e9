"""Opening outbound connections: TCP (or implicit TLS) to a candidate, then the SMTP session.

:meth:`Connector.connect_any` tries the candidates in order and moves on to the next MX on a
connection failure or a refused (4xx/5xx) greeting; :func:`deliver_once` is connect, deliver,
QUIT in one call for callers that do not keep connections.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, endpoints, error
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailsrv.relay import replies
from mailsrv.relay.client import SessionError, SMTPConnection, with_detail
from mailsrv.relay.message import OutboundMessage, RecipientResult
from mailsrv.relay.options import TLS_IMPLICIT, TLS_MAY, TLS_NONE, ClientOptions
from mailsrv.relay.protocol import ReplyReader
from mailsrv.relay.resolver import Candidate
from mailsrv.relay.tlsclient import ClientTLS
from mailsrv.threads import RunInThread

_log = Logger(namespace="mailsrv.relay.connector")


class Connector:
    """Opens connections to next hops with one set of :class:`ClientOptions`.

    ``reactor`` makes the TCP connections; ``clock`` (default: the reactor) runs every timer;
    ``run_in_thread`` reads message bodies off the reactor.
    """

    def __init__(
        self,
        reactor: Any,
        options: ClientOptions,
        run_in_thread: RunInThread,
        clock: IReactorTime | None = None,
        tls: ClientTLS | None = None,
    ) -> None:
        self._reactor = reactor
        self._options = options
        self._run = run_in_thread
        self._clock: IReactorTime = clock if clock is not None else reactor
        if tls is None and options.tls != TLS_NONE:
            tls = ClientTLS(options.verify, options.ca_file)
        self._tls = tls

    async def connect(self, candidate: Candidate, starttls: bool = True) -> SMTPConnection:
        """A ready connection to ``candidate``; raises :class:`SessionError`."""
        timeouts = self._options.timeouts
        endpoint: Any
        if ":" in candidate.address:
            endpoint = endpoints.TCP6ClientEndpoint(
                self._reactor, candidate.address, candidate.port, timeout=timeouts.connect
            )
        else:
            endpoint = endpoints.TCP4ClientEndpoint(
                self._reactor, candidate.address, candidate.port, timeout=timeouts.connect
            )
        if self._options.tls == TLS_IMPLICIT:
            assert self._tls is not None
            endpoint = endpoints.wrapClientTLS(
                self._tls.creator(candidate.host.strip("[]")), endpoint
            )
        protocol = ReplyReader(self._clock)
        connecting = endpoints.connectProtocol(endpoint, protocol)
        connecting.addTimeout(timeouts.connect, self._clock)
        try:
            await connecting
        except (defer.TimeoutError, error.ConnectingCancelledError):
            raise SessionError(with_detail(replies.CONNECT_FAILED, "timed out")) from None
        except Exception as e:
            raise SessionError(with_detail(replies.CONNECT_FAILED, _connect_error(e))) from None
        connection = SMTPConnection(
            protocol, candidate, self._options, self._clock, self._run, self._tls, starttls
        )
        await connection.open()
        return connection

    async def connect_any(self, candidates: Sequence[Candidate]) -> SMTPConnection:
        """The first candidate that gives a working session; :class:`SessionError` if none.

        In opportunistic mode a peer whose STARTTLS handshake fails is tried once more in
        plaintext (RFC 7435: better unencrypted than not at all).
        """
        last: SessionError | None = None
        for candidate in candidates:
            try:
                return await self._connect_logged(candidate)
            except SessionError as e:
                last = e
                if e.reply.enhanced == replies.TLS_FAILED.enhanced and self._options.tls == TLS_MAY:
                    try:
                        return await self._connect_logged(candidate, starttls=False)
                    except SessionError as again:
                        last = again
        if last is None:
            raise SessionError(with_detail(replies.CONNECT_FAILED, "no address to connect to"))
        raise last

    async def _connect_logged(self, candidate: Candidate, starttls: bool = True) -> SMTPConnection:
        try:
            connection = await self.connect(candidate, starttls)
        except SessionError as e:
            _log.info(
                "next hop {host}[{address}]:{port} failed: {reply}",
                host=candidate.host,
                address=candidate.address,
                port=candidate.port,
                reply=f"{e.reply.code} {e.reply.enhanced} {e.reply.text}",
            )
            raise
        _log.debug(
            "connected to {host}[{address}]:{port} tls={tls}",
            host=candidate.host,
            address=candidate.address,
            port=candidate.port,
            tls=connection.tls_version,
        )
        return connection


def _connect_error(e: BaseException) -> str:
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, error.TimeoutError):
        return "timed out"
    return str(e).strip() or type(e).__name__


async def deliver_once(
    connector: Connector, candidates: Sequence[Candidate], message: OutboundMessage
) -> list[RecipientResult]:
    """Connect to the first working candidate, deliver ``message``, close: one result each.

    When no candidate works, every recipient gets the last failure (temporary for connection
    trouble, as a 5xx greeting is too: the next attempt may find another MX).
    """
    try:
        connection = await connector.connect_any(candidates)
    except SessionError as e:
        reply = (
            e.reply if e.reply.code < 500 else with_detail(replies.GREETING_REFUSED, e.reply.text)
        )
        return [
            RecipientResult(r.address, reply.code, reply.enhanced, reply.text, reply.code >= 500)
            for r in message.recipients
        ]
    try:
        return await connection.deliver(message)
    finally:
        await connection.close()
