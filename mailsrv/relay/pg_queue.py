"""The relay queue in PostgreSQL (``SMTP_QUEUE_URL``): one queue that several nodes deliver.

The table ``queue_messages`` holds one row per queued message: its record (the same JSON as the
file queue's, :mod:`mailsrv.relay.records`), its body (stored once, ``bytea``), the time its
next waiting recipient is due, and a *lease*: the node working on it and until when.

* **Commit.** The committer's thread writes the rows of every message of a batch with remote
  recipients in one transaction on its own blocking connection (:class:`CommitConnection`),
  between the batch's two filesystem syncs, so the rows are committed before any 250 and
  concurrent messages share one COMMIT (group commit).  A new row is leased to the node that
  accepted it, which starts on it at once; its body stays linked in this node's cache
  (``<data_dir>/queue-cache/``), so the first attempt reads no body back.  The webhook
  outbox's rows of the batch (:mod:`mailsrv.webhook.pg_outbox`) are a :class:`ClusterPart` of
  the same transaction.  When PostgreSQL cannot be reached, the messages that need the queue
  or the outbox get a 451; the others still deliver.
* **Claiming.** :class:`ClusterClaimer` polls (and wakes on ``NOTIFY mailsrv_queue``) for due
  rows whose lease is free or expired, and takes them with ``FOR UPDATE SKIP LOCKED``, so two
  nodes never claim the same row.  The bodies of claimed rows are written to the cache.
* **Leases** are renewed (one statement for all held rows) every third of their length while
  this node holds them.  After each transaction the recipients' new states are written in one
  statement that also checks the lease and, when nothing else of the message is in flight and
  it is not finished, releases it: the row then waits in the table for its next due time, for
  any node.  A node that stops releases its leases; one that dies loses them when they expire.
* **Never twice because of a lease.** Every write checks ``lease_node``; a node that finds its
  lease gone forgets the message (:class:`LeaseLost`).  Right before the body of a transaction
  goes out, the client asks :meth:`ClusterQueueStore.holds`, which is False once the lease, as
  this node last renewed it, is within ``skew`` seconds of its end: a node that was frozen past
  its lease aborts before DATA, because another node may have claimed the message meanwhile.

* **Connections per destination** are counted across nodes: a node takes one of the
  destination's ``relay_destination_concurrency`` slots (table ``queue_slots``, under an
  advisory lock per destination) before it connects and gives it back when the connection
  closes; slots are renewed with the leases, so a dead node's lapse with them.
* **Operators** change rows from any node (:mod:`mailsrv.relay.cluster_admin`); every row has
  a ``version``, and a node writes only over the version it read, reading the row again when
  an operator changed it meanwhile (``NOTIFY changed <id>`` tells it at once).

Times are the nodes' clocks (seconds since the epoch), so the nodes' clocks must agree to well
within ``skew`` (NTP).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psycopg2
import psycopg2.extras
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailsrv.auth.migrations import MigrationSet, apply_postgresql
from mailsrv.delivery.envelope import AcceptedMessage
from mailsrv.delivery.sinks import Failures, ICommitSink, SinkUnavailable, StagedMessage
from mailsrv.fileops import unlink_if_present
from mailsrv.pgsql import Database, LeaseKeeper, Listener, is_connection_error
from mailsrv.relay.queue_store import Change, ISharedQueueStore, NoSuchMessage, QueueError
from mailsrv.relay.records import QueueRecord, RecordError, State, decode, encode
from mailsrv.threads import RunInThread

_log = Logger(namespace="mailsrv.relay")

T = TypeVar("T")

QUEUE_SCHEMA = MigrationSet("mailsrv.relay", "queue_schema_version", 0x6D61696C73727602)
"""The cluster queue's schema (``mailsrv/relay/migrations/postgresql``)."""

_SLOT_LOCK_SPACE = 0x6D736C74  # "mslt": first key of the advisory lock on a destination's slots

CHANNEL = "mailsrv_queue"
"""The ``LISTEN``/``NOTIFY`` channel.  Payloads: ``flush`` (or ``flush <id>``): retry deferred
recipients now; ``changed <id>``: an operator changed a message (the node holding it reads it
again); anything: claim due work now."""

_INSERT = (
    "INSERT INTO queue_messages"
    " (queue_id, record, body, created_at, next_due, lease_node, lease_until) VALUES %s"
)
_CLAIM = """
UPDATE queue_messages m SET lease_node = %(node)s, lease_until = %(until)s
FROM (
    SELECT queue_id FROM queue_messages
    WHERE next_due <= %(now)s
      AND (lease_node IS NULL OR lease_until < %(now)s OR (lease_node = %(node)s AND %(own)s))
    ORDER BY next_due
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
) due
WHERE m.queue_id = due.queue_id
RETURNING m.queue_id, m.record::text, m.body, m.version
"""
_RENEW = (
    "UPDATE queue_messages SET lease_until = %s"
    " WHERE lease_node = %s AND queue_id = ANY(%s) RETURNING queue_id"
)
_WRITE = (
    "UPDATE queue_messages SET record = %s::jsonb, next_due = %s, version = version + 1,"
    " lease_node = CASE WHEN %s THEN NULL ELSE lease_node END,"
    " lease_until = CASE WHEN %s THEN NULL ELSE lease_until END"
    " WHERE queue_id = %s AND lease_node = %s AND version = %s RETURNING version"
)
_DELETE_HELD = (
    "DELETE FROM queue_messages WHERE queue_id = %s AND lease_node = %s AND version = %s"
    " RETURNING version"
)
_READ_HELD = (
    "SELECT record::text, version FROM queue_messages WHERE queue_id = %s AND lease_node = %s"
)
_RELEASE = (
    "UPDATE queue_messages SET lease_node = NULL, lease_until = NULL"
    " WHERE lease_node = %s AND queue_id = ANY(%s)"
)


class BodyReader:
    """Reads each staged body once per batch, however many parts of the batch store it."""

    def __init__(self) -> None:
        self._read: dict[str, bytes] = {}

    def __call__(self, staged: StagedMessage) -> bytes:
        body = self._read.get(staged.queue_id)
        if body is None:
            body = self._read[staged.queue_id] = staged.body.read_bytes()
        return body


@dataclass
class PartRows:
    """A :class:`ClusterPart`'s rows of one batch, made in the committer's thread."""

    queue_ids: set[str]
    """The messages that have rows in this part."""
    failures: dict[str, BaseException]
    """The messages whose rows could not be made (they get a 451)."""
    insert: Callable[[Any, set[str]], None]
    """Run the inserts of the messages named in the set (those being committed) on a cursor."""
    after: Callable[[set[str]], None]
    """After the COMMIT, with the messages committed (the part's caches, what it hands on)."""


class ClusterPart(Protocol):
    """Another store in the queue database whose rows of a batch commit in the queue's one
    transaction (the webhook outbox: :mod:`mailsrv.webhook.pg_outbox`)."""

    def rows(self, batch: Sequence[StagedMessage], read: BodyReader) -> PartRows:
        """The rows of ``batch`` (committer thread, blocking; no statement yet)."""

    def delete(self, cursor: Any, queue_id: str) -> None:
        """Remove what this part wrote for ``queue_id`` (a rollback, in its transaction)."""

    def unstaged(self, queue_id: str) -> None:
        """After that rollback committed: forget ``queue_id`` here."""

    def committed(self, messages: Sequence[AcceptedMessage]) -> None:
        """Reactor thread, after the 250s: hand the new rows to whoever works on them."""


class QueueUnavailable(QueueError, SinkUnavailable):
    """The queue database cannot be reached (now): new messages that need it get a 451."""


class LeaseLost(NoSuchMessage):
    """This node no longer holds the message: its lease ran out and another node may have
    claimed it, or an operator removed it."""


def next_due(record: QueueRecord, now: float) -> float | None:
    """When ``record`` is next worth a node's attention: its earliest waiting recipient (at
    once if one has no time yet), ``now`` when it is finished (its DSNs and removal are still
    to do), None when nothing can be done (every open recipient is held)."""
    times = [
        r.next_attempt if r.next_attempt is not None else now
        for r in record.recipients
        if r.state in (State.PENDING, State.DEFERRED)
    ]
    if times:
        return min(times)
    return now if record.done else None


def open_queue_database(dsn: str, reactor: Any) -> Database:
    """The txpostgres pool of the cluster queue (migrated when opened)."""

    async def migrate(cursor: Any) -> int:
        return await apply_postgresql(cursor, QUEUE_SCHEMA)

    return Database(dsn, reactor, migrate, "the queue database", QueueError, pool_size=4)


class CommitConnection:
    """The committer thread's own blocking connection to the queue database.

    Opened on first use and again after it broke; while PostgreSQL is unreachable, a new
    connection is tried at most every ``retry_after`` seconds and the batches in between fail
    at once (their messages get a 451) instead of each waiting out a connection timeout.
    Every statement is bounded by ``statement_timeout``.
    """

    def __init__(
        self,
        dsn: str,
        clock: IReactorTime,
        statement_timeout: float = 10.0,
        connect_timeout: int = 5,
        retry_after: float = 1.0,
    ) -> None:
        self._dsn = dsn
        self._clock = clock
        self._statement_timeout_ms = max(1, int(statement_timeout * 1000))
        self._connect_timeout = connect_timeout
        self._retry_after = retry_after
        self._connection: Any = None
        self._down_until = 0.0
        self._down_reason = ""
        self._lock = threading.Lock()

    def run(self, work: Callable[[Any], T]) -> T:
        """Run ``work(cursor)`` in one transaction (blocking; COMMIT when it returns)."""
        with self._lock:
            connection = self._connect()
            try:
                with connection, connection.cursor() as cursor:
                    return work(cursor)
            except psycopg2.Error as e:
                if connection.closed or is_connection_error(e):
                    self._drop(str(e))
                    raise QueueUnavailable(
                        f"lost the connection to the queue database: {self._down_reason}"
                    ) from e
                if isinstance(e, psycopg2.OperationalError):  # a statement timeout, say
                    raise QueueUnavailable(f"queue database: {first_line(e)}") from e
                raise

    def _connect(self) -> Any:
        if self._connection is not None and not self._connection.closed:
            return self._connection
        now = self._clock.seconds()
        if now < self._down_until:
            raise QueueUnavailable(f"no connection to the queue database: {self._down_reason}")
        try:
            self._connection = psycopg2.connect(
                self._dsn,
                application_name="mailsrv-committer",
                connect_timeout=self._connect_timeout,
                options=f"-c statement_timeout={self._statement_timeout_ms}",
            )
        except psycopg2.Error as e:
            self._drop(str(e))
            raise QueueUnavailable(
                f"no connection to the queue database: {self._down_reason}"
            ) from e
        return self._connection

    def _drop(self, reason: str) -> None:
        lines = reason.strip().splitlines()
        self._down_reason = lines[0] if lines else "connection lost"
        self._down_until = self._clock.seconds() + self._retry_after
        if self._connection is not None:
            try:
                self._connection.close()
            except psycopg2.Error:
                pass
        self._connection = None

    def close(self) -> None:
        """Close the connection (the committer has stopped)."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None


@implementer(ISharedQueueStore)
class ClusterQueueStore:
    """The relay queue in PostgreSQL, shared by every node (see the module docstring).

    It keeps in memory the records this node holds a lease on (what its scheduler works on);
    every other row is read from the database when asked for.
    """

    shared = True
    """The queue is shared: the scheduler releases what it is not working on."""

    def __init__(
        self,
        database: Database,
        commit: CommitConnection,
        node: str,
        clock: IReactorTime,
        run_in_thread: RunInThread,
        cache_dir: Path,
        lease: float = 300.0,
        skew: float | None = None,
    ) -> None:
        self.database = database
        self.node = node
        self.lease = lease
        self.skew = min(30.0, lease / 10) if skew is None else skew
        self._commit = commit
        self._clock = clock
        self._run = run_in_thread
        self.cache_dir = cache_dir
        self._held: dict[str, QueueRecord] = {}
        self._versions: dict[str, int] = {}  # of the held rows, as last read or written
        self._lease_until: dict[str, float] = {}
        self._locks: dict[str, DeferredLock] = {}
        self._slot_numbers = itertools.count(1)
        self._opened = threading.Event()
        self.open_wait = 10.0
        """How long a commit waits for the database to be opened (migrated) at start."""

    def open(self) -> Deferred[None]:
        """Open the database (migrating its schema); commits wait for this."""
        d = self.database.open()

        def opened(_: object) -> None:
            self._opened.set()

        return d.addCallback(opened)

    @property
    def is_open(self) -> bool:
        """True once the database is open (migrated), until it is closed."""
        return self._opened.is_set()

    def close(self) -> Deferred[None]:
        """Close the database connections."""
        self._opened.clear()
        self._commit.close()
        return self.database.close()

    def schema_version(self) -> Deferred[int]:
        """The queue schema's version, without waiting for a lost connection (``/readyz``)."""
        d: Deferred[Any] = self.database.query_now("SELECT max(version) FROM queue_schema_version")
        return d.addCallback(lambda rows: int(rows[0][0]) if rows and rows[0][0] else 0)

    # -- what this node holds ---------------------------------------------------------------

    def holds(self, queue_id: str) -> bool:
        """True while this node's lease on ``queue_id`` is certainly still its own."""
        until = self._lease_until.get(queue_id)
        return until is not None and self._clock.seconds() < until - self.skew

    @property
    def held(self) -> list[str]:
        """The queue ids this node holds a lease on."""
        return list(self._held)

    def _hold(self, record: QueueRecord, until: float, version: int = 0) -> None:
        self._held[record.queue_id] = record
        self._versions[record.queue_id] = version
        self._lease_until[record.queue_id] = until

    def _forget(self, queue_id: str) -> None:
        self._held.pop(queue_id, None)
        self._versions.pop(queue_id, None)
        self._lease_until.pop(queue_id, None)
        path = self.body_path(queue_id)
        self._run(unlink_if_present, path)

    # -- the committer's thread -------------------------------------------------------------

    def stage_batch_blocking(
        self, batch: Sequence[StagedMessage]
    ) -> tuple[list[QueueRecord], Failures]:
        """Queue the remote recipients of every message of ``batch`` in one transaction: the
        new records (leased to this node) and the messages that failed."""
        records, failures, _written = self.commit_batch_blocking(batch, ())
        return records, failures

    def commit_batch_blocking(
        self, batch: Sequence[StagedMessage], parts: Sequence[ClusterPart]
    ) -> tuple[list[QueueRecord], dict[str, BaseException], set[str]]:
        """Queue the remote recipients of every message of ``batch``, and write the rows of
        every other ``part`` (the webhook outbox), in one transaction.

        The new records (leased to this node), the messages that failed (all of them that
        have rows when the transaction failed) and those that have rows now."""
        read = BodyReader()
        records, rows, failures = self.queue_rows(batch, read)
        accepted = [staged for staged in batch if staged.queue_id not in failures]
        prepared = [part.rows(accepted, read) for part in parts]
        for rows_of_part in prepared:
            failures.update(rows_of_part.failures)
        writing = {record.queue_id for record in records} | {
            queue_id for rows_of_part in prepared for queue_id in rows_of_part.queue_ids
        }
        writing -= failures.keys()
        if not writing:
            return [], failures, set()

        def insert(cursor: Any) -> None:
            wanted = [row for row in rows if row[0] in writing]
            if wanted:
                psycopg2.extras.execute_values(cursor, _INSERT, wanted)
            for rows_of_part in prepared:
                rows_of_part.insert(cursor, writing)

        try:
            self.commit_blocking(insert)
        except Exception as e:  # each message's own line says why (a 451)
            for queue_id in writing:
                failures[queue_id] = e
            return [], failures, set()
        os.makedirs(self.cache_dir, exist_ok=True)
        written = [record for record in records if record.queue_id in writing]
        queued = {record.queue_id for record in written}
        for staged in batch:
            if staged.queue_id in queued:
                link_or_copy(staged.body, self.body_path(staged.queue_id))
        for rows_of_part in prepared:
            rows_of_part.after(writing)
        return written, failures, writing

    def queue_rows(
        self, batch: Sequence[StagedMessage], read: BodyReader
    ) -> tuple[list[QueueRecord], list[tuple[Any, ...]], dict[str, BaseException]]:
        """The new records of ``batch``'s messages with remote recipients and their rows."""
        now = self._clock.seconds()
        records, rows = [], []
        failures: dict[str, BaseException] = {}
        for staged in batch:
            record = QueueRecord.from_message(staged.message)
            if record is None:
                continue
            try:
                body = read(staged)
            except OSError as e:
                failures[staged.queue_id] = e
                continue
            records.append(record)
            rows.append(self._row(record, body, now))
        return records, rows, failures

    def _row(self, record: QueueRecord, body: bytes, now: float) -> tuple[Any, ...]:
        """The ``queue_messages`` row of a new ``record`` with ``body``, leased to this node."""
        return (
            record.queue_id,
            encode(record).decode("utf-8"),
            psycopg2.Binary(body),
            record.created_at,
            next_due(record, now),
            self.node,
            now + self.lease,
        )

    def commit_blocking(self, work: Callable[[Any], T]) -> T:
        """Run ``work(cursor)`` in one transaction on the committer's connection, once the
        database is open (mail that arrives while the node starts waits for the schema, up to
        ``open_wait`` seconds, then gets a 451)."""
        if not self._opened.wait(self.open_wait):
            raise QueueUnavailable("the queue database is not open (yet)")
        return self._commit.run(work)

    def stage_blocking(self, message: AcceptedMessage, body_path: Path) -> QueueRecord | None:
        records, failures = self.stage_batch_blocking([StagedMessage(message, body_path)])
        if failures:
            raise next(iter(failures.values()))
        return records[0] if records else None

    def unstage_blocking(self, queue_id: str) -> None:
        self._commit.run(
            lambda cursor: cursor.execute(
                "DELETE FROM queue_messages WHERE queue_id = %s", (queue_id,)
            )
        )
        unlink_if_present(self.body_path(queue_id))

    # -- from the reactor -------------------------------------------------------------------

    def remember(self, records: list[QueueRecord]) -> None:
        until = self._clock.seconds() + self.lease
        for record in records:
            self._hold(record, until)

    def load_now(self) -> None:
        """Nothing is read before the reactor runs: :meth:`load` claims what is due."""
        return None

    def add(self, message: AcceptedMessage, body_path: Path) -> Deferred[QueueRecord]:
        return Deferred.fromCoroutine(self._add(message, body_path))

    async def _add(self, message: AcceptedMessage, body_path: Path) -> QueueRecord:
        record = QueueRecord.from_message(message)
        if record is None:
            raise ValueError(f"{message.queue_id} has no remote recipient to queue")
        body: bytes = await self._run(body_path.read_bytes)
        row = self._row(record, body, self._clock.seconds())
        await self.database.transaction(_insert_rows, [row])
        await self._run(self._cache_body, record.queue_id, body)
        self._hold(record, row[-1])
        return record

    def load(self) -> Deferred[list[QueueRecord]]:
        """At start: clear the body cache, then claim what is due, this node's own leases of
        before the restart included (they need not expire first)."""

        async def load() -> list[QueueRecord]:
            await self._run(clear_directory, self.cache_dir)
            # This node's connections of before a restart are gone.
            await self.database.query(
                "DELETE FROM queue_slots WHERE node = %s RETURNING 1", (self.node,)
            )
            return await self._claim(own=True)

        return Deferred.fromCoroutine(load())

    def claim(self, limit: int = 100) -> Deferred[list[QueueRecord]]:
        """Take up to ``limit`` due rows whose lease is free or expired; their records."""
        return Deferred.fromCoroutine(self._claim(own=False, limit=limit))

    async def _claim(self, own: bool, limit: int = 100) -> list[QueueRecord]:
        now = self._clock.seconds()
        until = now + self.lease
        params = {"node": self.node, "until": until, "now": now, "own": own, "limit": limit}
        rows = await self.database.transaction(_run_returning, _CLAIM, params)
        claimed = []
        for queue_id, text, body, version in rows:
            try:
                record = decode(text.encode("utf-8"), queue_id)
            except RecordError as e:
                _log.error(
                    "queue database: record {queue_id} is broken ({error}); set aside",
                    queue_id=queue_id,
                    error=str(e),
                )
                await self.database.query(
                    "UPDATE queue_messages SET next_due = NULL, lease_node = NULL,"
                    " lease_until = NULL WHERE queue_id = %s RETURNING 1",
                    (queue_id,),
                )
                continue
            await self._run(self._cache_body, queue_id, bytes(body))
            self._hold(record, until, version)
            claimed.append(record)
        return claimed

    def _cache_body(self, queue_id: str, body: bytes) -> None:
        write_file(self.body_path(queue_id), body)

    def renew(self) -> Deferred[list[str]]:
        """Extend every lease this node holds; fires with the queue ids whose lease was lost
        (forgotten here)."""
        return Deferred.fromCoroutine(self._renew())

    async def _renew(self) -> list[str]:
        until = self._clock.seconds() + self.lease
        await self.database.query(
            "UPDATE queue_slots SET lease_until = %s WHERE node = %s RETURNING 1",
            (until, self.node),
        )
        ids = list(self._held)
        if not ids:
            return []
        rows = await self.database.query(_RENEW, (until, self.node, ids))
        kept = {row[0] for row in rows}
        lost = [queue_id for queue_id in ids if queue_id not in kept]
        for queue_id in kept:
            if queue_id in self._lease_until:
                self._lease_until[queue_id] = until
        for queue_id in lost:
            _log.warn(
                "relay {queue_id}: lease lost (another node may deliver it now)",
                queue_id=queue_id,
            )
            self._forget(queue_id)
        return lost

    def release(self, queue_ids: list[str]) -> Deferred[None]:
        """Give up the leases of ``queue_ids`` (nothing of them is in flight here)."""
        ids = [queue_id for queue_id in queue_ids if queue_id in self._held]
        for queue_id in ids:
            self._forget(queue_id)
        if not ids:
            return Deferred.fromCoroutine(_nothing())
        d: Deferred[Any] = self.database.query(_RELEASE + " RETURNING queue_id", (self.node, ids))
        return d.addCallback(lambda _: None)

    # -- connection slots -----------------------------------------------------------------

    def take_slot(self, destination: str, limit: int) -> Deferred[str | None]:
        slot = f"{self.node}/{next(self._slot_numbers)}"
        now = self._clock.seconds()
        d: Deferred[str | None] = self.database.transaction(
            _take_slot, destination, self.node, slot, limit, now, now + self.lease
        )
        return d

    def give_all_slots(self) -> Deferred[None]:
        """Every slot of this node back (it stops)."""
        d: Deferred[Any] = self.database.query(
            "DELETE FROM queue_slots WHERE node = %s RETURNING 1", (self.node,)
        )
        return d.addCallback(lambda _: None)

    def give_slot(self, slot: str) -> Deferred[None]:
        d: Deferred[Any] = self.database.query(
            "DELETE FROM queue_slots WHERE node = %s AND slot = %s RETURNING 1", (self.node, slot)
        )
        return d.addCallback(lambda _: None)

    def records(self) -> Deferred[list[QueueRecord]]:
        async def every() -> list[QueueRecord]:
            rows = await self.database.query(
                "SELECT queue_id, record::text FROM queue_messages ORDER BY created_at, queue_id"
            )
            found = []
            for queue_id, text in rows:
                held = self._held.get(queue_id)
                if held is not None:
                    found.append(held)
                    continue
                try:
                    found.append(decode(text.encode("utf-8"), queue_id))
                except RecordError:
                    continue
            return found

        return Deferred.fromCoroutine(every())

    def get(self, queue_id: str) -> Deferred[QueueRecord | None]:
        async def get() -> QueueRecord | None:
            held = self._held.get(queue_id)
            if held is not None:
                return held
            rows = await self.database.query(
                "SELECT record::text FROM queue_messages WHERE queue_id = %s", (queue_id,)
            )
            if not rows:
                return None
            try:
                return decode(rows[0][0].encode("utf-8"), queue_id)
            except RecordError:
                return None

        return Deferred.fromCoroutine(get())

    def update(self, record: QueueRecord) -> Deferred[None]:
        d = self.modify(record.queue_id, lambda _current: record)
        return d.addCallback(lambda _: None)

    def modify(self, queue_id: str, change: Change) -> Deferred[QueueRecord | None]:
        return self.modify_held(queue_id, change, release=False)

    def modify_held(
        self, queue_id: str, change: Change, release: bool
    ) -> Deferred[QueueRecord | None]:
        """Apply ``change`` to the held record and write it, checking the lease; with
        ``release`` the lease is given up in the same statement (unless the message is
        finished: its DSNs and removal are still this node's to do).  :class:`LeaseLost` when
        the lease is gone.  A lost connection is retried while the lease lasts."""
        return Deferred.fromCoroutine(self._modify(queue_id, change, release))

    async def _modify(self, queue_id: str, change: Change, release: bool) -> QueueRecord | None:
        lock = self._locks.setdefault(queue_id, DeferredLock())
        await lock.acquire()
        try:
            while True:
                current = self._held.get(queue_id)
                if current is None:
                    raise LeaseLost(queue_id)
                version = self._versions[queue_id]
                new = change(current)
                let_go = release and new is not None and not new.done
                params: tuple[Any, ...]
                if new is None:
                    sql, params = _DELETE_HELD, (queue_id, self.node, version)
                else:
                    due = next_due(new, self._clock.seconds())
                    text = encode(new).decode("utf-8")
                    sql = _WRITE
                    params = (text, due, let_go, let_go, queue_id, self.node, version)
                rows = await self._while_held(queue_id, sql, params)
                if rows:
                    break
                # Not written: the lease is gone, or an operator changed the row since it was
                # read (then the change is made again, over the operator's version).
                if not await self._reread(queue_id):
                    self._forget(queue_id)
                    raise LeaseLost(queue_id)
            if new is None or let_go:
                self._forget(queue_id)
            else:
                self._held[queue_id] = new
                self._versions[queue_id] = int(rows[0][0])
            return new
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._locks.pop(queue_id, None)

    async def _reread(self, queue_id: str) -> bool:
        """Read a held row again (an operator changed it); False when it is no longer ours."""
        rows = await self.database.query(_READ_HELD, (queue_id, self.node))
        if not rows:
            return False
        text, version = rows[0]
        try:
            record = decode(text.encode("utf-8"), queue_id)
        except RecordError:
            return False
        self._held[queue_id] = record
        self._versions[queue_id] = int(version)
        return True

    def follow(self, queue_id: str) -> Deferred[QueueRecord | None]:
        """An operator changed (or deleted) ``queue_id``: if this node holds it, read it again;
        fires with the record now held, or None (not held here, or deleted: forgotten)."""

        async def follow() -> QueueRecord | None:
            if queue_id not in self._held:
                return None
            lock = self._locks.setdefault(queue_id, DeferredLock())
            await lock.acquire()
            try:
                if queue_id not in self._held:
                    return None
                if await self._reread(queue_id):
                    return self._held[queue_id]
                self._forget(queue_id)
                return None
            finally:
                lock.release()
                if not lock.locked and not lock.waiting:
                    self._locks.pop(queue_id, None)

        return Deferred.fromCoroutine(follow())

    async def _while_held(self, queue_id: str, sql: str, params: tuple[Any, ...]) -> list[Any]:
        """Run a write of a held row; while the database cannot be reached, try again every
        second for as long as the lease lasts (then :class:`LeaseLost`)."""
        while True:
            try:
                rows: list[Any] = await self.database.query(sql, params)
                return rows
            except Exception as e:
                if not is_connection_error(e) and not isinstance(e, QueueError):
                    raise
                if not self.holds(queue_id):
                    raise LeaseLost(queue_id) from e
                await sleep(self._clock, 1.0)

    def remove(self, queue_id: str) -> Deferred[None]:
        d = self.modify(queue_id, lambda _current: None)
        return d.addCallback(lambda _: None)

    def body_path(self, queue_id: str) -> Path:
        return self.cache_dir / f"{queue_id}.eml"


@implementer(ICommitSink)
class ClusterQueueSink:
    """The queue database as a commit sink: the queue's rows of a batch, and those of every
    other ``part`` (the webhook outbox), in one transaction (see the module docstring)."""

    name = "queue"

    def __init__(self, store: ClusterQueueStore, parts: Sequence[ClusterPart] = ()) -> None:
        self._store = store
        self._parts = tuple(parts)
        self._staged: dict[str, QueueRecord] = {}
        self._written: set[str] = set()  # the messages of the batch being written with rows
        self._listeners: list[Callable[[list[QueueRecord]], None]] = []

    def listen(self, queued: Callable[[list[QueueRecord]], None]) -> None:
        """Call ``queued`` with the new records of every committed batch (the scheduler)."""
        self._listeners.append(queued)

    def write(self, batch: Sequence[StagedMessage]) -> Failures:
        records, failures, self._written = self._store.commit_batch_blocking(batch, self._parts)
        for record in records:
            self._staged[record.queue_id] = record
        return failures

    def rollback(self, staged: StagedMessage) -> None:
        queue_id = staged.queue_id
        record = self._staged.pop(queue_id, None)
        if queue_id not in self._written:
            return
        self._written.discard(queue_id)

        def delete(cursor: Any) -> None:
            cursor.execute("DELETE FROM queue_messages WHERE queue_id = %s", (queue_id,))
            for part in self._parts:
                part.delete(cursor, queue_id)

        self._store.commit_blocking(delete)
        if record is not None:
            unlink_if_present(self._store.body_path(queue_id))
        for part in self._parts:
            part.unstaged(queue_id)

    def committed(self, messages: Sequence[AcceptedMessage]) -> None:
        new = [r for m in messages if (r := self._staged.pop(m.queue_id, None)) is not None]
        if new:
            self._store.remember(new)
            for queued in self._listeners:
                queued(new)
        for part in self._parts:
            part.committed(messages)


def queue_listener(dsn: str, reactor: Any, notified: Callable[[str], None]) -> Listener:
    """The service that wakes this node on ``NOTIFY`` :data:`CHANNEL`."""
    return Listener(dsn, reactor, CHANNEL, notified)


class ClusterClaimer(LeaseKeeper):
    """Keeps this node's share of the cluster queue: claims due rows (every ``poll`` seconds,
    and at once on a ``NOTIFY``), renews the leases it holds, and releases them at stop.

    ``scheduler`` is the relay scheduler (:meth:`claimed`, :meth:`flush`, :meth:`replaced`).
    """

    def __init__(
        self,
        store: ClusterQueueStore,
        scheduler: Any,
        clock: IReactorTime,
        poll: float = 5.0,
        batch: int = 100,
    ) -> None:
        super().__init__(clock, store.lease, poll, batch, "relay-cluster", "queue database")
        self._store = store
        self._scheduler = scheduler

    async def claim_batch(self, limit: int) -> list[Any]:
        records = await self._store.claim(limit)
        if records:
            self._scheduler.claimed(records)
        return records

    def renew_leases(self) -> Deferred[list[str]]:
        return self._store.renew()

    def lost(self, ids: list[str]) -> None:
        for queue_id in ids:
            self._scheduler.replaced(None, queue_id)

    def release_all(self) -> Deferred[None]:
        """Give up every lease held and every connection slot (the scheduler has stopped:
        nothing is in flight)."""
        if not self._store.is_open:
            return succeed(None)  # never opened: nothing was held
        d = self._store.release(self._store.held)
        return d.addCallback(lambda _: self._store.give_all_slots())

    def notified(self, payload: str) -> None:
        """A ``NOTIFY`` on :data:`CHANNEL`: ``flush [id]`` retries now, ``changed <id>``
        follows an operator's change of a message held here; then due work is claimed."""
        words = payload.split()
        if len(words) == 2 and words[0] == "changed":
            queue_id = words[1]
            if queue_id in self._store.held:
                d = self._store.follow(queue_id)
                d.addCallback(self._scheduler.replaced, queue_id)
                d.addErrback(lambda f: _log.failure("following {queue_id}", f, queue_id=queue_id))
        elif words and words[0] == "flush":
            self._scheduler.flush(words[1] if len(words) > 1 else None)
        self.claim_now()


async def _take_slot(
    cursor: Any, destination: str, node: str, slot: str, limit: int, now: float, until: float
) -> str | None:
    """Take a slot if fewer than ``limit`` live ones exist (one taker at a time per
    destination: a transaction-scoped advisory lock on its name)."""
    await cursor.execute(
        "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_SLOT_LOCK_SPACE, destination)
    )
    await cursor.execute(
        "DELETE FROM queue_slots WHERE destination = %s AND lease_until < %s", (destination, now)
    )
    await cursor.execute("SELECT count(*) FROM queue_slots WHERE destination = %s", (destination,))
    if int(cursor.fetchone()[0]) >= limit:
        return None
    await cursor.execute(
        "INSERT INTO queue_slots (destination, node, slot, lease_until) VALUES (%s, %s, %s, %s)",
        (destination, node, slot, until),
    )
    return slot


async def _insert_rows(cursor: Any, rows: list[tuple[Any, ...]]) -> None:
    for row in rows:
        await cursor.execute(
            "INSERT INTO queue_messages"
            " (queue_id, record, body, created_at, next_due, lease_node, lease_until)"
            " VALUES (%s, %s::jsonb, %s, %s, %s, %s, %s)",
            row,
        )


async def _run_returning(cursor: Any, sql: str, params: Any) -> list[Any]:
    await cursor.execute(sql, params)
    rows: list[Any] = cursor.fetchall()
    return rows


async def _nothing() -> None:
    return None


async def sleep(clock: IReactorTime, seconds: float) -> None:
    """Wait ``seconds`` on ``clock``."""
    d: Deferred[None] = Deferred()
    clock.callLater(seconds, d.callback, None)
    await d


def clear_directory(path: Path) -> None:
    """Make ``path`` an empty directory (its files removed; a cache at start)."""
    os.makedirs(path, exist_ok=True)
    for entry in os.scandir(path):
        if entry.is_file():
            unlink_if_present(Path(entry.path))


def link_or_copy(source: Path, target: Path) -> None:
    """Make ``target`` a hard link of ``source`` (a copy across filesystems: a cache only)."""
    os.makedirs(target.parent, exist_ok=True)
    unlink_if_present(target)  # left by a run before a crash: this body is the one
    try:
        os.link(source, target)
    except OSError:
        target.write_bytes(source.read_bytes())


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole (tmp and rename; no sync: a cache)."""
    os.makedirs(path.parent, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def first_line(error: BaseException) -> str:
    """The first line of an error's message (PostgreSQL's run to several)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
