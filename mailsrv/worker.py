"""The program of one worker process (:mod:`mailsrv.processes`): ``python -m mailsrv.worker``.

It reads jobs from its standard input and writes each job's outcome to its standard output,
both as frames (:mod:`mailsrv.processes`), and runs a reactor of its own, so a job may be a
plain function (CPU-bound work: parsing, signing) or a coroutine function that waits on the
network (a webhook delivery with treq).  Outcomes go back as the jobs finish, in any order.
Anything a library prints goes to standard error: the frames have a descriptor of their own.
When its standard input ends (the server stops, or dies), it finishes the jobs it has, then
exits.
"""

from __future__ import annotations

import inspect
import os
import pickle
import sys
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from mailsrv.processes import FrameReader, frame, portable_error


class _Jobs(Protocol):
    """Runs the jobs that arrive; writes each outcome as a frame."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._frames = FrameReader()
        self._running: dict[int, Deferred[Any]] = {}
        self._ended = False

    def dataReceived(self, data: bytes) -> None:
        for payload in self._frames.feed(data):
            # Standard input is a private pipe from the server that started this worker.
            job_id, function, args, kwargs = pickle.loads(payload)  # noqa: S301
            self._start(job_id, function, args, kwargs)

    def _start(self, job_id: int, function: Any, args: Any, kwargs: Any) -> None:
        def call() -> Any:
            result = function(*args, **kwargs)
            if inspect.iscoroutine(result):
                return Deferred.fromCoroutine(result)
            return result

        done = maybeDeferred(call)
        self._running[job_id] = done
        done.addBoth(self._finished, job_id)

    def _finished(self, result: object, job_id: int) -> None:
        del self._running[job_id]
        if isinstance(result, Failure):
            error = result.value if result.value is not None else RuntimeError("no error")
            outcome: tuple[Any, ...] = (job_id, False, portable_error(error))
        else:
            outcome = (job_id, True, result)
        try:
            payload = pickle.dumps(outcome, pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # a result that cannot be sent is an error of the job
            payload = pickle.dumps((job_id, False, portable_error(e)), pickle.HIGHEST_PROTOCOL)
        assert self.transport is not None
        self.transport.write(frame(payload))
        self._maybe_exit()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._ended = True
        self._maybe_exit()

    def _maybe_exit(self) -> None:
        if self._ended and not self._running and self._reactor.running:
            self._reactor.stop()


def main() -> None:
    """Lower the priority as the server asked (the import path is the server's, from
    ``PYTHONPATH``), then serve jobs until the end of standard input."""
    try:
        os.nice(int(sys.argv[1]))
    except OSError:
        pass
    frames_out = os.dup(1)  # the frames' own descriptor; prints go to standard error
    os.dup2(2, 1)
    from twisted.internet import reactor, stdio

    # mypy sees the Windows StandardIO; the POSIX one takes the descriptors.
    stdio.StandardIO(_Jobs(reactor), stdin=0, stdout=frames_out, reactor=reactor)  # type: ignore[call-arg]
    reactor.run()


if __name__ == "__main__":
    main()
