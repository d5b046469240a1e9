"""An asyncio SMTP load client for the benchmark, run as a separate process by bench.py.

It pipelines nothing: every command waits for its reply, as smtp-source does.  Its reason to
exist is the latency figure smtp-source lacks: the time from handing ``.\\r\\n`` (the end of
DATA) to the kernel to reading the ``250``.  Every mode is bounded by ``--timeout`` seconds and
prints one JSON object on its last line of output.

Modes:

``send``   ``--sessions S --messages M --size L``: S sessions share M messages of L bytes.
           With ``--tokens PREFIX`` every message is unique: message ``n`` carries the token
           ``PREFIX-n`` (zero-padded) in its Message-ID and as its last body line, and the
           result lists the ``n`` of every message answered 250 (``accepted``), so a sink
           downstream can be checked for lost and duplicated messages (workload (f)).
           A ``{n}`` in ``--recipient`` is replaced by ``n``.
``idle``   workload (d): ``--sessions S`` connect at once, each sends one message, all idle
           ``--idle`` seconds (``IDLE`` is printed when every session is idle, so the harness can
           sample the server), then each sends again and quits.
``auth``   workload (e): ``--sessions S`` clients loop STARTTLS + AUTH PLAIN + QUIT for
           ``--duration`` seconds.
``noop``   one client sends NOOP every ``--interval`` seconds for ``--duration`` seconds.
``storm``  workload (e): ``--sessions S`` clients spread over the loopback addresses
           ``--sources FIRST-LAST`` (127.0.0.x only) loop STARTTLS + AUTH PLAIN with wrong
           passwords (for ``--user`` and for made-up names) for ``--duration`` seconds; meanwhile
           an unaffected client from ``--probe-source`` logs in with ``--probe-user`` and
           ``--probe-password`` at each of ``--probe-at`` (seconds into the storm) and the time
           from connect to ``235`` is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import resource
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import Any

try:
    import uvloop
except ImportError:  # pragma: no cover - the bench venv has it
    uvloop = None

READ_TIMEOUT = 60.0


class SMTPReplyError(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code


@dataclass
class Stats:
    ok: int = 0
    failed: int = 0  # a final reply other than 250 to the end of DATA
    connect_failed: int = 0  # refused, reset or timed out before the greeting
    refused: int = 0  # a greeting other than 220 (e.g. 421 too many connections)
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    connect_times: list[float] = field(default_factory=list)  # TCP handshake only
    greeting_times: list[float] = field(default_factory=list)  # connected -> 220
    sessions_done: int = 0
    started_at: float | None = None  # wall clock (epoch) when the first session began
    accepted: list[int] = field(default_factory=list)  # --tokens: messages answered 250

    def error(self, text: str) -> None:
        if len(self.errors) < 10:
            self.errors.append(text)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def make_body(
    size: int, sender: str, recipient: str, token: str = "", message_id: str = "bench"
) -> bytes:
    """A message of exactly ``size`` bytes (CRLF lines, no dot-stuffing needed), plus ``.``.

    A ``token`` becomes the last line of the body (so a copy with it arrived whole).
    """
    head = (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: bench\r\n"
        f"Message-ID: <{message_id}@bench.invalid>\r\n\r\n"
    ).encode()
    last = f"{TOKEN_LINE}{token}\r\n".encode() if token else b""
    line = b"x" * 76 + b"\r\n"
    body = bytearray(head)
    while len(body) + len(line) <= size - 2 - len(last):
        body += line
    filler = size - 2 - len(body) - len(last)
    body += b"y" * max(filler, 0) + b"\r\n" + last
    return bytes(body)


TOKEN_LINE = "bench-token: "  # noqa: S105 (not a secret: a marker line)


def token_for(prefix: str, n: int) -> str:
    """The token of message ``n`` (fixed width, so every message has the same size)."""
    return f"{prefix}-{n:07d}"


class Client:
    """One SMTP connection with reply parsing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int, connect_timeout: float) -> Client:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=1 << 20), connect_timeout
        )
        return cls(reader, writer)

    async def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), READ_TIMEOUT)
            if not raw:
                raise ConnectionError("connection closed by server")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line[4:])
            if len(line) < 4 or line[3] != "-":
                return int(line[:3]), "\n".join(lines)

    async def command(self, text: str, expect: int) -> tuple[int, str]:
        self.writer.write(text.encode() + b"\r\n")
        code, message = await self.reply()
        if code != expect:
            raise SMTPReplyError(code, message)
        return code, message

    async def send_message(self, sender: str, recipient: str, body: bytes) -> tuple[int, float]:
        """MAIL, RCPT, DATA, body; returns the final code and the end-of-DATA latency."""
        await self.command(f"MAIL FROM:<{sender}>", 250)
        await self.command(f"RCPT TO:<{recipient}>", 250)
        await self.command("DATA", 354)
        if len(body) > 64 * 1024:
            self.writer.write(body[: -16 * 1024])
            await self.writer.drain()
            tail = body[-16 * 1024 :] + b".\r\n"
        else:
            tail = body + b".\r\n"
        started = time.perf_counter()
        self.writer.write(tail)
        code, _ = await self.reply()
        return code, time.perf_counter() - started

    async def quit(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.reply(), 5)
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


async def open_session(args: Any, stats: Stats) -> Client | None:
    started = time.perf_counter()
    try:
        client = await Client.connect(args.host, args.port, args.connect_timeout)
        connected = time.perf_counter()
        code, text = await client.reply()
    except (TimeoutError, OSError, ConnectionError) as e:
        stats.connect_failed += 1
        stats.error(f"connect: {type(e).__name__}: {e}")
        return None
    stats.connect_times.append(connected - started)
    stats.greeting_times.append(time.perf_counter() - connected)
    if code != 220:
        stats.refused += 1
        stats.error(f"greeting: {code} {text}")
        client.close()
        return None
    try:
        await client.command(f"EHLO {args.helo}", 250)
    except (TimeoutError, OSError, SMTPReplyError, ConnectionError) as e:
        stats.refused += 1
        stats.error(f"EHLO: {e}")
        client.close()
        return None
    return client


async def one_message(
    client: Client, args: Any, body: bytes, stats: Stats, recipient: str | None = None
) -> bool:
    try:
        code, latency = await client.send_message(args.sender, recipient or args.recipient, body)
    except SMTPReplyError as e:
        stats.failed += 1
        stats.error(f"transaction: {e}")
        return False
    except (TimeoutError, OSError, ConnectionError) as e:
        stats.failed += 1
        stats.error(f"transaction: {type(e).__name__}: {e}")
        return False
    if code == 250:
        stats.ok += 1
        stats.latencies.append(latency)
        return True
    stats.failed += 1
    stats.error(f"end of data: {code}")
    return False


async def mode_send(args: Any, stats: Stats) -> None:
    body = make_body(args.size, args.sender, args.recipient)
    next_message = [0]
    stats.started_at = time.time()

    async def session() -> None:
        client = await open_session(args, stats)
        if client is None:
            return
        while next_message[0] < args.messages:
            n = next_message[0]
            next_message[0] += 1
            recipient = args.recipient.replace("{n}", str(n))
            if args.tokens:
                token = token_for(args.tokens, n)
                message = make_body(args.size, args.sender, recipient, token, token)
            else:
                message = body
            if not await one_message(client, args, message, stats, recipient):
                break
            if args.tokens:
                stats.accepted.append(n)
        await client.quit()
        stats.sessions_done += 1

    await asyncio.gather(*(session() for _ in range(args.sessions)))


async def mode_idle(args: Any, stats: Stats) -> None:
    body = make_body(args.size, args.sender, args.recipient)
    all_idle = asyncio.Event()
    go_again = asyncio.Event()
    arrived = [0]

    def arrive() -> None:
        arrived[0] += 1
        if arrived[0] == args.sessions:
            all_idle.set()

    async def session() -> None:
        client = await open_session(args, stats)
        if client is None:
            arrive()
            return
        ok = await one_message(client, args, body, stats)
        arrive()
        await go_again.wait()
        if ok and await one_message(client, args, body, stats):
            stats.sessions_done += 1
        await client.quit()

    async def conductor() -> None:
        await all_idle.wait()
        print("IDLE", flush=True)
        await asyncio.sleep(args.idle)
        go_again.set()

    await asyncio.gather(conductor(), *(session() for _ in range(args.sessions)))


def client_tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def mode_auth(args: Any, stats: Stats) -> None:
    context = client_tls_context()
    token = base64.b64encode(f"\0{args.user}\0{args.password}".encode()).decode()
    deadline = time.monotonic() + args.duration

    async def storm() -> None:
        while time.monotonic() < deadline:
            client = await open_session(args, stats)
            if client is None:
                await asyncio.sleep(0.1)
                continue
            try:
                await client.command("STARTTLS", 220)
                await client.writer.start_tls(context)
                await client.command(f"EHLO {args.helo}", 250)
                started = time.perf_counter()
                await client.command(f"AUTH PLAIN {token}", 235)
                stats.latencies.append(time.perf_counter() - started)
                stats.ok += 1
            except (TimeoutError, OSError, SMTPReplyError, ConnectionError) as e:
                stats.failed += 1
                stats.error(f"auth: {type(e).__name__}: {e}")
                await asyncio.sleep(0.1)  # no tight loop against a server that refuses
            await client.quit()
            stats.sessions_done += 1

    await asyncio.gather(*(storm() for _ in range(args.sessions)))


async def mode_noop(args: Any, stats: Stats) -> None:
    client = await open_session(args, stats)
    if client is None:
        return
    deadline = time.monotonic() + args.duration
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            await client.command("NOOP", 250)
        except (TimeoutError, OSError, SMTPReplyError, ConnectionError) as e:
            stats.failed += 1
            stats.error(f"noop: {e}")
            break
        stats.latencies.append(time.perf_counter() - started)
        stats.ok += 1
        await asyncio.sleep(args.interval)
    await client.quit()
    stats.sessions_done += 1


def loopback_range(text: str) -> list[str]:
    """``127.0.0.10-127.0.0.109`` -> the addresses; only 127.0.0.0/8 is accepted."""
    import ipaddress

    first, _, last = text.partition("-")
    low, high = ipaddress.IPv4Address(first), ipaddress.IPv4Address(last or first)
    loopback = ipaddress.IPv4Network("127.0.0.0/8")
    if low not in loopback or high not in loopback or high < low:
        raise SystemExit(f"loadgen: --sources must be a range inside 127.0.0.0/8, got {text!r}")
    return [str(ipaddress.IPv4Address(n)) for n in range(int(low), int(high) + 1)]


async def tls_session(args: Any, source: str, context: ssl.SSLContext) -> Client:
    """Connect from ``source``, EHLO, STARTTLS, EHLO; raises on any failure."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(args.host, args.port, local_addr=(source, 0), limit=1 << 20),
        args.connect_timeout,
    )
    client = Client(reader, writer)
    try:
        code, text = await client.reply()
        if code != 220:
            raise SMTPReplyError(code, text)
        await client.command(f"EHLO {args.helo}", 250)
        await client.command("STARTTLS", 220)
        await client.writer.start_tls(context)
        await client.command(f"EHLO {args.helo}", 250)
    except BaseException:
        client.close()
        raise
    return client


async def mode_storm(args: Any, stats: Stats) -> dict[str, Any]:
    context = client_tls_context()
    sources = loopback_range(args.sources)
    deadline = time.monotonic() + args.duration
    replies: dict[str, int] = {}
    attempts = [0]

    def token(n: int) -> str:
        # every other guess is for the real account, the rest for made-up names
        user = (
            args.user if n % 2 == 0 else f"guess{n}-{id(stats) % 997}@{args.user.partition('@')[2]}"
        )
        return base64.b64encode(f"\0{user}\0wrong-{n}".encode()).decode()

    async def attacker(index: int) -> None:
        source = sources[index % len(sources)]
        while time.monotonic() < deadline:
            try:
                client = await tls_session(args, source, context)
            except (TimeoutError, OSError, SMTPReplyError, ConnectionError) as e:
                key = str(e.code) if isinstance(e, SMTPReplyError) else "connect"
                replies[key] = replies.get(key, 0) + 1
                await asyncio.sleep(0.2)
                continue
            try:
                while time.monotonic() < deadline:
                    attempts[0] += 1
                    client.writer.write(f"AUTH PLAIN {token(attempts[0])}\r\n".encode())
                    code, _ = await client.reply()
                    replies[str(code)] = replies.get(str(code), 0) + 1
                    if code == 421:
                        await asyncio.sleep(1.0)  # this address is throttled: try again later
                        break
                    if code == 454:
                        await asyncio.sleep(0.05)  # refused at once: no tight loop
            except (TimeoutError, OSError, ConnectionError) as e:
                replies["closed"] = replies.get("closed", 0) + 1
                stats.error(f"storm: {type(e).__name__}: {e}")
            await client.quit()
            stats.sessions_done += 1

    probes: list[dict[str, Any]] = []

    async def probe(at: float) -> None:
        await asyncio.sleep(at)
        started = time.perf_counter()
        entry: dict[str, Any] = {"at_s": at}
        try:
            client = await tls_session(args, args.probe_source, context)
            before_auth = time.perf_counter()
            secret = f"\0{args.probe_user}\0{args.probe_password}".encode()
            await client.command(f"AUTH PLAIN {base64.b64encode(secret).decode()}", 235)
            done = time.perf_counter()
            entry.update(ok=True, total_ms=_ms(done - started), auth_ms=_ms(done - before_auth))
            await client.quit()
        except (TimeoutError, OSError, SMTPReplyError, ConnectionError) as e:
            entry.update(ok=False, total_ms=_ms(time.perf_counter() - started), error=str(e))
        probes.append(entry)

    await asyncio.gather(
        *(attacker(i) for i in range(args.sessions)),
        *(probe(float(at)) for at in args.probe_at.split(",") if at),
    )
    stats.ok = replies.get("535", 0)
    return {
        "attempts": attempts[0],
        "replies": dict(sorted(replies.items())),
        "addresses": len(sources),
        "probes": sorted(probes, key=lambda p: p["at_s"]),
    }


MODES = {
    "send": mode_send,
    "idle": mode_idle,
    "auth": mode_auth,
    "noop": mode_noop,
    "storm": mode_storm,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--sender", default="bench@client.invalid")
    parser.add_argument("--recipient", default="user@bench.test")
    parser.add_argument("--helo", default="loadgen.bench.invalid")
    parser.add_argument("--idle", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--user", default="")
    parser.add_argument("--password", default="")
    parser.add_argument("--tokens", default="", help="send: a unique token per message")
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    parser.add_argument("--sources", default="127.0.0.1", help="storm: FIRST-LAST in 127/8")
    parser.add_argument("--probe-source", default="127.0.0.250")
    parser.add_argument("--probe-user", default="")
    parser.add_argument("--probe-password", default="")
    parser.add_argument("--probe-at", default="", help="storm: seconds, comma-separated")
    parser.add_argument("--timeout", type=float, default=300.0, help="bound on the whole run")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.sessions * 2 + 64)), hard))
    if uvloop is not None:
        uvloop.install()
    stats = Stats()
    started = time.perf_counter()
    timed_out = False

    extra: dict[str, Any] = {}

    async def run() -> None:
        nonlocal timed_out
        try:
            found = await asyncio.wait_for(MODES[args.mode](args, stats), args.timeout)
        except TimeoutError:
            timed_out = True
        else:
            extra.update(found or {})

    asyncio.run(run())
    elapsed = time.perf_counter() - started
    result = {
        "mode": args.mode,
        "ok": stats.ok,
        "failed": stats.failed,
        "connect_failed": stats.connect_failed,
        "refused": stats.refused,
        "sessions_done": stats.sessions_done,
        "timed_out": timed_out,
        "elapsed": elapsed,
        "rate": stats.ok / elapsed if elapsed > 0 else 0.0,
        "p50_ms": _ms(percentile(stats.latencies, 50)),
        "p99_ms": _ms(percentile(stats.latencies, 99)),
        "max_ms": _ms(max(stats.latencies) if stats.latencies else None),
        "connect_max_ms": _ms(max(stats.connect_times) if stats.connect_times else None),
        # A TCP handshake over 0.9 s on loopback means a SYN was dropped and retried (1 s).
        "slow_connects": sum(1 for t in stats.connect_times if t > 0.9),
        "greeting_max_ms": _ms(max(stats.greeting_times) if stats.greeting_times else None),
        "errors": stats.errors,
        "started_at": stats.started_at,
        "finished_at": time.time(),
        **extra,
    }
    if args.tokens:
        result["accepted"] = sorted(stats.accepted)
    print(json.dumps(result), flush=True)
    sys.exit(0)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


if __name__ == "__main__":
    main()
