"""The durable Python peer: aiosmtpd with a Maildir handler that fsyncs before the 250.

Every message is written to ``<maildir>/tmp/<unique>``, fsync'd, renamed into ``new/``, and
``new/`` is fsync'd, all before the handler returns ``250``.  The blocking disk work runs in a
thread pool of the same size as mailsrv's default I/O pool (16), so concurrent sessions' fsyncs
overlap as they do in mailsrv: a fair comparison, not a strawman that blocks its event loop.

Usage: python aiosmtpd_maildir.py --port PORT --maildir DIR [--host 127.0.0.1]
Runs until SIGTERM/SIGINT.  Every recipient's message lands in the one Maildir (enough for a
benchmark whose recipients are all one mailbox).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from aiosmtpd.smtp import SMTP, Envelope, Session

_counter = itertools.count(1)
_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072")


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MaildirHandler:
    def __init__(self, maildir: str, threads: int) -> None:
        self.maildir = maildir
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(maildir, sub), exist_ok=True)
        fsync_directory(maildir)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="maildir")

    def _store(self, content: bytes) -> str:
        now = time.time()
        name = f"{int(now)}.M{int((now % 1) * 1e6)}P{os.getpid()}Q{next(_counter)}.{_HOST}"
        tmp = os.path.join(self.maildir, "tmp", name)
        new = os.path.join(self.maildir, "new", name)
        with open(tmp, "xb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, new)
        fsync_directory(os.path.join(self.maildir, "new"))
        return name

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or envelope.content
        assert isinstance(content, bytes)
        loop = asyncio.get_running_loop()
        try:
            name = await loop.run_in_executor(self.pool, self._store, content)
        except OSError:
            return "451 4.3.0 Local error storing message"
        return f"250 2.0.0 OK: queued as {name}"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--maildir", required=True)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--max-size", type=int, default=64 * 1024 * 1024)
    args = parser.parse_args()
    handler = MaildirHandler(args.maildir, args.threads)
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return SMTP(
            handler,
            hostname="aiosmtpd.bench.invalid",
            data_size_limit=args.max_size,
            decode_data=False,
            enable_SMTPUTF8=True,
        )

    # Same listen backlog as mailsrv's default (1024), so workload (d) compares servers, not
    # the asyncio default of 100.
    server = await loop.create_server(factory, args.host, args.port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"aiosmtpd-maildir listening on {args.host}:{args.port}", flush=True)
    await stop.wait()
    server.close()
    handler.pool.shutdown(wait=True)


if __name__ == "__main__":
    asyncio.run(main())
