"""Threads for blocking work (disk, hashing): never on the reactor.

:data:`RunInThread` is how a component asks for that without knowing the pool: a callable
that runs ``function(*args, **kwargs)`` elsewhere and returns a Deferred of its result
(:meth:`ThreadPoolService.run` is one; tests pass a synchronous stand-in).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

RunInThread = Callable[..., "Deferred[Any]"]


class ThreadPoolService(Service):
    """A named thread pool that starts and stops with the service tree."""

    def __init__(self, reactor: IReactorFromThreads, name: str, size: int) -> None:
        self._reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=size, name=name)
        self.setName(name)

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Run ``function(*args, **kwargs)`` in the pool; fires with its result."""
        return deferToThreadPool(self._reactor, self.pool, function, *args, **kwargs)

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()
