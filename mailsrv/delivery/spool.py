"""The spool: message bodies written to disk as they arrive, off the reactor thread.

A :class:`SpoolFile` collects content in memory and hands it to the I/O thread pool in order, in
chunks of ``_CHUNK`` bytes, so a 50 MB message never sits in memory.  When more than
``_HIGH_WATER`` bytes wait for the disk it asks the session to pause reading from the client, and
resumes it when the writes have caught up.  A message whose checks (:mod:`mailsrv.mailauth`) need
its content reads it back (:meth:`SpoolFile.read`) and gets a header inserted near the top
(:meth:`SpoolFile.insert`): free while the message is still all in memory, else the file is
rewritten in the I/O thread with the header in place (the body copied by the kernel).  At the
end of DATA, :meth:`SpoolFile.detach` hands
the file to the committer (:mod:`mailsrv.delivery.committer`), which finishes it and makes it
durable with a whole batch; :meth:`SpoolFile.close` is the one-message form (write the rest,
fsync, close).

Only bodies never acknowledged are ever left here: a committed message has its own names in
every sink (Maildir links, queue records) before the 250, and its spool name is dropped.  So
:meth:`Spool.prepare` empties the directory at start.

With a :class:`~mailsrv.jsonstore.spares.SparePool` (``spool/spare/``: the bodies the relay
queue and the outbox were the last to hold, emptied), a new spool file is a spare renamed to its
name rather than a new inode, and a discarded one goes back there.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from mailsrv.filemodes import make_private_dirs
from mailsrv.fileops import fsync_directory, write_all
from mailsrv.jsonstore.spares import SparePool
from mailsrv.threads import RunInThread

__all__ = ["RunInThread", "Spool", "SpoolFile"]  # RunInThread: its old home, for importers

_CHUNK = 256 * 1024
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_HIGH_WATER = 2 * 1024 * 1024
_COPY_FALLBACK = frozenset((errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP))

_log = Logger()


class Spool:
    """The ``incoming`` directory where bodies land before delivery."""

    def __init__(
        self, root: Path, run_in_thread: RunInThread, spares: SparePool | None = None
    ) -> None:
        self.incoming = root / "incoming"
        self._run = run_in_thread
        self.spares = spares

    def prepare(self) -> int:
        """Create the directory (``0700``, with its parents) and remove bodies never
        acknowledged (blocking; at start)."""
        make_private_dirs(self.incoming)
        stale = 0
        for leftover in self.incoming.iterdir():
            leftover.unlink()
            stale += 1
        fsync_directory(self.incoming)
        return stale

    def open(
        self, queue_id: str, pause: Callable[[], None], resume: Callable[[], None]
    ) -> SpoolFile:
        """A new spool file for ``queue_id``."""
        return SpoolFile(self.incoming / queue_id, self._run, pause, resume, self.spares)


class SpoolFile:
    """One message body being written; see the module docstring."""

    def __init__(
        self,
        path: Path,
        run_in_thread: RunInThread,
        pause: Callable[[], None],
        resume: Callable[[], None],
        spares: SparePool | None = None,
    ) -> None:
        self.path = path
        self._spares = spares
        self._reused = False  # a spare: cut to what was written when it is finished
        self._run = run_in_thread
        self._pause = pause
        self._resume = resume
        self._memory: list[bytes] = []
        self._memory_size = 0
        self.size = 0
        self._flushed = 0  # bytes handed to the disk writes so far
        self._in_flight = 0
        self._paused = False
        self._fd: int | None = None
        self._tail: Deferred[None] = succeed(None)
        self._failure: BaseException | None = None

    def write(self, data: bytes) -> None:
        """Add content; it reaches the disk in order, in the background."""
        self.size += len(data)
        self._memory.append(data)
        self._memory_size += len(data)
        if self._memory_size >= _CHUNK:
            self._flush_memory()

    def _flush_memory(self) -> None:
        chunk = b"".join(self._memory)
        self._memory.clear()
        self._memory_size = 0
        self._flushed += len(chunk)
        self._in_flight += len(chunk)
        if self._in_flight > _HIGH_WATER and not self._paused:
            self._paused = True
            self._pause()
        self._tail.addCallback(lambda _: self._run(self._write_blocking, chunk))
        self._tail.addCallbacks(
            self._written,
            self._write_failed,
            callbackArgs=(len(chunk),),
            errbackArgs=(len(chunk),),
        )

    def _write_blocking(self, chunk: bytes) -> None:
        if self._failure is not None:
            return
        write_all(self._open_blocking(), chunk)

    def _written(self, _: object, size: int) -> None:
        self._in_flight -= size
        if self._paused and self._in_flight <= _HIGH_WATER // 2:
            self._paused = False
            self._resume()

    def _write_failed(self, failure: Any, size: int) -> None:
        # Later chunks are skipped in the thread (see _write_blocking); close() reports this.
        self._failure = failure.value
        self._written(None, size)

    def read(self) -> Deferred[bytes]:
        """The whole content written so far (once the writes in flight are done).

        A message still all in memory is given at once; else the file is read in the I/O
        thread.  For a message that is complete: the checks of :mod:`mailsrv.mailauth`.
        """
        rest = b"".join(self._memory)
        if not self._flushed:
            return succeed(rest)
        result: Deferred[bytes] = Deferred()

        def read_file(_: object) -> Deferred[bytes]:
            if self._failure is not None:
                raise self._failure
            return self._run(self._read_blocking, rest)

        self._tail.addCallback(read_file)
        self._tail.addCallbacks(result.callback, result.errback)
        return result

    def _read_blocking(self, rest: bytes) -> bytes:
        with open(self.path, "rb") as f:
            return f.read() + rest

    def insert(self, offset: int, data: bytes) -> None:
        """Insert ``data`` at byte ``offset`` of the content (a header after the first line).

        In memory while nothing has reached the disk; else, in order with the writes, the file
        is rewritten with ``data`` in place (a new file renamed over it).  A failure shows when
        the file is detached or closed, as a failed write does.
        """
        self.size += len(data)
        if offset >= self._flushed:
            content = b"".join(self._memory)
            at = offset - self._flushed
            self._memory = [content[:at], data, content[at:]]
            self._memory_size += len(data)
            return
        on_disk = self._flushed
        self._flushed += len(data)

        def rewrite(_: object) -> Deferred[None] | None:
            if self._failure is not None:
                return None
            return self._run(self._insert_blocking, offset, data, on_disk)

        self._tail.addCallback(rewrite)
        self._tail.addErrback(self._remember_failure)

    def _remember_failure(self, failure: Any) -> None:
        self._failure = failure.value

    def _insert_blocking(self, offset: int, data: bytes, on_disk: int) -> None:
        temporary = self.path.with_name(self.path.name + ".insert")
        source = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(temporary, _CREATE_FLAGS, 0o600)
            try:
                _copy(source, target, offset)
                write_all(target, data)
                _copy(source, target, on_disk - offset)
                os.rename(temporary, self.path)
            except BaseException:
                os.close(target)
                temporary.unlink(missing_ok=True)
                raise
        finally:
            os.close(source)
        self._close_fd()
        self._fd = target  # at its end: what is written next is appended

    def close(self) -> Deferred[Path]:
        """Write what is left, fsync and close; fires with the path of the complete file.

        The one-message form; the server hands files to the committer (:meth:`detach`).
        """
        rest = b"".join(self._memory)
        self._memory.clear()
        self._memory_size = 0
        result: Deferred[Path] = Deferred()

        def finish(_: object) -> Deferred[Any]:
            if self._failure is not None:
                raise self._failure
            return self._run(self._close_blocking, rest)

        self._tail.addCallback(finish)
        self._tail.addCallbacks(result.callback, result.errback)
        return result

    def _close_blocking(self, rest: bytes) -> Path:
        fd = self._open_blocking()
        try:
            write_all(fd, rest)
            self._cut(fd)
            os.fsync(fd)
        finally:
            self._close_fd()
        return self.path

    def detach(self) -> Deferred[bytes]:
        """Hand the file over for a group commit: fires, once the writes in flight are done,
        with the content not yet written, for :meth:`finish_blocking` in the committer."""
        rest = b"".join(self._memory)
        self._memory.clear()
        self._memory_size = 0
        result: Deferred[bytes] = Deferred()

        def handover(_: object) -> None:
            if self._failure is not None:
                raise self._failure
            result.callback(rest)

        self._tail.addCallback(handover)
        self._tail.addErrback(result.errback)
        return result

    def finish_blocking(self, rest: bytes) -> None:
        """Write ``rest`` and close, without fsync (the committer syncs whole batches)."""
        fd = self._open_blocking()
        try:
            write_all(fd, rest)
            self._cut(fd)
        finally:
            self._close_fd()

    def _open_blocking(self) -> int:
        if self._fd is None:
            reused = self._spares.open_for_write(self.path) if self._spares else None
            self._reused = reused is not None
            self._fd = reused if reused is not None else os.open(self.path, _CREATE_FLAGS, 0o600)
        return self._fd

    def _cut(self, fd: int) -> None:
        """A reused file ends where the writing ended (spares are empty: a safeguard)."""
        if self._reused:
            os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR))

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def discard(self) -> None:
        """Abandon the message: close and remove whatever was written (in the background)."""
        self._memory.clear()

        def remove(_: object) -> Deferred[Any]:
            return self._run(self._discard_blocking)

        self._tail.addBoth(remove)
        self._tail.addErrback(lambda f: _log.failure("could not remove spool file", f))

    def _discard_blocking(self) -> None:
        self._close_fd()
        if self._spares is not None and self._spares.keep_if_alone(self.path):
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _copy(source: int, target: int, count: int) -> None:
    """Copy ``count`` bytes from ``source``'s position to ``target``'s, in the kernel when the
    filesystem allows it."""
    while count > 0:
        try:
            done = os.copy_file_range(source, target, count)
        except OSError as e:
            if e.errno not in _COPY_FALLBACK:
                raise
            break
        if done == 0:
            raise OSError(errno.EIO, "spool file shorter than written")
        count -= done
    while count > 0:
        chunk = os.read(source, min(count, _CHUNK))
        if not chunk:
            raise OSError(errno.EIO, "spool file shorter than written")
        write_all(target, chunk)
        count -= len(chunk)
