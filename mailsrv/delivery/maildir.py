"""Durable Maildir delivery: ``<mail dir>/<domain>/<local part>/{tmp,new,cur}``.

A message arrives as a spool file (see :mod:`mailsrv.delivery.spool`), already complete and
fsync'd.  Delivery hard-links it into each recipient's ``new/`` under a unique name (the
Maildir "tmp then new" step, with the spool as tmp), fsyncs every ``new/`` directory touched, and
only then removes the spool file.  A crash at any point leaves either no copy or a whole copy in
``new/``, never a partial one.  The server batches this work across messages
(:mod:`mailsrv.delivery.committer`); :meth:`MaildirStore.deliver` is the one-message form.
Everything here blocks: call it from a thread.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

_SUBDIRS = ("tmp", "new", "cur")


def fsync_directory(path: Path) -> None:
    """Make a directory's entries (creations, renames, links) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _host_for_name(hostname: str) -> str:
    """The host part of a Maildir name, with ``/`` and ``:`` escaped as the spec says."""
    return hostname.replace("/", "\\057").replace(":", "\\072")


class MaildirStore:
    """Delivers spool files into per-mailbox Maildirs under ``root``."""

    def __init__(self, root: Path, hostname: str) -> None:
        self.root = root
        self._host = _host_for_name(hostname)
        self._pid = os.getpid()
        self._counter = itertools.count(1)
        self._ready: set[Path] = set()

    def maildir(self, mailbox: str) -> Path:
        """The Maildir of ``local@domain`` (which config validation made safe as a path)."""
        local, _, domain = mailbox.rpartition("@")
        if not local or local.startswith(".") or "/" in local or "/" in domain:
            raise ValueError(f"unsafe mailbox name {mailbox!r}")
        return self.root / domain / local

    def unique_name(self, now: float, size: int) -> str:
        """A Maildir-unique file name: time, microseconds, pid, counter, host, size."""
        seconds = int(now)
        micros = int((now - seconds) * 1_000_000)
        count = next(self._counter)
        return f"{seconds}.M{micros}P{self._pid}Q{count}.{self._host},S={size}"

    def ensure(self, maildir: Path) -> None:
        """Create ``tmp``, ``new`` and ``cur`` durably (once per process per Maildir)."""
        if maildir in self._ready:
            return
        created = []
        for path in (*reversed(maildir.parents), maildir):
            if path.is_relative_to(self.root.parent) and not path.exists():
                path.mkdir(mode=0o700, exist_ok=True)
                created.append(path)
        for sub in _SUBDIRS:
            target = maildir / sub
            if not target.exists():
                target.mkdir(mode=0o700, exist_ok=True)
                created.append(target)
        for path in {p.parent for p in created}:
            fsync_directory(path)
        self._ready.add(maildir)

    def deliver(self, spool_file: Path, mailboxes: Iterable[str], now: float) -> list[Path]:
        """Link ``spool_file`` into every mailbox's ``new/``, fsync, then drop the spool file.

        Returns the delivered paths.  The spool file must already be fsync'd.
        """
        delivered = self.link(spool_file, mailboxes, now)
        for directory in {path.parent for path in delivered}:
            fsync_directory(directory)
        spool_file.unlink()
        return delivered

    def link(
        self, spool_file: Path, mailboxes: Iterable[str], now: float, size: int | None = None
    ) -> list[Path]:
        """Link ``spool_file`` into every mailbox's ``new/`` under unique names (no syncs)."""
        if size is None:
            size = spool_file.stat().st_size
        delivered: list[Path] = []
        for mailbox in dict.fromkeys(mailboxes):
            maildir = self.maildir(mailbox)
            self.ensure(maildir)
            target = maildir / "new" / self.unique_name(now, size)
            _link_or_copy(spool_file, target)
            delivered.append(target)
        return delivered


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target``; across filesystems copy via tmp/ with fsync."""
    try:
        os.link(source, target)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        temporary = target.parent.parent / "tmp" / target.name
        with open(source, "rb") as src, open(temporary, "xb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        os.rename(temporary, target)
