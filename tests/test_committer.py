"""The group committer: batches of messages made durable with a few filesystem syncs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from mailsrv.delivery.committer import GroupCommitter, filesystem_syncer
from mailsrv.delivery.maildir import MaildirStore
from mailsrv.delivery.spool import Spool


class Rig:
    """A spool, a Maildir store and a running committer under ``tmp_path``."""

    def __init__(self, tmp_path: Path, sync: Any = None) -> None:
        from twisted.internet import reactor

        self.spool = Spool(tmp_path / "spool", lambda f, *a: threads.deferToThread(f, *a))
        self.spool.prepare()
        self.store = MaildirStore(tmp_path / "mail", "mx.example.org")
        self.syncs: list[int] = []
        real = filesystem_syncer(tmp_path)

        def counting_sync() -> None:
            self.syncs.append(1)
            (sync or real)()

        self.committer = GroupCommitter(reactor, self.store, counting_sync)
        self.committer.startService()

    def message(self, name: str, body: bytes) -> Any:
        spool_file = self.spool.open(name, lambda: None, lambda: None)
        spool_file.write(body)
        return spool_file

    def new(self, mailbox: str) -> list[Path]:
        local, _, domain = mailbox.partition("@")
        folder = self.store.root / domain / local / "new"
        return sorted(folder.iterdir()) if folder.exists() else []


@pytest_twisted.ensureDeferred
async def test_concurrent_messages_share_syncs_and_arrive_whole(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    try:
        bodies = {f"Q{n:03d}": f"Subject: {n}\n\n{'x' * n}\n".encode() for n in range(60)}
        results = await defer.gatherResults(
            [
                rig.committer.commit(rig.message(qid, body), ("alice@example.org",))
                for qid, body in bodies.items()
            ]
        )
    finally:
        await rig.committer.stopService()
    assert all(len(paths) == 1 for paths in results)
    stored = sorted(path.read_bytes() for path in rig.new("alice@example.org"))
    assert stored == sorted(bodies.values())
    assert list(rig.spool.incoming.iterdir()) == []
    assert rig.committer.messages == 60
    assert len(rig.syncs) == 2 * rig.committer.batches
    assert rig.committer.batches < 60  # they were grouped


@pytest_twisted.ensureDeferred
async def test_multi_mailbox_message_is_linked_to_each(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    try:
        paths = await rig.committer.commit(
            rig.message("QMULTI", b"hello\n"), ("alice@example.org", "bob@example.org")
        )
    finally:
        await rig.committer.stopService()
    assert [p.read_bytes() for p in paths] == [b"hello\n", b"hello\n"]
    assert all(p.name.endswith(",S=6") for p in paths)


@pytest_twisted.ensureDeferred
async def test_a_failed_sync_fails_the_whole_batch(tmp_path: Path) -> None:
    def broken() -> None:
        raise OSError(5, "Input/output error")

    rig = Rig(tmp_path, sync=broken)
    try:
        with pytest.raises(OSError, match="Input/output error"):
            await rig.committer.commit(rig.message("QFAIL", b"x\n"), ("alice@example.org",))
    finally:
        await rig.committer.stopService()
    assert rig.new("alice@example.org") == []


@pytest_twisted.ensureDeferred
async def test_a_bad_mailbox_fails_only_its_message(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    try:
        good = rig.committer.commit(rig.message("QGOOD", b"ok\n"), ("alice@example.org",))
        bad = rig.committer.commit(rig.message("QBAD", b"no\n"), ("../escape@example.org",))
        assert len(await good) == 1
        with pytest.raises(ValueError, match="unsafe mailbox"):
            await bad
    finally:
        await rig.committer.stopService()


@pytest_twisted.ensureDeferred
async def test_stop_finishes_queued_work_then_refuses(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    pending = [
        rig.committer.commit(rig.message(f"QS{n}", b"x\n"), ("alice@example.org",))
        for n in range(10)
    ]
    await rig.committer.stopService()
    assert len(await defer.gatherResults(pending)) == 10
    with pytest.raises(RuntimeError, match="not running"):
        await rig.committer.commit(rig.message("QLATE", b"x\n"), ("alice@example.org",))


def test_filesystem_syncer_runs(tmp_path: Path) -> None:
    filesystem_syncer(tmp_path)()


class SnapshotSyncer:
    """A syncer that records, at every sync, what each mailbox's ``new/`` holds; can fail."""

    def __init__(self, root: Path, mailboxes: tuple[str, ...], fail_on: int = 0) -> None:
        self.root = root
        self.mailboxes = mailboxes
        self.fail_on = fail_on
        self.snapshots: list[dict[str, int]] = []

    def __call__(self) -> None:
        snapshot = {}
        for mailbox in self.mailboxes:
            local, _, domain = mailbox.partition("@")
            folder = self.root / domain / local / "new"
            snapshot[mailbox] = len(list(folder.iterdir())) if folder.is_dir() else 0
        self.snapshots.append(snapshot)
        if len(self.snapshots) == self.fail_on:
            raise OSError(5, "Input/output error")


@pytest_twisted.ensureDeferred
async def test_a_failed_link_is_rolled_back_before_the_second_sync(tmp_path: Path) -> None:
    """All or nothing: the message with a broken mailbox leaves no copy anywhere, even for the
    sync that makes the batch durable; the other message of the batch is delivered."""
    mailboxes = ("alice@example.org", "bob@example.org", "carol@example.net")
    syncer = SnapshotSyncer(tmp_path / "mail", mailboxes)
    rig = Rig(tmp_path, sync=syncer)
    broken = rig.store.maildir("carol@example.net")
    broken.mkdir(parents=True)
    (broken / "new").write_bytes(b"not a directory")
    try:
        bad = rig.committer.commit(rig.message("QBAD", b"no\n"), mailboxes)
        good = rig.committer.commit(rig.message("QGOOD", b"ok\n"), ("alice@example.org",))
        assert len(await good) == 1
        with pytest.raises(NotADirectoryError):
            await bad
    finally:
        await rig.committer.stopService()
    assert [p.read_bytes() for p in rig.new("alice@example.org")] == [b"ok\n"]
    assert rig.new("bob@example.org") == []
    # Every second sync (the one before the replies) saw no copy of QBAD: bob never had one.
    assert all(snapshot["bob@example.org"] == 0 for snapshot in syncer.snapshots[1::2])
    assert syncer.snapshots[-1]["alice@example.org"] == 1
    assert (rig.spool.incoming / "QBAD").stat().st_nlink == 1  # the session discards it


@pytest_twisted.ensureDeferred
async def test_a_failed_second_sync_removes_the_links(tmp_path: Path) -> None:
    mailboxes = ("alice@example.org", "bob@example.org")
    syncer = SnapshotSyncer(tmp_path / "mail", mailboxes, fail_on=2)
    rig = Rig(tmp_path, sync=syncer)
    try:
        with pytest.raises(OSError, match="Input/output error"):
            await rig.committer.commit(rig.message("QSYNC", b"x\n"), mailboxes)
    finally:
        await rig.committer.stopService()
    assert syncer.snapshots[1] == {"alice@example.org": 1, "bob@example.org": 1}  # linked...
    assert rig.new("alice@example.org") == rig.new("bob@example.org") == []  # ...and removed


def test_filesystem_syncer_syncs_each_filesystem_once(tmp_path: Path) -> None:
    """Mail and spool on two filesystems: both are synced; directories not made yet count as
    their parent's filesystem."""
    synced: list[int] = []

    def sync_fd(fd: int) -> None:
        synced.append(os.fstat(fd).st_dev)

    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem")
    sync = filesystem_syncer(
        tmp_path / "spool", tmp_path / "not" / "yet", other / "mailsrv-not-made", sync_fd=sync_fd
    )
    sync()
    assert synced == [tmp_path.stat().st_dev, other.stat().st_dev]
    synced.clear()
    filesystem_syncer(tmp_path / "spool", tmp_path / "mail", sync_fd=sync_fd)()
    assert synced == [tmp_path.stat().st_dev]
