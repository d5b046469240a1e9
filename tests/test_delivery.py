"""Unit tests of the durable delivery path: the spool file and the Maildir store, on tmp_path."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.python.failure import Failure

from mailsrv.delivery.maildir import MaildirStore
from mailsrv.delivery.spool import Spool, SpoolFile

NOW = 1_700_000_000.25  # every delivery below happens "in the same second"


def sync_run(function: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    """A run_in_thread that runs at once, in this thread."""
    return defer.maybeDeferred(function, *args, **kwargs)


def result_of(d: defer.Deferred[Any]) -> Any:
    """The result of an already-fired Deferred (raises its failure)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    outcome = results[0]
    if isinstance(outcome, Failure):
        outcome.raiseException()
    return outcome


@pytest.fixture
def store(tmp_path: Path) -> MaildirStore:
    return MaildirStore(tmp_path / "mail", "mx.example.org")


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    path = tmp_path / "spool" / "incoming"
    path.mkdir(parents=True)
    return path


def directory_listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def make_spool_file(spool_dir: Path, name: str, content: bytes) -> Path:
    path = spool_dir / name
    path.write_bytes(content)
    return path


# --- MaildirStore ------------------------------------------------------------------------------


def test_maildir_layout_is_created(store: MaildirStore, tmp_path: Path) -> None:
    maildir = store.maildir("alice@example.org")
    assert maildir == tmp_path / "mail" / "example.org" / "alice"
    store.ensure(maildir)
    for sub in ("tmp", "new", "cur"):
        assert (maildir / sub).is_dir()
    store.ensure(maildir)  # idempotent


def test_deliver_creates_the_maildir(store: MaildirStore, spool_dir: Path) -> None:
    spool_file = make_spool_file(spool_dir, "Q1", b"Subject: x\n\nbody\n")
    [delivered] = store.deliver(spool_file, ["carol@example.net"], NOW)
    maildir = store.maildir("carol@example.net")
    assert {p.name for p in maildir.iterdir()} == {"tmp", "new", "cur"}
    assert delivered.parent == maildir / "new"
    assert delivered.read_bytes() == b"Subject: x\n\nbody\n"
    assert not spool_file.exists()


def test_unique_names_for_1000_deliveries_in_the_same_second(
    store: MaildirStore, spool_dir: Path
) -> None:
    paths = []
    for i in range(1000):
        spool_file = make_spool_file(spool_dir, f"Q{i}", f"message {i}\n".encode())
        paths.extend(store.deliver(spool_file, ["alice@example.org"], NOW))
    new = store.maildir("alice@example.org") / "new"
    names = sorted(p.name for p in new.iterdir())
    assert len(names) == len(set(names)) == 1000
    assert sorted(p.name for p in paths) == names
    contents = {p.read_bytes() for p in new.iterdir()}
    assert contents == {f"message {i}\n".encode() for i in range(1000)}
    assert all(name.startswith("1700000000.M250000P") for name in names)
    assert list(spool_dir.iterdir()) == []


def test_unique_name_format(store: MaildirStore) -> None:
    names = {store.unique_name(NOW, 10) for _ in range(1000)}
    assert len(names) == 1000
    name = store.unique_name(NOW, 1234)
    assert name.startswith(f"1700000000.M250000P{os.getpid()}Q")
    assert name.endswith(".mx.example.org,S=1234")
    assert "/" not in name and ":" not in name


def test_names_sort_in_arrival_order(store: MaildirStore) -> None:
    """Zero-padded microseconds: ``ls`` lists mail in the order it arrived."""
    times = [1_700_000_000.000005, 1_700_000_000.00005, 1_700_000_000.25, 1_700_000_000.999999]
    times += [1_700_000_001.0, 1_700_000_001.1]
    names = [store.unique_name(when, 10) for when in times]
    assert sorted(names) == names
    assert names[0].startswith("1700000000.M000005P")
    assert names[4].startswith("1700000001.M000000P")


def test_hostname_slash_and_colon_are_escaped(tmp_path: Path) -> None:
    name = MaildirStore(tmp_path, "odd/host:name").unique_name(NOW, 1)
    assert ".odd\\057host\\072name,S=1" in name
    assert "/" not in name and ":" not in name


def test_multi_mailbox_delivery_links_one_spool_file(store: MaildirStore, spool_dir: Path) -> None:
    content = b"Subject: to many\n\nhello\n"
    spool_file = make_spool_file(spool_dir, "QMULTI", content)
    mailboxes = ["alice@example.org", "bob@example.org", "carol@example.net", "alice@example.org"]
    delivered = store.deliver(spool_file, mailboxes, NOW)
    assert [p.parent.parent.name for p in delivered] == ["alice", "bob", "carol"]
    inodes = {p.stat().st_ino for p in delivered}
    assert len(inodes) == 1  # hard links of one file, not copies
    assert all(p.stat().st_nlink == 3 for p in delivered)
    assert all(p.read_bytes() == content for p in delivered)
    assert not spool_file.exists()
    assert list(spool_dir.iterdir()) == []
    for mailbox in ("alice@example.org", "bob@example.org", "carol@example.net"):
        assert len(list((store.maildir(mailbox) / "new").iterdir())) == 1
        assert list((store.maildir(mailbox) / "tmp").iterdir()) == []


@pytest.mark.parametrize("size", [0, 1, 4096, 300_001])
def test_size_in_name_is_the_file_size(store: MaildirStore, spool_dir: Path, size: int) -> None:
    spool_file = make_spool_file(spool_dir, "QSIZE", os.urandom(size))
    [delivered] = store.deliver(spool_file, ["alice@example.org"], NOW)
    assert delivered.name.endswith(f",S={size}")
    assert delivered.stat().st_size == size


@pytest.mark.parametrize(
    "mailbox", [".hidden@example.org", "a/b@example.org", "alice@exa/mple.org", "@example.org"]
)
def test_unsafe_mailbox_names_are_refused(store: MaildirStore, mailbox: str) -> None:
    with pytest.raises(ValueError, match="unsafe mailbox name"):
        store.maildir(mailbox)


@pytest.fixture
def other_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A directory on another filesystem than tmp_path (tmpfs /dev/shm), or skip."""
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem to deliver across")
    path = Path(tempfile.mkdtemp(prefix="mailsrv-test-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_delivery_across_filesystems_copies(store: MaildirStore, other_filesystem: Path) -> None:
    content = b"Subject: far\n\n" + os.urandom(100_000)
    spool_file = make_spool_file(other_filesystem, "QFAR", content)
    old_umask = os.umask(0o022)  # the usual default: copies must not follow it
    try:
        delivered = store.deliver(spool_file, ["alice@example.org", "bob@example.org"], NOW)
    finally:
        os.umask(old_umask)
    assert [p.read_bytes() for p in delivered] == [content, content]
    assert all(p.name.endswith(f",S={len(content)}") for p in delivered)
    assert not spool_file.exists()
    for path in delivered:
        assert list((path.parent.parent / "tmp").iterdir()) == []
        assert path.stat().st_mode & 0o777 == 0o600


def test_copy_that_fails_leaves_nothing(store: MaildirStore, other_filesystem: Path) -> None:
    """Across filesystems a failed mailbox removes the copies made before it; tmp/ stays empty."""
    broken = store.maildir("bob@example.org")
    broken.mkdir(parents=True)
    (broken / "new").write_bytes(b"not a directory")
    spool_file = make_spool_file(other_filesystem, "QFAR2", b"far\n")
    with pytest.raises(NotADirectoryError):
        store.link(spool_file, ["alice@example.org", "bob@example.org"], NOW)
    alice = store.maildir("alice@example.org")
    assert list((alice / "new").iterdir()) == list((alice / "tmp").iterdir()) == []


def skip_unless_permissions_apply(tmp_path: Path) -> None:
    """Skip when directory permissions are not enforced (root with CAP_DAC_OVERRIDE)."""
    probe = tmp_path / "probe"
    probe.mkdir(mode=0o500)
    try:
        (probe / "x").touch()
    except PermissionError:
        return
    finally:
        probe.chmod(0o700)
    pytest.skip("running as root: directory permissions do not apply")


def test_delivery_into_unwritable_directory_raises(
    store: MaildirStore, spool_dir: Path, tmp_path: Path
) -> None:
    skip_unless_permissions_apply(tmp_path)
    maildir = store.maildir("alice@example.org")
    store.ensure(maildir)
    (maildir / "new").chmod(0o500)
    spool_file = make_spool_file(spool_dir, "QRO", b"x\n")
    try:
        with pytest.raises(PermissionError):
            store.deliver(spool_file, ["alice@example.org"], NOW)
    finally:
        (maildir / "new").chmod(0o700)
    assert spool_file.exists()  # not acknowledged, not lost
    assert list((maildir / "new").iterdir()) == []


def test_delivery_into_unwritable_root_raises(tmp_path: Path, spool_dir: Path) -> None:
    skip_unless_permissions_apply(tmp_path)
    root = tmp_path / "readonly"
    root.mkdir()
    root.chmod(0o500)
    spool_file = make_spool_file(spool_dir, "QRO", b"x\n")
    try:
        with pytest.raises(PermissionError):
            MaildirStore(root / "mail", "h").deliver(spool_file, ["alice@example.org"], NOW)
    finally:
        root.chmod(0o700)
    assert spool_file.exists()


def test_delivery_where_new_is_not_a_directory_raises(store: MaildirStore, spool_dir: Path) -> None:
    """Works as root too: a file where ``new/`` should be makes the link fail."""
    maildir = store.maildir("alice@example.org")
    maildir.mkdir(parents=True)
    for sub in ("tmp", "cur"):
        (maildir / sub).mkdir()
    (maildir / "new").write_bytes(b"not a directory")
    spool_file = make_spool_file(spool_dir, "QBAD", b"x\n")
    with pytest.raises(NotADirectoryError):
        store.deliver(spool_file, ["bob@example.org", "alice@example.org"], NOW)
    assert spool_file.exists()  # the caller answers 451 and the client retries
    # All or nothing: bob's copy, linked before alice's failed, is gone again.
    assert list((store.maildir("bob@example.org") / "new").iterdir()) == []
    assert spool_file.stat().st_nlink == 1


def test_a_failed_mailbox_removes_the_links_already_made(
    store: MaildirStore, spool_dir: Path
) -> None:
    """``link`` (the committer's form) is all or nothing too, whatever the mailbox order."""
    broken = store.maildir("carol@example.net")
    broken.mkdir(parents=True)
    (broken / "new").write_bytes(b"not a directory")
    spool_file = make_spool_file(spool_dir, "QALL", b"x\n")
    mailboxes = ["alice@example.org", "bob@example.org", "carol@example.net"]
    with pytest.raises(NotADirectoryError):
        store.link(spool_file, mailboxes, NOW)
    for mailbox in mailboxes[:2]:
        assert list((store.maildir(mailbox) / "new").iterdir()) == []
    assert spool_file.stat().st_nlink == 1
    (broken / "new").unlink()
    delivered = store.link(spool_file, mailboxes, NOW)  # the retry: one copy each
    assert [len(list(p.parent.iterdir())) for p in delivered] == [1, 1, 1]


def test_a_removed_maildir_is_made_again(store: MaildirStore, spool_dir: Path) -> None:
    first = make_spool_file(spool_dir, "QONE", b"one\n")
    store.deliver(first, ["alice@example.org"], NOW)
    shutil.rmtree(store.maildir("alice@example.org"))
    second = make_spool_file(spool_dir, "QTWO", b"two\n")
    [again] = store.deliver(second, ["alice@example.org"], NOW)
    assert again.read_bytes() == b"two\n"
    assert {p.name for p in store.maildir("alice@example.org").iterdir()} == {"tmp", "new", "cur"}
    shutil.rmtree(store.maildir("alice@example.org") / "new")  # only new/ gone
    third = make_spool_file(spool_dir, "QTHREE", b"three\n")
    [last] = store.deliver(third, ["alice@example.org"], NOW)
    assert last.read_bytes() == b"three\n"


# --- Spool and SpoolFile -----------------------------------------------------------------------


def test_spool_prepare_creates_directory_and_removes_stale_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", sync_run)
    assert spool.prepare() == 0
    assert spool.incoming.is_dir()
    for name in ("A1", "B2", "C3"):
        (spool.incoming / name).write_bytes(b"half a message")
    assert spool.prepare() == 3
    assert list(spool.incoming.iterdir()) == []
    assert spool.prepare() == 0


def test_spool_open_names_the_file_after_the_queue_id(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", sync_run)
    spool.prepare()
    spool_file = spool.open("QID123", lambda: None, lambda: None)
    assert spool_file.path == spool.incoming / "QID123"
    spool_file.write(b"hello\n")
    assert result_of(spool_file.close()) == spool.incoming / "QID123"
    assert (spool.incoming / "QID123").read_bytes() == b"hello\n"


class FlowRecorder:
    """Pause/resume callbacks that record their calls and can be awaited."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.paused = False
        self._resumed: defer.Deferred[None] | None = None

    def pause(self) -> None:
        assert not self.paused, "pause called twice without resume"
        self.events.append("pause")
        self.paused = True

    def resume(self) -> None:
        assert self.paused, "resume called without pause"
        self.events.append("resume")
        self.paused = False
        if self._resumed is not None:
            waiter, self._resumed = self._resumed, None
            waiter.callback(None)

    def wait_resumed(self) -> defer.Deferred[None]:
        self._resumed = defer.Deferred()
        return self._resumed


def random_chunks(total: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    chunks, size = [], 0
    while size < total:
        n = rng.choice([1, 2, 77, 1000, 4096, 65536, 100_003, 300_000])
        chunks.append(rng.randbytes(n))
        size += n
    return chunks


def test_spool_file_many_chunks_synchronous(tmp_path: Path) -> None:
    flow = FlowRecorder()
    path = tmp_path / "QSYNC"
    spool_file = SpoolFile(path, sync_run, flow.pause, flow.resume)
    chunks = random_chunks(3 * 1024 * 1024, seed=1)
    for chunk in chunks:
        spool_file.write(chunk)
    assert result_of(spool_file.close()) == path
    assert path.read_bytes() == b"".join(chunks)
    assert not flow.paused
    assert flow.events == ["pause", "resume"] * (len(flow.events) // 2)


def test_spool_file_empty(tmp_path: Path) -> None:
    path = tmp_path / "QEMPTY"
    assert result_of(SpoolFile(path, sync_run, lambda: None, lambda: None).close()) == path
    assert path.read_bytes() == b""


@pytest_twisted.ensureDeferred
async def test_spool_file_with_thread_pool_pauses_and_resumes_in_pairs(tmp_path: Path) -> None:
    from twisted.internet import threads

    flow = FlowRecorder()
    path = tmp_path / "QTHREADS"
    spool_file = SpoolFile(path, threads.deferToThread, flow.pause, flow.resume)
    piece = 64 * 1024
    chunks = random_chunks(12 * 1024 * 1024, seed=2)
    for chunk in chunks:
        # The session stops reading while paused; so does this writer.
        for start in range(0, len(chunk), piece):
            spool_file.write(chunk[start : start + piece])
        if flow.paused:
            await flow.wait_resumed()
    written = await spool_file.close()
    assert written == path
    assert path.read_bytes() == b"".join(chunks)
    # More than 2 MB waited for the disk at least once (the loop never yields before that).
    assert flow.events[:2] == ["pause", "resume"]
    assert flow.events == ["pause", "resume"] * (len(flow.events) // 2)
    assert not flow.paused


@pytest_twisted.ensureDeferred
async def test_spool_file_close_fails_when_directory_is_missing(tmp_path: Path) -> None:
    from twisted.internet import threads

    flow = FlowRecorder()
    spool_file = SpoolFile(
        tmp_path / "missing" / "Q", threads.deferToThread, flow.pause, flow.resume
    )
    for _ in range(40):  # 40 x 100 kB: several background writes, all failing
        spool_file.write(b"x" * 100_000)
    with pytest.raises(FileNotFoundError):
        await spool_file.close()
    assert flow.events == ["pause", "resume"] * (len(flow.events) // 2)
    assert not flow.paused


def test_discard_removes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "QDISCARD"
    spool_file = SpoolFile(path, sync_run, lambda: None, lambda: None)
    spool_file.write(b"y" * 600_000)  # reaches the disk in two chunks
    assert path.exists()
    spool_file.write(b"still in memory")
    spool_file.discard()
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_discard_before_anything_was_written(tmp_path: Path) -> None:
    path = tmp_path / "QNOTHING"
    spool_file = SpoolFile(path, sync_run, lambda: None, lambda: None)
    spool_file.write(b"small")
    spool_file.discard()
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_discard_after_close_removes_the_complete_file(tmp_path: Path) -> None:
    path = tmp_path / "QCLOSED"
    spool_file = SpoolFile(path, sync_run, lambda: None, lambda: None)
    spool_file.write(b"whole message\n")
    result_of(spool_file.close())
    assert path.exists()
    spool_file.discard()
    assert not path.exists()


@pytest_twisted.ensureDeferred
async def test_discard_with_thread_pool(tmp_path: Path) -> None:
    from twisted.internet import reactor, task, threads

    jobs: list[list[Any]] = []  # [function name, finished]

    def run(function: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        job = [function.__name__, False]
        jobs.append(job)
        d = threads.deferToThread(function, *args, **kwargs)

        def finished(result: object) -> object:
            job[1] = True
            return result

        return d.addBoth(finished)

    path = tmp_path / "QDISCARDT"
    spool_file = SpoolFile(path, run, lambda: None, lambda: None)
    for _ in range(20):
        spool_file.write(b"z" * 100_000)
    spool_file.discard()
    for _ in range(500):  # bounded: at most about 5 s
        if any(name == "_discard_blocking" for name, _ in jobs) and all(d for _, d in jobs):
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    assert [name for name, _ in jobs][-1] == "_discard_blocking"
    assert all(done for _, done in jobs)
    assert directory_listing(tmp_path) == []


def test_mail_is_private_to_the_server_user(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "mail", "mx.example.org")
    spool = Spool(tmp_path / "spool", lambda f, *a: defer.maybeDeferred(f, *a))
    spool.prepare()
    spool_file = spool.open("QPRIV", lambda: None, lambda: None)
    spool_file.write(b"secret\n")
    path = result_of(spool_file.close())
    [delivered] = store.deliver(path, ["alice@example.org"], NOW)
    assert delivered.stat().st_mode & 0o077 == 0
    for folder in (delivered.parent, delivered.parent.parent, spool.incoming):
        assert folder.stat().st_mode & 0o077 == 0, folder


# --- reading back and inserting a header (the inbound checks) ----------------------------------

HEAD = b"Return-Path: <a@b.test>\n"


@pytest.mark.parametrize("size", [10, 300_000, 3 * 1024 * 1024])
def test_read_gives_everything_written_in_memory_or_on_disk(tmp_path: Path, size: int) -> None:
    path = tmp_path / "QREAD"
    spool_file = SpoolFile(path, sync_run, lambda: None, lambda: None)
    content = random.Random(size).randbytes(size)
    for start in range(0, size, 1000):
        spool_file.write(content[start : start + 1000])
    assert result_of(spool_file.read()) == content
    assert path.exists() == (size > 256 * 1024)  # small messages never touched the disk


@pytest.mark.parametrize("size", [10, 300_000, 3 * 1024 * 1024])
def test_insert_puts_a_header_after_the_first_line(tmp_path: Path, size: int) -> None:
    path = tmp_path / "QINSERT"
    spool_file = SpoolFile(path, sync_run, lambda: None, lambda: None)
    body = random.Random(size).randbytes(size)
    spool_file.write(HEAD)
    spool_file.write(body)
    added = b"Authentication-Results: mx.test; spf=none\n"
    spool_file.insert(len(HEAD), added)
    assert spool_file.size == len(HEAD) + len(added) + len(body)
    rest = result_of(spool_file.detach())
    spool_file.finish_blocking(rest)
    assert path.read_bytes() == HEAD + added + body
    assert directory_listing(tmp_path) == ["QINSERT"]


@pytest_twisted.ensureDeferred
async def test_insert_into_a_file_on_disk_with_the_thread_pool(tmp_path: Path) -> None:
    from twisted.internet import threads

    path = tmp_path / "QINSERTT"
    spool_file = SpoolFile(path, threads.deferToThread, lambda: None, lambda: None)
    body = b"".join(random_chunks(1024 * 1024, seed=9))
    spool_file.write(HEAD)
    spool_file.write(body)
    assert await spool_file.read() == HEAD + body
    spool_file.insert(len(HEAD), b"X-One: 1\n")
    spool_file.insert(len(HEAD), b"X-Two: 2\n")
    spool_file.write(b"more\n")
    assert await spool_file.close() == path
    assert path.read_bytes() == HEAD + b"X-Two: 2\nX-One: 1\n" + body + b"more\n"
    assert directory_listing(tmp_path) == ["QINSERTT"]


def test_a_failed_insert_fails_the_file_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "QFAIL"
    spool_file = SpoolFile(path, sync_run, lambda: None, lambda: None)
    spool_file.write(b"y" * 600_000)
    (tmp_path / "QFAIL.insert").mkdir()  # the temporary name is taken: the rewrite fails
    spool_file.insert(10, b"X: 1\n")
    with pytest.raises(FileExistsError):
        result_of(spool_file.detach())
    (tmp_path / "QFAIL.insert").rmdir()
    spool_file.discard()
    assert directory_listing(tmp_path) == []
