"""The outbound client's TLS and AUTH: real TLS with trustme certificates, over loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from OpenSSL import SSL
from twisted.internet import task, threads
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface import implementer

from mailsrv.relay import replies
from mailsrv.relay.client import SessionError
from mailsrv.relay.connector import Connector, deliver_once
from mailsrv.relay.message import OutboundMessage, OutboundRecipient
from mailsrv.relay.options import TLS_IMPLICIT, TLS_MAY, TLS_NONE, TLS_REQUIRE, ClientOptions
from mailsrv.relay.resolver import Candidate
from mailsrv.relay.tlsclient import ClientTLS, TLSClientConfigError
from mailsrv.tls import ReloadingServerTLS
from tests.relay_peer import Peer, Script, start_peer

PASSWORD = "Sm4rthost-Secret"
BODY = b"Return-Path: <alice@example.org>\nSubject: tls\n\nhello\n"


class Certs:
    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("smarthost.test", "127.0.0.1")
        self.chain, self.key, self.ca_file = (
            folder / "chain.pem",
            folder / "key.pem",
            folder / "ca.pem",
        )
        self.chain.write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
        self.key.write_bytes(cert.private_key_pem.bytes())
        self.ca_file.write_bytes(self.ca.cert_pem.bytes())
        self.other_ca = folder / "other-ca.pem"
        self.other_ca.write_bytes(trustme.CA().cert_pem.bytes())

    def server(self) -> ReloadingServerTLS:
        return ReloadingServerTLS(str(self.chain), str(self.key))


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path / "tls")


@pytest_twisted.async_yield_fixture
async def peers() -> AsyncIterator[list[Peer]]:
    running: list[Peer] = []
    yield running
    for peer in running:
        await peer.stop()


def message(tmp_path: Path) -> OutboundMessage:
    path = tmp_path / "body"
    path.write_bytes(BODY)
    return OutboundMessage(
        "Q1", "alice@example.org", (OutboundRecipient("bob@example.net"),), path, len(BODY)
    )


def connector(**options: Any) -> Connector:
    from twisted.internet import reactor

    return Connector(
        reactor,
        ClientOptions("relay.example.org", **options),
        threads.deferToThread,
        clock=task.Clock(),
    )


def peer(peers: list[Peer], implicit: bool = False, **script: Any) -> Peer:
    running = start_peer(Script(**script), implicit_tls=implicit)
    peers.append(running)
    return running


def at(p: Peer, host: str = "smarthost.test") -> Candidate:
    return Candidate(host, "127.0.0.1", p.number)


STARTTLS = ["PIPELINING", "STARTTLS", "AUTH PLAIN LOGIN"]


@pytest_twisted.ensureDeferred
async def test_opportunistic_tls_with_an_unknown_certificate(
    tmp_path: Path, certs: Certs, peers: list[Peer]
) -> None:
    p = peer(peers, extensions=STARTTLS, tls=certs.server())
    results = await deliver_once(
        connector(tls=TLS_MAY), [at(p, "mx.unknown.test")], message(tmp_path)
    )
    assert results[0].delivered
    assert results[0].tls is not None and results[0].tls.startswith("TLSv1.")
    session = p.factory.sessions[0]
    assert session.tls is not None
    assert [c for c in session.commands if c.startswith(("EHLO", "STARTTLS"))] == [
        "EHLO relay.example.org",
        "STARTTLS",
        "EHLO relay.example.org",
    ]


@pytest_twisted.ensureDeferred
async def test_opportunistic_tls_falls_back_to_plaintext_when_not_offered(
    tmp_path: Path, peers: list[Peer]
) -> None:
    p = peer(peers, extensions=["PIPELINING"])
    results = await deliver_once(connector(tls=TLS_MAY), [at(p)], message(tmp_path))
    assert results[0].delivered and results[0].tls is None


@implementer(IOpenSSLServerConnectionCreator)
class OldTLSOnly:
    """A server that speaks only TLS 1.0: today's OpenSSL client refuses the handshake."""

    def __init__(self, certs: Certs) -> None:
        self.context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self.context.set_min_proto_version(SSL.TLS1_VERSION)
        self.context.set_max_proto_version(SSL.TLS1_VERSION)
        self.context.use_certificate_chain_file(str(certs.chain).encode())
        self.context.use_privatekey_file(str(certs.key).encode())

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self.context, None)


@pytest_twisted.ensureDeferred
async def test_opportunistic_tls_handshake_failure_retries_in_plaintext(
    tmp_path: Path, certs: Certs, peers: list[Peer]
) -> None:
    p = peer(peers, extensions=STARTTLS, tls=OldTLSOnly(certs))
    results = await deliver_once(connector(tls=TLS_MAY), [at(p)], message(tmp_path))
    assert results[0].delivered and results[0].tls is None
    assert len(p.factory.sessions) == 2
    assert "STARTTLS" not in p.factory.sessions[1].commands


@pytest_twisted.ensureDeferred
async def test_required_tls_not_offered_is_temporary(tmp_path: Path, peers: list[Peer]) -> None:
    p = peer(peers, extensions=["PIPELINING"])
    results = await deliver_once(connector(tls=TLS_REQUIRE), [at(p)], message(tmp_path))
    assert (results[0].code, results[0].enhanced, results[0].permanent) == (421, "4.7.4", False)
    assert not any(c.startswith("MAIL") for c in p.factory.sessions[0].commands)


@pytest_twisted.ensureDeferred
async def test_required_unverified_tls_accepts_any_certificate(
    tmp_path: Path, certs: Certs, peers: list[Peer]
) -> None:
    p = peer(peers, extensions=STARTTLS, tls=certs.server())
    results = await deliver_once(
        connector(tls=TLS_REQUIRE), [at(p, "mx.other.test")], message(tmp_path)
    )
    assert results[0].delivered and results[0].tls


@pytest.mark.parametrize(
    ("host", "ca", "ok"),
    [
        ("smarthost.test", "ca_file", True),
        ("127.0.0.1", "ca_file", True),  # the certificate has an IP address SAN
        ("wrong-name.test", "ca_file", False),
        ("smarthost.test", "other_ca", False),
    ],
)
@pytest_twisted.ensureDeferred
async def test_verified_tls(
    tmp_path: Path, certs: Certs, peers: list[Peer], host: str, ca: str, ok: bool
) -> None:
    p = peer(peers, extensions=STARTTLS, tls=certs.server())
    c = connector(tls=TLS_REQUIRE, verify=True, ca_file=str(getattr(certs, ca)))
    results = await deliver_once(c, [at(p, host)], message(tmp_path))
    if ok:
        assert results[0].delivered and results[0].tls
    else:
        assert (results[0].code, results[0].enhanced, results[0].permanent) == (421, "4.7.5", False)
        assert p.factory.messages == []
        assert len(p.factory.sessions) == 1  # no plaintext retry when TLS is required


@pytest_twisted.ensureDeferred
async def test_implicit_tls(tmp_path: Path, certs: Certs, peers: list[Peer]) -> None:
    p = peer(peers, implicit=True, extensions=["PIPELINING"], tls=certs.server())
    c = connector(tls=TLS_IMPLICIT, verify=True, ca_file=str(certs.ca_file))
    results = await deliver_once(c, [at(p)], message(tmp_path))
    assert results[0].delivered and results[0].tls


@pytest.mark.parametrize("mechanisms", ["AUTH PLAIN LOGIN", "AUTH LOGIN", "AUTH=LOGIN PLAIN"])
@pytest_twisted.ensureDeferred
async def test_auth_at_the_smarthost_over_tls(
    tmp_path: Path, certs: Certs, peers: list[Peer], mechanisms: str
) -> None:
    p = peer(
        peers,
        extensions=["PIPELINING", "STARTTLS", mechanisms],
        tls=certs.server(),
        credentials={"relay-user": PASSWORD},
    )
    c = connector(
        tls=TLS_REQUIRE,
        verify=True,
        ca_file=str(certs.ca_file),
        user="relay-user",
        password=PASSWORD,
    )
    results = await deliver_once(c, [at(p)], message(tmp_path))
    assert results[0].delivered
    expected = "LOGIN" if mechanisms == "AUTH LOGIN" else "PLAIN"
    assert p.factory.sessions[0].auth == [(expected, "relay-user", PASSWORD)]


@pytest_twisted.ensureDeferred
async def test_no_credentials_without_tls(tmp_path: Path, peers: list[Peer]) -> None:
    p = peer(peers, extensions=["PIPELINING", "AUTH PLAIN LOGIN"], credentials={"u": PASSWORD})
    results = await deliver_once(
        connector(tls=TLS_NONE, user="u", password=PASSWORD), [at(p)], message(tmp_path)
    )
    assert (results[0].code, results[0].enhanced, results[0].permanent) == (421, "4.7.10", False)
    session = p.factory.sessions[0]
    assert session.auth == [] and not any(c.startswith("AUTH") for c in session.commands)
    assert all(PASSWORD.encode() not in read for read in session.reads)


@pytest_twisted.ensureDeferred
async def test_refused_credentials_are_temporary_and_not_logged(
    tmp_path: Path, certs: Certs, peers: list[Peer]
) -> None:
    p = peer(peers, extensions=STARTTLS, tls=certs.server(), credentials={"u": "other"})
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        c = connector(
            tls=TLS_REQUIRE, verify=True, ca_file=str(certs.ca_file), user="u", password=PASSWORD
        )
        results = await deliver_once(c, [at(p)], message(tmp_path))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert (results[0].code, results[0].enhanced, results[0].permanent) == (421, "4.7.8", False)
    assert "535" in results[0].text
    assert events, "the failed attempt is logged"
    for event in events:
        assert PASSWORD not in (formatEvent(event) or "") and PASSWORD not in repr(event)
    assert PASSWORD not in repr(ClientOptions("x", user="u", password=PASSWORD))


@pytest_twisted.ensureDeferred
async def test_smarthost_without_auth_offered(
    tmp_path: Path, certs: Certs, peers: list[Peer]
) -> None:
    p = peer(peers, extensions=["STARTTLS", "AUTH CRAM-MD5"], tls=certs.server())
    c = connector(
        tls=TLS_REQUIRE, verify=True, ca_file=str(certs.ca_file), user="u", password=PASSWORD
    )
    with pytest.raises(SessionError) as caught:
        await c.connect(at(p))
    assert caught.value.reply == replies.AUTH_NOT_OFFERED


def test_bad_ca_file_is_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(TLSClientConfigError) as caught:
        ClientTLS(verify=True, ca_file=str(junk))
    assert str(caught.value) == f"relay_ca_file: {junk}: no PEM certificate in it"
    with pytest.raises(TLSClientConfigError) as missing:
        ClientTLS(verify=True, ca_file=str(tmp_path / "none.pem"))
    assert "No such file" in str(missing.value)
