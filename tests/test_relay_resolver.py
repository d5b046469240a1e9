"""Next-hop resolution against a real twisted.names authoritative server on loopback."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.names import dns

from mailsrv.relay import replies
from mailsrv.relay.resolver import Candidate, NextHop, NextHopError, make_resolver
from tests.relay_dns import DNSServer, start_black_hole, start_dns


def mx(preference: int, host: str) -> dns.Record_MX:
    return dns.Record_MX(preference, host.encode())


def a(address: str) -> dns.Record_A:
    return dns.Record_A(address)


def aaaa(address: str) -> dns.Record_AAAA:
    return dns.Record_AAAA(address)


MANY = [f"mx{n:02d}.many.test" for n in range(40)]

ZONE: dict[str, list[Any]] = {
    "order.test": [mx(30, "c.order.test"), mx(10, "a.order.test"), mx(20, "b.order.test")],
    "a.order.test": [a("127.0.0.11")],
    "b.order.test": [a("127.0.0.12")],
    "c.order.test": [a("127.0.0.13")],
    "equal.test": [mx(10, f"{x}.equal.test") for x in "abcd"] + [mx(20, "z.equal.test")],
    **{f"{x}.equal.test": [a("127.0.0.20")] for x in "abcdz"},
    "implicit.test": [a("127.0.0.30"), aaaa("::1")],
    "nullmx.test": [mx(0, "")],
    "dual.test": [mx(10, "mx.dual.test")],
    "mx.dual.test": [aaaa("::1"), aaaa("::2"), a("127.0.0.41"), a("127.0.0.42"), a("127.0.0.43")],
    "many.test": [mx(10 + n, host) for n, host in enumerate(MANY)],
    **{host: [a("127.0.1.1")] for host in MANY},
    "ghost.test": [mx(10, "nothing-here.ghost.test")],
    "noaddr.test": [mx(10, "mx.noaddr.test")],
    "mx.noaddr.test": [dns.Record_TXT(b"no address records")],
    "halfbroken.test": [mx(10, "mx.broken.test"), mx(20, "mx.fine.test")],
    "allbroken.test": [mx(10, "mx.broken.test")],
    "mx.fine.test": [a("127.0.0.50")],
    "shared-one.test": [mx(10, "MX1.Provider.test"), mx(20, "mx2.provider.test")],
    "shared-two.test": [mx(5, "mx2.provider.test"), mx(5, "mx1.provider.test.")],
    "other.test": [mx(10, "mx1.provider.test")],
    "mx1.provider.test": [a("127.0.0.61")],
    "mx2.provider.test": [a("127.0.0.62")],
    "relay.test": [a("127.0.0.70")],
    "xn--bcher-kva.test": [mx(10, "mx.fine.test")],
}
SERVFAIL = ["servfail.test", "mx.broken.test"]


@pytest_twisted.async_yield_fixture
async def dns_server() -> AsyncIterator[DNSServer]:
    running = start_dns(ZONE, servfail=SERVFAIL)
    yield running
    await running.stop()


@pytest.fixture
def hosts_file(tmp_path: Path) -> str:
    path = tmp_path / "hosts"
    path.write_text("")
    return str(path)


def next_hop(server: DNSServer, hosts_file: str, seed: int = 1, **kwargs: Any) -> NextHop:
    from twisted.internet import reactor

    resolver = make_resolver(reactor, [server.address], hosts_file=hosts_file)
    return NextHop(resolver, kwargs.pop("clock", task.Clock()), random.Random(seed), **kwargs)


async def failure(hop: NextHop, domain: str) -> NextHopError:
    with pytest.raises(NextHopError) as caught:
        await hop.route(domain)
    return caught.value


@pytest_twisted.ensureDeferred
async def test_mx_by_preference(dns_server: DNSServer, hosts_file: str) -> None:
    route = await next_hop(dns_server, hosts_file, mx_port=2525).route("order.test")
    assert route.mx_hosts == ("a.order.test", "b.order.test", "c.order.test")
    assert route.candidates == (
        Candidate("a.order.test", "127.0.0.11", 2525),
        Candidate("b.order.test", "127.0.0.12", 2525),
        Candidate("c.order.test", "127.0.0.13", 2525),
    )


@pytest_twisted.ensureDeferred
async def test_equal_preferences_in_random_order(dns_server: DNSServer, hosts_file: str) -> None:
    orders = []
    for seed in range(12):
        route = await next_hop(dns_server, hosts_file, seed=seed).route("equal.test")
        orders.append(route.mx_hosts)
    assert all(order[-1] == "z.equal.test" for order in orders)
    assert all(sorted(order[:4]) == [f"{x}.equal.test" for x in "abcd"] for order in orders)
    assert len({order[0] for order in orders}) > 1  # really shuffled
    again = await next_hop(dns_server, hosts_file, seed=3).route("equal.test")
    assert again.mx_hosts == orders[3]  # the seeded rng decides


@pytest_twisted.ensureDeferred
async def test_no_mx_means_the_domain_is_the_implicit_mx(
    dns_server: DNSServer, hosts_file: str
) -> None:
    route = await next_hop(dns_server, hosts_file).route("implicit.test")
    assert route.mx_hosts == ("implicit.test",)
    assert [c.address for c in route.candidates] == ["::1", "127.0.0.30"]


@pytest_twisted.ensureDeferred
async def test_ipv6_and_ipv4_alternate(dns_server: DNSServer, hosts_file: str) -> None:
    route = await next_hop(dns_server, hosts_file).route("dual.test")
    assert [c.address for c in route.candidates] == [
        "::1",
        "127.0.0.41",
        "::2",
        "127.0.0.42",
        "127.0.0.43",
    ]


# Failures: domain, reply, whether it is permanent.
FAILURES = [
    ("nullmx.test", replies.NULL_MX, True),
    ("missing.test", replies.NO_SUCH_DOMAIN, True),
    ("servfail.test", replies.DNS_TEMPORARY, False),
    ("ghost.test", replies.NO_ADDRESS, True),
    ("noaddr.test", replies.NO_ADDRESS, True),
    ("allbroken.test", replies.DNS_TEMPORARY, False),
    ("bad..test", replies.BAD_DOMAIN, True),
    ("x" * 64 + ".test", replies.BAD_DOMAIN, True),
]


@pytest.mark.parametrize(("domain", "reply", "permanent"), FAILURES)
@pytest_twisted.ensureDeferred
async def test_failures_are_classified(
    dns_server: DNSServer, hosts_file: str, domain: str, reply: Any, permanent: bool
) -> None:
    caught = await failure(next_hop(dns_server, hosts_file), domain)
    assert (caught.reply.code, caught.reply.enhanced) == (reply.code, reply.enhanced)
    assert caught.reply.text.startswith(reply.text)
    assert caught.permanent is permanent


@pytest_twisted.ensureDeferred
async def test_servfail_is_named_in_the_reply(dns_server: DNSServer, hosts_file: str) -> None:
    caught = await failure(next_hop(dns_server, hosts_file), "servfail.test")
    assert "SERVFAIL" in caught.reply.text


@pytest_twisted.ensureDeferred
async def test_a_broken_mx_host_is_skipped(dns_server: DNSServer, hosts_file: str) -> None:
    route = await next_hop(dns_server, hosts_file).route("halfbroken.test")
    assert route.mx_hosts == ("mx.broken.test", "mx.fine.test")
    assert [c.address for c in route.candidates] == ["127.0.0.50"]


@pytest_twisted.ensureDeferred
async def test_timeout_is_temporary(hosts_file: str) -> None:
    from twisted.internet import reactor

    port, hole = start_black_hole()
    try:
        clock = task.Clock()
        resolver = make_resolver(
            reactor, [("127.0.0.1", port.getHost().port)], hosts_file=hosts_file
        )
        hop = NextHop(resolver, clock, random.Random(), timeout=5.0)
        pending = defer.Deferred.fromCoroutine(hop.route("slow.test"))
        while not getattr(hole, "received", 0):  # the query really went out
            await task.deferLater(reactor, 0.01, lambda: None)
        assert not pending.called
        clock.advance(5.0)
        with pytest.raises(NextHopError) as caught:
            await pending
        assert caught.value.reply.enhanced == replies.DNS_TEMPORARY.enhanced
        assert not caught.value.permanent
        assert "timed out" in caught.value.reply.text
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_large_answer_comes_over_tcp(dns_server: DNSServer, hosts_file: str) -> None:
    route = await next_hop(dns_server, hosts_file).route("many.test")
    assert route.mx_hosts == tuple(MANY)
    transports = {t for name, kind, t in dns_server.factory.queries if name == "many.test"}
    assert transports == {"udp", "tcp"}  # truncated over UDP, asked again over TCP


@pytest_twisted.ensureDeferred
async def test_mx_rollup_shares_a_destination(dns_server: DNSServer, hosts_file: str) -> None:
    hop = next_hop(dns_server, hosts_file)
    one, two, other = [
        await hop.route(d) for d in ("shared-one.test", "shared-two.test", "other.test")
    ]
    assert one.destination == two.destination == "mx:mx1.provider.test,mx2.provider.test"
    assert other.destination != one.destination
    implicit = await hop.route("implicit.test")
    assert implicit.destination == "mx:implicit.test"


@pytest_twisted.ensureDeferred
async def test_smarthost_bypasses_mx(dns_server: DNSServer, hosts_file: str) -> None:
    hop = next_hop(dns_server, hosts_file, smarthost=("relay.test", 2525))
    route = await hop.route("order.test")
    assert route.destination == "relay:relay.test:2525"
    assert route.candidates == (Candidate("relay.test", "127.0.0.70", 2525),)
    asked = {(name, kind) for name, kind, _t in dns_server.factory.queries}
    assert ("order.test", dns.MX) not in asked


@pytest_twisted.ensureDeferred
async def test_smarthost_by_address_needs_no_dns(dns_server: DNSServer, hosts_file: str) -> None:
    hop = next_hop(dns_server, hosts_file, smarthost=("127.0.0.1", 2525))
    route = await hop.route("order.test")
    assert route.destination == "relay:127.0.0.1:2525"
    assert route.candidates == (Candidate("127.0.0.1", "127.0.0.1", 2525),)
    assert await hop.route("other.test") is route  # made once, for every domain
    assert dns_server.factory.queries == []
    v6 = await next_hop(dns_server, hosts_file, smarthost=("::1", 2525)).route("order.test")
    assert v6.candidates == (Candidate("::1", "::1", 2525),)


@pytest_twisted.ensureDeferred
async def test_domain_literal_routes_to_the_address(dns_server: DNSServer, hosts_file: str) -> None:
    route = await next_hop(dns_server, hosts_file, mx_port=2526).route("[127.0.0.9]")
    assert route.candidates == (Candidate("[127.0.0.9]", "127.0.0.9", 2526),)
    assert dns_server.factory.queries == []


@pytest_twisted.ensureDeferred
async def test_internationalised_domain_is_looked_up_as_a_label(
    dns_server: DNSServer, hosts_file: str
) -> None:
    route = await next_hop(dns_server, hosts_file).route("bücher.test")
    assert route.mx_hosts == ("mx.fine.test",)
