"""Helpers for the webhook tests: a scripted twisted.web receiver (HTTP or HTTPS, certificates
from trustme) on 127.0.0.1, and an outbox fed through the real commit path and sent by the
real dispatcher and sender, with time on a ``task.Clock``."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import standardwebhooks
import trustme
from twisted.internet import task, threads
from twisted.internet.defer import Deferred, succeed
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mailsrv.delivery.committer import GroupCommitter
from mailsrv.delivery.envelope import (
    AcceptedMessage,
    ClientFacts,
    LocalRoute,
    Recipient,
    RemoteRoute,
)
from mailsrv.delivery.maildir import MaildirSink, MaildirStore
from mailsrv.delivery.spool import Spool
from mailsrv.ops.metrics import Metrics
from mailsrv.tls import ReloadingServerTLS
from mailsrv.webhook.build import PayloadBuilder
from mailsrv.webhook.delivery import InProcessDelivery
from mailsrv.webhook.dispatcher import DONE_KEPT, WebhookDispatcher
from mailsrv.webhook.endpoint_state import DisabledEndpoints
from mailsrv.webhook.endpoints import Endpoint
from mailsrv.webhook.entries import OutboxEntry
from mailsrv.webhook.outbox_store import OutboxStore
from mailsrv.webhook.payload import load_schema
from mailsrv.webhook.retry import RetrySchedule
from mailsrv.webhook.sender import WebhookSender
from mailsrv.webhook.signing import generate_secret
from mailsrv.webhook.sink import OutboxSink

SECRET = generate_secret()
VALIDATOR = jsonschema.Draft202012Validator(load_schema())


# --- the receiver ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One scripted answer: a status (and headers), or no answer at all (``hang``)."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    hang: bool = False


HANG = Answer(hang=True)


@dataclass
class Seen:
    """One request as the receiver got it."""

    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


class Receiver(Resource):
    """Answers each path from its script, then 200; remembers every request."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []
        self.scripts: dict[str, list[Answer]] = {}
        self.hanging: list[Request] = []
        self._waiters: list[tuple[int, str | None, Deferred[None]]] = []

    def script(self, path: str, *answers: Answer) -> None:
        """Answer the next requests to ``path`` with ``answers``, then 200."""
        self.scripts.setdefault(path, []).extend(answers)

    def at(self, path: str) -> list[Seen]:
        """The requests to ``path``."""
        return [seen for seen in self.seen if seen.path == path]

    def arrived(self, count: int, path: str | None = None) -> Deferred[None]:
        """Fires once ``count`` requests (to ``path``, or to any path) have arrived."""
        d: Deferred[None] = Deferred()
        self._waiters.append((count, path, d))
        self._check()
        return d

    def _check(self) -> None:
        for waiter in list(self._waiters):
            count, path, d = waiter
            if len(self.at(path) if path else self.seen) >= count:
                self._waiters.remove(waiter)
                d.callback(None)

    def render_POST(self, request: Request) -> bytes | int:
        assert request.content is not None
        headers = {
            k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()
        }
        path = request.path.decode()
        self.seen.append(Seen(path, headers, request.content.read()))
        script = self.scripts.get(path)
        answer = script.pop(0) if script else Answer()
        self._check()
        if answer.hang:
            self.hanging.append(request)
            return NOT_DONE_YET
        request.setResponseCode(answer.status)
        for name, value in answer.headers:
            request.setHeader(name.encode(), value.encode())
        return b"ok" if answer.status < 300 else b"receiver says no"


@dataclass
class Listening:
    """A receiver on 127.0.0.1: its port (kept across stop and start) and scheme."""

    receiver: Receiver
    tls: ReloadingServerTLS | None = None
    port: int = 0
    _listening: Any = None
    _site: WrappingFactory | None = None  # knows the open connections, to drop them

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def start(self) -> None:
        """Listen (again, on the same port if it had one)."""
        from twisted.internet import reactor

        self._site = WrappingFactory(Site(self.receiver))
        factory: Any = (
            self._site if self.tls is None else TLSMemoryBIOFactory(self.tls, False, self._site)
        )
        self._listening = reactor.listenTCP(  # type: ignore[attr-defined]
            self.port, factory, interface="127.0.0.1"
        )
        self.port = self._listening.getHost().port

    async def stop(self) -> None:
        """Stop listening and drop every open connection (the receiver is down)."""
        if self._listening is not None:
            await self._listening.stopListening()
            self._listening = None
        if self._site is not None:
            for connection in list(self._site.protocols):
                connection.transport.abortConnection()


def start_receiver(tls: ReloadingServerTLS | None = None) -> Listening:
    listening = Listening(Receiver(), tls)
    listening.start()
    return listening


@dataclass
class CA:
    """A CA made by trustme, and a certificate for 127.0.0.1 it issued, as PEM files."""

    folder: Path
    authority: trustme.CA = field(default_factory=trustme.CA)

    def server_tls(self) -> ReloadingServerTLS:
        self.folder.mkdir(parents=True, exist_ok=True)
        cert = self.authority.issue_cert("127.0.0.1", "localhost")
        chain, key = self.folder / "chain.pem", self.folder / "key.pem"
        chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        key.write_bytes(cert.private_key_pem.bytes())
        return ReloadingServerTLS(str(chain), str(key))

    @property
    def ca_file(self) -> str:
        path = self.folder / "ca.pem"
        self.folder.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.authority.cert_pem.bytes())
        return str(path)


# --- checks on what arrived ------------------------------------------------------------------


def check_signed(seen: Seen, secret: str = SECRET, now: float | None = None) -> dict[str, Any]:
    """The event, after the standardwebhooks library accepted its signature.

    With the clock far from real time (``now`` given), the library's signer is compared
    instead of its verifier, whose timestamp window is the real clock's.
    """
    hook = standardwebhooks.Webhook(secret)
    if now is None:
        event: dict[str, Any] = hook.verify(seen.body, seen.headers)
    else:
        moment = datetime.fromtimestamp(int(seen.headers["webhook-timestamp"]), UTC)
        expected = hook.sign(seen.webhook_id, moment, seen.body.decode())
        assert expected in seen.headers["webhook-signature"].split(" ")
        event = seen.event
    assert event["id"] == seen.webhook_id
    VALIDATOR.validate(event)
    return event


# --- an outbox with its dispatcher -----------------------------------------------------------


def run_now(function: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    return succeed(function(*args, **kwargs))


FAST = RetrySchedule(delays=(0.0, 5.0, 60.0, 600.0), jitter=0.0)


def endpoint(name: str, url: str, **kwargs: Any) -> Endpoint:
    """A test endpoint: signed with :data:`SECRET`, the :data:`FAST` schedule by default."""
    kwargs.setdefault("timeout", 10.0)
    kwargs.setdefault("retry", FAST)
    return Endpoint(name=name, url=url, secrets=(SECRET,), **kwargs)


CLIENT = ClientFacts(ip="192.0.2.7", helo="client.example", listener="mx", tls_version="TLSv1.3")


class OutboxRig:
    """The outbox under ``tmp_path``: messages committed through the real Maildir and outbox
    sinks (an inline committer), sent by the real dispatcher and sender; time on ``clock``,
    set to the real time at the start (signatures carry it)."""

    def __init__(self, tmp_path: Path, endpoints: list[Endpoint]) -> None:
        self.tmp_path = tmp_path
        self.endpoints = endpoints
        self.clock = task.Clock()
        self.clock.advance(time.time())
        self.root = tmp_path / "data" / "outbox"
        self.maildir = MaildirSink(MaildirStore(tmp_path / "data" / "mail", "mx.example.org"))
        self.spool = Spool(tmp_path / "data" / "spool", run_now)
        self.spool.prepare()
        self.counter = 0

    def start(
        self, endpoints: list[Endpoint] | None = None, done_kept: int = DONE_KEPT
    ) -> WebhookDispatcher:
        """Load the outbox from disk and start a dispatcher, as the server does at start (a
        restart, when called again after :meth:`stop`)."""
        from twisted.internet import reactor

        if endpoints is not None:
            self.endpoints = endpoints
        self.store = OutboxStore(self.root, threads.deferToThread)
        self.states = DisabledEndpoints(self.root / "endpoints", threads.deferToThread)
        self.sender = WebhookSender(reactor, clock=self.clock)
        self.metrics = Metrics()
        self.dispatcher = WebhookDispatcher(
            self.store,
            self.states,
            self.endpoints,
            InProcessDelivery(self.sender, PayloadBuilder(self.store, threads.deferToThread)),
            self.clock,
            random.Random(3),
            loaded=self.store.load_now(),
            disabled=self.states.load_now(),
            stop_grace=5.0,
            done_kept=done_kept,
            metrics=self.metrics,
        )
        self.sink = OutboxSink(self.store, self.endpoints, self.maildir.delivered)
        self.sink.listen(self.dispatcher.added)
        self.committer = GroupCommitter.inline([self.maildir, self.sink], lambda: None)
        self.committer.startService()
        self.dispatcher.startService()
        self.clock.advance(0)
        return self.dispatcher

    async def stop(self) -> None:
        if self.dispatcher.running:
            stopping = self.dispatcher.stopService()
            self.clock.advance(10)  # past the stop grace, for attempts that never end
            await stopping

    def commit(
        self, local: tuple[str, ...] = ("alice@example.org",), remote: tuple[str, ...] = ()
    ) -> AcceptedMessage:
        """Commit a message for ``local`` mailboxes and ``remote`` addresses (its events are
        made and handed to the dispatcher); the clock is then advanced by 0."""
        self.counter += 1
        queue_id = f"WQ{self.counter:05d}"
        body = (
            b"Return-Path: <sender@remote.test>\n"
            b"Received: from client.example by mx.example.org\n"
            b"From: Sender <sender@remote.test>\n"
            b"To: alice@example.org\n"
            b"Subject: hello " + str(self.counter).encode() + b"\n"
            b"\n"
            b"Hello there.\n"
        )
        recipients = [Recipient(a, LocalRoute((a,))) for a in local]
        recipients += [Recipient(a, RemoteRoute(a.rpartition("@")[2])) for a in remote]
        message = AcceptedMessage(
            queue_id,
            "sender@remote.test",
            tuple(recipients),
            CLIENT,
            self.clock.seconds(),
            len(body),
        )
        spool_file = self.spool.open(queue_id, lambda: None, lambda: None)
        spool_file.write(body)
        done = self.committer.commit(message, spool_file)
        assert done.called and not isinstance(done.result, Exception), done.result
        self.clock.advance(0)
        return message

    def on_disk(self) -> dict[str, OutboxEntry]:
        """What is on disk now, by key."""
        fresh = OutboxStore(self.root, run_now)
        found: list[OutboxEntry] = []
        fresh.records().addCallback(found.extend)
        return {entry.key: entry for entry in found}

    def entries(self) -> dict[str, OutboxEntry]:
        """What ``mailsrv webhooks list`` shows: the disk, and the done entries the running
        dispatcher remembers (they are no longer on disk)."""
        done = {entry.key: entry for entry in self.dispatcher.delivered()}
        assert not done.keys() & self.on_disk().keys(), "a done entry left on disk"
        return {**self.on_disk(), **done}

    async def settle(self) -> None:
        """Wait until the attempts in flight (and those they let start) are over."""
        await self.dispatcher.settled()
