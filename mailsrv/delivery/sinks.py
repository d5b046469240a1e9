"""The commit seam: what the committer hands every sink, and what a sink promises.

The committer (:mod:`mailsrv.delivery.committer`) makes each batch of accepted messages durable
in one order, whatever the sinks are::

    finish the bodies -> sync -> every sink writes its part -> roll back failed messages -> sync
        -> fire the 250s (reactor thread) -> every sink's committed() hook (reactor thread)

A sink is one destination of an accepted message: the Maildir links of its local recipients
(:class:`~mailsrv.delivery.maildir.MaildirSink`), the relay queue records of its remote
recipients, the webhook outbox entries.  All sinks of a batch share its two syncs, so a sink
never fsyncs: what it writes between them is durable before any 250.

All or nothing, across sinks: when one sink fails a message, every other sink that wrote its
part of that message rolls it back before the second sync, and the client gets a 451.  Its
retry then finds no copy, record or entry left behind anywhere.

A sink that only wraps blocking store methods is a few lines; for a relay queue with
``stage_blocking(message, body_path)`` and ``unstage_blocking(queue_id)``::

    @implementer(ICommitSink)
    class QueueSink:
        name = "queue"

        def __init__(self, queue: FileQueueStore, scheduler: Scheduler) -> None:
            self._queue, self._scheduler = queue, scheduler

        def write(self, batch: Sequence[StagedMessage]) -> Failures:
            failures: dict[str, BaseException] = {}
            for staged in batch:
                if staged.message.remote_recipients:
                    try:
                        self._queue.stage_blocking(staged.message, staged.body)
                    except Exception as e:
                        failures[staged.queue_id] = e
            return failures

        def rollback(self, staged: StagedMessage) -> None:
            if staged.message.remote_recipients:
                self._queue.unstage_blocking(staged.queue_id)

        def committed(self, messages: Sequence[AcceptedMessage]) -> None:
            self._scheduler.add([m for m in messages if m.remote_recipients])

A store that is not on this machine's disk is a sink too: the cluster queue
(:mod:`mailsrv.relay.pg_queue`) writes a batch's rows in one transaction on its own blocking
connection in ``write``, so its COMMIT happens between the two syncs like the other sinks'
writes, and a failed one fails those messages (a 451) with everything else rolled back.  The
webhook outbox's rows join that transaction (the queue sink's ``parts``), so with the cluster
queue the outbox is no sink of its own.

Before a message joins a batch, each :class:`ICommitPreparer` may give the committer a new
version of it, made from its body off the reactor: the DKIM signer
(:mod:`mailsrv.dkim.signer`) adds the signatures its relayed copies carry.  This costs the
batch nothing: a message being prepared waits on its own, and the others commit meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from mailsrv.delivery.envelope import AcceptedMessage


class SinkUnavailable(Exception):
    """A sink's store cannot be reached now (the shared queue's database is down): the message
    gets a 451 and one warning line, not a traceback; the store recovers by itself."""


Failures = Mapping[str, BaseException]
"""What a sink's ``write`` reports: the error of each message it failed, by queue id."""


@dataclass(frozen=True)
class StagedMessage:
    """An accepted message whose body is on disk (synced) at ``body``, not yet committed.

    ``body`` is the spool file, in the canonical stored form (LF line ends, ``Return-Path``
    and ``Received`` first).  It is removed after the batch: a sink that keeps the body makes
    its own name for it (a hard link: the body is stored once).
    """

    message: AcceptedMessage
    body: Path

    @property
    def queue_id(self) -> str:
        """The message's queue id (what :data:`Failures` is keyed by)."""
        return self.message.queue_id


@dataclass(frozen=True)
class PendingBody:
    """A body at the end of DATA, before the committer finishes it: its start is in the spool
    file ``path`` (which does not exist yet when all of it is still in memory) and its end,
    ``rest``, in memory.  The file is not written to while the body is pending."""

    path: Path
    rest: bytes


class ICommitPreparer(Interface):
    """Makes the version of an accepted message that is committed, before it joins a batch."""

    name = Attribute("A short name for logs: 'dkim'.")

    def prepare(message: AcceptedMessage, body: PendingBody) -> Deferred[AcceptedMessage] | None:
        """Reactor thread: None when there is nothing to do for ``message`` (decided at once,
        without blocking), else a Deferred of the message to commit instead; its work runs in
        threads or processes, never on the reactor.  A failure fails the commit (a 451), so a
        preparer that can go without its part returns the message unchanged instead."""


class ICommitSink(Interface):
    """One destination of accepted messages, written inside the committer's batch.

    ``write`` and ``rollback`` block and run in the committer thread, between the batch's two
    syncs; ``committed`` runs in the reactor thread.  None of them fsyncs.
    """

    name = Attribute("A short name for logs: 'maildir', 'queue', 'outbox'.")

    def write(batch: Sequence[StagedMessage]) -> Failures:
        """Write this sink's part of every message in ``batch`` (skipping those it has no part
        in) and report the messages it failed.

        A failed message must leave nothing of this sink's part behind.  Raising fails the
        whole batch; the committer then calls :meth:`rollback` for each of its messages.
        """

    def rollback(staged: StagedMessage) -> None:
        """Undo this sink's part of a message from the batch just written, because another
        sink failed it (or the second sync failed).  Does nothing for a message this sink has
        no part in or did not write."""

    def committed(messages: Sequence[AcceptedMessage]) -> None:
        """Reactor thread, after the 250s of a batch fired: the messages that were committed.

        The place to hand new records to whoever works on them in memory (the relay
        scheduler, the webhook dispatcher); they rebuild from disk at start.  Must not block.
        """
