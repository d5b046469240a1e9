"""The message body on the wire: stored (Maildir) form in, SMTP DATA bytes out, from disk.

The canonical stored body has LF line endings and starts with our ``Return-Path`` line.  On
the wire (RFC 5321 section 4.5.2) every line ends in CRLF, a line that starts with ``.`` gets
one more, and the data ends with ``CRLF . CRLF``.  :class:`WireEncoder` does that one chunk at a
time and keeps its state across chunks: whether the next byte starts a line (so a ``.`` right
after a chunk boundary, or on the very first line, is stuffed) and whether the last chunk ended
in a CR (so a CRLF split between two chunks stays one line ending).  Every line ending it finds
(CRLF, bare LF, bare CR) leaves as one CRLF, so nothing stored can end the data early.

:class:`BodySender` sends the header lines it is given first (the DKIM signatures, which are
stored with the queue record, not in the body file that local copies share), then reads the
file in chunks in a thread and writes them as a streaming producer, so a 50 MiB message costs
one chunk of memory and the reactor never blocks on disk.  Opening the file goes with its
first read, and a short read (the end of the file) closes it in the same thread job: a body
that fits in one chunk, the common case, costs one trip to a thread rather than four (open,
read, the empty read at the end, close).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer
from zope.interface import implementer

from mailsrv.threads import RunInThread

_LINE_ENDING = re.compile(rb"\r\n?|\n")
_RETURN_PATH = b"return-path:"

DEFAULT_CHUNK_SIZE = 65536


class TransmissionStopped(Exception):
    """The body was not sent to the end: the connection went away or the sender was stopped."""


class WireEncoder:
    """Stored body bytes -> CRLF, dot-stuffed DATA bytes, chunk by chunk."""

    def __init__(self) -> None:
        self._line_start = True
        self._pending_cr = False

    def encode(self, chunk: bytes) -> bytes:
        """The wire bytes for the next ``chunk`` of the body (may hold back one CR)."""
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            # Is it a bare CR or the first half of a CRLF?  The next chunk tells.
            chunk = chunk[:-1]
            self._pending_cr = True
        if not chunk:
            return b""
        if b"\r" in chunk:
            chunk = _LINE_ENDING.sub(b"\n", chunk)
        stuffed = chunk.replace(b"\n.", b"\n..")
        if self._line_start and stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        self._line_start = stuffed.endswith(b"\n")
        return stuffed.replace(b"\n", b"\r\n")

    def finish(self) -> bytes:
        """The end: a held-back CR as a line end, a CRLF if the last line had none, ``.``."""
        out = b""
        if self._pending_cr:
            self._pending_cr = False
            self._line_start = True
            out = b"\r\n"
        if not self._line_start:
            out += b"\r\n"
        self._line_start = True
        return out + b".\r\n"


class ReturnPathDropper:
    """Drops a leading ``Return-Path:`` header (and its continuation lines), chunk by chunk.

    RFC 5321 section 4.4: Return-Path is added by the final delivery; a relay must not send it.
    """

    def __init__(self) -> None:
        self._head = b""  # bytes kept until we know whether the body starts with Return-Path
        self._state = "start"  # start | dropping | line-end | after | passing

    def feed(self, data: bytes) -> bytes:
        """The part of ``data`` that is not the Return-Path header."""
        while data and self._state != "passing":
            if self._state == "start":
                self._head += data
                data = b""
                if len(self._head) < len(_RETURN_PATH) and b"\n" not in self._head:
                    return b""
                if self._head[: len(_RETURN_PATH)].lower() != _RETURN_PATH:
                    self._state = "passing"
                    return self._head
                data, self._head, self._state = self._head, b"", "dropping"
            elif self._state == "dropping":
                end = min((i for i in (data.find(b"\n"), data.find(b"\r")) if i >= 0), default=-1)
                if end < 0:
                    return b""
                self._state = "line-end" if data[end : end + 1] == b"\r" else "after"
                data = data[end + 1 :]
            elif self._state == "line-end":  # after a CR: swallow the LF of a CRLF
                if data.startswith(b"\n"):
                    data = data[1:]
                self._state = "after"
            else:  # after: a folded continuation line still belongs to the header
                self._state = "dropping" if data[:1] in (b" ", b"\t") else "passing"
        return data

    def finish(self) -> bytes:
        """Whatever was held back at the end of a very short body."""
        head, self._head = (self._head, b"") if self._state == "start" else (b"", b"")
        self._state = "passing"
        return head


def wire_form(stored: bytes, headers: bytes = b"") -> bytes:
    """The whole DATA payload for a stored body with ``headers`` on top (for tests and small
    bodies)."""
    dropper, encoder = ReturnPathDropper(), WireEncoder()
    return (
        encoder.encode(headers)
        + encoder.encode(dropper.feed(stored))
        + encoder.encode(dropper.finish())
        + encoder.finish()
    )


def wire_size(stored: bytes) -> int:
    """The RFC 1870 size of a stored body held in memory: what :func:`wire_form` sends, less
    the doubled dots and the final ``.`` line (the ``SIZE=`` a next hop compares)."""
    dropper = ReturnPathDropper()
    content = dropper.feed(stored) + dropper.finish()
    if b"\r" in content:
        content = _LINE_ENDING.sub(b"\n", content)
    if content and not content.endswith(b"\n"):
        content += b"\n"
    return len(content) + content.count(b"\n")


@implementer(IPushProducer)
class BodySender:
    """Streams a stored body file into ``consumer`` (a transport) as DATA, ``.`` included.

    :meth:`start` fires with the number of bytes written once the final ``.`` line is written.
    It fails if the file cannot be read (the caller must then drop the connection: the data
    cannot be ended cleanly), or with :class:`TransmissionStopped` after :meth:`stop` or when
    the consumer went away.  ``on_progress`` is called after every write, for the caller's
    data-block timer.  ``headers`` (stored form) go first, before the file's content.
    """

    def __init__(
        self,
        path: Path,
        consumer: IConsumer,
        run_in_thread: RunInThread,
        on_progress: Callable[[], None] = lambda: None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        headers: bytes = b"",
    ) -> None:
        self._path = path
        self._headers = headers
        self._consumer = consumer
        self._run = run_in_thread
        self._on_progress = on_progress
        self._chunk_size = chunk_size
        self._file: IO[bytes] | None = None
        self._dropper = ReturnPathDropper()
        self._encoder = WireEncoder()
        self._paused = False
        self._reading = False
        self._finished = False
        self._written = 0
        self._done: Deferred[int] = Deferred()

    def start(self) -> Deferred[int]:
        """Open the file and read its first chunk (in a thread), and start streaming."""
        self._consumer.registerProducer(self, True)
        self._write(self._encoder.encode(self._headers))
        self._reading = True
        self._run(_open_and_read, self._path, self._chunk_size).addCallbacks(
            self._got, self._failed
        )
        return self._done

    def stop(self) -> None:
        """Stop early (the peer answered, or the connection is going away)."""
        self.stopProducing()

    # IPushProducer
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._read_next()

    def stopProducing(self) -> None:
        if not self._finished:
            self._end(TransmissionStopped("body transmission stopped"))

    def _read_next(self) -> None:
        if self._paused or self._reading or self._finished or self._file is None:
            return
        self._reading = True
        self._run(_read, self._file, self._chunk_size).addCallbacks(self._got, self._failed)

    def _got(self, read: tuple[IO[bytes] | None, bytes]) -> None:
        """A chunk has been read; the file is None once the end was reached (and closed)."""
        self._reading = False
        self._file, data = read
        if self._finished:
            self._close()
            return
        if data:
            self._write(self._encoder.encode(self._dropper.feed(data)))
        if self._file is not None:
            self._read_next()
            return
        self._write(self._encoder.encode(self._dropper.finish()) + self._encoder.finish())
        self._end(None)

    def _write(self, data: bytes) -> None:
        if data:
            self._written += len(data)
            self._consumer.write(data)
            self._on_progress()

    def _failed(self, reason: Any) -> None:
        self._reading = False
        if self._finished:
            self._close()
            return
        self._end(reason.value if hasattr(reason, "value") else reason)

    def _end(self, error: BaseException | None) -> None:
        self._finished = True
        self._consumer.unregisterProducer()
        if not self._reading:
            self._close()
        if error is None:
            self._done.callback(self._written)
        else:
            self._done.errback(error)

    def _close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            self._run(file.close).addErrback(lambda _reason: None)


def _open_and_read(path: Path, size: int) -> tuple[IO[bytes] | None, bytes]:
    """Open ``path`` and :func:`_read` its first chunk (one thread job)."""
    file = open(path, "rb")  # closed by _read at the end, else by the sender
    try:
        return _read(file, size)
    except BaseException:
        file.close()
        raise


def _read(file: IO[bytes], size: int) -> tuple[IO[bytes] | None, bytes]:
    """The next chunk of ``file``; the file comes back None, closed, after the last chunk.

    A buffered read returns fewer bytes than asked for only at the end of the file.
    """
    data = file.read(size)
    if len(data) < size:
        file.close()
        return None, data
    return file, data
