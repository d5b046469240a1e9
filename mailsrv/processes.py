"""Worker processes for CPU-bound work that would otherwise hold the GIL against the reactor.

Threads keep blocking I/O off the reactor (:mod:`mailsrv.threads`), but pure-Python CPU work
in a thread (parsing a message with the ``email`` package for a webhook payload) still takes
the one GIL the reactor needs for every SMTP session.  :class:`ProcessPoolService` runs such
work in a few worker processes instead, so it uses the other cores, behind the same interface
as a thread pool: ``run(function, *args)`` returns a Deferred of the result.  The function and
its arguments must be picklable (a module-level function and plain values).

Workers are started with ``spawn`` (a fresh interpreter, not a fork of a process that has
threads and open sockets), lazily on the first job, at a lower CPU priority (``nice``) so the
SMTP sessions come first.  A worker that dies (killed, out of memory) fails the jobs it held
with :class:`~concurrent.futures.process.BrokenProcessPool`; the pool is then replaced, so later
jobs run again.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

_log = Logger(namespace="mailsrv")


def _lower_priority(nice: int) -> None:
    """In a new worker: run at ``nice`` more than the server (best effort)."""
    with contextlib.suppress(OSError):
        os.nice(nice)


class ProcessPoolService(Service):
    """``size`` worker processes that start and stop with the service tree (see the module
    docstring); :meth:`run` has the signature of :data:`mailsrv.threads.RunInThread`."""

    def __init__(self, reactor: IReactorFromThreads, name: str, size: int, nice: int = 10) -> None:
        self._reactor = reactor
        self.size = size
        self.nice = nice
        self._executor: ProcessPoolExecutor | None = None
        self.setName(name)

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=self.size,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_lower_priority,
                initargs=(self.nice,),
            )
        return self._executor

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Run ``function(*args, **kwargs)`` in a worker; fires with its result or failure."""
        result: Deferred[Any] = Deferred()
        if not self.running:
            result.errback(Failure(RuntimeError(f"{self.name} is not running")))
            return result
        executor = self._pool()
        try:
            future = executor.submit(function, *args, **kwargs)
        except BrokenProcessPool as e:
            self._replace(executor)
            result.errback(Failure(e))
            return result
        except RuntimeError as e:  # shut down
            result.errback(Failure(e))
            return result

        def finished(done: Future[Any]) -> None:
            # In the executor's management thread: hand the outcome to the reactor.
            self._reactor.callFromThread(self._deliver, done, result, executor)

        future.add_done_callback(finished)
        return result

    def _deliver(
        self, done: Future[Any], result: Deferred[Any], executor: ProcessPoolExecutor
    ) -> None:
        if done.cancelled():
            result.errback(Failure(RuntimeError(f"{self.name}: job cancelled at stop")))
            return
        error = done.exception()
        if error is None:
            result.callback(done.result())
            return
        if isinstance(error, BrokenProcessPool):
            self._replace(executor)
        result.errback(Failure(error))

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        """A worker died: later jobs get a new pool (once per broken pool)."""
        if self._executor is broken:
            _log.warn("{pool}: a worker process died; starting new workers", pool=self.name)
            self._executor = None
            broken.shutdown(wait=False, cancel_futures=True)

    def stopService(self) -> Deferred[None] | None:
        """Cancel the jobs not started; fires once the workers have exited (waited for in a
        thread of its own, not on the reactor), so none outlives the server."""
        super().stopService()
        executor, self._executor = self._executor, None
        if executor is None:
            return None
        stopped: Deferred[None] = Deferred()

        def shut_down() -> None:
            executor.shutdown(wait=True, cancel_futures=True)
            self._reactor.callFromThread(stopped.callback, None)

        threading.Thread(target=shut_down, name=f"{self.name}-stop", daemon=True).start()
        return stopped
