"""Small blocking file operations shared by the spool, the Maildir sink and the record stores:
whole writes, fsync of a file or a directory, hard links with a copy across filesystems.

Every function here blocks: call them from the committer's thread or the I/O threads.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from mailsrv.filemodes import PRIVATE_FILE


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Make the content of the file ``path`` durable."""
    _fsync(path, os.O_RDONLY)


def fsync_directory(path: Path) -> None:
    """Make a directory's entries (creations, renames, links, removals) durable."""
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY)


def link_or_copy(source: Path, target: Path, temporary_for: Callable[[Path], Path]) -> None:
    """Hard-link ``source`` to ``target``; across filesystems copy it to ``temporary_for(target)``
    (``0600``, fsync'd) and rename that to ``target``.  A failed copy leaves no temporary behind.

    The temporary's path is asked for only when a copy is needed: building paths costs more
    than the link itself on the commit path.
    """
    try:
        os.link(source, target)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    else:
        return
    temporary = temporary_for(target)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        with open(source, "rb") as src, open(fd, "wb", closefd=False) as dst:
            shutil.copyfileobj(src, dst)
        os.fsync(fd)
        os.rename(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def unlink_if_present(path: Path) -> bool:
    """Remove ``path``; False if it was not there."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
