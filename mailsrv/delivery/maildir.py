"""Durable Maildir delivery: ``<mail dir>/<domain>/<local part>/{tmp,new,cur}``.

A message arrives as a spool file (see :mod:`mailsrv.delivery.spool`), already complete and
fsync'd.  Delivery hard-links it into each recipient's ``new/`` under a unique name (the
Maildir "tmp then new" step, with the spool as tmp), fsyncs every ``new/`` directory touched, and
only then removes the spool file.  A crash at any point leaves either no copy or a whole copy in
``new/``, never a partial one.  The server batches this work across messages: the committer
(:mod:`mailsrv.delivery.committer`) syncs, and :class:`MaildirSink` links;
:meth:`MaildirStore.deliver` is the one-message form.  Everything here blocks: call it from a
thread.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from zope.interface import implementer

from mailsrv.delivery.envelope import AcceptedMessage
from mailsrv.delivery.sinks import Failures, ICommitSink, StagedMessage
from mailsrv.filemodes import make_private_dirs
from mailsrv.fileops import fsync_directory, link_or_copy

_SUBDIRS = ("tmp", "new", "cur")


def _in_tmp(target: Path) -> Path:
    """Where a copy of ``new/NAME`` is written before its rename: ``tmp/NAME``."""
    return target.parent.parent / "tmp" / target.name


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

    def maildir(self, mailbox: str) -> Path:
        """The Maildir of ``local@domain`` (which config validation made safe as a path)."""
        local, _, domain = mailbox.rpartition("@")
        if not local or local.startswith(".") or "/" in local or "/" in domain:
            raise ValueError(f"unsafe mailbox name {mailbox!r}")
        return self.root / domain / local

    def unique_name(self, now: float, size: int) -> str:
        """A Maildir-unique file name: time, microseconds, pid, counter, host, size.

        The microseconds are zero-padded to six digits, so names sort in arrival order.
        """
        seconds = int(now)
        micros = int((now - seconds) * 1_000_000)
        count = next(self._counter)
        return f"{seconds}.M{micros:06d}P{self._pid}Q{count}.{self._host},S={size}"

    def ensure(self, maildir: Path) -> None:
        """Create whatever is missing of ``tmp``, ``new`` and ``cur`` (``0700``), durably.

        Nothing is remembered: a Maildir removed while the server runs is made again the next
        time a link into it fails (see :meth:`link`).
        """
        created = []
        for sub in _SUBDIRS:
            created.extend(make_private_dirs(maildir / sub))
        for path in {p.parent for p in created}:
            fsync_directory(path)

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
        """Link ``spool_file`` into every mailbox's ``new/`` under unique names (no syncs).

        All or nothing: when one mailbox fails, the links already made are removed before the
        error is raised, so the client's retry cannot leave a second copy anywhere.
        """
        if size is None:
            size = spool_file.stat().st_size
        delivered: list[Path] = []
        try:
            for mailbox in dict.fromkeys(mailboxes):
                maildir = self.maildir(mailbox)
                target = maildir / "new" / self.unique_name(now, size)
                try:
                    link_or_copy(spool_file, target, _in_tmp)
                except FileNotFoundError:
                    if not spool_file.exists():
                        raise
                    self.ensure(maildir)  # first delivery, or the Maildir was removed
                    link_or_copy(spool_file, target, _in_tmp)
                delivered.append(target)
        except BaseException:
            self.remove(delivered)
            raise
        return delivered

    def remove(self, delivered: Iterable[Path]) -> None:
        """Remove delivered copies (undoing :meth:`link`; the caller syncs)."""
        for path in delivered:
            try:
                path.unlink()
            except FileNotFoundError:
                pass


@implementer(ICommitSink)
class MaildirSink:
    """The committer's Maildir sink: links each message into its local recipients' ``new/``.

    A message with no local recipient is skipped.  :meth:`rollback` removes the links the
    last :meth:`write` made for a message (the committer calls it before its next write).
    """

    name = "maildir"

    def __init__(self, store: MaildirStore) -> None:
        self.store = store
        self._linked: dict[str, list[Path]] = {}

    def write(self, batch: Sequence[StagedMessage]) -> Failures:
        """Link every message of ``batch``; a failed message keeps no link (see ``link``)."""
        self._linked = {}
        failures: dict[str, BaseException] = {}
        for staged in batch:
            message = staged.message
            mailboxes = message.local_mailboxes
            if not mailboxes:
                continue
            try:
                self._linked[staged.queue_id] = self.store.link(
                    staged.body, mailboxes, message.received_at, message.size
                )
            except Exception as e:
                failures[staged.queue_id] = e
        return failures

    def delivered(self, staged: StagedMessage) -> dict[str, Path]:
        """The copy the last write made for each local mailbox of ``staged`` (committer thread:
        for a later sink of the same batch, e.g. the webhook outbox's payload paths)."""
        paths = self._linked.get(staged.queue_id, [])
        return dict(zip(dict.fromkeys(staged.message.local_mailboxes), paths, strict=False))

    def rollback(self, staged: StagedMessage) -> None:
        """Remove the links made for ``staged`` by the last write."""
        self.store.remove(self._linked.pop(staged.queue_id, []))

    def committed(self, messages: Sequence[AcceptedMessage]) -> None:
        """Nothing to hand on: a Maildir copy is already delivered."""
