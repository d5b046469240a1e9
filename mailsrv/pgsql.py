"""Connections to PostgreSQL shared by every store that lives there (txpostgres: asynchronous
psycopg2 on the reactor, no threads).

Reconnects: every pooled connection carries a dead-connection detector.  When PostgreSQL goes
away (restart, failover, a killed backend) the connection is marked dead and reconnects in the
background with a short backoff (0, 0.1, 0.2, 0.4 ... 5 s).  Queries prefer live connections.
A read that fails because its connection died is retried once, after waiting (up to
``reconnect_wait`` seconds) for a connection to come back.  A write is retried only when it
certainly never reached the server (the connection was already known to be dead); otherwise the
error goes to the caller, because a lost COMMIT reply leaves the outcome unknown.

:class:`Database` is that pool plus the migration run on open; the user store
(:mod:`mailsrv.auth.pg_store`) and the cluster queue (:mod:`mailsrv.relay.pg_queue`) build on
it.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import psycopg2
from twisted.application.service import Service
from twisted.internet.defer import Deferred, FirstError, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import reconnection, txpostgres

T = TypeVar("T")

_log = Logger(namespace="mailsrv.pgsql")

Interaction = Callable[..., Coroutine[Any, Any, Any]]
"""A coroutine ``function(cursor, *args)`` run inside one transaction."""


def _backoff() -> Iterator[float]:
    """Reconnection delays: at once, then doubling from 0.1 s up to 5 s, for ever."""
    yield 0.0
    delay = 0.1
    while True:
        yield delay
        delay = min(delay * 2, 5.0)


def is_connection_error(error: BaseException) -> bool:
    """True when ``error`` means the connection is unusable (not a problem with the query)."""
    if isinstance(error, reconnection.ConnectionDead | txpostgres.RollbackFailed):
        return True
    if isinstance(error, psycopg2.InterfaceError):
        return True
    if isinstance(error, psycopg2.OperationalError):
        code = error.pgcode or ""
        # No SQLSTATE: the socket broke.  08: connection exception.  57P0x: admin shutdown,
        # crash shutdown, cannot connect now (starting up).
        return not code or code.startswith("08") or code.startswith("57P")
    return False


def never_sent(error: BaseException) -> bool:
    """True when the failed statement certainly never reached the server."""
    return isinstance(error, reconnection.ConnectionDead | psycopg2.InterfaceError)


class _Detector(reconnection.DeadConnectionDetector):  # type: ignore[misc]
    """Reconnects its connection with a short backoff; stoppable, so close() leaves no timers."""

    def __init__(self, reactor: Any, on_recovered: Callable[[], None]) -> None:
        super().__init__(deathChecker=self._is_dead, reconnectionIterator=_backoff, reactor=reactor)
        self._on_recovered = on_recovered
        self._stopped = False
        self._pending: IDelayedCall | None = None

    def _is_dead(self, failure: Failure) -> bool:
        return isinstance(failure.value, BaseException) and is_connection_error(failure.value)

    def startReconnecting(self, f: Failure) -> None:
        if self._stopped:
            return
        message = f.getErrorMessage().strip().splitlines()
        _log.warn(
            "PostgreSQL connection lost ({error}); reconnecting",
            error=message[0] if message else repr(f.value),
        )
        self._schedule(self.reconnectionIterator())

    def _schedule(self, delays: Iterator[float]) -> None:
        if not self._stopped:
            self._pending = self.reactor.callLater(next(delays), self._attempt, delays)

    def _attempt(self, delays: Iterator[float]) -> None:
        self._pending = None
        if self._stopped:
            return
        d = Deferred.fromCoroutine(self._reconnect())
        d.addCallbacks(self._reconnected, lambda _: self._schedule(delays))

    async def _reconnect(self) -> None:
        await self.reconnect()

    def _reconnected(self, _: object) -> None:
        if self._stopped:
            self.reconnectable.close()
            return
        _log.info("PostgreSQL connection re-established")
        self.connectionRecovered()
        self._on_recovered()

    def stop(self) -> None:
        """No more reconnection attempts."""
        self._stopped = True
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None


class _Connection(txpostgres.Connection):  # type: ignore[misc]
    """A connection that reports a server-side disconnect while idle to its detector quietly."""

    def doRead(self) -> object:
        try:
            return super().doRead()
        except psycopg2.Error as e:
            # The server closed an idle connection (restart, pg_terminate_backend).  Returning
            # the error makes the reactor call connectionLost (-> the detector reconnects)
            # instead of logging an "Unhandled Error" traceback.
            return e

    def is_live(self) -> bool:
        conn = self._connection
        return conn is not None and not conn.closed and not self.detector.connectionIsDead

    def close(self) -> None:
        if self._connection is not None:
            super().close()


class Pool(txpostgres.ConnectionPool):  # type: ignore[misc]
    """A txpostgres pool of reconnecting connections that hands out live ones first."""

    def __init__(self, reactor: Any, dsn: str, size: int, on_change: Callable[[], None]):
        self.reactor = reactor
        self._on_change = on_change  # a connection came back to life or back to the pool
        super().__init__(None, dsn, min=size, application_name="mailsrv")
        self.all: list[_Connection] = list(self.connections)

    def connectionFactory(self, reactor: Any, cooperator: Any) -> _Connection:
        return _Connection(reactor, cooperator, detector=_Detector(reactor, self._on_change))

    def has_idle_live(self) -> bool:
        return any(c.is_live() for c in self.connections)

    def _putBackAndPassthrough(self, result: object, connection: _Connection) -> object:
        self.connections.add(connection)
        self._on_change()
        return result

    def _take(self) -> _Connection:
        live = [c for c in self.connections if c.is_live()]
        chosen: _Connection = live[0] if live else next(iter(self.connections))
        self.connections.remove(chosen)
        return chosen

    def _runQuery(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        c = self._take()
        return c.runQuery(*args, **kwargs).addBoth(self._putBackAndPassthrough, c)  # type: ignore[no-any-return]

    def _runOperation(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        c = self._take()
        return c.runOperation(*args, **kwargs).addBoth(self._putBackAndPassthrough, c)  # type: ignore[no-any-return]

    def _runInteraction(self, interaction: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        c = self._take()
        d = c.runInteraction(interaction, *args, **kwargs)
        return d.addBoth(self._putBackAndPassthrough, c)  # type: ignore[no-any-return]

    def close(self) -> None:
        for c in self.all:
            c.detector.stop()
        for c in self.all:
            c.close()


class Database:
    """A pool of reconnecting connections to the database ``dsn``, migrated when opened.

    ``migrate(cursor)`` runs in the opening transaction (the schema migrations); ``error``
    makes the exceptions this class raises itself (the store's own error type), ``what`` names
    the store in their messages.
    """

    def __init__(
        self,
        dsn: str,
        reactor: Any,
        migrate: Interaction,
        what: str,
        error: Callable[[str], Exception],
        pool_size: int = 3,
        reconnect_wait: float = 10.0,
    ) -> None:
        self.dsn = dsn
        self.what = what
        self._reactor = reactor
        self._migrate = migrate
        self._error = error
        self._pool_size = pool_size
        self.reconnect_wait = reconnect_wait
        self._pool: Pool | None = None
        self._opening: list[Deferred[None]] | None = None
        self._waiters: list[Deferred[None]] = []
        self._closed = False

    # --- lifecycle --------------------------------------------------------------------------

    def open(self) -> Deferred[None]:
        """Connect the pool and apply pending migrations."""
        return Deferred.fromCoroutine(self._open())

    async def _open(self) -> None:
        if self._pool is not None or self._opening is not None:
            return
        self._closed = False
        self._opening = []
        pool = Pool(self._reactor, self.dsn, self._pool_size, self._wake)
        try:
            try:
                await pool.start()
            except FirstError as e:
                e.subFailure.raiseException()
            await pool.runInteraction(interaction(self._migrate))
        except BaseException as e:
            pool.close()
            self._finish_opening(e)
            raise
        if self._closed:  # close() was called while we were opening
            pool.close()
            self._finish_opening(self._error("closed"))
            return
        self._pool = pool
        self._finish_opening(None)

    def _finish_opening(self, error: BaseException | None) -> None:
        waiters, self._opening = self._opening or [], None
        for d in waiters:
            if error is None:
                d.callback(None)
            else:
                d.errback(self._error(f"{self.what} could not be opened: {error}"))

    def close(self) -> Deferred[None]:
        """Stop reconnecting and close every connection."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        self._wake()
        return succeed(None)

    async def _ready(self) -> Pool:
        if self._pool is None and self._opening is not None:
            d: Deferred[None] = Deferred()
            self._opening.append(d)
            await d
        if self._pool is None:
            raise self._error(f"{self.what} is not open")
        return self._pool

    # --- retries ----------------------------------------------------------------------------

    def _wake(self) -> None:
        """A connection recovered or was returned to the pool: let waiting calls try again."""
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if not d.called:
                d.callback(None)

    async def _wait_for_connection(self, pool: Pool, deadline: float) -> None:
        """Wait until an idle live connection may exist (or ``deadline``)."""
        if pool.has_idle_live():
            return
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        delay = max(0.0, deadline - self._reactor.seconds())
        timer = self._reactor.callLater(delay, _release, d)
        try:
            await d
        finally:
            if timer.active():
                timer.cancel()

    async def _retrying(
        self,
        operation: Callable[[Pool], Deferred[T]],
        idempotent: bool,
        wait: float | None = None,
    ) -> T:
        """Run ``operation``; on a dead connection wait for a reconnect and try again.

        Attempts that never reached the server are repeated until ``wait`` seconds (default
        ``reconnect_wait``) run out.  An idempotent read that failed after it was sent is
        retried once more; a write that failed after it was sent is not retried (its COMMIT
        may have happened).
        """
        deadline = self._reactor.seconds() + (self.reconnect_wait if wait is None else wait)
        sent_retry = idempotent
        while True:
            pool = await self._ready()
            try:
                return await operation(pool)
            except Exception as e:
                if never_sent(e):
                    pass
                elif sent_retry and is_connection_error(e):
                    sent_retry = False
                else:
                    raise
                if self._reactor.seconds() >= deadline:
                    raise
            await self._wait_for_connection(pool, deadline)

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> Deferred[list[Any]]:
        """An idempotent single-statement read, retried once after a reconnect."""
        return Deferred.fromCoroutine(
            self._retrying(lambda pool: pool.runQuery(sql, params), idempotent=True)
        )

    def query_now(self, sql: str, params: tuple[Any, ...] = ()) -> Deferred[list[Any]]:
        """A read that does not wait for a lost connection to come back: with no live
        connection it fails at once, with an error that says so (readiness checks)."""
        d = Deferred.fromCoroutine(
            self._retrying(lambda pool: pool.runQuery(sql, params), idempotent=True, wait=0.0)
        )
        return d.addErrback(unreachable, self._error)

    def transaction(
        self, function: Callable[..., Coroutine[Any, Any, T]], *args: Any
    ) -> Deferred[T]:
        """Run ``function(cursor, *args)`` in one transaction (a write: not blindly retried)."""
        return Deferred.fromCoroutine(
            self._retrying(
                lambda pool: pool.runInteraction(interaction(function, *args)),
                idempotent=False,
            )
        )


def unreachable(failure: Failure, error: Callable[[str], Exception]) -> Failure:
    """A connection error as ``error`` saying the database is unreachable (others pass)."""
    value = failure.value
    if not isinstance(value, BaseException) or not is_connection_error(value):
        return failure
    lines = str(value).strip().splitlines()
    why = f": {lines[0]}" if lines else ""
    return Failure(error(f"no connection to PostgreSQL, reconnecting{why}"))


def _release(d: Deferred[None]) -> None:
    if not d.called:
        d.callback(None)


def interaction(function: Interaction, *args: Any) -> Callable[[Any], Deferred[Any]]:
    """A txpostgres interaction running the coroutine ``function(cursor, *args)``."""
    return lambda cursor: Deferred.fromCoroutine(function(cursor, *args))


class Listener(Service):
    """``LISTEN`` on ``channel`` over a connection of its own, reconnecting when it drops;
    ``on_notify(payload)`` is called for each notification (in the reactor thread).

    Notifications sent while the connection was down are lost; whoever relies on them polls
    as well (the cluster queue does), so a lost one only delays work.
    """

    def __init__(
        self, dsn: str, reactor: Any, channel: str, on_notify: Callable[[str], None]
    ) -> None:
        self._dsn = dsn
        self._reactor = reactor
        self._channel = channel
        self._on_notify = on_notify
        self._connection: _Connection | None = None
        self._retry: IDelayedCall | None = None
        self.listening = False
        self.setName(f"listen-{channel}")

    def startService(self) -> None:
        super().startService()
        self._connect()

    def _connect(self) -> None:
        self._retry = None
        if not self.running:
            return
        connection = _Connection(
            self._reactor, None, detector=_Detector(self._reactor, self._listen_again)
        )
        connection.addNotifyObserver(self._notified)
        self._connection = connection
        d = connection.connect(self._dsn, application_name="mailsrv-listen")
        d.addCallback(lambda _: self._listen())
        d.addErrback(self._connect_failed)

    def _connect_failed(self, failure: Failure) -> None:
        if self._connection is not None:
            self._connection.detector.stop()
            self._connection.close()
            self._connection = None
        if self.running:
            _log.warn(
                "LISTEN {channel}: cannot connect ({error}); trying again in 5 s",
                channel=self._channel,
                error=failure.getErrorMessage().strip().splitlines()[0:1],
            )
            self._retry = self._reactor.callLater(5.0, self._connect)

    def _listen_again(self) -> None:
        self._listen()

    def _listen(self) -> Deferred[None]:
        if self._connection is None:
            return succeed(None)
        d: Deferred[Any] = self._connection.runOperation(f'LISTEN "{self._channel}"')

        def listening(_: object) -> None:
            self.listening = True
            # Whatever was notified while we were not listening: the caller catches up.
            self._on_notify("")

        def failed(failure: Failure) -> None:
            self.listening = False
            _log.warn(
                "LISTEN {channel} failed: {error}",
                channel=self._channel,
                error=failure.getErrorMessage(),
            )

        return d.addCallbacks(listening, failed)

    def _notified(self, notify: Any) -> None:
        if notify.channel == self._channel:
            self._on_notify(notify.payload or "")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._connection is not None:
            self._connection.detector.stop()
            self._connection.close()
            self._connection = None
        self.listening = False
        return succeed(None)


class LeaseKeeper(Service):
    """This node's share of work in a table that several nodes claim from (the relay queue,
    the webhook outbox): claims due rows into leases every ``poll`` seconds and at once when
    asked (a ``NOTIFY``), renews the leases every third of ``lease``, and gives them back at
    stop.  A subclass says how to claim, renew and release.  Logs name ``what``.
    """

    def __init__(
        self,
        clock: IReactorTime,
        lease: float,
        poll: float,
        batch: int,
        name: str,
        what: str,
    ) -> None:
        self._clock = clock
        self.lease = lease
        self.poll = poll
        self.batch = batch
        self._what = what
        self._poll_timer: IDelayedCall | None = None
        self._renew_timer: IDelayedCall | None = None
        self._claiming: Deferred[Any] | None = None
        self._again = False
        self.setName(name)

    # -- what a subclass says ---------------------------------------------------------------

    async def claim_batch(self, limit: int) -> list[Any]:
        """Claim up to ``limit`` due rows and hand them to their worker; what was claimed."""
        raise NotImplementedError

    def renew_leases(self) -> Deferred[list[str]]:
        """Renew every lease held; fires with the ids whose lease was lost."""
        raise NotImplementedError

    def lost(self, ids: list[str]) -> None:
        """Leases of ``ids`` were lost: their worker forgets them."""

    def release_all(self) -> Deferred[None]:
        """Give up every lease held (the worker has stopped: nothing is in flight)."""
        raise NotImplementedError

    # -- the mechanics ----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._poll_timer = self._clock.callLater(self.poll, self._tick)
        self._renew_timer = self._clock.callLater(self.lease / 3, self._renew)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        for timer in (self._poll_timer, self._renew_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._poll_timer = self._renew_timer = None

        def failed(failure: Failure) -> None:
            _log.warn(
                "{what}: leases not released at stop ({error}); they expire",
                what=self._what,
                error=failure.getErrorMessage(),
            )

        return self.release_all().addErrback(failed)

    def claim_now(self) -> None:
        """Claim due work now (again after the claim in progress, if one runs)."""
        if not self.running:
            return
        if self._claiming is not None:
            self._again = True
            return
        self._claiming = Deferred.fromCoroutine(self._claim())

    async def _claim(self) -> None:
        try:
            while True:
                self._again = False
                try:
                    claimed = await self.claim_batch(self.batch)
                except Exception as e:
                    _log.warn(
                        "{what}: claiming failed: {error}", what=self._what, error=str(e).strip()
                    )
                    return
                if len(claimed) < self.batch and not self._again:
                    return
        finally:
            self._claiming = None

    def _tick(self) -> None:
        self._poll_timer = self._clock.callLater(self.poll, self._tick)
        self.claim_now()

    def _renew(self) -> None:
        self._renew_timer = self._clock.callLater(self.lease / 3, self._renew)

        def failed(failure: Failure) -> None:
            _log.warn(
                "{what}: leases not renewed: {error}",
                what=self._what,
                error=failure.getErrorMessage(),
            )

        self.renew_leases().addCallbacks(self.lost, failed)
