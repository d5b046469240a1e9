"""What an operator can do to the queue (``mailsrv queue``), and how it changes records.

:class:`IQueueActions` is what the control socket calls.  The relay scheduler implements it
when it runs, so that hold, release and delete also reach the messages it has in memory and
flush wakes it; :class:`StoreActions` is the implementation on the store alone, used by the CLI
when no server runs and by a server without a scheduler.  Both use the pure functions below, so
the rules are the same everywhere:

* ``hold`` puts pending and deferred recipients aside; ``release`` returns held ones to pending
  (never tried) or deferred (tried before, next attempt unchanged).  Doing either twice is no
  error.  A sent or bounced recipient cannot be held, released or deleted.
* ``delete`` drops a message without any bounce (as ``postsuper -d``), or one recipient; a
  message left with no recipient is deleted.
* ``flush`` makes deferred recipients due now (held ones stay held).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

from mailsrv.relay.queue_store import IQueueStore, NoSuchMessage, QueueError, read_headers
from mailsrv.relay.records import QueueRecord, RecipientStatus, State
from mailsrv.threads import RunInThread


class IQueueActions(Interface):
    """The operations of ``mailsrv queue``; each fires with a one-line outcome or QueueError."""

    def list_messages() -> Deferred[list[QueueRecord]]:
        """Every queued message, oldest first."""

    def show(queue_id: str) -> Deferred[tuple[QueueRecord, bytes]]:
        """One message's record and the header section of its body."""

    def flush(queue_id: str | None) -> Deferred[str]:
        """Retry now: one message, or every message when ``queue_id`` is None."""

    def delete(queue_id: str, recipient: str | None) -> Deferred[str]:
        """Delete a message, or one of its recipients, without a bounce."""

    def hold(queue_id: str, recipient: str | None) -> Deferred[str]:
        """Put a message's undelivered recipients (or one of them) on hold."""

    def release(queue_id: str, recipient: str | None) -> Deferred[str]:
        """Release held recipients of a message (or one of them)."""


# --- the rules, as pure functions on records -----------------------------------------------


def _targets(record: QueueRecord, address: str | None, verb: str) -> list[RecipientStatus]:
    if address is None:
        if record.done:
            raise QueueError(f"{record.queue_id} has no recipient left to deliver")
        return list(record.unfinished)
    recipient = record.find(address)
    if recipient is None:
        raise QueueError(f"{record.queue_id} has no recipient {address}")
    if recipient.state.final:
        raise QueueError(
            f"cannot {verb} {recipient.address} of {record.queue_id}: "
            f"already {recipient.state.value}"
        )
    return [recipient]


def hold(record: QueueRecord, address: str | None) -> tuple[QueueRecord, str]:
    """``record`` with the recipients put on hold, and the outcome line."""
    targets = _targets(record, address, "hold")
    changed = [replace(r, state=State.HELD) for r in targets if r.state is not State.HELD]
    if not changed:
        return record, f"{record.queue_id}: already on hold"
    return record.with_recipients(changed), (f"{record.queue_id}: {_count(changed)} put on hold")


def release(record: QueueRecord, address: str | None) -> tuple[QueueRecord, str]:
    """``record`` with its held recipients released, and the outcome line."""
    targets = _targets(record, address, "release")
    changed = [
        replace(r, state=State.DEFERRED if r.attempts else State.PENDING)
        for r in targets
        if r.state is State.HELD
    ]
    if not changed:
        return record, f"{record.queue_id}: nothing on hold"
    return record.with_recipients(changed), f"{record.queue_id}: {_count(changed)} released"


def delete(record: QueueRecord, address: str | None) -> tuple[QueueRecord | None, str]:
    """``record`` without the recipient (None: delete the message), and the outcome line."""
    if address is None:
        return None, f"{record.queue_id}: deleted"
    (target,) = _targets(record, address, "delete")
    left = tuple(r for r in record.recipients if r.address != target.address)
    if not left:
        return None, f"{record.queue_id}: deleted {target.address}, the last recipient"
    return replace(record, recipients=left), f"{record.queue_id}: deleted {target.address}"


def flush(record: QueueRecord, now: float) -> tuple[QueueRecord, int]:
    """``record`` with every deferred recipient due at ``now``, and how many there were."""
    changed = [
        replace(r, next_attempt=now)
        for r in record.recipients
        if r.state is State.DEFERRED and (r.next_attempt is None or r.next_attempt > now)
    ]
    return record.with_recipients(changed), len(changed)


def _count(recipients: list[RecipientStatus]) -> str:
    if len(recipients) == 1:
        return recipients[0].address
    return f"{len(recipients)} recipients"


Rule = Callable[[QueueRecord], tuple["QueueRecord | None", str]]


# --- on the store alone ----------------------------------------------------------------------


class SchedulerHooks(Protocol):
    """What a running scheduler needs to hear of an operator's change (the relay scheduler)."""

    def flush(self, queue_id: str | None = None) -> int:
        """Make deferred recipients due now."""

    def replaced(self, record: QueueRecord | None, queue_id: str) -> None:
        """A record was changed (or, with None, deleted) by an operator."""


@implementer(IQueueActions)
class StoreActions:
    """:class:`IQueueActions` on an :class:`IQueueStore`, telling the running ``scheduler``
    (if any) of every change so that it follows at once."""

    def __init__(
        self,
        store: IQueueStore,
        clock: IReactorTime,
        run_in_thread: RunInThread,
        scheduler: SchedulerHooks | None = None,
    ):
        self._store = store
        self._clock = clock
        self._run = run_in_thread
        self._scheduler = scheduler

    def list_messages(self) -> Deferred[list[QueueRecord]]:
        return self._store.records()

    def show(self, queue_id: str) -> Deferred[tuple[QueueRecord, bytes]]:
        return Deferred.fromCoroutine(self._show(queue_id))

    async def _show(self, queue_id: str) -> tuple[QueueRecord, bytes]:
        record = await self._store.get(queue_id)
        if record is None:
            raise NoSuchMessage(queue_id)
        try:
            headers: bytes = await self._run(read_headers, self._store.body_path(queue_id))
        except FileNotFoundError:
            raise NoSuchMessage(queue_id) from None  # left the queue while we looked
        return record, headers

    def flush(self, queue_id: str | None) -> Deferred[str]:
        return Deferred.fromCoroutine(self._flush(queue_id))

    async def _flush(self, queue_id: str | None) -> str:
        if queue_id is not None:
            due = await self._flush_one(queue_id)
            if self._scheduler is not None:
                self._scheduler.flush(queue_id)
            return f"{queue_id}: {due} deferred recipient(s) due now"
        messages = due = 0
        for record in await self._store.records():
            try:
                count = await self._flush_one(record.queue_id)
            except NoSuchMessage:
                continue  # left the queue meanwhile
            messages += 1 if count else 0
            due += count
        if self._scheduler is not None:
            self._scheduler.flush(None)
        return f"queue flushed: {due} deferred recipient(s) of {messages} message(s) due now"

    async def _flush_one(self, queue_id: str) -> int:
        counted: list[int] = []

        def change(record: QueueRecord) -> QueueRecord:
            new, count = flush(record, self._clock.seconds())
            counted.append(count)
            return new

        await self._store.modify(queue_id, change)
        return counted[-1]

    def delete(self, queue_id: str, recipient: str | None) -> Deferred[str]:
        return self._apply(queue_id, lambda record: delete(record, recipient))

    def hold(self, queue_id: str, recipient: str | None) -> Deferred[str]:
        return self._apply(queue_id, lambda record: hold(record, recipient))

    def release(self, queue_id: str, recipient: str | None) -> Deferred[str]:
        return self._apply(queue_id, lambda record: release(record, recipient))

    def _apply(self, queue_id: str, rule: Rule) -> Deferred[str]:
        outcome: list[str] = []

        def change(record: QueueRecord) -> QueueRecord | None:
            new, line = rule(record)
            outcome.append(line)
            return new

        def changed(record: QueueRecord | None) -> str:
            if self._scheduler is not None:
                self._scheduler.replaced(record, queue_id)
            return outcome[-1]

        done: Deferred[Any] = self._store.modify(queue_id, change)
        return done.addCallback(changed)
