"""The webhook outbox on disk: one JSON file per (event, endpoint), with the message beside it.

Layout of ``<data_dir>/outbox/``::

    <event id>.<endpoint>.json        an entry (see mailsrv.webhook.entries), readable JSON
    <event id>.<endpoint>.eml         for a message event: a hard link of the
                                      stored message, what its payload is built from
    <event id>.<endpoint>.json.tmp    an entry being written; left over only by a crash
    corrupt/                          broken entries moved aside at start, never deleted
    endpoints/<name>.json             an endpoint disabled by a 410 (mailsrv.webhook.endpoint_state)

The writing, the recovery at start and the moving aside are
:class:`~mailsrv.jsonstore.directory.RecordDirectory`'s, as for the relay queue: message events
are staged in the committer's batch, between its two syncs, so an accepted message's entries are
durable before its 250 with no sync of their own; every later change (an attempt's outcome, a
relay outcome event, a redrive) is group-committed from the reactor.  The body is a hard link
of the spool file, so the message stays stored once however many endpoints and event types
need it, and is independent of what a mail client later does in the Maildir or the relay
queue does with its copy; it goes with the entry, when the event is delivered (then both are
discarded with no sync of their own: a removal undone by a crash only sends the event again,
with its id).  The server's hold on the queue
(:mod:`mailsrv.relay.queue_lock`) keeps ``mailsrv webhooks`` from writing here while it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from mailsrv.jsonstore.directory import RecordDirectory, StoreError
from mailsrv.jsonstore.spares import SparePool
from mailsrv.threads import RunInThread
from mailsrv.webhook.entries import EntryState, OutboxEntry, decode, encode, valid_key

_log = Logger(namespace="mailsrv.webhook")


class OutboxError(StoreError):
    """An outbox operation was refused; the message is one line for the operator."""


class NoSuchEntry(OutboxError):
    """No outbox entry (or event) has this id."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no such webhook event {key}")
        self.key = key


class Outbox(Protocol):
    """What the dispatcher, the relay events and the operator's actions use of an outbox: the
    files here, or the queue database's (:mod:`mailsrv.webhook.pg_outbox`)."""

    shared: bool
    """True when other nodes send from the same outbox: a node sends only what it holds."""

    def holds(self, key: str) -> bool:
        """True while this node may send entry ``key``."""

    def release(self, keys: Sequence[str]) -> Deferred[None]:
        """This node gives up ``keys`` (it will not send them now)."""

    def records(self) -> Deferred[list[OutboxEntry]]:
        """Every entry, oldest first."""

    def get(self, key: str) -> Deferred[OutboxEntry | None]:
        """The entry ``key``, if there is one."""

    def leases(self) -> Deferred[dict[str, tuple[str, float]]]:
        """The node holding each entry being worked on, and until when (shared outboxes)."""

    def update(self, record: OutboxEntry) -> Deferred[None]:
        """Store the entry's new state."""

    def put(self, record: OutboxEntry) -> Deferred[None]:
        """Store a new entry."""

    def discard(self, key: str) -> Deferred[None]:
        """Forget a delivered entry."""

    def modify(
        self, key: str, change: Callable[[OutboxEntry], OutboxEntry | None]
    ) -> Deferred[OutboxEntry | None]:
        """An operator's change of an entry."""

    def body_path(self, key: str) -> Path:
        """The message file a message event's entry is built from."""

    def sort_key(self, record: OutboxEntry) -> tuple[float, str]:
        """The order entries are listed in."""


class OutboxStore(RecordDirectory[OutboxEntry]):
    """The outbox as files under ``root`` (see the module docstring)."""

    shared = False
    """This node's own outbox: it sends everything in it."""

    what = "outbox entry"
    bodies_what = "outbox message links"
    orphan_note = "events already delivered or never acknowledged"

    def __init__(
        self,
        root: Path,
        run_in_thread: RunInThread,
        sync: Callable[[], None] | None = None,
        body_spares: SparePool | None = None,
    ) -> None:
        super().__init__(root, run_in_thread, sync, _log, body_spares)

    def encode(self, record: OutboxEntry) -> bytes:
        return encode(record)

    def decode(self, data: bytes, key: str) -> OutboxEntry:
        return decode(data, key)

    def key_of(self, record: OutboxEntry) -> str:
        return record.key

    def valid_key(self, key: str) -> bool:
        return valid_key(key)

    def sort_key(self, record: OutboxEntry) -> tuple[float, str]:
        return (record.created_at, record.key)

    def needs_body(self, record: OutboxEntry) -> bool:
        return record.keeps_body

    def invalid_key(self, key: str) -> Exception:
        return OutboxError(f"invalid webhook event id {key!r}")

    def missing(self, key: str) -> Exception:
        return NoSuchEntry(key)

    def loaded_line(self, records: list[OutboxEntry]) -> None:
        counts = {state: 0 for state in EntryState}
        for record in records:
            counts[record.state] += 1
        _log.info(
            "webhook outbox loaded: {pending} pending, {dead} dead-lettered, {done} done",
            pending=counts[EntryState.PENDING],
            dead=counts[EntryState.DEAD],
            done=counts[EntryState.DONE],
        )

    def holds(self, key: str) -> bool:
        return True

    def release(self, keys: Sequence[str]) -> Deferred[None]:
        return succeed(None)

    def leases(self) -> Deferred[dict[str, tuple[str, float]]]:
        return succeed({})

    def stage_blocking(self, entry: OutboxEntry, body: Path | None) -> None:
        """Write a new entry with a link of ``body`` (committer thread; no sync)."""
        self.stage_record_blocking(entry, body if entry.keeps_body else None)
