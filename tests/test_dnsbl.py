"""DNS blocklists against a real twisted.names server on 127.0.0.1, and the MX greeting over
real sockets (the loopback client is listed in the test zones)."""

from __future__ import annotations

import smtplib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.names import dns

from mailsrv.dns import make_resolver
from mailsrv.screening.dnsbl import REFUSE, TAG, DnsblChecker, Zone, query_name
from tests.conftest import make_config, run_client, start_server
from tests.relay_dns import DNSServer, start_black_hole, start_dns


def a(address: str) -> dns.Record_A:
    return dns.Record_A(address, ttl=600)


ZONE = {
    "1.0.0.127.refuse.test": [a("127.0.0.2")],
    "1.0.0.127.tag.test": [a("127.0.0.4"), a("127.0.0.10")],
    "1.0.0.127.oops.test": [a("127.255.255.254")],
    "1.0.0.127.odd.test": [a("10.0.0.1")],
    "9.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.refuse.test": [a("127.0.0.3")],
}


@pytest_twisted.async_yield_fixture
async def dns_server() -> AsyncIterator[DNSServer]:
    running = start_dns(ZONE)
    yield running
    await running.stop()


def checker(server: DNSServer, tmp_path: Path) -> DnsblChecker:
    hosts = tmp_path / "hosts"
    hosts.write_text("")
    return DnsblChecker(make_resolver(reactor, [server.address], hosts_file=str(hosts)), reactor)


def test_query_names() -> None:
    assert query_name("192.0.2.99", "bl.test") == "99.2.0.192.bl.test"
    assert query_name("::ffff:192.0.2.99", "bl.test") == "99.2.0.192.bl.test"
    assert query_name("2001:db8::9", "bl.test").startswith("9.0.0.0.") and query_name(
        "2001:db8::9", "bl.test"
    ).endswith(".8.b.d.0.1.0.0.2.bl.test")


@pytest_twisted.ensureDeferred
async def test_listed_not_listed_error_codes_and_ipv6(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    check = checker(dns_server, tmp_path)
    zones = [Zone(z) for z in ("refuse.test", "tag.test", "oops.test", "odd.test", "none.test")]
    found = await check.listings("127.0.0.1", zones, 2.0)
    assert [(f.zone.name, f.codes) for f in found] == [
        ("refuse.test", ("127.0.0.2",)),
        ("tag.test", ("127.0.0.10", "127.0.0.4")),
    ], "error codes, answers outside 127/8 and NXDOMAIN are not listings"
    assert [f.zone.name for f in await check.listings("2001:db8::9", zones, 2.0)] == ["refuse.test"]
    assert await check.listings("192.0.2.1", zones, 2.0) == []


@pytest_twisted.ensureDeferred
async def test_a_zone_that_never_answers_is_not_a_listing(tmp_path: Path) -> None:
    port, _ = start_black_hole()
    try:
        hosts = tmp_path / "hosts"
        hosts.write_text("")
        resolver = make_resolver(
            reactor, [("127.0.0.1", port.getHost().port)], hosts_file=str(hosts)
        )
        assert (
            await DnsblChecker(resolver, reactor).listings("127.0.0.1", [Zone("x.test")], 0.3) == []
        )
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_answers_are_cached_by_the_servers_resolver(tmp_path: Path) -> None:
    dns_server = start_dns(ZONE)
    clock = task.Clock()
    hosts = tmp_path / "hosts"
    hosts.write_text("")
    check = DnsblChecker(make_resolver(reactor, [dns_server.address], hosts_file=str(hosts)), clock)
    await check.listings("127.0.0.1", [Zone("refuse.test")], 2.0)
    await dns_server.stop()  # gone: only the cache can answer now
    (listing,) = await check.listings("127.0.0.1", [Zone("refuse.test")], 2.0)
    assert listing.codes == ("127.0.0.2",)


@pytest.mark.parametrize("action", [REFUSE, TAG])
@pytest_twisted.ensureDeferred
async def test_the_mx_greeting(dns_server: DNSServer, tmp_path: Path, action: str) -> None:
    zone = "refuse.test" if action == REFUSE else "tag.test"
    config = make_config(tmp_path, trusted_networks=(), dnsbl_zones=((zone, action),))
    running = await start_server(config)
    running.server.dnsbl = checker(dns_server, tmp_path)
    try:

        def session() -> list[tuple[int, bytes]]:
            client = smtplib.SMTP(timeout=10)
            seen = [client.connect("127.0.0.1", running.port)]
            seen.append(client.docmd("EHLO", "client.example"))
            if seen[0][0] == 220:
                client.sendmail(
                    "bob@remote.test", ["alice@example.org"], b"Subject: x\r\n\r\nhi\r\n"
                )
            seen.append(client.docmd("QUIT"))
            client.close()
            return seen

        greeting, ehlo, bye = await run_client(session)
        if action == REFUSE:
            assert greeting == (
                554,
                b"5.7.1 Service unavailable; client [127.0.0.1] listed by refuse.test",
            )
            assert ehlo[0] == 503 and bye[0] == 221
            assert running.maildir_files("alice@example.org") == []
        else:
            assert greeting[0] == 220 and bye[0] == 221
            (stored,) = running.maildir_files("alice@example.org")
            assert b"X-Mailsrv-DNSBL: tag.test=127.0.0.10,127.0.0.4\n" in stored.read_bytes()
    finally:
        await running.service.stopService()
