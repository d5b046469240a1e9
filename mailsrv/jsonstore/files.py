"""Atomic record writes for the record stores: a temporary file, then a rename (the primitives
are :mod:`mailsrv.fileops`)."""

from __future__ import annotations

import os
from pathlib import Path

from mailsrv.filemodes import PRIVATE_FILE
from mailsrv.fileops import write_all
from mailsrv.jsonstore.spares import SparePool

TMP_SUFFIX = ".tmp"
"""What a file being written is called until it is renamed over its real name."""

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC


def write_temporary(
    path: Path, data: bytes, durable: bool, spares: SparePool | None = None
) -> Path:
    """Write ``data`` to ``path`` + ``.tmp`` (``0600``, fsync'd if ``durable``); returns that name.

    The caller renames it over ``path`` (:func:`os.replace`), so readers see the old content
    or the new one, never a part.  With ``spares``, the file is a spare from that pool when it
    has one (overwritten, then cut to the new length), else a new file.
    """
    temporary = path.with_name(path.name + TMP_SUFFIX)
    fd = spares.open_for_write(temporary) if spares is not None else None
    reused = fd is not None
    if fd is None:
        fd = os.open(temporary, _CREATE, PRIVATE_FILE)
    try:
        write_all(fd, data)
        if reused:
            os.ftruncate(fd, len(data))
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    return temporary
