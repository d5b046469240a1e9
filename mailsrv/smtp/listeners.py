"""Listening sockets: one per SMTP port, dual-stack IPv6 when the host is ``::``.

The service stops accepting on shutdown, then drains the sessions (see
:meth:`mailsrv.smtp.server.SMTPServer.drain`) before the process exits.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.application.service import Service
from twisted.internet import tcp
from twisted.internet.defer import DeferredList, inlineCallbacks, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailsrv.smtp.admission import AdmitBeforeTLSFactory
from mailsrv.smtp.server import SMTPFactory, SMTPServer

_log = Logger(namespace="mailsrv.smtp")


class EagerWriteServer(tcp.Server):
    """A TCP connection that sends a write at once when nothing else is queued.

    Twisted's transport buffers every write until the next reactor turn, which costs two
    ``epoll_ctl`` calls per SMTP reply (start and stop watching for writability): a large share
    of the per-message CPU with non-pipelining clients.  When the buffers are empty, and TLS is
    not layered on this transport, a direct ``send`` is equivalent; whatever it does not take
    (or any error) goes through the normal buffered path.
    """

    def write(self, data: bytes) -> None:
        if (
            not self.TLS
            and self.connected
            and not self.disconnecting
            and not self._writeDisconnected
            and not self._tempDataBuffer
            and self.offset >= len(self.dataBuffer)
            and data
        ):
            try:
                sent = self.socket.send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        super().write(data)


class DualStackPort(tcp.Port):
    """A TCP port that, bound to ``::``, also accepts IPv4 (IPV6_V6ONLY off, whatever the
    host's ``net.ipv6.bindv6only`` default says), with eager writes (see EagerWriteServer)."""

    transport = EagerWriteServer

    def createInternetSocket(self) -> socket.socket:
        sock: socket.socket = super().createInternetSocket()
        if self.addressFamily == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        return sock


def listen_tcp(reactor: Any, port: int, factory: Any, backlog: int, interface: str) -> Any:
    """``reactor.listenTCP`` with a :class:`DualStackPort`."""
    listening = DualStackPort(port, factory, backlog, interface, reactor)
    listening.startListening()
    return listening


class SMTPListenerService(Service):
    """Owns the listening ports of one :class:`SMTPServer` and drains it on stop.

    ``ports`` maps listener names (``mx``, ``submission``, ``smtps``) to port numbers; 0 binds
    an ephemeral port (tests).  The caller leaves out listeners that are turned off.  ``smtps``
    speaks TLS from the first byte (RFC 8314) with the server's certificate, once the
    connection limits have admitted the client (:mod:`mailsrv.smtp.admission`).
    """

    def __init__(self, reactor: Any, server: SMTPServer, ports: dict[str, int]) -> None:
        self._reactor = reactor
        self.server = server
        self._ports = dict(ports)
        self.listening: dict[str, IListeningPort] = {}
        self._expiry = LoopingCall(server.expire_limits)
        self._expiry.clock = reactor
        self.setName("smtp")

    def _listen(self) -> None:
        config = self.server.config
        for name, port in self._ports.items():
            factory: Any = SMTPFactory(self.server, name)
            if name == "smtps":
                if self.server.tls is None:
                    raise SystemExit(
                        "mailsrv: the smtps listener needs enable_tls and a certificate"
                    )
                # Admission first, TLS only for admitted clients (mailsrv.smtp.admission).
                sessions = SMTPFactory(self.server, name, implicit_tls=True, preadmitted=True)
                tls = TLSMemoryBIOFactory(self.server.tls, False, sessions)
                factory = AdmitBeforeTLSFactory(self.server, name, tls)
            try:
                listening = listen_tcp(
                    self._reactor, port, factory, config.listen_backlog, config.host
                )
            except CannotListenError as e:
                if config.host != "::" or "Address already in use" in str(e):
                    raise SystemExit(
                        f"mailsrv: cannot listen for {name} on port {port}: {e.socketError}"
                    ) from None
                _log.warn("IPv6 unavailable; listening on IPv4 only for {listener}", listener=name)
                listening = listen_tcp(
                    self._reactor,
                    port,
                    factory,
                    config.listen_backlog,
                    "0.0.0.0",  # noqa: S104 - IPv4 fallback of "::"
                )
            self.listening[name] = listening
            address = listening.getHost()
            _log.debug(  # the start-up summary (mailsrv.startup) names every listener
                "listening for {listener} on [{host}]:{port}",
                listener=name,
                host=address.host,
                port=address.port,
            )

    def unbound(self) -> list[str]:
        """The configured listeners that are not listening now (for ``/readyz``)."""
        return [name for name in self._ports if name not in self.listening]

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if not self.listening:
            self._listen()

    def startService(self) -> None:
        super().startService()
        if not self.listening:
            self._listen()
        interval = max(1.0, self.server.config.rate_window / 2)
        self._expiry.start(interval, now=False)

    @inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        if self._expiry.running:
            self._expiry.stop()
        yield DeferredList([maybeDeferred(port.stopListening) for port in self.listening.values()])
        self.listening.clear()
        count = len(self.server.sessions)
        _log.info("draining {count} session(s)", count=count)
        yield self.server.drain(self.server.config.shutdown_grace)
        _log.info("all sessions closed")
