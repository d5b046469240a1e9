"""The relay queue's storage: :class:`IQueueStore` and the embedded :class:`FileQueueStore`.

Layout of ``<data_dir>/queue/`` (the file store)::

    <id>.json         the record (see mailsrv.relay.records), human-readable JSON
    <id>.eml          the body, a hard link of the spool file (the Maildir form, LF line ends)
    <id>.json.tmp     a record being written; left over only by a crash, removed by load()
    corrupt/          broken records (and their bodies) moved aside by load(), never deleted
    .lock, .edit.lock the locks that keep the server and the CLI apart (mailsrv.relay.queue_lock)
    control.sock      the running server's control socket (mailsrv.relay.control)

How records and bodies are written (staged in the committer's batch with no sync of their own,
then changed from the reactor in group-committed batches of one ``syncfs(2)`` each), recovered
at start and moved aside when broken is :mod:`mailsrv.jsonstore.directory`'s job, shared with the
webhook outbox; this module says what a queue record is called and how it is encoded.  A
message is removed record first, then body, so a crash in between leaves only an orphan body,
which :meth:`~FileQueueStore.load` deletes.  There is one writer: the server while it runs, the
CLI while it holds the lock instead (:mod:`mailsrv.relay.queue_lock`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Interface, implementer

from mailsrv.delivery.envelope import AcceptedMessage
from mailsrv.filemodes import make_private_dirs
from mailsrv.jsonstore.directory import LoadReport as LoadReport
from mailsrv.jsonstore.directory import RecordDirectory, StoreError
from mailsrv.jsonstore.spares import SparePool
from mailsrv.relay.records import QueueRecord, decode, encode, valid_queue_id
from mailsrv.threads import RunInThread

_log = Logger(namespace="mailsrv.relay")

_HEADERS_LIMIT = 256 * 1024

Change = Callable[[QueueRecord], "QueueRecord | None"]
"""A change for :meth:`IQueueStore.modify`: the new record, or None to remove the message."""


class QueueError(StoreError):
    """A queue operation was refused; the message is one line for the operator."""


class NoSuchMessage(QueueError):
    """No queued message has this id (never had, or it left the queue)."""

    def __init__(self, queue_id: str) -> None:
        super().__init__(f"no such message {queue_id}")
        self.queue_id = queue_id


class IQueueStore(Interface):
    """Durable storage of queue records and their bodies (see the module docstring).

    The blocking methods run in the committer's thread; everything else is called from the
    reactor thread and returns a Deferred.  A Deferred from a writing method fires once the
    change is durable.
    """

    def stage_blocking(message: AcceptedMessage, body_path: Path) -> QueueRecord | None:
        """Queue ``message``'s remote recipients with the body at ``body_path`` (blocking).

        No sync: the caller makes the body and record durable with its own filesystem sync.
        Returns the new record, or None (nothing written) if no recipient is remote.
        """

    def unstage_blocking(queue_id: str) -> None:
        """Undo :meth:`stage_blocking` (blocking): remove the record and the body if present."""

    def remember(records: list[QueueRecord]) -> None:
        """The records of a committed batch, durable now (reactor thread, after the
        committer's sync): the store may serve later reads of them from memory."""

    def add(message: AcceptedMessage, body_path: Path) -> Deferred[QueueRecord]:
        """Queue a message durably on its own (e.g. a bounce): stage it and sync it."""

    def load_now() -> list[QueueRecord] | None:
        """Before the reactor runs: recover and return every record (as :meth:`load`, blocking),
        or None for a store that is read once the reactor runs (the scheduler calls ``load``)."""

    def load() -> Deferred[list[QueueRecord]]:
        """At start, before anything else: recover and return every record, oldest first.

        Leftovers of interrupted writes are removed; broken records are moved aside with a log
        line, never fatal.
        """

    def records() -> Deferred[list[QueueRecord]]:
        """Every readable record now, oldest first (no recovery; broken ones are skipped)."""

    def get(queue_id: str) -> Deferred[QueueRecord | None]:
        """The current record ``queue_id`` (including changes still being written), or None."""

    def update(record: QueueRecord) -> Deferred[None]:
        """Replace the stored record of ``record.queue_id``; NoSuchMessage if it is gone."""

    def modify(queue_id: str, change: Change) -> Deferred[QueueRecord | None]:
        """Apply ``change`` to the current record and store the result (or remove the message
        if it returns None); fires with the result.  Changes to one record never overwrite each
        other.  NoSuchMessage if there is no record; an exception from ``change`` is passed on
        and nothing is written."""

    def remove(queue_id: str) -> Deferred[None]:
        """The message left the queue: remove its record, then its body."""

    def body_path(queue_id: str) -> Path:
        """Where the body of ``queue_id`` is (the relay reads it from there)."""


class ISharedQueueStore(IQueueStore):
    """A queue that several nodes deliver (PostgreSQL, :mod:`mailsrv.relay.pg_queue`): each
    node works only on the messages it holds a lease on, and gives back what it is done with
    for now."""

    def holds(queue_id: str) -> bool:
        """True while this node certainly still holds ``queue_id`` (asked right before DATA)."""

    def modify_held(queue_id: str, change: Change, release: bool) -> Deferred[QueueRecord | None]:
        """:meth:`IQueueStore.modify` of a held message; with ``release`` the lease is given
        up in the same write (unless the message is finished)."""

    def release(queue_ids: list[str]) -> Deferred[None]:
        """Give up the leases of ``queue_ids``: nothing of them is in flight on this node."""

    def take_slot(destination: str, limit: int) -> Deferred[str | None]:
        """One of the ``limit`` connection slots to ``destination`` that all nodes share, or
        None when every one is taken; held until :meth:`give_slot` (or this node's leases
        lapse)."""

    def give_slot(slot: str) -> Deferred[None]:
        """The connection of ``slot`` is closed."""


@implementer(IQueueStore)
class FileQueueStore(RecordDirectory[QueueRecord]):
    """The queue as files under ``root`` (see the module docstring and
    :mod:`mailsrv.jsonstore.directory`, which does the work)."""

    what = "queue record"
    bodies_what = "queue bodies"
    orphan_note = "messages already sent or never acknowledged"
    cache_records = True  # the scheduler holds every unfinished record in memory anyway

    def __init__(
        self,
        root: Path,
        run_in_thread: RunInThread,
        sync: Callable[[], None] | None = None,
        body_spares: SparePool | None = None,
    ) -> None:
        super().__init__(root, run_in_thread, sync, _log, body_spares)

    # -- how records are stored -----------------------------------------------------------------

    def encode(self, record: QueueRecord) -> bytes:
        return encode(record)

    def decode(self, data: bytes, key: str) -> QueueRecord:
        return decode(data, key)

    def key_of(self, record: QueueRecord) -> str:
        return record.queue_id

    def valid_key(self, key: str) -> bool:
        return valid_queue_id(key)

    def sort_key(self, record: QueueRecord) -> tuple[float, str]:
        return (record.created_at, record.queue_id)

    def invalid_key(self, key: str) -> Exception:
        return QueueError(f"invalid queue id {key!r}")

    def missing(self, key: str) -> Exception:
        return NoSuchMessage(key)

    def loaded_line(self, records: list[QueueRecord]) -> None:
        _log.info("queue loaded: {count} message(s)", count=len(records))

    # -- the committer's thread -----------------------------------------------------------------

    def stage_blocking(self, message: AcceptedMessage, body_path: Path) -> QueueRecord | None:
        record = QueueRecord.from_message(message)
        if record is not None:
            self.stage_record_blocking(record, body_path)
        return record

    # -- from the reactor -----------------------------------------------------------------------

    def add(self, message: AcceptedMessage, body_path: Path) -> Deferred[QueueRecord]:
        def stage() -> QueueRecord:
            make_private_dirs(self.root)
            record = QueueRecord.from_message(message)
            if record is None:
                raise ValueError(f"{message.queue_id} has no remote recipient to queue")
            self.stage_record_blocking(record, body_path, durable=True)
            return record

        def staged(record: QueueRecord) -> QueueRecord:
            self.remember([record])
            return record

        result: Deferred[QueueRecord] = self._run(stage).addCallback(staged)
        return result


def read_headers(path: Path) -> bytes:
    """The header section of the message file ``path`` (up to the first empty line)."""
    with open(path, "rb") as f:
        return headers_of(f.read(_HEADERS_LIMIT))


def headers_of(body: bytes) -> bytes:
    """The header section of a stored message (up to the first empty line)."""
    head = body[:_HEADERS_LIMIT]
    for separator in (b"\n\n", b"\r\n\r\n"):
        end = head.find(separator)
        if end >= 0:
            return head[: end + len(separator) // 2]
    return head
