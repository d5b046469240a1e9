"""The mailsrv benchmark: mailsrv side by side with aiosmtpd, Postfix and smtp-sink.

Run it with ``bench/run`` (which installs the tools first); ``bench/run --help`` lists the flags.
Everything listens on 127.0.0.1 only, every loop is bounded in count and time, and every process
started here is stopped at the end (also on Ctrl-C or SIGTERM).

Servers, each started on a free loopback port with a fresh data directory:

* ``mailsrv``: ``twistd -n mailsrv`` from the project venv (durable: fsync before the 250);
* ``aiosmtpd``: ``peers/aiosmtpd_maildir.py`` (Maildir, fsync file and directory before 250);
* ``postfix``: a throwaway instance (own config, queue and Maildir under the work directory);
* ``smtp-sink``: Postfix's C test server that discards everything: the ceiling.

Workloads, in interleaved rounds (every server once per workload per round):

(a) 2000 x 1 KiB over 1 session; (b) 5000 x 1 KiB over 50 sessions; (c) 500 x 100 KiB over 20
sessions, plus 20 x 50 MiB over 20 sessions to see whether memory stays flat; (d) 1000 sessions
at once, each sending, idling 1 s and sending again; (e) an AUTH storm when ``mailsrv users``
exists; (f) relay: 5000 x 1 KiB over 50 sessions to remote recipients, mailsrv and Postfix each
relaying to their own ``smtp-sink -d`` as smarthost, with a unique token per message so that the
sink's files show what was lost or duplicated, and the time from the first submission to the
last message at the sink; (g) webhooks: (b) at mailsrv without and with one webhook endpoint on
a local receiver (``peers/webhook_receiver.py``, answering 200), for the notifications per
second, the lag from the end of DATA to the receiver, events lost or duplicated, the outbox
left, and the SMTP rate with the webhook on as a ratio of the same round's without it.

``--compare REV`` benches mailsrv at REV as one more server in the same rounds (e.g. the
revision before a change, for a before/after ratio in one sitting); ``--workloads`` picks a
subset (``--only`` is the same option: ``--only e`` runs just the storm,
mailsrv only).

Throughput comes from ``smtp-source`` (C, light on the shared CPUs) and, separately, from
``loadgen.py`` (asyncio), which also measures the end-of-DATA-to-250 latency.  The medians go to
``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import functools
import itertools
import json
import os
import platform
import pwd
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS_PYTHON = sys.executable
LOADGEN = HERE / "loadgen.py"
AIOSMTPD_PEER = HERE / "peers" / "aiosmtpd_maildir.py"
DOMAIN = "bench.test"
RECIPIENT = f"user@{DOMAIN}"
SENDER = "bench@client.invalid"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1024 * 1024
TIMES = "\u00d7"  # the multiplication sign, for the report

# Every process this run starts, stopped by cleanup() whatever happens.
_STARTED: list[subprocess.Popen[Any]] = []
_CLEANUPS: list[Callable[[], None]] = []
_WORKDIR_NUMBERS = itertools.count(1)


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def cleanup() -> None:
    """Stop every server and load process this run started (by pid, never by name)."""
    while _CLEANUPS:
        step = _CLEANUPS.pop()
        with contextlib.suppress(Exception):
            step()
    for proc in _STARTED:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
    deadline = time.monotonic() + 10
    for proc in _STARTED:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.1, deadline - time.monotonic()))
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


def _on_signal(signum: int, frame: Any) -> None:
    log(f"signal {signum}: stopping everything started")
    cleanup()
    sys.exit(128 + signum)


def spawn(cmd: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    proc: subprocess.Popen[Any] = subprocess.Popen(cmd, **kwargs)
    _STARTED.append(proc)
    return proc


def terminate(proc: subprocess.Popen[Any] | None, grace: float = 10) -> None:
    """Stop ``proc`` if it runs: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# -- /proc readings ----------------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS")


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def cpu_ticks(pid: int, children_too: bool = False) -> int:
    """utime + stime (+ cutime + cstime of reaped children) in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    ticks = int(fields[11]) + int(fields[12])
    if children_too:
        ticks += int(fields[13]) + int(fields[14])
    return ticks


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(entry.name))
    return found


def listen_counters() -> dict[str, int]:
    """TcpExt ListenOverflows and ListenDrops (SYNs dropped at a full accept queue)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return {k: int(table.get(k, 0)) for k in ("ListenOverflows", "ListenDrops")}
    return {}


def listen_dropped(before: dict[str, int], after: dict[str, int]) -> int:
    return max((after.get(k, 0) - before.get(k, 0)) for k in ("ListenOverflows", "ListenDrops"))


def free_port() -> int:
    """A free loopback port below the ephemeral range.

    Not ``bind(0)``: that hands out ephemeral ports, which the tens of thousands of client
    connections of a run (and any test suite running beside it) also use, so a server could
    find its port taken between this check and its own bind.
    """
    top = 32000
    with contextlib.suppress(OSError, ValueError):
        top = min(top, int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]))
    for _ in range(200):
        port = random.randrange(max(1024, top - 12000), top)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        found: int = s.getsockname()[1]
        return found


def wait_for_banner(
    port: int, proc: subprocess.Popen[Any] | None, timeout: float, name: str
) -> str | None:
    """None once the port answers with a 220 greeting naming ``name``, else why not.

    The name proves the greeting comes from the server started here and not from some other
    process that took the port first.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return f"exited with status {proc.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                banner = s.recv(512).decode("ascii", "replace")
                with contextlib.suppress(OSError):
                    s.sendall(b"QUIT\r\n")
                if banner.startswith("220") and name in banner:
                    return None
                last = f"greeting {banner.strip()!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    return f"not ready after {timeout:.0f}s ({last})"


def count_files(directory: Path | None) -> int:
    if directory is None or not directory.is_dir():
        return 0
    return sum(1 for _ in os.scandir(directory))


def empty_directory(directory: Path | None) -> None:
    if directory is None or not directory.is_dir():
        return
    for entry in os.scandir(directory):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)


def tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


# -- servers -----------------------------------------------------------------------------------


class StartError(Exception):
    pass


class Server:
    """One server under test; subclasses know how to start, stop and measure it."""

    name = ""
    banner_name = ""  # must appear in the 220 greeting
    durable = True  # files in a Maildir to count against the 250s
    memory_label = "RSS"
    sample_interval = 0.02

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = 0
        self.workdir: Path | None = None
        self.maildir_new: Path | None = None
        self.proc: subprocess.Popen[Any] | None = None
        self.unavailable: str | None = None  # why this server could not run at all
        self._generation = 0

    def fresh_workdir(self) -> Path:
        # Numbered across all servers: two instances of one kind may run at once (the profile).
        self._generation = next(_WORKDIR_NUMBERS)
        workdir = self.base / f"{self.name}-{self._generation}"
        workdir.mkdir(parents=True)
        return workdir

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        proc = self.proc
        self.proc = None
        terminate(proc, 20)
        self.remove_workdir()

    def remove_workdir(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def alive(self) -> str | None:
        """None when the server still answers with its own greeting, else why not."""
        if self.proc is not None and self.proc.poll() is not None:
            return f"exited with status {self.proc.returncode}: {self.log_tail()}"
        why = wait_for_banner(self.port, self.proc, 5, self.banner_name)
        return None if why is None else f"{why}: {self.log_tail()}"

    def log_tail(self) -> str:
        if self.workdir is None:
            return ""
        logs = sorted(self.workdir.glob("*.log")) + sorted(self.workdir.glob("maillog"))
        return " | ".join(tail(path, 3) for path in logs)

    def ensure_running(self, notes: list[str]) -> bool:
        """Before a measurement: restart a server that died (noting why); False if it cannot."""
        if self.unavailable:
            return False
        why = self.alive()
        if why is None:
            return True
        notes.append(f"{self.name} was down ({why}); restarted")
        log(f"{self.name}: down ({why}); restarting")
        return self.restart()

    def restart(self) -> bool:
        """Stop, start fresh; False (and ``unavailable`` set) when it cannot start."""
        self.stop()
        try:
            self.start()
        except StartError as e:
            self.unavailable = str(e)
            log(f"{self.name}: cannot start: {e}")
            self.stop()
            return False
        self.unavailable = None
        return True

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def memory_kib(self) -> int:
        return rss_kib(self.pid())

    def cpu_ms(self) -> float:
        return cpu_ticks(self.pid()) * 1000 / CLK_TCK

    def wait_delivered(self, expected: int, timeout: float) -> int:
        return count_files(self.maildir_new)


class MailsrvServer(Server):
    name = "mailsrv"
    banner_name = "mailsrv.bench.invalid"

    def __init__(self, base: Path, venv: Path, pythonpath: str | None) -> None:
        super().__init__(base)
        self.venv = venv
        self.pythonpath = pythonpath
        self.extra_env: dict[str, str] = {}

    def env(self, data_dir: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SMTP_")}
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        env.update(
            SMTP_HOST="127.0.0.1",
            SMTP_PORT=str(self.port),
            SMTP_SUBMISSION_PORT="0",
            SMTP_HOSTNAME="mailsrv.bench.invalid",
            SMTP_DATA_DIR=str(data_dir),
            SMTP_LOCAL_DOMAINS=DOMAIN,
            SMTP_MAILBOXES=RECIPIENT,
            SMTP_MAX_MESSAGE_SIZE="64M",
            SMTP_LOG_LEVEL="warn",
        )
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        self.workdir = self.fresh_workdir()
        self.port = free_port()
        data_dir = self.workdir / "data"
        self.maildir_new = data_dir / "mail" / DOMAIN / "user" / "new"
        self.before_start(data_dir)
        logfile = self.workdir / "twistd.log"
        with open(logfile, "wb") as out:
            self.proc = spawn(
                [str(self.venv / "bin" / "twistd"), "-n", "--pidfile=", "mailsrv"],
                cwd=self.workdir,
                env=self.env(data_dir),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        why = wait_for_banner(self.port, self.proc, 30, self.banner_name)
        if why is not None:
            raise StartError(f"{why}: {tail(logfile)}")

    def before_start(self, data_dir: Path) -> None:
        pass


class AiosmtpdServer(Server):
    name = "aiosmtpd"
    banner_name = "aiosmtpd.bench.invalid"

    def start(self) -> None:
        self.workdir = self.fresh_workdir()
        self.port = free_port()
        maildir = self.workdir / "Maildir"
        self.maildir_new = maildir / "new"
        logfile = self.workdir / "aiosmtpd.log"
        with open(logfile, "wb") as out:
            self.proc = spawn(
                [
                    PEERS_PYTHON,
                    str(AIOSMTPD_PEER),
                    "--port",
                    str(self.port),
                    "--maildir",
                    str(maildir),
                ],
                cwd=self.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        why = wait_for_banner(self.port, self.proc, 30, self.banner_name)
        if why is not None:
            raise StartError(f"{why}: {tail(logfile)}")


class SinkServer(Server):
    name = "smtp-sink"
    banner_name = "sink.bench.invalid"
    durable = False

    def start(self) -> None:
        sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        if not os.path.exists(sink):
            raise StartError("smtp-sink not installed (Debian package postfix)")
        self.workdir = self.fresh_workdir()
        self.port = free_port()
        self.maildir_new = None
        self.proc = spawn(
            # As root smtp-sink insists on dropping privileges to some user (-u).
            [
                sink,
                *(["-u", "postfix"] if os.geteuid() == 0 else []),
                "-m",  # simultaneous sessions (default 256: too few for workload (d))
                "1100",
                "-h",
                self.banner_name,
                "-c",
                f"127.0.0.1:{self.port}",
                "1000",
            ],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        why = wait_for_banner(self.port, self.proc, 15, self.banner_name)
        if why is not None:
            raise StartError(why)


class PostfixServer(Server):
    """A throwaway Postfix: own config_directory, queue_directory and Maildir, loopback only."""

    name = "postfix"
    banner_name = "postfix.bench.invalid"
    memory_label = "PSS sum of all Postfix processes"
    sample_interval = 0.25

    MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
local     unix  - n n - - local
virtual   unix  - n n - - virtual
lmtp      unix  - - n - - lmtp
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.config_dir: Path | None = None
        self.master_pid = 0

    def _postfix(self, action: str, timeout: float = 60) -> tuple[int, str]:
        """``postfix -c DIR action``; its messages only go to a terminal, so give it one."""
        assert self.config_dir is not None
        cmd = ["postfix", "-c", str(self.config_dir), action]
        script = shutil.which("script")
        if script:
            cmd = [script, "-qec", " ".join(cmd), "/dev/null"]
        try:
            done = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return 124, f"postfix {action} timed out"
        return done.returncode, (done.stdout + done.stderr).replace("\r", "")

    def start(self) -> None:
        if not shutil.which("postfix") and not os.path.exists("/usr/sbin/postfix"):
            raise StartError("postfix not installed (Debian package postfix)")
        try:
            owner = pwd.getpwnam("postfix")
        except KeyError:
            raise StartError("no 'postfix' user (is the postfix package installed?)") from None
        if os.geteuid() != 0:
            raise StartError("a Postfix instance needs root to start (run as root)")
        self.workdir = self.fresh_workdir()
        self.port = free_port()
        top = self.workdir
        for path in (self.base, top):
            path.chmod(0o755)  # the postfix user must reach its queue and Maildir
        config = top / "etc"
        spool, data, mail = top / "spool", top / "data", top / "mail"
        for path in (config, spool, data, mail):
            path.mkdir()
        for path in (data, mail):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        self.config_dir = config
        self.maildir_new = mail / DOMAIN / "user" / "new"
        main_cf = f"""\
compatibility_level = 3.6
queue_directory = {spool}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
maillog_file = {top}/maillog
maillog_file_prefixes = {top}
myhostname = postfix.bench.invalid
mydomain = bench.invalid
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination = localhost
mynetworks = 127.0.0.0/8
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {mail}
virtual_mailbox_maps = static:{DOMAIN}/user/
virtual_uid_maps = static:{owner.pw_uid}
virtual_gid_maps = static:{owner.pw_gid}
virtual_minimum_uid = 1
virtual_mailbox_limit = 0
message_size_limit = {64 * MiB}
alias_maps =
alias_database =
biff = no
smtputf8_enable = yes
# enough smtpd (and cleanup) processes for workload (d): 1000 sessions at once
default_process_limit = 1100
"""
        (config / "main.cf").write_text(main_cf + self.extra_main_cf())
        (config / "master.cf").write_text(self.MASTER_CF.format(port=self.port))
        status, output = self._postfix("start")
        if status != 0:
            raise StartError(
                f"postfix start: status {status}: {output.strip()[-300:]} {tail(top / 'maillog')}"
            )
        pidfile = spool / "pid" / "master.pid"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not self.master_pid:
            with contextlib.suppress(OSError, ValueError):
                self.master_pid = int(pidfile.read_text().strip())
            time.sleep(0.1)
        if not self.master_pid:
            raise StartError(f"no master.pid: {tail(top / 'maillog')}")
        why = wait_for_banner(self.port, None, 30, self.banner_name)
        if why is not None:
            raise StartError(f"{why}: {tail(top / 'maillog')}")
        _CLEANUPS.append(self._emergency_stop)

    def extra_main_cf(self) -> str:
        """Lines appended to main.cf (the relay variant sets its relayhost)."""
        return ""

    def _emergency_stop(self) -> None:
        if self.config_dir is not None and self.master_pid:
            self._postfix("abort", timeout=20)
            self._kill_tree()

    def _kill_tree(self) -> None:
        if not self.master_pid:
            return
        for pid in [*children_of(self.master_pid), self.master_pid]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.master_pid = 0

    def stop(self) -> None:
        if self.config_dir is not None and self.master_pid:
            _status, _ = self._postfix("stop", timeout=30)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    os.kill(self.master_pid, 0)
                except ProcessLookupError:
                    self.master_pid = 0
                    break
                time.sleep(0.1)
            if self.master_pid:
                self._postfix("abort", timeout=20)
                time.sleep(0.5)
                self._kill_tree()
            with contextlib.suppress(ValueError):
                _CLEANUPS.remove(self._emergency_stop)
        self.config_dir = None
        self.remove_workdir()

    def pid(self) -> int:
        return self.master_pid

    def pids(self) -> list[int]:
        return [self.master_pid, *children_of(self.master_pid)] if self.master_pid else []

    def memory_kib(self) -> int:
        return sum(pss_kib(pid) for pid in self.pids())

    def cpu_ms(self) -> float:
        if not self.master_pid:
            return 0.0
        ticks = cpu_ticks(self.master_pid, children_too=True)
        ticks += sum(cpu_ticks(pid) for pid in children_of(self.master_pid))
        return ticks * 1000 / CLK_TCK

    def wait_delivered(self, expected: int, timeout: float) -> int:
        """Postfix acknowledges on its queue file; wait (bounded) for Maildir delivery."""
        deadline = time.monotonic() + timeout
        count = count_files(self.maildir_new)
        while count < expected and time.monotonic() < deadline:
            time.sleep(0.2)
            count = count_files(self.maildir_new)
        return count


# -- measuring ---------------------------------------------------------------------------------


class Sampler:
    """Samples a server's memory in a thread; ``peak`` in KiB."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self.peak = self.server.memory_kib()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.server.sample_interval):
            self.peak = max(self.peak, self.server.memory_kib())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.peak = max(self.peak, self.server.memory_kib())


@dataclass
class Workload:
    key: str
    title: str
    sessions: int
    count: int
    size: int


def run_loadgen(args: list[str], timeout: float) -> dict[str, Any]:
    proc = spawn(
        [PEERS_PYTHON, str(LOADGEN), *args, "--timeout", str(timeout)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        out, err = proc.communicate(timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return {"error": "loadgen did not finish", "ok": 0}
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    return {"error": f"loadgen failed: {err.strip()[-300:]}", "ok": 0}


def measure(
    server: Server, run: Callable[[], dict[str, Any]], expected: int | None
) -> dict[str, Any]:
    """Run one load against ``server`` and add the server-side figures."""
    delivered_before = count_files(server.maildir_new)
    cpu_before = server.cpu_ms()
    listen_before = listen_counters()
    with Sampler(server) as sampler:
        base = sampler.peak
        result = run()
    cpu = server.cpu_ms() - cpu_before
    accepted = result["ok"] if expected is None else expected
    result["listen_dropped"] = listen_dropped(listen_before, listen_counters())
    result["base_kib"] = base
    result["peak_kib"] = sampler.peak
    result["cpu_ms_per_msg"] = cpu / accepted if accepted else None
    if server.durable and server.maildir_new is not None:
        delivered = server.wait_delivered(delivered_before + accepted, 120) - delivered_before
        result["lost"] = max(0, accepted - delivered)
        empty_directory(server.maildir_new)
    else:
        result["lost"] = None
    return result


def smtp_source(server: Server, w: Workload, timeout: float) -> dict[str, Any]:
    source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    cmd = [source, "-d", "-s", str(w.sessions), "-m", str(w.count), "-l", str(w.size)]
    cmd += ["-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{server.port}"]
    started = time.perf_counter()
    proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return {"ok": 0, "error": "smtp-source timed out", "rate": None}
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        text = out.decode(errors="replace").strip()[-200:]
        return {"ok": 0, "error": f"smtp-source status {proc.returncode}: {text}", "rate": None}
    return {"ok": w.count, "elapsed": elapsed, "rate": w.count / elapsed}


def send_args(server: Server, w: Workload, recipient: str = RECIPIENT) -> list[str]:
    """``loadgen.py send`` arguments for workload ``w`` at ``server``."""
    return [
        "send",
        "--port",
        str(server.port),
        "--sessions",
        str(w.sessions),
        "--messages",
        str(w.count),
        "--size",
        str(w.size),
        "--recipient",
        recipient,
        "--sender",
        SENDER,
    ]


def loadgen_send(server: Server, w: Workload, timeout: float) -> dict[str, Any]:
    return run_loadgen(send_args(server, w), timeout)


def run_idle(server: Server, sessions: int, idle: float, timeout: float) -> dict[str, Any]:
    """Workload (d): RSS with every session idle, against the baseline before they came."""
    time.sleep(1.0)
    baseline = server.memory_kib()
    listen_before = listen_counters()
    idle_kib = 0
    proc = spawn(
        [
            PEERS_PYTHON,
            str(LOADGEN),
            "idle",
            "--port",
            str(server.port),
            "--sessions",
            str(sessions),
            "--idle",
            str(idle),
            "--timeout",
            str(timeout),
            "--recipient",
            RECIPIENT,
            "--sender",
            SENDER,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    result: dict[str, Any] = {"ok": 0, "error": "loadgen printed no result"}
    deadline = time.monotonic() + timeout + 30
    with Sampler(server) as sampler:
        for line in proc.stdout:
            if line.strip() == "IDLE":
                time.sleep(min(0.3, idle / 3))
                idle_kib = server.memory_kib()
            elif line.startswith("{"):
                result = json.loads(line)
            if time.monotonic() > deadline:
                break
        try:
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            result["error"] = "loadgen idle did not finish"
    result["listen_dropped"] = listen_dropped(listen_before, listen_counters())
    result["baseline_kib"] = baseline
    result["idle_kib"] = idle_kib
    result["peak_kib"] = sampler.peak
    result["per_session_kib"] = (idle_kib - baseline) / sessions if idle_kib else None
    result["served"] = (
        result.get("ok") == 2 * sessions
        and not result.get("refused")
        and not result.get("connect_failed")
        and not result.get("timed_out")
        and not result.get("slow_connects")
        and not result.get("listen_dropped")
    )
    if server.durable and server.maildir_new is not None:
        delivered = server.wait_delivered(result.get("ok", 0), 120)
        result["lost"] = max(0, result.get("ok", 0) - delivered)
    return result


# -- (e) AUTH storm ----------------------------------------------------------------------------


class AuthMailsrv(MailsrvServer):
    """mailsrv with STARTTLS and AUTH, no trusted network (so every loopback client is throttled
    like a remote one), and two users made with ``mailsrv users add``: the storm's target and
    an unaffected account for the correct login."""

    name = "mailsrv-auth"
    user = f"storm@{DOMAIN}"
    password = "bench-storm-password-1"  # noqa: S105 (a throwaway account on loopback)
    honest_user = f"honest@{DOMAIN}"
    honest_password = "bench-honest-password-2"  # noqa: S105 (likewise)
    probe_source = "127.0.0.250"

    def start(self) -> None:
        super().start()
        why = probe_auth(self.port, self.honest_user, self.honest_password, self.probe_source)
        if why is not None:
            raise StartError(why)

    def before_start(self, data_dir: Path) -> None:
        assert self.workdir is not None
        cert, key = self.workdir / "cert.pem", self.workdir / "key.pem"
        made = subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=mailsrv.bench.invalid",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if made.returncode != 0:
            raise StartError(f"openssl: {made.stderr.decode(errors='replace')[-200:]}")
        self.extra_env = {
            "SMTP_ENABLE_TLS": "true",
            "SMTP_TLS_CERT": str(cert),
            "SMTP_TLS_KEY": str(key),
            "SMTP_SMTPS_PORT": str(free_port()),
            "SMTP_ENABLE_AUTH": "true",
            "SMTP_TRUSTED_NETWORKS": "",
        }
        env = self.env(data_dir)
        for user, password in (
            (self.user, self.password),
            (self.honest_user, self.honest_password),
        ):
            added = subprocess.run(
                [str(self.venv / "bin" / "mailsrv"), "users", "add", user, "--password-stdin"],
                input=(password + "\n").encode(),
                capture_output=True,
                env=env,
                cwd=self.workdir,
                timeout=120,
                check=False,
            )
            if added.returncode != 0:
                text = (added.stdout + added.stderr).decode(errors="replace").strip()[-300:]
                raise StartError(f"mailsrv users add {user}: status {added.returncode}: {text}")


def probe_auth(port: int, user: str, password: str, source: str = "127.0.0.1") -> str | None:
    """None when STARTTLS + AUTH PLAIN work once (from loopback ``source``), else what not."""
    import smtplib
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as client:
            client.ehlo("probe.bench.invalid")
            if not client.has_extn("starttls"):
                return "STARTTLS not offered (SMTP_ENABLE_TLS set)"
            client.starttls(context=context)
            client.ehlo("probe.bench.invalid")
            if not client.has_extn("auth"):
                return "AUTH not offered after STARTTLS (SMTP_ENABLE_AUTH set)"
            client.login(user, password)
    except (OSError, smtplib.SMTPException) as e:
        return f"STARTTLS + AUTH PLAIN probe failed: {e}"
    return None


def users_command_exists(venv: Path, pythonpath: str | None) -> bool:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    try:
        done = subprocess.run(
            [str(venv / "bin" / "mailsrv"), "users", "--help"],
            capture_output=True,
            env=env,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


STORM_SOURCES = "127.0.0.10-127.0.0.109"  # 100 loopback addresses


def run_auth_storm(server: AuthMailsrv, clients: int, duration: float) -> dict[str, Any]:
    """Workload (e): ``clients`` sessions from 100 loopback addresses hammer wrong passwords
    (for a real account and made-up names) while one client NOOPs every 10 ms and an
    unaffected client logs in correctly at 30 %, 60 % and 90 % of the storm."""
    probe_at = ",".join(f"{duration * share:.1f}" for share in (0.3, 0.6, 0.9))
    storm = spawn(
        [
            PEERS_PYTHON,
            str(LOADGEN),
            "storm",
            "--port",
            str(server.port),
            "--sessions",
            str(clients),
            "--sources",
            STORM_SOURCES,
            "--duration",
            str(duration),
            "--user",
            server.user,
            "--probe-source",
            server.probe_source,
            "--probe-user",
            server.honest_user,
            "--probe-password",
            server.honest_password,
            "--probe-at",
            probe_at,
            "--timeout",
            str(duration + 60),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    cpu_before = server.cpu_ms()
    time.sleep(min(1.0, duration / 5))
    noop = run_loadgen(
        [
            "noop",
            "--port",
            str(server.port),
            "--duration",
            str(duration * 0.7),
            "--interval",
            "0.01",
        ],
        duration + 30,
    )
    try:
        out, _ = storm.communicate(timeout=duration + 90)
    except subprocess.TimeoutExpired:
        storm.kill()
        out, _ = storm.communicate()
    cpu = server.cpu_ms() - cpu_before
    lines = [line for line in out.strip().splitlines() if line.startswith("{")]
    auth: dict[str, Any] = {"ok": 0, "error": "storm loadgen failed"}
    if lines:
        auth = json.loads(lines[-1])
    answered = auth.get("replies", {})
    probes = auth.get("probes", [])
    return {
        "attempts": auth.get("attempts", 0),
        "attempt_rate": auth.get("attempts", 0) / auth["elapsed"] if auth.get("elapsed") else None,
        "replies": answered,
        "addresses": auth.get("addresses"),
        "probes": probes,
        "login_ok": bool(probes) and all(p.get("ok") for p in probes),
        "login_max_ms": max((p["total_ms"] for p in probes), default=None),
        "auth_errors": auth.get("errors", []) + ([auth["error"]] if "error" in auth else []),
        "noop_count": noop.get("ok", 0),
        "noop_p50_ms": noop.get("p50_ms"),
        "noop_p99_ms": noop.get("p99_ms"),
        "noop_max_ms": noop.get("max_ms"),
        "noop_errors": noop.get("errors", []) + ([noop["error"]] if "error" in noop else []),
        "cpu_ms_per_hash": cpu / answered["535"] if answered.get("535") else None,
    }


# -- (f) relay ---------------------------------------------------------------------------------

RELAY_RECIPIENT = "r{n}@remote.bench.example"  # a domain that is not local: relayed
_TOKEN_AT_END = re.compile(rb"bench-token: ([A-Za-z0-9_-]+)\n\n\Z")


class DumpSink:
    """``smtp-sink -d``: the smarthost of workload (f), one file per message received.

    smtp-sink creates a message's file at MAIL and closes it at the final dot, before its
    ``250``; a file whose last line is a ``bench-token`` line (then the empty line the dump
    format adds) is a whole message.  Its mtime is when the message arrived in full.

    The files go to a tmpfs (``/dev/shm``) when there is one: the sink stands for another
    machine, and its writes on the filesystem of the server under test would be flushed by
    that server's syncs (mailsrv's ``syncfs`` most of all).
    """

    banner_name = "sink.bench.invalid"

    def __init__(self, base: Path, name: str) -> None:
        self.base = base
        self.name = name
        self.port = 0
        self.dump_dir: Path | None = None
        self.proc: subprocess.Popen[Any] | None = None
        self.tokens: dict[str, int] = defaultdict(int)  # token -> copies received
        self.last_arrival: dict[str, float] = {}  # token -> latest mtime (epoch seconds)
        self.unknown: list[str] = []  # whole files without a bench token (DSNs, strays)
        self._seen: set[str] = set()

    def start(self) -> None:
        sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        if not os.path.exists(sink):
            raise StartError("smtp-sink not installed (Debian package postfix)")
        shm = Path("/dev/shm")
        if shm.is_dir() and os.access(shm, os.W_OK):
            self.dump_dir = Path(tempfile.mkdtemp(prefix=f"mailsrv-bench-{self.name}-", dir=shm))
            self.dump_dir.chmod(0o755)
        else:
            self.dump_dir = self.base / f"{self.name}-dump"
            self.dump_dir.mkdir(parents=True)
        dump_dir = self.dump_dir
        _CLEANUPS.insert(0, lambda: shutil.rmtree(dump_dir, ignore_errors=True))
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postfix")
            os.chown(self.dump_dir, owner.pw_uid, owner.pw_gid)
        self.port = free_port()
        self.tokens.clear()
        self.last_arrival.clear()
        self.unknown.clear()
        self._seen.clear()
        self.proc = spawn(
            [
                sink,
                *(["-u", "postfix"] if os.geteuid() == 0 else []),
                "-h",
                self.banner_name,
                "-d",
                f"{self.dump_dir}/m.",
                f"127.0.0.1:{self.port}",
                "1000",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        why = wait_for_banner(self.port, self.proc, 15, self.banner_name)
        if why is not None:
            raise StartError(f"smtp-sink: {why}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        terminate(proc)
        if self.dump_dir is not None:
            shutil.rmtree(self.dump_dir, ignore_errors=True)
            self.dump_dir = None

    def cpu_ms(self) -> float:
        return 0.0 if self.proc is None else cpu_ticks(self.proc.pid) * 1000 / CLK_TCK

    def count(self) -> int:
        """Files in the dump directory now (messages received or being received)."""
        return count_files(self.dump_dir)

    def scan(self, final: bool = False) -> None:
        """Read the files that arrived whole since the last scan.  With ``final``, a file
        without a token counts as an unknown arrival (an unfinished one is gone by then:
        smtp-sink removes the file of an aborted transaction)."""
        if self.dump_dir is None:
            return
        with os.scandir(self.dump_dir) as entries:
            names = [e.name for e in entries if e.name not in self._seen]
        for name in names:
            path = self.dump_dir / name
            try:
                stat = path.stat()
                with open(path, "rb") as f:
                    f.seek(max(0, stat.st_size - 128))
                    end = f.read()
            except FileNotFoundError:
                continue
            found = _TOKEN_AT_END.search(end)
            if found is None:
                if final and stat.st_size:
                    self._seen.add(name)
                    self.unknown.append(name)
                continue
            self._seen.add(name)
            token = found.group(1).decode()
            self.tokens[token] += 1
            self.last_arrival[token] = max(self.last_arrival.get(token, 0.0), stat.st_mtime)


class RelayMailsrv(MailsrvServer):
    """mailsrv relaying everything to its own ``smtp-sink -d`` as smarthost (workload (f)).

    Defaults otherwise: loopback is a trusted network (it may relay), 20 connections per
    destination, 100 in all; ``SMTP_RELAY_TLS=none`` because smtp-sink offers no STARTTLS.
    """

    name = "mailsrv-relay"
    label = "mailsrv"

    def __init__(
        self, base: Path, venv: Path, pythonpath: str | None, label: str = "mailsrv"
    ) -> None:
        super().__init__(base, venv, pythonpath)
        self.label = label
        self.name = f"{label}-relay"
        self.sink = DumpSink(base, self.name)

    def before_start(self, data_dir: Path) -> None:
        self.sink.stop()
        self.sink.start()
        self.extra_env = {
            "SMTP_RELAY_HOST": f"127.0.0.1:{self.sink.port}",
            "SMTP_RELAY_TLS": "none",
        }
        self.queue_dir = data_dir / "queue"

    def left_in_queue(self) -> int:
        """Queue records not yet removed (0 once every message has left the queue)."""
        queue = getattr(self, "queue_dir", None)
        if queue is None or not queue.is_dir():
            return 0
        return sum(1 for e in os.scandir(queue) if e.name.endswith(".json"))

    def stop(self) -> None:
        super().stop()
        self.sink.stop()


class BenchPostgres:
    """A throwaway PostgreSQL cluster for the shared-queue variant of (f): ``initdb`` into the
    work directory (as the ``postgres`` user when run as root), started on a free loopback
    port with durable commits (``fsync=on``, ``synchronous_commit=on``, the defaults)."""

    def __init__(self, base: Path) -> None:
        self.root = base / "postgres"
        self.port = 0
        self.bindir = _pg_bindir()

    def _as_owner(self, *command: str) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *command]
        return list(command)

    def start(self) -> str:
        """Start (initdb the first time); the DSN of a fresh database."""
        if self.bindir is None:
            raise RuntimeError("no PostgreSQL server binaries (install postgresql)")
        if not (self.root / "data").exists():
            self.root.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                import pwd

                owner = pwd.getpwnam("postgres")
                os.chown(self.root, owner.pw_uid, owner.pw_gid)
            subprocess.run(
                self._as_owner(
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.root / "data"),
                    "-A",
                    "trust",
                    "-U",
                    "mailsrv",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ),
                check=True,
                capture_output=True,
                timeout=120,
            )
        self.port = free_port()
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
            " -c fsync=on -c synchronous_commit=on -c max_connections=50"
        )
        subprocess.run(
            self._as_owner(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.root / "data"),
                "-l",
                str(self.root / "log"),
                "-w",
                "-o",
                options,
                "start",
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        name = f"q{int(time.time() * 1000)}"
        subprocess.run(
            self._as_owner(
                str(self.bindir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "mailsrv",
                name,
            ),
            check=True,
            capture_output=True,
            timeout=60,
        )
        return f"postgresql://mailsrv@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.bindir is None or not (self.root / "data").exists():
            return
        subprocess.run(
            self._as_owner(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.root / "data"),
                "-m",
                "fast",
                "-w",
                "stop",
            ),
            check=False,
            capture_output=True,
            timeout=60,
        )

    def rows(self, dsn: str) -> int:
        """Messages still in the queue table."""
        result = subprocess.run(
            [str(self.bindir / "psql"), "-At", "-c", "SELECT count(*) FROM queue_messages", dsn]
            if self.bindir is not None
            else ["false"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return int(result.stdout.strip() or 0) if result.returncode == 0 else 0


def _pg_bindir() -> Path | None:
    import glob

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    return Path(found[-1]) if found else None


class PgRelayMailsrv(RelayMailsrv):
    """(f) with the relay queue in PostgreSQL on the same machine (``SMTP_QUEUE_URL``, one
    node): what the shared queue costs against the file queue and Postfix."""

    def __init__(self, base: Path, venv: Path, pythonpath: str | None) -> None:
        super().__init__(base, venv, pythonpath, label="mailsrv-pg")
        self.postgres = BenchPostgres(base)
        self.dsn = ""
        _CLEANUPS.insert(0, self.postgres.stop)

    def before_start(self, data_dir: Path) -> None:
        super().before_start(data_dir)
        self.postgres.stop()
        self.dsn = self.postgres.start()
        self.extra_env["SMTP_QUEUE_URL"] = self.dsn
        self.extra_env["SMTP_QUEUE_NODE"] = "bench"

    def left_in_queue(self) -> int:
        return self.postgres.rows(self.dsn) if self.dsn else 0

    def stop(self) -> None:
        super().stop()
        self.postgres.stop()


class RelayPostfix(PostfixServer):
    """The throwaway Postfix with ``relayhost = [127.0.0.1]:PORT`` of its own ``smtp-sink -d``.

    Postfix's defaults otherwise: 20 connections per destination
    (``default_destination_concurrency_limit``), connection reuse on demand, no TLS (no
    ``smtp_tls_security_level`` set).
    """

    name = "postfix-relay"
    label = "postfix"

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.sink = DumpSink(base, self.name)

    def start(self) -> None:
        self.sink.stop()
        self.sink.start()
        super().start()

    def extra_main_cf(self) -> str:
        return f"relayhost = [127.0.0.1]:{self.sink.port}\n"

    def left_in_queue(self) -> int:
        """Messages still in Postfix's queue directories."""
        if self.workdir is None:
            return 0
        spool = self.workdir / "spool"
        n = 0
        for queue in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _root, _dirs, files in os.walk(spool / queue):
                n += len(files)
        return n

    def stop(self) -> None:
        super().stop()
        self.sink.stop()


def run_relay(
    server: RelayMailsrv | RelayPostfix, w: Workload, prefix: str, timeout: float
) -> dict[str, Any]:
    """Workload (f): submit ``w`` with a unique token per message to remote recipients, then
    wait (bounded) until every accepted token is at the sink; lost, duplicated and the
    end-to-end rate from the first submission to the last message at the sink."""
    sink = server.sink
    load_before = os.getloadavg()[0]
    cpu_before, sink_cpu_before = server.cpu_ms(), sink.cpu_ms()
    listen_before = listen_counters()
    with Sampler(server) as sampler:
        submitted = run_loadgen(
            [*send_args(server, w, RELAY_RECIPIENT), "--tokens", prefix], timeout
        )
        accepted = {f"{prefix}-{n:07d}" for n in submitted.get("accepted", [])}
        deadline = time.monotonic() + timeout
        stall_limit = 60.0
        last_progress, arrived = time.monotonic(), -1
        while time.monotonic() < deadline:
            sink.scan()
            have = sum(1 for t in accepted if t in sink.tokens)
            if have >= len(accepted):
                break
            if have != arrived:
                arrived, last_progress = have, time.monotonic()
            elif time.monotonic() - last_progress > stall_limit:
                break
            time.sleep(0.05)
        complete_at = time.monotonic()
        # Late copies (a duplicate) and the queue emptying: a short, bounded wait.
        left = server.left_in_queue()
        while left and time.monotonic() - complete_at < 10:
            time.sleep(0.1)
            left = server.left_in_queue()
        time.sleep(max(0.0, 1.0 - (time.monotonic() - complete_at)))
        sink.scan(final=True)
    cpu = server.cpu_ms() - cpu_before
    sink_cpu = sink.cpu_ms() - sink_cpu_before
    arrived_tokens = {t for t in accepted if t in sink.tokens}
    lost = len(accepted) - len(arrived_tokens)
    duplicated = sum(n - 1 for n in sink.tokens.values() if n > 1)
    unacknowledged = sum(1 for t in sink.tokens if t not in accepted)  # arrived without a 250
    started = submitted.get("started_at")
    last = max((sink.last_arrival[t] for t in arrived_tokens), default=None)
    e2e = last - started if last is not None and started is not None else None
    result: dict[str, Any] = {
        "ok": len(accepted),
        "submit_rate": submitted.get("rate"),
        "submit_p99_ms": submitted.get("p99_ms"),
        "e2e_s": e2e,
        "e2e_rate": len(arrived_tokens) / e2e if e2e else None,
        "drain_s": (
            last - submitted["finished_at"]
            if last is not None and submitted.get("finished_at")
            else None
        ),
        "lost": lost,
        "duplicated": duplicated,
        "unacknowledged": unacknowledged,
        "unknown": len(sink.unknown),
        "left_in_queue": left,
        "cpu_ms_per_msg": cpu / len(accepted) if accepted else None,
        "sink_cpu_ms_per_msg": sink_cpu / len(accepted) if accepted else None,
        "peak_kib": sampler.peak,
        "listen_dropped": listen_dropped(listen_before, listen_counters()),
        "loadavg": load_before,
        "errors": submitted.get("errors", [])
        + ([submitted["error"]] if submitted.get("error") else []),
        "failed": int(submitted.get("failed") or 0)
        + int(submitted.get("refused") or 0)
        + int(submitted.get("connect_failed") or 0),
    }
    if len(accepted) < w.count:
        result["errors"].append(f"{w.count - len(accepted)} submission(s) not answered 250")
    return result


# -- (g) webhooks ------------------------------------------------------------------------------

WEBHOOK_RECEIVER = HERE / "peers" / "webhook_receiver.py"
WEBHOOK_RECEIVED = "message.received"


class WebhookReceiver:
    """``peers/webhook_receiver.py``: the endpoint of workload (g), answering every POST 200
    and keeping, in memory, when each event arrived and the event's own timestamp."""

    def __init__(self) -> None:
        self.port = 0
        self.proc: subprocess.Popen[Any] | None = None

    def start(self) -> None:
        self.stop()
        self.port = free_port()
        self.proc = spawn(
            [PEERS_PYTHON, str(WEBHOOK_RECEIVER), "--port", str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        stdout = self.proc.stdout
        assert stdout is not None
        ready: list[str] = []  # its first line, read in a thread: bounded wait
        reader = threading.Thread(target=lambda: ready.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(15)
        if not ready or not ready[0].startswith(f"LISTENING {self.port}"):
            status = self.proc.poll()
            raise StartError(
                "webhook receiver not ready after 15 s"
                + (f" (exited with status {status})" if status is not None else "")
            )

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        terminate(proc)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def get(self, what: str) -> dict[str, Any]:
        """``/count`` (small, for polling) or ``/stats`` (everything, lags included)."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/{what}", timeout=30) as r:
            found: dict[str, Any] = json.loads(r.read())
            return found

    def cpu_ms(self) -> float:
        return 0.0 if self.proc is None else cpu_ticks(self.proc.pid) * 1000 / CLK_TCK


class WebhookMailsrv(MailsrvServer):
    """mailsrv with one webhook endpoint (``SMTP_WEBHOOK_URL``, ``SMTP_WEBHOOK_SECRET``: the
    ``default`` endpoint, default settings: every event type, concurrency 8, 15 s timeout) on
    its own local receiver, started and stopped with it (workload (g))."""

    name = "mailsrv-webhook"

    def __init__(self, base: Path, venv: Path, pythonpath: str | None) -> None:
        super().__init__(base, venv, pythonpath)
        self.receiver = WebhookReceiver()
        self.outbox_dir: Path | None = None

    def before_start(self, data_dir: Path) -> None:
        import base64
        import secrets

        self.receiver.start()
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")
        self.extra_env = {"SMTP_WEBHOOK_URL": self.receiver.url, "SMTP_WEBHOOK_SECRET": secret}
        self.outbox_dir = data_dir / "outbox"

    def left_in_outbox(self) -> dict[str, int]:
        """Outbox entries still on disk (``<event>.<endpoint>.json``), by state."""
        states: dict[str, int] = defaultdict(int)
        if self.outbox_dir is None or not self.outbox_dir.is_dir():
            return states
        for entry in os.scandir(self.outbox_dir):
            if not entry.name.endswith(".json") or not entry.is_file():
                continue
            try:
                state = json.loads(Path(entry.path).read_bytes()).get("state", "?")
            except (OSError, ValueError, AttributeError):
                state = "unreadable" if os.path.exists(entry.path) else ""
            if state:
                states[str(state)] += 1
        return states

    def stop(self) -> None:
        super().stop()
        self.receiver.stop()


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_webhooks(
    server: MailsrvServer, w: Workload, timeout: float, wait_limit: float = 120.0
) -> dict[str, Any]:
    """Workload (g), one server: (b) by smtp-source; for a :class:`WebhookMailsrv`, then wait
    (bounded: ``wait_limit`` s, or 30 s without progress) until the receiver has one
    ``message.received`` event per accepted message, and measure the notifications."""
    webhook = server if isinstance(server, WebhookMailsrv) else None
    hooks = webhook.receiver if webhook is not None else None
    load_before = os.getloadavg()[0]
    delivered_before = count_files(server.maildir_new)
    cpu_before = server.cpu_ms()
    receiver_cpu_before = hooks.cpu_ms() if hooks else 0.0
    listen_before = listen_counters()
    with Sampler(server) as sampler:
        submit_start = time.time()
        src = smtp_source(server, w, timeout)
        submit_end = time.time()
        submit_cpu = server.cpu_ms() - cpu_before
        accepted = int(src.get("ok") or 0)
        have: dict[str, Any] = {}
        stalled = False
        left: dict[str, int] = {}
        if webhook is not None and hooks is not None:
            deadline = time.monotonic() + wait_limit
            last_progress, seen = time.monotonic(), -1
            while True:
                with contextlib.suppress(OSError, ValueError):
                    have = hooks.get("count")
                got = int(have.get("received") or 0)
                if got >= accepted or time.monotonic() > deadline:
                    break
                if got != seen:
                    seen, last_progress = got, time.monotonic()
                elif time.monotonic() - last_progress > 30:
                    stalled = True
                    break
                time.sleep(0.1)
            complete_at = time.monotonic()
            # The outbox empties after the 200s (the entries are removed after each outcome's
            # write); late duplicates would arrive meanwhile: a short, bounded wait.
            left = webhook.left_in_outbox()
            while sum(left.values()) and time.monotonic() - complete_at < 10:
                time.sleep(0.2)
                left = webhook.left_in_outbox()
            time.sleep(max(0.0, 1.0 - (time.monotonic() - complete_at)))
    cpu = server.cpu_ms() - cpu_before
    delivered = count_files(server.maildir_new) - delivered_before
    result: dict[str, Any] = {
        "ok": accepted,
        "rate": src.get("rate"),
        "elapsed": src.get("elapsed"),
        "error": src.get("error"),
        "lost_mail": max(0, accepted - delivered) if server.maildir_new is not None else None,
        "submit_cpu_ms_per_msg": submit_cpu / accepted if accepted else None,
        "cpu_ms_per_msg": cpu / accepted if accepted else None,
        "peak_kib": sampler.peak,
        "listen_dropped": listen_dropped(listen_before, listen_counters()),
        "loadavg": load_before,
    }
    empty_directory(server.maildir_new)
    if hooks is None:
        return result
    try:
        stats = hooks.get("stats")
    except (OSError, ValueError) as e:
        result["error"] = f"receiver /stats: {e}"
        return result
    lags = [float(x) for x in stats.get("lags", [])]
    received = int(stats.get("received") or 0)
    first, last = stats.get("first"), stats.get("last")
    tenth = max(1, len(lags) // 10)
    result.update(
        events=int(stats.get("count") or 0),
        received=received,
        types=stats.get("types", {}),
        bad=int(stats.get("bad") or 0),
        lost=max(0, accepted - received),
        duplicated=int(stats.get("duplicates") or 0),
        stalled=stalled,
        notify_rate=(
            received / (last - first) if first is not None and last and last > first else None
        ),
        drain_s=last - submit_end if last is not None else None,
        first_after_s=first - submit_start if first is not None else None,
        lag_p50_s=_quantile(lags, 0.50),
        lag_p99_s=_quantile(lags, 0.99),
        lag_max_s=max(lags, default=None),
        # backlog growth shows as the lag rising over the run: first and last tenth of arrivals
        lag_first_tenth_s=statistics.median(lags[:tenth]) if lags else None,
        lag_last_tenth_s=statistics.median(lags[-tenth:]) if lags else None,
        left_in_outbox=dict(left),
        connections=int(stats.get("connections") or 0),
        most_open=int(stats.get("most_open") or 0),
        receiver_cpu_ms_per_event=(
            (hooks.cpu_ms() - receiver_cpu_before) / received if received else None
        ),
    )
    return result


# -- profile -----------------------------------------------------------------------------------


def profile_b(
    server: MailsrvServer,
    w: Workload,
    seconds: float,
    out_txt: Path,
    recipient: str = RECIPIENT,
    arrived: Callable[[], int] | None = None,
) -> dict[str, Any]:
    """py-spy on mailsrv while smtp-source drives workload (b) (or, with a remote
    ``recipient`` and the sink's count as ``arrived``, workload (f)).

    Two recordings: ``--gil`` for ``seconds`` (where the Python CPU time goes: only the thread
    holding the GIL is sampled, so this is what one core spends), then every thread including
    idle ones for half as long (what the reactor and the I/O threads are doing or waiting for).
    """
    py_spy = Path(PEERS_PYTHON).parent / "py-spy"
    if not py_spy.exists():
        return {"error": "py-spy not installed in the peers venv"}
    source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    count = max(w.count * 10, 40000)
    load = spawn(
        [
            source,
            "-d",
            "-s",
            str(w.sessions),
            "-m",
            str(count),
            "-l",
            str(w.size),
            "-f",
            SENDER,
            "-t",
            recipient,
            f"127.0.0.1:{server.port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    if arrived is None:
        maildir = server.maildir_new
        arrived = functools.partial(count_files, maildir)
    try:
        time.sleep(1.0)
        # First the CPU per thread and the rate with no profiler attached, then py-spy.
        window = min(5.0, seconds / 2)
        threads_before, files_before = thread_cpu(server.pid()), arrived()
        time.sleep(window)
        threads_after, files_after = thread_cpu(server.pid()), arrived()
        try:
            gil = _py_spy(py_spy, server.pid(), seconds, ["--gil"])
        except ProfileError as e:
            return {"error": str(e)}
        rate_profiled = (arrived() - files_after) / seconds
        try:
            every: str | None = _py_spy(py_spy, server.pid(), max(2.0, seconds / 2), ["--idle"])
            every_error = ""
        except ProfileError as e:
            every, every_error = None, str(e)
        still_loaded = load.poll() is None
    finally:
        if load.poll() is None:
            load.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                load.wait(10)
    summary = summarize_profile(gil)
    summary["seconds"] = seconds
    summary["listing"] = f"bench/{out_txt.name}"
    summary["thread_cpu"] = cpu_by_thread_kind(server.pid(), threads_before, threads_after, window)
    summary["cpu_window"] = window
    summary["rate_plain"] = (files_after - files_before) / window
    summary["rate_profiled"] = rate_profiled
    summary["load_lasted"] = still_loaded
    text = ["== GIL holder only (py-spy --gil): Python CPU time", summary["text"]]
    if every is None:
        text.append(f"== all threads: {every_error}")
    else:
        all_threads = summarize_profile(every, group_threads=True)
        summary["all_threads"] = all_threads
        text += ["== every thread, idle included (py-spy --idle)", all_threads["text"]]
    out_txt.write_text("\n".join(text))
    return summary


def thread_cpu(pid: int) -> dict[int, tuple[int, int]]:
    """utime and stime ticks of every thread of ``pid``."""
    found = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
                with open(f"{entry.path}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                found[int(entry.name)] = (int(fields[11]), int(fields[12]))
    return found


def cpu_by_thread_kind(
    pid: int, before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], wall: float
) -> dict[str, dict[str, float]]:
    """Percent of one core, user and system, for the reactor thread and all other threads."""
    main, others = "reactor (main) thread", "all other threads (I/O pool, hashing, SQLite)"
    kinds: dict[str, dict[str, float]] = {
        main: {"user": 0.0, "system": 0.0},
        others: {"user": 0.0, "system": 0.0},
    }
    for tid, (user, system) in after.items():
        user0, system0 = before.get(tid, (0, 0))
        kind = main if tid == pid else others
        kinds[kind]["user"] += (user - user0) * 100 / CLK_TCK / wall
        kinds[kind]["system"] += (system - system0) * 100 / CLK_TCK / wall
    return kinds


class ProfileError(Exception):
    pass


def _py_spy(py_spy: Path, pid: int, seconds: float, flags: list[str]) -> str:
    """Raw (collapsed) stacks from one ``py-spy record``; ProfileError says why not."""
    with tempfile.NamedTemporaryFile(suffix=".txt") as raw:
        done = subprocess.run(
            [
                str(py_spy),
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                "200",
                "--format",
                "raw",
                "--threads",
                "--nonblocking",
                "--output",
                raw.name,
                *flags,
            ],
            capture_output=True,
            timeout=seconds + 60,
            check=False,
        )
        if done.returncode != 0:
            text = (done.stdout + done.stderr).decode(errors="replace").strip()[-300:]
            raise ProfileError(f"py-spy status {done.returncode}: {text}")
        return Path(raw.name).read_text(errors="replace")


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
_THREAD = re.compile(r"^thread \((?:0x)?[0-9a-f]+\):?\s*")


def _frame_name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "/lib/python3.11/", "/snapshot/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        if "/mailsrv/" in path:
            path = "mailsrv/" + path.rsplit("/mailsrv/", 1)[1]
    return f"{m.group('func')} ({path})"


def summarize_profile(raw: str, group_threads: bool = False) -> dict[str, Any]:
    """Own and inclusive time per function, and the share of each thread (or thread kind)."""
    own: dict[str, int] = defaultdict(int)
    inclusive: dict[str, int] = defaultdict(int)
    threads: dict[str, int] = defaultdict(int)
    own_by_thread: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        thread = "?"
        if frames and frames[0].startswith("thread "):
            thread = _THREAD.sub("", frames[0]).strip() or frames[0]
            frames = frames[1:]
        if group_threads:
            thread = re.sub(r"-\d+$", "-*", thread)
        if not frames:
            continue
        samples += count
        threads[thread] += count
        leaf = _frame_name(frames[-1])
        own[leaf] += count
        own_by_thread[thread][leaf] += count
        for frame in dict.fromkeys(_frame_name(f) for f in frames):
            inclusive[frame] += count

    def pct(n: int) -> str:
        return f"{100 * n / samples:5.1f}%" if samples else "  n/a"

    by_count = sorted(threads.items(), key=lambda kv: -kv[1])
    lines = [f"samples: {samples}", "", "Samples by thread:"]
    lines += [f"  {pct(n)}  {name}" for name, n in by_count[:10]]
    top_own = sorted(own.items(), key=lambda kv: -kv[1])
    top_inclusive = sorted(inclusive.items(), key=lambda kv: -kv[1])
    lines += ["", "Top functions by own time:"]
    lines += [f"  {pct(n)}  {name}" for name, n in top_own[:40]]
    lines += ["", "Top functions by inclusive time:"]
    lines += [f"  {pct(n)}  {name}" for name, n in top_inclusive[:40]]
    if group_threads:
        for name, _ in by_count[:4]:
            lines += ["", f"Own time within {name}:"]
            ranked = sorted(own_by_thread[name].items(), key=lambda kv: -kv[1])[:12]
            lines += [f"  {pct(n)}  {leaf}" for leaf, n in ranked]
    return {
        "total": samples,
        "threads": by_count[:8],
        "own": top_own[:15],
        "inclusive": top_inclusive[:15],
        "own_by_thread": {
            name: sorted(own_by_thread[name].items(), key=lambda kv: -kv[1])[:6]
            for name, _ in by_count[:3]
        },
        "text": "\n".join(lines) + "\n",
    }


# -- the run -----------------------------------------------------------------------------------


def median(values: list[Any]) -> float | None:
    clean = [v for v in values if isinstance(v, int | float)]
    return statistics.median(clean) if clean else None


def total(values: list[Any]) -> int | None:
    clean = [v for v in values if isinstance(v, int | float)]
    return int(sum(clean)) if clean else None


def fmt(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def machine_info() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / MiB:.1f} GiB"
    fs = ""
    with contextlib.suppress(Exception):
        fs = subprocess.run(
            ["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", tempfile.gettempdir()],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "memory": mem,
        "filesystem (work dir)": fs or "unknown",
        "os": _os_release(),
    }


def _os_release() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.platform()


def versions(venv: Path, pythonpath: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath

    def run(cmd: list[str], use_env: dict[str, str] | None = None) -> str:
        try:
            # cwd: not the repo, or ``python -c`` would import mailsrv from the working tree
            done = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=30,
                env=use_env,
                check=False,
                cwd=tempfile.gettempdir(),
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"unknown ({e})"
        return (
            (done.stdout or done.stderr).strip().splitlines()[-1]
            if done.stdout or done.stderr
            else "?"
        )

    mailsrv_py = str(venv / "bin" / "python")
    probe = (
        "import sys, twisted, mailsrv, os; "
        "print(sys.version.split()[0], twisted.__version__, mailsrv.__version__, "
        "os.path.dirname(mailsrv.__file__))"
    )
    py, tw, ms, where = (run([mailsrv_py, "-c", probe], env).split() + ["?"] * 4)[:4]
    aio = run([PEERS_PYTHON, "-c", "import aiosmtpd; print(aiosmtpd.__version__)"])
    postfix = run(["postconf", "-d", "-h", "mail_version"])
    return {
        "python (mailsrv)": py,
        "twisted": tw,
        "mailsrv": f"{ms} (imported from {where})",
        "python (peers, load client)": platform.python_version(),
        "aiosmtpd": aio,
        "postfix / smtp-source / smtp-sink": postfix,
    }


def git_revision(ref: str | None) -> str:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    if ref:
        return f"{git('rev-parse', '--short', ref)} ({ref}, exported with git archive)"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "mailsrv", "twisted")
    head = git("rev-parse", "--short", "HEAD")
    return f"{head} working tree" + (" with uncommitted changes in mailsrv/" if dirty else "")


def short_revision(ref: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", ref],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"bench: no such git revision {ref!r}")
    return done.stdout.strip()


def export_ref(ref: str, target: Path) -> str:
    target.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return str(target)


def main() -> int:
    parser = argparse.ArgumentParser(description="mailsrv benchmark (README.rst, Benchmarks)")
    parser.add_argument("--quick", action="store_true", help="1 round, 1/5 of the counts")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3; quick 1)")
    parser.add_argument(
        "--servers",
        default="mailsrv,aiosmtpd,postfix,smtp-sink",
        help="comma-separated subset of mailsrv,aiosmtpd,postfix,smtp-sink (mailsrv-pg: (f) with "
        "the queue in PostgreSQL, on whenever mailsrv is and PostgreSQL is installed)",
    )
    parser.add_argument("--ref", default=None, help="bench this git ref (git archive) instead")
    parser.add_argument(
        "--compare",
        default=None,
        metavar="REV",
        help="also bench mailsrv at REV (git archive) in the same rounds, as mailsrv@REV",
    )
    parser.add_argument(
        "--workloads",
        "--only",
        default="a,b,c,d,e,f,g",
        help="comma-separated subset of a,b,c,d,e,f,g (c includes the 50 MiB messages)",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument(
        "--output", default=str(HERE / "RESULTS.md"), help="where to write the results"
    )
    parser.add_argument("--max-minutes", type=float, default=30.0, help="hard bound on the run")
    args = parser.parse_args()

    command = "bench/run " + " ".join(sys.argv[1:])
    venv = Path(os.environ.get("MAILSRV_VENV", str(HERE.parent / ".venv")))
    if not (venv / "bin" / "twistd").exists():
        print(f"bench: no twistd in {venv} (set MAILSRV_VENV)", file=sys.stderr)
        return 2
    rounds = args.rounds or (1 if args.quick else 3)
    scale = 5 if args.quick else 1
    wanted = [s.strip() for s in args.servers.split(",") if s.strip()]
    chosen = {k.strip() for k in args.workloads.split(",") if k.strip()}
    unknown = chosen - set("abcdefg")
    if unknown:
        print(f"bench: unknown workload(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    atexit.register(cleanup)
    hard_stop = threading.Timer(args.max_minutes * 60, lambda: os.kill(os.getpid(), signal.SIGTERM))
    hard_stop.daemon = True
    hard_stop.start()

    base = Path(tempfile.mkdtemp(prefix="mailsrv-bench-"))
    base.chmod(0o755)
    _CLEANUPS.insert(0, lambda: shutil.rmtree(base, ignore_errors=True))
    # The code under test always comes first on PYTHONPATH: the --ref snapshot or this tree.
    pythonpath = export_ref(args.ref, base / "snapshot") if args.ref else str(HERE.parent)
    compare_name = ""
    compare_path = ""
    if args.compare:
        compare_name = f"mailsrv@{short_revision(args.compare)}"
        compare_path = export_ref(args.compare, base / "snapshot-compare")

    workloads = [
        Workload("a", "2000 x 1 KiB, 1 session", 1, 2000 // scale, 1024),
        Workload("b", "5000 x 1 KiB, 50 sessions", 50, 5000 // scale, 1024),
        Workload("c", "500 x 100 KiB, 20 sessions", 20, 500 // scale, 100 * 1024),
    ]
    relay_load = Workload(
        "f", "5000 x 1 KiB over 50 sessions to remote recipients", 50, 5000 // scale, 1024
    )
    profiled_b = workloads[1]
    webhook_load = Workload(
        "g", "workload (b), 5000 x 1 KiB over 50 sessions", 50, 5000 // scale, 1024
    )
    workloads = [w for w in workloads if w.key in chosen]
    big = Workload("c50", "20 x 50 MiB, 20 sessions", 20 // scale, 20 // scale, 50 * MiB)
    idle_sessions = 1000 // scale

    factories: dict[str, Callable[[], Server]] = {
        "mailsrv": lambda: MailsrvServer(base, venv, pythonpath),
        "aiosmtpd": lambda: AiosmtpdServer(base),
        "postfix": lambda: PostfixServer(base),
        "smtp-sink": lambda: SinkServer(base),
    }
    servers = [factories[name]() for name in factories if name in wanted and chosen & set("abcd")]
    if compare_name and chosen & set("abcd"):
        compare = MailsrvServer(base, venv, compare_path)
        compare.name = compare_name
        servers.insert(1 if servers and servers[0].name == "mailsrv" else 0, compare)
    relay_factories: dict[str, Callable[[], RelayMailsrv | RelayPostfix]] = {
        "mailsrv": lambda: RelayMailsrv(base, venv, pythonpath),
        "mailsrv-pg": lambda: PgRelayMailsrv(base, venv, pythonpath),
        "postfix": lambda: RelayPostfix(base),
    }
    if "mailsrv" in wanted and "mailsrv-pg" not in wanted and _pg_bindir() is not None:
        wanted.append("mailsrv-pg")  # the shared queue runs (f) beside the file queue
    if compare_name and (Path(compare_path) / "mailsrv" / "relay" / "sink.py").exists():
        # The compared revision can relay too: it runs (f) beside mailsrv.
        relay_factories[compare_name] = lambda: RelayMailsrv(base, venv, compare_path, compare_name)
        wanted.append(compare_name)
    relay_servers = (
        [relay_factories[name]() for name in relay_factories if name in wanted]
        if "f" in chosen
        else []
    )
    # (g): mailsrv without and with a webhook endpoint, fresh for every round.
    webhook_servers: list[tuple[str, MailsrvServer]] = []
    if "g" in chosen and "mailsrv" in wanted:
        plain = MailsrvServer(base, venv, pythonpath)
        plain.name = "mailsrv-nohook"
        webhook_servers = [("plain", plain), ("webhook", WebhookMailsrv(base, venv, pythonpath))]
    started_at = time.monotonic()
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    loadavg_start = Path("/proc/loadavg").read_text().split()[:3]
    info = machine_info()
    vers = versions(venv, pythonpath)
    revision = git_revision(args.ref)
    compare_revision = git_revision(args.compare) if args.compare else ""
    log(f"mailsrv {revision}; {rounds} round(s); work dir {base}")

    # results[workload][server] -> list of per-round dicts; tool is "src" or "lg"
    results: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    problems: dict[str, str] = {}
    incidents: list[str] = []  # servers found dead and restarted mid-run
    has_users = users_command_exists(venv, pythonpath)
    storm_clients = 200 // scale
    storm_seconds = 10.0 if not args.quick else 5.0

    for round_no in range(1, rounds + 1):
        for server in servers:
            if not server.restart():
                problems[server.name] = server.unavailable or "did not start"
        for w in workloads:
            for server in servers:
                if not server.ensure_running(incidents):
                    continue
                log(f"round {round_no}: ({w.key}) {server.name}: smtp-source")
                src = measure(server, functools.partial(smtp_source, server, w, 300), None)
                log(
                    f"  {fmt(src.get('rate'))} msgs/s, lost {src.get('lost')}"
                    + (f", {src['error']}" if src.get("error") else "")
                )
                log(f"round {round_no}: ({w.key}) {server.name}: loadgen")
                if not server.ensure_running(incidents):
                    continue
                lg = measure(server, functools.partial(loadgen_send, server, w, 300), None)
                log(
                    f"  {fmt(lg.get('rate'))} msgs/s, p50 {lg.get('p50_ms')} ms, "
                    f"p99 {lg.get('p99_ms')} ms, lost {lg.get('lost')}, errors {lg.get('errors')}"
                )
                results[w.key][server.name].append({"src": src, "lg": lg})
        for server in servers if "c" in chosen else []:
            if not server.ensure_running(incidents):
                continue
            log(f"round {round_no}: (c) {big.title} {server.name}: loadgen")
            lg = measure(server, functools.partial(loadgen_send, server, big, 600), None)
            log(
                f"  peak {fmt(lg['peak_kib'] / 1024)} MiB, ok {lg.get('ok')}, lost {lg.get('lost')}"
            )
            results[big.key][server.name].append({"lg": lg})
        for server in servers if "d" in chosen else []:
            if not server.restart():
                problems[server.name] = server.unavailable or "did not start"
                continue
            log(f"round {round_no}: (d) {idle_sessions} sessions {server.name}")
            d = run_idle(server, idle_sessions, 1.0, 120)
            log(
                f"  served {d.get('served')}, ok {d.get('ok')}, refused {d.get('refused')}, "
                f"per session {fmt(d.get('per_session_kib'), 1)} KiB, errors {d.get('errors')}"
            )
            results["d"][server.name].append(d)
            server.stop()
        if has_users and "mailsrv" in wanted and "e" in chosen:
            auth_server = AuthMailsrv(base, venv, pythonpath)
            if auth_server.restart():
                log(f"round {round_no}: (e) AUTH storm")
                e = run_auth_storm(auth_server, storm_clients, storm_seconds)
                log(f"  {e}")
                results["e"]["mailsrv"].append(e)
            else:
                problems["mailsrv (e)"] = auth_server.unavailable or "did not start"
            auth_server.stop()
        # (f): alternate which server goes first, so drift in the machine's load evens out.
        order = relay_servers if round_no % 2 else list(reversed(relay_servers))
        for relay_server in order:
            if not relay_server.restart():
                problems[f"{relay_server.label} (f)"] = relay_server.unavailable or "no start"
                continue
            log(f"round {round_no}: (f) relay {relay_server.label} -> smtp-sink")
            prefix = f"f{round_no}" + re.sub("[^A-Za-z0-9]", "", relay_server.label)
            f = run_relay(relay_server, relay_load, prefix, 300)
            log(
                f"  end to end {fmt(f.get('e2e_rate'))} msgs/s in {fmt(f.get('e2e_s'), 2)} s "
                f"(submission {fmt(f.get('submit_rate'))} msgs/s), lost {f['lost']}, "
                f"duplicated {f['duplicated']}, unknown {f['unknown']}, "
                f"left in queue {f['left_in_queue']}, errors {f['errors'][:3]}"
            )
            results["f"][relay_server.label].append(f)
            relay_server.stop()
        # (g): likewise alternating; each round's pair gives one with/without ratio.
        order_g = webhook_servers if round_no % 2 else list(reversed(webhook_servers))
        for label, hook_server in order_g:
            if not hook_server.restart():
                problems[f"{hook_server.name} (g)"] = hook_server.unavailable or "no start"
                continue
            log(f"round {round_no}: (g) {hook_server.name}: smtp-source")
            g = run_webhooks(hook_server, webhook_load, 300)
            g["round"] = round_no
            log(
                f"  {fmt(g.get('rate'))} msgs/s, lost mail {g.get('lost_mail')}"
                + (
                    f"; {g['received']} events at {fmt(g.get('notify_rate'))}/s, "
                    f"drain {fmt(g.get('drain_s'), 2)} s, lag p50 {fmt(g.get('lag_p50_s'), 3)} s "
                    f"p99 {fmt(g.get('lag_p99_s'), 3)} s, lost {g.get('lost')}, "
                    f"duplicated {g.get('duplicated')}, left in outbox {g.get('left_in_outbox')}"
                    if "received" in g
                    else ""
                )
                + (f", {g['error']}" if g.get("error") else "")
            )
            results["g"][label].append(g)
            hook_server.stop()
        log(f"round {round_no} done after {time.monotonic() - started_at:.0f}s")

    profile: dict[str, Any] | None = None
    if not args.no_profile and "mailsrv" in wanted and "b" in chosen:
        prof_server = MailsrvServer(base, venv, pythonpath)
        if prof_server.restart():
            log("profile: py-spy on mailsrv during workload (b)")
            profile = profile_b(
                prof_server, profiled_b, 4 if args.quick else 10, HERE / "profile-b.txt"
            )
            log(f"  {profile.get('error') or str(profile.get('total')) + ' samples'}")
        prof_server.stop()
    profile_f: dict[str, Any] | None = None
    if not args.no_profile and "mailsrv" in wanted and "f" in chosen:
        relay_prof = RelayMailsrv(base, venv, pythonpath)
        if relay_prof.restart():
            log("profile: py-spy on mailsrv during workload (f)")
            profile_f = profile_b(
                relay_prof,
                relay_load,
                4 if args.quick else 10,
                HERE / "profile-f.txt",
                recipient=RELAY_RECIPIENT.replace("{n}", "0"),
                arrived=relay_prof.sink.count,
            )
            profile_f["rate_what"] = "at the sink"
            log(f"  {profile_f.get('error') or str(profile_f.get('total')) + ' samples'}")
        relay_prof.stop()
    for server in servers:
        server.stop()

    elapsed = time.monotonic() - started_at
    loadavg_end = Path("/proc/loadavg").read_text().split()[:3]
    report = render(
        command=command,
        when=when,
        elapsed=elapsed,
        info=info,
        vers=vers,
        revision=revision,
        compare=(compare_name, compare_revision),
        relay_load=relay_load,
        webhook_load=webhook_load,
        chosen=chosen,
        rounds=rounds,
        workloads=workloads,
        big=big,
        idle_sessions=idle_sessions,
        servers=[s.name for s in servers],
        results=results,
        problems=problems,
        has_users=has_users,
        storm=(storm_clients, storm_seconds),
        profile=profile,
        profile_f=profile_f,
        loadavg=(loadavg_start, loadavg_end),
        incidents=incidents,
        quick=args.quick,
    )
    print(report)
    Path(args.output).write_text(report)
    log(f"wrote {args.output} ({elapsed:.0f}s)")
    hard_stop.cancel()
    cleanup()
    return 0


# -- the report --------------------------------------------------------------------------------


def _fig(rows: list[dict[str, Any]], tool: str, key: str) -> float | None:
    return median([r.get(tool, {}).get(key) for r in rows])


def _sum(rows: list[dict[str, Any]], tool: str, key: str) -> int | None:
    return total([r.get(tool, {}).get(key) for r in rows])


def _dropped(rows: list[dict[str, Any]]) -> int:
    n = 0
    for r in rows:
        for tool in ("src", "lg"):
            part = r.get(tool, {})
            n += int(part.get("connect_failed") or 0) + int(part.get("refused") or 0)
            n += int(part.get("listen_dropped") or 0)
    return n


def _errors(rows: list[dict[str, Any]]) -> list[str]:
    found: list[str] = []
    for r in rows:
        for tool in ("src", "lg"):
            part = r.get(tool, {})
            if part.get("error"):
                found.append(str(part["error"]))
            found += [str(e) for e in part.get("errors", [])]
            if part.get("failed"):
                found.append(f"{part['failed']} transaction(s) failed")
    return list(dict.fromkeys(found))[:4]


def _count(row: dict[str, Any], *keys: str) -> int:
    return sum(int(row.get(key) or 0) for key in keys)


def kib_to_mib(value: float | None) -> float | None:
    return None if value is None else value / 1024


def render(**k: Any) -> str:
    results = k["results"]
    servers: list[str] = k["servers"]
    problems: dict[str, str] = k["problems"]
    out: list[str] = []
    add = out.append
    add("# mailsrv benchmark results")
    add("")
    add(f"Measured {k['when']} with `{k['command'].strip()}` in {k['elapsed'] / 60:.1f} min: ")
    add(
        f"{k['rounds']} interleaved round(s), medians over rounds; lost and dropped are totals. "
        "Every server durable except smtp-sink (the ceiling): the 250 comes after fsync."
        + (" **Quick mode: 1/5 of the counts, not comparable.**" if k["quick"] else "")
    )
    add("")
    add(f"mailsrv revision: {k['revision']}")
    compare_name, compare_revision = k["compare"]
    if compare_name:
        add("")
        add(f"compared with: {compare_name} = {compare_revision}")
    add("")
    add("| machine | |")
    add("|---|---|")
    for key, value in k["info"].items():
        add(f"| {key} | {value} |")
    add(
        f"| load average (start → end) | {' '.join(k['loadavg'][0])} → "
        f"{' '.join(k['loadavg'][1])} |"
    )
    add("")
    add("| software | version |")
    add("|---|---|")
    for key, value in k["vers"].items():
        add(f"| {key} | {value} |")
    add("")

    # Targets.
    b = results.get("b", {})
    a = results.get("a", {})

    def ratio(peer: str) -> float | None:
        mine, theirs = (
            _fig(b.get("mailsrv", []), "src", "rate"),
            _fig(b.get(peer, []), "src", "rate"),
        )
        return mine / theirs if mine and theirs else None

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("**met**" if ok else "**not met**")

    add("## Targets (issue 4)")
    add("")
    add("| target | measured | |")
    add("|---|---|---|")
    r_pf, r_aio = ratio("postfix"), ratio("aiosmtpd")
    add(
        f"| (b) mailsrv ≥ 2.5{TIMES} Postfix (smtp-source msgs/s) | {fmt(r_pf, 2, TIMES)} "
        f"| {verdict(None if r_pf is None else r_pf >= 2.5)} |"
    )
    add(
        f"| (b) mailsrv ≥ 3{TIMES} aiosmtpd-maildir | {fmt(r_aio, 2, TIMES)} "
        f"| {verdict(None if r_aio is None else r_aio >= 3)} |"
    )
    p99 = _fig(a.get("mailsrv", []), "lg", "p99_ms")
    add(
        f"| (a) p99 end of DATA → 250 ≤ 5 ms | {fmt(p99, 2, ' ms')} "
        f"| {verdict(None if p99 is None else p99 <= 5)} |"
    )
    c_rows = results.get("c", {}).get("mailsrv", [])
    big_rows = results.get("c50", {}).get("mailsrv", [])
    growth_c = median([r["lg"]["peak_kib"] - r["lg"]["base_kib"] for r in c_rows])
    growth_big = median([r["lg"]["peak_kib"] - r["lg"]["base_kib"] for r in big_rows])
    flat = None if growth_c is None or growth_big is None else growth_big - growth_c <= 16 * 1024
    add(
        f"| (c) memory flat from 100 KiB to 50 MiB messages (20 sessions each; peak RSS growth "
        f"over the run, 50 MiB minus 100 KiB ≤ 16 MiB) | "
        f"{fmt(None if growth_c is None else growth_c / 1024, 1)} MiB → "
        f"{fmt(None if growth_big is None else growth_big / 1024, 1)} MiB | {verdict(flat)} |"
    )
    d_rows = results.get("d", {}).get("mailsrv", [])
    served = all(r.get("served") for r in d_rows) if d_rows else None
    add(
        f"| (d) {k['idle_sessions']} sessions at once: all served, no refusal, no hang, "
        f"no dropped SYN | {_d_summary(d_rows)} | {verdict(served)} |"
    )
    per = median([r.get("per_session_kib") for r in d_rows])
    add(
        f"| (d) ≤ 50 KiB RSS per idle session | {fmt(per, 1, ' KiB')} "
        f"| {verdict(None if per is None else per <= 50)} |"
    )
    e_rows = results.get("e", {}).get("mailsrv", [])
    noop = median([r.get("noop_p99_ms") for r in e_rows])
    auths_ok = bool(e_rows) and all(r["login_ok"] for r in e_rows)
    if e_rows:
        e_measured = f"{fmt(noop, 2, ' ms')}" + (
            "" if auths_ok else " (but the correct login failed)"
        )
    elif "mailsrv (e)" in problems:
        e_measured = f"could not run: {problems['mailsrv (e)']}"
    else:
        e_measured = "n/a (capability not built yet)"
    add(
        f"| (e) NOOP p99 ≤ 20 ms during the AUTH storm | {e_measured} "
        f"| {verdict(None if noop is None else noop <= 20 and auths_ok)} |"
    )
    lost = 0
    for key in ("a", "b", "c", "c50"):
        for name in ("mailsrv",):
            for r in results.get(key, {}).get(name, []):
                for tool in ("src", "lg"):
                    lost += int(r.get(tool, {}).get("lost") or 0)
    lost += sum(int(r.get("lost") or 0) for r in d_rows)
    add(
        f"| mailsrv messages lost (250 without a file in Maildir) = 0 | {lost} "
        f"| {verdict(lost == 0)} |"
    )
    add("")
    render_issue8_targets(add, k)
    render_issue12_targets(add, k)

    add("## Throughput and latency")
    add("")
    add(
        "msgs/s from `smtp-source -d` (C; the figure the targets use) and from `loadgen.py` "
        "(asyncio, no pipelining, measures latency from `.` to `250`). ÷ = mailsrv's "
        "smtp-source rate divided by this server's. Peak memory is the server's RSS "
        "(for Postfix the PSS sum of all its processes); CPU is server user+system time per "
        "message during the smtp-source run. lost = 250s without a file in the Maildir (Postfix: "
        "after its queue drained, ≤ 120 s). dropped = connections refused, failed or answered "
        "with a non-220 greeting, plus kernel listen-queue overflows."
    )
    for w in [*k["workloads"]]:
        rows_by_server = results.get(w.key, {})
        add("")
        add(f"### ({w.key}) {w.title}")
        add("")
        add(
            "| server | msgs/s smtp-source | mailsrv ÷ | msgs/s loadgen | p50 ms | p99 ms "
            "| peak MiB | CPU ms/msg | lost | dropped | notes |"
        )
        add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        mine = _fig(rows_by_server.get("mailsrv", []), "src", "rate")
        for name in servers:
            rows = rows_by_server.get(name, [])
            if not rows:
                add(f"| {name} | n/a | | | | | | | | | {problems.get(name, 'not run')} |")
                continue
            rate = _fig(rows, "src", "rate")
            peak = median(
                [max(r["src"].get("peak_kib", 0), r["lg"].get("peak_kib", 0)) for r in rows]
            )
            lost_n = _sum(rows, "src", "lost"), _sum(rows, "lg", "lost")
            lost_text = "n/a" if lost_n == (None, None) else str(sum(x or 0 for x in lost_n))
            add(
                f"| {name} | {fmt(rate)} | {fmt(mine / rate if mine and rate else None, 2, TIMES)} "
                f"| {fmt(_fig(rows, 'lg', 'rate'))} | {fmt(_fig(rows, 'lg', 'p50_ms'), 2)} "
                f"| {fmt(_fig(rows, 'lg', 'p99_ms'), 2)} "
                f"| {fmt(None if peak is None else peak / 1024, 1)} "
                f"| {fmt(_fig(rows, 'src', 'cpu_ms_per_msg'), 3)} | {lost_text} "
                f"| {_dropped(rows)} | {'; '.join(_errors(rows))} |"
            )
    big = k["big"]
    add("")
    add(f"### (c) memory with big messages: {big.title} (loadgen)")
    add("")
    add(
        "| server | peak MiB | growth MiB (50 MiB msgs) | growth MiB (100 KiB msgs, (c)) "
        "| msgs/s | lost | notes |"
    )
    add("|---|---:|---:|---:|---:|---:|---|")
    for name in servers:
        rows = results.get("c50", {}).get(name, [])
        if not rows:
            add(f"| {name} | n/a | | | | | {problems.get(name, 'not run')} |")
            continue
        small = results.get("c", {}).get(name, [])
        g_big = median([r["lg"]["peak_kib"] - r["lg"]["base_kib"] for r in rows])
        g_small = median([r["lg"]["peak_kib"] - r["lg"]["base_kib"] for r in small])
        lost_sum = _sum(rows, "lg", "lost")
        add(
            f"| {name} | {fmt(kib_to_mib(_fig(rows, 'lg', 'peak_kib')), 1)} "
            f"| {fmt(kib_to_mib(g_big), 1)} | {fmt(kib_to_mib(g_small), 1)} "
            f"| {fmt(_fig(rows, 'lg', 'rate'), 2)} | {'n/a' if lost_sum is None else lost_sum} "
            f"| {'; '.join(_errors(rows))} |"
        )
    add("")
    add(f"### (d) {k['idle_sessions']} sessions at once, each sends, idles 1 s, sends again")
    add("")
    add(
        "| server | all served | 250s | refused / failed | SYN retried (connect > 0.9 s) "
        "| listen drops | slowest 220 ms | RSS per idle session KiB | baseline MiB "
        "| with sessions idle MiB | p99 ms | notes |"
    )
    add("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name in servers:
        rows = results.get("d", {}).get(name, [])
        if not rows:
            add(f"| {name} | n/a | | | | | | | | | | {problems.get(name, 'not run')} |")
            continue
        errs = list(dict.fromkeys(str(e) for r in rows for e in r.get("errors", [])))[:3]
        errs += [str(r["error"]) for r in rows if r.get("error")][:2]
        bad = sum(_count(r, "refused", "connect_failed", "failed") for r in rows)
        add(
            f"| {name} | {'yes' if all(r.get('served') for r in rows) else 'no'} "
            f"| {fmt(median([r.get('ok') for r in rows]))} "
            f"| {bad} "
            f"| {sum(int(r.get('slow_connects') or 0) for r in rows)} "
            f"| {sum(int(r.get('listen_dropped') or 0) for r in rows)} "
            f"| {fmt(max((r.get('greeting_max_ms') or 0) for r in rows))} "
            f"| {fmt(median([r.get('per_session_kib') for r in rows]), 1)} "
            f"| {fmt(median([r.get('baseline_kib', 0) / 1024 for r in rows]), 1)} "
            f"| {fmt(median([r.get('idle_kib', 0) / 1024 for r in rows]), 1)} "
            f"| {fmt(median([r.get('p99_ms') for r in rows]), 1)} | {'; '.join(errs)} |"
        )
    add("")
    add("### (e) AUTH storm, (f) relay, (g) webhooks")
    add("")
    clients, seconds = k["storm"]
    e_rows = results.get("e", {}).get("mailsrv", [])
    add("| workload | server | result |")
    add("|---|---|---|")
    if e_rows:
        errs = list(
            dict.fromkeys(str(x) for r in e_rows for x in r["auth_errors"] + r["noop_errors"])
        )[:3]
        answered: dict[str, int] = defaultdict(int)
        for r in e_rows:
            for code, count in r["replies"].items():
                answered[code] += count
        codes = ", ".join(f"{code}: {count:,}" for code, count in sorted(answered.items()))
        add(
            f"| (e) {clients} clients from {e_rows[0].get('addresses')} loopback addresses "
            f"STARTTLS + AUTH PLAIN with wrong passwords (a real account and made-up names) "
            f"for {seconds:.0f} s, one client NOOP every 10 ms | mailsrv | "
            f"{fmt(median([r['attempt_rate'] for r in e_rows]), 1)} attempts/s (replies {codes}; "
            f"{fmt(median([r['cpu_ms_per_hash'] for r in e_rows]), 0)} server CPU ms per 535, "
            "TLS included); NOOP p50 "
            f"{fmt(median([r['noop_p50_ms'] for r in e_rows]), 2)} ms, p99 "
            f"{fmt(median([r['noop_p99_ms'] for r in e_rows]), 2)} ms, max "
            f"{fmt(median([r['noop_max_ms'] for r in e_rows]), 2)} ms"
            + (f"; {'; '.join(errs)}" if errs else "")
            + " |"
        )
        logins = [p for r in e_rows for p in r["probes"]]
        shown = ", ".join(
            f"{fmt(p['total_ms'], 0)} ms at {p['at_s']:.0f} s"
            + (f" (AUTH {fmt(p.get('auth_ms'), 0)} ms)" if p.get("ok") else " FAILED")
            for p in logins
        )
        add(
            f"| (e) meanwhile, an unaffected client (another address, another account) connects, "
            f"STARTTLS, AUTH PLAIN with the right password | mailsrv | connect to 235: "
            f"max {fmt(max((p['total_ms'] for p in logins), default=None), 0)} ms: {shown} |"
        )
    elif "mailsrv (e)" in problems:
        add(f"| (e) AUTH storm | mailsrv | could not run: {problems['mailsrv (e)']} |")
    else:
        add("| (e) AUTH storm | all | n/a (capability not built yet: no `mailsrv users`) |")
    add("| (f) relay to smtp-sink | mailsrv, postfix | see (f) below |")
    if results.get("g"):
        add("| (g) webhooks to a local receiver | mailsrv | see (g) below |")
    add("")
    render_relay(add, k)
    render_webhooks(add, k)
    if k.get("profile_f") is not None:
        add("## Profile: mailsrv during (f), py-spy")
        add("")
        if k["profile_f"].get("error"):
            add(f"py-spy could not run: {k['profile_f']['error']}")
        else:
            render_profile(
                add,
                k["profile_f"],
                "50 sessions of 1 KiB messages to a remote recipient, relayed to smtp-sink",
            )
        add("")
    profile = k["profile"]
    if profile is not None:
        add("## Profile: mailsrv during (b), py-spy")
        add("")
        if profile.get("error"):
            add(f"py-spy could not run: {profile['error']}")
        else:
            render_profile(add, profile)
        add("")
    add("## Setup notes")
    add("")
    add(
        "* Everything runs on this one machine: the load clients (smtp-source in C, loadgen.py in "
        "Python with uvloop) share its CPUs with the server under test, and other work on the "
        "machine (load average above) moves the figures, which is why the rounds interleave."
    )
    add(
        "* mailsrv: `twistd -n --pidfile= mailsrv`, default settings (16 I/O threads) except "
        "`SMTP_MAX_MESSAGE_SIZE=64M`, `SMTP_LOG_LEVEL=warn`; one mailbox; fresh data dir per start."
    )
    add(
        "* aiosmtpd: `bench/peers/aiosmtpd_maildir.py`: write to tmp/, fsync, rename into new/, "
        "fsync new/ before the 250, in a 16-thread pool; listen backlog 1024."
    )
    add(
        "* Postfix: throwaway instance (`postfix -c DIR start`), defaults except loopback only, "
        "virtual Maildir delivery of bench.test, no chroot, `default_process_limit = 1100` for "
        "(d). It acknowledges after fsyncing its queue file and delivers to the Maildir after the "
        "250, in the background (its delivery CPU is counted)."
    )
    add("* smtp-sink: `smtp-sink -m 1100 -c 127.0.0.1:PORT 1000`, discards: the ceiling.")
    if compare_name:
        add(
            f"* {compare_name}: the same settings and venv, the code of {compare_revision}; "
            "it runs every workload beside mailsrv in the same rounds but (e), and (f) when "
            "it has the relay."
        )
    if results.get("f"):
        add(
            "* (f): each server gets its own `smtp-sink -d DIR/m. 127.0.0.1:PORT 1000` as next "
            "hop, which writes every message to a file before its 250 (no fsync). mailsrv: "
            "`SMTP_RELAY_HOST=127.0.0.1:PORT`, `SMTP_RELAY_TLS=none`, loopback trusted (the "
            "default), relay concurrency defaults (20 per destination, 100 in all), otherwise as "
            "above. Postfix: as above plus `relayhost = [127.0.0.1]:PORT`, its defaults for the "
            "rest (20 per destination, connection reuse on demand). Both servers restart fresh "
            "for (f) in every round; which one goes first alternates between rounds."
        )
    if results.get("g"):
        add(
            "* (g): two mailsrv instances as above, fresh for every round, in alternating order; "
            "one of them with `SMTP_WEBHOOK_URL=http://127.0.0.1:PORT/hook` and "
            "`SMTP_WEBHOOK_SECRET=whsec_…` (32 random bytes): the `default` endpoint with its "
            "defaults (every event type, 8 requests at a time over kept-alive connections, "
            "15 s timeout), to its own `bench/peers/webhook_receiver.py` (peers venv, uvloop, "
            "answers `200` with no body, does not verify signatures). smtp-source drives (b) "
            f"exactly as in (b): `smtp-source -d -s {k['webhook_load'].sessions} -m "
            f"{k['webhook_load'].count} -l {k['webhook_load'].size}` to the local mailbox."
        )
    for name, why in problems.items():
        add(f"* **{name} could not start**: {why}")
    for incident in k["incidents"]:
        add(f"* **incident**: {incident}")
    add("")
    return "\n".join(out)


def render_issue8_targets(add: Callable[[str], None], k: dict[str, Any]) -> None:
    """The relay's targets: (f) against Postfix, and (b) before and after the relay."""
    results = k["results"]
    f_rows = results.get("f", {})
    mine = median([r.get("e2e_rate") for r in f_rows.get("mailsrv", [])])
    theirs = median([r.get("e2e_rate") for r in f_rows.get("postfix", [])])
    compare_name, _ = k["compare"]
    if not f_rows and not compare_name:
        return

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("**met**" if ok else "**not met**")

    add("## Targets (issue 8)")
    add("")
    add("| target | measured | |")
    add("|---|---|---|")
    if f_rows:
        ratio = mine / theirs if mine and theirs else None
        add(
            f"| (f) mailsrv ≥ 2{TIMES} Postfix end to end (first submission to last message at "
            f"the sink, msgs/s) | {fmt(mine)} / {fmt(theirs)} = {fmt(ratio, 2, TIMES)} "
            f"| {verdict(None if ratio is None else ratio >= 2)} |"
        )
        for name in ("mailsrv", "postfix"):
            rows = f_rows.get(name, [])
            if not rows:
                continue
            lost = sum(int(r["lost"]) for r in rows)
            dup = sum(int(r["duplicated"]) for r in rows)
            add(
                f"| (f) {name}: 0 lost, 0 duplicated (unique token per message, all rounds) "
                f"| {lost} lost, {dup} duplicated of {sum(r['ok'] for r in rows):,} "
                f"| {verdict(lost == 0 and dup == 0)} |"
            )
    if compare_name and results.get("b"):
        now_rows = results.get("b", {}).get("mailsrv", [])
        before_rows = results.get("b", {}).get(compare_name, [])
        for tool, what in (("src", "smtp-source"), ("lg", "loadgen")):
            pairs = [
                (a.get(tool, {}).get("rate"), b.get(tool, {}).get("rate"))
                for a, b in zip(now_rows, before_rows, strict=False)
            ]
            per_round = [a / b for a, b in pairs if a and b]
            ratio = median(per_round)
            rounds = ", ".join(f"{x:.2f}" for x in per_round)
            add(
                f"| (b) no regression: mailsrv ÷ {compare_name}, {what} msgs/s, median of "
                f"per-round ratios ≥ 0.95 (the spread between rounds here is about 5%) "
                f"| {fmt(ratio, 2, TIMES)} (rounds: {rounds or 'n/a'}) "
                f"| {verdict(None if ratio is None else ratio >= 0.95)} |"
            )
    add("")


def render_issue12_targets(add: Callable[[str], None], k: dict[str, Any]) -> None:
    """The shared queue's target: (f) with the queue in PostgreSQL against Postfix."""
    f_rows = k["results"].get("f", {})
    pg_rows = f_rows.get("mailsrv-pg", [])
    if not pg_rows:
        return
    mine = median([r.get("e2e_rate") for r in pg_rows])
    files = median([r.get("e2e_rate") for r in f_rows.get("mailsrv", [])])
    theirs = median([r.get("e2e_rate") for r in f_rows.get("postfix", [])])
    ratio = mine / theirs if mine and theirs else None
    lost = sum(int(r["lost"]) for r in pg_rows)
    dup = sum(int(r["duplicated"]) for r in pg_rows)

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("**met**" if ok else "**not met**")

    add("## Targets (issue 12)")
    add("")
    add("| target | measured | |")
    add("|---|---|---|")
    add(
        f"| (f) mailsrv with the queue in PostgreSQL (same machine, `synchronous_commit=on`) "
        f"≥ 1.5{TIMES} Postfix end to end, msgs/s | {fmt(mine)} / {fmt(theirs)} = "
        f"{fmt(ratio, 2, TIMES)} (file queue: {fmt(files)}) "
        f"| {verdict(None if ratio is None else ratio >= 1.5)} |"
    )
    add(
        f"| (f) mailsrv-pg: 0 lost, 0 duplicated | {lost} lost, {dup} duplicated of "
        f"{sum(r['ok'] for r in pg_rows):,} | {verdict(lost == 0 and dup == 0)} |"
    )
    add("")


def render_relay(add: Callable[[str], None], k: dict[str, Any]) -> None:
    """The (f) table: end-to-end rate, submission, drain, CPU, lost and duplicated."""
    f_rows = k["results"].get("f", {})
    if not f_rows:
        return
    w = k["relay_load"]
    add("")
    add(f"### (f) relay: {w.title}, relayed to smtp-sink as the next hop")
    add("")
    add(
        "loadgen submits (one recipient per message, `r<n>@remote.bench.example`, a unique token "
        "in each message's Message-ID and last line); the harness watches the sink's dump "
        "directory until every token answered 250 is there (bounded: 300 s, or 60 s without "
        "progress). End to end = from the first submission (loadgen's start) to the mtime of "
        "the last message file at the sink. Drain = from the last submission's end to that "
        "last arrival. lost = accepted tokens never at the sink; duplicated = extra copies of a "
        "token; other = files at the sink without a token (e.g. DSNs) or tokens not answered "
        "250. CPU is the server's (Postfix: all its processes) per message for submission and "
        "relay together; the sink's own CPU is shown apart."
    )
    add("")
    add(
        "| server | end-to-end msgs/s | mailsrv ÷ | end to end s | submission msgs/s "
        "| submission p99 ms | drain s | CPU ms/msg | sink CPU ms/msg | peak MiB | lost "
        "| duplicated | other | left in queue | per round msgs/s (1-min load average) | notes |"
    )
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    mine = median([r.get("e2e_rate") for r in f_rows.get("mailsrv", [])])
    for name in ["mailsrv", *(n for n in f_rows if n not in ("mailsrv", "postfix")), "postfix"]:
        rows = f_rows.get(name, [])
        if not rows:
            why = k["problems"].get(f"{name} (f)", "not run")
            add(f"| {name} | n/a |{' |' * 13} {why} |")
            continue
        rate = median([r.get("e2e_rate") for r in rows])
        errs = list(dict.fromkeys(str(e) for r in rows for e in r.get("errors", [])))[:3]
        add(
            f"| {name} | {fmt(rate)} | {fmt(mine / rate if mine and rate else None, 2, TIMES)} "
            f"| {fmt(median([r.get('e2e_s') for r in rows]), 2)} "
            f"| {fmt(median([r.get('submit_rate') for r in rows]))} "
            f"| {fmt(median([r.get('submit_p99_ms') for r in rows]), 1)} "
            f"| {fmt(median([r.get('drain_s') for r in rows]), 2)} "
            f"| {fmt(median([r.get('cpu_ms_per_msg') for r in rows]), 3)} "
            f"| {fmt(median([r.get('sink_cpu_ms_per_msg') for r in rows]), 3)} "
            f"| {fmt(kib_to_mib(median([r.get('peak_kib') for r in rows])), 1)} "
            f"| {sum(int(r['lost']) for r in rows)} "
            f"| {sum(int(r['duplicated']) for r in rows)} "
            f"| {sum(int(r['unknown']) + int(r['unacknowledged']) for r in rows)} "
            f"| {max(int(r['left_in_queue']) for r in rows)} "
            f"| {', '.join(_rate_and_load(r) for r in rows)} | {'; '.join(errs)} |"
        )
    add("")


def webhook_ratios(g_rows: dict[str, list[dict[str, Any]]]) -> list[float]:
    """(g): per round, SMTP msgs/s with the webhook on divided by the same round's without."""
    plain = {r["round"]: r.get("rate") for r in g_rows.get("plain", [])}
    return [
        r["rate"] / plain[r["round"]]
        for r in g_rows.get("webhook", [])
        if r.get("rate") and plain.get(r["round"])
    ]


def render_webhooks(add: Callable[[str], None], k: dict[str, Any]) -> None:
    """The (g) section: the issue's three targets, then both servers side by side."""
    g_rows = k["results"].get("g", {})
    if not g_rows:
        return
    w = k["webhook_load"]
    plain_rows, hook_rows = g_rows.get("plain", []), g_rows.get("webhook", [])

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("**met**" if ok else "**not met**")

    def ms(value: float | None) -> float | None:
        return None if value is None else value * 1000

    add("")
    add(f"### (g) webhooks: {w.title}, with and without one webhook endpoint")
    add("")
    add(
        "smtp-source drives (b) at two fresh mailsrv instances per round, in alternating order: "
        "one without a webhook, one with `SMTP_WEBHOOK_URL` pointing at "
        "`bench/peers/webhook_receiver.py` on loopback (asyncio, keep-alive, answers every POST "
        "`200` at once). After smtp-source ends the harness waits (bounded: 120 s, or 30 s "
        "without progress) until the receiver has one `message.received` event per accepted "
        "message. notifications/s = events ÷ (last arrival - first arrival); drain = last "
        "arrival - end of submission; lag = arrival - the event's `timestamp` (the end of DATA, "
        "before the 250), p50/p99/max over every event, and its median over the first and the "
        "last tenth of arrivals (a backlog that grows shows as a rising lag). lost = accepted "
        "messages without an event; duplicated = extra deliveries of a `webhook-id`; left in "
        "outbox = entries still on disk after the wait; HTTP connections = the receiver's "
        "connections that carried POSTs (most open at once). CPU is mailsrv's per message, "
        "during submission and up to the last event; the receiver's is apart."
    )
    add("")
    ratios = webhook_ratios(g_rows)
    ratio = median(ratios)
    hook_rate = median([r.get("rate") for r in hook_rows])
    notify = median([r.get("notify_rate") for r in hook_rows])
    drain = median([r.get("drain_s") for r in hook_rows])
    lost = sum(int(r.get("lost") or 0) for r in hook_rows) if hook_rows else None
    lost_mail = sum(int(r.get("lost_mail") or 0) for r in [*plain_rows, *hook_rows])
    events = sum(int(r.get("received") or 0) for r in hook_rows)
    accepted = sum(int(r.get("ok") or 0) for r in hook_rows)
    keeps_up = (
        None
        if drain is None or notify is None or hook_rate is None
        else drain <= 2.0 and notify >= 0.95 * hook_rate
    )
    add("| target (issue 9) | measured | |")
    add("|---|---|---|")
    add(
        "| (g) the outbox keeps up with (b): no backlog growth (drain ≤ 2 s, and notifications/s "
        f"≥ 0.95{TIMES} the SMTP msgs/s with the webhook on: 5% for the edges of the run) "
        f"| drain {fmt(drain, 2, ' s')}, {fmt(notify)} notifications/s for {fmt(hook_rate)} "
        f"msgs/s | {verdict(keeps_up)} |"
    )
    rounds = ", ".join(f"{x:.2f}" for x in ratios)
    add(
        f"| (g) SMTP msgs/s with the webhook on ≥ 0.8{TIMES} without (median of per-round "
        f"ratios) | {fmt(ratio, 2, TIMES)} (rounds: {rounds or 'n/a'}) "
        f"| {verdict(None if ratio is None else ratio >= 0.8)} |"
    )
    add(
        f"| (g) 0 events lost (all rounds) | {'n/a' if lost is None else lost} lost of "
        f"{accepted:,} accepted ({events:,} arrived; messages without a Maildir file: "
        f"{lost_mail}) | {verdict(None if lost is None else lost == 0 and lost_mail == 0)} |"
    )
    add("")
    add(
        "| server | SMTP msgs/s | with ÷ without | notifications/s | first event after s "
        "| drain s | lag p50 ms | lag p99 ms | lag max ms | lag first → last tenth ms "
        "| lost | duplicated | left in outbox | HTTP connections (most at once) "
        "| CPU ms/msg submission | CPU ms/msg to last event | receiver CPU ms/event | peak MiB "
        "| per round msgs/s (1-min load average) | notes |"
    )
    add("|---|" + "---:|" * 17 + "---|---|")
    for label, name, rows in (
        ("plain", "mailsrv, no webhook", plain_rows),
        ("webhook", "mailsrv + webhook", hook_rows),
    ):
        if not rows:
            key = "mailsrv-nohook (g)" if label == "plain" else "mailsrv-webhook (g)"
            add(f"| {name} | n/a |{' |' * 17} {k['problems'].get(key, 'not run')} |")
            continue
        errs = list(dict.fromkeys(str(r["error"]) for r in rows if r.get("error")))[:3]
        errs += [f"round {r['round']}: no progress for 30 s" for r in rows if r.get("stalled")]
        errs += [
            f"round {r['round']}: {r['bad']} event bodies not understood"
            for r in rows
            if r.get("bad")
        ]
        hooked = label == "webhook"
        left: dict[str, int] = defaultdict(int)
        for r in rows:
            for state, n in (r.get("left_in_outbox") or {}).items():
                left[state] = max(left[state], int(n))
        left_text = ", ".join(f"{n} {state}" for state, n in sorted(left.items())) or "0"
        first_tenth = ms(median([r.get("lag_first_tenth_s") for r in rows]))
        last_tenth = ms(median([r.get("lag_last_tenth_s") for r in rows]))

        def hook(text: str, hooked: bool = hooked) -> str:
            return text if hooked else ""

        add(
            f"| {name} | {fmt(median([r.get('rate') for r in rows]))} "
            f"| {hook(fmt(ratio, 2, TIMES))} "
            f"| {hook(fmt(median([r.get('notify_rate') for r in rows])))} "
            f"| {hook(fmt(median([r.get('first_after_s') for r in rows]), 2))} "
            f"| {hook(fmt(median([r.get('drain_s') for r in rows]), 2))} "
            f"| {hook(fmt(ms(median([r.get('lag_p50_s') for r in rows])), 1))} "
            f"| {hook(fmt(ms(median([r.get('lag_p99_s') for r in rows])), 1))} "
            f"| {hook(fmt(ms(median([r.get('lag_max_s') for r in rows])), 1))} "
            f"| {hook(f'{fmt(first_tenth, 1)} → {fmt(last_tenth, 1)}')} "
            f"| {hook(str(sum(int(r.get('lost') or 0) for r in rows)))} "
            f"| {hook(str(sum(int(r.get('duplicated') or 0) for r in rows)))} "
            f"| {hook(left_text)} "
            f"| {hook(_connections(rows))} "
            f"| {fmt(median([r.get('submit_cpu_ms_per_msg') for r in rows]), 3)} "
            f"| {hook(fmt(median([r.get('cpu_ms_per_msg') for r in rows]), 3))} "
            f"| {hook(fmt(median([r.get('receiver_cpu_ms_per_event') for r in rows]), 3))} "
            f"| {fmt(kib_to_mib(median([r.get('peak_kib') for r in rows])), 1)} "
            f"| {', '.join(_webhook_rate_and_load(r) for r in rows)} | {'; '.join(errs)} |"
        )
    add("")


def _connections(rows: list[dict[str, Any]]) -> str:
    """Connections that carried POSTs, per round (and the most open at once)."""
    return ", ".join(f"{r.get('connections', 0)} ({r.get('most_open', 0)})" for r in rows)


def _webhook_rate_and_load(row: dict[str, Any]) -> str:
    return f"{fmt(row.get('rate'))} ({row.get('loadavg', 0.0):.1f})"


def _rate_and_load(row: dict[str, Any]) -> str:
    return f"{fmt(row.get('e2e_rate'))} ({row.get('loadavg', 0.0):.1f})"


def render_profile(
    add: Callable[[str], None], profile: dict[str, Any], load: str = "50 sessions of 1 KiB messages"
) -> None:
    samples, seconds = profile["total"], profile["seconds"]
    busy = samples / (seconds * 200) if seconds else 0
    add(
        f"`py-spy record --gil --rate 200 --threads --nonblocking` for {seconds:.0f} s while "
        f"smtp-source drives {load}: {samples} samples in which some "
        "thread held the GIL, "
        f"i.e. the GIL was held **{100 * busy:.0f}%** of the time (100% = one core of Python "
        "work, the most one process can do). Shares below are of those samples. "
        + ("" if profile.get("load_lasted") else "(The load ended before the recording did.) ")
        + f"Full listings: `{profile.get('listing', 'bench/profile-b.txt')}`."
    )
    add("")
    add(
        f"CPU of the mailsrv process per thread over {profile['cpu_window']:.0f} s of the same "
        f"load just before py-spy attached ({profile['rate_plain']:.0f} msgs/s "
        f"{profile.get('rate_what', 'delivered')} then; "
        f"{profile['rate_profiled']:.0f} msgs/s while py-spy sampled), in percent of one core:"
    )
    add("")
    add("| thread | user | system | total |")
    add("|---|---:|---:|---:|")
    for kind, cpu in profile.get("thread_cpu", {}).items():
        add(
            f"| {kind} | {cpu['user']:.0f}% | {cpu['system']:.0f}% "
            f"| {cpu['user'] + cpu['system']:.0f}% |"
        )
    add("")
    add("| GIL held by thread | share |")
    add("|---|---:|")
    for name, count in profile["threads"][:5]:
        add(f"| {name} | {100 * count / samples:.1f}% |")
    add("")
    add("| top 15 functions by own time (GIL held) | share |")
    add("|---|---:|")
    for name, count in profile["own"]:
        add(f"| `{name}` | {100 * count / samples:.1f}% |")
    add("")
    add("| top 15 by inclusive time (GIL held) | share |")
    add("|---|---:|")
    for name, count in profile["inclusive"]:
        add(f"| `{name}` | {100 * count / samples:.1f}% |")
    every = profile.get("all_threads")
    if every:
        add("")
        add(
            "Every thread, idle included (`py-spy --idle`): where each kind of thread spends "
            "its time (own time of the top functions within that kind)."
        )
        add("")
        add("| thread kind | share of all samples | top functions within it |")
        add("|---|---:|---|")
        for name, count in every["threads"][:4]:
            tops = every["own_by_thread"].get(name, [])
            within = "; ".join(f"`{leaf}` {100 * n / count:.0f}%" for leaf, n in tops[:4])
            add(f"| {name} | {100 * count / every['total']:.1f}% | {within} |")


def _d_summary(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "n/a"
    ok = [r.get("ok") for r in rows]
    refused = sum(int(r.get("refused") or 0) + int(r.get("connect_failed") or 0) for r in rows)
    slow = sum(int(r.get("slow_connects") or 0) for r in rows)
    drops = sum(int(r.get("listen_dropped") or 0) for r in rows)
    return f"250s per round {ok}, refused {refused}, slow connects {slow}, listen drops {drops}"


if __name__ == "__main__":
    sys.exit(main())
