"""End-to-end tests over real loopback sockets: smtplib, raw pipelining, smuggling, swaks,
memory bounds for huge lines and messages, garbage input, abuse limits and 1000 connections.

The server runs in the test process (pytest-twisted), so every blocking client runs in a thread
(``run_client``) or, for the 1000-connection herd, in a subprocess.  Memory is measured as the
VmRSS of this process, which is the server's.  Run with ``-s`` to see the measured numbers.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import resource
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from mailsrv.smtp import replies
from tests.conftest import RawClient, RunningServer, make_config, run_client, start_server

MiB = 1024 * 1024
SMUGGLING_VARIANTS = (b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r")
SMUGGLED_COMMANDS = (
    b"MAIL FROM:<evil@remote.test>\r\n"
    b"RCPT TO:<bob@example.org>\r\n"
    b"DATA\r\n"
    b"Subject: smuggled\r\n\r\nevil\r\n.\r\n"
)
_REPLY_LINE = re.compile(rb"(\d{3})([ -])([^\r\n]*)\r\n")


def _with_nul(variant: bytes) -> bytes:
    """The variant with a NUL inserted right before its dot."""
    dot = variant.index(b".")
    return variant[:dot] + b"\x00" + variant[dot:]


ALL_SMUGGLING_VARIANTS = SMUGGLING_VARIANTS + tuple(_with_nul(v) for v in SMUGGLING_VARIANTS)


def rss_bytes() -> int:
    """This process's resident set size (VmRSS), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class RssSampler:
    """Samples VmRSS from the reactor thread every 50 ms; ``peak`` is the largest sample."""

    def __init__(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.task import LoopingCall

        self.baseline = rss_bytes()
        self.peak = self.baseline
        self.samples = 0
        self._loop = LoopingCall(self._sample)
        self._loop.clock = reactor

    def _sample(self) -> None:
        self.samples += 1
        self.peak = max(self.peak, rss_bytes())

    def start(self) -> None:
        self._loop.start(0.05, now=True)

    def stop(self) -> None:
        self._sample()
        if self._loop.running:
            self._loop.stop()

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def _expect(client: RawClient, line: bytes, prefix: bytes) -> bytes:
    reply = client.command(line)
    assert reply.startswith(prefix), (line, reply)
    return reply


def _open_transaction(client: RawClient, *recipients: str) -> None:
    """Greeting, EHLO, MAIL and the RCPTs (all accepted), then DATA (354)."""
    assert client.read_reply().startswith(b"220 "), "no greeting"
    _expect(client, b"EHLO client.example.test", b"250")
    _expect(client, b"MAIL FROM:<sender@remote.test>", b"250 2.1.0")
    for recipient in recipients:
        _expect(client, f"RCPT TO:<{recipient}>".encode(), b"250 2.1.5")
    _expect(client, b"DATA", b"354 ")


def _quit(client: RawClient) -> None:
    try:
        assert client.command(b"QUIT") == replies.BYE.format()
    finally:
        client.close()


async def _serve(tmp_path: Path, **overrides: Any) -> RunningServer:
    return await start_server(make_config(tmp_path, **overrides))


# -- 1. smtplib ---------------------------------------------------------------------------------


def _smtplib_session(port: int) -> tuple[dict[str, tuple[int, bytes]], dict[str, Any], bool]:
    message = EmailMessage()
    message["From"] = "sender@remote.test"
    message["To"] = ", ".join(
        [
            "alice@example.org",
            "info@example.org",
            "carol@example.net",
            "nobody@example.org",
            "someone@elsewhere.test",
        ]
    )
    message["Subject"] = "several recipients"
    message.set_content("first message\n")
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.test", timeout=10) as c:
        refused = c.send_message(message)
        second = c.sendmail(
            "sender@remote.test", ["bob@example.org"], b"Subject: second\r\n\r\nagain\r\n"
        )
        return refused, second, c.has_extn("pipelining")


@pytest_twisted.ensureDeferred
async def test_smtplib_several_recipients_alias_refusals_and_second_message(
    smtp: RunningServer,
) -> None:
    refused, second, pipelining = await run_client(_smtplib_session, smtp.port)
    assert pipelining
    assert refused == {
        "nobody@example.org": (550, b"5.1.1 No such user here"),
        "someone@elsewhere.test": (554, b"5.7.1 Relay access denied"),
    }
    assert second == {}
    alice = smtp.messages("alice@example.org")
    bob = smtp.messages("bob@example.org")
    carol = smtp.messages("carol@example.net")
    # alice is named directly and through info@: one copy only.
    assert len(alice) == 1 and len(carol) == 1
    assert len(bob) == 2  # through info@, then the second message
    assert alice[0] == carol[0] in bob  # the same message, wherever it sorts among bob's
    assert b"Subject: several recipients\n" in alice[0]
    assert b"\nfirst message\n" in alice[0]
    assert b"Received: from client.example.test ([127.0.0.1])" in alice[0]
    assert b"Subject: second\n\nagain\n" in b"".join(bob)
    assert not smtp.maildir_files("nobody@example.org")


def _ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def _send_from(host: str, port: int, subject: str) -> dict[str, Any]:
    with smtplib.SMTP(host, port, local_hostname="v6.example.test", timeout=10) as client:
        return client.sendmail(
            "sender@remote.test",
            ["alice@example.org"],
            f"Subject: {subject}\r\n\r\nhello\r\n".encode(),
        )


@pytest_twisted.ensureDeferred
async def test_ipv6_and_ipv4_on_a_dual_stack_listener(tmp_path: Path) -> None:
    if not _ipv6_available():
        pytest.skip("IPv6 loopback ::1 is not available on this host")
    running = await _serve(tmp_path, host="::")
    try:
        assert await run_client(_send_from, "::1", running.port, "over-v6") == {}
        assert await run_client(_send_from, "127.0.0.1", running.port, "over-v4") == {}
    finally:
        await running.service.stopService()
    messages = running.messages("alice@example.org")
    assert len(messages) == 2
    by_subject = {m.split(b"Subject: ")[1].split(b"\n")[0]: m for m in messages}
    assert b"Received: from v6.example.test ([::1])" in by_subject[b"over-v6"]
    # IPv4-mapped peers are shown (and limited) as plain IPv4.
    assert b"Received: from v6.example.test ([127.0.0.1])" in by_subject[b"over-v4"]


# -- 2. pipelining ------------------------------------------------------------------------------


def _pipelined(port: int, rcpts: tuple[str, ...]) -> list[bytes]:
    client = RawClient(port)
    try:
        out = [client.read_reply()]
        commands = [b"EHLO pipe.example.test", b"MAIL FROM:<pipe@remote.test>"]
        commands += [f"RCPT TO:<{r}>".encode() for r in rcpts]
        commands.append(b"DATA")
        client.send(b"".join(c + b"\r\n" for c in commands))
        out += [client.read_reply() for _ in commands]
        client.send(b"Subject: pipelined\r\n\r\nbody line\r\n.\r\nQUIT\r\n")
        out += [client.read_reply(), client.read_reply()]
        out.append(client.read_until_closed())
        return out
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_pipelining_in_one_write(smtp: RunningServer) -> None:
    out = await run_client(_pipelined, smtp.port, ("alice@example.org", "bob@example.org"))
    greeting, ehlo, mail, rcpt1, rcpt2, data, accepted, bye, rest = out
    assert greeting.startswith(b"220 mx.example.org ")
    assert ehlo.startswith(b"250-mx.example.org Hello pipe.example.test")
    assert b"250-PIPELINING\r\n" in ehlo and ehlo.endswith(b"250 SMTPUTF8\r\n")
    assert mail == replies.SENDER_OK.format()
    assert rcpt1 == rcpt2 == replies.RECIPIENT_OK.format()
    assert data == replies.START_DATA.format()
    assert accepted.startswith(b"250 2.0.0 OK: queued as ")
    assert bye == replies.BYE.format()
    assert rest == b""
    for mailbox in ("alice@example.org", "bob@example.org"):
        (message,) = smtp.messages(mailbox)
        assert message.endswith(b"Subject: pipelined\n\nbody line\n")


@pytest_twisted.ensureDeferred
async def test_pipelining_keeps_order_with_mixed_results(smtp: RunningServer) -> None:
    rcpts = ("nobody@example.org", "alice@example.org", "x@elsewhere.test", "info@example.org")
    out = await run_client(_pipelined, smtp.port, rcpts)
    assert out[3:7] == [
        replies.NO_SUCH_USER.format(),
        replies.RECIPIENT_OK.format(),
        replies.RELAY_DENIED.format(),
        replies.RECIPIENT_OK.format(),
    ]
    assert out[7] == replies.START_DATA.format()
    assert out[8].startswith(b"250 2.0.0 OK: queued as ")
    assert len(smtp.messages("alice@example.org")) == 1
    assert len(smtp.messages("bob@example.org")) == 1


# -- 3. SMTP smuggling --------------------------------------------------------------------------


def _smuggle(port: int, variant: bytes, split_at: int | None) -> tuple[bytes, bytes]:
    """Send one smuggling attempt; ``split_at`` cuts the payload in two sends there."""
    payload = b"Subject: legit\r\n\r\nhello" + variant + SMUGGLED_COMMANDS
    client = RawClient(port)
    try:
        _open_transaction(client, "alice@example.org")
        if split_at is None:
            client.send(payload)
        else:
            client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.send(payload[:split_at])
            # Pacing only (nothing asserts on time): lets the server read the first part alone.
            time.sleep(0.02)
            client.send(payload[split_at:])
        end_of_data = client.read_reply()
        noop = client.command(b"NOOP")
        _quit(client)
        return end_of_data, noop
    finally:
        client.close()


def _smuggle_all(port: int) -> list[tuple[bytes, int | None, bytes, bytes]]:
    results = []
    start = len(b"Subject: legit\r\n\r\nhello")
    for variant in ALL_SMUGGLING_VARIANTS:
        splits: list[int | None] = [None]
        splits += [start + i for i in range(len(variant) + 1)]  # before, inside, after
        for split_at in splits:
            end_of_data, noop = _smuggle(port, variant, split_at)
            results.append((variant, split_at, end_of_data, noop))
    return results


@pytest_twisted.ensureDeferred
async def test_smuggling_variants_are_refused(smtp: RunningServer) -> None:
    results = await run_client(_smuggle_all, smtp.port)
    assert len(results) == sum(len(v) + 2 for v in ALL_SMUGGLING_VARIANTS)
    for variant, split_at, end_of_data, noop in results:
        assert end_of_data.startswith(b"554 5.6.0 "), (variant, split_at, end_of_data)
        # Exactly one reply per command: the smuggled MAIL/RCPT/DATA were never commands.
        assert noop == replies.OK.format(), (variant, split_at, noop)
    assert smtp.maildir_files("bob@example.org") == []
    assert smtp.maildir_files("alice@example.org") == []
    assert list(smtp.config.spool_dir.joinpath("incoming").iterdir()) == []


def _long_line_smuggle(port: int) -> tuple[bytes, bytes]:
    client = RawClient(port)
    try:
        _open_transaction(client, "alice@example.org")
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.send(b"Subject: long\r\n\r\n" + b"x" * 20_000)
        time.sleep(0.02)  # pacing only: the smuggled part arrives in a later read
        client.send(b"\r\n" + SMUGGLED_COMMANDS)
        end_of_data = client.read_reply()
        noop = client.command(b"NOOP")
        _quit(client)
        return end_of_data, noop
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_long_data_line_does_not_leave_data_mode(smtp: RunningServer) -> None:
    end_of_data, noop = await run_client(_long_line_smuggle, smtp.port)
    assert end_of_data.startswith(b"250 2.0.0 OK: queued as ")
    assert noop == replies.OK.format()
    (message,) = smtp.messages("alice@example.org")
    assert message.endswith(
        b"Subject: long\n\n"
        + b"x" * 20_000
        + b"\nMAIL FROM:<evil@remote.test>\nRCPT TO:<bob@example.org>\nDATA\n"
        b"Subject: smuggled\n\nevil\n"
    )
    assert smtp.maildir_files("bob@example.org") == []


# -- 4. swaks -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_swaks_pipelined_delivery(smtp: RunningServer) -> None:
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.skip("swaks is not installed (CI installs it: apt-get install swaks)")
    command = [swaks, "--server", "127.0.0.1", "--port", str(smtp.port)]
    command += ["--to", "alice@example.org", "--from", "x@remote.test", "--pipeline"]
    done = await run_client(subprocess.run, command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "<** " not in done.stdout  # swaks marks error replies with <**
    assert re.search(r"<[-~] +250 2\.0\.0 OK: queued as", done.stdout), done.stdout
    (message,) = smtp.messages("alice@example.org")
    assert b"Return-Path: <x@remote.test>\n" in message
    assert b"This is a test mailing" in message


# -- 5. a 20 MB command line --------------------------------------------------------------------


def _endless_command_line(port: int) -> tuple[bytes, list[bytes], int]:
    """Send a 20 MB line in 1 MB chunks; also samples VmRSS after every chunk (same process)."""
    client = RawClient(port, timeout=30)
    try:
        greeting = client.read_reply()
        chunk = b"A" * MiB
        peak = 0
        for _ in range(20):
            client.send(chunk)
            peak = max(peak, rss_bytes())
        client.send(b"\r\nNOOP\r\n")
        answers = []
        while True:
            reply = client.read_reply()
            answers.append(reply)
            if not reply or reply.startswith(b"250"):
                break
        _quit(client)
        return greeting, answers, peak
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_20mb_command_line_keeps_memory_flat(smtp: RunningServer) -> None:
    sampler = RssSampler()
    sampler.start()
    try:
        greeting, answers, client_peak = await run_client(_endless_command_line, smtp.port)
    finally:
        sampler.stop()
    sampler.peak = max(sampler.peak, client_peak)
    after = rss_bytes()
    print(
        f"\n[20 MB command line] VmRSS before {sampler.baseline / MiB:.1f} MiB, "
        f"peak {sampler.peak / MiB:.1f} MiB (+{sampler.growth / MiB:.2f} MiB), "
        f"after {after / MiB:.1f} MiB (+{(after - sampler.baseline) / MiB:.2f} MiB), "
        f"{sampler.samples} samples"
    )
    assert greeting.startswith(b"220 ")
    assert answers == [replies.LINE_TOO_LONG.format(), replies.OK.format()]
    assert after - sampler.baseline < 20 * MiB
    assert sampler.growth < 20 * MiB


# -- 6. a 50 MB message -------------------------------------------------------------------------

_BIG_LINES = -(-50 * MiB // 1000)  # 1000-byte lines (998 + CRLF), 50 MiB in all
_LINE_FILL = [bytes([ord("a") + i]) * 989 for i in range(26)]


def _big_line(index: int) -> bytes:
    return b"%08d " % index + _LINE_FILL[index % 26]  # 998 bytes, never starts with a dot


def _send_big_message(port: int) -> tuple[bytes, str, int, int, int]:
    """Stream the message, generated on the fly; returns the reply, body hash, sizes and the
    largest VmRSS seen after each MiB sent (a supplement to the reactor-thread samples)."""
    body_hash = hashlib.sha256()
    stored = sent = peak = 0
    client = RawClient(port, timeout=60)
    try:
        _open_transaction(client, "alice@example.org")
        head = b"Subject: big\r\n\r\n"
        client.send(head)
        sent += len(head)
        batch: list[bytes] = []
        for index in range(_BIG_LINES):
            line = _big_line(index)
            body_hash.update(line + b"\n")
            stored += len(line) + 1
            batch.append(line + b"\r\n")
            if len(batch) == 64:
                data = b"".join(batch)
                client.send(data)
                sent += len(data)
                batch.clear()
                if index % 1024 == 1023:
                    peak = max(peak, rss_bytes())
        client.send(b"".join(batch) + b".\r\n")
        sent += sum(map(len, batch))
        reply = client.read_reply()
        _quit(client)
        return reply, body_hash.hexdigest(), stored, sent, peak
    finally:
        client.close()


def _hash_after_headers(path: Path) -> tuple[str, int]:
    """SHA-256 and length of a stored message's body (after the first blank line)."""
    digest = hashlib.sha256()
    length = 0
    with open(path, "rb") as f:
        head = f.read(64 * 1024)
        _, sep, body = head.partition(b"\n\n")
        assert sep, "no end of headers"
        while body:
            digest.update(body)
            length += len(body)
            body = f.read(MiB)
    return digest.hexdigest(), length


@pytest_twisted.ensureDeferred
async def test_50mb_message_streams_with_flat_memory(tmp_path: Path) -> None:
    running = await _serve(tmp_path, max_message_size=60 * MiB)
    try:
        sampler = RssSampler()
        sampler.start()
        started = time.monotonic()
        try:
            reply, expected_hash, stored, sent, client_peak = await run_client(
                _send_big_message, running.port
            )
        finally:
            sampler.stop()
        sampler.peak = max(sampler.peak, client_peak)
        elapsed = time.monotonic() - started
    finally:
        await running.service.stopService()
    print(
        f"\n[50 MB message] {sent / MiB:.1f} MiB sent in {elapsed:.2f} s; VmRSS before "
        f"{sampler.baseline / MiB:.1f} MiB, peak {sampler.peak / MiB:.1f} MiB "
        f"(+{sampler.growth / MiB:.2f} MiB), {sampler.samples} samples"
    )
    assert reply.startswith(b"250 2.0.0 OK: queued as ")
    assert sent >= 50 * MiB
    (path,) = running.maildir_files("alice@example.org")
    body_hash, body_length = await run_client(_hash_after_headers, path)
    assert body_length == stored
    assert body_hash == expected_hash
    assert path.name.endswith(f",S={path.stat().st_size}")
    assert sampler.growth < 30 * MiB


# -- 7. garbage ---------------------------------------------------------------------------------


def _tls_client_hello() -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="mx.example.org")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    assert hello[:1] == b"\x16", "not a TLS handshake record"
    return hello


def _garbage_payloads() -> dict[str, bytes]:
    rng = random.Random(5321)
    many_lines = b"\r\n".join(
        bytes(rng.choice([b for b in range(256) if b not in (10, 13)]) for _ in range(40))
        for _ in range(30)
    )
    return {
        "random-binary": rng.randbytes(200_000),
        "random-lines": many_lines,
        "nul-bytes": b"\x00" * 4096,
        "nul-long": b"\x00" * 20_000,
        "nul-in-command": b"NOOP\x00\r\nMAIL FROM:<a\x00@remote.test>",
        "utf8-junk": "Grüße ☃ 日本語 \U0001f4e7 ÿ".encode(),
        "latin1-junk": "héllo wörld ÿþ".encode("latin-1"),
        "tls-client-hello": _tls_client_hello(),
        "http-get": b"GET / HTTP/1.1\r\nHost: mx.example.org\r\nUser-Agent: curl/8.5\r\n"
        b"Accept: */*\r\n\r\n",
    }


def _throw_garbage(port: int, payload: bytes) -> bytes:
    client = RawClient(port, timeout=10)
    try:
        data = client.read_reply()
        try:
            client.send(payload + b"\r\nQUIT\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed after too many errors; what it said is still readable
        return data + client.read_until_closed()
    finally:
        client.close()


def _garbage_then_smtplib(port: int) -> tuple[dict[str, bytes], dict[str, Any]]:
    answers = {name: _throw_garbage(port, payload) for name, payload in _garbage_payloads().items()}
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        refused = client.sendmail(
            "after@remote.test", ["alice@example.org"], b"Subject: after\r\n\r\nstill here\r\n"
        )
    return answers, refused


@pytest_twisted.ensureDeferred
async def test_garbage_gets_smtp_errors_and_server_survives(smtp: RunningServer) -> None:
    answers, refused = await run_client(_garbage_then_smtplib, smtp.port)
    for name, data in answers.items():
        assert b"Traceback" not in data and b"Exception" not in data, (name, data)
        lines = _REPLY_LINE.findall(data)
        assert b"".join(a + b + c + b"\r\n" for a, b, c in lines) == data, (name, data)
        codes = [int(code) for code, sep, _ in lines if sep == b" "]
        assert codes[0] == 220, (name, data)
        *errors, last = codes[1:]
        assert errors, f"{name}: no error reply at all"
        assert all(500 <= code < 600 for code in errors), (name, data)
        assert last in (221, 421), (name, data)
        if last == 421:
            assert data.endswith(replies.TOO_MANY_ERRORS.format()), (name, data)
        print(f"\n[garbage {name}] {len(errors)} error replies, then {last}")
    assert answers["random-lines"].endswith(replies.TOO_MANY_ERRORS.format())
    assert refused == {}
    (message,) = smtp.messages("alice@example.org")
    assert message.endswith(b"Subject: after\n\nstill here\n")


# -- 8. limits ----------------------------------------------------------------------------------


def _greetings(port: int, count: int) -> list[bytes]:
    """Open ``count`` concurrent connections; returns each greeting, then closes them all."""
    clients: list[RawClient] = []
    try:
        greetings = []
        for _ in range(count):
            clients.append(RawClient(port))
            greetings.append(clients[-1].read_reply())
        return greetings
    finally:
        for client in clients:
            client.close()


@pytest_twisted.ensureDeferred
async def test_limit_connections_per_ip(tmp_path: Path) -> None:
    running = await _serve(tmp_path, trusted_networks=(), max_connections_per_ip=3)
    try:
        greetings = await run_client(_greetings, running.port, 4)
    finally:
        await running.service.stopService()
    assert [g[:4] for g in greetings[:3]] == [b"220 "] * 3
    assert greetings[3] == replies.TOO_MANY_CONNECTIONS_FROM_IP.format()
    assert greetings[3].startswith(b"421 4.7.0 ")


@pytest_twisted.ensureDeferred
async def test_limit_connections_global(tmp_path: Path) -> None:
    running = await _serve(tmp_path, trusted_networks=(), max_connections=5)
    try:
        greetings = await run_client(_greetings, running.port, 6)
    finally:
        await running.service.stopService()
    assert [g[:4] for g in greetings[:5]] == [b"220 "] * 5
    assert greetings[5] == replies.TOO_MANY_CONNECTIONS.format()
    assert greetings[5].startswith(b"421 4.7.0 ")


def _sequential_greetings(port: int, count: int) -> list[bytes]:
    greetings = []
    for _ in range(count):
        client = RawClient(port)
        try:
            greetings.append(client.read_reply())
        finally:
            client.close()
    return greetings


@pytest_twisted.ensureDeferred
async def test_limit_connection_rate_per_ip(tmp_path: Path) -> None:
    running = await _serve(tmp_path, trusted_networks=(), connection_rate_per_ip=5, rate_window=60)
    try:
        greetings = await run_client(_sequential_greetings, running.port, 6)
    finally:
        await running.service.stopService()
    assert [g[:4] for g in greetings[:5]] == [b"220 "] * 5
    assert greetings[5] == replies.CONNECTION_RATE_EXCEEDED.format()
    assert greetings[5].startswith(b"421 4.7.0 ")


def _three_messages(port: int) -> list[bytes]:
    client = RawClient(port)
    try:
        out = []
        for number in range(2):
            if number == 0:
                _open_transaction(client, "alice@example.org")
            else:
                _expect(client, b"MAIL FROM:<sender@remote.test>", b"250 2.1.0")
                _expect(client, b"RCPT TO:<alice@example.org>", b"250 2.1.5")
                _expect(client, b"DATA", b"354 ")
            out.append(client.command(b"Subject: rated\r\n\r\nhi\r\n."))
        out.append(client.command(b"MAIL FROM:<sender@remote.test>"))
        out.append(client.command(b"NOOP"))
        _quit(client)
        return out
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_limit_message_rate_per_ip(tmp_path: Path) -> None:
    running = await _serve(tmp_path, trusted_networks=(), message_rate_per_ip=2)
    try:
        first, second, third_mail, noop = await run_client(_three_messages, running.port)
    finally:
        await running.service.stopService()
    assert first.startswith(b"250 2.0.0 OK: queued as ")
    assert second.startswith(b"250 2.0.0 OK: queued as ")
    assert third_mail == replies.MESSAGE_RATE_EXCEEDED.format()
    assert third_mail.startswith(b"451 4.7.1 ")
    assert noop == replies.OK.format()
    assert len(running.messages("alice@example.org")) == 2


def _three_recipients(port: int) -> list[bytes]:
    client = RawClient(port)
    try:
        assert client.read_reply().startswith(b"220 ")
        out = [client.command(b"EHLO client.example.test")]
        out.append(client.command(b"MAIL FROM:<sender@remote.test>"))
        for rcpt in ("alice@example.org", "bob@example.org", "carol@example.net"):
            out.append(client.command(f"RCPT TO:<{rcpt}>".encode()))
        out.append(client.command(b"DATA"))
        out.append(client.command(b"Subject: two\r\n\r\nhi\r\n."))
        _quit(client)
        return out
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_limit_recipients(tmp_path: Path) -> None:
    running = await _serve(tmp_path, trusted_networks=(), max_recipients=2)
    try:
        out = await run_client(_three_recipients, running.port)
    finally:
        await running.service.stopService()
    _, mail, rcpt1, rcpt2, rcpt3, data, accepted = out
    assert mail == replies.SENDER_OK.format()
    assert rcpt1 == rcpt2 == replies.RECIPIENT_OK.format()
    assert rcpt3 == replies.TOO_MANY_RECIPIENTS.format()
    assert rcpt3.startswith(b"452 4.5.3 ")
    assert data == replies.START_DATA.format()
    assert accepted.startswith(b"250 2.0.0 OK: queued as ")
    assert len(running.messages("alice@example.org")) == 1
    assert len(running.messages("bob@example.org")) == 1
    assert running.messages("carol@example.net") == []


def _oversized(port: int) -> list[bytes]:
    client = RawClient(port)
    try:
        assert client.read_reply().startswith(b"220 ")
        out = [client.command(b"EHLO client.example.test")]
        out.append(client.command(b"MAIL FROM:<sender@remote.test> SIZE=100000"))
        # Without SIZE the limit is enforced while DATA streams.
        out.append(client.command(b"MAIL FROM:<sender@remote.test>"))
        out.append(client.command(b"RCPT TO:<alice@example.org>"))
        out.append(client.command(b"DATA"))
        out.append(client.command(b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 100 + b"."))
        out.append(client.command(b"NOOP"))
        _quit(client)
        return out
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_limit_message_size(tmp_path: Path) -> None:
    running = await _serve(tmp_path, trusted_networks=(), max_message_size=4096)
    try:
        ehlo, sized_mail, mail, rcpt, data, end_of_data, noop = await run_client(
            _oversized, running.port
        )
    finally:
        await running.service.stopService()
    assert b"250-SIZE 4096\r\n" in ehlo
    assert sized_mail == replies.MESSAGE_TOO_BIG.format()
    assert sized_mail.startswith(b"552 5.3.4 ")
    assert mail == replies.SENDER_OK.format() and rcpt == replies.RECIPIENT_OK.format()
    assert data == replies.START_DATA.format()
    assert end_of_data == replies.MESSAGE_TOO_BIG.format()
    assert noop == replies.OK.format()
    assert running.messages("alice@example.org") == []


# -- 9. 1000 concurrent connections -------------------------------------------------------------

# Runs in a subprocess: non-blocking sockets and a selector.  Every connection is greeted before
# any sends EHLO, and every message is accepted before any sends QUIT, so all sessions are open
# at the same time.  Prints one JSON line of counts.
_HERD_SCRIPT = r"""
import errno, json, resource, selectors, socket, sys, time

port, count, limit = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft != resource.RLIM_INFINITY and soft < count + 64:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 64), hard))
SEND = [None, b"EHLO herd.example.test\r\n", b"MAIL FROM:<herd@remote.test>\r\n",
        b"RCPT TO:<alice@example.org>\r\n", b"DATA\r\n",
        b"Subject: herd\r\n\r\nhello from the herd\r\n.\r\n", b"QUIT\r\n"]
EXPECT = [220, 250, 250, 250, 354, 250, 221]
BARRIERS = (1, 6)
started = time.monotonic()
stats = {"greetings": 0, "accepted": 0, "bye": 0, "refusals": 0, "errors": 0, "problems": []}
times = {}
sel = selectors.DefaultSelector()
alive = set()
waiting = {step: set() for step in BARRIERS}


class Conn:
    def __init__(self, sock):
        self.sock, self.step, self.buf = sock, 0, b""


def finish(conn):
    sel.unregister(conn.sock)
    conn.sock.close()
    alive.discard(conn)
    for group in waiting.values():
        group.discard(conn)
    release()


def fail(conn, kind, detail):
    stats[kind] += 1
    if len(stats["problems"]) < 10:
        stats["problems"].append(f"step {conn.step}: {detail}")
    finish(conn)


def send(conn):
    data = SEND[conn.step]
    try:
        sent = conn.sock.send(data)
    except OSError as e:
        return fail(conn, "errors", repr(e))
    if sent != len(data):
        fail(conn, "errors", "short send")


def release():
    for step in BARRIERS:
        group = waiting[step]
        if group and len(group) == len(alive):
            times[f"barrier_{step}"] = round(time.monotonic() - started, 3)
            waiting[step] = set()
            for conn in group:
                send(conn)


def take_reply(conn):
    pos = 0
    while True:
        end = conn.buf.find(b"\r\n", pos)
        if end < 0:
            return None
        line, pos = conn.buf[pos:end], end + 2
        if line[3:4] != b"-":
            reply, conn.buf = conn.buf[:pos], conn.buf[pos:]
            return reply


def handle(conn, reply):
    code = int(reply[:3]) if reply[:3].isdigit() else -1
    if code != EXPECT[conn.step]:
        return fail(conn, "refusals" if 400 <= code < 600 else "errors", repr(reply[:100]))
    if conn.step == 0:
        stats["greetings"] += 1
    elif conn.step == 5:
        stats["accepted"] += 1
    elif conn.step == 6:
        stats["bye"] += 1
        return finish(conn)
    conn.step += 1
    if conn.step in BARRIERS:
        waiting[conn.step].add(conn)
        release()
    else:
        send(conn)


for _ in range(count):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    err = sock.connect_ex(("127.0.0.1", port))
    conn = Conn(sock)
    alive.add(conn)
    sel.register(sock, selectors.EVENT_READ, conn)
    if err not in (0, errno.EINPROGRESS):
        fail(conn, "errors", f"connect: {errno.errorcode.get(err, err)}")
times["connects_issued"] = round(time.monotonic() - started, 3)

deadline = started + limit
while alive and time.monotonic() < deadline:
    for key, _ in sel.select(timeout=1.0):
        conn = key.data
        if conn not in alive:
            continue
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            continue
        except OSError as e:
            fail(conn, "errors", repr(e))
            continue
        if not data:
            fail(conn, "errors", "closed by server")
            continue
        conn.buf += data
        while conn in alive:
            reply = take_reply(conn)
            if reply is None:
                break
            handle(conn, reply)
if alive:
    stats["problems"].append(f"deadline: {len(alive)} connections unfinished")
    stats["errors"] += len(alive)
    for conn in list(alive):
        finish(conn)
times["total"] = round(time.monotonic() - started, 3)
stats["times"] = times
print(json.dumps(stats))
"""

_HERD = 1000


def _run_herd(port: int) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", _HERD_SCRIPT, str(port), str(_HERD), "100"]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest_twisted.ensureDeferred
async def test_1000_concurrent_connections(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if wanted < _HERD + 200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for {_HERD} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        running = await _serve(tmp_path, max_connections=1100)
        try:
            started = time.monotonic()
            done = await run_client(_run_herd, running.port)
            elapsed = time.monotonic() - started
        finally:
            await running.service.stopService()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\n[{_HERD} connections] {elapsed:.2f} s in all; client timings {stats['times']}")
    assert stats["problems"] == []
    assert stats["refusals"] == 0 and stats["errors"] == 0
    assert stats["greetings"] == _HERD
    assert stats["accepted"] == _HERD
    assert stats["bye"] == _HERD
    assert len(running.maildir_files("alice@example.org")) == _HERD
