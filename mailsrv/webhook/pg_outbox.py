"""The webhook outbox in PostgreSQL (``SMTP_QUEUE_URL``): one outbox that several nodes send.

Beside the relay queue (:mod:`mailsrv.relay.pg_queue`), in the same database, on the same
lease design:

* ``outbox_entries`` has one row per (event, endpoint): the entry as the file outbox stores it
  (:mod:`mailsrv.webhook.entries`), when it is next due (NULL once dead-lettered), and the
  lease of the node sending it.  A message event's body is in ``outbox_bodies`` once, by queue
  id, whatever the number of endpoints and event types that need it.
* **Commit.** A batch's message events are rows in the queue's one transaction
  (:class:`OutboxPart`, a :class:`~mailsrv.relay.pg_queue.ClusterPart`), committed before the
  250; they are leased to the node that accepted the message, which sends them at once, the
  message linked in its cache (``<data_dir>/outbox-cache/``).  Relay outcome events are rows
  leased to the node that made the attempt.
* **Claiming.** :class:`OutboxClaimer` polls (and wakes on ``NOTIFY mailsrv_outbox``) for due
  rows of the endpoints this node sends to, not disabled, whose lease is free or expired, and
  takes them with ``FOR UPDATE SKIP LOCKED``.  Leases are renewed every third of their length.
* **Outcomes.** A delivered entry is deleted (and its body with the last entry that needed it)
  in one transaction that checks the lease; a failed attempt's entry is written with its next
  due time and its lease released in one statement, so any node retries it when it is due; a
  dead letter waits, leased by nobody, for a redrive.  Right before an attempt, the dispatcher
  asks :meth:`ClusterOutboxStore.holds`: a node frozen past its lease does not send.
* **Endpoints disabled by a 410** are one row each in ``outbox_disabled``, for the whole
  cluster: no node claims their entries, and every node hears of a disable and of an enable
  (a redrive from any node) through the same channel.

Delivery stays at least once with a stable ``webhook-id``: an event is sent twice only when a
node dies between the receiver's 2xx and the delete.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extras
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailsrv.delivery.envelope import AcceptedMessage
from mailsrv.delivery.sinks import StagedMessage
from mailsrv.fileops import unlink_if_present
from mailsrv.jsonstore.fields import RecordError, decode_json, encode_json
from mailsrv.pgsql import Database, LeaseKeeper, Listener, is_connection_error
from mailsrv.relay.pg_queue import (
    BodyReader,
    PartRows,
    clear_directory,
    link_or_copy,
    sleep,
    write_file,
)
from mailsrv.relay.queue_store import QueueError
from mailsrv.threads import RunInThread
from mailsrv.webhook.endpoint_state import DisabledEndpoint
from mailsrv.webhook.endpoint_state import from_dict as state_from_dict
from mailsrv.webhook.endpoint_state import to_dict as state_to_dict
from mailsrv.webhook.entries import EntryState, MessageSource, OutboxEntry, decode, encode
from mailsrv.webhook.outbox_store import NoSuchEntry, OutboxError

_log = Logger(namespace="mailsrv.webhook")

CHANNEL = "mailsrv_outbox"
"""The ``LISTEN``/``NOTIFY`` channel.  Payloads: ``disabled <name>``, ``enabled <name>``: an
endpoint's state changed; anything (``redrive``): claim due entries now."""

_INSERT = (
    "INSERT INTO outbox_entries (entry_key, event_id, endpoint, entry, body_id, created_at,"
    " next_due, lease_node, lease_until) VALUES %s"
)
_ROW = "(%s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s)"
_CLAIM = """
UPDATE outbox_entries o SET lease_node = %(node)s, lease_until = %(until)s
FROM (
    SELECT entry_key FROM outbox_entries
    WHERE next_due <= %(now)s
      AND endpoint = ANY(%(endpoints)s)
      AND endpoint NOT IN (SELECT name FROM outbox_disabled)
      AND (lease_node IS NULL OR lease_until < %(now)s OR (lease_node = %(node)s AND %(own)s))
    ORDER BY next_due
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
) due
WHERE o.entry_key = due.entry_key
RETURNING o.entry_key, o.entry::text, (SELECT body FROM outbox_bodies b WHERE b.body_id = o.body_id)
"""
_WRITE = (
    "UPDATE outbox_entries SET entry = %s::jsonb, next_due = %s,"
    " lease_node = NULL, lease_until = NULL"
    " WHERE entry_key = %s AND lease_node = %s RETURNING 1"
)


def next_due(entry: OutboxEntry) -> float | None:
    """When a node should send ``entry`` next: None unless it is pending."""
    if entry.state is not EntryState.PENDING:
        return None
    return entry.next_attempt if entry.next_attempt is not None else entry.created_at


def body_id(entry: OutboxEntry) -> str | None:
    """The ``outbox_bodies`` row a message event is built from (its queue id)."""
    if isinstance(entry.source, MessageSource):
        return entry.source.message.queue_id
    return None


class ClusterOutboxStore:
    """The webhook outbox in PostgreSQL, shared by every node (see the module docstring).

    It keeps in memory the entries this node holds a lease on; every other row is read from
    the database when asked for.  What the dispatcher, the relay events and the operator's
    actions call is the file outbox's (:class:`~mailsrv.webhook.outbox_store.Outbox`).
    """

    shared = True
    """The outbox is shared: the dispatcher sends only what this node holds."""

    def __init__(
        self,
        database: Database,
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
        self.cache_dir = cache_dir
        self._clock = clock
        self._run = run_in_thread
        self._held: dict[str, OutboxEntry] = {}
        self._lease_until: dict[str, float] = {}

    # -- what this node holds ---------------------------------------------------------------

    def holds(self, key: str) -> bool:
        """True while this node's lease on entry ``key`` is certainly still its own."""
        until = self._lease_until.get(key)
        return until is not None and self._clock.seconds() < until - self.skew

    @property
    def held(self) -> list[str]:
        """The keys of the entries this node holds a lease on."""
        return list(self._held)

    def remember(self, entries: Sequence[OutboxEntry], until: float) -> None:
        """This node committed ``entries`` under a lease until ``until``."""
        for entry in entries:
            self._held[entry.key] = entry
            self._lease_until[entry.key] = until

    def _forget(self, key: str) -> None:
        self._held.pop(key, None)
        self._lease_until.pop(key, None)
        self._run(unlink_if_present, self.body_path(key))

    def body_path(self, key: str) -> Path:
        """This node's copy of the message entry ``key`` is built from."""
        return self.cache_dir / f"{key}.eml"

    def sort_key(self, entry: OutboxEntry) -> tuple[float, str]:
        return (entry.created_at, entry.key)

    def lease_end(self) -> float:
        """When a lease taken now ends."""
        return self._clock.seconds() + self.lease

    def row(self, entry: OutboxEntry, until: float) -> tuple[Any, ...]:
        """The ``outbox_entries`` row of a new ``entry``, leased to this node until ``until``."""
        return (
            entry.key,
            entry.event_id,
            entry.endpoint,
            encode(entry).decode("utf-8"),
            body_id(entry),
            entry.created_at,
            next_due(entry),
            self.node,
            until,
        )

    def load_now(self) -> list[OutboxEntry]:
        """Nothing is read before the reactor runs: the claimer's first claim takes what is
        due, this node's own leases of before a restart included."""
        return []

    # -- claims and leases (the claimer) ----------------------------------------------------

    def start(self) -> Deferred[None]:
        """At start: empty the cache and remove bodies no entry needs any more (left when two
        nodes finished a message's last entries at once)."""

        async def start() -> None:
            await self._run(clear_directory, self.cache_dir)
            await self.database.query(
                "DELETE FROM outbox_bodies b WHERE NOT EXISTS"
                " (SELECT 1 FROM outbox_entries e WHERE e.body_id = b.body_id) RETURNING 1"
            )

        return Deferred.fromCoroutine(start())

    def claim(
        self, endpoints: Sequence[str], limit: int = 100, own: bool = False
    ) -> Deferred[list[OutboxEntry]]:
        """Take up to ``limit`` due entries of ``endpoints`` whose lease is free or expired
        (with ``own``, this node's too: at start); they are written to the cache."""
        return Deferred.fromCoroutine(self._claim(list(endpoints), limit, own))

    async def _claim(self, endpoints: list[str], limit: int, own: bool) -> list[OutboxEntry]:
        if not endpoints:
            return []
        now = self._clock.seconds()
        until = now + self.lease
        params = {
            "node": self.node,
            "until": until,
            "now": now,
            "own": own,
            "limit": limit,
            "endpoints": endpoints,
        }
        rows = await self.database.transaction(_returning, _CLAIM, params)
        claimed = []
        for key, text, body in rows:
            try:
                entry = decode(text.encode("utf-8"), key)
            except RecordError as e:
                _log.error(
                    "outbox database: entry {key} is broken ({error}); set aside",
                    key=key,
                    error=str(e),
                )
                await self.database.query(
                    "UPDATE outbox_entries SET next_due = NULL, lease_node = NULL,"
                    " lease_until = NULL WHERE entry_key = %s RETURNING 1",
                    (key,),
                )
                continue
            if entry.keeps_body:
                if body is None:
                    _log.error("outbox database: the message of {key} is missing", key=key)
                    continue
                await self._run(write_file, self.body_path(key), bytes(body))
            self._held[key] = entry
            self._lease_until[key] = until
            claimed.append(entry)
        return claimed

    def renew(self) -> Deferred[list[str]]:
        """Extend every lease this node holds; fires with the keys whose lease was lost."""

        async def renew() -> list[str]:
            keys = list(self._held)
            if not keys:
                return []
            until = self._clock.seconds() + self.lease
            rows = await self.database.query(
                "UPDATE outbox_entries SET lease_until = %s"
                " WHERE lease_node = %s AND entry_key = ANY(%s) RETURNING entry_key",
                (until, self.node, keys),
            )
            kept = {row[0] for row in rows}
            for key in keys:
                if key in kept:
                    if key in self._lease_until:
                        self._lease_until[key] = until
                else:
                    _log.warn("webhook {key}: lease lost (another node may send it)", key=key)
                    self._forget(key)
            return [key for key in keys if key not in kept]

        return Deferred.fromCoroutine(renew())

    def release(self, keys: Sequence[str]) -> Deferred[None]:
        """Give up the leases of ``keys`` (nothing of them is in flight here)."""
        ids = [key for key in keys if key in self._held]
        for key in ids:
            self._forget(key)
        if not ids:
            return succeed(None)
        d = self.database.query(
            "UPDATE outbox_entries SET lease_node = NULL, lease_until = NULL"
            " WHERE lease_node = %s AND entry_key = ANY(%s) RETURNING 1",
            (self.node, ids),
        )
        return d.addCallback(lambda _: None)

    # -- what the dispatcher and the relay events write -------------------------------------

    def update(self, entry: OutboxEntry) -> Deferred[None]:
        """Write the outcome of an attempt on a held entry and give up its lease, in one
        statement (:class:`~mailsrv.relay.pg_queue.LeaseLost` when the lease is gone)."""

        async def update() -> None:
            params = (encode(entry).decode("utf-8"), next_due(entry), entry.key, self.node)
            rows = await self._while_held(entry.key, _returning, _WRITE, params)
            self._forget(entry.key)
            if not rows:
                raise NoSuchEntry(entry.key)

        return Deferred.fromCoroutine(update())

    def discard(self, key: str) -> Deferred[None]:
        """A held entry was delivered: delete it (and its body, if no other entry needs it)."""

        async def discard() -> None:
            await self._while_held(key, _delete_held, key, self.node)
            self._forget(key)

        return Deferred.fromCoroutine(discard())

    def put(self, entry: OutboxEntry) -> Deferred[None]:
        """Add a relay outcome event's entry, leased to this node.  An entry of that key
        already there (the same attempt's event, written before a crash) is left as it is,
        and not held here."""

        async def put() -> None:
            until = self._clock.seconds() + self.lease
            rows = await self.database.query(
                _INSERT.replace("%s", _ROW) + " ON CONFLICT (entry_key) DO NOTHING RETURNING 1",
                self.row(entry, until),
            )
            if rows:
                self.remember([entry], until)

        return Deferred.fromCoroutine(put())

    async def _while_held(self, key: str, work: Callable[..., Any], *args: Any) -> Any:
        """Run the transaction ``work(cursor, *args)`` on a held entry; while the database
        cannot be reached, try again every second for as long as the lease lasts."""
        while True:
            try:
                return await self.database.transaction(work, *args)
            except Exception as e:
                if not is_connection_error(e) and not isinstance(e, QueueError):
                    raise
                if not self.holds(key):
                    self._forget(key)
                    raise NoSuchEntry(key) from e
                await sleep(self._clock, 1.0)

    # -- what operators read and change (from any node) -------------------------------------

    def records(self) -> Deferred[list[OutboxEntry]]:
        """Every entry in the outbox, oldest first."""

        async def every() -> list[OutboxEntry]:
            rows = await self.database.query(
                "SELECT entry_key, entry::text FROM outbox_entries ORDER BY created_at, entry_key"
            )
            return [entry for key, text in rows if (entry := _decoded(key, text)) is not None]

        return Deferred.fromCoroutine(every())

    def get(self, key: str) -> Deferred[OutboxEntry | None]:
        d = self.database.query(
            "SELECT entry_key, entry::text FROM outbox_entries WHERE entry_key = %s", (key,)
        )
        return d.addCallback(lambda rows: _decoded(*rows[0]) if rows else None)

    def leases(self) -> Deferred[dict[str, tuple[str, float]]]:
        """The node holding each leased entry, and until when."""
        d = self.database.query(
            "SELECT entry_key, lease_node, lease_until FROM outbox_entries"
            " WHERE lease_node IS NOT NULL"
        )
        return d.addCallback(lambda rows: {key: (node, until) for key, node, until in rows})

    def modify(
        self, key: str, change: Callable[[OutboxEntry], OutboxEntry | None]
    ) -> Deferred[OutboxEntry | None]:
        """An operator's change of an entry no node holds (a redrive of a dead letter), in one
        transaction with a ``NOTIFY``, so that a node claims it at once.  An entry leased to a
        node is left alone (:class:`OutboxError`)."""
        d: Deferred[OutboxEntry | None] = self.database.transaction(_modify, key, change)
        return d


class ClusterDisabledEndpoints:
    """The endpoints disabled by a 410, cluster-wide (``outbox_disabled``): the file store's
    :class:`~mailsrv.webhook.endpoint_state.DisabledEndpoints` calls, and a ``NOTIFY`` with
    every change."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def load_now(self) -> list[DisabledEndpoint]:
        """Nothing before the reactor runs: the claimer reads them once the database is open."""
        return []

    def records(self) -> Deferred[list[DisabledEndpoint]]:
        d = self.database.query("SELECT name, state::text FROM outbox_disabled ORDER BY name")

        def decoded(rows: list[Any]) -> list[DisabledEndpoint]:
            found = []
            for name, text in rows:
                try:
                    found.append(state_from_dict(decode_json(text.encode("utf-8"))))
                except RecordError as e:
                    _log.error("outbox database: state of {name} broken: {e}", name=name, e=e)
            return found

        return d.addCallback(decoded)

    def put(self, state: DisabledEndpoint) -> Deferred[None]:
        text = encode_json(state_to_dict(state)).decode("utf-8")
        d = self.database.query(
            "WITH put AS (INSERT INTO outbox_disabled (name, state) VALUES (%s, %s::jsonb)"
            " ON CONFLICT (name) DO UPDATE SET state = EXCLUDED.state RETURNING name)"
            " SELECT pg_notify(%s, 'disabled ' || name) FROM put",
            (state.name, text, CHANNEL),
        )
        return d.addCallback(lambda _: None)

    def remove(self, name: str) -> Deferred[None]:
        d = self.database.query(
            "WITH gone AS (DELETE FROM outbox_disabled WHERE name = %s RETURNING name)"
            " SELECT pg_notify(%s, 'enabled ' || name) FROM gone",
            (name, CHANNEL),
        )
        return d.addCallback(lambda _: None)


class OutboxPart:
    """The outbox's rows of each committer batch, in the queue's transaction (a
    :class:`~mailsrv.relay.pg_queue.ClusterPart`).  ``events`` makes the entries and hands
    them on when committed (:class:`~mailsrv.webhook.sink.OutboxSink`)."""

    def __init__(self, store: ClusterOutboxStore, events: Any) -> None:
        self._store = store
        self._events = events
        self._staged: dict[str, tuple[list[OutboxEntry], float]] = {}

    def rows(self, batch: Sequence[StagedMessage], read: BodyReader) -> PartRows:
        until = self._store.lease_end()
        entries_of: dict[str, list[OutboxEntry]] = {}
        bodies: dict[str, tuple[Any, ...]] = {}
        failures: dict[str, BaseException] = {}
        staged_of = {staged.queue_id: staged for staged in batch}
        for staged in batch:
            entries = self._events.entries_for(staged)
            if not entries:
                continue
            if any(entry.keeps_body for entry in entries):
                try:
                    bodies[staged.queue_id] = (staged.queue_id, psycopg2.Binary(read(staged)))
                except OSError as e:
                    failures[staged.queue_id] = e
                    continue
            entries_of[staged.queue_id] = entries

        def insert(cursor: Any, committing: set[str]) -> None:
            wanted = [b for queue_id, b in bodies.items() if queue_id in committing]
            if wanted:
                psycopg2.extras.execute_values(
                    cursor, "INSERT INTO outbox_bodies (body_id, body) VALUES %s", wanted
                )
            rows = [
                self._store.row(entry, until)
                for queue_id, entries in entries_of.items()
                if queue_id in committing
                for entry in entries
            ]
            if rows:
                psycopg2.extras.execute_values(cursor, _INSERT, rows, template=_ROW)

        def after(committed: set[str]) -> None:
            for queue_id, entries in entries_of.items():
                if queue_id not in committed:
                    continue
                self._staged[queue_id] = (entries, until)
                for entry in entries:
                    if entry.keeps_body:
                        link_or_copy(staged_of[queue_id].body, self._store.body_path(entry.key))

        return PartRows(set(entries_of), failures, insert, after)

    def delete(self, cursor: Any, queue_id: str) -> None:
        cursor.execute("DELETE FROM outbox_entries WHERE body_id = %s", (queue_id,))
        cursor.execute("DELETE FROM outbox_bodies WHERE body_id = %s", (queue_id,))

    def unstaged(self, queue_id: str) -> None:
        entries, _ = self._staged.pop(queue_id, ([], 0.0))
        for entry in entries:
            unlink_if_present(self._store.body_path(entry.key))

    def committed(self, messages: Sequence[AcceptedMessage]) -> None:
        new: list[OutboxEntry] = []
        for message in messages:
            staged = self._staged.pop(message.queue_id, None)
            if staged is not None:
                entries, until = staged
                self._store.remember(entries, until)
                new += entries
        if new:
            self._events.hand_over(new)


class OutboxClaimer(LeaseKeeper):
    """Keeps this node's share of the cluster outbox: claims due entries of its endpoints
    (every ``poll`` seconds, and at once on a ``NOTIFY``), renews its leases, follows the
    endpoints disabled and enabled on other nodes, and releases its leases at stop.

    ``dispatcher`` is the :class:`~mailsrv.webhook.dispatcher.WebhookDispatcher`;
    ``states`` the :class:`ClusterDisabledEndpoints`.
    """

    def __init__(
        self,
        store: ClusterOutboxStore,
        states: ClusterDisabledEndpoints,
        dispatcher: Any,
        clock: IReactorTime,
        poll: float = 5.0,
        batch: int = 100,
    ) -> None:
        super().__init__(clock, store.lease, poll, batch, "webhook-cluster", "outbox database")
        self._store = store
        self._states = states
        self._dispatcher = dispatcher
        self._started = False

    async def claim_batch(self, limit: int) -> list[Any]:
        if not self._started:
            # The first claim after the start: clean up, learn the disabled endpoints, and
            # take this node's own leases of before a restart back.
            await self._store.start()
            self._dispatcher.restore_disabled(await self._states.records())
            entries = await self._store.claim(self._dispatcher.endpoint_names(), limit, own=True)
            self._started = True
        else:
            entries = await self._store.claim(self._dispatcher.endpoint_names(), limit)
        if entries:
            self._dispatcher.added(entries)
        return entries

    def renew_leases(self) -> Deferred[list[str]]:
        return self._store.renew()

    def lost(self, ids: list[str]) -> None:
        self._dispatcher.lost(ids)

    def release_all(self) -> Deferred[None]:
        return self._store.release(self._store.held)

    def notified(self, payload: str) -> None:
        """A ``NOTIFY`` on :data:`CHANNEL`; then due work is claimed."""
        words = payload.split()
        if len(words) == 2 and words[0] == "enabled":
            self._dispatcher.enabled(words[1])
        elif len(words) == 2 and words[0] == "disabled":
            d = self._states.records()
            d.addCallback(self._dispatcher.restore_disabled)
            d.addErrback(lambda f: _log.failure("reading the disabled endpoints", f))
        self.claim_now()


def outbox_listener(dsn: str, reactor: Any, notified: Callable[[str], None]) -> Listener:
    """The service that wakes this node on ``NOTIFY`` :data:`CHANNEL`."""
    return Listener(dsn, reactor, CHANNEL, notified)


# -- transactions ---------------------------------------------------------------------------


async def _returning(cursor: Any, sql: str, params: Any) -> list[Any]:
    await cursor.execute(sql, params)
    rows: list[Any] = cursor.fetchall()
    return rows


async def _delete_held(cursor: Any, key: str, node: str) -> None:
    await cursor.execute(
        "DELETE FROM outbox_entries WHERE entry_key = %s AND lease_node = %s RETURNING body_id",
        (key, node),
    )
    row = cursor.fetchone()
    if row is None:
        raise NoSuchEntry(key)
    if row[0] is not None:
        await cursor.execute(
            "DELETE FROM outbox_bodies WHERE body_id = %s"
            " AND NOT EXISTS (SELECT 1 FROM outbox_entries WHERE body_id = %s)",
            (row[0], row[0]),
        )


async def _modify(
    cursor: Any, key: str, change: Callable[[OutboxEntry], OutboxEntry | None]
) -> OutboxEntry | None:
    await cursor.execute(
        "SELECT entry::text, lease_node FROM outbox_entries WHERE entry_key = %s FOR UPDATE",
        (key,),
    )
    row = cursor.fetchone()
    if row is None:
        raise NoSuchEntry(key)
    text, holder = row
    entry = _decoded(key, text)
    if entry is None:
        raise OutboxError(f"webhook event {key}: its entry is unreadable")
    new = change(entry)
    if new == entry:
        return new
    if holder is not None:
        raise OutboxError(f"webhook event {key} is being sent by node {holder}: try again")
    if new is None:
        await cursor.execute("DELETE FROM outbox_entries WHERE entry_key = %s", (key,))
        return None
    await cursor.execute(
        "UPDATE outbox_entries SET entry = %s::jsonb, next_due = %s WHERE entry_key = %s",
        (encode(new).decode("utf-8"), next_due(new), key),
    )
    await cursor.execute("SELECT pg_notify(%s, 'redrive')", (CHANNEL,))
    return new


def _decoded(key: str, text: str) -> OutboxEntry | None:
    try:
        return decode(text.encode("utf-8"), key)
    except RecordError as e:
        _log.error("outbox database: entry {key} is broken ({error})", key=key, error=str(e))
        return None
