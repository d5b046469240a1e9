"""The webhook dispatcher end to end in one process: messages committed through the real sinks,
events sent by the real sender to real twisted.web receivers (HTTP and HTTPS) on 127.0.0.1,
retries driven by ``task.Clock``; outcomes checked on disk, in the receiver and in the log."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import capturedLogs

from mailsrv.jsonstore.spares import SPARE_DIR
from mailsrv.webhook.actions import OutboxActions
from mailsrv.webhook.entries import EntryState
from tests.webhook_rig import (
    CA,
    HANG,
    Answer,
    Listening,
    OutboxRig,
    check_signed,
    endpoint,
    start_receiver,
)

ALICE = "alice@example.org"


@pytest_twisted.async_yield_fixture
async def receivers() -> AsyncIterator[list[Listening]]:
    made: list[Listening] = []
    yield made
    for listening in made:
        await listening.stop()


@pytest.fixture
def receiver(receivers: list[Listening]) -> Listening:
    listening = start_receiver()
    receivers.append(listening)
    return listening


@pytest_twisted.async_yield_fixture
async def rigs(tmp_path: Path) -> AsyncIterator[Callable[..., OutboxRig]]:
    made: list[OutboxRig] = []

    def make(*endpoints: Any) -> OutboxRig:
        rig = OutboxRig(tmp_path, list(endpoints))
        rig.start()
        made.append(rig)
        return rig

    yield make
    for rig in made:
        await rig.stop()


def is_file(path: str) -> bool:
    return os.path.isfile(path)


def actions(rig: OutboxRig) -> OutboxActions:
    return OutboxActions(rig.store, rig.states, rig.endpoints, rig.clock, rig.dispatcher)


# --- delivery --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_accepted_message_is_delivered_signed_valid_and_done(
    receiver: Listening, rigs: Callable[..., OutboxRig]
) -> None:
    rig = rigs(endpoint("app", receiver.url("/hook")))
    message = rig.commit(local=(ALICE,))
    await receiver.receiver.arrived(1)
    await rig.settle()
    (seen,) = receiver.receiver.seen
    event = check_signed(seen)
    assert event["type"] == "message.received"
    data = event["data"]
    assert data["queue_id"] == message.queue_id
    assert [r["address"] for r in data["envelope"]["rcpt_to"]] == [ALICE]
    assert data["headers"]["subject"] == "hello 1"
    (stored,) = data["storage"]["maildir"]
    assert stored["mailbox"] == ALICE and is_file(stored["path"])
    (entry,) = rig.entries().values()
    assert (entry.state, entry.attempts, entry.last_status) == (EntryState.DONE, 1, 200)
    assert entry.event_id == seen.webhook_id
    assert rig.on_disk() == {}
    assert not rig.store.body_path(entry.key).exists(), "its message link went with it"


@pytest_twisted.ensureDeferred
async def test_each_endpoint_gets_the_event_types_it_asked_for(
    receiver: Listening, rigs: Callable[..., OutboxRig]
) -> None:
    rig = rigs(
        endpoint("all", receiver.url("/all")),
        endpoint("relay-only", receiver.url("/relay"), events=frozenset({"message.queued"})),
    )
    rig.commit(local=(ALICE,), remote=("bob@remote.test",))
    await receiver.receiver.arrived(3)
    await rig.settle()
    got = sorted((s.path, s.event["type"]) for s in receiver.receiver.seen)
    assert got == [
        ("/all", "message.queued"),
        ("/all", "message.received"),
        ("/relay", "message.queued"),
    ]
    queued = {s.event["id"] for s in receiver.receiver.seen if s.event["type"] == "message.queued"}
    assert len(queued) == 1, "one event, one id, for every endpoint"
    for seen in receiver.receiver.seen:
        event = check_signed(seen)
        routes = {r["route"] for r in event["data"]["envelope"]["rcpt_to"]}
        assert routes == ({"local"} if event["type"] == "message.received" else {"remote"})


@pytest_twisted.ensureDeferred
async def test_https_receiver_verified_against_the_endpoint_ca_bundle(
    tmp_path: Path, receivers: list[Listening], rigs: Callable[..., OutboxRig]
) -> None:
    ca = CA(tmp_path / "ca")
    secure = start_receiver(ca.server_tls())
    receivers.append(secure)
    rig = rigs(endpoint("tls", secure.url("/hook"), ca_file=ca.ca_file))
    rig.commit()
    await secure.receiver.arrived(1)
    await rig.settle()
    check_signed(secure.receiver.seen[0])
    assert [e.state for e in rig.entries().values()] == [EntryState.DONE]


@pytest_twisted.ensureDeferred
async def test_https_receiver_with_an_unknown_ca_is_retried_not_delivered(
    tmp_path: Path, receivers: list[Listening], rigs: Callable[..., OutboxRig]
) -> None:
    secure = start_receiver(CA(tmp_path / "ca").server_tls())
    receivers.append(secure)
    other_ca = CA(tmp_path / "other").ca_file
    rig = rigs(endpoint("tls", secure.url("/hook"), ca_file=other_ca))
    rig.commit()
    await rig.settle()
    (entry,) = rig.entries().values()
    assert (entry.state, entry.attempts, entry.last_status) == (EntryState.PENDING, 1, None)
    assert entry.last_error and "certificate verify failed" in entry.last_error
    assert secure.receiver.seen == []


# --- retries ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_500_then_200_is_retried_on_schedule_with_the_same_id_and_body(
    receiver: Listening, rigs: Callable[..., OutboxRig]
) -> None:
    receiver.receiver.script("/hook", Answer(500))
    rig = rigs(endpoint("app", receiver.url("/hook")))
    with capturedLogs() as events:
        rig.commit()
        await rig.settle()
        (entry,) = rig.entries().values()
        assert (entry.state, entry.attempts, entry.last_status) == (EntryState.PENDING, 1, 500)
        assert entry.last_error == "HTTP 500: receiver says no"
        assert entry.next_attempt == pytest.approx(rig.clock.seconds() + 5.0)
        rig.clock.advance(4.9)
        assert rig.dispatcher.in_flight == 0 and len(receiver.receiver.seen) == 1
        rig.clock.advance(0.1)
        await receiver.receiver.arrived(2)
        await rig.settle()
    first, second = receiver.receiver.seen
    assert first.webhook_id == second.webhook_id
    assert first.body == second.body
    check_signed(second)
    (entry,) = rig.entries().values()
    assert (entry.state, entry.attempts, entry.last_status) == (EntryState.DONE, 2, 200)
    lines = [e for e in events if e.get("event_id") == entry.event_id and "verdict" in e]
    assert [(e["status"], e["endpoint"]) for e in lines] == [(500, "app"), (200, "app")]
    assert lines[0]["verdict"].startswith("attempt 1 of 4 failed, next at ")
    assert lines[1]["verdict"] == "delivered"
    assert all(isinstance(e["latency"], float) for e in lines)


@pytest_twisted.ensureDeferred
async def test_receiver_down_then_up(receiver: Listening, rigs: Callable[..., OutboxRig]) -> None:
    await receiver.stop()
    rig = rigs(endpoint("app", receiver.url("/hook")))
    rig.commit()
    await rig.settle()
    (entry,) = rig.entries().values()
    assert (entry.state, entry.last_status, entry.last_error) == (
        EntryState.PENDING,
        None,
        "connection refused",
    )
    receiver.start()  # same port
    rig.clock.advance(5)
    await receiver.receiver.arrived(1)
    await rig.settle()
    check_signed(receiver.receiver.seen[0])
    assert [e.state for e in rig.entries().values()] == [EntryState.DONE]


@pytest_twisted.ensureDeferred
async def test_429_waits_for_its_retry_after(
    receiver: Listening, rigs: Callable[..., OutboxRig]
) -> None:
    receiver.receiver.script("/hook", Answer(429, (("Retry-After", "120"),)))
    rig = rigs(endpoint("app", receiver.url("/hook")))
    rig.commit()
    await rig.settle()
    (entry,) = rig.entries().values()
    assert entry.next_attempt == pytest.approx(rig.clock.seconds() + 120)  # not the 5 s step
    rig.clock.advance(60)
    assert rig.dispatcher.in_flight == 0 and len(receiver.receiver.seen) == 1
    rig.clock.advance(60)
    await receiver.receiver.arrived(2)
    await rig.settle()
    assert [e.state for e in rig.entries().values()] == [EntryState.DONE]


@pytest_twisted.ensureDeferred
async def test_the_schedule_running_out_dead_letters_the_event(
    receiver: Listening, rigs: Callable[..., OutboxRig]
) -> None:
    receiver.receiver.script("/hook", *[Answer(503)] * 4)
    rig = rigs(endpoint("app", receiver.url("/hook")))
    rig.commit()
    for step in (0, 5, 60, 600):  # FAST: 4 attempts
        rig.clock.advance(step)
        await rig.settle()
    (entry,) = rig.entries().values()
    assert (entry.state, entry.attempts, entry.last_status) == (EntryState.DEAD, 4, 503)
    assert entry.finished_at == rig.clock.seconds()
    rig.clock.advance(10_000)
    assert len(receiver.receiver.seen) == 4


@pytest_twisted.ensureDeferred
async def test_400_dead_letter_then_redrive_then_delivered(
    receiver: Listening, rigs: Callable[..., OutboxRig]
) -> None:
    receiver.receiver.script("/hook", Answer(400))
    rig = rigs(endpoint("app", receiver.url("/hook")))
    with capturedLogs() as events:
        rig.commit()
        await rig.settle()
    (entry,) = rig.entries().values()
    assert (entry.state, entry.attempts, entry.last_status) == (EntryState.DEAD, 1, 400)
    assert any(e.get("verdict") == "dead-lettered" for e in events)
    rig.clock.advance(3600)
    assert len(receiver.receiver.seen) == 1, "a dead letter is not retried"

    outcome = await actions(rig).redrive(entry.event_id, None)
    assert outcome == "1 dead-lettered event(s) redriven"
    rig.clock.advance(0)
    await receiver.receiver.arrived(2)
    await rig.settle()
    first, second = receiver.receiver.seen
    assert first.webhook_id == second.webhook_id
    check_signed(second, now=rig.clock.seconds())
    (entry,) = rig.entries().values()
    assert (entry.state, entry.attempts) == (EntryState.DONE, 1)


@pytest_twisted.ensureDeferred
async def test_redrive_by_endpoint_and_all_and_bad_ids(
    receiver: Listening, rigs: Callable[..., OutboxRig]
) -> None:
    receiver.receiver.script("/a", Answer(404), Answer(404))
    receiver.receiver.script("/b", Answer(422))
    rig = rigs(endpoint("a", receiver.url("/a")), endpoint("b", receiver.url("/b")))
    rig.commit()
    rig.commit()
    await rig.settle()
    assert sorted(e.state.value for e in rig.entries().values()) == ["dead", "dead", "dead", "done"]
    assert await actions(rig).redrive(None, "a") == "2 dead-lettered event(s) redriven"
    rig.clock.advance(0)
    await receiver.receiver.arrived(3, "/a")
    await rig.settle()
    assert await actions(rig).redrive(None, None) == "1 dead-lettered event(s) redriven"
    rig.clock.advance(0)
    await receiver.receiver.arrived(3, "/b")
    await rig.settle()
    assert {e.state for e in rig.entries().values()} == {EntryState.DONE}
    assert await actions(rig).redrive(None, None) == "0 dead-lettered event(s) redriven"
    done = next(iter(rig.entries().values()))
    assert await actions(rig).redrive(done.key, None) == (
        f"{done.key}: nothing to redrive (done, not dead-lettered)"
    )
    from mailsrv.webhook.outbox_store import NoSuchEntry, OutboxError

    for bad, error in [
        ("evt_" + "0" * 32, NoSuchEntry),
        ("evt_" + "0" * 32 + ".a", NoSuchEntry),
        ("nope", OutboxError),
    ]:
        with pytest.raises(error):
            await actions(rig).redrive(bad, None)
    with pytest.raises(OutboxError, match="no such webhook endpoint zzz"):
        await actions(rig).redrive(None, "zzz")


# --- 410 -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_410_disables_the_endpoint_across_a_restart_until_redrive(
    receiver: Listening, rigs: Callable[..., OutboxRig]
) -> None:
    receiver.receiver.script("/gone", Answer(410))
    rig = rigs(endpoint("gone", receiver.url("/gone")), endpoint("ok", receiver.url("/ok")))
    with capturedLogs() as events:
        rig.commit()
        await rig.settle()
        rig.commit()
        await rig.settle()
        rig.clock.advance(3600)
    assert len(receiver.receiver.at("/gone")) == 1, "nothing more goes to a disabled endpoint"
    assert len(receiver.receiver.at("/ok")) == 2, "the other endpoint is not affected"
    assert any("answered 410 Gone: disabled" in e["log_format"] for e in events)
    pending = [e for e in rig.entries().values() if e.endpoint == "gone"]
    assert {e.state for e in pending} == {EntryState.PENDING}, "its events are kept"
    assert (rig.root / "endpoints" / "gone.json").is_file()

    await rig.stop()
    rig.start()
    rig.clock.advance(3600)
    assert rig.dispatcher.disabled().keys() == {"gone"}
    assert len(receiver.receiver.at("/gone")) == 1, "still disabled after the restart"

    outcome = await actions(rig).redrive(None, "gone")
    assert outcome == "0 dead-lettered event(s) redriven; endpoint(s) enabled again: gone"
    rig.clock.advance(0)
    await receiver.receiver.arrived(3, "/gone")
    await rig.settle()
    assert not (rig.root / "endpoints" / "gone.json").exists()
    assert {e.state for e in rig.entries().values()} == {EntryState.DONE}
    ids = [s.webhook_id for s in receiver.receiver.at("/gone")]
    assert ids[0] in ids[1:], "the event that got the 410 is sent again, same id"


@pytest_twisted.ensureDeferred
async def test_a_new_url_enables_a_disabled_endpoint(
    receiver: Listening, rigs: Callable[..., OutboxRig]
) -> None:
    receiver.receiver.script("/old", Answer(410))
    gone = endpoint("app", receiver.url("/old"))
    rig = rigs(gone)
    rig.commit()
    await rig.settle()
    assert rig.dispatcher.disabled().keys() == {"app"}
    await rig.stop()
    rig.start([replace(gone, url=receiver.url("/new"))])
    await receiver.receiver.arrived(1, "/new")
    await rig.settle()
    assert rig.dispatcher.disabled() == {}
    assert [e.state for e in rig.entries().values()] == [EntryState.DONE]


# --- isolation -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_endpoint_that_never_answers_holds_only_its_own_lane(
    receiver: Listening, rigs: Callable[..., OutboxRig]
) -> None:
    receiver.receiver.script("/slow", *[HANG] * 10)
    rig = rigs(
        endpoint("slow", receiver.url("/slow"), concurrency=2, timeout=30.0),
        endpoint("fast", receiver.url("/fast")),
    )
    for _ in range(5):
        rig.commit()
    await receiver.receiver.arrived(5, "/fast")
    await rig.dispatcher.settled("fast")
    await receiver.receiver.arrived(2, "/slow")
    assert len(receiver.receiver.at("/slow")) == 2, "at most its concurrency in flight"
    assert len(receiver.receiver.hanging) == 2
    by_endpoint = {(e.endpoint, e.state) for e in rig.dispatcher.pending.values()}
    assert by_endpoint == {("slow", EntryState.PENDING)}
    rig.clock.advance(30)  # the whole-request timeout of the two in flight
    await receiver.receiver.arrived(4, "/slow")  # the next two take their places
    slow = [e for e in rig.entries().values() if e.endpoint == "slow" and e.attempts]
    assert [e.last_error for e in slow] == ["no response within 30 s"] * 2
    fast = [e for e in rig.entries().values() if e.endpoint == "fast"]
    assert {e.state for e in fast} == {EntryState.DONE}


# --- restart ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pending_events_survive_a_restart_with_their_id_and_body(
    receiver: Listening, rigs: Callable[..., OutboxRig]
) -> None:
    receiver.receiver.script("/hook", Answer(503))
    rig = rigs(endpoint("app", receiver.url("/hook")))
    rig.commit()
    await rig.settle()
    await rig.stop()
    (before,) = rig.entries().values()
    assert rig.store.body_path(before.key).exists()
    rig.start()
    rig.clock.advance(5)
    await receiver.receiver.arrived(2)
    await rig.settle()
    first, second = receiver.receiver.seen
    assert (first.webhook_id, first.body) == (second.webhook_id, second.body)
    assert [e.state for e in rig.entries().values()] == [EntryState.DONE]


@pytest_twisted.ensureDeferred
async def test_done_entries_leave_the_disk_and_the_newest_are_remembered(
    receiver: Listening, rigs: Callable[..., OutboxRig]
) -> None:
    rig = rigs(endpoint("app", receiver.url("/hook")))
    await rig.stop()
    rig.start(done_kept=3)
    for _ in range(5):
        rig.commit()
        await rig.settle()
        rig.clock.advance(1)
    assert rig.on_disk() == {}
    assert sorted(set(os.listdir(rig.root)) - {SPARE_DIR}) == ["endpoints"], "no entry, no link"
    kept = rig.dispatcher.delivered()
    assert [s.webhook_id for s in receiver.receiver.seen][-3:] == [e.event_id for e in kept]
    shown = await actions(rig).show(kept[-1].event_id)
    assert [(e.state, e.last_status) for e in shown] == [(EntryState.DONE, 200)]


@pytest_twisted.ensureDeferred
async def test_include_raw_sends_the_stored_message_up_to_the_cap(
    receiver: Listening, rigs: Callable[..., OutboxRig]
) -> None:
    rig = rigs(
        endpoint("raw", receiver.url("/raw"), include_raw=True),
        endpoint("capped", receiver.url("/capped"), include_raw=True, max_raw_size=10),
        endpoint("plain", receiver.url("/plain")),
    )
    rig.commit()
    await receiver.receiver.arrived(3)
    await rig.settle()
    raw = check_signed(receiver.receiver.at("/raw")[0])["data"]
    assert base64.b64decode(raw["raw"]).startswith(b"Return-Path: <sender@remote.test>\n")
    assert raw["raw_truncated"] is False
    capped = check_signed(receiver.receiver.at("/capped")[0])["data"]
    assert capped["raw_truncated"] is True and "raw" not in capped
    plain = check_signed(receiver.receiver.at("/plain")[0])["data"]
    assert "raw" not in plain and "raw_truncated" not in plain


# --- metrics -----------------------------------------------------------------------------------


def samples(rig: OutboxRig) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The dispatcher's metrics as a scrape shows them, parsed back."""
    text = rig.metrics.render().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest_twisted.ensureDeferred
async def test_deliveries_dead_letters_and_latency_are_counted_per_endpoint(
    receiver: Listening, rigs: Callable[..., OutboxRig]
) -> None:
    receiver.receiver.script("/bad", Answer(400), Answer(400))
    receiver.receiver.script("/flaky", Answer(500), Answer(500))
    rig = rigs(
        endpoint("good", receiver.url("/hook")),
        endpoint("bad", receiver.url("/bad")),
        endpoint("flaky", receiver.url("/flaky")),
    )
    rig.commit()
    rig.commit()
    await receiver.receiver.arrived(6)
    await rig.settle()
    seen = samples(rig)

    def deliveries(name: str, result: str) -> float:
        key = ("mailsrv_webhook_deliveries_total", (("endpoint", name), ("result", result)))
        return seen.get(key, 0.0)

    assert deliveries("good", "delivered") == 2
    assert deliveries("bad", "dead") == 2
    assert deliveries("flaky", "retry") == 2
    assert deliveries("flaky", "delivered") == 0
    assert seen[("mailsrv_webhook_dead_letters_total", (("endpoint", "bad"),))] == 2
    for name in ("good", "bad", "flaky"):
        assert seen[("mailsrv_webhook_latency_seconds_count", (("endpoint", name),))] == 2
