"""Group commit: make many accepted messages durable with a few filesystem syncs, in one thread.

Committing each message on its own (fsync the file, link it into ``new/``, fsync the directory)
costs two journal commits and a round of thread hand-offs per message; profiles of workload (b)
showed most of the CPU in context switches between the reactor and the I/O threads, not in
Python.  The committer instead takes every message waiting at that moment as one batch, in its
own thread:

1. finish each spool file (write the rest, close; no fsync);
2. one sync: every body is now on disk;
3. every sink (:mod:`mailsrv.delivery.sinks`) writes its part of the batch, in order: Maildir
   links for local recipients, queue records for remote ones, outbox entries; a sink only sees
   the messages every sink before it accepted;
4. all or nothing: a message that any sink failed is rolled back in every sink that wrote it;
5. one sync again: every link, record and removal is on disk;
6. drop the spool names and, in one call into the reactor, fire every message's Deferred (the
   250 or the 451), then give each sink the committed messages (``committed``).

Before a message is handed to the thread, the committer's preparers
(:class:`~mailsrv.delivery.sinks.ICommitPreparer`) may replace it with a version made from its
body (the DKIM signatures of its relayed copies), each in its own time, off the reactor.

A batch waits only for the one before it, so the batch size grows with the load.  The sync
(:func:`~mailsrv.delivery.fssync.filesystem_syncer`) covers each filesystem holding the spool,
the Maildirs or a sink's records, so a mail directory mounted elsewhere is durable before the
250 too.  Mail only counts as accepted after step 5, so a crash at any point leaves either
nothing or a whole message in every sink.  When the second sync fails, every message of the
batch is rolled back (best effort) before its 451.

:meth:`GroupCommitter.inline` runs the same steps without the thread, one message per batch,
at once in the caller's thread: for in-memory protocol tests whose I/O is synchronous too.  Its
``commit`` returns a Deferred that has already fired, so there the ``committed`` hooks run
before the caller's callbacks (the reply) rather than after them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsrv.delivery.envelope import AcceptedMessage
from mailsrv.delivery.sinks import ICommitPreparer, ICommitSink, PendingBody, StagedMessage
from mailsrv.delivery.spool import SpoolFile
from mailsrv.ops.metrics import Metrics

_log = Logger(namespace="mailsrv.delivery")


@dataclass
class _Job:
    message: AcceptedMessage
    spool_file: SpoolFile
    rest: bytes
    result: Deferred[AcceptedMessage]
    written: list[ICommitSink] = field(default_factory=list)  # sinks holding its part
    error: BaseException | None = None

    @property
    def staged(self) -> StagedMessage:
        return StagedMessage(self.message, self.spool_file.path)


_STOP = object()


class GroupCommitter(Service):
    """Commits accepted messages in batches through its sinks (see the module docstring)."""

    def __init__(
        self,
        reactor: IReactorFromThreads | None,
        sinks: Sequence[ICommitSink],
        sync: Callable[[], None],
        metrics: Metrics | None = None,
        preparers: Sequence[ICommitPreparer] = (),
    ) -> None:
        self._reactor = reactor
        self._batch_sizes = (metrics if metrics is not None else Metrics()).commit_batch
        self.sinks = tuple(sinks)
        self.preparers = tuple(preparers)
        self._sync = sync
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.messages = 0
        self.setName("committer")

    @classmethod
    def inline(cls, sinks: Sequence[ICommitSink], sync: Callable[[], None]) -> GroupCommitter:
        """A committer without a thread: each message is its own batch, run in ``commit``."""
        return cls(None, sinks, sync)

    def commit(self, message: AcceptedMessage, spool_file: SpoolFile) -> Deferred[AcceptedMessage]:
        """Make ``message`` (its body in ``spool_file``) durable in every sink.

        Fires with ``message`` once it is committed (reply 250), or fails with the first error
        (reply 451): then nothing of it is left in any sink and the caller discards the spool
        file.
        """
        result: Deferred[AcceptedMessage] = Deferred()

        def enqueue(prepared: tuple[AcceptedMessage, bytes]) -> None:
            message, rest = prepared
            if not self.running:
                result.errback(Failure(RuntimeError("the committer is not running")))
            elif self._reactor is None:
                job = _Job(message, spool_file, rest, result)
                self._commit_batch([job])
                self._fire([job])
            else:
                self._queue.put(_Job(message, spool_file, rest, result))

        def prepare(rest: bytes) -> Deferred[tuple[AcceptedMessage, bytes]]:
            return Deferred.fromCoroutine(
                self._prepare(message, PendingBody(spool_file.path, rest))
            )

        detached = spool_file.detach()
        if self.preparers:
            detached.addCallback(prepare).addCallbacks(enqueue, result.errback)
        else:
            detached.addCallbacks(lambda rest: enqueue((message, rest)), result.errback)
        return result

    async def _prepare(
        self, message: AcceptedMessage, body: PendingBody
    ) -> tuple[AcceptedMessage, bytes]:
        """``message`` as every preparer made it, in order, with the body's rest."""
        for preparer in self.preparers:
            prepared = preparer.prepare(message, body)
            if prepared is not None:
                message = await prepared
        return message, body.rest

    def startService(self) -> None:
        super().startService()
        if self._reactor is not None:
            self._thread = threading.Thread(target=self._run, name="mailsrv-committer", daemon=True)
            self._thread.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        thread, self._thread = self._thread, None
        done: Deferred[None] = Deferred()
        if thread is None or self._reactor is None:
            done.callback(None)
            return done
        self._queue.put(_STOP)
        reactor = self._reactor

        def join() -> None:
            thread.join()
            reactor.callFromThread(done.callback, None)

        threading.Thread(target=join, name="mailsrv-committer-join", daemon=True).start()
        return done

    # -- the committer thread -------------------------------------------------------------------

    def _run(self) -> None:
        assert self._reactor is not None
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            jobs = [job for job in batch if job is not _STOP]
            if jobs:
                self._commit_batch(jobs)
                self._reactor.callFromThread(self._fire, jobs)
            if len(jobs) != len(batch):
                return

    def _commit_batch(self, jobs: list[_Job]) -> None:
        live = []
        for job in jobs:
            try:
                job.spool_file.finish_blocking(job.rest)
                live.append(job)
            except BaseException as e:
                job.error = e
        if live:
            try:
                self._sync()
            except BaseException as e:
                for job in live:
                    job.error = e
                live = []
        if live:
            for sink in self.sinks:
                self._write(sink, [job for job in live if job.error is None])
            for job in live:
                if job.error is not None:
                    self._roll_back(job)
            try:
                self._sync()
            except BaseException as e:
                for job in live:
                    if job.error is None:
                        job.error = e
                        self._roll_back(job)  # no 250 goes out, so nothing may stay
        for job in live:
            if job.error is None:
                try:
                    job.spool_file.path.unlink()
                except OSError:
                    _log.failure("could not remove spool file {path}", path=job.spool_file.path)
        self.batches += 1
        self.messages += len(jobs)

    def _write(self, sink: ICommitSink, jobs: list[_Job]) -> None:
        """``sink`` writes its part of ``jobs``; note who failed and who holds a part."""
        if not jobs:
            return
        try:
            failures = sink.write([job.staged for job in jobs])
        except BaseException as e:
            _log.failure("sink {sink} failed a batch of {count}", sink=sink.name, count=len(jobs))
            for job in jobs:
                job.error = e
                job.written.append(sink)  # it may hold a part: its rollback decides
            return
        for job in jobs:
            error = failures.get(job.message.queue_id)
            if error is None:
                job.written.append(sink)
            else:
                job.error = error

    def _roll_back(self, job: _Job) -> None:
        written, job.written = job.written, []
        for sink in reversed(written):
            try:
                sink.rollback(job.staged)
            except BaseException:
                _log.failure(
                    "could not roll back message {queue_id} in {sink}: a copy may remain",
                    queue_id=job.message.queue_id,
                    sink=sink.name,
                )

    # -- back in the reactor thread -------------------------------------------------------------

    def _fire(self, jobs: list[_Job]) -> None:
        self._batch_sizes.observe(len(jobs))
        committed = []
        for job in jobs:
            if job.error is None:
                committed.append(job.message)
                job.result.callback(job.message)
            else:
                job.result.errback(Failure(job.error))
        if not committed:
            return
        for sink in self.sinks:
            try:
                sink.committed(committed)
            except Exception:
                _log.failure("sink {sink} failed after commit", sink=sink.name)
