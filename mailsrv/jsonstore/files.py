"""Small blocking file operations shared by the record stores: whole writes, fsync, hard links."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from mailsrv.filemodes import PRIVATE_FILE

TMP_SUFFIX = ".tmp"
"""What a file being written is called until it is renamed over its real name."""

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_temporary(path: Path, data: bytes, durable: bool) -> Path:
    """Write ``data`` to ``path`` + ``.tmp`` (``0600``, fsync'd if ``durable``); returns that name.

    The caller renames it over ``path`` (:func:`os.replace`), so readers see the old content
    or the new one, never a part.
    """
    temporary = path.with_name(path.name + TMP_SUFFIX)
    fd = os.open(temporary, _CREATE, PRIVATE_FILE)
    try:
        write_all(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    return temporary


def fsync_file(path: Path) -> None:
    """Make the content of the file ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target``; across filesystems copy (with fsync) and rename."""
    try:
        os.link(source, target)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        temporary = target.with_name(target.name + TMP_SUFFIX)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE)
        with open(source, "rb") as src, open(fd, "wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        os.rename(temporary, target)


def unlink_if_present(path: Path) -> bool:
    """Remove ``path``; False if it was not there."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
