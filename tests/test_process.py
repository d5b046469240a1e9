"""The real thing: ``twistd -n mailsrv`` as a subprocess, with smtplib and raw sockets on 127.0.0.1.

Covers the flags, refusing a broken configuration, serving both listeners, the graceful drain on
SIGTERM, JSON logs, and durability under ``kill -9`` in the middle of a load.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
import os
import queue
import random
import re
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest

from mailsrv import __version__
from mailsrv.config import SETTINGS, flag_name

REPO = Path(__file__).resolve().parent.parent
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
READY_TIMEOUT = 15.0
EXIT_TIMEOUT = 20.0


def free_port(*taken: int) -> int:
    """A port that was free a moment ago (and is not one of ``taken``)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in taken:
            return port


def base_env(**overrides: str) -> dict[str, str]:
    """The environment for twistd: ours without SMTP_*, the repo on PYTHONPATH, ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTP_")}
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONUNBUFFERED"] = "1"
    # No test asks the machine's DNS servers: relayed mail without a smarthost fails on a
    # loopback port where nothing answers.
    env["SMTP_DNS_SERVERS"] = "127.0.0.1:9"
    env.update(overrides)
    return env


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def can_connect(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@dataclass
class Server:
    """One ``twistd -n mailsrv`` process, its ports, data directory and output files."""

    workdir: Path
    data_dir: Path
    port: int
    submission_port: int
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    runs: int = 0
    command_prefix: list[str] = field(default_factory=list)  # e.g. setpriv to change user

    @property
    def stdout_path(self) -> Path:
        return self.workdir / f"stdout.{self.runs}.log"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / f"stderr.{self.runs}.log"

    def env(self) -> dict[str, str]:
        env = base_env(
            SMTP_HOST="127.0.0.1",
            SMTP_PORT=str(self.port),
            SMTP_SUBMISSION_PORT=str(self.submission_port),
            SMTP_HOSTNAME="mx.example.org",
            SMTP_LOCAL_DOMAINS="example.org",
            SMTP_MAILBOXES="alice@example.org",
            SMTP_DATA_DIR=str(self.data_dir),
        )
        if "smtps_port" in SETTINGS:  # a third listener may exist: keep it off
            env["SMTP_SMTPS_PORT"] = "0"
        env.update(self.extra_env)
        return env

    def start(self, attempts: int = 3) -> None:
        """Start twistd and wait for both listeners.

        A port picked by :func:`free_port` can be taken by another process before twistd binds
        it (other test runs share this host); then pick new ports and try again.
        """
        assert self.process is None or self.process.poll() is not None
        for attempt in range(attempts):
            self.runs += 1
            with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
                process = self.process = subprocess.Popen(
                    [*self.command_prefix, TWISTD, "-n", "--pidfile=", "mailsrv"],
                    env=self.env(),
                    cwd=self.workdir,
                    stdout=out,
                    stderr=err,
                )
            wait_for(partial(self._up_or_exited, process), READY_TIMEOUT, "the listeners")
            if process.poll() is None:
                return
            if "cannot listen" not in self.output() or attempt == attempts - 1:
                break
            self.port = free_port()
            self.submission_port = free_port(self.port)
        raise AssertionError(f"twistd exited: {self.output()}")

    def _up_or_exited(self, process: subprocess.Popen[bytes]) -> bool:
        if process.poll() is not None:
            return True
        return can_connect(self.port) and can_connect(self.submission_port)

    def signal(self, number: int) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> int:
        self.signal(signal.SIGTERM)
        return self.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(EXIT_TIMEOUT)

    def log(self, run: int | None = None) -> str:
        number = self.runs if run is None else run
        return (self.workdir / f"stdout.{number}.log").read_text(errors="replace")

    def output(self) -> str:
        return self.log() + self.stderr_path.read_text(errors="replace")

    def maildir_new(self) -> list[Path]:
        new = self.data_dir / "mail" / "example.org" / "alice" / "new"
        return sorted(new.iterdir()) if new.exists() else []

    @property
    def incoming(self) -> Path:
        return self.data_dir / "spool" / "incoming"


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def make(**extra_env: str) -> Server:
        server = Server(
            workdir=tmp_path,
            data_dir=tmp_path / "data",
            port=(port := free_port()),
            submission_port=free_port(port),
            extra_env=extra_env,
        )
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.kill()


def run_twistd(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TWISTD, *args],
        env=base_env(**env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT,
        check=False,
    )


def message(token: str, body_lines: int = 3) -> bytes:
    lines = [f"line {n} of {token}" for n in range(body_lines)]
    return (
        f"From: bob@remote.test\r\nTo: alice@example.org\r\nSubject: {token}\r\n"
        f"Message-ID: <{token}@remote.test>\r\n\r\n" + "\r\n".join(lines) + f"\r\nEND {token}\r\n"
    ).encode()


# --- (a) flags -----------------------------------------------------------------------------------


def test_help_lists_every_flag(tmp_path: Path) -> None:
    result = run_twistd(tmp_path, "mailsrv", "--help")
    assert result.returncode == 0, result.stderr
    assert "Runs the mailsrv ESMTP server" in result.stdout
    for option in ["config", *(flag_name(key) for key in SETTINGS)]:
        assert f"--{option}=" in result.stdout, option
    assert "[SMTP_PORT]" in result.stdout


def test_plugin_is_listed(tmp_path: Path) -> None:
    result = run_twistd(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s+mailsrv\s+mailsrv: ", result.stdout, re.MULTILINE), result.stdout


# --- (b) a broken configuration stops the start with one line -----------------------------------


BROKEN_STARTS = [
    ({"SMTP_PORT": "abc"}, (), "mailsrv: environment SMTP_PORT: expected an integer, got 'abc'"),
    (
        {"SMTP_PROT": "25"},
        (),
        "mailsrv: environment SMTP_PROT: unknown setting (did you mean SMTP_PORT?)",
    ),
    ({}, ("--port", "70000"), "mailsrv: flag --port: must be between 0 and 65535, got 70000"),
]


@pytest.mark.parametrize(
    ("env", "flags", "expected"), BROKEN_STARTS, ids=["env", "unknown", "flag"]
)
def test_broken_config_stops_the_start(
    tmp_path: Path, env: dict[str, str], flags: tuple[str, ...], expected: str
) -> None:
    result = run_twistd(tmp_path, "-n", "--pidfile=", "mailsrv", *flags, **env)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.splitlines() == [expected]
    assert result.stdout == ""
    assert not (tmp_path / "var").exists()  # nothing was created


def test_broken_config_file_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('local_domains = ["example.org"]\nmailboxes = ["alice@other.test"]\n')
    result = run_twistd(tmp_path, "-n", "--pidfile=", "mailsrv", "--config", str(path))
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        f"mailsrv: config file {path}: mailboxes: alice@other.test is not in a local domain"
        " (local_domains: example.org)"
    ]


def test_port_in_use_stops_the_start(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_twistd(
            tmp_path,
            "-n",
            "--pidfile=",
            "mailsrv",
            SMTP_HOST="127.0.0.1",
            SMTP_PORT=str(port),
            SMTP_SUBMISSION_PORT=str(free_port()),
            SMTP_DATA_DIR=str(tmp_path / "data"),
            **({"SMTP_SMTPS_PORT": "0"} if "smtps_port" in SETTINGS else {}),
        )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert f"mailsrv: cannot listen for mx on port {port}: " in output


# --- (c) serving both listeners, and stopping -----------------------------------------------------


def test_serves_both_ports_and_stops_on_sigterm(make_server: Callable[..., Server]) -> None:
    server: Server = make_server()
    server.start()
    for port, token in ((server.port, "via-mx-1b7e"), (server.submission_port, "via-sub-5c2d")):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            assert client.sendmail("bob@remote.test", ["alice@example.org"], message(token)) == {}
    status = server.stop()
    assert status in (-signal.SIGTERM, 128 + signal.SIGTERM), server.output()
    log = server.log()
    assert "draining 0 session(s)" in log
    assert "all sessions closed" in log
    assert "mailsrv stopped" in log
    assert "Traceback" not in server.output()
    delivered = [p.read_bytes() for p in server.maildir_new()]
    assert len(delivered) == 2
    ends = sorted(d.rsplit(b"\n", 2)[1] for d in delivered)
    assert ends == [b"END via-mx-1b7e", b"END via-sub-5c2d"]
    assert list(server.incoming.iterdir()) == []


# --- (d) graceful drain --------------------------------------------------------------------------


class Line:
    """A tiny blocking SMTP line client for exact replies."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def reply(self) -> str:
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return "".join(lines) + self.buffer.decode()
                self.buffer += chunk
            line, _, self.buffer = self.buffer.partition(b"\r\n")
            lines.append(line.decode() + "\n")
            if line[3:4] != b"-":
                return "".join(lines)

    def command(self, text: str) -> str:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        return self.sock.recv(1) == b""


def test_sigterm_drains_a_transaction_in_flight(make_server: Callable[..., Server]) -> None:
    server: Server = make_server()
    server.start()
    client = Line(server.port)
    idle = Line(server.submission_port)  # an idle session is closed at once
    try:
        assert client.reply().startswith("220 ")
        assert client.command("EHLO client.test").startswith("250-")
        assert client.command("MAIL FROM:<bob@remote.test>").startswith("250 ")
        assert client.command("RCPT TO:<alice@example.org>").startswith("250 ")
        assert idle.reply().startswith("220 ")
        server.signal(signal.SIGTERM)
        wait_for(lambda: "draining " in server.log(), 10, "the drain to start")
        assert idle.reply().startswith("421 4.3.2 ")
        assert idle.closed()
        # The listeners are closed: no new sessions.
        wait_for(lambda: not can_connect(server.port), 10, "the MX listener to close")
        assert server.process is not None and server.process.poll() is None
        assert client.command("DATA").startswith("354 ")
        client.sock.sendall(message("drained-9f3a") + b".\r\n")
        accepted = client.reply()
        assert re.fullmatch(r"250 2\.0\.0 OK: queued as \w+\n", accepted), accepted
        assert client.reply().startswith("421 4.3.2 ")
        assert client.closed()
    finally:
        client.sock.close()
        idle.sock.close()
    status = server.wait()
    assert status in (-signal.SIGTERM, 128 + signal.SIGTERM), server.output()
    assert "all sessions closed" in server.log() and "mailsrv stopped" in server.log()
    [delivered] = server.maildir_new()
    assert delivered.read_bytes().endswith(b"END drained-9f3a\n")
    queue_id = accepted.split()[-1]
    assert f"id {queue_id}" in delivered.read_text()


# --- (e) JSON logs -------------------------------------------------------------------------------


def test_json_log_lines(make_server: Callable[..., Server]) -> None:
    server: Server = make_server(SMTP_LOG_FORMAT="json")
    server.start()
    secret = "s3cr3t-Passw0rd-4417"
    credentials = base64.b64encode(f"\0alice@example.org\0{secret}".encode()).decode()
    body_token = "BODY-TEXT-never-logged-77d1"
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("json.client.test")
        code, _ = client.docmd("AUTH", f"PLAIN {credentials}")
        assert code >= 500  # AUTH is off by default
        refused = client.sendmail(
            "bob@remote.test", ["alice@example.org"], message(body_token, body_lines=5)
        )
        assert refused == {}
    status = server.stop()
    assert status in (-signal.SIGTERM, 128 + signal.SIGTERM)
    lines = [line for line in server.log().splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(event, dict) for event in events)
    messages = [e for e in events if str(e.get("log_format", "")).startswith("message ")]
    assert len(messages) == 1
    event = messages[0]
    assert re.fullmatch(r"\w+", event["queue_id"])
    assert event["client_ip"] == "127.0.0.1"
    assert event["sender"] == "bob@remote.test"
    assert event["recipients"] == ["alice@example.org"]
    assert isinstance(event["size"], int) and event["size"] > 100
    assert event["result"] == "accepted"
    assert any(str(e.get("log_format", "")).startswith("mailsrv stopped") for e in events)
    text = server.output()
    for leaked in (body_token, "line 1 of", "END BODY", secret, credentials):
        assert leaked not in text


# --- (f) kill -9 in the middle of a load ----------------------------------------------------

TOTAL = 300
THREADS = 8
KILL_AFTER = 100
LOAD_DEADLINE = 50.0


@dataclass
class Load:
    """Shared state of the load clients: who got a 250, from which server run."""

    tokens: list[str]
    bodies: dict[str, bytes]
    todo: queue.Queue[int] = field(default_factory=queue.Queue)
    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: dict[str, tuple[str, int]] = field(default_factory=dict)  # token -> (queue id, run)
    failed_attempts: list[tuple[str, int, str]] = field(default_factory=list)  # token, run, stage
    errors: list[str] = field(default_factory=list)
    server_up: threading.Event = field(default_factory=threading.Event)
    generation: int = 1
    done: threading.Event = field(default_factory=threading.Event)


def load_client(load: Load, server: Server, deadline: float) -> None:
    """Send messages from the queue; a message without a 250 goes back on it (retry)."""
    client: smtplib.SMTP | None = None
    run = 0
    while time.monotonic() < deadline:
        try:
            index = load.todo.get_nowait()
        except queue.Empty:
            break
        token = load.tokens[index]
        stage = "connect"
        try:
            if client is None:
                load.server_up.wait(deadline - time.monotonic())
                run = load.generation
                client = smtplib.SMTP("127.0.0.1", server.port, timeout=10)
                client.ehlo("load.client.test")
            stage = "mail"
            code, reply = client.mail("bob@remote.test")
            if code != 250:
                raise smtplib.SMTPResponseException(code, reply)
            code, reply = client.rcpt("alice@example.org")
            if code != 250:
                raise smtplib.SMTPResponseException(code, reply)
            stage = "data"
            code, reply = client.data(load.bodies[token])
            if code != 250:
                raise smtplib.SMTPResponseException(code, reply)
            queue_id = reply.decode().rsplit(" ", 1)[-1]
            with load.lock:
                assert token not in load.acked
                load.acked[token] = (queue_id, run)
        except (OSError, smtplib.SMTPException) as e:
            with load.lock:
                load.failed_attempts.append((token, run, stage))
                if isinstance(e, smtplib.SMTPResponseException) and e.smtp_code >= 500:
                    load.errors.append(f"{token}: {e.smtp_code} {e.smtp_error!r}")
            if client is not None:
                try:
                    client.close()
                except OSError:
                    pass
            client = None
            load.todo.put(index)
            time.sleep(0.02)
    if client is not None:
        try:
            client.quit()
        except (OSError, smtplib.SMTPException):
            client.close()


def test_kill_9_mid_load_loses_no_acknowledged_message(
    make_server: Callable[..., Server], capsys: pytest.CaptureFixture[str]
) -> None:
    server: Server = make_server()
    rng = random.Random(9)
    tokens = [f"tok{i:04d}x{rng.getrandbits(32):08x}" for i in range(TOTAL)]
    bodies = {t: message(t, body_lines=rng.choice([2, 20, 200, 2000])) for t in tokens}
    load = Load(tokens, bodies)
    for index in range(TOTAL):
        load.todo.put(index)

    server.start()
    load.server_up.set()
    deadline = time.monotonic() + LOAD_DEADLINE
    clients = [
        threading.Thread(target=load_client, args=(load, server, deadline), daemon=True)
        for _ in range(THREADS)
    ]
    for thread in clients:
        thread.start()
    try:
        wait_for(lambda: len(load.acked) >= KILL_AFTER, 30, f"{KILL_AFTER} acceptances", 0.005)
        load.server_up.clear()
        server.signal(signal.SIGKILL)
        assert server.wait() == -signal.SIGKILL
        with load.lock:
            acked_at_kill = len(load.acked)
        stale_in_spool = len(list(server.incoming.iterdir()))
        delivered_at_kill = len(server.maildir_new())
        # Every acknowledged message was already in new/ when the process died.
        assert delivered_at_kill >= acked_at_kill

        load.generation = 2
        server.start()
        assert list(server.incoming.iterdir()) == []  # unacknowledged bodies were removed
        if stale_in_spool:
            assert f"removed {stale_in_spool} unacknowledged spool file(s)" in server.log()
        load.server_up.set()
        for thread in clients:
            thread.join(max(0.0, deadline - time.monotonic()) + 5)
        assert not any(thread.is_alive() for thread in clients), "load clients did not finish"
        assert load.todo.empty()
        assert load.errors == []
        assert len(load.acked) == TOTAL
    finally:
        load.server_up.set()
    status = server.stop()
    assert status in (-signal.SIGTERM, 128 + signal.SIGTERM), server.output()
    assert list(server.incoming.iterdir()) == []
    assert "Traceback" not in server.output()

    # Read the Maildir: every file whole, matched to its token and its queue id.
    files_by_token: Counter[str] = Counter()
    queue_ids: dict[str, str] = {}
    for path in server.maildir_new():
        content = path.read_bytes()
        assert path.name.endswith(f",S={len(content)}")
        parsed = email.message_from_bytes(content, policy=email.policy.default)
        token = str(parsed["Subject"])
        assert token in bodies, path
        assert parsed["Message-ID"] == f"<{token}@remote.test>"
        assert content.endswith(f"END {token}\n".encode()), f"partial file {path}"
        expected_body = bodies[token].split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n")
        assert content.endswith(b"\n\n" + expected_body)
        match = re.search(r" id (\w+)", str(parsed["Received"]))
        assert match is not None
        queue_ids[match.group(1)] = token
        files_by_token[token] += 1
    tmp = server.data_dir / "mail" / "example.org" / "alice" / "tmp"
    assert list(tmp.iterdir()) == []

    for token, (queue_id, _run) in load.acked.items():
        assert queue_ids.get(queue_id) == token  # the acknowledged copy, exactly once
    assert set(files_by_token) == set(tokens)
    duplicates = {t: n for t, n in files_by_token.items() if n > 1}
    broken_by_kill = [(t, stage) for t, run, stage in load.failed_attempts if run == 1]
    in_flight_at_kill = {t for t, stage in broken_by_kill if stage == "data"}
    # A second copy only exists for a message whose DATA reply was lost with the process.
    assert set(duplicates) <= in_flight_at_kill
    assert all(n == 2 for n in duplicates.values())
    unacked_copies = len(queue_ids) - len(load.acked)
    assert unacked_copies == sum(n - 1 for n in duplicates.values())
    accepted_first_run = sum(1 for _, run in load.acked.values() if run == 1)
    with capsys.disabled():
        print(
            f"\nkill -9 load: {TOTAL} messages, {THREADS} clients; "
            f"accepted before kill: {accepted_first_run} (seen by the test at kill: "
            f"{acked_at_kill}); in flight at kill (DATA sent, no reply): "
            f"{len(in_flight_at_kill)} of {len(broken_by_kill)} sessions broken; "
            f"spool files left by the kill: {stale_in_spool}; "
            f"delivered but unacknowledged (duplicates after retry): {len(duplicates)}; "
            f"accepted after restart: {TOTAL - accepted_first_run}; "
            f"files in new/: {len(queue_ids)}"
        )


# --- log file, reopened on SIGHUP ----------------------------------------------------------------


def _send_token(port: int, token: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        assert client.sendmail("bob@remote.test", ["alice@example.org"], message(token)) == {}


def test_log_file_is_reopened_on_sighup(make_server: Callable[..., Server], tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "mailsrv.log"
    log_file.parent.mkdir()
    server: Server = make_server(SMTP_LOG_FILE=str(log_file))
    server.start()
    _send_token(server.port, "before-rotation")
    wait_for(lambda: "accepted" in log_file.read_text(), READY_TIMEOUT, "the first message line")
    rotated = log_file.with_suffix(".log.1")
    log_file.rename(rotated)
    server.signal(signal.SIGHUP)
    wait_for(log_file.exists, READY_TIMEOUT, "the reopened log file")
    _send_token(server.port, "after-rotation")
    wait_for(lambda: "accepted" in log_file.read_text(), READY_TIMEOUT, "the second message line")
    server.stop()
    assert rotated.read_text().count("message ") == 1
    assert log_file.read_text().count("message ") == 1
    assert "mailsrv stopped" in log_file.read_text()
    assert "message " not in server.log()  # nothing of ours on standard output


def test_unwritable_log_file_stops_the_start(tmp_path: Path) -> None:
    result = run_twistd(
        tmp_path,
        "-n",
        "--pidfile=",
        "mailsrv",
        SMTP_LOG_FILE=str(tmp_path / "missing-dir" / "mailsrv.log"),
        SMTP_PORT=str(free_port()),
        SMTP_SUBMISSION_PORT="0",
        SMTP_DATA_DIR=str(tmp_path / "data"),
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "mailsrv: log_file: " in output and "No such file or directory" in output
    assert "Traceback" not in output


# --- client data in the logs: escaped, never raw ----------------------------------------------

# (name, character, how the log shows it); CR, LF and NUL can only arrive inside AUTH (base64).
CLIENT_CONTROLS = [
    ("NUL", "\x00", "\\x00"),
    ("LF", "\n", "\\n"),
    ("CR", "\r", "\\r"),
    ("TAB", "\t", "\\t"),
    ("BEL", "\x07", "\\x07"),
    ("ESC", "\x1b", "\\x1b"),
    ("DEL", "\x7f", "\\x7f"),
    ("C1-NEL", "\x85", "\\x85"),
    ("C1-CSI", "\x9b", "\\x9b"),
    ("LINE-SEPARATOR", "\u2028", "\\u2028"),
    ("PARAGRAPH-SEPARATOR", "\u2029", "\\u2029"),
    ("BIDI-OVERRIDE", "\u202e", "\\u202e"),
]
RAW_CONTROLS = [char for _, char, _ in CLIENT_CONTROLS]


def _reply(client: socket.socket, buffer: list[bytes]) -> bytes:
    """One whole reply (its last line) from ``client``."""
    data = buffer[0]
    while True:
        while b"\r\n" not in data:
            chunk = client.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed after {data!r}")
            data += chunk
        line, _, data = data.partition(b"\r\n")
        if line[3:4] != b"-":
            buffer[0] = data
            return line


def _hostile_session(port: int, char: str) -> dict[str, bool]:
    """One session carrying ``char`` in every field it can reach; which fields got through."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    buffer = [b""]

    def command(text: str) -> bytes:
        sock.sendall(text.encode("utf-8") + b"\r\n")
        return _reply(sock, buffer)

    accepted: dict[str, bool] = {}
    line_safe = char not in "\r\n\x00"
    try:
        assert _reply(sock, buffer).startswith(b"220 ")
        helo = command(f"EHLO h{char}x.test") if line_safe else b""
        accepted["helo"] = helo.startswith(b"250")
        if not accepted["helo"]:
            assert command("EHLO client.test").startswith(b"250")
        login = base64.b64encode(f"u{char}ser@example.org".encode()).decode()
        assert command(f"AUTH LOGIN {login}").startswith(b"334 ")
        accepted["login"] = command(base64.b64encode(b"wrong").decode()).startswith(b"535 ")
        accepted["command"] = line_safe and command(f"X{char}Y").startswith(b"500 ")
        mail = command(f"MAIL FROM:<s{char}nd@remote.test> SMTPUTF8") if line_safe else b""
        accepted["sender"] = accepted["recipient"] = False
        if mail.startswith(b"250"):
            # Loopback may relay; a routing trick is refused (and logged) all the same.
            relay = command(f"RCPT TO:<r{char}cpt%elsewhere.test@example.org>")
            accepted["recipient"] = relay.startswith(b"554")
            assert command("RCPT TO:<alice@example.org>").startswith(b"250")
            assert command("DATA").startswith(b"354")
            accepted["sender"] = command("Subject: x\r\n\r\nbody\r\n.").startswith(b"250")
        command("QUIT")
    finally:
        sock.close()
    return accepted


def _where_each_field_shows(shown: str) -> dict[str, str]:
    return {
        "helo": f"helo=h{shown}x.test",
        "login": f"security auth-failure from 127.0.0.1 login=u{shown}ser@example.org"
        " mechanism=LOGIN",
        "command": f"unknown command X{shown}Y from 127.0.0.1",
        "sender": f"from 127.0.0.1 <s{shown}nd@remote.test> to ['alice@example.org']",
        "recipient": "security relay-denied from 127.0.0.1 "
        f"recipient=r{shown}cpt%elsewhere.test@example.org",
    }


def _run_hostile_sessions(server: Server) -> dict[str, dict[str, bool]]:
    from concurrent.futures import ThreadPoolExecutor

    server.start()
    with ThreadPoolExecutor(6) as pool:  # each failed AUTH waits 0.5 s: run them side by side
        results = pool.map(lambda case: _hostile_session(server.port, case[1]), CLIENT_CONTROLS)
        accepted = {
            name: fields for (name, _, _), fields in zip(CLIENT_CONTROLS, results, strict=True)
        }
    assert server.stop() in (-signal.SIGTERM, 128 + signal.SIGTERM), server.output()
    # Not vacuous: every class reached the log through at least the AUTH login.
    assert all(fields["login"] for fields in accepted.values()), accepted
    return accepted


HOSTILE_ENV = {
    # Six sessions from loopback fail AUTH side by side.
    "SMTP_AUTH_MAX_IN_FLIGHT_PER_CLIENT": "100",
    "SMTP_LOG_LEVEL": "debug",
    "SMTP_ENABLE_AUTH": "true",
    "SMTP_ALLOW_PLAINTEXT_AUTH": "true",
}


def test_client_fields_are_escaped_in_text_logs(make_server: Callable[..., Server]) -> None:
    server: Server = make_server(**HOSTILE_ENV)
    accepted = _run_hostile_sessions(server)
    log = server.log()
    lines = log.splitlines()
    forged = [line for line in lines if not re.match(r"\d{4}-\d\d-\d\dT", line)]
    assert not forged, f"a line was forged: {forged[:3]}"
    raw = {repr(c) for c in RAW_CONTROLS if c in log.replace("\n", "")}
    assert not raw, f"raw {raw} in the log"
    for name, _, shown in CLIENT_CONTROLS:
        for where, text in _where_each_field_shows(shown).items():
            if accepted[name][where]:
                assert text in log, (name, where, text)


def _walk_strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _walk_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk_strings(item)


def test_client_fields_are_escaped_in_json_logs(make_server: Callable[..., Server]) -> None:
    server: Server = make_server(SMTP_LOG_FORMAT="json", **HOSTILE_ENV)
    accepted = _run_hostile_sessions(server)
    events = [json.loads(line) for line in server.log().splitlines()]
    for event in events:
        for text in _walk_strings(event):
            raw = [c for c in RAW_CONTROLS if c in text]
            assert not raw, (raw, text, event.get("log_format"))

    def fields(fmt_start: str, key: str) -> set[str]:
        return {
            str(e.get(key))
            for e in events
            if str(e.get("log_format", "")).startswith(fmt_start) and key in e
        }

    for name, _, shown in CLIENT_CONTROLS:
        got = accepted[name]
        assert got["login"] and f"u{shown}ser@example.org" in fields("security ", "login")
        if got["helo"]:
            assert f"h{shown}x.test" in fields("session closed", "helo")
        if got["command"]:
            assert f"X{shown}Y" in fields("unknown command", "verb")
        if got["sender"]:
            assert f"s{shown}nd@remote.test" in fields("message ", "sender")
        if got["recipient"]:
            assert f"r{shown}cpt%elsewhere.test@example.org" in fields("security ", "recipient")


# --- the start-up log -------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_start_up_log_says_where_mail_goes(
    make_server: Callable[..., Server], tmp_path: Path, tls: bool
) -> None:
    from tests.test_tls import CertFiles

    env = {"SMTP_MAILBOXES": "alice@example.org,carol@example.org"}
    if tls:
        certs = CertFiles(tmp_path / "tls")
        env.update(
            SMTP_ENABLE_TLS="true",
            SMTP_TLS_CERT=str(certs.chain),
            SMTP_TLS_KEY=str(certs.key),
            SMTP_SMTPS_PORT=str(free_port()),
            SMTP_ENABLE_AUTH="true",
            SMTP_ARGON2_TIME_COST="1",
            SMTP_ARGON2_MEMORY_KIB="8",
            SMTP_ARGON2_PARALLELISM="1",
        )
    server: Server = make_server(**env)
    if tls:  # an account in the store before the start
        added = subprocess.run(
            [
                *(os.path.join(os.path.dirname(sys.executable), "mailsrv"), "users", "add"),
                *("bob@example.org", "--password-stdin"),
            ],
            input="a password\n",
            env=server.env(),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )
        assert added.returncode == 0, added.stderr
    server.start()
    wait_for(lambda: " ready: " in server.log(), READY_TIMEOUT, "the start-up summary")
    assert server.stop() in (-signal.SIGTERM, 128 + signal.SIGTERM), server.output()
    log = server.log()
    listening = f"mx [127.0.0.1]:{server.port}, submission [127.0.0.1]:{server.submission_port}"
    if tls:
        listening += f", smtps [127.0.0.1]:{env['SMTP_SMTPS_PORT']}"
    summary = (
        f"[mailsrv#info] mailsrv {__version__} ready: mail for example.org in {server.data_dir};"
        f" 2 mailbox(es) configured, {1 if tls else 0} account(s) in"
        f" {server.data_dir}/mailsrv.db; TLS {'on' if tls else 'off'},"
        f" AUTH {'on' if tls else 'off'}; listening: {listening}"
    )
    assert [line.split(" ", 1)[1] for line in log.splitlines() if " ready: " in line] == [summary]
    # Each listener is announced once: not again by Twisted's port, nor by the listener.
    assert " starting on " not in log
    assert "listening for " not in log
    assert "Traceback" not in server.output()


def test_a_store_that_cannot_be_opened_exits_non_zero(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    """The start-up checks pass (the file is a good database) but opening it for writing
    fails: the server logs one critical line and exits 1, so a supervisor sees a failure."""
    server: Server = make_server()
    db = server.data_dir / "mailsrv.db"
    server.data_dir.mkdir()
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("PRAGMA journal_mode=WAL")
        holder.execute("CREATE TABLE unrelated (x)")
        holder.execute("BEGIN IMMEDIATE")  # the write lock, held past the store's busy timeout
        server.start()
        status = server.wait()
    finally:
        holder.close()
    output = server.output()
    assert status == 1, output
    assert (
        f"[mailsrv.auth#critical] cannot open the user store {db}: database error:"
        " database is locked"
    ) in server.log()
    assert " ready: " not in output and "Traceback" not in output
    assert "mailsrv stopped" in server.log()
