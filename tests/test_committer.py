"""The group committer: batches of accepted messages made durable through sinks with two syncs.

The committer's own thread runs against the real reactor here; the syncers and sinks below
record what they see (the Maildir sink is the real one, on ``tmp_path``).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, threads
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailsrv.delivery.committer import GroupCommitter
from mailsrv.delivery.envelope import (
    AcceptedMessage,
    ClientFacts,
    LocalRoute,
    Recipient,
    RemoteRoute,
)
from mailsrv.delivery.fssync import filesystem_syncer
from mailsrv.delivery.maildir import MaildirSink, MaildirStore
from mailsrv.delivery.sinks import (
    Failures,
    ICommitPreparer,
    ICommitSink,
    PendingBody,
    StagedMessage,
)
from mailsrv.delivery.spool import Spool, SpoolFile
from tests.conftest import make_config

NOW = 1_700_000_000.5
ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.net"


def accepted(
    queue_id: str, local: Sequence[str], size: int, remote: Sequence[str] = ()
) -> AcceptedMessage:
    """A message for ``local`` mailboxes (one recipient each) and ``remote`` addresses."""
    recipients = [Recipient(mailbox, LocalRoute((mailbox,))) for mailbox in local]
    recipients += [Recipient(a, RemoteRoute(a.rpartition("@")[2])) for a in remote]
    client = ClientFacts(ip="192.0.2.7", helo="client.test", listener="mx")
    return AcceptedMessage(queue_id, "sender@remote.test", tuple(recipients), client, NOW, size)


@implementer(ICommitSink)
class RecordingSink:
    """Records its calls in ``events``; fails the queue ids in ``fail``, or everything."""

    def __init__(
        self,
        name: str,
        events: list[Any],
        fail: frozenset[str] = frozenset(),
        raise_all: bool = False,
        inner: ICommitSink | None = None,
    ) -> None:
        self.name = name
        self.events = events
        self.fail = fail
        self.raise_all = raise_all
        self.inner = inner
        self.seen: list[str] = []
        self.messages: list[AcceptedMessage] = []
        self.rolled_back: list[str] = []
        self.committed_in: list[tuple[str, list[str]]] = []

    def write(self, batch: Sequence[StagedMessage]) -> Failures:
        self.events.append(f"write {self.name}")
        self.seen.extend(staged.queue_id for staged in batch)
        self.messages.extend(staged.message for staged in batch)
        failures = dict(self.inner.write(batch)) if self.inner is not None else {}
        if self.raise_all:
            raise RuntimeError(f"{self.name} is broken")
        for staged in batch:
            if staged.queue_id in self.fail:
                if self.inner is not None:
                    self.inner.rollback(staged)
                failures[staged.queue_id] = OSError(28, f"{self.name} is full")
        return failures

    def rollback(self, staged: StagedMessage) -> None:
        self.events.append(f"rollback {self.name} {staged.queue_id}")
        self.rolled_back.append(staged.queue_id)
        if self.inner is not None:
            self.inner.rollback(staged)

    def committed(self, messages: Sequence[AcceptedMessage]) -> None:
        self.events.append(f"committed {self.name}")
        ids = [message.queue_id for message in messages]
        self.committed_in.append((threading.current_thread().name, ids))


class ToyQueue:
    """A relay queue store with the blocking methods the real one offers: one JSON record and
    one hard link of the body per message, no fsync."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def stage_blocking(self, message: AcceptedMessage, body_path: Path) -> None:
        os.link(body_path, self.root / f"{message.queue_id}.body")
        record = {"sender": message.sender, "to": [r.address for r in message.remote_recipients]}
        (self.root / f"{message.queue_id}.json").write_text(json.dumps(record))

    def unstage_blocking(self, queue_id: str) -> None:
        for suffix in (".json", ".body"):
            (self.root / f"{queue_id}{suffix}").unlink(missing_ok=True)


@implementer(ICommitSink)
class QueueSink:
    """The adapter the relay queue needs (as in the sinks module's docstring)."""

    name = "queue"

    def __init__(self, queue: ToyQueue) -> None:
        self._queue = queue
        self.scheduled: list[str] = []

    def write(self, batch: Sequence[StagedMessage]) -> Failures:
        failures: dict[str, BaseException] = {}
        for staged in batch:
            if staged.message.remote_recipients:
                try:
                    self._queue.stage_blocking(staged.message, staged.body)
                except Exception as e:
                    failures[staged.queue_id] = e
        return failures

    def rollback(self, staged: StagedMessage) -> None:
        if staged.message.remote_recipients:
            self._queue.unstage_blocking(staged.queue_id)

    def committed(self, messages: Sequence[AcceptedMessage]) -> None:
        self.scheduled.extend(m.queue_id for m in messages if m.remote_recipients)


class Rig:
    """A spool, the Maildir sink (plus ``extra`` sinks) and a running committer."""

    def __init__(
        self,
        tmp_path: Path,
        sync: Any = None,
        extra: Sequence[ICommitSink] = (),
        wrap: Callable[[MaildirSink], ICommitSink] | None = None,
        preparers: Sequence[ICommitPreparer] = (),
    ) -> None:
        from twisted.internet import reactor

        self.spool = Spool(tmp_path / "spool", lambda f, *a: threads.deferToThread(f, *a))
        self.spool.prepare()
        self.store = MaildirStore(tmp_path / "mail", "mx.example.org")
        self.maildir = MaildirSink(self.store)
        self.syncs: list[int] = []
        real = filesystem_syncer(tmp_path)

        def counting_sync() -> None:
            self.syncs.append(1)
            (sync or real)()

        first = wrap(self.maildir) if wrap is not None else self.maildir
        self.committer = GroupCommitter(
            reactor, [first, *extra], counting_sync, preparers=preparers
        )
        self.committer.startService()

    def message(self, name: str, body: bytes) -> SpoolFile:
        spool_file = self.spool.open(name, lambda: None, lambda: None)
        spool_file.write(body)
        return spool_file

    def commit(
        self, queue_id: str, body: bytes, local: Sequence[str], remote: Sequence[str] = ()
    ) -> defer.Deferred[AcceptedMessage]:
        message = accepted(queue_id, local, len(body), remote)
        return self.committer.commit(message, self.message(queue_id, body))

    def new(self, mailbox: str) -> list[Path]:
        local, _, domain = mailbox.partition("@")
        folder = self.store.root / domain / local / "new"
        return sorted(folder.iterdir()) if folder.exists() else []


# --- batches and syncs -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_concurrent_messages_share_syncs_and_arrive_whole(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    try:
        bodies = {f"Q{n:03d}": f"Subject: {n}\n\n{'x' * n}\n".encode() for n in range(60)}
        results = await defer.gatherResults(
            [rig.commit(qid, body, (ALICE,)) for qid, body in bodies.items()]
        )
    finally:
        await rig.committer.stopService()
    assert [message.queue_id for message in results] == list(bodies)
    stored = sorted(path.read_bytes() for path in rig.new(ALICE))
    assert stored == sorted(bodies.values())
    assert list(rig.spool.incoming.iterdir()) == []
    assert rig.committer.messages == 60
    assert len(rig.syncs) == 2 * rig.committer.batches
    assert rig.committer.batches < 60  # they were grouped


@pytest_twisted.ensureDeferred
async def test_multi_mailbox_message_is_linked_to_each(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    try:
        await rig.commit("QMULTI", b"hello\n", (ALICE, BOB))
    finally:
        await rig.committer.stopService()
    [to_alice], [to_bob] = rig.new(ALICE), rig.new(BOB)
    assert to_alice.read_bytes() == to_bob.read_bytes() == b"hello\n"
    assert to_alice.stat().st_ino == to_bob.stat().st_ino  # one body, two names
    assert to_alice.name.startswith("1700000000.M500000P") and to_alice.name.endswith(",S=6")


@pytest_twisted.ensureDeferred
async def test_a_failed_sync_fails_the_whole_batch(tmp_path: Path) -> None:
    def broken() -> None:
        raise OSError(5, "Input/output error")

    rig = Rig(tmp_path, sync=broken)
    try:
        with pytest.raises(OSError, match="Input/output error"):
            await rig.commit("QFAIL", b"x\n", (ALICE,))
    finally:
        await rig.committer.stopService()
    assert rig.new(ALICE) == []


@pytest_twisted.ensureDeferred
async def test_a_bad_mailbox_fails_only_its_message(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    try:
        good = rig.commit("QGOOD", b"ok\n", (ALICE,))
        bad = rig.commit("QBAD", b"no\n", ("../escape@example.org",))
        assert (await good).queue_id == "QGOOD"
        with pytest.raises(ValueError, match="unsafe mailbox"):
            await bad
    finally:
        await rig.committer.stopService()


@pytest_twisted.ensureDeferred
async def test_stop_finishes_queued_work_then_refuses(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    pending = [rig.commit(f"QS{n}", b"x\n", (ALICE,)) for n in range(10)]
    await rig.committer.stopService()
    assert len(await defer.gatherResults(pending)) == 10
    with pytest.raises(RuntimeError, match="not running"):
        await rig.commit("QLATE", b"x\n", (ALICE,))


# --- the order of a commit ---------------------------------------------------------------------


class OrderSyncer:
    """Records each sync with what is on disk then: spool file sizes, Maildir copies."""

    def __init__(self, events: list[Any], spool: Path, mail: Path) -> None:
        self.events = events
        self.spool = spool
        self.mail = mail

    def __call__(self) -> None:
        sizes = sorted(path.stat().st_size for path in self.spool.iterdir())
        copies = len(list(self.mail.glob("*/*/new/*")))
        self.events.append(f"sync: spool {sizes}, {copies} copies")


@pytest_twisted.ensureDeferred
async def test_finish_sync_write_sync_reply_committed(tmp_path: Path) -> None:
    """The order, with the committer thread: the body finished before the first sync, every
    sink written between the syncs, the reply after the second, the hooks after the reply."""
    events: list[Any] = []
    body = b"Subject: order\n\n" + b"y" * 300_000 + b"\n"  # partly still in memory at the end
    syncer = OrderSyncer(events, tmp_path / "spool" / "incoming", tmp_path / "mail")
    records = RecordingSink("records", events)
    rig = Rig(
        tmp_path,
        sync=syncer,
        extra=[records],
        wrap=lambda sink: RecordingSink("maildir", events, inner=sink),
    )
    try:
        committed = rig.commit("QORDER", body, (ALICE,))
        committed.addCallback(lambda message: events.append(f"reply {message.queue_id}"))
        await committed
    finally:
        await rig.committer.stopService()
    assert events == [
        f"sync: spool [{len(body)}], 0 copies",
        "write maildir",
        "write records",
        f"sync: spool [{len(body)}], 1 copies",
        "reply QORDER",
        "committed maildir",
        "committed records",
    ]
    assert records.committed_in == [(threading.main_thread().name, ["QORDER"])]
    assert list(rig.spool.incoming.iterdir()) == []


def test_the_250_goes_out_after_the_second_sync(tmp_path: Path) -> None:
    """Through a real session (in memory, inline committer): the order on the wire, and the
    accepted message the session builds for the sinks."""
    from twisted.internet import task

    from mailsrv.smtp.server import SMTPServer
    from mailsrv.smtp.session import SMTPSession

    events: list[Any] = []
    config = make_config(tmp_path)
    syncer = OrderSyncer(events, config.spool_dir / "incoming", config.mail_dir)
    store = MaildirStore(config.mail_dir, config.server_name)
    maildir = RecordingSink("maildir", events, inner=MaildirSink(store))
    committer = GroupCommitter.inline([maildir], syncer)
    committer.startService()
    clock = task.Clock()
    clock.advance(NOW)
    server = SMTPServer(config, clock, defer.maybeDeferred, committer)
    server.spool.prepare()

    class Wire(StringTransport):
        def write(self, data: bytes) -> None:
            events.append(f"reply {data[:3].decode()}")

    session = SMTPSession(server, "mx")
    session.makeConnection(Wire(peerAddress=IPv4Address("TCP", "198.51.100.9", 40001)))
    lines = [b"EHLO client.test", b"MAIL FROM:<s@remote.test>", b"RCPT TO:<info@example.org>"]
    lines += [b"RCPT TO:<carol@example.net>", b"DATA"]
    for line in lines:
        session.dataReceived(line + b"\r\n")
    events.clear()
    session.dataReceived(b"Subject: wire\r\n\r\nhello\r\n.\r\n")
    [message] = maildir.messages
    stored = store.maildir(ALICE) / "new"
    [copy] = stored.iterdir()
    # (Inline, commit() returns a fired Deferred: the hooks ran before the session's callbacks;
    # the threaded order, reply then hooks, is the test above.)
    assert [event for event in events if not event.startswith("committed")] == [
        f"sync: spool [{message.size}], 0 copies",
        "write maildir",
        f"sync: spool [{message.size}], 3 copies",
        "reply 250",
    ]
    assert message.sender == "s@remote.test"
    assert message.recipients == (
        Recipient("info@example.org", LocalRoute((ALICE, BOB))),
        Recipient(CAROL, LocalRoute((CAROL,))),
    )
    assert message.local_mailboxes == (ALICE, BOB, CAROL)
    assert message.client == ClientFacts(ip="198.51.100.9", helo="client.test", listener="mx")
    assert message.received_at == NOW
    assert message.size == copy.stat().st_size
    assert f"id {message.queue_id};".encode() in copy.read_bytes()
    session.connectionLost()


# --- all or nothing across sinks ---------------------------------------------------------------


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
    mailboxes = (ALICE, BOB, CAROL)
    syncer = SnapshotSyncer(tmp_path / "mail", mailboxes)
    rig = Rig(tmp_path, sync=syncer)
    broken = rig.store.maildir(CAROL)
    broken.mkdir(parents=True)
    (broken / "new").write_bytes(b"not a directory")
    try:
        bad = rig.commit("QBAD", b"no\n", mailboxes)
        good = rig.commit("QGOOD", b"ok\n", (ALICE,))
        await good
        with pytest.raises(NotADirectoryError):
            await bad
    finally:
        await rig.committer.stopService()
    assert [p.read_bytes() for p in rig.new(ALICE)] == [b"ok\n"]
    assert rig.new(BOB) == []
    # Every second sync (the one before the replies) saw no copy of QBAD: bob never had one.
    assert all(snapshot[BOB] == 0 for snapshot in syncer.snapshots[1::2])
    assert syncer.snapshots[-1][ALICE] == 1
    assert (rig.spool.incoming / "QBAD").stat().st_nlink == 1  # the session discards it


@pytest_twisted.ensureDeferred
async def test_a_failed_second_sync_rolls_back_every_sink(tmp_path: Path) -> None:
    events: list[Any] = []
    syncer = SnapshotSyncer(tmp_path / "mail", (ALICE, BOB), fail_on=2)
    records = RecordingSink("records", events)
    rig = Rig(tmp_path, sync=syncer, extra=[records])
    try:
        with pytest.raises(OSError, match="Input/output error"):
            await rig.commit("QSYNC", b"x\n", (ALICE, BOB))
    finally:
        await rig.committer.stopService()
    assert syncer.snapshots[1] == {ALICE: 1, BOB: 1}  # linked...
    assert rig.new(ALICE) == rig.new(BOB) == []  # ...and removed
    assert records.rolled_back == ["QSYNC"]
    assert records.committed_in == []


@pytest_twisted.ensureDeferred
async def test_a_sink_failing_a_message_rolls_back_the_sinks_before_it(tmp_path: Path) -> None:
    """A record store that fails one message: its Maildir copies go, the sinks after it never
    see it, it fails with that sink's error; the other message is committed everywhere."""
    events: list[Any] = []
    full = RecordingSink("records", events, fail=frozenset({"QBAD"}))
    after = RecordingSink("outbox", events)
    rig = Rig(tmp_path, extra=[full, after])
    try:
        bad = rig.commit("QBAD", b"bad\n", (ALICE, BOB))
        good = rig.commit("QGOOD", b"good\n", (ALICE, BOB))
        await good
        with pytest.raises(OSError, match="records is full"):
            await bad
    finally:
        await rig.committer.stopService()
    assert [p.read_bytes() for p in rig.new(ALICE) + rig.new(BOB)] == [b"good\n", b"good\n"]
    assert "QBAD" in full.seen and "QBAD" not in after.seen
    assert full.rolled_back == after.rolled_back == []  # the failing sink cleans up itself
    assert [qid for _, ids in after.committed_in for qid in ids] == ["QGOOD"]


@pytest_twisted.ensureDeferred
async def test_a_sink_that_raises_fails_its_batch_and_is_rolled_back(tmp_path: Path) -> None:
    events: list[Any] = []
    broken = RecordingSink("records", events, raise_all=True)
    rig = Rig(tmp_path, extra=[broken])
    try:
        with capturedLogs() as logged, pytest.raises(RuntimeError, match="records is broken"):
            await rig.commit("QRAISE", b"x\n", (ALICE,))
    finally:
        await rig.committer.stopService()
    assert rig.new(ALICE) == []
    assert broken.rolled_back == ["QRAISE"]  # it may hold a part: its rollback decides
    assert any("sink {sink} failed a batch" in event["log_format"] for event in logged)


@pytest_twisted.ensureDeferred
async def test_a_failing_rollback_is_logged_and_the_others_still_run(tmp_path: Path) -> None:
    events: list[Any] = []

    class StuckSink(RecordingSink):
        def rollback(self, staged: StagedMessage) -> None:
            super().rollback(staged)
            raise OSError(30, "Read-only file system")

    stuck = StuckSink("stuck", events)
    failing = RecordingSink("records", events, fail=frozenset({"QSTUCK"}))
    rig = Rig(tmp_path, extra=[stuck, failing])
    try:
        with capturedLogs() as logged, pytest.raises(OSError, match="records is full"):
            await rig.commit("QSTUCK", b"x\n", (ALICE,))
    finally:
        await rig.committer.stopService()
    assert stuck.rolled_back == ["QSTUCK"]
    assert rig.new(ALICE) == []  # the Maildir sink was rolled back after the stuck one
    [event] = [e for e in logged if "could not roll back" in e["log_format"]]
    assert (event["queue_id"], event["sink"]) == ("QSTUCK", "stuck")


# --- local and remote recipients: one commit ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_local_and_remote_recipients_are_committed_together(tmp_path: Path) -> None:
    """Delivered locally and queued in one batch, two syncs; the body is stored once."""
    queue = QueueSink(ToyQueue(tmp_path / "spool" / "queue"))
    rig = Rig(tmp_path, extra=[queue])
    try:
        mixed = await rig.commit("QMIX", b"mixed\n", (ALICE,), ("dave@remote.test",))
        syncs_for_one = len(rig.syncs)
        await rig.commit("QLOCAL", b"local\n", (BOB,))
        await rig.commit("QFAR", b"far\n", (), ("erin@far.test",))
    finally:
        await rig.committer.stopService()
    assert mixed.queue_id == "QMIX"
    assert syncs_for_one == 2
    [copy] = rig.new(ALICE)
    body = tmp_path / "spool" / "queue" / "QMIX.body"
    assert copy.stat().st_ino == body.stat().st_ino and copy.stat().st_nlink == 2
    record = json.loads((tmp_path / "spool" / "queue" / "QMIX.json").read_text())
    assert record == {"sender": "sender@remote.test", "to": ["dave@remote.test"]}
    assert not (tmp_path / "spool" / "queue" / "QLOCAL.json").exists()
    assert (tmp_path / "spool" / "queue" / "QFAR.body").read_bytes() == b"far\n"
    assert len(rig.new(BOB)) == 1 and rig.new("erin@example.org") == []
    assert queue.scheduled == ["QMIX", "QFAR"]
    assert list(rig.spool.incoming.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_a_queue_failure_takes_the_local_copies_back(tmp_path: Path) -> None:
    queue_dir = tmp_path / "spool" / "queue"
    queue = QueueSink(ToyQueue(queue_dir))
    rig = Rig(tmp_path, extra=[queue])
    (queue_dir / "QDUP.body").write_bytes(b"left over\n")  # makes the hard link fail
    try:
        with pytest.raises(FileExistsError):
            await rig.commit("QDUP", b"dup\n", (ALICE, BOB), ("dave@remote.test",))
    finally:
        await rig.committer.stopService()
    assert rig.new(ALICE) == rig.new(BOB) == []
    assert queue.scheduled == []


# --- preparers ---------------------------------------------------------------------------------


@implementer(ICommitPreparer)
class HeaderPreparer:
    """Reads each pending body whole in a thread and adds a header naming its length; holds
    the messages in ``hold`` until released; fails those in ``fail``; skips those in ``skip``."""

    name = "test"

    def __init__(self) -> None:
        self.hold: dict[str, defer.Deferred[None]] = {}
        self.fail: set[str] = set()
        self.skip: set[str] = set()
        self.bodies: dict[str, bytes] = {}
        self.rests: dict[str, bytes] = {}

    def prepare(
        self, message: AcceptedMessage, body: PendingBody
    ) -> defer.Deferred[AcceptedMessage] | None:
        if message.queue_id in self.skip:
            return None
        return defer.Deferred.fromCoroutine(self._prepare(message, body))

    async def _prepare(self, message: AcceptedMessage, body: PendingBody) -> AcceptedMessage:
        if message.queue_id in self.hold:
            await self.hold[message.queue_id]
        if message.queue_id in self.fail:
            raise OSError(12, "Cannot allocate memory")
        content: bytes = await threads.deferToThread(read_pending, body)
        self.bodies[message.queue_id] = content
        self.rests[message.queue_id] = body.rest
        return replace(message, relay_headers=f"X-Length: {len(content)}\n".encode())


def read_pending(body: PendingBody) -> bytes:
    written = body.path.read_bytes() if body.path.exists() else b""
    return written + body.rest


@pytest.mark.parametrize("size", [10, 300_000, 600_000])  # in memory, partly, mostly on disk
@pytest_twisted.ensureDeferred
async def test_a_preparer_sees_the_whole_body_and_its_version_is_committed(
    tmp_path: Path, size: int
) -> None:
    events: list[Any] = []
    preparer = HeaderPreparer()
    records = RecordingSink("records", events)
    rig = Rig(tmp_path, extra=[records], preparers=[preparer])
    assert verifyObject(ICommitPreparer, preparer)
    body = b"Subject: big\n\n" + b"z" * size + b"\n"
    spool_file = rig.spool.open("QPREP", lambda: None, lambda: None)
    for start in range(0, len(body), 1000):  # as DATA arrives: the last part stays in memory
        spool_file.write(body[start : start + 1000])
    message = accepted("QPREP", (ALICE,), len(body), ("dave@remote.test",))
    try:
        committed = await rig.committer.commit(message, spool_file)
    finally:
        await rig.committer.stopService()
    assert preparer.bodies == {"QPREP": body}
    rest = preparer.rests["QPREP"]
    assert body.endswith(rest) and 0 < len(rest) <= 256 * 1024  # the spool's chunk
    assert (rest == body) == (size == 10)
    assert committed.relay_headers == f"X-Length: {len(body)}\n".encode()
    assert records.messages == [committed]  # the sinks got the prepared version
    [copy] = rig.new(ALICE)
    assert copy.read_bytes() == body  # the body itself is untouched


@pytest_twisted.ensureDeferred
async def test_a_message_being_prepared_holds_up_no_other(tmp_path: Path) -> None:
    preparer = HeaderPreparer()
    preparer.hold["QSLOW"] = defer.Deferred()
    preparer.skip.add("QSKIP")
    rig = Rig(tmp_path, preparers=[preparer])
    try:
        slow = rig.commit("QSLOW", b"slow\n", (ALICE,))
        fast = await rig.commit("QFAST", b"fast\n", (ALICE,))
        skipped = await rig.commit("QSKIP", b"skip\n", (ALICE,))
        assert not slow.called
        assert fast.relay_headers == b"X-Length: 5\n"
        assert skipped.relay_headers == b""  # nothing to do: committed as it came
        preparer.hold["QSLOW"].callback(None)
        assert (await slow).relay_headers == b"X-Length: 5\n"
    finally:
        await rig.committer.stopService()
    assert len(rig.new(ALICE)) == 3


@pytest_twisted.ensureDeferred
async def test_a_failing_preparer_fails_the_commit_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    events: list[Any] = []
    preparer = HeaderPreparer()
    preparer.fail.add("QNOMEM")
    records = RecordingSink("records", events)
    rig = Rig(tmp_path, extra=[records], preparers=[preparer])
    try:
        with pytest.raises(OSError, match="Cannot allocate memory"):
            await rig.commit("QNOMEM", b"x\n", (ALICE,))
    finally:
        await rig.committer.stopService()
    assert records.seen == [] and rig.new(ALICE) == []


# --- interfaces and the inline committer ---------------------------------------------------------


def test_sinks_provide_the_interface(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "mail", "mx.example.org")
    for sink in (
        MaildirSink(store),
        RecordingSink("r", []),
        QueueSink(ToyQueue(tmp_path / "q")),
    ):
        assert verifyObject(ICommitSink, sink)


def test_inline_committer_refuses_when_stopped(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", defer.maybeDeferred)
    spool.prepare()
    committer = GroupCommitter.inline([], lambda: None)
    spool_file = spool.open("QOFF", lambda: None, lambda: None)
    failures: list[Any] = []
    committer.commit(accepted("QOFF", (ALICE,), 0), spool_file).addErrback(failures.append)
    assert [f.getErrorMessage() for f in failures] == ["the committer is not running"]


# --- the filesystem syncer ---------------------------------------------------------------------


def test_filesystem_syncer_runs(tmp_path: Path) -> None:
    filesystem_syncer(tmp_path)()


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
