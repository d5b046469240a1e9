"""The outbox on disk: entries as readable JSON, strictly read back; recovery at start; the
message link kept exactly as long as an entry needs it; the sink in the real threaded committer
(all or nothing with the Maildir sink, no sync of its own)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, threads
from twisted.logger import capturedLogs
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailsrv.delivery.committer import GroupCommitter
from mailsrv.delivery.envelope import AcceptedMessage
from mailsrv.delivery.maildir import MaildirSink, MaildirStore
from mailsrv.delivery.sinks import Failures, ICommitSink, StagedMessage
from mailsrv.delivery.spool import Spool
from mailsrv.jsonstore.fields import RecordError
from mailsrv.webhook.endpoint_state import DisabledEndpoint, DisabledEndpoints
from mailsrv.webhook.entries import (
    DeliverySource,
    EntryState,
    MessageSource,
    OutboxEntry,
    decode,
    delivery_event_id,
    encode,
    to_dict,
)
from mailsrv.webhook.outbox_store import NoSuchEntry, OutboxError, OutboxStore
from mailsrv.webhook.sink import OutboxSink
from tests.queue_helpers import BODY, accepted, full_message, local, remote, spool_body
from tests.webhook_rig import endpoint, run_now

EVENT = "evt_" + "a" * 32


def message_entry(**changes: Any) -> OutboxEntry:
    entry = OutboxEntry(
        event_id=EVENT,
        endpoint="crm",
        type="message.received",
        created_at=1_767_225_600.25,
        source=MessageSource(full_message("QID00001"), (("alice@example.org", "/m/new/1"),)),
        next_attempt=1_767_225_600.25,
    )
    return replace(entry, **changes)


def delivery_entry(**changes: Any) -> OutboxEntry:
    entry = OutboxEntry(
        event_id=delivery_event_id("QID00001", "bob@example.net", 2),
        endpoint="crm",
        type="message.deferred",
        created_at=1_767_225_700.0,
        source=DeliverySource(
            queue_id="QID00001",
            mail_from="",
            recipient="bob@example.net",
            attempts=2,
            reply="451 4.3.0 try\r\nlater",
            remote_mta="mx.example.net",
            next_attempt=1_767_226_000.0,
            envid="ENV1",
            orcpt=("rfc822", "bob@example.net"),
        ),
        state=EntryState.DEAD,
        attempts=11,
        last_status=503,
        last_error="HTTP 503",
    )
    return replace(entry, **changes)


@pytest.fixture
def store(tmp_path: Path) -> OutboxStore:
    return OutboxStore(tmp_path / "outbox", threads.deferToThread)


def read(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def stage(store: OutboxStore, tmp_path: Path, entry: OutboxEntry) -> OutboxEntry:
    store.root.mkdir(parents=True, exist_ok=True)
    store.stage_blocking(entry, spool_body(tmp_path / "spool", entry.key))
    return entry


# --- the entry's JSON --------------------------------------------------------------------------


@pytest.mark.parametrize("entry", [message_entry(), delivery_entry()], ids=["message", "delivery"])
def test_entries_round_trip_as_readable_json(entry: OutboxEntry) -> None:
    data = encode(entry)
    assert data.endswith(b"\n") and b'\n  "state": ' in data
    assert decode(data, entry.key) == entry


def test_the_delivery_event_id_is_derived_from_queue_id_recipient_and_attempt() -> None:
    first = delivery_event_id("Q1", "bob@example.net", 1)
    assert first == delivery_event_id("Q1", "bob@example.net", 1)
    assert (
        len(
            {
                first,
                *(
                    delivery_event_id(*k)
                    for k in [
                        ("Q1", "bob@example.net", 2),
                        ("Q2", "bob@example.net", 1),
                        ("Q1", "carol@example.net", 1),
                    ]
                ),
            }
        )
        == 4
    )
    assert first.startswith("evt_") and len(first) == 36


BAD = [
    ("version", 2, "version 2 is not supported"),
    ("event_id", "evt_x", "entry.event_id: expected evt_ and 32 hex digits"),
    ("endpoint", "no spaces", "entry.endpoint: expected an endpoint name"),
    ("type", "message.lost", "entry.type: 'message.lost' is not an event type"),
    ("state", "sent", "entry.state: 'sent' is not one of pending, dead, done"),
    ("attempts", -1, "entry.attempts: expected a non-negative integer"),
    ("last_status", 42, "entry.last_status: expected null or an HTTP status"),
    ("next_attempt", "soon", "entry.next_attempt: expected a number"),
    ("delivery", {}, "entry.delivery: expected null for a message.received event"),
    ("maildir", [{"mailbox": "a"}], "entry.maildir[0]: missing path"),
    ("surprise", 1, "entry: unknown surprise"),
]


@pytest.mark.parametrize(("key", "value", "error"), BAD, ids=[b[0] for b in BAD])
def test_a_broken_entry_is_refused_naming_the_field(key: str, value: Any, error: str) -> None:
    raw = to_dict(message_entry())
    raw[key] = value
    with pytest.raises(RecordError, match=error.replace("[", r"\[").replace("(", r"\(")):
        decode(json.dumps(raw).encode())


def test_an_entry_in_the_wrong_file_is_refused() -> None:
    with pytest.raises(RecordError, match="do not match the file name"):
        decode(encode(message_entry()), "evt_" + "b" * 32 + ".crm")


# --- the store ---------------------------------------------------------------------------------


def test_staging_links_the_message_once_per_entry(store: OutboxStore, tmp_path: Path) -> None:
    entry = stage(store, tmp_path, message_entry())
    other = stage(store, tmp_path, message_entry(endpoint="erp"))
    delivery = stage(store, tmp_path, delivery_entry())
    assert store.body_path(entry.key).read_bytes() == BODY
    assert store.body_path(other.key).exists()
    assert not store.body_path(delivery.key).exists(), "a relay outcome has no message"
    assert store.record_path(entry.key).stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        stage(store, tmp_path, message_entry())


@pytest_twisted.ensureDeferred
async def test_done_drops_the_message_link_once_durable(store: OutboxStore, tmp_path: Path) -> None:
    entry = stage(store, tmp_path, message_entry())
    await store.update(replace(entry, state=EntryState.DEAD))
    assert store.body_path(entry.key).exists(), "a dead letter may be redriven: it keeps it"
    await store.update(replace(entry, state=EntryState.DONE))
    assert not store.body_path(entry.key).exists()
    assert decode(store.record_path(entry.key).read_bytes()).state is EntryState.DONE


@pytest_twisted.ensureDeferred
async def test_put_creates_or_replaces_update_does_not_create(store: OutboxStore) -> None:
    store.root.mkdir(parents=True)
    entry = delivery_entry()
    with pytest.raises(NoSuchEntry):
        await store.update(entry)
    await store.put(entry)
    await store.put(replace(entry, attempts=12))
    assert decode(store.record_path(entry.key).read_bytes()).attempts == 12
    with pytest.raises(OutboxError, match="invalid webhook event id"):
        store.record_path("../x")


@pytest_twisted.ensureDeferred
async def test_load_recovers_and_moves_broken_entries_aside(
    store: OutboxStore, tmp_path: Path
) -> None:
    good = stage(store, tmp_path, message_entry())
    done = stage(store, tmp_path, message_entry(endpoint="done", state=EntryState.DONE))
    store.body_path(done.key).write_bytes(BODY)  # its link removal was interrupted
    bodiless = stage(store, tmp_path, message_entry(endpoint="lost"))
    store.body_path(bodiless.key).unlink()
    torn = stage(store, tmp_path, message_entry(endpoint="torn"))
    store.record_path(torn.key).write_bytes(b'{"version": 1, "event')
    (store.root / f"{good.key}.json.tmp").write_bytes(b"{")
    orphan = store.root / f"evt_{'c' * 32}.crm.eml"
    orphan.write_bytes(BODY)
    with capturedLogs() as events:
        loaded = store.load_now()
    assert sorted(e.key for e in loaded) == sorted([good.key, done.key])
    assert not store.body_path(done.key).exists()
    assert not orphan.exists()
    assert sorted(os.listdir(store.corrupt_dir)) == sorted(
        [f"{bodiless.key}.json", f"{torn.key}.json", f"{torn.key}.eml"]
    )
    reasons = {e["file"]: e["reason"] for e in events if "reason" in e}
    assert reasons == {
        f"{bodiless.key}.json": "its body is missing",
        f"{torn.key}.json": "not JSON: Unterminated string starting at at line 1 column 16",
    }
    assert any("outbox entry" in e["log_format"] for e in events if "reason" in e)
    summary = [e for e in events if "pending" in e and "dead" in e]
    assert [(e["pending"], e["dead"], e["done"]) for e in summary] == [(1, 0, 1)]


@pytest_twisted.ensureDeferred
async def test_disabled_endpoints_are_stored_one_file_each(tmp_path: Path) -> None:
    states = DisabledEndpoints(tmp_path / "outbox" / "endpoints", threads.deferToThread)
    assert states.load_now() == []
    state = DisabledEndpoint("crm", "https://crm.example/hook", 1_767_225_600.0, "HTTP 410 Gone")
    await states.put(state)
    again = DisabledEndpoints(tmp_path / "outbox" / "endpoints", threads.deferToThread)
    assert again.load_now() == [state]
    await again.remove("crm")
    assert await again.records() == []


# --- the sink in the committer -----------------------------------------------------------------


@implementer(ICommitSink)
class Refusing:
    """A sink after the outbox that refuses the queue ids in ``refuse``."""

    name = "refusing"

    def __init__(self, refuse: set[str]) -> None:
        self.refuse = refuse

    def write(self, batch: Sequence[StagedMessage]) -> Failures:
        return {s.queue_id: OSError(28, "full") for s in batch if s.queue_id in self.refuse}

    def rollback(self, staged: StagedMessage) -> None:
        pass

    def committed(self, messages: Sequence[AcceptedMessage]) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_the_sink_writes_entries_in_the_batch_and_rolls_back_with_the_others(
    tmp_path: Path,
) -> None:
    from twisted.internet import reactor

    store = OutboxStore(tmp_path / "outbox", threads.deferToThread)
    store.load_now()
    maildir = MaildirSink(MaildirStore(tmp_path / "mail", "mx.example.org"))
    endpoints = [endpoint("a", "http://127.0.0.1:9/a"), endpoint("b", "http://127.0.0.1:9/b")]
    sink = OutboxSink(store, endpoints, maildir.delivered)
    assert verifyObject(ICommitSink, sink)
    handed: list[OutboxEntry] = []
    sink.listen(handed.extend)
    syncs: list[int] = []

    def sync() -> None:
        syncs.append(1)

    committer = GroupCommitter(reactor, [maildir, sink, Refusing({"QREFUSED1"})], sync)
    committer.startService()
    spool = Spool(tmp_path / "spool", lambda f, *a: threads.deferToThread(f, *a))
    spool.prepare()

    def commit(message: AcceptedMessage) -> defer.Deferred[Any]:
        spool_file = spool.open(message.queue_id, lambda: None, lambda: None)
        spool_file.write(BODY)
        return committer.commit(message, spool_file)

    try:
        both = accepted("QBOTH0001", (local("alice@example.org"), remote("bob@remote.test")))
        await commit(both)
        with pytest.raises(OSError, match="full"):
            await commit(accepted("QREFUSED1", (local("alice@example.org"),)))
    finally:
        await committer.stopService()
    assert len(syncs) == 2 * committer.batches, "no sync of its own"
    kinds = sorted((e.type, e.endpoint) for e in handed)
    assert kinds == [
        ("message.queued", "a"),
        ("message.queued", "b"),
        ("message.received", "a"),
        ("message.received", "b"),
    ]
    on_disk = {e.key: e for e in store.load_now()}
    assert set(on_disk) == {e.key for e in handed}, "the refused message left nothing"
    received = next(e for e in handed if e.type == "message.received")
    assert isinstance(received.source, MessageSource)
    ((mailbox, path),) = received.source.maildir
    assert mailbox == "alice@example.org" and read(path) == BODY
    assert all(store.body_path(key).read_bytes() == BODY for key in on_disk)
    assert len(os.listdir(tmp_path / "mail" / "example.org" / "alice" / "new")) == 1


def test_no_endpoint_means_nothing_written(tmp_path: Path) -> None:
    store = OutboxStore(tmp_path / "outbox", run_now)
    sink = OutboxSink(store, [])
    message = full_message("QNONE0001")
    staged = StagedMessage(message, spool_body(tmp_path / "spool", "QNONE0001"))
    assert sink.write([staged]) == {}
    assert not store.root.exists()


@pytest_twisted.ensureDeferred
async def test_discard_needs_no_sync_and_no_record(tmp_path: Path) -> None:
    syncs: list[int] = []
    store = OutboxStore(tmp_path / "outbox", threads.deferToThread, sync=lambda: syncs.append(1))
    entry = stage(store, tmp_path, message_entry())
    await store.update(replace(entry, attempts=1))
    assert syncs == [1]
    await store.discard(entry.key)
    assert syncs == [1], "a discard has no sync of its own"
    assert not store.record_path(entry.key).exists()
    assert not store.body_path(entry.key).exists()
    await store.discard(entry.key)  # already gone: no error
    with pytest.raises(NoSuchEntry):
        await store.remove(entry.key)
