"""The checks behind ``/readyz``: each answers ``(ok, detail)`` through a Deferred.

A check never blocks the reactor: the disk checks run in the I/O threads, the user-store check
is the store's own asynchronous query.  A check that does not answer within its timeout counts
as failed (the late answer is ignored), so a hung database cannot hang the probe.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from mailsrv.threads import RunInThread

CheckResult = tuple[bool, str]
Check = Callable[[], "Deferred[CheckResult]"]

STORE_TIMEOUT = 5.0  # seconds the user store gets to answer the probe's query


def within(
    clock: IReactorTime, seconds: float, work: Deferred[CheckResult]
) -> Deferred[CheckResult]:
    """``work``'s result, or ``(False, "timed out ...")`` if it takes longer than ``seconds``."""
    answer: Deferred[CheckResult] = Deferred()

    def timed_out() -> None:
        if not answer.called:
            answer.callback((False, f"timed out after {seconds:g} s"))

    timer = clock.callLater(seconds, timed_out)

    def done(result: object) -> None:
        if timer.active():
            timer.cancel()
        if answer.called:
            return
        if isinstance(result, Failure):
            answer.callback((False, _describe(result.value)))
        else:
            answer.callback(result)  # type: ignore[arg-type]

    work.addBoth(done)
    return answer


def _describe(error: BaseException | None) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _failed(failure: Failure) -> CheckResult:
    return False, _describe(failure.value)


def listeners_bound(unbound: Callable[[], Iterable[str]]) -> Check:
    """Every SMTP listener is bound (``unbound`` names the ones that are not)."""

    def check() -> Deferred[CheckResult]:
        missing = sorted(unbound())
        result: CheckResult = (
            (False, "not listening: " + ", ".join(missing)) if missing else (True, "all bound")
        )
        return succeed(result)

    return check


def user_store(query: Callable[[], Deferred[Any]], clock: IReactorTime) -> Check:
    """A store (the user store, the shared queue's database) answers ``query`` (a trivial
    read) within :data:`STORE_TIMEOUT`."""

    def check() -> Deferred[CheckResult]:
        answered = maybeDeferred(query).addCallback(lambda _: (True, "answered"))
        return within(clock, STORE_TIMEOUT, answered)

    return check


def _try_write(directory: str) -> CheckResult:
    fd, path = tempfile.mkstemp(prefix=".readyz-", dir=directory)
    try:
        os.write(fd, b"ok")
    finally:
        os.close(fd)
        os.unlink(path)
    return True, "writable"


def data_dir_writable(run_in_thread: RunInThread, directory: str) -> Check:
    """A file can be created (and removed) in ``directory``."""

    def check() -> Deferred[CheckResult]:
        done: Deferred[CheckResult] = run_in_thread(_try_write, directory)
        return done.addErrback(_failed)

    return check


def _free_space(directory: str, minimum: int) -> CheckResult:
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    if free < minimum:
        return False, f"{free} bytes free, below the minimum of {minimum}"
    return True, f"{free} bytes free"


def free_space(run_in_thread: RunInThread, directory: str, minimum: int) -> Check:
    """``directory``'s file system has at least ``minimum`` bytes free for unprivileged use."""

    def check() -> Deferred[CheckResult]:
        done: Deferred[CheckResult] = run_in_thread(_free_space, directory, minimum)
        return done.addErrback(_failed)

    return check
