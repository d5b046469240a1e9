"""The relay scheduler reconfigured by a reload, against the scripted next hops and peers of
tests/test_relay_scheduler.py (the whole SIGHUP path with real SMTP peers runs in
tests/test_reload_process.py)."""

from __future__ import annotations

from pathlib import Path

from mailsrv.relay.retry import RetryPolicy
from mailsrv.relay.scheduler import SchedulerSettings
from tests.test_relay_scheduler import Rig, ScriptedPeer, StaticNextHop

SMARTHOST = "smarthost:relay.example"


def new_parts() -> tuple[StaticNextHop, ScriptedPeer]:
    hop = StaticNextHop()
    hop.table["example.net"] = SMARTHOST
    return hop, ScriptedPeer()


def started(tmp_path: Path, **settings: int) -> Rig:
    rig = Rig(tmp_path, SchedulerSettings(**settings))  # type: ignore[arg-type]
    rig.scheduler.startService()
    rig.clock.advance(0)
    return rig


def test_idle_connections_close_and_the_next_message_takes_the_new_route(tmp_path: Path) -> None:
    rig = started(tmp_path)
    rig.submit("bob@example.net")
    ((old, _),) = rig.peer.transactions
    assert not old.closed, "kept for reuse"
    hop, peer = new_parts()
    rig.scheduler.reconfigure(hop, peer, RetryPolicy(), SchedulerSettings())
    assert old.closed and rig.peer.open == 0
    rig.submit("carol@example.net")
    assert [route.destination for route in peer.connects] == [SMARTHOST]
    assert len(rig.peer.transactions) == 1, "nothing more over the old connector"
    assert rig.on_disk() == {}


def test_a_transaction_in_flight_finishes_on_its_connection_then_it_closes(
    tmp_path: Path,
) -> None:
    rig = started(tmp_path, per_destination=1)
    rig.peer.hold_sends = True
    first = rig.submit("bob@example.net")
    second = rig.submit("dave@example.net")  # waits: one connection per destination
    assert len(rig.peer.transactions) == 1
    hop, peer = new_parts()
    rig.scheduler.reconfigure(hop, peer, RetryPolicy(), SchedulerSettings())
    rig.clock.advance(0)
    assert [m.queue_id for _, m in peer.transactions] == [second.queue_id], "routed again"
    rig.peer.release_all()
    rig.clock.advance(0)
    ((old, message),) = rig.peer.transactions
    assert message.queue_id == first.queue_id and old.closed, "not parked for reuse"
    assert rig.on_disk() == {}, "both delivered, each once"


def test_a_connection_opened_before_the_reload_is_not_used(tmp_path: Path) -> None:
    rig = started(tmp_path)
    rig.peer.hold_connects = True
    record = rig.submit("bob@example.net")
    hop, peer = new_parts()
    rig.scheduler.reconfigure(hop, peer, RetryPolicy(), SchedulerSettings())
    rig.clock.advance(0)
    assert [m.queue_id for _, m in peer.transactions] == [record.queue_id]
    rig.peer.finish_connects()
    rig.clock.advance(0)
    assert rig.peer.transactions == [] and rig.peer.open == 0, "closed unused"
    assert rig.on_disk() == {}


def test_new_concurrency_and_retry_settings_apply_to_the_next_attempts(tmp_path: Path) -> None:
    rig = started(tmp_path, per_destination=1)
    rig.peer.hold_sends = True
    rig.submit("bob@example.net")
    rig.submit("dave@example.net")
    assert rig.peer.max_open == 1
    hop, peer = new_parts()
    peer.hold_sends = True
    rig.scheduler.reconfigure(
        hop, peer, RetryPolicy(min_backoff=7, max_backoff=7), SchedulerSettings(per_destination=5)
    )
    rig.submit("erin@example.net")
    rig.submit("frank@example.net")
    rig.clock.advance(0)
    assert peer.max_open == 3, "the waiting message and both new ones, at once"
    assert rig.scheduler.dead.hold == 7
