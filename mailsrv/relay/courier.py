"""The outbound client as the scheduler sees it: connections that carry transactions.

:class:`ClientConnector` picks the client options by route (the smarthost's, or those for MX
delivery) and turns a failure to reach every candidate into a :class:`NextHopError`;
:class:`ClientConnection` wraps one :class:`~mailsrv.relay.client.SMTPConnection`.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from mailsrv.relay.client import SessionError, SMTPConnection
from mailsrv.relay.connector import Connector
from mailsrv.relay.message import OutboundMessage, RecipientResult
from mailsrv.relay.resolver import NextHopError, Route
from mailsrv.relay.scheduler import IRelayConnection, IRelayConnector


@implementer(IRelayConnection)
class ClientConnection:
    """One open session with a next hop."""

    def __init__(self, connection: SMTPConnection) -> None:
        self._connection = connection
        self.remote_mta = connection.candidate.host
        self.remote_address = connection.candidate.address

    @property
    def reusable(self) -> bool:
        """True while another transaction may be sent (the session is healthy and idle)."""
        return self._connection.usable

    def send(self, message: OutboundMessage) -> Deferred[list[RecipientResult]]:
        return Deferred.fromCoroutine(self._connection.deliver(message))

    def close(self) -> Deferred[None]:
        return self._connection.close()


@implementer(IRelayConnector)
class ClientConnector:
    """Opens connections with the smarthost's options or with those for MX delivery."""

    def __init__(self, mx: Connector, smarthost: Connector | None = None) -> None:
        self._mx = mx
        self._smarthost = smarthost

    def connect(self, route: Route) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._connect(route))

    async def _connect(self, route: Route) -> ClientConnection:
        connector = self._smarthost if route.destination.startswith("relay:") else self._mx
        assert connector is not None, "a smarthost route needs the smarthost connector"
        try:
            connection = await connector.connect_any(route.candidates)
        except SessionError as e:
            raise NextHopError(e.reply) from None
        return ClientConnection(connection)
