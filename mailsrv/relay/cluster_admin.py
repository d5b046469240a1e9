"""``mailsrv queue`` on the cluster queue: the operator's view and changes, from any node.

The command talks to the queue database itself (blocking psycopg2: it is a short-lived CLI,
not the reactor), whether or not a server runs on this machine, and every node follows:

* ``list`` and ``show`` read every row, with the node holding its lease, if any;
* ``hold``, ``release`` and ``delete`` change a row in one transaction (``SELECT ... FOR
  UPDATE``, the same rules as the file queue, :mod:`mailsrv.relay.actions`, ``version`` + 1)
  and ``NOTIFY changed <id>`` in it, so the node holding the message reads it again before it
  writes (its own writes are conditional on the version it read: it never overwrites this);
* ``flush`` makes deferred recipients due now in the rows, then ``NOTIFY flush``: every node
  retries what it holds and claims what is due.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg2

from mailsrv.relay import actions
from mailsrv.relay.pg_queue import CHANNEL, first_line, next_due
from mailsrv.relay.queue_store import NoSuchMessage, QueueError, headers_of
from mailsrv.relay.records import QueueRecord, RecordError, decode, encode, valid_queue_id

Rule = Callable[[QueueRecord], tuple["QueueRecord | None", str]]


@dataclass(frozen=True)
class Lease:
    """Which node works on a message, until when."""

    node: str
    until: float


@dataclass(frozen=True)
class Row:
    """One queued message as the operator sees it."""

    record: QueueRecord
    lease: Lease | None


class ClusterQueueAdmin:
    """The operator's actions on the queue database ``dsn`` (``now``: the clock)."""

    def __init__(self, dsn: str, now: Callable[[], float], statement_timeout: float = 10.0):
        self._dsn = dsn
        self._now = now
        self._timeout_ms = max(1, int(statement_timeout * 1000))

    def _run(self, work: Callable[[Any], Any]) -> Any:
        try:
            connection = psycopg2.connect(
                self._dsn,
                application_name="mailsrv-queue",
                connect_timeout=10,
                options=f"-c statement_timeout={self._timeout_ms}",
            )
        except psycopg2.Error as e:
            raise QueueError(f"cannot reach the queue database: {first_line(e)}") from None
        try:
            with connection, connection.cursor() as cursor:
                cursor.execute("SELECT to_regclass('queue_messages') IS NOT NULL")
                if not cursor.fetchone()[0]:
                    raise QueueError("the queue database has no queue yet (start a node first)")
                return work(cursor)
        except psycopg2.Error as e:
            raise QueueError(f"queue database: {first_line(e)}") from None
        finally:
            connection.close()

    # -- reads ------------------------------------------------------------------------------

    def rows(self) -> list[Row]:
        """Every queued message, oldest first; unreadable records are left out."""

        def read(cursor: Any) -> list[Row]:
            cursor.execute(
                "SELECT queue_id, record::text, lease_node, lease_until FROM queue_messages"
                " ORDER BY created_at, queue_id"
            )
            found = []
            now = self._now()
            for queue_id, text, node, until in cursor.fetchall():
                try:
                    record = decode(text.encode("utf-8"), queue_id)
                except RecordError:
                    continue
                live = node is not None and until is not None and until > now
                found.append(Row(record, Lease(node, until) if live else None))
            return found

        rows: list[Row] = self._run(read)
        return rows

    def show(self, queue_id: str) -> tuple[Row, bytes]:
        """One message and its headers; NoSuchMessage when it is not queued."""
        _check(queue_id)

        def read(cursor: Any) -> tuple[Row, bytes]:
            cursor.execute(
                "SELECT record::text, lease_node, lease_until, body FROM queue_messages"
                " WHERE queue_id = %s",
                (queue_id,),
            )
            found = cursor.fetchone()
            if found is None:
                raise NoSuchMessage(queue_id)
            text, node, until, body = found
            record = decode(text.encode("utf-8"), queue_id)
            live = node is not None and until is not None and until > self._now()
            return Row(record, Lease(node, until) if live else None), headers_of(bytes(body))

        shown: tuple[Row, bytes] = self._run(read)
        return shown

    # -- changes ----------------------------------------------------------------------------

    def hold(self, queue_id: str, recipient: str | None) -> str:
        return self._change(queue_id, lambda record: actions.hold(record, recipient))

    def release(self, queue_id: str, recipient: str | None) -> str:
        return self._change(queue_id, lambda record: actions.release(record, recipient))

    def delete(self, queue_id: str, recipient: str | None) -> str:
        return self._change(queue_id, lambda record: actions.delete(record, recipient))

    def _change(self, queue_id: str, rule: Rule) -> str:
        _check(queue_id)

        def change(cursor: Any) -> str:
            record = _locked(cursor, queue_id)
            new, line = rule(record)
            if new is None:
                cursor.execute("DELETE FROM queue_messages WHERE queue_id = %s", (queue_id,))
            elif new != record:
                _write(cursor, new, self._now())
            cursor.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"changed {queue_id}"))
            return line

        line: str = self._run(change)
        return line

    def flush(self, queue_id: str | None) -> str:
        """Deferred recipients due now (one message or all), and every node told."""
        if queue_id is not None:
            _check(queue_id)

        def flush(cursor: Any) -> str:
            now = self._now()
            if queue_id is not None:
                targets = [(queue_id, _locked(cursor, queue_id))]
            else:
                cursor.execute(
                    "SELECT queue_id, record::text FROM queue_messages"
                    " WHERE next_due IS NOT NULL FOR UPDATE"
                )
                targets = []
                for qid, text in cursor.fetchall():
                    try:
                        targets.append((qid, decode(text.encode("utf-8"), qid)))
                    except RecordError:
                        continue
            messages = due = 0
            for _qid, record in targets:
                new, count = actions.flush(record, now)
                if count:
                    _write(cursor, new, now)
                    messages += 1
                    due += count
            payload = f"flush {queue_id}" if queue_id is not None else "flush"
            cursor.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
            if queue_id is not None:
                return f"{queue_id}: {due} deferred recipient(s) due now"
            return f"queue flushed: {due} deferred recipient(s) of {messages} message(s) due now"

        line: str = self._run(flush)
        return line


def _check(queue_id: str) -> None:
    if not valid_queue_id(queue_id):
        raise QueueError(f"invalid queue id {queue_id!r}")


def _locked(cursor: Any, queue_id: str) -> QueueRecord:
    cursor.execute(
        "SELECT record::text FROM queue_messages WHERE queue_id = %s FOR UPDATE", (queue_id,)
    )
    found = cursor.fetchone()
    if found is None:
        raise NoSuchMessage(queue_id)
    return decode(found[0].encode("utf-8"), queue_id)


def _write(cursor: Any, record: QueueRecord, now: float) -> None:
    cursor.execute(
        "UPDATE queue_messages SET record = %s::jsonb, next_due = %s, version = version + 1"
        " WHERE queue_id = %s",
        (encode(record).decode("utf-8"), next_due(record, now), record.queue_id),
    )
