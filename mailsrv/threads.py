"""Named thread pools: blocking work (fsync, link, rename, password hashing) runs here, never on
the reactor.  A pool may bound the jobs it holds (running and queued): past the bound a new job
fails at once with :class:`PoolFull` instead of waiting behind the others."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool


class PoolFull(Exception):
    """A bounded pool (or queue in front of one) has no room for another job right now."""


class ThreadPoolService(Service):
    """A named thread pool that starts and stops with the service tree.

    ``max_pending`` bounds the jobs running or queued (None: unbounded).
    """

    def __init__(
        self, reactor: IReactorFromThreads, name: str, size: int, max_pending: int | None = None
    ) -> None:
        self._reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=size, name=name)
        self.max_pending = max_pending
        self.pending = 0
        self.setName(name)

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Run ``function(*args, **kwargs)`` in the pool; fires with its result (or PoolFull)."""
        if self.max_pending is None:
            return deferToThreadPool(self._reactor, self.pool, function, *args, **kwargs)
        if self.pending >= self.max_pending:
            return fail(PoolFull(f"{self.name}: {self.pending} jobs pending"))
        self.pending += 1
        done = deferToThreadPool(self._reactor, self.pool, function, *args, **kwargs)
        return done.addBoth(self._finished)

    def _finished(self, result: object) -> object:
        self.pending -= 1
        return result

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()
