"""The queue control socket: how ``mailsrv queue`` reaches the running server.

The server listens on a UNIX stream socket (``queue_control_socket``, by default
``<data_dir>/queue/control.sock``; mode 0600 in the 0700 queue directory, so only the server's
user and root can connect).  The protocol is line-delimited JSON, one request object per line
and one response object per line, in order, so it can be scripted (``socat``) as well::

    {"action": "list"}                         -> {"ok": true, "messages": [RECORD, ...]}
    {"action": "show", "queue_id": ID}         -> {"ok": true, "record": RECORD, "headers": TEXT}
    {"action": "flush", "queue_id": ID|null}   -> {"ok": true, "outcome": LINE}
    {"action": "delete"|"hold"|"release", "queue_id": ID, "recipient": ADDRESS|null}
                                               -> {"ok": true, "outcome": LINE}
    anything refused                           -> {"ok": false, "error": LINE}

RECORD is a queue record exactly as stored (:func:`mailsrv.relay.records.to_dict`).  The server
applies each request in its reactor through :class:`~mailsrv.relay.actions.IQueueActions`, the
same code as its own writes, so the two never race.  :func:`perform` is also what the CLI runs
itself when no server is running.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from mailsrv.relay.actions import IQueueActions
from mailsrv.relay.queue_lock import QueueLock
from mailsrv.relay.queue_store import QueueError
from mailsrv.relay.records import to_dict, valid_queue_id

_log = Logger(namespace="mailsrv.relay")

ACTIONS = ("list", "show", "flush", "delete", "hold", "release")
_NEEDS_ID = frozenset(("show", "delete", "hold", "release"))
_TAKES_RECIPIENT = frozenset(("delete", "hold", "release"))
MAX_REQUEST = 64 * 1024
_MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with the final NUL on Linux


def socket_path_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a UNIX socket address (too long), or None."""
    size = len(os.fsencode(path))
    if size > _MAX_SOCKET_PATH:
        return (
            f"the control socket path {path} is {size} bytes, over the {_MAX_SOCKET_PATH} a "
            "UNIX socket allows: set queue_control_socket to a shorter path"
        )
    return None


@dataclass(frozen=True)
class Request:
    """One validated control request."""

    action: str
    queue_id: str | None = None
    recipient: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The request as sent on the socket."""
        return {"action": self.action, "queue_id": self.queue_id, "recipient": self.recipient}


def parse_request(raw: object) -> Request:
    """A :class:`Request` from its JSON object; QueueError (one line) if it is not valid."""
    if not isinstance(raw, dict) or not isinstance(raw.get("action"), str):
        raise QueueError("bad request: expected an object with an action")
    action = raw["action"]
    if action not in ACTIONS:
        raise QueueError(f"bad request: unknown action {action!r}")
    unknown = raw.keys() - {"action", "queue_id", "recipient"}
    if unknown:
        raise QueueError(f"bad request: unknown field {sorted(unknown)[0]!r}")
    queue_id, recipient = raw.get("queue_id"), raw.get("recipient")
    if queue_id is not None and (not isinstance(queue_id, str) or not valid_queue_id(queue_id)):
        raise QueueError(f"invalid queue id {queue_id!r}")
    if queue_id is None and action in _NEEDS_ID:
        raise QueueError(f"bad request: {action} needs a queue_id")
    if queue_id is not None and action == "list":
        raise QueueError("bad request: list takes no queue_id")
    if recipient is not None:
        if action not in _TAKES_RECIPIENT:
            raise QueueError(f"bad request: {action} takes no recipient")
        if not isinstance(recipient, str) or not recipient or not recipient.isprintable():
            raise QueueError(f"invalid recipient {recipient!r}")
    return Request(action, queue_id, recipient)


async def perform(actions: IQueueActions, request: Request) -> dict[str, Any]:
    """Run ``request`` on ``actions``; the successful response (QueueError is passed on)."""
    if request.action == "list":
        records = await actions.list_messages()
        return {"ok": True, "messages": [to_dict(r) for r in records]}
    if request.action == "show":
        assert request.queue_id is not None
        record, headers = await actions.show(request.queue_id)
        text = headers.decode("utf-8", errors="replace")
        return {"ok": True, "record": to_dict(record), "headers": text}
    if request.action == "flush":
        outcome = await actions.flush(request.queue_id)
    else:
        assert request.queue_id is not None
        method = {"delete": actions.delete, "hold": actions.hold, "release": actions.release}
        outcome = await method[request.action](request.queue_id, request.recipient)
    return {"ok": True, "outcome": outcome}


# --- the server side -------------------------------------------------------------------------


class ControlProtocol(LineOnlyReceiver):
    """One control connection: requests answered one at a time, in order.

    The connection is closed after ``timeout`` seconds without a request (not while one is
    being answered).
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST

    def __init__(
        self, actions: IQueueActions, clock: IReactorTime, timeout: float, live: set[Any]
    ) -> None:
        self._actions = actions
        self._clock = clock
        self._timeout = timeout
        self._live = live
        self._idle: IDelayedCall | None = None
        self._busy = 0
        self._connected = False
        self._tail: Deferred[None] = succeed(None)

    def connectionMade(self) -> None:
        self._connected = True
        self._live.add(self)
        self._wait_idle()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._connected = False
        self._live.discard(self)
        self._stop_idle()

    def _wait_idle(self) -> None:
        self._stop_idle()
        if self._connected and not self._busy:
            self._idle = self._clock.callLater(self._timeout, self.abort)

    def _stop_idle(self) -> None:
        idle, self._idle = self._idle, None
        if idle is not None and idle.active():
            idle.cancel()

    def abort(self) -> None:
        """Close the connection at once (idle for too long, or the server stops)."""
        if self._connected:
            cast(Any, self.transport).abortConnection()

    def finished(self) -> Deferred[None]:
        """Fires when the requests received so far are answered (or given up)."""
        done: Deferred[None] = Deferred()
        self._tail.addBoth(lambda _: done.callback(None))
        return done

    def lineReceived(self, line: bytes) -> None:
        self._busy += 1
        self._stop_idle()
        self._tail.addCallback(lambda _: Deferred.fromCoroutine(self._answer(line)))

    def lineLengthExceeded(self, line: bytes) -> None:
        self._send({"ok": False, "error": f"bad request: longer than {MAX_REQUEST} bytes"})
        if self._connected:
            cast(Any, self.transport).loseConnection()

    async def _answer(self, line: bytes) -> None:
        response: dict[str, Any]
        try:
            try:
                raw = json.loads(line)
            except ValueError:
                raise QueueError("bad request: not a JSON object") from None
            response = await perform(self._actions, parse_request(raw))
        except QueueError as e:
            response = {"ok": False, "error": str(e)}
        except Exception:
            _log.failure("queue control request failed: {line!r}", line=line[:200])
            response = {"ok": False, "error": "internal error (see the server log)"}
        self._send(response)
        self._busy -= 1
        self._wait_idle()

    def _send(self, response: dict[str, Any]) -> None:
        if self._connected:
            self.sendLine(json.dumps(response, ensure_ascii=False).encode("utf-8"))


class _ControlFactory(Factory):
    """Makes :class:`ControlProtocol` instances and knows the live ones."""

    noisy = False  # the service logs its socket once; no "starting on" lines

    def __init__(self, actions: IQueueActions, clock: Any, timeout: float) -> None:
        self._actions = actions
        self._clock = clock
        self._timeout = timeout
        self.live: set[ControlProtocol] = set()

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        return ControlProtocol(self._actions, self._clock, self._timeout, self.live)


class QueueControlService(Service):
    """Listens on the control socket while the server runs; releases the queue lock at stop.

    ``reactor`` provides ``IReactorUNIX`` (and ``IReactorTime``, unless ``clock`` is given for
    the idle timeout); ``actions`` is the scheduler (or
    :class:`~mailsrv.relay.actions.StoreActions` when there is none); ``lock`` is the server's
    :class:`~mailsrv.relay.queue_lock.QueueLock`, already acquired, released when this service
    stops.
    """

    def __init__(
        self,
        path: Path,
        actions: IQueueActions,
        reactor: Any,
        lock: QueueLock | None = None,
        timeout: float = 60.0,
        clock: IReactorTime | None = None,
    ) -> None:
        self.path = path
        self._factory = _ControlFactory(actions, clock or reactor, timeout)
        self._reactor = reactor
        self._lock = lock
        self._port: IListeningPort | None = None
        self.setName("queue-control")

    def startService(self) -> None:
        super().startService()
        try:  # a socket left by a server that died: ours now, since we hold the queue lock
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._port = self._reactor.listenUNIX(str(self.path), self._factory, mode=0o600)
        _log.info("queue control socket at {path}", path=str(self.path))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self._port = self._port, None
        stopped: Deferred[Any] = maybeDeferred(port.stopListening) if port else succeed(None)

        def close_connections(_: object) -> Deferred[Any]:
            # Requests already read may still be writing: the lock goes only after them.
            live = list(self._factory.live)
            for protocol in live:
                protocol.abort()
            return gatherResults([protocol.finished() for protocol in live])

        def release(result: object) -> None:
            if self._lock is not None:
                self._lock.release()
            if isinstance(result, Failure):
                _log.failure("stopping the queue control socket", result)

        stopped.addCallback(close_connections)
        stopped.addBoth(release)
        return stopped


# --- the client side (blocking: the CLI) ------------------------------------------------------


class ControlError(Exception):
    """The server could not be asked; the message is one line."""


def ask(path: Path, request: Request, timeout: float = 60.0) -> dict[str, Any]:
    """Send ``request`` to the server at ``path``; its response (ok or not)."""
    line = json.dumps(request.to_json(), ensure_ascii=False).encode("utf-8") + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fsencode(path))
            sock.sendall(line)
            data = _read_line(sock)
        except TimeoutError:
            raise ControlError(f"no answer from the server on {path} in {timeout:g} s") from None
        except OSError as e:
            reason = e.strerror or type(e).__name__
            raise ControlError(f"cannot reach the server on {path}: {reason}") from None
    try:
        response = json.loads(data)
    except ValueError:
        raise ControlError(f"the server on {path} sent a response that is not JSON") from None
    if not isinstance(response, dict) or not isinstance(response.get("ok"), bool):
        raise ControlError(f"the server on {path} sent an unexpected response")
    return response


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = sock.recv(256 * 1024)
        if not chunk:
            raise ControlError("the server closed the control connection without an answer")
        end = chunk.find(b"\n")
        if end >= 0:
            chunks.append(chunk[:end])
            return b"".join(chunks)
        chunks.append(chunk)
