"""The webhook outbox as a commit sink: message events are written in the committer's batch.

For each message of a batch, :meth:`OutboxSink.write` makes one event per type that applies
(``message.received`` when it has local recipients, ``message.queued`` when it has remote
ones) and one entry of it per endpoint that subscribes to that type, each with a hard link of
the stored message.  That runs between the committer's two filesystem syncs, so the entries are
durable before the 250, in the same syncs as the Maildir copies and queue records (no sync of
their own).  After the 250s, :meth:`OutboxSink.committed` hands the new entries to the
dispatcher in memory.  A message no endpoint wants an event of costs nothing here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from zope.interface import implementer

from mailsrv.delivery.envelope import AcceptedMessage
from mailsrv.delivery.sinks import Failures, ICommitSink, StagedMessage
from mailsrv.webhook.endpoints import MESSAGE_QUEUED, MESSAGE_RECEIVED, Endpoint
from mailsrv.webhook.entries import MessageSource, OutboxEntry, new_entries
from mailsrv.webhook.outbox_store import OutboxStore
from mailsrv.webhook.payload import new_event_id

MaildirPaths = Callable[[StagedMessage], Mapping[str, Path]]
"""The file delivered to each local mailbox of a staged message (the Maildir sink knows)."""


def _no_paths(staged: StagedMessage) -> Mapping[str, Path]:
    return {}


@implementer(ICommitSink)
class OutboxSink:
    """Writes the message events of each batch to ``store`` for ``endpoints``.

    ``write`` and ``rollback`` run in the committer thread, ``committed`` in the reactor thread;
    they share only ``_staged``, keyed by queue id, which each side sets or pops as a whole.
    """

    name = "outbox"

    def __init__(
        self,
        store: OutboxStore | None,
        endpoints: Sequence[Endpoint],
        maildir_paths: MaildirPaths = _no_paths,
    ) -> None:
        self._store = store
        self._endpoints = tuple(endpoints)
        self._maildir_paths = maildir_paths
        self._staged: dict[str, list[OutboxEntry]] = {}
        self._listeners: list[Callable[[list[OutboxEntry]], None]] = []

    def reconfigure(self, endpoints: Sequence[Endpoint]) -> None:
        """A reload: batches written from now on get entries for ``endpoints`` (the tuple is
        replaced whole, so the committer thread sees the old one or the new one)."""
        self._endpoints = tuple(endpoints)

    def listen(self, added: Callable[[list[OutboxEntry]], None]) -> None:
        """Call ``added`` with the new entries of every committed batch (the dispatcher)."""
        self._listeners.append(added)

    def entries_for(self, staged: StagedMessage) -> list[OutboxEntry]:
        """The new entries of one message: per event type that applies, per endpoint."""
        message = staged.message
        types = []
        if any(r.is_local for r in message.recipients):
            types.append(MESSAGE_RECEIVED)
        if message.remote_recipients:
            types.append(MESSAGE_QUEUED)
        entries = []
        for event_type in types:
            wanting = [endpoint for endpoint in self._endpoints if endpoint.wants(event_type)]
            if not wanting:
                continue
            event_id = new_event_id(message.received_at)
            maildir: tuple[tuple[str, str], ...] = ()
            if event_type == MESSAGE_RECEIVED:
                paths = self._maildir_paths(staged)
                maildir = tuple((mailbox, os.fspath(path)) for mailbox, path in paths.items())
            source = MessageSource(message, maildir)
            entries += new_entries(event_id, event_type, message.received_at, source, wanting)
        return entries

    def write(self, batch: Sequence[StagedMessage]) -> Failures:
        failures: dict[str, BaseException] = {}
        if not self._endpoints or self._store is None:
            return failures
        for staged in batch:
            entries = self.entries_for(staged)
            if not entries:
                continue
            written: list[OutboxEntry] = []
            try:
                for entry in entries:
                    written.append(entry)  # it may be half-written if staging fails
                    self._store.stage_blocking(entry, staged.body)
            except Exception as e:
                if isinstance(e, FileExistsError):
                    written.pop()  # not ours to remove
                for entry in written:
                    self._store.unstage_blocking(entry.key)
                failures[staged.queue_id] = e
                continue
            self._staged[staged.queue_id] = entries
        return failures

    def rollback(self, staged: StagedMessage) -> None:
        for entry in self._staged.pop(staged.queue_id, []):
            if self._store is not None:
                self._store.unstage_blocking(entry.key)

    def committed(self, messages: Sequence[AcceptedMessage]) -> None:
        entries = [e for m in messages for e in self._staged.pop(m.queue_id, [])]
        if entries:
            self.hand_over(entries)

    def hand_over(self, entries: list[OutboxEntry]) -> None:
        """Give committed ``entries`` to the listeners (the dispatcher).  With the outbox in
        the queue database, :class:`~mailsrv.webhook.pg_outbox.OutboxPart` writes what
        :meth:`entries_for` makes and calls this; this sink is then not in the committer's
        list."""
        for added in self._listeners:
            added(entries)
