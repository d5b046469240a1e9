"""Webhook endpoints changed by a reload: the real sink, dispatcher and sender against real
receivers on 127.0.0.1, time on ``task.Clock`` (the whole SIGHUP path runs in
tests/test_reload_process.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.logger import capturedLogs

from mailsrv.webhook.endpoints import Endpoint
from mailsrv.webhook.entries import EntryState
from mailsrv.webhook.sender import WebhookSender
from mailsrv.webhook.trust import TrustError
from tests.webhook_rig import Answer, Listening, OutboxRig, endpoint, start_receiver


@pytest_twisted.async_yield_fixture
async def receiver() -> AsyncIterator[Listening]:
    listening = start_receiver()
    yield listening
    await listening.stop()


@pytest_twisted.async_yield_fixture
async def rig(tmp_path: Path) -> AsyncIterator[OutboxRig]:
    made = OutboxRig(tmp_path, [])
    made.start()
    yield made
    await made.stop()


def reload(rig: OutboxRig, *endpoints: Endpoint) -> None:
    """What a reload installs for the outbox (mailsrv.webhook.service.Webhooks.reload_step)."""
    rig.sender.renewed(endpoints)()
    rig.sink.reconfigure(endpoints)
    rig.dispatcher.reconfigure(endpoints)
    rig.clock.advance(0)


@pytest_twisted.ensureDeferred
async def test_an_added_endpoint_gets_the_events_of_messages_accepted_after_the_reload(
    receiver: Listening, rig: OutboxRig
) -> None:
    rig.commit()
    assert rig.on_disk() == {}, "no endpoint: no event"
    with capturedLogs() as events:
        reload(rig, endpoint("app", receiver.url("/app")))
    assert any("webhook endpoint {endpoint} added" in e["log_format"] for e in events)
    message = rig.commit()
    await receiver.receiver.arrived(1)
    await rig.settle()
    (seen,) = receiver.receiver.seen
    assert seen.event["data"]["queue_id"] == message.queue_id


@pytest_twisted.ensureDeferred
async def test_a_removed_endpoint_keeps_its_pending_events_until_it_comes_back(
    receiver: Listening, rig: OutboxRig
) -> None:
    app = endpoint("app", receiver.url("/app"))
    reload(rig, app)
    receiver.receiver.script("/app", Answer(500))
    rig.commit()
    await receiver.receiver.arrived(1)
    await rig.settle()
    (pending,) = rig.on_disk().values()
    assert (pending.state, pending.attempts) == (EntryState.PENDING, 1)
    with capturedLogs() as events:
        reload(rig)
    (line,) = [e for e in events if "no longer configured" in e["log_format"]]
    assert (line["endpoint"], line["count"]) == ("app", 1)
    rig.clock.advance(3600)
    rig.commit()  # no endpoint now: no new event
    await rig.settle()
    assert len(receiver.receiver.seen) == 1, "nothing goes to a removed endpoint"
    assert list(rig.on_disk().values()) == [pending], "its event stays, unchanged"
    reload(rig, app)
    await receiver.receiver.arrived(2)
    await rig.settle()
    assert receiver.receiver.seen[1].webhook_id == pending.event_id
    assert rig.on_disk() == {}


@pytest_twisted.ensureDeferred
async def test_an_endpoint_removed_while_its_attempt_runs_keeps_the_outcome(
    receiver: Listening, rig: OutboxRig
) -> None:
    app = endpoint("app", receiver.url("/app"))
    reload(rig, app)
    receiver.receiver.script("/app", Answer(503))
    rig.commit()
    reload(rig)  # the attempt is in flight now
    await receiver.receiver.arrived(1)
    await rig.settle()
    (entry,) = rig.on_disk().values()
    assert (entry.state, entry.attempts, entry.last_status) == (EntryState.PENDING, 1, 503)
    rig.clock.advance(3600)
    await rig.settle()
    assert len(receiver.receiver.seen) == 1, "not retried while the endpoint is gone"
    reload(rig, app)
    await receiver.receiver.arrived(2)
    await rig.settle()
    assert rig.on_disk() == {}


@pytest_twisted.ensureDeferred
async def test_a_changed_endpoint_is_used_for_the_next_attempt(
    receiver: Listening, rig: OutboxRig
) -> None:
    old = endpoint("app", receiver.url("/old"))
    reload(rig, old)
    receiver.receiver.script("/old", Answer(500))
    rig.commit()
    await receiver.receiver.arrived(1, "/old")
    await rig.settle()
    reload(rig, replace(old, url=receiver.url("/new")))
    rig.clock.advance(5)  # the retry falls due
    await receiver.receiver.arrived(1, "/new")
    await rig.settle()
    assert [s.path for s in receiver.receiver.seen] == ["/old", "/new"]
    assert rig.on_disk() == {}


@pytest_twisted.ensureDeferred
async def test_a_new_url_enables_an_endpoint_disabled_by_410(
    receiver: Listening, rig: OutboxRig
) -> None:
    gone = endpoint("app", receiver.url("/gone"))
    reload(rig, gone)
    receiver.receiver.script("/gone", Answer(410))
    rig.commit()
    await rig.settle()
    assert rig.dispatcher.disabled().keys() == {"app"}
    reload(rig, gone)  # the same URL: still disabled
    rig.clock.advance(3600)
    assert rig.dispatcher.disabled().keys() == {"app"}
    reload(rig, replace(gone, url=receiver.url("/new")))
    await receiver.receiver.arrived(1, "/new")
    await rig.settle()
    assert rig.dispatcher.disabled() == {}
    assert rig.on_disk() == {}
    assert not (rig.root / "endpoints" / "app.json").exists()


def test_a_ca_bundle_that_cannot_be_read_is_refused_before_anything_changes(
    tmp_path: Path,
) -> None:
    sender = WebhookSender(task.Clock())
    bad = endpoint("tls", "https://127.0.0.1:9/hook", ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(TrustError, match=r"missing\.pem"):
        sender.renewed([bad])
