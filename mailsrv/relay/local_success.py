"""Success DSNs for local recipients: ``NOTIFY=SUCCESS`` answered with ``Action: delivered``.

A local recipient's copy is delivered when its message is committed, so the report can go as
soon as the 250 has: :class:`LocalSuccessSink` is a commit sink beside the Maildir one.  In
its ``write`` (the committer thread, between the batch's syncs) it reads the header section of
every message that needs such a report from the staged body, which is gone after the batch;
it never fails a message.  In ``committed`` (the reactor thread, after the 250s) it hands each
message and its headers to the report function,
:meth:`~mailsrv.relay.bounces.DsnSubmitter.delivered`, which composes the DSN in a thread and
commits it as a new message from ``<>``.  Never for a message from ``<>``.

The report itself is not made durable before the 250: a crash between the 250 and the DSN's
own commit loses it (the message is delivered all the same).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from mailsrv.delivery.envelope import AcceptedMessage, LocalRoute, Notify
from mailsrv.delivery.sinks import Failures, ICommitSink, StagedMessage
from mailsrv.relay.queue_store import read_headers

_log = Logger(namespace="mailsrv.relay")

Report = Callable[[AcceptedMessage, bytes], Deferred[None]]
"""Reports the local successes of a committed message, given its header section."""


def wants_local_success(message: AcceptedMessage) -> bool:
    """True when a local recipient of ``message`` asked for ``NOTIFY=SUCCESS`` (and the
    sender is not ``<>``)."""
    return bool(message.sender) and any(
        isinstance(r.route, LocalRoute) and r.dsn.wants(Notify.SUCCESS) for r in message.recipients
    )


@implementer(ICommitSink)
class LocalSuccessSink:
    """Keeps the headers of messages owed a local success DSN until they are committed."""

    name = "local-success"

    def __init__(self) -> None:
        # Filled in the committer thread, emptied in the reactor thread: single dict
        # operations, each atomic.
        self._headers: dict[str, bytes] = {}
        self._report: Report | None = None

    def report_with(self, report: Report) -> None:
        """Send the reports through ``report`` (the DSN submitter, built after the committer)."""
        self._report = report

    def write(self, batch: Sequence[StagedMessage]) -> Failures:
        for staged in batch:
            if not wants_local_success(staged.message):
                continue
            try:
                self._headers[staged.queue_id] = read_headers(staged.body)
            except OSError:
                # The other sinks read the same file and decide the message's fate.
                _log.failure("could not read {queue_id} for its DSN", queue_id=staged.queue_id)
        return {}

    def rollback(self, staged: StagedMessage) -> None:
        self._headers.pop(staged.queue_id, None)

    def committed(self, messages: Sequence[AcceptedMessage]) -> None:
        for message in messages:
            headers = self._headers.pop(message.queue_id, None)
            if headers is None or self._report is None:
                continue
            self._report(message, headers).addErrback(
                lambda failure, queue_id: _log.failure(
                    "success DSN for {queue_id} failed", failure, queue_id=queue_id
                ),
                message.queue_id,
            )
