"""Implicit TLS (RFC 8314): the connection caps and rates decide before any TLS work is done.

On the MX and submission ports the session itself asks :meth:`ILimits.admit` and answers a
refusal with a ``421``.  On the implicit-TLS port that would mean building a TLS connection and
running a handshake (key exchange, certificate) for a client that is then turned away: cheap
CPU for a flood to burn.  :class:`AdmitBeforeTLSFactory` sits in front of the
``TLSMemoryBIOFactory`` instead.  Its protocol stops reading, asks the limits, and only for an
admitted client builds the TLS layer (and inside it the session, told it is already counted).
A refused client is closed without a byte: no ServerHello, and no plaintext ``421`` that a TLS
client could not read anyway.  The refusal is logged as a security event as on the other ports.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from mailsrv.limits import normalize_ip
from mailsrv.smtp.server import SMTPServer

_log = Logger(namespace="mailsrv.smtp")

_MAX_EARLY_BYTES = 64 * 1024  # reading is paused during admission; this is only a backstop


class AdmitBeforeTLS(Protocol):
    """One connection to the implicit-TLS port, until admitted; then a pass-through."""

    transport: Any = None  # the TCP transport (an IPushProducer too)

    def __init__(
        self, server: SMTPServer, listener: str, tls: TLSMemoryBIOFactory, addr: IAddress | None
    ) -> None:
        self._server = server
        self._listener = listener
        self._metrics = server.metrics.listener(listener)
        self._tls = tls
        self._addr = addr
        self._ip = ""
        self._inner: Protocol | None = None
        self._early = b""
        self._lost = False

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self._ip = normalize_ip(getattr(self.transport.getPeer(), "host", ""))
        self._metrics.connections.inc()
        if self._server.draining:
            self._metrics.refused("shutting-down")
            self.transport.loseConnection()
            return
        admitted: Deferred[Any] = self._server.limits.admit(
            self._ip, self._ip in self._server.trusted
        )
        admitted.addCallbacks(self._decided, self._failed)

    def _decided(self, refusal: str | None) -> None:
        if self._lost or self._server.draining:
            if refusal is None:
                self._server.limits.release(self._ip)
            if not self._lost:
                self.transport.loseConnection()
            return
        if refusal is not None:
            self._server.security_event(refusal, self._ip, listener=self._listener)
            self._metrics.refused(refusal)
            self.transport.loseConnection()
            return
        inner = self._tls.buildProtocol(self._addr)
        self._inner = inner
        inner.makeConnection(self.transport)
        early, self._early = self._early, b""
        if early:
            inner.dataReceived(early)
        self.transport.resumeProducing()

    def _failed(self, failure: Failure) -> None:
        _log.failure("admission check failed", failure)
        if not self._lost:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        self._early += data
        if len(self._early) > _MAX_EARLY_BYTES:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        if self._inner is not None:
            self._inner.connectionLost(reason)


class AdmitBeforeTLSFactory(Factory):
    """Wraps the implicit-TLS listener's ``TLSMemoryBIOFactory`` (see the module docstring).

    The sessions that ``tls`` builds must be told they are admitted already
    (``SMTPFactory(..., preadmitted=True)``), so that each is counted once.
    """

    noisy = False

    def __init__(self, server: SMTPServer, listener: str, tls: TLSMemoryBIOFactory) -> None:
        self.server = server
        self.listener = listener
        self.tls = tls

    def startFactory(self) -> None:
        self.tls.doStart()

    def stopFactory(self) -> None:
        self.tls.doStop()

    def buildProtocol(self, addr: IAddress | None) -> AdmitBeforeTLS:
        return AdmitBeforeTLS(self.server, self.listener, self.tls, addr)
