"""Finished files kept for reuse, so the stores do not free and allocate an inode for every
record and message they write.

Every record write is a new file renamed over the old one, every finished record (an event
delivered, a message sent) is removed, and every message body that leaves the last store
holding it is removed: without reuse, each costs one inode allocated and one freed.  Freeing
inodes at the rate mail arrives is what makes file creation expensive on ext4: without a
journal its allocator passes over every inode freed in the last 30 seconds
(``recently_deleted`` in ``fs/ext4/ialloc.c``), reading each one's inode-table block, so the
cost of creating a file grows with the recent deletion rate; with a journal, each allocation
and each free is a bitmap, group-descriptor and inode-table update in the journal.  Measured on
the development machine (ext4 without a journal) during workload (g): creating a spool file took
1.6 ms of the committer's time per message while the outbox freed one inode per delivered event,
0.4 ms when it freed none.

So a finished file is renamed into the pool's ``spare/`` directory (up to ``limit`` files), and
the version a record write replaces is linked there before the rename over it.  A new file is
the oldest spare, renamed to its name, overwritten and cut to its new length.

**Readers never see a reused file change.**  A reader (the CLI, a backup) may have opened a
record just before it was replaced or removed and read it a moment later; it must see that
version whole.  So a spare is reused only ``quarantine`` seconds (2) after it was kept, long
after any such read.  Bodies, which no reader opens once their record is gone, are emptied when
kept (``empty_on_keep``: nothing of a relayed message stays readable, and the pool holds no disk
space); records keep their old content until reused (a few kilobytes each, private files).

**Reuse never makes a record believed that was not written.**  Every store checks that a
record's own key matches its file name when it reads one
(:meth:`~mailsrv.jsonstore.directory.RecordDirectory.decode`), and every write either syncs the
new content before the rename (group-committed writes) or happens before the message is
acknowledged (the committer's staging): a crash that left a spare's old content (or nothing)
under a new name makes a record that is refused as broken and moved aside.  A spare still
linked to a live record (a crash between the link and the rename) is never written or emptied:
the link count is checked first.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from mailsrv.filemodes import make_private_dirs
from mailsrv.fileops import unlink_if_present

SPARE_DIR = "spare"
DEFAULT_LIMIT = 4096
"""How many spare files a store keeps at most."""
DEFAULT_QUARANTINE = 2.0
"""How long after it was kept a spare may be reused (seconds): far longer than a reader takes
between opening a small record and reading it, short enough that at 2,000 messages a second the
spares waiting out their quarantine fit in the pool."""


class SparePool:
    """The spare files of one directory, ``<root>/spare/`` (see the module docstring).

    Thread-safe: the committer's thread and the I/O threads use it at once.  Blocking.  Time is
    ``clock``'s (monotonic seconds).
    """

    def __init__(
        self,
        root: Path,
        limit: int = DEFAULT_LIMIT,
        empty_on_keep: bool = False,
        quarantine: float = DEFAULT_QUARANTINE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = root / SPARE_DIR
        self.limit = limit
        self.empty_on_keep = empty_on_keep
        self.quarantine = quarantine
        self._clock = clock
        self._lock = threading.Lock()
        self._spares: deque[tuple[float, str]] = deque()  # (kept at, name), oldest first
        self._numbers = itertools.count()
        self._ready = False

    def _prepare(self) -> None:
        """Under the lock: know the spares on disk (once; reusable at once: no reader of
        theirs outlived the process that kept them by long)."""
        if self._ready:
            return
        make_private_dirs(self.directory)
        names = sorted((n for n in os.listdir(self.directory) if n.isdigit()), key=int)
        kept, extra = names[: self.limit], names[self.limit :]
        for name in extra:
            unlink_if_present(self.directory / name)
        self._spares = deque((float("-inf"), name) for name in kept)
        highest = max((int(name) for name in names), default=-1)
        self._numbers = itertools.count(highest + 1)
        self._ready = True

    def __len__(self) -> int:
        with self._lock:
            self._prepare()
            return len(self._spares)

    def _new_name(self) -> str | None:
        """Under the lock: a free spare name, or None when the pool is full."""
        self._prepare()
        if len(self._spares) >= self.limit:
            return None
        return str(next(self._numbers))

    def keep(self, path: Path) -> bool:
        """Move the finished file ``path`` into the pool instead of removing it.

        False if ``path`` is not there (nothing was done); a full pool removes it.
        """
        with self._lock:
            name = self._new_name()
            if name is not None:
                try:
                    os.rename(path, self.directory / name)
                except FileNotFoundError:
                    return False
                self._spares.append((self._clock(), name))
        if name is None:
            return unlink_if_present(path)
        if self.empty_on_keep:
            self._empty(name)
        return True

    def keep_if_alone(self, path: Path) -> bool:
        """Keep ``path`` as :meth:`keep` does if it is the file's only name (a message body no
        other store or mailbox holds); False (nothing done) otherwise, or if it is not there."""
        try:
            if os.stat(path, follow_symlinks=False).st_nlink != 1:
                return False
        except FileNotFoundError:
            return False
        return self.keep(path)

    def keep_link(self, path: Path) -> None:
        """Link the file at ``path``, about to be replaced by a rename, into the pool, so the
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
            self._spares.append((self._clock(), name))

    def _empty(self, name: str) -> None:
        """Free the data blocks of spare ``name`` unless it is still another file's name (then
        it is only left for :meth:`open_for_write` to drop)."""
        try:
            fd = os.open(self.directory / name, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            if os.fstat(fd).st_nlink == 1:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)

    def open_for_write(self, target: Path) -> int | None:
        """The oldest spare past its quarantine, renamed to ``target`` and opened for writing
        (the caller overwrites it and cuts it to its new length); None when there is none."""
        while True:
            with self._lock:
                self._prepare()
                if not self._spares or self._clock() - self._spares[0][0] < self.quarantine:
                    return None
                _, name = self._spares.popleft()
            spare = self.directory / name
            try:
                fd = os.open(spare, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue  # gone or not a file: try the next
            try:
                if os.fstat(fd).st_nlink != 1:  # still a live record's other name
                    os.close(fd)
                    unlink_if_present(spare)
                    continue
                os.rename(spare, target)
            except OSError:
                os.close(fd)
                continue
            return fd
