"""The relay scheduler: when each queued recipient is tried, over which connection, and what then.

The queue store holds the truth (one record per message, a state per recipient); the scheduler
keeps a copy of every unfinished record in memory and a timer for the next due recipient:

1. A recipient becomes due (new in the queue, its retry time came, or an operator flushed).
   Due recipients of one message are grouped by domain, each domain is routed
   (:class:`~mailsrv.relay.resolver.NextHop`: a smarthost, or MX with rollup) and the recipients
   join the ready list of the route's *destination*, in chunks of at most
   ``max_recipients`` per transaction.
2. Each destination has at most ``per_destination`` connections and all of them together at most
   ``total`` (Postfix's destination and process limits).  A connection carries transaction after
   transaction while its destination has a backlog, then waits ``idle_timeout`` for more work
   before it is closed.
3. After each transaction the outcome of every recipient is made durable
   (:meth:`IQueueStore.modify`) *before* the connection is used again: sent, bounced (5xx,
   or expired), or deferred with the retry policy's next time.  That write is the only window in
   which a recipient can be sent twice: our process dies after the remote ``250`` and before it.
4. A destination that cannot be reached at all is suspended for a while (the dead-destination
   cache): its backlog is deferred without a connection attempt.
5. When no recipient of a message is left to try, the DSNs it needs are submitted (a failure
   DSN for bounced recipients, a success DSN for ``NOTIFY=SUCCESS``; never for ``<>``) and
   the message leaves the queue.  A message whose last transaction sent every recipient and
   that owes no DSN (none asked ``NOTIFY=SUCCESS``, or the sender is ``<>``) leaves the queue
   in the write of step 3 itself: its removal is what makes "sent" durable.
6. A recipient still deferred once its message has waited long enough gets one delay warning
   (``Action: delayed``): with ``NOTIFY=DELAY`` after ``delay_warning`` seconds (or
   ``delay_warning_asked`` when that is 0), without ``NOTIFY`` only when ``delay_warning`` is
   set (Postfix's ``delay_warning_time``).  It is checked when a deferral is made durable,
   and the ``delay_warned`` flag is written in that same change, so a recipient is warned at
   most once, even across restarts (a crash right after that write loses the warning).

Time is the injected clock's; randomness (jitter, restart spread) the injected ``rng``.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from mailsrv.delivery.envelope import Notify
from mailsrv.ops.metrics import Metrics
from mailsrv.relay.destinations import DeadDestinations
from mailsrv.relay.message import OutboundMessage, OutboundRecipient, RecipientResult
from mailsrv.relay.outcomes import IOutcomeListener
from mailsrv.relay.queue_store import IQueueStore, ISharedQueueStore, NoSuchMessage
from mailsrv.relay.records import QueueRecord, RecipientStatus, State
from mailsrv.relay.resolver import NextHopError, Route
from mailsrv.relay.retry import RetryPolicy
from mailsrv.smtp.replies import Reply

_log = Logger(namespace="mailsrv.relay")


class IRelayConnection(Interface):
    """One open connection to a next hop, able to carry several transactions in turn."""

    reusable = Attribute("True while another transaction may be sent on this connection.")
    remote_mta = Attribute("The next hop's host name (for logs).")
    remote_address = Attribute("The next hop's address (for logs).")

    def send(message: OutboundMessage) -> Deferred[list[RecipientResult]]:
        """One transaction; fires with one result per recipient, in order (never errbacks)."""

    def close() -> Deferred[None]:
        """QUIT and close; fires when the connection is gone."""


class IRelayConnector(Interface):
    """Opens connections to a route's candidates (in order, the next on failure)."""

    def connect(route: Route) -> Deferred[IRelayConnection]:
        """A ready connection (greeted, EHLO'd, TLS and AUTH as configured), or a
        :class:`NextHopError` failure saying why none of the candidates could be used."""


SubmitDsns = Callable[[QueueRecord, Sequence[RecipientStatus]], Deferred[None]]
"""Submits the DSN about ``recipients`` of a message: those of a finished message (sent or
bounced), or deferred ones to warn (``delay_warned``).  The composition root wires it to the
DSN composer and the commit path."""

SLOT_RETRY = 1.0
"""Seconds before a destination whose cluster-wide connection slots were all taken tries
again (shared queue)."""

DELAY_WARNING_ASKED = 4 * 3600.0
"""When a recipient that asked for ``NOTIFY=DELAY`` is warned if ``delay_warning`` is 0: four
hours, the value Postfix's documentation suggests for ``delay_warning_time``."""


@dataclass(frozen=True)
class SchedulerSettings:
    """Concurrency and connection reuse (Postfix's defaults where it has one)."""

    per_destination: int = 20
    total: int = 100
    max_recipients: int = 50
    idle_timeout: float = 2.0
    restart_spread: float = 30.0
    stop_grace: float = 30.0
    delay_warning: float = 0.0
    """Seconds after arrival when a still deferred recipient gets a delay DSN; 0: only those
    that asked for ``NOTIFY=DELAY`` do, after :attr:`delay_warning_asked`."""
    delay_warning_asked: float = DELAY_WARNING_ASKED

    def warn_after(self, recipient: RecipientStatus) -> float | None:
        """The message age at which ``recipient`` gets its delay warning, or None: never."""
        if recipient.dsn.wants(Notify.DELAY):
            return self.delay_warning or self.delay_warning_asked
        if not recipient.dsn.notify and self.delay_warning > 0:
            return self.delay_warning  # no NOTIFY given: the server's policy (RFC 3461 4.1)
        return None


@dataclass
class _Work:
    """Recipients of one message for one transaction to one destination."""

    queue_id: str
    addresses: tuple[str, ...]


@dataclass
class _Destination:
    """A destination's ready work and its connections."""

    key: str
    route: Route
    ready: deque[_Work] = field(default_factory=deque)
    active: int = 0
    connecting: int = 0
    idle: list[tuple[Any, IDelayedCall]] = field(default_factory=list)


def _reply_line(reply: Reply) -> str:
    return " ".join(part for part in (str(reply.code), reply.enhanced, reply.text) if part)


def outbound_message(
    record: QueueRecord,
    addresses: Iterable[str],
    body_path: Any,
    may_send: Callable[[], bool] | None = None,
) -> OutboundMessage:
    """The client's view of ``record`` for the recipients ``addresses`` (``may_send``: see
    :attr:`OutboundMessage.may_send`)."""
    wanted = set(addresses)
    recipients = tuple(
        OutboundRecipient(
            address=r.address,
            notify=tuple(sorted(n.value for n in r.dsn.notify)),
            orcpt=f"{r.dsn.orcpt[0]};{r.dsn.orcpt[1]}" if r.dsn.orcpt else None,
        )
        for r in record.recipients
        if r.address in wanted
    )
    return OutboundMessage(
        queue_id=record.queue_id,
        sender=record.sender,
        recipients=recipients,
        body_path=body_path,
        size=record.size_on_wire,
        smtputf8=record.smtputf8,
        eight_bit=record.body_8bit,
        envid=record.envid,
        ret=record.ret.value if record.ret is not None else None,
        headers=record.relay_headers.encode("ascii"),
        may_send=may_send,
    )


class RelayScheduler(Service):
    """Delivers the relay queue (see the module docstring)."""

    def __init__(
        self,
        store: IQueueStore,
        next_hop: Any,
        connector: IRelayConnector,
        retry: RetryPolicy,
        clock: IReactorTime,
        rng: random.Random,
        submit_dsns: SubmitDsns,
        settings: SchedulerSettings = SchedulerSettings(),
        dead: DeadDestinations | None = None,
        loaded: list[QueueRecord] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        metrics = metrics if metrics is not None else Metrics()
        self._attempts = {
            state: metrics.relay_attempts.labels(state.value)
            for state in (State.SENT, State.DEFERRED, State.BOUNCED)
        }
        metrics.before_scrape(functools.partial(self._export_queue, metrics))
        self._next_hop = next_hop
        self._connector = connector
        self._retry = retry
        self._clock = clock
        self._rng = rng
        self._submit_dsns = submit_dsns
        self.settings = settings
        self.dead = dead if dead is not None else DeadDestinations(clock, retry.min_backoff)
        self.records: dict[str, QueueRecord] = {}
        self._in_flight: dict[str, set[str]] = {}  # queue id -> recipients routed or sent
        self._shared = ISharedQueueStore(store) if ISharedQueueStore.providedBy(store) else None
        self._destinations: dict[str, _Destination] = {}
        self._connections = 0
        self._due: list[tuple[float, int, str]] = []
        self._sequence = itertools.count()
        self._timer: IDelayedCall | None = None
        self._running_work: set[Deferred[Any]] = set()
        self._sending: set[Deferred[Any]] = set()
        self._open: set[Any] = set()
        self._slots: dict[Any, str] = {}  # connection -> its cluster slot (shared queue)
        self._pump_pending: set[str] = set()  # destinations waiting for a free slot
        self._generation = 0  # of the settings: a reload makes the next one
        self._opened_in: dict[Any, int] = {}  # connection -> the generation it was opened in
        self._queued_since_start: set[str] = set()  # only while the start-up load runs
        self._loading = True
        self._stopping = False
        self._preloaded = loaded
        self._loaded: Deferred[None] | None = None
        self.setName("relay")

    # -- service ----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._loading = True
        self._loaded = Deferred.fromCoroutine(self._load())

    async def _load(self) -> None:
        if self._preloaded is not None:
            loaded, self._preloaded = self._preloaded, None
        else:
            loaded = await self._store.load()
        # Records committed while the load ran are already here, newer than what was read.
        records = [r for r in loaded if r.queue_id not in self._queued_since_start]
        self._queued_since_start.clear()
        self._loading = False
        now = self._clock.seconds()
        due_now = 0
        for record in records:
            self.records[record.queue_id] = record
            for recipient in self._waiting(record):
                if recipient.next_attempt is None or recipient.next_attempt <= now:
                    due_now += 1
        # Spread what came due while the server was down over a short window, so a restart
        # does not open every connection in the same second.
        window = min(self.settings.restart_spread, 0.01 * due_now)
        for record in records:
            if record.done:
                self._finish(record)
                continue
            times = [self._due_time(r, now) for r in self._waiting(record)]
            if times:
                first = min(times)
                if first <= now:
                    first = now + self._rng.uniform(0, window)
                self._schedule(record.queue_id, first)
        _log.info(
            "relay queue loaded: {messages} message(s), {due} recipient(s) due",
            messages=len(records),
            due=due_now,
        )

    def stopService(self) -> Deferred[None]:
        """Stop scheduling; let transactions in flight finish for up to ``stop_grace`` seconds,
        then drop their connections (their recipients are deferred, durably, as usual)."""
        super().stopService()
        self._stopping = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for destination in self._destinations.values():
            destination.ready.clear()
            for connection, timer in destination.idle:
                timer.cancel()
                connection.close()
            destination.idle.clear()
        # Transactions in flight are waited for (their outcome is made durable); DNS lookups
        # and DSN submissions are not: what they were for is still in the queue.
        waiting = list(self._sending)
        done: Deferred[Any] = DeferredList(waiting, consumeErrors=True)
        if not waiting:
            return done.addCallback(lambda _: None)

        def drop_connections() -> None:
            for connection in list(self._open):
                connection.close()

        timer = self._clock.callLater(self.settings.stop_grace, drop_connections)

        def finished(_: object) -> None:
            if timer.active():
                timer.cancel()

        return done.addCallback(finished)

    # -- what others call -------------------------------------------------------------------

    def queued(self, records: Iterable[QueueRecord]) -> None:
        """New records were committed (reactor thread, after their 250s): try them now."""
        now = self._clock.seconds()
        for record in records:
            if self._loading:
                self._queued_since_start.add(record.queue_id)
            self.records[record.queue_id] = record
            self._schedule(record.queue_id, now)

    def claimed(self, records: Iterable[QueueRecord]) -> None:
        """Records this node just took from a shared queue (reactor thread): work on them as
        on new ones; a finished one (its node stopped before its DSNs) is finished here."""
        for record in records:
            if record.done:
                self._finish(record)
                continue
            self.queued([record])

    def flush(self, queue_id: str | None = None) -> int:
        """Make deferred recipients due now (all messages, or one); returns how many."""
        now = self._clock.seconds()
        ids = [queue_id] if queue_id is not None else list(self.records)
        count = 0
        for qid in ids:
            record = self.records.get(qid)
            if record is None:
                continue
            changed = [
                replace(r, next_attempt=now)
                for r in self._waiting(record)
                if r.state is State.DEFERRED
            ]
            if changed:
                self.records[qid] = record.with_recipients(changed)
                count += len(changed)
            self._schedule(qid, now)
        if queue_id is None:
            for key in list(self._destinations):
                self.dead.revive(key)
        return count

    def reconfigure(
        self,
        next_hop: Any,
        connector: IRelayConnector,
        retry: RetryPolicy,
        settings: SchedulerSettings,
    ) -> None:
        """A reload: attempts from now on use these parts and settings.

        A transaction in flight finishes on its connection, which then closes; idle
        connections close now; recipients waiting for a connection are routed again (the next
        hop may have changed).  Retry times already set stay; a new ``min_backoff`` is also the
        new hold of unreachable destinations.
        """
        self._next_hop = next_hop
        self._connector = connector
        self._retry = retry
        self.settings = settings
        self.dead.hold = retry.min_backoff
        self._generation += 1
        now = self._clock.seconds()
        for destination in list(self._destinations.values()):
            for connection, timer in destination.idle:
                timer.cancel()
                self._forget(connection)
            destination.idle.clear()
            for work in destination.ready:
                self._land(work.queue_id, work.addresses)
                self._schedule(work.queue_id, now)
            destination.ready.clear()
            if not destination.active:
                del self._destinations[destination.key]

    def _current(self, connection: Any) -> bool:
        """True when ``connection`` was opened with the settings in force."""
        return self._opened_in.get(connection) == self._generation

    def replaced(self, record: QueueRecord | None, queue_id: str) -> None:
        """An operator changed (or, with None, deleted) a record: follow the change."""
        if record is None or record.done:
            self.records.pop(queue_id, None)
            return
        self.records[queue_id] = record
        self._schedule(queue_id, self._clock.seconds())

    # -- the timer --------------------------------------------------------------------------

    @staticmethod
    def _waiting(record: QueueRecord) -> list[RecipientStatus]:
        return [r for r in record.recipients if r.state in (State.PENDING, State.DEFERRED)]

    @staticmethod
    def _due_time(recipient: RecipientStatus, now: float) -> float:
        return now if recipient.next_attempt is None else recipient.next_attempt

    def _schedule(self, queue_id: str, when: float) -> None:
        heapq.heappush(self._due, (when, next(self._sequence), queue_id))
        self._arm()

    def _arm(self) -> None:
        if self._stopping or not self._due:
            return
        when = self._due[0][0]
        delay = max(0.0, when - self._clock.seconds())
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= when:
                return
            self._timer.cancel()
        self._timer = self._clock.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        ready: dict[str, None] = {}
        while self._due and self._due[0][0] <= now:
            _, _, queue_id = heapq.heappop(self._due)
            ready[queue_id] = None
        for queue_id in ready:
            self._dispatch(queue_id)
        self._arm()

    # -- from due recipients to destinations ------------------------------------------------

    def _dispatch(self, queue_id: str) -> None:
        record = self.records.get(queue_id)
        if record is None or self._stopping:
            return
        now = self._clock.seconds()
        by_domain: dict[str, list[str]] = {}
        later: list[float] = []
        for recipient in self._waiting(record):
            if recipient.address in self._in_flight.get(queue_id, ()):
                continue
            due = self._due_time(recipient, now)
            if due > now:
                later.append(due)
                continue
            by_domain.setdefault(recipient.domain, []).append(recipient.address)
        if self._shared is not None and not by_domain:
            if queue_id not in self._in_flight:
                self._let_go(queue_id)
            return
        if later:
            self._schedule(queue_id, min(later))
        for domain, addresses in by_domain.items():
            self._in_flight.setdefault(queue_id, set()).update(addresses)
            self._track(Deferred.fromCoroutine(self._route(queue_id, domain, addresses)))

    def _land(self, queue_id: str, addresses: Iterable[str]) -> None:
        """``addresses`` of ``queue_id`` are no longer routed, waiting or being sent."""
        flying = self._in_flight.get(queue_id)
        if flying is not None:
            flying.difference_update(addresses)
            if not flying:
                del self._in_flight[queue_id]

    def _let_go(self, queue_id: str) -> None:
        """A shared queue's record that nothing here works on goes back to the queue (its
        lease is released), for whichever node finds it due first."""
        self.records.pop(queue_id, None)
        if self._shared is not None:
            self._track(self._shared.release([queue_id]))

    def _track(self, work: Deferred[Any], sending: bool = False) -> None:
        self._running_work.add(work)
        if sending:
            self._sending.add(work)

        def done(result: object) -> None:
            self._running_work.discard(work)
            self._sending.discard(work)
            if isinstance(result, Failure):
                _log.failure("relay work failed", result)

        work.addBoth(done)

    async def _route(self, queue_id: str, domain: str, addresses: list[str]) -> None:
        generation = self._generation
        try:
            route = await self._next_hop.route(domain)
        except NextHopError as e:
            if self._stopping or generation != self._generation:
                self._route_again(queue_id, addresses)
                return
            await self._fail_all(queue_id, addresses, _reply_line(e.reply), e.permanent, "")
            return
        if self._stopping or generation != self._generation:
            self._route_again(queue_id, addresses)
            return
        suspension = self.dead.suspended(route.destination)
        if suspension is not None:
            reply = _reply_line(suspension.reply)
            await self._fail_all(queue_id, addresses, reply, False, route.destination)
            return
        destination = self._destinations.get(route.destination)
        if destination is None:
            destination = _Destination(route.destination, route)
            self._destinations[route.destination] = destination
        destination.route = route
        size = self.settings.max_recipients
        # Another domain of the same message may already wait for this destination (MX
        # rollup): its recipients join that transaction while it has room.
        waiting = next((w for w in reversed(destination.ready) if w.queue_id == queue_id), None)
        if waiting is not None and len(waiting.addresses) < size:
            room = size - len(waiting.addresses)
            waiting.addresses += tuple(addresses[:room])
            addresses = addresses[room:]
        for start in range(0, len(addresses), size):
            destination.ready.append(_Work(queue_id, tuple(addresses[start : start + size])))
        self._pump(destination)

    def _route_again(self, queue_id: str, addresses: list[str]) -> None:
        """A route looked up before a reload (or during the stop) is not used."""
        self._land(queue_id, addresses)
        if not self._stopping:
            self._schedule(queue_id, self._clock.seconds())

    def _pump(self, destination: _Destination) -> None:
        while destination.ready and destination.idle:
            connection, timer = destination.idle.pop()
            timer.cancel()
            if not connection.reusable:  # the peer or its idle timer closed it meanwhile
                self._forget(connection)
                continue
            destination.active += 1
            self._track(Deferred.fromCoroutine(self._work_on(destination, connection)), True)
        # A new connection only for work that no connection being opened will take.
        while (
            len(destination.ready) > destination.connecting
            and destination.active < self.settings.per_destination
            and self._connections < self.settings.total
        ):
            destination.active += 1
            destination.connecting += 1
            self._connections += 1
            self._track(Deferred.fromCoroutine(self._connect_and_work(destination)), True)

    async def _connect_and_work(self, destination: _Destination) -> None:
        generation = self._generation
        slot = None
        if self._shared is not None:
            # A shared queue's nodes count their connections to a destination together.
            slot = await self._take_slot(destination)
            if slot is None:
                destination.connecting -= 1
                destination.active -= 1
                self._connections -= 1
                self._pump_later(destination)
                return
        try:
            try:
                connection = await self._connector.connect(destination.route)
            finally:
                destination.connecting -= 1
        except NextHopError as e:
            destination.active -= 1
            self._connections -= 1
            self._give_slot(slot)
            await self._destination_failed(destination, e)
            return
        except Exception as e:
            destination.active -= 1
            self._connections -= 1
            self._give_slot(slot)
            _log.failure(
                "connecting to {destination} failed", Failure(e), destination=destination.key
            )
            await self._destination_failed(
                destination, NextHopError(Reply(451, "4.4.0", "internal error connecting"))
            )
            return
        self.dead.revive(destination.key)
        self._open.add(connection)
        self._opened_in[connection] = generation
        if slot is not None:
            self._slots[connection] = slot
        await self._work_on(destination, connection)

    async def _take_slot(self, destination: _Destination) -> str | None:
        """A cluster-wide connection slot for ``destination``, or None: every one is taken
        (or the queue database cannot say)."""
        assert self._shared is not None
        try:
            return await self._shared.take_slot(destination.key, self.settings.per_destination)
        except Exception as e:
            _log.warn(
                "relay: no connection slot for {destination}: {error}",
                destination=destination.key,
                error=str(e).strip() or repr(e),
            )
            return None

    def _give_slot(self, slot: str | None) -> None:
        if slot is not None and self._shared is not None:
            self._track(self._shared.give_slot(slot))

    def _pump_later(self, destination: _Destination) -> None:
        """Try ``destination``'s backlog again in a second (its slots were all taken)."""
        if destination.key in self._pump_pending or self._stopping:
            return
        self._pump_pending.add(destination.key)

        def pump() -> None:
            self._pump_pending.discard(destination.key)
            current = self._destinations.get(destination.key)
            if current is not None and not self._stopping:
                self._pump(current)

        self._clock.callLater(SLOT_RETRY, pump)

    async def _work_on(self, destination: _Destination, connection: Any) -> None:
        """Send ready work over ``connection`` until none is left, then park it as idle."""
        try:
            while (
                destination.ready
                and connection.reusable
                and not self._stopping
                and self._current(connection)
            ):
                work = destination.ready.popleft()
                await self._send(destination, connection, work)
        finally:
            destination.active -= 1
        if connection.reusable and not self._stopping and self._current(connection):
            timer = self._clock.callLater(
                self.settings.idle_timeout, self._close_idle, destination, connection
            )
            destination.idle.append((connection, timer))
            if destination.ready:
                self._pump(destination)
            return
        self._forget(connection)
        if destination.ready:
            self._pump(destination)

    def _forget(self, connection: Any) -> None:
        """A connection leaves the pool: closed (QUIT if it can), no longer counted."""
        self._open.discard(connection)
        self._opened_in.pop(connection, None)
        self._give_slot(self._slots.pop(connection, None))
        self._connections -= 1
        connection.close()

    def _close_idle(self, destination: _Destination, connection: Any) -> None:
        destination.idle = [(c, t) for c, t in destination.idle if c is not connection]
        self._forget(connection)
        if not destination.ready and not destination.active and not destination.idle:
            self._destinations.pop(destination.key, None)

    async def _destination_failed(self, destination: _Destination, error: NextHopError) -> None:
        """No candidate could be used: suspend the destination, defer (or bounce) its backlog."""
        if not error.permanent:
            self.dead.suspend(destination.key, error.reply)
        backlog = list(destination.ready)
        destination.ready.clear()
        reply = _reply_line(error.reply)
        for work in backlog:
            await self._fail_all(
                work.queue_id, list(work.addresses), reply, error.permanent, destination.key
            )

    # -- outcomes -----------------------------------------------------------------------------

    async def _send(self, destination: _Destination, connection: Any, work: _Work) -> None:
        record = self.records.get(work.queue_id)
        addresses = tuple(
            a
            for a in work.addresses
            if record is not None
            and (found := record.find(a)) is not None
            and found.state in (State.PENDING, State.DEFERRED)
        )
        if record is None or not addresses:
            self._land(work.queue_id, work.addresses)
            return
        guard = None
        if self._shared is not None:
            guard = functools.partial(self._shared.holds, work.queue_id)
        message = outbound_message(
            record, addresses, self._store.body_path(work.queue_id), may_send=guard
        )
        try:
            try:
                results = await connection.send(message)
            except Exception as e:
                _log.failure("relay {queue_id}: send failed", Failure(e), queue_id=work.queue_id)
                reply = Reply(451, "4.3.0", "local error while sending")
                results = [
                    RecipientResult(a, reply.code, reply.enhanced, reply.text, False)
                    for a in addresses
                ]
            await self._apply(work.queue_id, results, destination.key)
        finally:
            self._land(work.queue_id, work.addresses)

    async def _fail_all(
        self, queue_id: str, addresses: list[str], reply: str, permanent: bool, destination: str
    ) -> None:
        code, _, rest = reply.partition(" ")
        enhanced, _, text = rest.partition(" ")
        results = [RecipientResult(a, int(code), enhanced, text, permanent) for a in addresses]
        await self._apply(queue_id, results, destination)
        self._land(queue_id, addresses)

    async def _apply(
        self, queue_id: str, results: Sequence[RecipientResult], destination: str
    ) -> None:
        """Make every result durable, log it, and schedule what comes next."""
        now = self._clock.seconds()
        by_address = {r.recipient: r for r in results}
        warned: list[str] = []
        left: list[QueueRecord] = []
        # Recipients deferred together with the same attempt count come back together (one
        # transaction, one delay warning), so each count draws its jittered delay once.
        retry_times: dict[int, float | None] = {}

        def change(record: QueueRecord) -> QueueRecord:
            warned.clear()
            updated = []
            for recipient in record.recipients:
                result = by_address.get(recipient.address)
                if result is None or recipient.state.final:
                    continue
                outcome = self._outcome(record, recipient, result, now, retry_times)
                if self._warn_now(record, outcome, now):
                    outcome = replace(outcome, delay_warned=True)
                    warned.append(outcome.address)
                updated.append(outcome)
            return record.with_recipients(updated)

        announced = await self._announce(queue_id, change)

        def store_change(record: QueueRecord) -> QueueRecord | None:
            new = announced(record)
            if _sent_owing_nothing(new):
                left.append(new)
                return None  # the store removes it: one durable write instead of two
            return new

        # A shared queue's record goes back to the queue with this write unless another of its
        # transactions is still under way here.
        others = self._in_flight.get(queue_id, set()) - set(by_address)
        release = self._shared is not None and not others
        try:
            if self._shared is not None:
                record = await self._shared.modify_held(queue_id, store_change, release)
            else:
                record = await self._store.modify(queue_id, store_change)
        except NoSuchMessage:
            self.records.pop(queue_id, None)
            return
        if record is None:
            self.records.pop(queue_id, None)
            if left:
                for result in results:
                    status = left[-1].find(result.recipient)
                    if status is not None:
                        self._log_attempt(left[-1], status, result, destination, now)
                self._log_left(left[-1])
            return
        self.records[queue_id] = record
        for result in results:
            status = record.find(result.recipient)
            if status is not None:
                self._log_attempt(record, status, result, destination, now)
        if warned:
            statuses = [s for a in warned if (s := record.find(a)) is not None]
            self._track(Deferred.fromCoroutine(self._warn(record, statuses)), True)
        if record.done:
            self._finish(record)
            return
        if release:
            self.records.pop(queue_id, None)  # released: the queue has it now
            return
        waiting = [r.next_attempt for r in self._waiting(record) if r.next_attempt is not None]
        if waiting:
            self._schedule(queue_id, min(waiting))

    def _outcome(
        self,
        record: QueueRecord,
        recipient: RecipientStatus,
        result: RecipientResult,
        now: float,
        retry_times: dict[int, float | None],
    ) -> RecipientStatus:
        common: dict[str, Any] = {
            "attempts": recipient.attempts + 1,
            "last_attempt": now,
            "last_reply": result.reply_line,
            "remote_mta": result.remote_mta or recipient.remote_mta,
        }
        if result.delivered:
            return replace(
                recipient,
                state=State.SENT,
                next_attempt=None,
                dsn_passed_on=result.dsn_passed_on,
                **common,
            )
        if result.permanent:
            return replace(recipient, state=State.BOUNCED, next_attempt=None, **common)
        attempt = recipient.attempts + 1
        if attempt not in retry_times:
            retry_times[attempt] = self._retry.next_attempt(
                attempt, record.created_at, now, self._rng
            )
        next_time = retry_times[attempt]
        if next_time is None:
            common["last_reply"] = f"{result.reply_line} (gave up: queue lifetime reached)"
            return replace(recipient, state=State.BOUNCED, next_attempt=None, **common)
        # A recipient held while it was in flight stays held.
        state = State.HELD if recipient.state is State.HELD else State.DEFERRED
        return replace(recipient, state=state, next_attempt=next_time, **common)

    def _warn_now(self, record: QueueRecord, status: RecipientStatus, now: float) -> bool:
        """True when the deferral ``status`` is the one to carry its delay warning."""
        if status.state is not State.DEFERRED or status.delay_warned or not record.sender:
            return False
        after = self.settings.warn_after(status)
        return after is not None and now - record.created_at >= after

    async def _warn(self, record: QueueRecord, recipients: list[RecipientStatus]) -> None:
        """Send the delay DSN for ``recipients`` (already marked ``delay_warned``)."""
        await self._submit_dsns(record, recipients)
        _log.info(
            "relay {queue_id}: delay warning to <{sender}> for {recipients}",
            queue_id=record.queue_id,
            sender=record.sender,
            recipients=[r.address for r in recipients],
        )

    def _export_queue(self, metrics: Metrics) -> None:
        """Set the queue gauges from the records in memory (reactor thread, at each scrape)."""
        counts = {"pending": 0, "deferred": 0, "held": 0}
        oldest: float | None = None
        for record in self.records.values():
            for recipient in record.recipients:
                if recipient.state.value in counts:
                    counts[recipient.state.value] += 1
            if oldest is None or record.created_at < oldest:
                oldest = record.created_at
        for state, count in counts.items():
            metrics.relay_queue.labels(state).set(count)
        metrics.relay_queue_messages.set(len(self.records))
        age = 0.0 if oldest is None else max(0.0, self._clock.seconds() - oldest)
        metrics.relay_oldest_age.set(age)

    def _log_attempt(
        self,
        record: QueueRecord,
        status: RecipientStatus,
        result: RecipientResult,
        destination: str,
        now: float,
    ) -> None:
        counter = self._attempts.get(status.state)
        if counter is not None:
            counter.inc()
        retry = ""
        if status.next_attempt is not None:
            retry = f", next attempt in {max(0.0, status.next_attempt - now):.0f} s"
        _log.info(
            "relay {queue_id} to <{recipient}> via {remote_mta} [{remote_address}] "
            "tls={tls_text}: {state} (attempt {attempts}{retry}): {reply}",
            queue_id=record.queue_id,
            recipient=status.address,
            destination=destination,
            remote_mta=result.remote_mta or "-",
            remote_address=result.remote_address or "-",
            tls=result.tls,
            tls_text=result.tls or "none",
            state=status.state.value,
            reply=result.reply_line,
            attempts=status.attempts,
            next_attempt=status.next_attempt,
            retry=retry,
        )

    def _finish(self, record: QueueRecord) -> None:
        """Every recipient is sent or bounced: DSNs, then the message leaves the queue."""
        self.records.pop(record.queue_id, None)
        self._track(Deferred.fromCoroutine(self._leave(record)))

    async def _leave(self, record: QueueRecord) -> None:
        if record.sender:
            await self._submit_dsns(record, record.recipients)
        await self._store.remove(record.queue_id)
        self._log_left(record)

    def _log_left(self, record: QueueRecord) -> None:
        sent = sum(1 for r in record.recipients if r.state is State.SENT)
        _log.info(
            "relay {queue_id} left the queue: {sent} sent, {bounced} bounced",
            queue_id=record.queue_id,
            sent=sent,
            bounced=len(record.recipients) - sent,
            sender=record.sender,
            age=round(self._clock.seconds() - record.created_at, 3),
        )

    # -- the outcome listener (the webhook outbox) --------------------------------------------

    outcome_listener: IOutcomeListener | None = None
    """Told of each attempt's outcomes, durably, before the queue stores them."""

    async def _announce(
        self, queue_id: str, change: Callable[[QueueRecord], QueueRecord]
    ) -> Callable[[QueueRecord], QueueRecord]:
        """Tell the listener (if any) what ``change`` will store; the change to store in its
        place (the same result, unless the record changed meanwhile)."""
        if self.outcome_listener is None or not self.outcome_listener.listening:
            return change
        current = await self._store.get(queue_id)
        if current is None:
            return change
        planned = change(current)
        pairs = zip(planned.recipients, current.recipients, strict=True)
        ended = [new for new, old in pairs if new != old]
        if ended:
            await self.outcome_listener.outcomes(planned, ended)
        return lambda record: planned if record == current else change(record)


def _sent_owing_nothing(record: QueueRecord) -> bool:
    """Every recipient sent, and no DSN owed: none asked for ``NOTIFY=SUCCESS`` (RFC 3461
    success and "relayed" notices are only for those), or the sender is ``<>``."""
    return all(r.state is State.SENT for r in record.recipients) and (
        not record.sender or not any(r.dsn.wants(Notify.SUCCESS) for r in record.recipients)
    )


def no_dsns(record: QueueRecord, recipients: Sequence[RecipientStatus]) -> Deferred[None]:
    """A :data:`SubmitDsns` that sends nothing (tests of scheduling alone)."""
    return succeed(None)
