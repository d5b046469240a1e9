"""The server's resolver (mailsrv.dns) against a real twisted.names server on loopback: the cache
honours TTLs (answers, NXDOMAIN, NODATA), is bounded, and the servers can change on a reload."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.names import client, dns, error

from mailsrv.config import Config
from mailsrv.dns import CachingResolver, ServerResolver, dns_servers_of
from tests.mailauth_dns import start_auth_dns
from tests.relay_dns import DNSServer, start_dns

ZONE: dict[str, list[Any]] = {
    "short.test": [dns.Record_TXT(b"short", ttl=30)],
    "long.test": [dns.Record_TXT(b"long", ttl=86400)],
    "a.test": [dns.Record_A("127.0.0.1", ttl=300)],
    "b.test": [dns.Record_A("127.0.0.2", ttl=300)],
    "c.test": [dns.Record_A("127.0.0.3", ttl=300)],
}


@pytest_twisted.async_yield_fixture
async def server() -> AsyncIterator[DNSServer]:
    running = start_auth_dns(ZONE, servfail=["broken.test"])
    yield running
    await running.stop()


def caching(server: DNSServer, clock: task.Clock, **kwargs: Any) -> CachingResolver:
    from twisted.internet import reactor

    upstream = client.Resolver(servers=[server.address], reactor=reactor)
    return CachingResolver(upstream, clock, **kwargs)


def asked(server: DNSServer, name: str) -> int:
    return sum(1 for query, _type, _transport in server.factory.queries if query == name)


@pytest_twisted.ensureDeferred
async def test_an_answer_is_served_from_memory_until_its_ttl_ends(server: DNSServer) -> None:
    clock = task.Clock()
    resolver = caching(server, clock)
    first, _, _ = await resolver.lookupText("short.test")
    assert first[0].payload.data == [b"short"]
    clock.advance(20)
    again, _, _ = await resolver.lookupText("short.test")
    assert asked(server, "short.test") == 1
    assert again[0].ttl == 10  # the TTL left, as a cache reports it
    clock.advance(10)
    await resolver.lookupText("short.test")
    assert asked(server, "short.test") == 2


@pytest_twisted.ensureDeferred
async def test_a_long_ttl_is_capped(server: DNSServer) -> None:
    clock = task.Clock()
    resolver = caching(server, clock, max_ttl=60.0)
    await resolver.lookupText("long.test")
    clock.advance(59)
    await resolver.lookupText("long.test")
    assert asked(server, "long.test") == 1
    clock.advance(1)
    await resolver.lookupText("long.test")
    assert asked(server, "long.test") == 2


@pytest_twisted.ensureDeferred
async def test_a_missing_name_is_remembered_for_the_soa_minimum(server: DNSServer) -> None:
    clock = task.Clock()
    resolver = caching(server, clock)
    for _ in range(2):
        with pytest.raises(error.DNSNameError):
            await resolver.lookupText("nothing.test")
    assert asked(server, "nothing.test") == 1
    clock.advance(60)  # the test zone's SOA minimum and TTL
    with pytest.raises(error.DNSNameError):
        await resolver.lookupText("nothing.test")
    assert asked(server, "nothing.test") == 2


@pytest_twisted.ensureDeferred
async def test_no_records_of_the_type_is_remembered_too(server: DNSServer) -> None:
    clock = task.Clock()
    resolver = caching(server, clock, negative_ttl=5.0)
    for _ in range(2):
        answers, _, _ = await resolver.lookupText("a.test")
        assert answers == []
    assert asked(server, "a.test") == 1
    clock.advance(5)  # negative_ttl caps the SOA's 60 s
    await resolver.lookupText("a.test")
    assert asked(server, "a.test") == 2


@pytest_twisted.ensureDeferred
async def test_server_failures_are_not_cached(server: DNSServer) -> None:
    resolver = caching(server, task.Clock())
    for _ in range(2):
        with pytest.raises(error.DNSServerError):
            await resolver.lookupText("broken.test")
    assert asked(server, "broken.test") == 2


@pytest_twisted.ensureDeferred
async def test_the_cache_keeps_at_most_its_size_dropping_the_oldest(server: DNSServer) -> None:
    resolver = caching(server, task.Clock(), max_entries=2)
    for name in ("a.test", "b.test", "c.test"):
        await resolver.lookupAddress(name)
    assert len(resolver) == 2
    await resolver.lookupAddress("c.test")
    await resolver.lookupAddress("b.test")
    assert (asked(server, "b.test"), asked(server, "c.test")) == (1, 1)
    await resolver.lookupAddress("a.test")
    assert asked(server, "a.test") == 2


@pytest_twisted.ensureDeferred
async def test_names_differing_in_case_share_an_entry(server: DNSServer) -> None:
    resolver = caching(server, task.Clock())
    await resolver.lookupText("short.test")
    answers, _, _ = await resolver.lookupText("SHORT.test")
    assert answers[0].payload.data == [b"short"]
    assert asked(server, "short.test") == 1


@pytest_twisted.ensureDeferred
async def test_the_server_resolver_follows_a_reload_of_dns_servers(tmp_path: Path) -> None:
    from twisted.internet import reactor

    one = start_dns({"which.test": [dns.Record_TXT(b"one")]})
    two = start_dns({"which.test": [dns.Record_TXT(b"two")]})
    hosts = tmp_path / "hosts"
    hosts.write_text("")
    try:
        config = Config(dns_servers=(f"127.0.0.1:{one.port}",))
        resolver = ServerResolver(reactor, dns_servers_of(config), hosts_file=str(hosts))
        answers, _, _ = await resolver.lookupText("which.test")
        assert answers[0].payload.data == [b"one"]
        assert resolver.reload_step(config, frozenset({"relay_host"})) is None
        moved = dataclasses.replace(config, dns_servers=(f"127.0.0.1:{two.port}",))
        install = resolver.reload_step(moved, frozenset({"dns_servers"}))
        assert install is not None
        install()
        answers, _, _ = await resolver.lookupText("which.test")  # a new, empty cache
        assert answers[0].payload.data == [b"two"]
        assert resolver.servers == [("127.0.0.1", two.port)]
    finally:
        await one.stop()
        await two.stop()
