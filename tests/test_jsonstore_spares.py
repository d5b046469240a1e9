"""Files are reused instead of freed: a removed or replaced record's inode becomes a later
record's file, a relayed message's body a later spool file (emptied at once: nothing of it stays
readable); a spare waits out its quarantine first, so a reader never sees a file it opened
change; and no reuse ever makes a record believed that was not written (a spare still linked to
a live record is never written; old content under a new name is refused)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest_twisted
from twisted.internet import threads

from mailsrv.delivery.spool import Spool
from mailsrv.jsonstore.spares import SPARE_DIR, SparePool
from mailsrv.relay.queue_store import FileQueueStore
from mailsrv.webhook.entries import EntryState, decode
from mailsrv.webhook.outbox_store import OutboxStore
from tests.queue_helpers import BODY, accepted, commit
from tests.test_webhook_outbox_store import delivery_entry, message_entry, stage


def outbox(tmp_path: Path) -> OutboxStore:
    store = OutboxStore(tmp_path / "outbox", threads.deferToThread)
    store.root.mkdir(parents=True, exist_ok=True)
    store.spares.quarantine = 0.0  # reuse at once here (the quarantine has its own test)
    return store


def spares_on_disk(store: OutboxStore) -> list[str]:
    directory = store.root / SPARE_DIR
    return sorted(os.listdir(directory)) if directory.exists() else []


@pytest_twisted.ensureDeferred
async def test_a_removed_record_file_is_the_next_record(tmp_path: Path) -> None:
    store = outbox(tmp_path)
    first = stage(store, tmp_path, message_entry(last_error="x" * 3000))
    inode = store.record_path(first.key).stat().st_ino
    await store.discard(first.key)
    assert not store.record_path(first.key).exists()
    assert len(spares_on_disk(store)) == 1
    second = stage(store, tmp_path, message_entry(event_id="evt_" + "b" * 32))
    path = store.record_path(second.key)
    assert path.stat().st_ino == inode, "the removed record's file, not a new one"
    assert spares_on_disk(store) == []
    # Overwritten and cut to the new, shorter length: exactly the new record.
    assert decode(path.read_bytes(), second.key) == second
    assert oct(path.stat().st_mode & 0o777) == "0o600"


@pytest_twisted.ensureDeferred
async def test_the_version_an_update_replaces_is_kept(tmp_path: Path) -> None:
    store = outbox(tmp_path)
    entry = delivery_entry()
    await store.put(entry)
    old_inode = store.record_path(entry.key).stat().st_ino
    await store.update(replace(entry, attempts=12))
    assert decode(store.record_path(entry.key).read_bytes()).attempts == 12
    kept = spares_on_disk(store)
    assert len(kept) == 1
    spare = store.root / SPARE_DIR / kept[0]
    assert spare.stat().st_ino == old_inode and spare.stat().st_nlink == 1
    # And the next write takes it.
    await store.update(replace(entry, attempts=13, state=EntryState.DEAD))
    assert store.record_path(entry.key).stat().st_ino == old_inode
    assert decode(store.record_path(entry.key).read_bytes()).attempts == 13


@pytest_twisted.ensureDeferred
async def test_a_spare_still_linked_to_a_live_record_is_never_written(tmp_path: Path) -> None:
    """A crash between linking the replaced version and the rename over it leaves a spare
    that is another name of the live record: writing it would change that record."""
    store = outbox(tmp_path)
    live = delivery_entry()
    await store.put(live)
    before = store.record_path(live.key).read_bytes()
    (store.root / SPARE_DIR).mkdir(exist_ok=True)
    os.link(store.record_path(live.key), store.root / SPARE_DIR / "7")
    restarted = outbox(tmp_path)
    other = delivery_entry(event_id="evt_" + "c" * 32)
    await restarted.put(other)
    assert store.record_path(live.key).read_bytes() == before
    assert store.record_path(live.key).stat().st_nlink == 1, "the stale second name is gone"
    assert decode(restarted.record_path(other.key).read_bytes(), other.key) == other


@pytest_twisted.ensureDeferred
async def test_old_content_under_a_new_name_is_refused_at_load(tmp_path: Path) -> None:
    """A crash after a spare was renamed to a new record's name but before its new content
    reached the disk leaves a finished record's content there: never loaded as a record."""
    store = outbox(tmp_path)
    finished = stage(store, tmp_path, message_entry())
    await store.discard(finished.key)
    [spare] = spares_on_disk(store)
    newcomer = delivery_entry(event_id="evt_" + "d" * 32)
    os.rename(store.root / SPARE_DIR / spare, store.record_path(newcomer.key))
    loaded = await outbox(tmp_path).load()
    assert loaded == []
    assert (store.corrupt_dir / f"{newcomer.key}.json").exists(), "moved aside, not believed"


def test_the_pool_is_bounded_and_survives_a_restart(tmp_path: Path) -> None:
    root = tmp_path / "records"
    root.mkdir()
    pool = SparePool(root, limit=3)
    for n in range(5):
        path = root / f"{n}.json"
        path.write_bytes(b"{}")
        assert pool.keep(path)
        assert not path.exists()
    assert len(pool) == 3, "past the limit a finished file is removed"
    assert not pool.keep(root / "absent.json")
    again = SparePool(root, limit=3)
    assert len(again) == 3
    fd = again.open_for_write(root / "new.json.tmp")
    assert fd is not None
    os.close(fd)
    path = root / "later.json"
    path.write_bytes(b"{}")
    assert again.keep(path)
    assert len(set(os.listdir(root / SPARE_DIR))) == 3, "a new name, none overwritten"


@pytest_twisted.ensureDeferred
async def test_a_relayed_body_no_one_else_holds_becomes_the_next_spool_file(
    tmp_path: Path,
) -> None:
    body_spares = SparePool(tmp_path / "spool", empty_on_keep=True, quarantine=0.0)
    queue = FileQueueStore(tmp_path / "queue", threads.deferToThread, body_spares=body_spares)
    alone = commit(queue, tmp_path / "spool" / "incoming", accepted())
    shared = commit(queue, tmp_path / "spool" / "incoming", accepted())
    mailbox_copy = tmp_path / "mailbox-copy"
    os.link(queue.body_path(shared.queue_id), mailbox_copy)  # as a Maildir link would
    inode = queue.body_path(alone.queue_id).stat().st_ino
    await queue.remove(alone.queue_id)
    await queue.remove(shared.queue_id)
    assert len(body_spares) == 1, "only the body no one else held"
    [spare] = os.listdir(tmp_path / "spool" / SPARE_DIR)
    assert (tmp_path / "spool" / SPARE_DIR / spare).stat().st_size == 0, "nothing readable"
    assert mailbox_copy.read_bytes() == BODY, "the mailbox's copy is untouched"
    spool = Spool(tmp_path / "spool", threads.deferToThread, body_spares)
    spool.prepare()
    written = spool.open("QIDNEXT01", lambda: None, lambda: None)
    written.write(b"short\n")
    path = await written.close()
    assert path.stat().st_ino == inode and path.read_bytes() == b"short\n"
    assert len(body_spares) == 0
    discarded = spool.open("QIDNEXT02", lambda: None, lambda: None)
    discarded.write(b"never acknowledged\n" * 20_000)  # more than is kept in memory
    discarded.discard()
    for _ in range(50):  # the removal runs in the background
        if len(body_spares):
            break
        await threads.deferToThread(lambda: None)
    assert len(body_spares) == 1 and not (tmp_path / "spool" / "incoming" / "QIDNEXT02").exists()


def test_a_spare_is_reused_only_after_its_quarantine(tmp_path: Path) -> None:
    """A reader that opened a record just before it was removed or replaced reads it a moment
    later: the file must not be another record's by then."""
    now = [100.0]
    root = tmp_path / "records"
    root.mkdir()
    pool = SparePool(root, quarantine=2.0, clock=lambda: now[0])
    finished = root / "done.json"
    finished.write_bytes(b'{"the": "old version"}')
    with finished.open("rb") as reader:  # opened before the removal
        assert pool.keep(finished)
        now[0] = 101.0
        assert pool.open_for_write(root / "next.json.tmp") is None, "still in quarantine"
        assert reader.read() == b'{"the": "old version"}'
    now[0] = 102.5
    fd = pool.open_for_write(root / "next.json.tmp")
    assert fd is not None
    os.close(fd)
    assert (
        SparePool(root, quarantine=2.0, clock=lambda: now[0]).open_for_write(root / "x.tmp") is None
    ), "nothing left"
