"""Finished record files kept for reuse, so a record store does not free and allocate an inode
for every record it writes.

Every record write is a new file renamed over the old one, and every finished record (an event
delivered, a message sent) is removed: without reuse, each costs one inode allocated and one
freed.  Freeing inodes at the rate mail arrives is what makes file creation expensive on ext4:
without a journal its allocator passes over every inode freed in the last 30 seconds
(``recently_deleted`` in ``fs/ext4/ialloc.c``), reading each one's inode-table block, so the
cost of creating a file grows with the recent deletion rate; with a journal, each allocation
and each free is a bitmap, group-descriptor and inode-table update in the journal.  Measured on
the development machine (ext4 without a journal) during workload (g): creating a spool file took
1.6 ms of the committer's time per message while the outbox freed one inode per delivered event,
0.4 ms when it freed none.

So a record that is removed is renamed into ``spare/`` instead (up to ``limit`` files), and the
version a write replaces is linked there before the rename over it; a new temporary file is a
spare renamed to its name and overwritten.  A rename or a link changes directory entries only.

A spare holds a finished record's old content until it is overwritten.  That is safe because
every store checks that a record's own key matches its file name when it reads one
(:meth:`~mailsrv.jsonstore.directory.RecordDirectory.decode`), and every write either syncs the
new content before the rename (group-committed writes) or happens before the message is
acknowledged (the committer's staging): a crash that left a reused file's old content under a
new name makes a record that is refused as broken and moved aside, never one that is believed.
A spare still linked to a live record (a crash between the link and the rename) is never
written: :meth:`SparePool.open_for_write` checks the link count first.
"""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path

from mailsrv.filemodes import make_private_dirs

SPARE_DIR = "spare"
DEFAULT_LIMIT = 4096
"""How many spare files a store keeps at most (each holds one small record's blocks)."""


class SparePool:
    """The spare files of one record directory, ``<root>/spare/`` (see the module docstring).

    Thread-safe: the committer's thread and the I/O threads use it at once.  Blocking.
    """

    def __init__(self, root: Path, limit: int = DEFAULT_LIMIT) -> None:
        self.directory = root / SPARE_DIR
        self.limit = limit
        self._lock = threading.Lock()
        self._names: list[str] = []
        self._numbers = itertools.count()
        self._ready = False

    def _prepare(self) -> None:
        """Under the lock: know the spares on disk (once)."""
        if self._ready:
            return
        make_private_dirs(self.directory)
        names = [name for name in os.listdir(self.directory) if name.isdigit()]
        self._names = names[: self.limit]
        for extra in names[self.limit :]:
            _unlink(self.directory / extra)
        highest = max((int(name) for name in names), default=-1)
        self._numbers = itertools.count(highest + 1)
        self._ready = True

    def __len__(self) -> int:
        with self._lock:
            self._prepare()
            return len(self._names)

    def _new_name(self) -> str | None:
        """Under the lock: a free spare name, or None when the pool is full."""
        self._prepare()
        if len(self._names) >= self.limit:
            return None
        return str(next(self._numbers))

    def keep(self, path: Path) -> bool:
        """Move the finished file ``path`` into the pool (instead of removing it).

        False if ``path`` is not there (nothing was done); a full pool removes it.
        """
        with self._lock:
            name = self._new_name()
            if name is not None:
                try:
                    os.rename(path, self.directory / name)
                except FileNotFoundError:
                    return False
                self._names.append(name)
                return True
        return _unlink(path)

    def keep_link(self, path: Path) -> None:
        """Link the file at ``path`` (about to be replaced by a rename) into the pool, so the
        inode the rename would free is kept.  Best effort: a full pool or a failure keeps
        nothing."""
        with self._lock:
            name = self._new_name()
            if name is None:
                return
            try:
                os.link(path, self.directory / name)
            except OSError:
                return
            self._names.append(name)

    def open_for_write(self, target: Path) -> int | None:
        """A spare renamed to ``target``, opened for writing (the caller overwrites it and
        truncates it to its new length); None when the pool has none that can be used."""
        while True:
            with self._lock:
                self._prepare()
                if not self._names:
                    return None
                name = self._names.pop()
            spare = self.directory / name
            try:
                fd = os.open(spare, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue  # gone or not a file: try the next
            try:
                if os.fstat(fd).st_nlink != 1:  # still a live record's other name
                    os.close(fd)
                    _unlink(spare)
                    continue
                os.rename(spare, target)
            except OSError:
                os.close(fd)
                continue
            return fd


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
