"""The body on the wire: CRLF only, dot-stuffing at every byte position, Return-Path dropped."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport

from mailsrv.relay.body import (
    BodySender,
    ReturnPathDropper,
    TransmissionStopped,
    WireEncoder,
    wire_form,
)

TRACE = b"Return-Path: <a@example.org>\nReceived: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\n"


def unstuff(wire: bytes) -> bytes:
    """What a receiving MTA stores (LF form): the inverse of the encoder, checked strictly."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    content = wire[: -len(b".\r\n")]
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", content) is None, "bare CR or LF on the wire"
    lines = content.split(b"\r\n")[:-1] if content else []
    for line in lines:
        assert line != b".", "a lone dot would end the data early"
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\n" for line in lines)


def expected(stored: bytes) -> bytes:
    """The stored body as the next hop should store it: no Return-Path, LF endings, final LF."""
    body = stored.split(b"\n", 1)[1] if stored.lower().startswith(b"return-path:") else stored
    body = re.sub(rb"\r\n?|\n", b"\n", body)
    return body if not body or body.endswith(b"\n") else body + b"\n"


def encode_in_chunks(stored: bytes, size: int) -> bytes:
    dropper, encoder = ReturnPathDropper(), WireEncoder()
    out = [encoder.encode(dropper.feed(stored[i : i + size])) for i in range(0, len(stored), size)]
    return b"".join(out) + encoder.encode(dropper.finish()) + encoder.finish()


# stored body (after the trace headers), exact wire form
EXACT = [
    (b"", b".\r\n"),
    (b"a\n", b"a\r\n.\r\n"),
    (b"a", b"a\r\n.\r\n"),
    (b".\n", b"..\r\n.\r\n"),
    (b".", b"..\r\n.\r\n"),
    (b"..\n", b"...\r\n.\r\n"),
    (b"a\n.\nb\n", b"a\r\n..\r\nb\r\n.\r\n"),
    (b"a\n.b\n", b"a\r\n..b\r\n.\r\n"),
    (b"a.\nb\n", b"a.\r\nb\r\n.\r\n"),
    (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),  # a stored CRLF is one line ending, not \r\r\n
    (b"a\rb\n", b"a\r\nb\r\n.\r\n"),  # bare CR
    (b"a\r.\r", b"a\r\n..\r\n.\r\n"),
    (b"a\n\n.\n", b"a\r\n\r\n..\r\n.\r\n"),
    (b"\n.\n", b"\r\n..\r\n.\r\n"),
]


@pytest.mark.parametrize(("stored", "wire"), EXACT)
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 65536])
def test_exact_wire_form(stored: bytes, wire: bytes, chunk: int) -> None:
    assert encode_in_chunks(stored, chunk) == wire


def test_return_path_and_only_it_is_dropped() -> None:
    assert wire_form(TRACE + b"Subject: x\n\nbody\n") == (
        b"Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
    )
    folded = b"Return-Path:\n <a@example.org>\nSubject: x\n\nb\n"
    assert wire_form(folded) == b"Subject: x\r\n\r\nb\r\n.\r\n"
    assert wire_form(b"Return-Path: <a@b>\r\nSubject: x\r\n") == b"Subject: x\r\n.\r\n"
    assert wire_form(b"Subject: Return-Path: x\n") == b"Subject: Return-Path: x\r\n.\r\n"
    assert wire_form(b"Return") == b"Return\r\n.\r\n"


@pytest.mark.parametrize("boundary", [16384, 65536])
@pytest.mark.parametrize("offset", [-2, -1, 0, 1, 2])
def test_dot_at_every_chunk_boundary(boundary: int, offset: int) -> None:
    """Lines of 'x' so that a '.' line starts at (boundary * n + offset) for every n."""
    body = bytearray(TRACE)
    for n in range(1, 6):
        target = boundary * n + offset
        filler = target - len(body) - 1
        body += b"x" * filler + b"\n" + b".\n" + b".stuffed line\n"
    stored = bytes(body)
    for n in range(1, 6):
        assert stored[boundary * n + offset : boundary * n + offset + 2] == b".\n"
    for chunk in (boundary, boundary + 1, boundary - 1, 4096):
        wire = encode_in_chunks(stored, chunk)
        assert unstuff(wire) == expected(stored)


def test_random_bodies_round_trip_in_random_chunks() -> None:
    rng = random.Random(5321)
    alphabet = [b".", b"\n", b"\r", b"\r\n", b"a", b"..", b" ", b"\n.\n"]
    for _ in range(400):
        stored = TRACE + b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        wire = encode_in_chunks(stored, rng.choice([1, 2, 3, 5, 8, 13, 100]))
        assert wire == wire_form(stored)  # the chunking never matters
        assert unstuff(wire) == expected(stored)


def _sender_output(path: Path, chunk_size: int) -> tuple[object, StringTransport, list[int]]:
    transport = StringTransport()
    progress: list[int] = []
    sender = BodySender(
        path, transport, threads.deferToThread, lambda: progress.append(1), chunk_size=chunk_size
    )
    return sender.start(), transport, progress


@pytest_twisted.ensureDeferred
async def test_sender_streams_a_file_through_a_producer(tmp_path: Path) -> None:
    path = tmp_path / "body"
    stored = TRACE + b"Subject: big\n\n" + (b"line\n.\n" * 40000)
    path.write_bytes(stored)
    done, transport, progress = _sender_output(path, 16384)
    assert transport.producer is not None and transport.streaming
    written = await done
    assert transport.value() == wire_form(stored)
    assert written == len(transport.value())
    assert transport.producer is None  # unregistered at the end
    assert len(progress) >= len(stored) // 16384


SIGNATURE = b"DKIM-Signature: v=1; a=ed25519-sha256; d=example.org;\n b=AAAA\n BBBB==\n"


@pytest.mark.parametrize("first", [b"Subject: x\n", b".dot\n", TRACE])
@pytest_twisted.ensureDeferred
async def test_headers_go_first_above_the_body_without_return_path(
    tmp_path: Path, first: bytes
) -> None:
    path = tmp_path / "body"
    stored = first + b"From: a@example.org\n\n.body\n"
    path.write_bytes(stored)
    transport = StringTransport()
    sender = BodySender(path, transport, threads.deferToThread, headers=SIGNATURE)
    written = await sender.start()
    wire = transport.value()
    assert wire == wire_form(stored, SIGNATURE)
    assert written == len(wire)
    assert unstuff(wire) == SIGNATURE + expected(stored)
    assert wire.startswith(b"DKIM-Signature: v=1;")
    assert b"Return-Path" not in wire


@pytest_twisted.ensureDeferred
async def test_sender_waits_while_paused(tmp_path: Path) -> None:
    from twisted.internet import reactor, task

    path = tmp_path / "body"
    path.write_bytes(TRACE + b"x\n" * 100000)
    transport = StringTransport()
    sender = BodySender(path, transport, threads.deferToThread, chunk_size=1000)
    done = sender.start()
    sender.pauseProducing()
    await task.deferLater(reactor, 0.05, lambda: None)
    size = len(transport.value())
    assert size <= 2 * 1000 + len(TRACE)  # at most the read in flight when paused
    await task.deferLater(reactor, 0.05, lambda: None)
    assert len(transport.value()) == size
    sender.resumeProducing()
    await done
    assert transport.value().endswith(b"x\r\n.\r\n")


@pytest_twisted.ensureDeferred
async def test_missing_file_fails_without_writing(tmp_path: Path) -> None:
    done, transport, _progress = _sender_output(tmp_path / "gone", 1000)
    with pytest.raises(FileNotFoundError):
        await done
    assert transport.value() == b""
    assert transport.producer is None


@pytest_twisted.ensureDeferred
async def test_stop_fails_the_transmission(tmp_path: Path) -> None:
    path = tmp_path / "body"
    path.write_bytes(TRACE + b"x\n" * 100000)
    transport = StringTransport()
    sender = BodySender(path, transport, threads.deferToThread, chunk_size=100)
    done = sender.start()
    sender.stop()
    with pytest.raises(TransmissionStopped):
        await done
    assert not transport.value().endswith(b".\r\n")


class CountingThreads:
    """Runs jobs in the reactor's thread pool; keeps each job's name and Deferred."""

    def __init__(self) -> None:
        self.jobs: list[str] = []
        self.deferreds: list[Deferred[Any]] = []

    def __call__(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.jobs.append(getattr(f, "__name__", repr(f)))
        d: Deferred[Any] = threads.deferToThread(f, *args, **kwargs)
        self.deferreds.append(d)
        return d


@pytest.mark.parametrize(
    ("size", "chunk", "jobs"),
    [
        (0, 1000, 1),  # empty: open, the short read, close in one job
        (999, 1000, 1),  # less than a chunk: one job
        (1000, 1000, 2),  # exactly a chunk: the empty read at the end is a second job
        (2500, 1000, 3),  # three chunks, the last one short
        (3000, 1000, 4),
    ],
)
@pytest_twisted.ensureDeferred
async def test_thread_jobs_per_body(tmp_path: Path, size: int, chunk: int, jobs: int) -> None:
    path = tmp_path / "body"
    stored = (b"line of text\n" * (size // 13 + 1))[:size]
    path.write_bytes(stored)
    run = CountingThreads()
    transport = StringTransport()
    written = await BodySender(path, transport, run, chunk_size=chunk).start()
    assert transport.value() == wire_form(stored)
    assert written == len(transport.value())
    assert len(run.jobs) == jobs  # the file is closed in the job that found its end
    assert "close" not in run.jobs


@pytest_twisted.ensureDeferred
async def test_stop_while_reading_closes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "body"
    path.write_bytes(TRACE + b"x\n" * 100000)
    run = CountingThreads()
    transport = StringTransport()
    sender = BodySender(path, transport, run, chunk_size=100)
    done = sender.start()
    sender.stop()  # the first read is still in its thread
    with pytest.raises(TransmissionStopped):
        await done
    await run.deferreds[0]  # the read comes back after the stop: the sender closes the file
    assert run.jobs == ["_open_and_read", "close"]
    await run.deferreds[1]
