"""Webhook attempts made whole in real worker processes: a signed, valid event reaches a real
receiver; whatever goes wrong in the worker (a payload that cannot be built, a receiver that
hangs, a worker killed mid-attempt) comes back as a retry, never as a failure or a hang."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from mailsrv.processes import ProcessPoolService
from mailsrv.webhook.delivery import WorkerDelivery
from mailsrv.webhook.sender import Outcome
from mailsrv.webhook.trust import TrustError
from tests.queue_helpers import BODY
from tests.test_webhook_outbox_store import delivery_entry, message_entry
from tests.webhook_rig import HANG, Listening, check_signed, endpoint, start_receiver


@pytest.fixture
def workers() -> Any:
    pool = ProcessPoolService(reactor, "test-webhook", 1, stop_grace=5.0)
    pool.startService()
    yield pool
    pytest_twisted.blockon(pool.stopService())


@pytest.fixture
def receiver() -> Any:
    listening = start_receiver()
    yield listening
    pytest_twisted.blockon(Deferred.fromCoroutine(listening.stop()))


def delivery_for(workers: ProcessPoolService, tmp_path: Path, grace: float = 30.0) -> Any:
    (tmp_path / "message.eml").write_bytes(BODY)
    return WorkerDelivery(workers.run, lambda key: tmp_path / "message.eml", reactor, grace)


@pytest_twisted.ensureDeferred
async def test_an_attempt_in_a_worker_delivers_a_signed_valid_event(
    workers: ProcessPoolService, receiver: Listening, tmp_path: Path
) -> None:
    delivery = delivery_for(workers, tmp_path)
    hook = endpoint("crm", receiver.url("/hook"))
    entry = message_entry(endpoint="crm")
    result = await delivery.attempt(entry, hook)
    assert (result.outcome, result.status, result.error) == (Outcome.DELIVERED, 200, None)
    (seen,) = receiver.receiver.seen
    event = check_signed(seen)
    assert event["id"] == entry.event_id and event["type"] == "message.received"
    assert event["data"]["queue_id"] == "QID00001"
    relay_outcome = await delivery.attempt(delivery_entry(endpoint="crm"), hook)
    assert relay_outcome.outcome is Outcome.DELIVERED
    assert check_signed(receiver.receiver.seen[1])["type"] == "message.deferred"


@pytest_twisted.ensureDeferred
async def test_a_payload_that_cannot_be_built_is_a_retry(
    workers: ProcessPoolService, receiver: Listening, tmp_path: Path
) -> None:
    delivery = WorkerDelivery(workers.run, lambda key: tmp_path / "gone.eml", reactor)
    entry = message_entry(endpoint="crm", source=replace(message_entry().source, maildir=()))
    result = await delivery.attempt(entry, endpoint("crm", receiver.url("/hook")))
    # An unreadable message degrades the parsed fields, never the event (payload module)...
    assert result.outcome is Outcome.DELIVERED
    assert check_signed(receiver.receiver.seen[0])["data"]["parse_errors"]
    # ... but an entry that no payload can be made of is retried, with the reason.
    broken = replace(entry, source=None)
    result = await delivery.attempt(broken, endpoint("crm", receiver.url("/hook")))
    assert result.outcome is Outcome.RETRY
    assert result.error is not None and result.error.startswith("the payload could not be built")
    assert await workers.run(os.getpid) != os.getpid(), "the worker is still there"


@pytest_twisted.ensureDeferred
async def test_a_receiver_that_hangs_is_a_retry_within_the_timeout(
    workers: ProcessPoolService, receiver: Listening, tmp_path: Path
) -> None:
    receiver.receiver.script("/slow", HANG)
    delivery = delivery_for(workers, tmp_path)
    result = await delivery.attempt(
        message_entry(), endpoint("crm", receiver.url("/slow"), timeout=0.5)
    )
    assert result.outcome is Outcome.RETRY and result.status is None
    assert 0.4 < result.latency < 5


@pytest_twisted.ensureDeferred
async def test_a_worker_killed_mid_attempt_is_a_retry_and_the_next_attempt_works(
    workers: ProcessPoolService, receiver: Listening, tmp_path: Path
) -> None:
    receiver.receiver.script("/slow", HANG)
    delivery = delivery_for(workers, tmp_path)
    hook = endpoint("crm", receiver.url("/slow"), timeout=30)
    attempt = delivery.attempt(message_entry(), hook)
    await receiver.receiver.arrived(1)
    (pid,) = workers.pids
    os.kill(pid, signal.SIGKILL)
    result = await attempt
    assert result.outcome is Outcome.RETRY
    assert result.error is not None and "worker" in result.error
    again = await delivery.attempt(message_entry(), endpoint("crm", receiver.url("/hook")))
    assert again.outcome is Outcome.DELIVERED
    assert workers.pids != [pid]


@pytest_twisted.ensureDeferred
async def test_a_worker_that_does_not_answer_is_given_up_on(
    workers: ProcessPoolService, receiver: Listening, tmp_path: Path
) -> None:
    receiver.receiver.script("/slow", HANG)
    delivery = delivery_for(workers, tmp_path, grace=0.2)
    (tmp_path / "message.eml").write_bytes(BODY)
    await workers.run(os.getpid)  # started
    (pid,) = workers.pids
    os.kill(pid, signal.SIGSTOP)  # alive, but answers nothing
    try:
        hook = endpoint("crm", receiver.url("/hook"), timeout=0.3)
        result = await delivery.attempt(message_entry(), hook)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert (result.outcome, result.error) == (Outcome.RETRY, "the webhook worker did not answer")


def test_a_reload_reads_the_ca_bundles_and_refuses_a_bad_one(
    workers: ProcessPoolService, tmp_path: Path
) -> None:
    delivery = delivery_for(workers, tmp_path)
    bad = tmp_path / "bad-ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(TrustError):
        delivery.renewed([endpoint("crm", "https://127.0.0.1:1/hook", ca_file=str(bad))])
    install = delivery.renewed([endpoint("crm", "https://127.0.0.1:1/hook")])
    install()
    assert delivery._generation == 1
