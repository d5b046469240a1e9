"""The ops HTTP listener: ``/metrics``, ``/healthz`` and ``/readyz`` on a ``twisted.web`` site.

* ``/metrics``: the Prometheus text exposition of :class:`~mailsrv.ops.metrics.Metrics`,
  rendered in the I/O threads (collecting walks every metric under its locks), never on the
  reactor.
* ``/healthz``: ``200 ok`` whenever the reactor turns (that it answers at all is the check).
* ``/readyz``: runs every readiness check (:mod:`mailsrv.ops.readiness`); ``200`` when all
  pass, else ``503``; the body is JSON either way:
  ``{"ready": bool, "checks": {name: {"ok": bool, "detail": str}}}``.

With a token set, every request needs ``Authorization: Bearer <token>`` (compared in constant
time) or gets ``401`` with ``WWW-Authenticate: Bearer``.  Other paths get ``404``, methods other
than GET and HEAD ``405``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Mapping
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.application.service import Service
from twisted.internet.defer import DeferredList, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mailsrv.ops.metrics import Metrics
from mailsrv.ops.readiness import Check, CheckResult
from mailsrv.threads import RunInThread

_log = Logger(namespace="mailsrv.ops")

_TEXT = b"text/plain; charset=utf-8"
_JSON = b"application/json"


class OpsResource(Resource):
    """Every path of the ops listener (one leaf resource; see the module docstring)."""

    isLeaf = True

    def __init__(
        self,
        metrics: Metrics,
        run_in_thread: RunInThread,
        checks: Mapping[str, Check],
        token: str = "",
    ) -> None:
        super().__init__()
        self._metrics = metrics
        self._run = run_in_thread
        self._checks = dict(checks)
        self._expected = b"Bearer " + token.encode() if token else b""
        self._routes = {
            b"/metrics": self._render_metrics,
            b"/healthz": self._render_health,
            b"/readyz": self._render_ready,
        }

    def render(self, request: Request) -> Any:
        if self._expected and not hmac.compare_digest(
            request.getHeader(b"authorization") or b"", self._expected
        ):
            request.setHeader(b"www-authenticate", b"Bearer")
            return _plain(request, 401, b"unauthorized\n")
        route = self._routes.get(request.path)
        if route is None:
            return _plain(request, 404, b"not found\n")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _plain(request, 405, b"method not allowed\n")
        return route(request)

    def _render_health(self, request: Request) -> bytes:
        return _plain(request, 200, b"ok\n")

    def _render_metrics(self, request: Request) -> int:
        gone = _watch(request)
        try:
            self._metrics.refresh()  # gauges read from in-memory state, here on the reactor
        except Exception:
            _log.failure("refreshing metrics before a scrape failed")
        rendered = self._run(self._metrics.render)

        def send(body: bytes) -> None:
            if not gone:
                request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
                _finish(request, 200, body)

        def failed(failure: Failure) -> None:
            _log.failure("rendering /metrics failed", failure)
            if not gone:
                request.setHeader(b"content-type", _TEXT)
                _finish(request, 500, b"metrics unavailable\n")

        rendered.addCallbacks(send, failed)
        return NOT_DONE_YET

    def _render_ready(self, request: Request) -> int:
        gone = _watch(request)
        names = sorted(self._checks)
        running = DeferredList([self._checks[name]() for name in names], consumeErrors=True)

        def send(results: list[tuple[bool, Any]]) -> None:
            checks = {}
            for name, (fired, value) in zip(names, results, strict=True):
                ok, detail = _result(fired, value)
                checks[name] = {"ok": ok, "detail": detail}
            ready = all(check["ok"] for check in checks.values())
            if not ready:
                failing = [name for name, check in checks.items() if not check["ok"]]
                _log.info("not ready: {failing}", failing=", ".join(failing))
            if gone:
                return
            body = json.dumps({"ready": ready, "checks": checks}, sort_keys=True).encode()
            request.setHeader(b"content-type", _JSON)
            request.setHeader(b"cache-control", b"no-store")
            _finish(request, 200 if ready else 503, body + b"\n")

        running.addCallback(send)
        return NOT_DONE_YET


def _result(fired: bool, value: Any) -> CheckResult:
    if not fired:
        return False, f"check failed: {value.getErrorMessage()}"
    ok, detail = value
    return bool(ok), str(detail)


def _plain(request: Request, code: int, body: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", _TEXT)
    return body


def _watch(request: Request) -> list[bool]:
    """A list that becomes non-empty if the client goes away before the answer is ready."""
    gone: list[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))
    return gone


def _finish(request: Request, code: int, body: bytes) -> None:
    request.setResponseCode(code)
    request.setHeader(b"content-length", str(len(body)).encode())
    request.write(body)
    request.finish()


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OpsHTTPService(Service):
    """Listens for the ops HTTP site on ``host``:``port`` (0 picks a free port: tests).

    Bound in ``privilegedStartService`` like the SMTP listeners, so a port below 1024 works
    when twistd drops privileges; :attr:`listening` is the bound port.
    """

    def __init__(
        self, reactor: Any, host: str, port: int, resource: Resource, token_set: bool
    ) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._site = Site(resource)
        self._site.noisy = False
        self._site.displayTracebacks = False
        self._token_set = token_set
        self.listening: IListeningPort | None = None
        self.setName("ops-http")

    def _listen(self) -> None:
        from twisted.internet.error import CannotListenError

        try:
            self.listening = self._reactor.listenTCP(self._port, self._site, interface=self._host)
        except CannotListenError as e:
            raise SystemExit(
                f"mailsrv: cannot listen for metrics on port {self._port}: {e.socketError}"
            ) from None
        address: Any = self.listening.getHost()
        _log.info(
            "ops HTTP (/metrics, /healthz, /readyz) on [{host}]:{port}",
            host=address.host,
            port=address.port,
        )
        if not is_loopback(self._host) and not self._token_set:
            _log.warn(
                "ops HTTP listener on {host} is reachable beyond this machine without a"
                " token; set metrics_token (SMTP_METRICS_TOKEN)",
                host=self._host,
            )

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.listening is None:
            self._listen()

    def startService(self) -> None:
        super().startService()
        if self.listening is None:
            self._listen()

    def stopService(self) -> Any:
        super().stopService()
        listening, self.listening = self.listening, None
        if listening is None:
            return None
        return maybeDeferred(listening.stopListening)
