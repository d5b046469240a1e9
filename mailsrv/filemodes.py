"""Files only the server's user may read: mail, the spool and the user database.

Everything mailsrv creates under its data directory is private whatever the umask: directories
``0700``, files ``0600`` (the umask can only take bits away from those).  SQLite gives its
``-wal`` and ``-shm`` files the mode of the database file, so creating that file ``0600`` before
SQLite opens it covers all three.  What already exists is left as it is, but the server warns
at start about anything that group or others may read (:func:`warn_loose_modes`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from twisted.logger import Logger

from mailsrv.config import Config

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
_OTHERS = 0o077

_log = Logger(namespace="mailsrv")


def make_private_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents, each ``0700``; returns those created, outer first.

    The caller fsyncs the parents of what was created when the new names must be durable.
    """
    missing = []
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    created = []
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            continue  # another process or thread made it meanwhile
        created.append(directory)
    if not path.is_dir():
        raise NotADirectoryError(20, "Not a directory", str(path))
    return created


def create_private_file(path: Path) -> bool:
    """Create an empty ``0600`` file at ``path`` unless something is there; True if created."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def loose_modes(paths: Iterable[Path]) -> list[tuple[Path, int]]:
    """The existing ``paths`` that group or others may use, with their permission bits."""
    found = []
    for path in paths:
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            continue
        if mode & _OTHERS:
            found.append((path, mode))
    return found


def private_paths(config: Config) -> list[Path]:
    """What must stay private: the data, spool, mail, queue, outbox and DKIM key directories,
    the SQLite files."""
    paths = [Path(config.data_dir), config.spool_dir, config.spool_dir / "incoming"]
    paths += [config.mail_dir, config.queue_dir, config.outbox_dir, config.dkim_dir]
    if not config.db_url:
        database = config.sqlite_path
        paths.extend(database.with_name(database.name + suffix) for suffix in ("", "-wal", "-shm"))
    return list(dict.fromkeys(paths))


def warn_loose_modes(config: Config) -> int:
    """Log one warning per private path that others may read (at start); returns the count."""
    found = loose_modes(private_paths(config))
    for path, mode in found:
        _log.warn(
            "{path} has mode {mode}: group and others should have no access (chmod go-rwx)",
            path=str(path),
            mode=f"{mode:04o}",
        )
    return len(found)
