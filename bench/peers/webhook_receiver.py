"""The webhook receiver of workload (g): answers every POST ``200`` and notes when it came.

A small HTTP/1.1 server on asyncio streams (uvloop when installed), keep-alive, standard
library only.  Per POST it answers ``200 OK`` with an empty body, keeps the connection open,
and records the arrival time (``time.time()``), the ``webhook-id`` header and, from the JSON
body (mailsrv's event, ``mailsrv/webhook/schema/event-v1.json``), ``type``, ``timestamp`` (when
mailsrv accepted the message: RFC 3339 UTC with milliseconds) and ``data.queue_id``.  The
signature is not checked: the receiver stands for a fast application, and the tests verify the
signatures.

``GET /count`` answers a small JSON object for polling: ``{"count", "ids", "received",
"last"}``; ``GET /stats`` everything: ``count`` (POSTs answered), ``first`` and ``last``
arrival (epoch seconds), ``ids`` (distinct ``webhook-id``), ``duplicates`` (count minus ids),
``types`` (distinct ids per event type), ``received`` (distinct ids of ``message.received``),
``queue_ids`` (distinct queue ids of those), ``bad`` (POSTs whose body was not such an
event), ``lags`` (arrival minus event timestamp, seconds, one per POST in arrival order) and
``dropped_records`` (POSTs counted but not recorded: at most ``--max-records`` are kept),
``connections`` (how many connections carried POSTs) and ``most_open`` (how many of those
were open at once).

Usage: python webhook_receiver.py [--host 127.0.0.1] [--port 0] [--max-records N]
Prints ``LISTENING <port>`` on stdout once it accepts connections; runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from datetime import datetime
from typing import Any

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class BadRequest(Exception):
    pass


class Records:
    """What arrived, bounded: at most ``limit`` records; ids as a set (one string per event)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.ids: set[str] = set()
        self.types: dict[str, set[str]] = {}
        self.queue_ids: set[str] = set()
        self.lags: list[float] = []
        self.bad = 0
        self.dropped = 0
        self.connections = 0  # that carried a POST
        self.open = 0
        self.most_open = 0  # of those, at once

    def add(self, arrived: float, webhook_id: str, body: bytes) -> None:
        self.count += 1
        if self.first is None:
            self.first = arrived
        self.last = arrived
        if len(self.ids) >= self.limit and webhook_id not in self.ids:
            self.dropped += 1
            return
        self.ids.add(webhook_id)
        try:
            event = json.loads(body)
            kind = str(event["type"])
            happened = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
            queue_id = event["data"].get("queue_id")
        except (ValueError, KeyError, TypeError, AttributeError):
            self.bad += 1
            return
        self.types.setdefault(kind, set()).add(webhook_id)
        if kind == "message.received" and isinstance(queue_id, str):
            self.queue_ids.add(queue_id)
        if len(self.lags) < self.limit:
            self.lags.append(round(arrived - happened.timestamp(), 6))

    def counts(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "ids": len(self.ids),
            "received": len(self.types.get("message.received", ())),
            "last": self.last,
        }

    def stats(self) -> dict[str, Any]:
        return {
            **self.counts(),
            "first": self.first,
            "duplicates": self.count - len(self.ids) - self.dropped,
            "types": {kind: len(ids) for kind, ids in sorted(self.types.items())},
            "queue_ids": len(self.queue_ids),
            "bad": self.bad,
            "lags": self.lags,
            "dropped_records": self.dropped,
            "connections": self.connections,
            "most_open": self.most_open,
        }


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts: list[bytes] = []
        size = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            chunk = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if chunk == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(parts)
            size += chunk
            if size > MAX_BODY_BYTES:
                raise BadRequest("body too large")
            parts.append(await reader.readexactly(chunk))
            await reader.readexactly(2)
    length = int(headers.get("content-length", "0") or "0")
    if not 0 <= length <= MAX_BODY_BYTES:
        raise BadRequest("bad Content-Length")
    return await reader.readexactly(length) if length else b""


async def serve(
    records: Records, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    posting = False  # this connection carried a POST (the harness's GETs do not count)
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                raise BadRequest("header too large") from None
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = [*lines[0].split(" "), "", ""][:3]
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            body = await read_body(reader, headers)
            arrived = time.time()
            if method == "POST":
                if not posting:
                    posting = True
                    records.connections += 1
                    records.open += 1
                    records.most_open = max(records.most_open, records.open)
                records.add(arrived, headers.get("webhook-id", ""), body)
                writer.write(OK)
            elif method == "GET" and target in ("/stats", "/count"):
                data = records.stats() if target == "/stats" else records.counts()
                payload = json.dumps(data).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
                )
            else:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            if version == "HTTP/1.0" or headers.get("connection", "").lower() == "close":
                break
    except BadRequest:
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        records.open -= posting
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-records", type=int, default=1_000_000)
    args = parser.parse_args()
    records = Records(args.max_records)
    server = await asyncio.start_server(
        lambda r, w: serve(records, r, w),
        args.host,
        args.port,
        limit=MAX_HEADER_BYTES,
        backlog=1024,
    )
    port = server.sockets[0].getsockname()[1]
    print(f"LISTENING {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
    sys.exit(0)
