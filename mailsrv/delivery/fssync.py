"""The filesystem sync behind group commit: ``syncfs(2)`` once per filesystem per call."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from pathlib import Path


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
