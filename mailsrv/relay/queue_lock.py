"""Who writes the queue: the running server, or ``mailsrv queue`` when no server runs.

Two ``flock(2)`` locks in the queue directory keep them from ever writing at the same time:

* ``.lock`` is held exclusively by the server from start to stop (:meth:`QueueLock.acquire`);
* ``.edit.lock`` is held for a moment by whoever is deciding who writes.

The server at start takes ``.edit.lock`` (waiting while a CLI works on the files), then ``.lock``
without waiting (if that fails, another server uses the directory: the start stops with one
line), then lets ``.edit.lock`` go.  The CLI (:func:`direct_access`) takes ``.edit.lock``, then
tries ``.lock`` without waiting: if it is free no server runs, and the CLI works on the files
itself while holding both (a server starting meanwhile waits for it); if it is held, the CLI lets
``.edit.lock`` go and sends its request to the server's control socket, and the server applies
it in its own reactor.  ``flock`` locks belong to the open file, so a process that dies, even by
SIGKILL, never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mailsrv.filemodes import make_private_dirs

LOCK_NAME = ".lock"
EDIT_LOCK_NAME = ".edit.lock"


class QueueBusy(Exception):
    """Another server holds the queue; the message is one line for the operator."""


def _open(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)


class QueueLock:
    """The server's hold on its queue directory (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True between :meth:`acquire` and :meth:`release`."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the queue for this server (blocking, briefly); QueueBusy if another has it."""
        make_private_dirs(self.root)
        edit = _open(self.root / EDIT_LOCK_NAME)
        try:
            fcntl.flock(edit, fcntl.LOCK_EX)  # a CLI working on the files finishes first
            fd = _open(self.root / LOCK_NAME)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise QueueBusy(
                    f"another mailsrv server is using the queue {self.root} (it holds {LOCK_NAME})"
                ) from None
            self._fd = fd
        finally:
            os.close(edit)

    def release(self) -> None:
        """Let the queue go (the process exiting does the same)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


@contextmanager
def direct_access(root: Path) -> Iterator[bool]:
    """For the CLI: True inside the block if no server runs (work on the files directly, the
    locks are held until the block ends), False if a server runs (use its control socket).

    A queue directory that does not exist yet has no server and nothing to lock: True.
    """
    if not root.is_dir():
        yield True
        return
    edit: int | None = _open(root / EDIT_LOCK_NAME)
    try:
        assert edit is not None
        fcntl.flock(edit, fcntl.LOCK_EX)
        lock = _open(root / LOCK_NAME)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(edit)  # other CLIs need not wait for our talk with the server
                edit = None
                yield False
            else:
                yield True
        finally:
            os.close(lock)
    finally:
        if edit is not None:
            os.close(edit)
