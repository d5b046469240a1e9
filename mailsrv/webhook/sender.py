"""One webhook delivery attempt: a signed HTTP POST and what its outcome means.

:meth:`WebhookSender.attempt` POSTs an event body to an endpoint with treq and returns a
Deferred that **always** fires with an :class:`AttemptResult`, never with a failure:

========================================  =================  ==============================
outcome                                   :class:`Outcome`   what the caller does
========================================  =================  ==============================
2xx                                       ``DELIVERED``      done
410 Gone                                  ``DISABLE``        disable the endpoint (log it)
any other 4xx except 408 and 429          ``DEAD``           dead-letter the event
5xx, 408, 429, 3xx (redirects are not     ``RETRY``          retry per the schedule,
followed), any other status, a timeout                       honouring ``retry_after``
(also a body that never ends after any
status), a refused or dropped
connection, TLS verification failure
========================================  =================  ==============================

``Retry-After`` (delta-seconds or an HTTP date) is parsed against the injected clock and
returned in seconds.  The timeout (the endpoint's, 15 s by default) covers the **whole**
request: connecting, TLS, sending, the status line and reading the response body (treq's own
``timeout`` stops at the response headers).  It is measured on the injected ``clock`` (an
``IReactorTime``: the reactor, or ``task.Clock`` in tests), which also gives the latency and
the ``webhook-timestamp`` of the signature.  At most 1 MiB of a response body is read (its
first 512 bytes are kept for the error text); a longer one closes the connection.

Connections are kept alive and reused: one persistent ``HTTPConnectionPool`` per trust root
(the system CAs, or one per endpoint CA bundle, so a connection verified against one bundle
never serves an endpoint that trusts another).  Redirects are not followed, cookies are never
kept, request bodies are written from memory (no global reactor, no cooperator).
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from enum import Enum
from http.cookiejar import CookieJar
from typing import Any, cast

from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from mailsrv.webhook.endpoints import Endpoint
from mailsrv.webhook.signing import Signer
from mailsrv.webhook.trust import https_policy

_log = Logger(namespace="mailsrv.webhook")

MAX_RESPONSE_BODY = 1024 * 1024
"""The most of a response body that is read; past it the connection is closed."""
ERROR_SNIPPET = 512
"""How much of a non-2xx response body goes into the error text."""
DEFAULT_IDLE_TIMEOUT = 30
"""How long an unused connection stays open for reuse."""


class Outcome(Enum):
    """What an attempt's result means for the event (see the module docstring)."""

    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"
    DISABLE = "disable"


@dataclass(frozen=True)
class AttemptResult:
    """One attempt: its outcome, the HTTP status (None if no response headers came), the
    latency in seconds, the receiver's ``Retry-After`` in seconds (None if none or
    unparsable), and an error text for anything but a complete 2xx (one line).

    A response whose body does not end within the timeout is retried whatever its status.
    """

    outcome: Outcome
    status: int | None
    latency: float
    retry_after: float | None = None
    error: str | None = None


def classify(status: int) -> Outcome:
    """The outcome of an HTTP status code."""
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if status == 410:
        return Outcome.DISABLE
    if 400 <= status < 500 and status not in (408, 429):
        return Outcome.DEAD
    return Outcome.RETRY


def parse_retry_after(value: str | bytes | None, now: float) -> float | None:
    """``Retry-After`` in seconds from ``now``: delta-seconds or an HTTP date; None if bad.

    A date in the past gives 0.
    """
    if value is None:
        return None
    text = (value.decode("latin-1") if isinstance(value, bytes) else value).strip()
    if text.isascii() and text.isdigit():
        return float(text) if len(text) <= 12 else None
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    seconds = moment.timestamp() - now
    return max(0.0, seconds) if math.isfinite(seconds) else None


class _NoCookies(IndexableCookieJar):
    """A cookie jar that never holds a cookie, at no cost: treq puts every request and response
    through one (``CookieAgent``), and :mod:`http.cookiejar`'s checks of an empty jar with a
    refusing policy were a tenth of the reactor's time per webhook under load."""

    def add_cookie_header(self, request: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass

    def set_cookie(self, cookie: Any) -> None:
        pass


_NO_REQUEST_COOKIES = CookieJar()
"""Given as every request's ``cookies``, so treq makes no jar of its own per request."""


@implementer(IBodyProducer)
class _BytesProducer:
    """A request body already in memory, written at once."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _BodySnippet(Protocol):
    """Reads a response body, keeping its start; closes the connection past the limit."""

    def __init__(self, finished: Deferred[bytes]) -> None:
        self._finished = finished
        self._kept = b""
        self._seen = 0

    def dataReceived(self, data: bytes) -> None:
        if len(self._kept) < ERROR_SNIPPET:
            self._kept += data[: ERROR_SNIPPET - len(self._kept)]
        self._seen += len(data)
        if self._seen > MAX_RESPONSE_BODY and self.transport is not None:
            # Aborts the connection; connectionLost follows.
            cast(IPushProducer, self.transport).stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Whatever ended the body (done, cut short, aborted), the status line decides.
        if not self._finished.called:  # not when cancelled (timed out) first
            self._finished.callback(self._kept)


def _read_body(response: IResponse) -> Deferred[tuple[IResponse, bytes]]:
    def cancel(_: Deferred[bytes]) -> None:
        if protocol.transport is not None:
            cast(IPushProducer, protocol.transport).stopProducing()

    finished: Deferred[bytes] = Deferred(cancel)
    protocol = _BodySnippet(finished)
    response.deliverBody(protocol)
    return finished.addCallback(lambda snippet: (response, snippet))


_KNOWN_FAILURES = (
    net_error.TimeoutError,
    net_error.ConnectError,
    net_error.ConnectionLost,
    net_error.ConnectionDone,
    net_error.DNSLookupError,
)


def _one_line(text: str, limit: int = 500) -> str:
    return " ".join(text.split())[:limit]


def _describe(failure: Failure) -> str:
    reasons = getattr(failure.value, "reasons", None)  # ResponseFailed & co. wrap Failures
    if reasons:
        inner = "; ".join(_describe(reason) for reason in reasons if isinstance(reason, Failure))
        return f"{type(failure.value).__name__}: {inner}"
    if failure.check(net_error.ConnectionRefusedError):
        return "connection refused"
    message = failure.getErrorMessage()
    name = type(failure.value).__name__
    return name if not message or message == name else f"{name}: {message}"


class WebhookSender:
    """Sends webhook requests over kept-alive connections (see the module docstring).

    ``reactor`` provides TCP and time for the connections; ``clock`` (default: the reactor)
    times the whole request and stamps the signature.  Call :meth:`close` when stopping.
    """

    def __init__(
        self,
        reactor: Any,
        clock: IReactorTime | None = None,
        idle_timeout: int = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._idle_timeout = idle_timeout
        self._pools: dict[str | None, HTTPConnectionPool] = {}
        self._clients: dict[str | None, HTTPClient] = {}
        self._signers: dict[tuple[str, ...], Signer] = {}

    def _client(self, endpoint: Endpoint) -> HTTPClient:
        key = endpoint.ca_file
        client = self._clients.get(key)
        if client is None:
            pool = HTTPConnectionPool(self._reactor, persistent=True)
            pool.cachedConnectionTimeout = self._idle_timeout
            pool.maxPersistentPerHost = endpoint.concurrency
            agent = Agent(self._reactor, contextFactory=https_policy(key), pool=pool)
            client = HTTPClient(agent, cookiejar=_NoCookies(), data_to_body_producer=_BytesProducer)
            self._pools[key], self._clients[key] = pool, client
        pool = self._pools[key]
        pool.maxPersistentPerHost = max(pool.maxPersistentPerHost, endpoint.concurrency)
        return client

    def renewed(self, endpoints: Sequence[Endpoint]) -> Callable[[], None]:
        """Clients for ``endpoints`` made afresh, their CA bundles read again (blocking; raises
        :class:`~mailsrv.trust.TrustError`); what it returns installs them, and closes the idle
        connections of the old ones (requests in flight finish on theirs)."""
        fresh = WebhookSender(self._reactor, self._clock, self._idle_timeout)
        for endpoint in endpoints:
            fresh.prepare(endpoint)

        def install() -> None:
            old = list(self._pools.values())
            self._pools, self._clients = fresh._pools, fresh._clients
            self._signers = fresh._signers
            for pool in old:
                pool.closeCachedConnections()

        return install

    def prepare(self, endpoint: Endpoint) -> None:
        """Make ``endpoint``'s client now (it reads the CA bundle: blocking, so at start)."""
        self._client(endpoint)
        self._signer(endpoint)

    def _signer(self, endpoint: Endpoint) -> Signer:
        signer = self._signers.get(endpoint.secrets)
        if signer is None:
            signer = self._signers[endpoint.secrets] = Signer(endpoint.secrets)
        return signer

    def attempt(self, endpoint: Endpoint, event_id: str, body: bytes) -> Deferred[AttemptResult]:
        """POST ``body`` (the encoded event) to ``endpoint``, signed for ``event_id``.

        The Deferred always fires with an :class:`AttemptResult`, within the endpoint's
        timeout on ``clock``.
        """
        started = self._clock.seconds()
        try:
            headers: Mapping[str, str] = self._signer(endpoint).headers(event_id, started, body)
            request = self._client(endpoint).post(
                endpoint.url,
                data=body,
                headers=Headers({name: [value] for name, value in headers.items()}),
                allow_redirects=False,
                cookies=_NO_REQUEST_COOKIES,
                unbuffered=True,
                reactor=self._reactor,
            )
        except Exception:
            _log.failure(
                "webhook {endpoint}: the request could not be made", endpoint=endpoint.name
            )
            return succeed(AttemptResult(Outcome.RETRY, None, 0.0, error="request not made"))
        answered_with: list[int] = []  # the status, once the response headers are in

        def headers_in(response: IResponse) -> IResponse:
            answered_with.append(response.code)
            return response

        request.addCallback(headers_in)
        request.addCallback(_read_body)
        # Not addTimeout: the Agent turns a cancel into ResponseNeverReceived(CancelledError).
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            request.cancel()

        timer = self._clock.callLater(endpoint.timeout, expire)

        def stop_timer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        request.addBoth(stop_timer)

        def answered(result: tuple[IResponse, bytes]) -> AttemptResult:
            response, snippet = result
            status = response.code
            outcome = classify(status)
            retry_after = parse_retry_after(
                (response.headers.getRawHeaders(b"retry-after") or [None])[0],
                self._clock.seconds(),
            )
            problem = None
            if outcome is not Outcome.DELIVERED:
                text = _one_line(snippet.decode("utf-8", "replace"), 200)
                problem = f"HTTP {status}" + (f": {text}" if text else "")
            latency = self._clock.seconds() - started
            return AttemptResult(outcome, status, latency, retry_after, problem)

        def failed(failure: Failure) -> AttemptResult:
            latency = self._clock.seconds() - started
            if expired and answered_with:
                problem = (
                    f"HTTP {answered_with[0]}, but the body did not end within"
                    f" {endpoint.timeout:g} s"
                )
                return AttemptResult(Outcome.RETRY, answered_with[0], latency, None, problem)
            if expired:
                problem = f"no response within {endpoint.timeout:g} s"
            else:
                problem = _one_line(_describe(failure))
                if not failure.check(*_KNOWN_FAILURES) and not getattr(
                    failure.value, "reasons", None
                ):
                    _log.failure(
                        "webhook {endpoint}: unexpected error", failure, endpoint=endpoint.name
                    )
            return AttemptResult(Outcome.RETRY, None, latency, None, problem)

        return request.addCallbacks(answered, failed)

    def close(self) -> Deferred[Any]:
        """Close every kept-alive connection; fires when they are closed."""
        pools = list(self._pools.values())
        self._pools.clear()
        self._clients.clear()
        return DeferredList([pool.closeCachedConnections() for pool in pools])
