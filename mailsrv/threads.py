"""Threads for blocking work (disk, hashing): never on the reactor.

:data:`RunInThread` is how a component asks for that without knowing the pool: a callable
that runs ``function(*args, **kwargs)`` elsewhere and returns a Deferred of its result
(:meth:`ThreadPoolService.run` is one; tests pass a synchronous stand-in).

A pool may bound the jobs it holds (running and queued): past the bound a new job fails at once
with :class:`PoolFull` instead of waiting behind the others.  A pool may also run its threads at
a lower CPU priority (``nice``, Linux: per thread), so CPU-bound work such as Argon2 (whose
lanes are threads of their own, created with the same priority) takes what the reactor thread
leaves instead of crowding it out.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

RunInThread = Callable[..., "Deferred[Any]"]


class PoolFull(Exception):
    """A bounded pool (or queue in front of one) has no room for another job right now."""


class ThreadPoolService(Service):
    """A named thread pool that starts and stops with the service tree.

    ``max_pending`` bounds the jobs running or queued (None: unbounded); ``nice`` (0 to 19)
    lowers the CPU priority of the pool's threads where the system allows it.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        name: str,
        size: int,
        max_pending: int | None = None,
        nice: int = 0,
    ) -> None:
        self._reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=size, name=name)
        self.max_pending = max_pending
        self.nice = nice
        self.pending = 0
        self._niced = threading.local()
        self.setName(name)

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Run ``function(*args, **kwargs)`` in the pool; fires with its result (or PoolFull)."""
        if self.nice:
            function = functools.partial(self._nicely, function)
        if self.max_pending is None:
            return deferToThreadPool(self._reactor, self.pool, function, *args, **kwargs)
        if self.pending >= self.max_pending:
            return fail(PoolFull(f"{self.name}: {self.pending} jobs pending"))
        self.pending += 1
        done = deferToThreadPool(self._reactor, self.pool, function, *args, **kwargs)
        return done.addBoth(self._finished)

    def _nicely(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """In a pool thread: lower this thread's priority once, then run ``function``."""
        if not getattr(self._niced, "done", False):
            self._niced.done = True
            # Only Linux takes a thread id here; elsewhere it could name another process.
            if not sys.platform.startswith("linux"):
                return function(*args, **kwargs)
            with contextlib.suppress(OSError):
                tid = threading.get_native_id()
                os.setpriority(
                    os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + self.nice
                )
        return function(*args, **kwargs)

    def _finished(self, result: object) -> object:
        self.pending -= 1
        return result

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()
