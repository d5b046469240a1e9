"""The relay queue as a commit sink: remote recipients are queued in the committer's batch.

The committer calls :meth:`QueueSink.write` between its two filesystem syncs, so a message's
queue record and its body link are durable before its 250, in the same syncs as its Maildir
copies (no sync of its own).  After the 250s, :meth:`QueueSink.committed` hands the new records
to the scheduler in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from zope.interface import implementer

from mailsrv.delivery.envelope import AcceptedMessage
from mailsrv.delivery.sinks import Failures, ICommitSink, StagedMessage
from mailsrv.relay.queue_store import IQueueStore
from mailsrv.relay.records import QueueRecord


@implementer(ICommitSink)
class QueueSink:
    """Stages the remote recipients of each message in ``store``; tells its listeners after."""

    name = "queue"

    def __init__(self, store: IQueueStore) -> None:
        self._store = store
        self._listeners: list[Callable[[list[QueueRecord]], None]] = []

    def listen(self, queued: Callable[[list[QueueRecord]], None]) -> None:
        """Call ``queued`` with the new records of every committed batch (the scheduler)."""
        self._listeners.append(queued)

    def write(self, batch: Sequence[StagedMessage]) -> Failures:
        failures: dict[str, BaseException] = {}
        for staged in batch:
            if not staged.message.remote_recipients:
                continue
            try:
                self._store.stage_blocking(staged.message, staged.body)
            except Exception as e:
                self._store.unstage_blocking(staged.queue_id)
                failures[staged.queue_id] = e
        return failures

    def rollback(self, staged: StagedMessage) -> None:
        if staged.message.remote_recipients:
            self._store.unstage_blocking(staged.queue_id)

    def committed(self, messages: Sequence[AcceptedMessage]) -> None:
        records = [QueueRecord.from_message(m) for m in messages if m.remote_recipients]
        new = [r for r in records if r is not None]
        if new:
            self._store.remember(new)
            for queued in self._listeners:
                queued(new)
