"""Worker processes for work that would otherwise hold the GIL against the reactor.

Threads keep blocking I/O off the reactor (:mod:`mailsrv.threads`), but pure-Python CPU work in
a thread (parsing a message for a webhook payload, DKIM's RSA) still takes the one GIL the
reactor needs for every SMTP session, and so does a webhook's HTTP exchange on the reactor
itself.  :class:`ProcessPoolService` runs such work in a few worker processes instead
(:mod:`mailsrv.worker`), so it uses the other cores, behind the same interface as a thread
pool: ``run(function, *args)`` returns a Deferred of the result.  The function and its
arguments must be picklable (a module-level function and plain values); the function may be a
coroutine function, awaited in the worker's own reactor, so one worker serves many jobs that
wait on the network at once.

The workers are driven by the reactor itself: a job is one frame written to a worker's standard
input, its outcome one frame read from the worker's output when the reactor sees it readable.
There is no thread in the server for this (a ``concurrent.futures`` process pool has two, a
feeder and a manager, and their hand-offs of the GIL cost more than the jobs under load).  A
frame is a 4-byte big-endian length and a pickle.  Each job goes to the worker with the fewest
jobs in flight.

Workers start lazily with the first job, as fresh interpreters (not forks of a process that has
threads and sockets), at a lower CPU priority (``nice``) so that the SMTP sessions come first,
with the server's import path.  A worker that dies (killed, out of memory) fails the jobs it
held with :class:`WorkerExited`; the next job starts a new one.  At stop, the workers' input is
closed: each finishes the jobs it holds, then exits (killed after ``stop_grace`` seconds).
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
from collections.abc import Callable, Iterator
from typing import Any

from twisted.application.service import Service
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

_log = Logger(namespace="mailsrv")

_LENGTH = struct.Struct(">I")
MAX_FRAME = 1 << 30
"""The largest frame either side accepts (a message is at most the size limit, far less)."""


class WorkerExited(Exception):
    """The worker process that held a job ended before it answered."""


class WorkerProtocolError(Exception):
    """A worker sent what is not a frame; it is stopped."""


def frame(payload: bytes) -> bytes:
    """``payload`` as one frame."""
    return _LENGTH.pack(len(payload)) + payload


class FrameReader:
    """Splits a byte stream into frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The frames completed by ``data``."""
        self._buffer += data
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > MAX_FRAME:
                raise WorkerProtocolError(f"a frame of {length} bytes")
            end = _LENGTH.size + length
            if len(self._buffer) < end:
                return
            payload = bytes(self._buffer[_LENGTH.size : end])
            del self._buffer[:end]
            yield payload


def portable_error(error: BaseException) -> BaseException:
    """``error``, or a RuntimeError with its text when it would not survive pickling."""
    try:
        pickle.loads(pickle.dumps(error, pickle.HIGHEST_PROTOCOL))  # noqa: S301 (its own bytes)
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


class _Worker(ProcessProtocol):
    """One worker process: the jobs it holds, by id."""

    def __init__(self, pool: ProcessPoolService) -> None:
        self._pool = pool
        self._frames = FrameReader()
        self.jobs: dict[int, Deferred[Any]] = {}
        self.ended: Deferred[None] = Deferred()
        self.alive = True

    def send(self, job_id: int, payload: bytes, result: Deferred[Any]) -> None:
        assert self.transport is not None
        self.jobs[job_id] = result
        self.transport.write(frame(payload))

    def outReceived(self, data: bytes) -> None:
        try:
            for payload in self._frames.feed(data):
                # A worker is our own child on a private pipe, not an untrusted peer.
                job_id, ok, value = pickle.loads(payload)  # noqa: S301
                result = self.jobs.pop(job_id)
                if ok:
                    result.callback(value)
                else:
                    result.errback(Failure(value))
        except Exception:
            _log.failure("{pool}: a worker sent what is not a job's outcome", pool=self._pool.name)
            self.kill()

    def kill(self) -> None:
        if self.transport is not None and self.alive:
            try:
                self.transport.signalProcess("KILL")
            except net_error.ProcessExitedAlready:
                pass

    def close(self) -> None:
        """No more jobs: the worker finishes what it holds and exits."""
        if self.transport is not None and self.alive:
            self.transport.closeStdin()

    def processEnded(self, reason: Failure) -> None:
        self.alive = False
        self._pool.ended(self)  # first: a job failed below may start the next at once
        jobs, self.jobs = self.jobs, {}
        for result in jobs.values():
            result.errback(Failure(WorkerExited(f"{self._pool.name}: the worker exited")))
        self.ended.callback(None)


class ProcessPoolService(Service):
    """``size`` worker processes that start and stop with the service tree (see the module
    docstring); :meth:`run` has the signature of :data:`mailsrv.threads.RunInThread`."""

    def __init__(
        self, reactor: Any, name: str, size: int, nice: int = 10, stop_grace: float = 10.0
    ) -> None:
        self._reactor = reactor
        self.size = size
        self.nice = nice
        self.stop_grace = stop_grace
        self._workers: list[_Worker] = []
        self._job_ids = iter(range(1, sys.maxsize))
        self.setName(name)

    @property
    def pids(self) -> list[int]:
        """The process ids of the running workers."""
        return [w.transport.pid for w in self._workers if w.transport is not None and w.alive]

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Run ``function(*args, **kwargs)`` in a worker; fires with its result or failure."""
        result: Deferred[Any] = Deferred()
        if not self.running:
            result.errback(Failure(RuntimeError(f"{self.name} is not running")))
            return result
        job_id = next(self._job_ids)
        try:
            payload = pickle.dumps((job_id, function, args, kwargs), pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            result.errback(Failure(e))
            return result
        try:
            worker = self._least_busy()
        except OSError as e:
            result.errback(Failure(e))
            return result
        worker.send(job_id, payload, result)
        return result

    def _least_busy(self) -> _Worker:
        self._workers = [w for w in self._workers if w.alive]
        if len(self._workers) < self.size:
            worker = _Worker(self)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
            self._reactor.spawnProcess(
                worker,
                sys.executable,
                [sys.executable, "-m", "mailsrv.worker", str(self.nice)],
                env=env,
                childFDs={0: "w", 1: "r", 2: 2},
            )
            self._workers.append(worker)
            return worker
        return min((w for w in self._workers if w.alive), key=lambda w: len(w.jobs))

    def ended(self, worker: _Worker) -> None:
        """``worker``'s process ended: later jobs go to a new one."""
        if worker in self._workers:
            self._workers.remove(worker)
            if self.running:
                _log.warn(
                    "{pool}: a worker process exited; the next job starts a new one", pool=self.name
                )

    def stopService(self) -> Deferred[Any]:
        """Refuse new jobs; fires once every worker has finished its jobs and exited (killed
        after ``stop_grace`` seconds)."""
        super().stopService()
        workers = list(self._workers)
        if not workers:
            return succeed(None)
        for worker in workers:
            worker.close()
        timer = self._reactor.callLater(self.stop_grace, self._kill, workers)
        done: Deferred[Any] = DeferredList([w.ended for w in workers])

        def stopped(_: object) -> None:
            if timer.active():
                timer.cancel()

        return done.addCallback(stopped)

    def _kill(self, workers: list[_Worker]) -> None:
        for worker in workers:
            if worker.alive:
                _log.warn("{pool}: a worker did not stop in time; killed", pool=self.name)
                worker.kill()
