"""The queue control socket and the queue locks: a real UNIX socket in the test reactor, the
blocking client in a thread, flock between open files as between processes."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task, threads
from zope.interface.verify import verifyObject

from mailsrv.relay.actions import IQueueActions, StoreActions
from mailsrv.relay.control import (
    ControlError,
    QueueControlService,
    Request,
    ask,
    parse_request,
    socket_path_problem,
)
from mailsrv.relay.queue_lock import QueueBusy, QueueLock, direct_access
from mailsrv.relay.queue_store import FileQueueStore, QueueError
from mailsrv.relay.records import State, from_dict
from tests.conftest import run_client
from tests.queue_helpers import accepted, commit


def run_in_thread(function: Any, *args: Any, **kwargs: Any) -> Any:
    return threads.deferToThread(function, *args, **kwargs)


class Rig:
    """A queue with two messages and a control service on it."""

    def __init__(self, tmp_path: Path, clock: Any = None) -> None:
        from twisted.internet import reactor

        self.root = tmp_path / "queue"
        self.lock = QueueLock(self.root)
        self.lock.acquire()
        self.store = FileQueueStore(self.root, run_in_thread)
        self.first = commit(self.store, tmp_path / "spool", accepted(received_at=1000.0))
        self.second = commit(self.store, tmp_path / "spool", accepted(received_at=2000.0))
        self.actions = StoreActions(self.store, reactor, run_in_thread)
        self.path = self.root / "control.sock"
        self.service = QueueControlService(self.path, self.actions, reactor, self.lock, clock=clock)

    async def ask(self, action: str, queue_id: str | None = None, rcpt: str | None = None) -> Any:
        return await run_client(ask, self.path, Request(action, queue_id, rcpt))

    async def raw(self, *lines: bytes) -> list[Any]:
        """Send raw lines on one connection; the decoded responses, one per line."""

        def exchange() -> list[Any]:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(str(self.path))
                sock.sendall(b"".join(lines))
                data = b""
                while data.count(b"\n") < len(lines):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            return [json.loads(line) for line in data.splitlines()]

        result: list[Any] = await run_client(exchange)
        return result


@pytest_twisted.async_yield_fixture
async def rig(tmp_path: Path) -> Any:
    rig = Rig(tmp_path)
    rig.service.startService()
    yield rig
    await rig.service.stopService()


def test_store_actions_provide_the_interface(tmp_path: Path) -> None:
    from twisted.internet import reactor

    store = FileQueueStore(tmp_path, run_in_thread)
    assert verifyObject(IQueueActions, StoreActions(store, reactor, run_in_thread))


@pytest_twisted.ensureDeferred
async def test_list_and_show_over_the_socket(rig: Rig) -> None:
    listed = await rig.ask("list")
    assert listed["ok"] is True
    assert [from_dict(m) for m in listed["messages"]] == [rig.first, rig.second]
    shown = await rig.ask("show", rig.first.queue_id)
    assert from_dict(shown["record"]) == rig.first
    assert shown["headers"].startswith("Return-Path: <alice@example.org>\n")
    assert shown["headers"].endswith("Subject: queued\n")
    assert stat.S_IMODE(os.stat(rig.path).st_mode) == 0o600


@pytest_twisted.ensureDeferred
async def test_hold_release_flush_delete_change_the_records(rig: Rig) -> None:
    qid = rig.first.queue_id
    assert await rig.ask("hold", qid, "bob@example.net") == {
        "ok": True,
        "outcome": f"{qid}: bob@example.net put on hold",
    }
    record = await FileQueueStore(rig.root, run_in_thread).get(qid)
    assert record is not None
    assert [r.state for r in record.recipients] == [State.HELD, State.PENDING]
    assert (await rig.ask("release", qid))["outcome"] == f"{qid}: bob@example.net released"
    assert (await rig.ask("flush"))["outcome"] == (
        "queue flushed: 0 deferred recipient(s) of 0 message(s) due now"
    )
    assert (await rig.ask("delete", qid))["outcome"] == f"{qid}: deleted"
    assert not rig.store.record_path(qid).exists() and not rig.store.body_path(qid).exists()
    assert await rig.ask("show", qid) == {"ok": False, "error": f"no such message {qid}"}


BAD_LINES = [
    (b"hello\n", "bad request: not a JSON object"),
    (b"[]\n", "bad request: expected an object with an action"),
    (b'{"action": "explode"}\n', "bad request: unknown action 'explode'"),
    (b'{"action": "show"}\n', "bad request: show needs a queue_id"),
    (b'{"action": "show", "queue_id": "../../etc"}\n', "invalid queue id '../../etc'"),
    (b'{"action": "show", "queue_id": 7}\n', "invalid queue id 7"),
    (b'{"action": "list", "queue_id": "X"}\n', "bad request: list takes no queue_id"),
    (b'{"action": "flush", "recipient": "a@b"}\n', "bad request: flush takes no recipient"),
    (b'{"action": "hold", "queue_id": "X", "recipient": "a\\r\\nb"}\n', "invalid recipient"),
    (b'{"action": "list", "as": "root"}\n', "bad request: unknown field 'as'"),
    (b'{"action": "hold", "queue_id": "NOSUCHID"}\n', "no such message NOSUCHID"),
]


@pytest_twisted.ensureDeferred
async def test_bad_requests_get_one_line_errors_and_the_connection_goes_on(rig: Rig) -> None:
    responses = await rig.raw(*[line for line, _ in BAD_LINES], b'{"action": "list"}\n')
    assert [r["ok"] for r in responses] == [False] * len(BAD_LINES) + [True]
    for response, (_, message) in zip(responses, BAD_LINES, strict=False):
        assert response["error"].startswith(message), response


@pytest_twisted.ensureDeferred
async def test_an_overlong_request_is_refused_and_the_connection_closed(rig: Rig) -> None:
    (response,) = await rig.raw(b"x" * 70_000 + b"\n", b'{"action": "list"}\n')
    assert response == {"ok": False, "error": "bad request: longer than 65536 bytes"}


def test_parse_request_round_trips_what_the_client_sends() -> None:
    request = Request("hold", "7ZK2P1QHBCDF001", "bob@example.net")
    assert parse_request(request.to_json()) == request
    with pytest.raises(QueueError, match="invalid queue id"):
        parse_request({"action": "delete", "queue_id": "a b"})


@pytest_twisted.ensureDeferred
async def test_an_idle_connection_is_closed(tmp_path: Path) -> None:
    from twisted.internet import reactor

    clock = task.Clock()
    rig = Rig(tmp_path, clock=clock)
    rig.service.startService()
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        await run_client(sock.connect, str(rig.path))
        while not rig.service._factory.live:
            await task.deferLater(reactor, 0.01)
        clock.advance(61)
        assert await run_client(sock.recv, 10) == b""  # closed by the server
        sock.close()
    finally:
        await rig.service.stopService()


@pytest_twisted.ensureDeferred
async def test_stopping_removes_the_socket_and_lets_the_queue_go(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(rig.path))  # a socket left by a server that was killed
    stale.close()
    rig.service.startService()
    assert (await rig.ask("list"))["ok"]
    await rig.service.stopService()
    assert not rig.path.exists()
    with pytest.raises(ControlError, match=r"cannot reach the server on .*No such file"):
        await rig.ask("list")
    other = QueueLock(rig.root)
    other.acquire()  # the queue is free again
    other.release()


def test_socket_path_too_long_is_named(tmp_path: Path) -> None:
    assert socket_path_problem(tmp_path / "control.sock") is None
    problem = socket_path_problem(Path("/" + "d" * 120) / "control.sock")
    assert problem is not None and "over the 107 a UNIX socket allows" in problem


# --- the locks -----------------------------------------------------------------------------


def test_a_second_server_is_refused(tmp_path: Path) -> None:
    first = QueueLock(tmp_path / "queue")
    first.acquire()
    try:
        with pytest.raises(QueueBusy, match="another mailsrv server is using the queue"):
            QueueLock(tmp_path / "queue").acquire()
        with direct_access(tmp_path / "queue") as direct:
            assert direct is False
    finally:
        first.release()
    with direct_access(tmp_path / "queue") as direct:
        assert direct is True


def test_a_server_starting_waits_for_the_cli_working_directly(tmp_path: Path) -> None:
    root = tmp_path / "queue"
    earlier = QueueLock(root)  # a server that ran before: the lock files exist
    earlier.acquire()
    earlier.release()
    server = QueueLock(root)
    with direct_access(root) as direct:
        assert direct is True
        starting = threading.Thread(target=server.acquire)
        starting.start()
        starting.join(timeout=0.3)
        assert starting.is_alive() and not server.held  # waits for us
    starting.join(timeout=10)
    assert server.held
    server.release()


def test_no_queue_directory_means_no_server(tmp_path: Path) -> None:
    with direct_access(tmp_path / "nowhere") as direct:
        assert direct is True
    assert not (tmp_path / "nowhere").exists()


def test_the_lock_makes_private_directories_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        lock = QueueLock(tmp_path / "data" / "queue")
        lock.acquire()
        lock.release()
    finally:
        os.umask(previous)
    for path in (tmp_path / "data", tmp_path / "data" / "queue"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    for name in (".lock", ".edit.lock"):
        assert stat.S_IMODE((tmp_path / "data" / "queue" / name).stat().st_mode) == 0o600
