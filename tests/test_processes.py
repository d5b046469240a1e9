"""The worker-process pool: real spawned processes, results and failures back in the reactor."""

from __future__ import annotations

import os
import signal
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from mailsrv.processes import ProcessPoolService


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
    with pytest.raises(BrokenProcessPool):
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
