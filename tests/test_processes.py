"""The worker-process pool: real spawned processes, results and failures back in the reactor."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from mailsrv.processes import ProcessPoolService, WorkerExited


def worker_pid() -> int:
    """The process the job ran in."""
    return os.getpid()


def worker_nice() -> int:
    """The CPU priority the job ran at."""
    return os.nice(0)


def refuse(reason: str) -> None:
    """A job that fails."""
    raise ValueError(reason)


def die() -> None:
    """A job whose worker is killed (as by the OOM killer) while it runs it."""
    os.kill(os.getpid(), signal.SIGKILL)


async def wait_then_answer(seconds: float, answer: str) -> str:
    """A coroutine job that waits in the worker's reactor (as a webhook request does)."""
    from twisted.internet import reactor as worker_reactor
    from twisted.internet.task import deferLater

    await deferLater(worker_reactor, seconds, lambda: None)
    return answer


def echo_length(data: bytes) -> tuple[int, bytes]:
    """A job with a big argument and a big result."""
    return len(data), data[::-1]


def unpicklable() -> Any:
    """A job whose result cannot be sent back."""
    return lambda: None


def noisy() -> str:
    """A job that prints: the frames must not be disturbed."""
    print("a library talking on standard output")
    return "still fine"


@pytest.fixture
def pool() -> Any:
    service = ProcessPoolService(reactor, "test-workers", 1, nice=5)
    service.startService()
    yield service
    if service.running:
        pytest_twisted.blockon(service.stopService())


@pytest_twisted.ensureDeferred
async def test_a_job_runs_in_another_process_at_a_lower_priority(pool: ProcessPoolService) -> None:
    pid = await pool.run(worker_pid)
    assert pid != os.getpid()
    assert await pool.run(worker_nice) >= os.nice(0) + 5


@pytest_twisted.ensureDeferred
async def test_a_failing_job_fails_its_deferred_with_the_error(pool: ProcessPoolService) -> None:
    with pytest.raises(ValueError, match="not today"):
        await pool.run(refuse, "not today")
    assert await pool.run(worker_pid) != os.getpid()  # the worker is still there


@pytest_twisted.ensureDeferred
async def test_a_dead_worker_fails_its_job_and_new_workers_take_the_next(
    pool: ProcessPoolService,
) -> None:
    first = await pool.run(worker_pid)
    with pytest.raises(WorkerExited):
        await pool.run(die)
    second = await pool.run(worker_pid)
    assert second not in (first, os.getpid())


@pytest_twisted.ensureDeferred
async def test_stopping_waits_for_the_workers_to_exit(pool: ProcessPoolService) -> None:
    pid = await pool.run(worker_pid)
    await pool.stopService()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(RuntimeError):
        await pool.run(worker_pid)  # after the stop: refused, never hung


@pytest_twisted.ensureDeferred
async def test_coroutine_jobs_wait_in_the_worker_and_finish_in_any_order(
    pool: ProcessPoolService,
) -> None:
    finished: list[str] = []
    slow = pool.run(wait_then_answer, 0.5, "slow").addCallback(finished.append)
    fast = pool.run(wait_then_answer, 0.0, "fast").addCallback(finished.append)
    await slow
    await fast
    assert finished == ["fast", "slow"], "one worker, both in flight at once"


@pytest_twisted.ensureDeferred
async def test_big_arguments_and_results_cross_intact(pool: ProcessPoolService) -> None:
    data = os.urandom(5 * 1024 * 1024 + 3)
    assert await pool.run(echo_length, data) == (len(data), data[::-1])


@pytest_twisted.ensureDeferred
async def test_a_result_that_cannot_be_sent_is_an_error_and_prints_do_no_harm(
    pool: ProcessPoolService,
) -> None:
    with pytest.raises(Exception, match=r"pickle|Can't"):
        await pool.run(unpicklable)
    assert await pool.run(noisy) == "still fine"
    assert await pool.run(worker_pid) != os.getpid()


@pytest_twisted.ensureDeferred
async def test_jobs_spread_over_the_workers() -> None:
    service = ProcessPoolService(reactor, "test-two", 2)
    service.startService()
    try:
        pids = set(
            await defer.gatherResults([service.run(worker_pid_later, 0.3) for _ in range(4)])
        )
        assert len(pids) == 2
    finally:
        await service.stopService()


async def worker_pid_later(seconds: float) -> int:
    """The worker's pid, after a wait (so that jobs overlap)."""
    await wait_then_answer(seconds, "")
    return os.getpid()
