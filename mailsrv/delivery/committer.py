"""Group commit: make many messages durable with a few filesystem syncs, in one thread.

Committing each message on its own (fsync the file, link it into ``new/``, fsync the directory)
costs two journal commits and a round of thread hand-offs per message; profiles of workload (b)
showed most of the CPU in context switches between the reactor and the I/O threads, not in
Python.  The committer instead takes every message waiting at that moment as one batch, in its
own thread:

1. finish each spool file (write the rest, close; no fsync);
2. one sync of the spool's filesystem: every body is now on disk;
3. hard-link each body into its recipients' ``new/`` (the Maildir "tmp then new" step); when
   one link of a message fails, its other links are removed, so it is delivered everywhere or
   nowhere;
4. one sync again: every new name (and every removal) is on disk;
5. drop the spool names and fire every message's Deferred in one call into the reactor.

A batch waits only for the one before it, so the batch size grows with the load.  The sync is
``syncfs(2)`` on each filesystem holding the spool or the Maildirs (so a mail directory mounted
elsewhere is durable before the 250 too) where the platform has it, else ``sync(2)``.  Mail
only counts as accepted after step 4, so a crash at any point leaves either no copy in
``new/`` or a whole one, as before.  When the second sync fails, every link of the batch is
removed again (best effort) before the 451s.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsrv.delivery.maildir import MaildirStore
from mailsrv.delivery.spool import SpoolFile

_log = Logger(namespace="mailsrv.delivery")


def filesystem_syncer(
    *directories: Path, sync_fd: Callable[[int], None] | None = None
) -> Callable[[], None]:
    """A function that makes everything written on the filesystems of ``directories`` durable.

    Each filesystem is synced once per call, however many of the directories it holds (the
    data directory's mail and spool are usually one).  A directory not made yet counts as the
    filesystem of its nearest existing parent, where it will be made.  ``sync_fd`` syncs the
    filesystem of an open directory; the default is ``syncfs(2)``, or ``sync(2)`` (everything)
    where the platform lacks it.
    """
    sync_fd = sync_fd or _syncfs()
    if sync_fd is None:
        return os.sync
    sync_one = sync_fd

    def sync() -> None:
        synced: set[int] = set()
        for directory in directories:
            fd = os.open(_existing(directory), os.O_RDONLY | os.O_DIRECTORY)
            try:
                device = os.fstat(fd).st_dev
                if device not in synced:
                    sync_one(fd)
                    synced.add(device)
            finally:
                os.close(fd)

    return sync


def _syncfs() -> Callable[[int], None] | None:
    """``syncfs(2)`` through libc, or None."""
    libc_name = ctypes.util.find_library("c")
    syncfs = getattr(ctypes.CDLL(libc_name, use_errno=True), "syncfs", None) if libc_name else None
    if syncfs is None:
        return None

    def sync_fd(fd: int) -> None:
        if syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))

    return sync_fd


def _existing(directory: Path) -> Path:
    """``directory`` or, when it does not exist yet, its nearest existing parent."""
    for candidate in (directory, *directory.parents):
        if candidate.is_dir():
            return candidate
    return Path("/")


@dataclass
class _Job:
    spool_file: SpoolFile
    rest: bytes
    mailboxes: tuple[str, ...]
    now: float
    result: Deferred[list[Path]]
    delivered: list[Path] = field(default_factory=list)
    error: BaseException | None = None


_STOP = object()


class GroupCommitter(Service):
    """Commits messages in batches (see the module docstring)."""

    def __init__(
        self,
        reactor: Any,
        store: MaildirStore,
        sync: Callable[[], None],
    ) -> None:
        self._reactor: IReactorFromThreads = reactor
        self._clock: IReactorTime = reactor
        self._store = store
        self._sync = sync
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.messages = 0
        self.setName("committer")

    def commit(self, spool_file: SpoolFile, mailboxes: tuple[str, ...]) -> Deferred[list[Path]]:
        """Make ``spool_file`` durable and deliver it; fires with the delivered paths."""
        result: Deferred[list[Path]] = Deferred()
        now = self._clock.seconds()

        def enqueue(rest: bytes) -> None:
            if self._thread is None:
                result.errback(Failure(RuntimeError("the committer is not running")))
                return
            self._queue.put(_Job(spool_file, rest, mailboxes, now, result))

        spool_file.detach().addCallbacks(enqueue, result.errback)
        return result

    def startService(self) -> None:
        super().startService()
        self._thread = threading.Thread(target=self._run, name="mailsrv-committer", daemon=True)
        self._thread.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        thread, self._thread = self._thread, None
        self._queue.put(_STOP)
        done: Deferred[None] = Deferred()
        if thread is None:
            done.callback(None)
            return done

        def join() -> None:
            thread.join()
            self._reactor.callFromThread(done.callback, None)

        threading.Thread(target=join, name="mailsrv-committer-join", daemon=True).start()
        return done

    # -- the committer thread -------------------------------------------------------------------

    def _run(self) -> None:
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
        try:
            if live:
                self._sync()
                for job in live:
                    try:
                        job.delivered = self._store.link(
                            job.spool_file.path, job.mailboxes, job.now
                        )
                    except BaseException as e:
                        job.error = e
                self._sync()
        except BaseException as e:
            for job in live:
                job.error = job.error or e
                # All or nothing: no 250 goes out, so no copy may stay (best effort: the
                # failed sync says nothing about what is on disk).
                self._store.remove(job.delivered)
                job.delivered = []
        for job in live:
            if job.error is None:
                try:
                    job.spool_file.path.unlink()
                except OSError:
                    _log.failure("could not remove spool file {path}", path=job.spool_file.path)
        self.batches += 1
        self.messages += len(jobs)
        self._reactor.callFromThread(_fire, jobs)


def _fire(jobs: list[_Job]) -> None:
    for job in jobs:
        if job.error is None:
            job.result.callback(job.delivered)
        else:
            job.result.errback(Failure(job.error))
