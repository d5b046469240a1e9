"""Removes expired greylisting triplets from the database, on a timer."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

_log = Logger(namespace="mailsrv.screening")

EXPIRY_INTERVAL = 3600.0
"""Seconds between two sweeps of the greylisting table."""


class GreylistExpiry(Service):
    """Sweeps ``server.greylist`` every :data:`EXPIRY_INTERVAL` while greylisting is on (the
    server's configuration says, so a reload that turns it on or off is followed)."""

    def __init__(self, server: Any, clock: IReactorTime) -> None:
        self._server = server
        self._clock = clock
        self._loop = LoopingCall(self._sweep)
        self._loop.clock = clock
        self.setName("greylist-expiry")

    def startService(self) -> None:
        super().startService()
        self._loop.start(EXPIRY_INTERVAL, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def _sweep(self) -> None:
        greylist = self._server.greylist
        if greylist is None or not self._server.config.greylist:
            return
        swept = greylist.expire(self._clock.seconds())
        swept.addCallbacks(self._swept, self._failed)

    def _swept(self, count: int) -> None:
        if count:
            _log.info("greylisting: {count} expired triplet(s) removed", count=count)

    def _failed(self, failure: Failure) -> None:
        _log.failure("greylisting: expired triplets could not be removed", failure)
