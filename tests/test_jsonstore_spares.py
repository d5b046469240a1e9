"""Record files are reused instead of freed: a removed or replaced record's inode becomes the
next record's file, and no reuse ever makes a record believed that was not written (a spare
still linked to a live record is never written; old content under a new name is refused)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest_twisted
from twisted.internet import threads

from mailsrv.jsonstore.spares import SPARE_DIR, SparePool
from mailsrv.webhook.entries import EntryState, decode
from mailsrv.webhook.outbox_store import OutboxStore
from tests.test_webhook_outbox_store import delivery_entry, message_entry, stage


def outbox(tmp_path: Path) -> OutboxStore:
    store = OutboxStore(tmp_path / "outbox", threads.deferToThread)
    store.root.mkdir(parents=True, exist_ok=True)
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
