"""One webhook attempt against a real twisted.web receiver over HTTP and HTTPS on 127.0.0.1."""

from __future__ import annotations

import email.utils
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import standardwebhooks
import trustme
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mailsrv import __version__
from mailsrv.tls import ReloadingServerTLS
from mailsrv.webhook.endpoints import Endpoint
from mailsrv.webhook.sender import (
    AttemptResult,
    Outcome,
    WebhookSender,
    classify,
    parse_retry_after,
)
from mailsrv.webhook.signing import generate_secret

SECRET = generate_secret()
BODY = b'{"version":1,"id":"evt_1","type":"message.received","data":{}}'


@dataclass
class Seen:
    """One request as the receiver got it."""

    path: str
    headers: dict[str, str]
    body: bytes
    client_port: int


class Receiver(Resource):
    """Answers by path: /ok, /cookie (sets one), /status/<code>, /retry-after/<value>,
    /redirect, /hang, /hang-body, /close, /big."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []
        self._waiters: list[tuple[int, Deferred[None]]] = []

    def arrived(self, count: int) -> Deferred[None]:
        """Fires once ``count`` requests have arrived."""
        d: Deferred[None] = Deferred()
        self._waiters.append((count, d))
        self._check()
        return d

    def _check(self) -> None:
        for waiter in list(self._waiters):
            if len(self.seen) >= waiter[0]:
                self._waiters.remove(waiter)
                waiter[1].callback(None)

    def render_POST(self, request: Request) -> bytes | int:
        assert request.content is not None
        headers = {
            k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()
        }
        path = request.path.decode()
        self.seen.append(
            Seen(path, headers, request.content.read(), request.getClientAddress().port)
        )  # type: ignore[attr-defined]
        self._check()
        if path == "/ok":
            return b"thanks"
        if path == "/cookie":
            request.setHeader(b"Set-Cookie", b"session=abc; Path=/")
            return b"thanks"
        if path.startswith("/status/"):
            request.setResponseCode(int(path.split("/")[2]))
            return b"receiver says no\r\nsecond line"
        if path.startswith("/retry-after/"):
            request.setResponseCode(429)
            request.setHeader(b"Retry-After", path.split("/", 2)[2].replace("_", " ").encode())
            return b""
        if path == "/redirect":
            request.setResponseCode(302)
            request.setHeader(b"Location", b"/ok")
            return b""
        if path == "/hang":
            return NOT_DONE_YET
        if path == "/hang-body":
            request.write(b"partial body, and then nothing")
            return NOT_DONE_YET
        if path == "/close":
            request.transport.abortConnection()  # type: ignore[union-attr]
            return NOT_DONE_YET
        if path == "/big":
            return b"x" * (2 * 1024 * 1024)
        request.setResponseCode(404)
        return b""


class Tracking(WrappingFactory):
    """Wraps the Site to remember its connections, to count them and close them at the end."""

    def __init__(self, site: Site) -> None:
        super().__init__(site)
        self.connections: list[ProtocolWrapper] = []

    def buildProtocol(self, addr: Any) -> ProtocolWrapper:
        protocol = super().buildProtocol(addr)
        self.connections.append(protocol)
        return protocol


@dataclass
class Server:
    receiver: Receiver
    site: Tracking
    port: int
    scheme: str

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


@dataclass
class CA:
    """A CA, the server certificate it issued, and the PEM files."""

    folder: Path
    authority: trustme.CA = field(default_factory=trustme.CA)

    def write(self, *names: str) -> tuple[str, str, str]:
        self.folder.mkdir(parents=True, exist_ok=True)
        cert = self.authority.issue_cert(*names)
        chain, key, ca = self.folder / "chain.pem", self.folder / "key.pem", self.folder / "ca.pem"
        chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        key.write_bytes(cert.private_key_pem.bytes())
        ca.write_bytes(self.authority.cert_pem.bytes())
        return str(chain), str(key), str(ca)


async def _start(tls: ReloadingServerTLS | None = None) -> tuple[Server, Any]:
    from twisted.internet import reactor

    receiver = Receiver()
    site = Tracking(Site(receiver))
    factory: Any = site if tls is None else TLSMemoryBIOFactory(tls, False, site)
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    return Server(receiver, site, listening.getHost().port, "https" if tls else "http"), listening


async def _stop(server: Server, listening: Any) -> None:
    await listening.stopListening()
    for connection in list(server.site.protocols):  # the ones still open
        connection.transport.abortConnection()


@pytest_twisted.async_yield_fixture
async def http() -> Any:
    server, listening = await _start()
    yield server
    await _stop(server, listening)


@pytest.fixture
def ca(tmp_path: Path) -> tuple[str, str, str]:
    return CA(tmp_path / "server-ca").write("localhost", "127.0.0.1")


@pytest_twisted.async_yield_fixture
async def https(ca: tuple[str, str, str]) -> Any:
    chain, key, _ = ca
    server, listening = await _start(ReloadingServerTLS(chain, key))
    yield server
    await _stop(server, listening)


@pytest_twisted.async_yield_fixture
async def sender() -> Any:
    from twisted.internet import reactor

    client = WebhookSender(reactor)
    yield client
    await client.close()


def endpoint(url: str, **kwargs: Any) -> Endpoint:
    kwargs.setdefault("timeout", 5.0)
    return Endpoint(name="test", url=url, secrets=(SECRET,), **kwargs)


# --- statuses ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_200_is_delivered_signed_and_verifiable(http: Server, sender: WebhookSender) -> None:
    result = await sender.attempt(endpoint(http.url("/ok")), "evt_1", BODY)
    assert (result.outcome, result.status, result.error, result.retry_after) == (
        Outcome.DELIVERED,
        200,
        None,
        None,
    )
    assert 0 <= result.latency < 5
    (seen,) = http.receiver.seen
    assert seen.body == BODY
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["user-agent"] == f"mailsrv/{__version__}"
    assert seen.headers["webhook-id"] == "evt_1"
    assert abs(int(seen.headers["webhook-timestamp"]) - time.time()) < 60
    assert "cookie" not in seen.headers
    assert standardwebhooks.Webhook(SECRET).verify(seen.body, seen.headers) == {
        "version": 1,
        "id": "evt_1",
        "type": "message.received",
        "data": {},
    }


@pytest_twisted.ensureDeferred
async def test_a_cookie_the_receiver_sets_is_never_sent_back(
    http: Server, sender: WebhookSender
) -> None:
    for event_id in ("evt_1", "evt_2"):
        result = await sender.attempt(endpoint(http.url("/cookie")), event_id, BODY)
        assert result.outcome is Outcome.DELIVERED
    assert [seen.headers.get("cookie") for seen in http.receiver.seen] == [None, None]


# path, outcome, status, start of the error text
STATUSES = [
    ("/status/201", Outcome.DELIVERED, 201, None),
    ("/status/204", Outcome.DELIVERED, 204, None),
    ("/status/500", Outcome.RETRY, 500, "HTTP 500: receiver says no second line"),
    ("/status/503", Outcome.RETRY, 503, "HTTP 503"),
    ("/status/400", Outcome.DEAD, 400, "HTTP 400: receiver says no"),
    ("/status/401", Outcome.DEAD, 401, "HTTP 401"),
    ("/status/404", Outcome.DEAD, 404, "HTTP 404"),
    ("/status/408", Outcome.RETRY, 408, "HTTP 408"),
    ("/status/410", Outcome.DISABLE, 410, "HTTP 410"),
    ("/status/429", Outcome.RETRY, 429, "HTTP 429"),
    ("/redirect", Outcome.RETRY, 302, "HTTP 302"),
]


@pytest.mark.parametrize(("path", "outcome", "status", "error"), STATUSES)
@pytest_twisted.ensureDeferred
async def test_status_classification_over_http(
    http: Server,
    sender: WebhookSender,
    path: str,
    outcome: Outcome,
    status: int,
    error: str | None,
) -> None:
    result = await sender.attempt(endpoint(http.url(path)), "evt_1", BODY)
    assert (result.outcome, result.status) == (outcome, status)
    if error is None:
        assert result.error is None
    else:
        assert result.error is not None and result.error.startswith(error)
    assert [s.path for s in http.receiver.seen] == [path]  # a redirect is not followed


@pytest_twisted.ensureDeferred
async def test_429_with_retry_after_seconds(http: Server, sender: WebhookSender) -> None:
    result = await sender.attempt(endpoint(http.url("/retry-after/120")), "evt_1", BODY)
    assert (result.outcome, result.status, result.retry_after) == (Outcome.RETRY, 429, 120.0)


@pytest_twisted.ensureDeferred
async def test_retry_after_as_an_http_date(http: Server, sender: WebhookSender) -> None:
    when = email.utils.formatdate(time.time() + 90, usegmt=True).replace(" ", "_")
    result = await sender.attempt(endpoint(http.url(f"/retry-after/{when}")), "evt_1", BODY)
    assert result.outcome is Outcome.RETRY
    assert result.retry_after is not None and 80 < result.retry_after <= 90


# --- no answer, a dropped connection, nobody there -------------------------------------------


@pytest_twisted.ensureDeferred
async def test_no_answer_times_out_on_the_injected_clock(http: Server) -> None:
    from twisted.internet import reactor

    clock = task.Clock()
    sender = WebhookSender(reactor, clock=clock)
    try:
        results: list[AttemptResult] = []
        attempt = sender.attempt(endpoint(http.url("/hang"), timeout=0.5), "evt_1", BODY)
        attempt.addCallback(results.append)
        await http.receiver.arrived(1)
        clock.advance(0.49)
        assert results == []
        clock.advance(0.01)
        assert results == [
            AttemptResult(Outcome.RETRY, None, 0.5, None, "no response within 0.5 s")
        ]
        assert clock.getDelayedCalls() == []
    finally:
        await sender.close()


@pytest_twisted.ensureDeferred
async def test_stalled_body_times_out_on_the_real_reactor(
    http: Server, sender: WebhookSender
) -> None:
    # The headers (200) and part of the body come at once, the rest never: treq's own timeout
    # would have stopped at the headers; the whole-request timeout still ends the attempt.
    result = await sender.attempt(endpoint(http.url("/hang-body"), timeout=0.3), "evt_1", BODY)
    assert (result.outcome, result.status) == (Outcome.RETRY, 200)
    assert result.error == "HTTP 200, but the body did not end within 0.3 s"
    assert 0.3 <= result.latency < 3


@pytest_twisted.ensureDeferred
async def test_connection_closed_without_an_answer(http: Server, sender: WebhookSender) -> None:
    result = await sender.attempt(endpoint(http.url("/close")), "evt_1", BODY)
    assert (result.outcome, result.status) == (Outcome.RETRY, None)
    assert result.error is not None and result.error.startswith("ResponseNeverReceived")


@pytest_twisted.ensureDeferred
async def test_connection_refused(sender: WebhookSender) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nobody listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = await sender.attempt(endpoint(f"http://127.0.0.1:{port}/"), "evt_1", BODY)
    assert (result.outcome, result.status, result.error) == (
        Outcome.RETRY,
        None,
        "connection refused",
    )


@pytest_twisted.ensureDeferred
async def test_long_response_body_is_cut_and_the_status_stands(
    http: Server, sender: WebhookSender
) -> None:
    result = await sender.attempt(endpoint(http.url("/big")), "evt_1", BODY)
    assert (result.outcome, result.status) == (Outcome.DELIVERED, 200)


# --- keep-alive ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_keep_alive_one_connection_for_several_posts(
    http: Server, sender: WebhookSender
) -> None:
    target = endpoint(http.url("/ok"))
    for n in range(3):
        assert (await sender.attempt(target, f"evt_{n}", BODY)).outcome is Outcome.DELIVERED
    failed = await sender.attempt(endpoint(http.url("/status/500")), "evt_9", BODY)
    assert failed.status == 500
    assert (await sender.attempt(target, "evt_10", BODY)).outcome is Outcome.DELIVERED
    assert len(http.site.connections) == 1
    assert len({s.client_port for s in http.receiver.seen}) == 1


@pytest_twisted.ensureDeferred
async def test_close_closes_the_kept_connections(http: Server) -> None:
    from twisted.internet import reactor

    sender = WebhookSender(reactor)
    await sender.attempt(endpoint(http.url("/ok")), "evt_1", BODY)
    (connection,) = http.site.connections
    lost: Deferred[None] = Deferred()
    original: Callable[[Any], None] = connection.connectionLost

    def notice(reason: Any) -> None:
        original(reason)
        lost.callback(None)

    connection.connectionLost = notice
    await sender.close()
    await lost


# --- HTTPS ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_https_with_the_endpoint_ca(
    https: Server, sender: WebhookSender, ca: tuple[str, str, str]
) -> None:
    for host in ("127.0.0.1", "localhost"):
        target = endpoint(https.url("/ok", host), ca_file=ca[2])
        result = await sender.attempt(target, "evt_1", BODY)
        assert (result.outcome, result.status, result.error) == (Outcome.DELIVERED, 200, None)
    await sender.attempt(endpoint(https.url("/ok"), ca_file=ca[2]), "evt_2", BODY)
    assert len(https.site.connections) == 2  # one per host name, then reused


@pytest_twisted.ensureDeferred
async def test_https_with_the_wrong_ca_is_refused_and_retried(
    https: Server, sender: WebhookSender, tmp_path: Path
) -> None:
    _, _, other_ca = CA(tmp_path / "other").write("localhost", "127.0.0.1")
    result = await sender.attempt(endpoint(https.url("/ok"), ca_file=other_ca), "evt_1", BODY)
    assert (result.outcome, result.status) == (Outcome.RETRY, None)
    assert result.error is not None and "certificate verify failed" in result.error
    assert https.receiver.seen == []


@pytest_twisted.ensureDeferred
async def test_https_private_ca_is_not_trusted_by_the_system_store(
    https: Server, sender: WebhookSender
) -> None:
    result = await sender.attempt(endpoint(https.url("/ok")), "evt_1", BODY)
    assert (result.outcome, result.status) == (Outcome.RETRY, None)
    assert result.error is not None and "certificate verify failed" in result.error


@pytest_twisted.ensureDeferred
async def test_https_name_mismatch_is_refused(tmp_path: Path, sender: WebhookSender) -> None:
    chain, key, ca_file = CA(tmp_path / "elsewhere").write("elsewhere.test")
    server, listening = await _start(ReloadingServerTLS(chain, key))
    try:
        result = await sender.attempt(endpoint(server.url("/ok"), ca_file=ca_file), "evt_1", BODY)
        assert (result.outcome, result.status) == (Outcome.RETRY, None)
        assert server.receiver.seen == []
    finally:
        await _stop(server, listening)


# --- pure parts ----------------------------------------------------------------------------------

NOW = 1767225600.0  # Thu, 01 Jan 2026 00:00:00 GMT

RETRY_AFTER = [
    ("120", 120.0),
    (" 5 ", 5.0),
    (b"0", 0.0),
    ("Thu, 01 Jan 2026 00:01:30 GMT", 90.0),
    ("Thursday, 01-Jan-26 00:01:30 GMT", 90.0),
    ("Thu Jan  1 00:01:30 2026", 90.0),
    ("Wed, 31 Dec 2025 23:00:00 GMT", 0.0),
    ("-5", None),
    ("1.5", None),
    ("soon", None),
    ("", None),
    ("9" * 40, None),
    (None, None),
]


@pytest.mark.parametrize(("value", "expected"), RETRY_AFTER)
def test_parse_retry_after(value: str | bytes | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.DELIVERED),
        (299, Outcome.DELIVERED),
        (100, Outcome.RETRY),
        (301, Outcome.RETRY),
        (304, Outcome.RETRY),
        (400, Outcome.DEAD),
        (403, Outcome.DEAD),
        (408, Outcome.RETRY),
        (410, Outcome.DISABLE),
        (413, Outcome.DEAD),
        (429, Outcome.RETRY),
        (499, Outcome.DEAD),
        (500, Outcome.RETRY),
        (599, Outcome.RETRY),
        (999, Outcome.RETRY),
    ],
)
def test_classify(status: int, outcome: Outcome) -> None:
    assert classify(status) is outcome
