"""MX rollup keys and the dead-destination cache (time from task.Clock)."""

from __future__ import annotations

import pytest
from twisted.internet import task

from mailsrv.relay import replies
from mailsrv.relay.destinations import DeadDestinations, mx_destination, smarthost_destination


def test_mx_rollup_ignores_order_case_and_trailing_dots() -> None:
    one = mx_destination(["MX2.provider.test", "mx1.provider.test"])
    two = mx_destination(["mx1.provider.test.", "mx2.provider.test", "mx1.provider.test"])
    assert one == two == "mx:mx1.provider.test,mx2.provider.test"
    assert mx_destination(["mx1.provider.test"]) != one


def test_smarthost_key_names_host_and_port() -> None:
    assert smarthost_destination("Relay.Example.NET", 587) == "relay:relay.example.net:587"
    assert smarthost_destination("relay.example.net", 25) != "relay:relay.example.net:587"


def test_no_hosts_is_an_error() -> None:
    with pytest.raises(ValueError):
        mx_destination([])


def test_suspension_lasts_its_hold_time() -> None:
    clock = task.Clock()
    dead = DeadDestinations(clock, hold=300.0)
    assert dead.suspended("mx:a.test") is None
    suspension = dead.suspend("mx:a.test", replies.CONNECT_FAILED)
    assert suspension.until == 300.0
    clock.advance(299.0)
    assert dead.suspended("mx:a.test") == suspension
    assert dead.suspended("mx:b.test") is None
    clock.advance(1.0)
    assert dead.suspended("mx:a.test") is None
    assert len(dead) == 0


def test_custom_hold_revive_and_prune() -> None:
    clock = task.Clock()
    dead = DeadDestinations(clock)
    dead.suspend("mx:a.test", replies.TIMEOUT, hold=10.0)
    dead.suspend("mx:b.test", replies.TIMEOUT, hold=100.0)
    dead.suspend("mx:c.test", replies.TIMEOUT, hold=100.0)
    dead.revive("mx:c.test")
    assert dead.suspended("mx:c.test") is None
    clock.advance(50.0)
    dead.prune()
    assert len(dead) == 1
    assert dead.suspended("mx:b.test") is not None
