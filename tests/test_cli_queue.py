"""``mailsrv queue`` end to end: the installed console script in a subprocess, on its own (no
server: it works on the files) and against a running server (``twistd mailsrv``, and a small
queue server that rewrites a record as fast as it can while the CLI holds and releases it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer

from mailsrv.jsonstore.spares import SPARE_DIR
from mailsrv.relay.queue_store import FileQueueStore
from mailsrv.relay.records import QueueRecord, State, decode, from_dict, to_dict
from tests.queue_helpers import BODY, accepted, commit, remote
from tests.test_process import Server, free_port, wait_for

MAILSRV = Path(sys.executable).parent / "mailsrv"
REPO = Path(__file__).resolve().parent.parent
NOW = 1_767_225_600.0


@dataclass
class Result:
    code: int
    out: str
    err: str


def in_this_thread(function: Any, *args: Any) -> Any:
    return defer.maybeDeferred(function, *args)


@dataclass
class Queue:
    """A data directory with a queue, and the CLI run against it."""

    data_dir: Path

    @property
    def root(self) -> Path:
        return self.data_dir / "queue"

    @property
    def store(self) -> FileQueueStore:
        return FileQueueStore(self.root, in_this_thread)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SMTP_")}
        env["SMTP_DATA_DIR"] = str(self.data_dir)
        return env

    def __call__(self, *args: str, **env: str) -> Result:
        done = subprocess.run(
            [str(MAILSRV), *args],
            capture_output=True,
            text=True,
            env={**self.env(), **env},
            timeout=60,
        )
        assert "Traceback" not in done.stderr, done.stderr
        return Result(done.returncode, done.stdout, done.stderr)

    def ok(self, *args: str) -> str:
        result = self(*args)
        assert result.code == 0, result
        assert result.err == ""
        return result.out

    def add(self, record_change: dict[str, Any] | None = None, **message: Any) -> QueueRecord:
        """Queue a message as the committer would; ``record_change`` edits its recipients."""
        record = commit(self.store, self.data_dir / "spool", accepted(**message))
        if record_change:
            record = record.with_recipients(replace(r, **record_change) for r in record.recipients)
            self.store.update(record).result  # noqa: B018 - fires at once here
        return record

    def record(self, queue_id: str) -> QueueRecord:
        return decode(self.store.record_path(queue_id).read_bytes(), queue_id)


@pytest.fixture
def queue(tmp_path: Path) -> Queue:
    return Queue(tmp_path / "data")


def one_line_error(result: Result, code: int = 1) -> str:
    assert result.code == code, result
    assert result.out == ""
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("mailsrv: ")
    return lines[0]


# --- with no server running -------------------------------------------------------------------


def test_list_of_an_empty_or_missing_queue(queue: Queue) -> None:
    assert queue.ok("queue", "list") == "Mail queue is empty\n"
    assert json.loads(queue.ok("queue", "list", "--json")) == []
    assert not queue.root.exists()  # looking creates nothing


def test_list_shows_id_age_size_sender_and_each_recipient(queue: Queue) -> None:
    deferred = queue.add(
        {
            "state": State.DEFERRED,
            "attempts": 3,
            "next_attempt": 9e9,
            "last_reply": "451 4.7.1 Greylisted, try again later",
            "remote_mta": "mx1.example.net",
        },
        received_at=NOW,
    )
    bounce = queue.add(sender="", recipients=(remote("dave@example.com"),), received_at=NOW + 1)
    out = queue.ok("queue", "list")
    lines = out.splitlines()
    assert lines[0].split() == ["QUEUE", "ID", "SIZE", "AGE", "SENDER", "/", "RECIPIENTS"]
    first = lines[1].split()
    assert first[0] == deferred.queue_id and first[1] == str(len(BODY))
    assert first[3] == "alice@example.org"
    assert lines[2].split()[:4] == ["deferred", "3", "attempts", "bob@example.net"]
    assert "next in" in lines[2]
    assert lines[3].strip() == "(mx1.example.net said: 451 4.7.1 Greylisted, try again later)"
    assert lines[4].split()[:4] == ["deferred", "3", "attempts", "carol@example.com"]
    assert lines[6] == ""
    assert lines[7].split()[0] == bounce.queue_id and lines[7].split()[3] == "<>"
    assert lines[8].split() == ["pending", "0", "attempts", "dave@example.com"]
    assert lines[9] == ""
    assert lines[-1] == (
        f"-- 2 messages, {2 * len(BODY)} bytes, 3 recipient(s): 2 deferred, 1 pending"
    )


def test_list_json_is_the_records_as_stored(queue: Queue) -> None:
    records = [queue.add(received_at=NOW), queue.add(received_at=NOW + 5)]
    listed = json.loads(queue.ok("queue", "list", "--json"))
    assert listed == [to_dict(r) for r in records]
    assert [from_dict(m) for m in listed] == records


def test_show_prints_the_record_and_the_headers(queue: Queue) -> None:
    record = queue.add()
    out = queue.ok("queue", "show", record.queue_id)
    head, _, headers = out.partition(f"*** HEADERS ({len(BODY)} bytes in all) ***\n")
    assert head.startswith("*** RECORD ***\n")
    assert json.loads(head.removeprefix("*** RECORD ***\n")) == to_dict(record)
    assert headers == BODY.decode().partition("\n\n")[0] + "\n"


def test_show_escapes_control_characters(queue: Queue) -> None:
    record = queue.add()
    queue.store.body_path(record.queue_id).unlink()
    queue.store.body_path(record.queue_id).write_bytes(b"Subject: \x1b[31mred\x07\n\nbody\n")
    out = queue.ok("queue", "show", record.queue_id)
    assert "Subject: \\x1b[31mred\\x07\n" in out
    assert "\x1b" not in out


def test_hold_release_delete_a_recipient_then_the_message(queue: Queue) -> None:
    record = queue.add()
    qid = record.queue_id
    assert queue.ok("queue", "hold", qid, "carol@example.com") == (
        f"{qid}: carol@example.com put on hold\n"
    )
    assert [r.state for r in queue.record(qid).recipients] == [State.PENDING, State.HELD]
    assert queue.ok("queue", "hold", qid) == f"{qid}: bob@example.net put on hold\n"
    assert queue.ok("queue", "hold", qid) == f"{qid}: already on hold\n"
    assert queue.ok("queue", "release", qid) == f"{qid}: 2 recipients released\n"
    assert [r.state for r in queue.record(qid).recipients] == [State.PENDING, State.PENDING]
    assert queue.ok("queue", "delete", qid, "bob@example.net") == (
        f"{qid}: deleted bob@example.net\n"
    )
    assert [r.address for r in queue.record(qid).recipients] == ["carol@example.com"]
    assert queue.ok("queue", "delete", qid) == f"{qid}: deleted\n"
    assert sorted(set(os.listdir(queue.root)) - {SPARE_DIR}) == [".edit.lock", ".lock"]


def test_flush_needs_a_running_server(queue: Queue) -> None:
    record = queue.add()
    line = one_line_error(queue("queue", "flush"))
    assert line == (
        f"mailsrv: no mailsrv server is running on {queue.data_dir}: nothing can be retried "
        "now (once it runs, each recipient is tried at its next attempt time)"
    )
    assert "no mailsrv server is running" in one_line_error(
        queue("queue", "flush", record.queue_id)
    )
    assert (
        one_line_error(queue("queue", "flush", "NOSUCHID")) == "mailsrv: no such message NOSUCHID"
    )


def refusals(qid: str) -> list[tuple[tuple[str, ...], str]]:
    """Commands that must fail with exit status 1 and this one line (``qid`` exists, with bob
    sent and carol deferred)."""
    return [
        (("show", "NOSUCHID"), "no such message NOSUCHID"),
        (("show", "../../etc/passwd"), "invalid queue id '../../etc/passwd'"),
        (("show", "x.json"), "invalid queue id 'x.json'"),
        (("hold", "NOSUCHID"), "no such message NOSUCHID"),
        (("release", "NOSUCHID", "bob@example.net"), "no such message NOSUCHID"),
        (("delete", "NOSUCHID"), "no such message NOSUCHID"),
        (("hold", qid, "nobody@example.net"), f"{qid} has no recipient nobody@example.net"),
        (("hold", qid, "bob@example.net"), f"cannot hold bob@example.net of {qid}: already sent"),
        (("delete", qid, "bob@example.net"), f"cannot delete bob@example.net of {qid}: already"),
        (("hold", qid, "bob@example.net\r\nRCPT"), "invalid recipient"),
    ]


def partly_sent(queue: Queue) -> QueueRecord:
    record = queue.add()
    bob, carol = record.recipients
    record = record.with_recipients(
        [replace(bob, state=State.SENT, attempts=1), replace(carol, state=State.DEFERRED)]
    )
    queue.store.update(record).result  # noqa: B018
    return record


def test_bad_ids_and_recipients_get_one_line_and_status_1(queue: Queue) -> None:
    record = partly_sent(queue)
    before = queue.store.record_path(record.queue_id).read_bytes()
    for args, message in refusals(record.queue_id):
        line = one_line_error(queue("queue", *args))
        assert line.startswith(f"mailsrv: {message}"), (args, line)
    assert queue.store.record_path(record.queue_id).read_bytes() == before


@pytest.mark.parametrize(
    "args",
    [
        ("queue",),
        ("queue", "show"),
        ("queue", "bogus"),
        ("queue", "hold"),
        ("queue", "delete", "A", "b@c", "extra"),
        ("queue", "list", "--jsn"),
    ],
)
def test_usage_errors_exit_2(queue: Queue, args: tuple[str, ...]) -> None:
    result = queue(*args)
    assert result.code == 2 and result.out == ""
    assert result.err.startswith("usage: mailsrv") and "error: " in result.err


def test_a_bad_configuration_exits_2(queue: Queue) -> None:
    line = one_line_error(queue("queue", "list", SMTP_IO_THREADS="many"), code=2)
    assert "SMTP_IO_THREADS" in line


def test_a_broken_record_is_reported_not_fatal(queue: Queue) -> None:
    good = queue.add()
    broken = queue.add()
    queue.store.record_path(broken.queue_id).write_text("{")
    result = queue("queue", "list")
    assert result.code == 0
    assert good.queue_id in result.out and broken.queue_id not in result.out
    assert result.err == (
        f"mailsrv: warning: skipping queue record {broken.queue_id}.json: not JSON: Expecting "
        "property name enclosed in double quotes at line 1 column 2\n"
    )
    shown = one_line_error(queue("queue", "show", broken.queue_id))
    assert shown == (
        "mailsrv: unreadable queue record: not JSON: Expecting property name enclosed in "
        "double quotes at line 1 column 2"
    )


# --- against a running server -------------------------------------------------------------


@pytest.fixture
def twistd(tmp_path: Path) -> Any:
    servers: list[Server] = []

    def make() -> Server:
        port = free_port()
        server = Server(tmp_path, tmp_path / "data", port, free_port(port))
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.kill()


def test_the_cli_talks_to_a_running_twistd(queue: Queue, twistd: Any) -> None:
    record = partly_sent(queue)
    qid = record.queue_id
    server = twistd()
    server.start()
    try:
        # The listeners answer before every service has started: the socket may come a moment
        # later.
        wait_for((queue.root / "control.sock").exists, 10, "the queue control socket")
        listed = json.loads(queue.ok("queue", "list", "--json"))
        assert [from_dict(m) for m in listed] == [record]
        assert queue.ok("queue", "flush") == (
            "queue flushed: 1 deferred recipient(s) of 1 message(s) due now\n"
        )
        assert queue.ok("queue", "flush", qid) == f"{qid}: 0 deferred recipient(s) due now\n"
        assert queue.ok("queue", "hold", qid) == f"{qid}: carol@example.com put on hold\n"
        assert queue.record(qid).recipients[1].state is State.HELD
        assert "*** HEADERS" in queue.ok("queue", "show", qid)
        for args, message in refusals(qid):
            line = one_line_error(queue("queue", *args))
            assert line.startswith(f"mailsrv: {message}"), (args, line)
        # A second server on the same data directory is refused with one line.
        second = subprocess.run(
            [str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=", "mailsrv"],
            env={**server.env(), "SMTP_PORT": str(free_port()), "SMTP_SUBMISSION_PORT": "0"},
            cwd=server.workdir,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode != 0
        assert "mailsrv: another mailsrv server is using the queue" in second.stdout + second.stderr
        assert "Traceback" not in second.stdout + second.stderr
    finally:
        assert server.stop() in (0, -signal.SIGTERM)
    assert not (queue.root / "control.sock").exists()
    # The server is gone: the CLI works on the files again.
    assert queue.ok("queue", "release", qid) == f"{qid}: carol@example.com released\n"
    assert "no mailsrv server is running" in one_line_error(queue("queue", "flush"))


def test_cli_changes_and_server_writes_never_race(queue: Queue, tmp_path: Path) -> None:
    record = queue.add()
    qid = record.queue_id
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.queue_runner", "serve", str(queue.root), "--churn", qid],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    torn: list[str] = []
    reads = [0]
    reading = threading.Event()
    reading.set()

    def read_all_the_time() -> None:  # every version a reader can see is whole
        path = queue.store.record_path(qid)
        while reading.is_set():
            try:
                decode(path.read_bytes(), qid)
                reads[0] += 1
            except Exception as e:
                torn.append(repr(e))

    reader = threading.Thread(target=read_all_the_time)
    try:
        assert server.stdout.readline() == "ready\n"
        reader.start()
        expected = State.PENDING
        for n in range(8):
            verb = "hold" if n % 2 == 0 else "release"
            out = queue.ok("queue", verb, qid, "carol@example.com")
            assert out.startswith(qid)
            expected = State.HELD if verb == "hold" else State.DEFERRED
        server.send_signal(signal.SIGTERM)
        (line,) = [server.stdout.read().strip()]
        server.wait(timeout=30)
    finally:
        reading.clear()
        if reader.is_alive():
            reader.join()
        server.kill()
        server.stdout.close()
    churned = int(line.removeprefix("churned "))
    assert churned > 8 and reads[0] > 0 and torn == []
    final = queue.record(qid)
    # Every server write and every CLI change is in the record: none overwrote another.
    assert [r.attempts for r in final.recipients] == [churned, churned]
    assert final.recipients[1].state is expected
    assert final.recipients[0].state is State.PENDING
    assert final.recipients[0].last_reply == f"451 4.4.1 attempt {churned}"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_run_as_root_it_writes_as_the_queue_owner() -> None:
    nobody = 65534
    top = Path(tempfile.mkdtemp(prefix="mailsrv-owner-"))  # pytest's tmp is root-only (0700)
    try:
        top.chmod(0o755)
        queue = Queue(top / "data")
        record = queue.add()
        for path in [queue.data_dir, *queue.data_dir.rglob("*")]:
            os.chown(path, nobody, nobody)
        qid = record.queue_id
        assert queue.ok("queue", "hold", qid) == f"{qid}: 2 recipients put on hold\n"
        owners = {p.name: p.stat().st_uid for p in queue.root.iterdir()}
        assert owners.pop(SPARE_DIR, nobody) == nobody  # the replaced version kept for reuse
        assert owners == dict.fromkeys([f"{qid}.json", f"{qid}.eml", ".lock", ".edit.lock"], nobody)
        assert qid in queue.ok("queue", "list")
    finally:
        shutil.rmtree(top)
