"""The file queue store: staging in the committer's thread, recovery at start, group-committed
updates that are atomic and durable, read-modify-write without lost updates."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, threads
from twisted.logger import capturedLogs
from zope.interface.verify import verifyObject

from mailsrv.jsonstore.spares import SPARE_DIR
from mailsrv.relay.queue_store import FileQueueStore, IQueueStore, NoSuchMessage, QueueError
from mailsrv.relay.records import QueueRecord, State, decode
from tests.queue_helpers import BODY, accepted, commit, full_message, local, spool_body

REPO = Path(__file__).resolve().parent.parent


def run_in_thread(function: Any, *args: Any, **kwargs: Any) -> Any:
    return threads.deferToThread(function, *args, **kwargs)


@pytest.fixture
def store(tmp_path: Path) -> FileQueueStore:
    root = tmp_path / "queue"
    root.mkdir()
    return FileQueueStore(root, run_in_thread)


def reopen(store: FileQueueStore) -> FileQueueStore:
    return FileQueueStore(store.root, run_in_thread)


def names(directory: Path) -> list[str]:
    """The files of ``directory``, but for the spare files kept for reuse."""
    found = sorted(os.listdir(directory)) if directory.exists() else []
    return [name for name in found if name != SPARE_DIR]


def deferred(record: QueueRecord, **changes: Any) -> QueueRecord:
    """``record`` with every recipient changed as given."""
    return record.with_recipients(replace(r, **changes) for r in record.recipients)


def test_file_store_provides_the_interface(store: FileQueueStore) -> None:
    assert verifyObject(IQueueStore, store)


# --- staging (the committer's thread) ------------------------------------------------------


def test_stage_links_the_body_and_writes_the_record(store: FileQueueStore, tmp_path: Path) -> None:
    message = full_message()
    body = spool_body(tmp_path / "spool", message.queue_id)
    record = store.stage_blocking(message, body)
    assert record == QueueRecord.from_message(message)
    qid = message.queue_id
    assert names(store.root) == [f"{qid}.eml", f"{qid}.json"]
    assert os.stat(store.body_path(qid)).st_ino == os.stat(body).st_ino  # stored once
    assert decode(store.record_path(qid).read_bytes(), qid) == record
    assert os.stat(store.record_path(qid)).st_mode & 0o777 == 0o600


def test_a_local_only_message_stages_nothing(store: FileQueueStore, tmp_path: Path) -> None:
    message = accepted(recipients=(local("alice@example.org"),))
    body = spool_body(tmp_path / "spool", message.queue_id)
    assert store.stage_blocking(message, body) is None
    assert names(store.root) == []


def test_a_message_is_staged_once(store: FileQueueStore, tmp_path: Path) -> None:
    message = accepted()
    body = spool_body(tmp_path / "spool", message.queue_id)
    store.stage_blocking(message, body)
    with pytest.raises(FileExistsError):
        store.stage_blocking(message, body)


def test_unstage_removes_record_and_body(store: FileQueueStore, tmp_path: Path) -> None:
    message = accepted()
    store.stage_blocking(message, spool_body(tmp_path / "spool", message.queue_id))
    store.unstage_blocking(message.queue_id)
    assert names(store.root) == []
    store.unstage_blocking(message.queue_id)  # nothing left: no error


@pytest_twisted.ensureDeferred
async def test_add_queues_a_message_on_its_own(store: FileQueueStore, tmp_path: Path) -> None:
    message = accepted(sender="")
    record = await store.add(message, spool_body(tmp_path / "spool", message.queue_id))
    assert await reopen(store).get(message.queue_id) == record
    local_only = accepted(recipients=(local("alice@example.org"),))
    with pytest.raises(ValueError, match="no remote recipient"):
        await store.add(local_only, spool_body(tmp_path / "spool", local_only.queue_id))


# --- recovery at start ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_load_returns_every_record_oldest_first(
    store: FileQueueStore, tmp_path: Path
) -> None:
    young = commit(store, tmp_path / "spool", accepted(received_at=2000.0))
    old = commit(store, tmp_path / "spool", accepted(received_at=1000.0))
    assert await reopen(store).load() == [old, young]


@pytest_twisted.ensureDeferred
async def test_load_cleans_up_after_a_crash_and_moves_broken_records_aside(
    store: FileQueueStore, tmp_path: Path
) -> None:
    good = commit(store, tmp_path / "spool", accepted())
    updated = commit(store, tmp_path / "spool", accepted())
    # A crash in the middle of an update: the new version only in the temporary file.
    torn = store.record_path(updated.queue_id).with_suffix(".json.tmp")
    torn.write_bytes(store.record_path(updated.queue_id).read_bytes()[:40])
    # A record torn by a crash before the committer's sync (never acknowledged).
    empty = commit(store, tmp_path / "spool", accepted())
    store.record_path(empty.queue_id).write_bytes(b"")
    # A record of a future version (after a downgrade).
    future = commit(store, tmp_path / "spool", accepted())
    raw = json.loads(store.record_path(future.queue_id).read_bytes())
    store.record_path(future.queue_id).write_text(json.dumps({**raw, "version": 4}))
    # A record whose body is gone, and a body whose record is gone (removal interrupted).
    bodiless = commit(store, tmp_path / "spool", accepted())
    store.body_path(bodiless.queue_id).unlink()
    orphan = commit(store, tmp_path / "spool", accepted())
    store.record_path(orphan.queue_id).unlink()

    with capturedLogs() as events:
        records = await reopen(store).load()

    assert sorted(r.queue_id for r in records) == sorted([good.queue_id, updated.queue_id])
    assert updated in records  # the old version, whole
    assert names(store.root) == sorted(
        [f"{q}{s}" for q in (good.queue_id, updated.queue_id) for s in (".eml", ".json")]
        + ["corrupt"]
    )
    assert names(store.corrupt_dir) == sorted(
        [
            *(f"{empty.queue_id}{suffix}" for suffix in (".eml", ".json")),
            *(f"{future.queue_id}{suffix}" for suffix in (".eml", ".json")),
            f"{bodiless.queue_id}.json",
        ]
    )
    warnings = {e["file"]: e["reason"] for e in events if "reason" in e}
    assert warnings == {
        f"{empty.queue_id}.json": "not JSON: Expecting value at line 1 column 1",
        f"{future.queue_id}.json": "version 4 is not supported (this mailsrv reads 1, 2 or 3)",
        f"{bodiless.queue_id}.json": "its body is missing",
    }
    assert any(e.get("file") == torn.name for e in events)
    assert any(e.get("count") == 1 and "without a record" in e["log_format"] for e in events)
    assert await reopen(store).load() == records  # nothing left to recover


@pytest_twisted.ensureDeferred
async def test_a_second_broken_record_of_the_same_id_does_not_overwrite_the_first(
    store: FileQueueStore, tmp_path: Path
) -> None:
    record = commit(store, tmp_path / "spool", accepted())
    store.record_path(record.queue_id).write_bytes(b"{")
    await store.load()
    store.record_path(record.queue_id).write_bytes(b"[")
    store.body_path(record.queue_id).write_bytes(BODY)
    await store.load()
    assert names(store.corrupt_dir) == sorted(
        f"{record.queue_id}{n}{s}" for n in ("", ".1") for s in (".eml", ".json")
    )
    assert (store.corrupt_dir / f"{record.queue_id}.1.json").read_bytes() == b"["


@pytest_twisted.ensureDeferred
async def test_load_creates_a_missing_queue_directory(tmp_path: Path) -> None:
    store = FileQueueStore(tmp_path / "data" / "queue", run_in_thread)
    assert await store.load() == []
    assert store.root.is_dir() and store.root.stat().st_mode & 0o777 == 0o700


# --- updates -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_update_is_on_disk_when_it_fires(store: FileQueueStore, tmp_path: Path) -> None:
    record = commit(store, tmp_path / "spool", accepted())
    sent = deferred(
        record, state=State.SENT, attempts=1, last_reply="250 2.0.0 Ok", remote_mta="mx.test"
    )
    await store.update(sent)
    assert await reopen(store).get(record.queue_id) == sent
    assert await reopen(store).load() == [sent]
    assert names(store.root) == [f"{record.queue_id}.eml", f"{record.queue_id}.json"]


@pytest_twisted.ensureDeferred
async def test_reads_see_changes_still_being_written(store: FileQueueStore, tmp_path: Path) -> None:
    record = commit(store, tmp_path / "spool", accepted())
    later = deferred(record, state=State.DEFERRED, attempts=1)
    written = store.update(later)
    assert await store.get(record.queue_id) == later
    assert await store.records() == [later]
    await written
    removed = store.remove(record.queue_id)
    assert await store.get(record.queue_id) is None
    assert await store.records() == []
    await removed


@pytest_twisted.ensureDeferred
async def test_concurrent_updates_share_syncs(store: FileQueueStore, tmp_path: Path) -> None:
    records = [commit(store, tmp_path / "spool", accepted()) for _ in range(40)]
    new = [deferred(r, state=State.DEFERRED, attempts=1, next_attempt=9e9) for r in records]
    await defer.gatherResults([store.update(r) for r in new])
    assert store.writes == 40
    assert store.batches < 40  # grouped: one directory sync per batch
    assert sorted(await reopen(store).load(), key=lambda r: r.queue_id) == sorted(
        new, key=lambda r: r.queue_id
    )


@pytest_twisted.ensureDeferred
async def test_repeated_updates_of_one_record_keep_the_last(
    store: FileQueueStore, tmp_path: Path
) -> None:
    record = commit(store, tmp_path / "spool", accepted())
    versions = [deferred(record, attempts=n) for n in range(1, 11)]
    await defer.gatherResults([store.update(v) for v in versions])
    assert store.writes < 10
    assert await reopen(store).get(record.queue_id) == versions[-1]


@pytest_twisted.ensureDeferred
async def test_update_never_brings_back_a_removed_message(
    store: FileQueueStore, tmp_path: Path
) -> None:
    record = commit(store, tmp_path / "spool", accepted())
    await store.remove(record.queue_id)
    with pytest.raises(NoSuchMessage, match=f"no such message {record.queue_id}"):
        await store.update(deferred(record, state=State.SENT))
    assert names(store.root) == []
    with pytest.raises(NoSuchMessage):
        await store.remove(record.queue_id)


@pytest_twisted.ensureDeferred
async def test_remove_drops_record_then_body(store: FileQueueStore, tmp_path: Path) -> None:
    keep = commit(store, tmp_path / "spool", accepted())
    gone = commit(store, tmp_path / "spool", accepted())
    await store.remove(gone.queue_id)
    assert names(store.root) == [f"{keep.queue_id}.eml", f"{keep.queue_id}.json"]
    assert await reopen(store).get(gone.queue_id) is None


@pytest_twisted.ensureDeferred
async def test_concurrent_modifications_of_one_record_are_never_lost(
    store: FileQueueStore, tmp_path: Path
) -> None:
    record = commit(store, tmp_path / "spool", accepted())

    def bump(current: QueueRecord) -> QueueRecord:
        return deferred(current, attempts=current.recipients[0].attempts + 1)

    # Interleave plain updates of another record so reads race with batches in flight.
    other = commit(store, tmp_path / "spool", accepted())
    work = []
    for n in range(30):
        work.append(store.modify(record.queue_id, bump))
        work.append(store.update(deferred(other, attempts=n)))
    await defer.gatherResults(work)
    final = await reopen(store).get(record.queue_id)
    assert final is not None and [r.attempts for r in final.recipients] == [30, 30]


@pytest_twisted.ensureDeferred
async def test_a_refused_modification_writes_nothing(store: FileQueueStore, tmp_path: Path) -> None:
    record = commit(store, tmp_path / "spool", accepted())

    def refuse(current: QueueRecord) -> QueueRecord:
        raise QueueError("not now")

    with pytest.raises(QueueError, match="not now"):
        await store.modify(record.queue_id, refuse)
    assert await store.modify(record.queue_id, lambda current: current) == record
    assert store.writes == 0
    assert await store.modify(record.queue_id, lambda current: None) is None
    assert names(store.root) == []
    with pytest.raises(NoSuchMessage):
        await store.modify(record.queue_id, lambda current: current)


@pytest.mark.parametrize("bad", ["../x", "", "a/b", "x.json"])
def test_bad_ids_are_refused_before_any_file_is_touched(store: FileQueueStore, bad: str) -> None:
    for call in (store.get, store.remove, lambda q: store.modify(q, lambda r: r)):
        with pytest.raises(QueueError, match="invalid queue id"):
            call(bad)


@pytest_twisted.ensureDeferred
async def test_records_skip_a_broken_record_without_moving_it(
    store: FileQueueStore, tmp_path: Path
) -> None:
    good = commit(store, tmp_path / "spool", accepted())
    broken = commit(store, tmp_path / "spool", accepted())
    store.record_path(broken.queue_id).write_bytes(b"{}")
    with capturedLogs() as events:
        assert await store.records() == [good]
    assert [e["file"] for e in events if "reason" in e] == [f"{broken.queue_id}.json"]
    assert store.record_path(broken.queue_id).exists()  # only load() moves records


# --- SIGKILL in the middle of updates --------------------------------------------------------


def in_this_thread(function: Any, *args: Any) -> Any:
    """A RunInThread that runs at once (for checks outside the reactor)."""
    return defer.maybeDeferred(function, *args)


def test_sigkill_during_updates_leaves_the_old_or_the_new_record(
    store: FileQueueStore, tmp_path: Path
) -> None:
    record = commit(store, tmp_path / "spool", accepted())
    rng = random.Random(8)
    command = [sys.executable, "-m", "tests.queue_runner", "update-loop", str(store.root)]
    for _ in range(8):
        child = subprocess.Popen(
            [*command, record.queue_id],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        wanted = rng.randint(5, 120)
        acked = 0
        for line in child.stdout:
            assert line.startswith("acked "), line
            acked = int(line.split()[1])
            if acked >= wanted:
                break
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        for line in child.stdout.read().splitlines(keepends=True):
            if line.endswith("\n"):  # acknowledged before the kill, still in the pipe
                acked = int(line.split()[1])
        child.stdout.close()
        stored = decode(store.record_path(record.queue_id).read_bytes(), record.queue_id)
        attempts = {r.attempts for r in stored.recipients}
        assert len(attempts) == 1
        # The last acknowledged write is there, or the one after it (in flight at the kill).
        assert attempts <= {acked, acked + 1}
        leftovers = [n for n in names(store.root) if n.endswith(".tmp")]
        assert len(leftovers) <= 1
        loading = FileQueueStore(store.root, in_this_thread).load()
        recovered = loading.result
        assert [r.queue_id for r in recovered] == [record.queue_id]
        assert not [n for n in names(store.root) if n.endswith(".tmp")]
        assert not store.corrupt_dir.exists()


# --- the order of reads and writes, step by step ---------------------------------------------


class StepThreads:
    """A RunInThread that runs each job only when the test says so, so the interleaving of
    reads and batch writes is chosen, not left to timing.  Jobs run in the calling thread."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, tuple[Any, ...], defer.Deferred[Any]]] = []

    def __call__(self, function: Any, *args: Any) -> defer.Deferred[Any]:
        done: defer.Deferred[Any] = defer.Deferred()
        self.jobs.append((function, args, done))
        return done

    def names(self) -> list[str]:
        return [function.__name__ for function, _, _ in self.jobs]

    def run(self, name: str) -> tuple[Any, defer.Deferred[Any]]:
        """Run the first job called ``name``; returns its result and its unfired Deferred."""
        (index,) = [n for n, job in enumerate(self.jobs) if job[0].__name__ == name][:1]
        function, args, done = self.jobs.pop(index)
        return function(*args), done

    def finish(self, name: str) -> None:
        result, done = self.run(name)
        done.callback(result)


def test_a_read_sees_a_write_not_yet_started(tmp_path: Path) -> None:
    steps = StepThreads()
    store = FileQueueStore(tmp_path / "queue", steps)
    record = commit(store, tmp_path / "spool", accepted())
    later = deferred(record, attempts=4)
    written = store.update(later)
    assert steps.names() == ["_write_batch"]
    read = store.get(record.queue_id)
    assert read.called and read.result == later  # from memory: no job queued for it
    assert steps.names() == ["_write_batch"]
    steps.finish("_write_batch")
    assert written.called and written.result is None
    assert decode(store.record_path(record.queue_id).read_bytes()) == later


class UncachedQueueStore(FileQueueStore):
    """The queue store reading every record from disk (as the outbox does)."""

    cache_records = False


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
def test_a_read_overtaken_by_a_write_is_done_again(tmp_path: Path, cached: bool) -> None:
    steps = StepThreads()
    store = (FileQueueStore if cached else UncachedQueueStore)(tmp_path / "queue", steps)
    record = commit(store, tmp_path / "spool", accepted())  # not remembered: read from disk
    bumped = store.modify(
        record.queue_id, lambda r: deferred(r, attempts=r.recipients[0].attempts + 1)
    )
    old, read = steps.run("_read_blocking")  # read from disk: attempts 0 ...
    written = store.update(deferred(record, attempts=10))  # ... then a write gets in first
    steps.finish("_write_batch")
    assert written.called
    read.callback(old)  # the stale read arrives: the change must not be applied to it
    if cached:  # done again on the version the write left in memory
        assert steps.names() == ["_write_batch"]
    else:  # done again on a second read from disk
        assert steps.names() == ["_read_blocking"]
        steps.finish("_read_blocking")
    steps.finish("_write_batch")
    assert bumped.called
    final = decode(store.record_path(record.queue_id).read_bytes())
    assert [r.attempts for r in final.recipients] == [11, 11]


def test_remembered_and_written_records_are_read_from_memory(tmp_path: Path) -> None:
    steps = StepThreads()
    store = FileQueueStore(tmp_path / "queue", steps)
    record = commit(store, tmp_path / "spool", accepted())
    store.remember([record])  # what the queue sink does after the committer's sync
    bumped = store.modify(record.queue_id, lambda r: deferred(r, attempts=3))
    assert steps.names() == ["_write_batch"], "no read from disk"
    steps.finish("_write_batch")
    assert bumped.called
    again = store.modify(
        record.queue_id, lambda r: deferred(r, attempts=r.recipients[0].attempts + 1)
    )
    assert steps.names() == ["_write_batch"], "the written version is served from memory"
    steps.finish("_write_batch")
    assert again.called
    final = decode(store.record_path(record.queue_id).read_bytes())
    assert [r.attempts for r in final.recipients] == [4, 4]
    removed = store.remove(record.queue_id)
    steps.finish("_write_batch")
    assert removed.called
    got: list[Any] = []
    store.get(record.queue_id).addCallback(got.append)
    assert steps.names() == ["_read_blocking"], "a removed record is not served from memory"
    steps.finish("_read_blocking")
    assert got == [None]


def test_a_failed_write_is_forgotten_so_the_disk_is_read_again(tmp_path: Path) -> None:
    steps = StepThreads()
    store = FileQueueStore(tmp_path / "queue", steps)
    record = commit(store, tmp_path / "spool", accepted())
    store.remember([record])
    failing = store.update(deferred(record, attempts=3))
    _function, _args, done = steps.jobs.pop(0)
    done.errback(OSError(28, "No space left on device"))
    failures: list[Any] = []
    failing.addErrback(failures.append)
    assert failures
    got: list[Any] = []
    store.get(record.queue_id).addCallback(got.append)
    assert steps.names() == ["_read_blocking"]
    steps.finish("_read_blocking")
    assert [r.attempts for r in got[0].recipients] == [0, 0]
