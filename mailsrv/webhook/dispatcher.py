"""The webhook dispatcher: when each outbox entry is sent, and what its outcome changes.

The outbox store holds the truth (one entry per event and endpoint); the dispatcher keeps the
pending entries in memory, in one *lane* per endpoint:

1. An entry becomes due (new, its retry time came, redriven).  Each lane has its own timer and
   sends at most ``endpoint.concurrency`` requests at a time, so an endpoint that is slow or
   down only ever holds its own lane: other endpoints' events, the SMTP sessions and the relay
   never wait for it (nor does anything wait for an attempt except its own lane: every attempt
   ends within the endpoint's timeout).
2. The delivery (:mod:`mailsrv.webhook.delivery`) builds the payload (a message event parses
   the stored message), signs and POSTs it (:mod:`mailsrv.webhook.sender`): in the server, all
   of it in a worker process, never on the reactor.
3. The outcome is made durable (:meth:`~mailsrv.jsonstore.directory.RecordDirectory.update`)
   before anything else happens to the entry, and logged: event id, endpoint, status,
   latency, and the next attempt or the final result.

   * 2xx: done.  The entry and its message link are removed, with no sync of their own (the
     hot path costs two unlinks): should a crash undo the removal, the event is sent again
     with the same id, which at-least-once delivery allows anyway.  The last ``done_kept``
     done entries stay in memory, for ``mailsrv webhooks list`` and ``show``.
   * 5xx, 408, 429, 3xx, timeouts, connection errors: retried per the endpoint's schedule
     (:mod:`mailsrv.webhook.retry`, jittered, never sooner than ``Retry-After``), then
     dead-lettered when the schedule runs out.
   * any other 4xx: dead-lettered at once (``mailsrv webhooks redrive`` sends it again).
   * 410 Gone: the endpoint is disabled, durably (:mod:`mailsrv.webhook.endpoint_state`); its
     entries stay pending and are not sent until a redrive or a new URL enables it.  The 410
     attempt is not counted against the entry, which goes first when the endpoint is enabled.

Delivery is at least once: the ``webhook-id`` is the event id, the same on every attempt and
after a restart, so a receiver can drop duplicates.  Time is the injected clock's; jitter the
injected ``rng``.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsrv.ops.metrics import Metrics
from mailsrv.webhook.delivery import Delivery
from mailsrv.webhook.endpoint_state import DisabledEndpoint, EndpointStates
from mailsrv.webhook.endpoints import Endpoint
from mailsrv.webhook.entries import EntryState, OutboxEntry
from mailsrv.webhook.outbox_store import NoSuchEntry, Outbox
from mailsrv.webhook.payload import iso_time
from mailsrv.webhook.sender import AttemptResult, Outcome

_log = Logger(namespace="mailsrv.webhook")

DONE_KEPT = 1000
"""How many done entries the running server remembers (the newest) for ``mailsrv webhooks``."""


@dataclass
class _Lane:
    """One endpoint's due entries, its requests in flight and its timer."""

    endpoint: Endpoint
    due: list[tuple[float, int, str]] = field(default_factory=list)
    in_flight: int = 0
    attempts: set[Deferred[Any]] = field(default_factory=set)
    timer: IDelayedCall | None = None
    disabled: DisabledEndpoint | None = None
    removed: bool = False
    """The endpoint left the configuration (a reload); attempts in flight still finish."""


class WebhookDispatcher(Service):
    """Sends the outbox (see the module docstring).

    ``loaded`` and ``disabled`` are what the stores' ``load_now`` returned at start.
    """

    def __init__(
        self,
        store: Outbox,
        states: EndpointStates,
        endpoints: Sequence[Endpoint],
        delivery: Delivery,
        clock: IReactorTime,
        rng: random.Random,
        loaded: Sequence[OutboxEntry] = (),
        disabled: Sequence[DisabledEndpoint] = (),
        stop_grace: float = 30.0,
        done_kept: int = DONE_KEPT,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics if metrics is not None else Metrics()
        self._states = states
        self._lanes = {endpoint.name: _Lane(endpoint) for endpoint in endpoints}
        self._delivery = delivery
        self._clock = clock
        self._rng = rng
        self._loaded = list(loaded)
        self._disabled_at_start = list(disabled)
        self._stop_grace = stop_grace
        self.pending: dict[str, OutboxEntry] = {}
        self._when: dict[str, float] = {}
        self._flying: set[str] = set()
        self.recent: deque[OutboxEntry] = deque(maxlen=done_kept)
        self._sequence = itertools.count()
        self._attempts: set[Deferred[Any]] = set()
        self._background: set[Deferred[Any]] = set()
        self._stopping = False
        self._kept: dict[str, dict[str, OutboxEntry]] = {}
        """Pending entries of endpoints not configured (now), by endpoint: on disk, not sent."""
        self._kept_states: dict[str, DisabledEndpoint] = {}
        """The disabled states of endpoints not configured (now)."""
        self.setName("webhooks")

    # -- service ----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        for state in self._disabled_at_start:
            lane = self._lanes.get(state.name)
            if lane is None:
                self._kept_states[state.name] = state
            else:
                self._restore_state(lane, state)
        self._disabled_at_start = []
        loaded, self._loaded = self._loaded, []
        unknown: dict[str, int] = {}
        done = []
        for entry in loaded:
            if entry.state is EntryState.DONE:
                done.append(entry)
            elif entry.state is EntryState.PENDING:
                if entry.endpoint in self._lanes:
                    self.pending[entry.key] = entry
                else:
                    unknown[entry.endpoint] = unknown.get(entry.endpoint, 0) + 1
                    self._kept.setdefault(entry.endpoint, {})[entry.key] = entry
        for name, count in sorted(unknown.items()):
            _log.warn(
                "{count} pending webhook event(s) for endpoint {endpoint}, which is not "
                "configured: kept, not sent",
                count=count,
                endpoint=name,
            )
        for entry in done:  # done entries are no longer kept on disk: forget any found
            self._in_background(self._store.discard(entry.key))
        now = self._clock.seconds()
        for entry in self.pending.values():
            self._schedule(self._lanes[entry.endpoint], entry.key, entry.next_attempt or now)
        if self._lanes or loaded:
            _log.info(
                "webhook dispatcher started: {endpoints} endpoint(s), {pending} pending event(s)",
                endpoints=len(self._lanes),
                pending=len(self.pending),
            )

    def _restore_state(self, lane: _Lane, state: DisabledEndpoint) -> None:
        """``lane`` was disabled as ``state`` says: it stays so, unless its URL changed."""
        if lane.endpoint.url != state.url:
            _log.info(
                "webhook endpoint {endpoint} is enabled again: its URL changed since it "
                "answered {reason}",
                endpoint=state.name,
                reason=state.reason,
            )
            self._in_background(self._states.remove(state.name))
        else:
            lane.disabled = state

    def stopService(self) -> Deferred[None]:
        """Stop scheduling; wait up to ``stop_grace`` seconds for attempts in flight (and the
        writes of their outcomes), then close the sender's connections."""
        super().stopService()
        self._stopping = True
        for lane in self._lanes.values():
            if lane.timer is not None and lane.timer.active():
                lane.timer.cancel()
            lane.timer = None
        waiting = list(self._attempts) + list(self._background)
        done: Deferred[Any] = DeferredList(waiting, consumeErrors=True)
        finished: Deferred[None] = Deferred()
        timer = self._clock.callLater(self._stop_grace, finished.callback, None)

        def all_done(_: object) -> None:
            if timer.active():
                timer.cancel()
                finished.callback(None)

        done.addCallback(all_done)

        def close(_: object) -> Deferred[Any]:
            if self._flying:
                _log.info(
                    "{count} webhook attempt(s) still in flight at stop: their events stay "
                    "pending and are sent after the restart",
                    count=len(self._flying),
                )
            return self._delivery.close()

        return finished.addCallback(close).addCallback(lambda _: None)

    # -- what others call -------------------------------------------------------------------

    def added(self, entries: Iterable[OutboxEntry]) -> None:
        """New pending entries are durable (committed messages, relay outcomes): send them."""
        now = self._clock.seconds()
        for entry in entries:
            lane = self._lanes.get(entry.endpoint)
            if lane is None or entry.state is not EntryState.PENDING:
                continue
            if not self._store.holds(entry.key):
                continue  # a shared outbox's entry another node holds: it sends it
            self.pending[entry.key] = entry
            if entry.key not in self._flying:
                self._schedule(lane, entry.key, entry.next_attempt or now)

    def reconfigure(self, endpoints: Sequence[Endpoint]) -> None:
        """A reload: send to ``endpoints`` from now on.

        A changed endpoint's next attempts use its new settings (attempts in flight finish with
        the old ones; a disabled endpoint whose URL changed is enabled again).  A removed
        endpoint's pending events stay in the outbox, not sent, and are sent again if it comes
        back under the same name, as at a start with a smaller configuration.
        """
        wanted = {endpoint.name: endpoint for endpoint in endpoints}
        for name, gone in list(self._lanes.items()):
            if name not in wanted:
                self._remove_lane(gone)
        for name, endpoint in wanted.items():
            lane = self._lanes.get(name)
            if lane is None:
                self._add_lane(endpoint)
                continue
            old, lane.endpoint = lane.endpoint, endpoint
            if lane.disabled is not None and old.url != endpoint.url:
                state, lane.disabled = lane.disabled, None
                self._restore_state(lane, state)
            self._pump(lane)

    def _remove_lane(self, lane: _Lane) -> None:
        name = lane.endpoint.name
        del self._lanes[name]
        lane.removed = True
        if lane.timer is not None and lane.timer.active():
            lane.timer.cancel()
        lane.timer = None
        lane.due.clear()
        kept = self._kept.setdefault(name, {})
        for key, entry in list(self.pending.items()):
            if entry.endpoint == name and key not in self._flying:
                kept[key] = self.pending.pop(key)
                self._when.pop(key, None)
        if lane.disabled is not None:
            self._kept_states[name] = lane.disabled
        self._let_go(name)
        _log.info(
            "webhook endpoint {endpoint} is no longer configured: {count} pending event(s) "
            "kept, not sent",
            endpoint=name,
            count=len(kept),
        )

    def _add_lane(self, endpoint: Endpoint) -> None:
        lane = self._lanes[endpoint.name] = _Lane(endpoint)
        state = self._kept_states.pop(endpoint.name, None)
        if state is not None:
            self._restore_state(lane, state)
        kept = self._kept.pop(endpoint.name, {})
        now = self._clock.seconds()
        for key, entry in kept.items():
            self.pending[key] = entry
            self._schedule(lane, key, entry.next_attempt or now)
        _log.info(
            "webhook endpoint {endpoint} added: {count} pending event(s)",
            endpoint=endpoint.name,
            count=len(kept),
        )
        self._pump(lane)

    def _let_go(self, endpoint: str) -> None:
        """A shared outbox: give back the entries of ``endpoint`` held here and not in
        flight (it is disabled or not configured here; another node, or a redrive, takes them
        up)."""
        if not self._store.shared:
            return
        keys = [
            key
            for key, entry in self.pending.items()
            if entry.endpoint == endpoint and key not in self._flying
        ]
        keys += list(self._kept.pop(endpoint, {}))
        for key in keys:
            self.pending.pop(key, None)
            self._when.pop(key, None)
        if keys:
            self._in_background(self._store.release(keys))

    def endpoint_names(self) -> list[str]:
        """The endpoints this node sends to (a shared outbox: what it claims)."""
        return list(self._lanes)

    def lost(self, keys: Iterable[str]) -> None:
        """A shared outbox: the leases of ``keys`` were lost; they are not sent from here."""
        for key in keys:
            if key not in self._flying:
                self.pending.pop(key, None)
                self._when.pop(key, None)

    def restore_disabled(self, states: Iterable[DisabledEndpoint]) -> None:
        """A shared outbox: endpoints disabled in the cluster (at start, or by another node):
        their lanes stop here too (unless their URL changed here)."""
        for state in states:
            lane = self._lanes.get(state.name)
            if lane is None:
                self._kept_states[state.name] = state
            elif lane.disabled is None:
                self._restore_state(lane, state)
                if lane.disabled is not None:
                    if lane.timer is not None and lane.timer.active():
                        lane.timer.cancel()
                    lane.timer = None
                    self._let_go(state.name)

    def redriven(self, entries: Iterable[OutboxEntry]) -> None:
        """An operator made entries pending again (durably): send them."""
        self.added(entries)

    def enabled(self, name: str) -> None:
        """An operator enabled endpoint ``name`` again (its state file is removed)."""
        lane = self._lanes.get(name)
        if lane is not None and lane.disabled is not None:
            lane.disabled = None
            _log.info("webhook endpoint {endpoint} enabled", endpoint=name)
            self._pump(lane)

    def settled(self, endpoint: str | None = None) -> Deferred[None]:
        """Fires when no attempt (to ``endpoint``, or to any) is in flight and no write it
        started is pending (attempts that become due meanwhile, e.g. queued behind the
        concurrency limit, included)."""
        return Deferred.fromCoroutine(self._settled(endpoint))

    async def _settled(self, endpoint: str | None) -> None:
        def waiting() -> list[Deferred[Any]]:
            if endpoint is None:
                return list(self._attempts) + list(self._background)
            return list(self._lanes[endpoint].attempts) + list(self._background)

        while pending := waiting():
            await DeferredList(pending, consumeErrors=True)

    @property
    def in_flight(self) -> int:
        """How many attempts are in flight now."""
        return len(self._flying)

    def delivered(self) -> list[OutboxEntry]:
        """The newest done entries (no longer on disk), oldest first."""
        return list(self.recent)

    def disabled(self) -> dict[str, DisabledEndpoint]:
        """The disabled endpoints, by name."""
        return {name: lane.disabled for name, lane in self._lanes.items() if lane.disabled}

    # -- lanes ------------------------------------------------------------------------------

    def _schedule(self, lane: _Lane, key: str, when: float) -> None:
        self._when[key] = when
        heapq.heappush(lane.due, (when, next(self._sequence), key))
        self._arm(lane)

    def _arm(self, lane: _Lane) -> None:
        if (
            self._stopping
            or not self.running
            or lane.disabled is not None
            or not lane.due
            or lane.in_flight >= lane.endpoint.concurrency
        ):
            return  # the end of an attempt, an enable or the start arms it again
        when = lane.due[0][0]
        if lane.timer is not None and lane.timer.active():
            if lane.timer.getTime() <= when:
                return
            lane.timer.cancel()
        lane.timer = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._wake, lane)

    def _wake(self, lane: _Lane) -> None:
        lane.timer = None
        self._pump(lane)

    def _pump(self, lane: _Lane) -> None:
        now = self._clock.seconds()
        while (
            lane.due
            and lane.in_flight < lane.endpoint.concurrency
            and lane.disabled is None
            and self.running
            and not self._stopping
        ):
            when, _, key = lane.due[0]
            if self._when.get(key) != when:
                heapq.heappop(lane.due)  # rescheduled or gone meanwhile
                continue
            if when > now:
                break
            heapq.heappop(lane.due)
            del self._when[key]
            entry = self.pending.get(key)
            if entry is None:
                continue
            if not self._store.holds(key):  # the lease ran out (a frozen node): not ours now
                del self.pending[key]
                _log.warn(
                    "webhook {key}: not sent, its lease ran out (another node may send it)",
                    key=key,
                )
                continue
            lane.in_flight += 1
            self._flying.add(key)
            attempt = Deferred.fromCoroutine(self._attempt(lane, entry))
            self._attempts.add(attempt)
            lane.attempts.add(attempt)
            attempt.addBoth(self._attempt_over, attempt, lane)
        self._arm(lane)

    def _attempt_over(self, result: object, attempt: Deferred[Any], lane: _Lane) -> None:
        self._attempts.discard(attempt)
        lane.attempts.discard(attempt)
        if isinstance(result, Failure):
            _log.failure("webhook attempt failed", result)

    def _in_background(self, work: Deferred[Any]) -> None:
        self._background.add(work)

        def done(result: object) -> None:
            self._background.discard(work)
            if isinstance(result, Failure):
                _log.failure("webhook outbox write failed", result)

        work.addBoth(done)

    # -- one attempt ------------------------------------------------------------------------

    async def _attempt(self, lane: _Lane, entry: OutboxEntry) -> None:
        endpoint = lane.endpoint
        try:
            result = await self._delivery.attempt(entry, endpoint)
            await self._record(lane, entry, result)
        finally:
            self._flying.discard(entry.key)
            lane.in_flight -= 1
            self._pump(lane)

    def _outcome(
        self, endpoint: Endpoint, entry: OutboxEntry, result: AttemptResult
    ) -> tuple[OutboxEntry, str]:
        """The entry after ``result`` (an attempt to ``endpoint``), and the log line's verdict."""
        now = self._clock.seconds()
        attempts = entry.attempts + 1
        seen: dict[str, Any] = {
            "last_attempt": now,
            "last_status": result.status,
            "last_error": result.error,
        }
        final: dict[str, Any] = {"next_attempt": None, "finished_at": now, "attempts": attempts}
        if result.outcome is Outcome.DELIVERED:
            return replace(entry, state=EntryState.DONE, **seen, **final), "delivered"
        if result.outcome is Outcome.DEAD:
            return replace(entry, state=EntryState.DEAD, **seen, **final), "dead-lettered"
        if result.outcome is Outcome.DISABLE:
            return replace(entry, next_attempt=now, **seen), "endpoint disabled"
        next_time = endpoint.retry.next_attempt(attempts, now, self._rng, result.retry_after)
        if next_time is None:
            verdict = f"dead-lettered after {attempts} attempts"
            return replace(entry, state=EntryState.DEAD, **seen, **final), verdict
        verdict = (
            f"attempt {attempts} of {endpoint.retry.max_attempts} failed, next at "
            f"{iso_time(next_time)}"
        )
        return replace(entry, next_attempt=next_time, attempts=attempts, **seen), verdict

    async def _record(self, lane: _Lane, entry: OutboxEntry, result: AttemptResult) -> None:
        new, verdict = self._outcome(lane.endpoint, entry, result)
        self._count(new, result)
        if new.state is EntryState.DONE:
            self.recent.append(new)
            self._in_background(self._store.discard(new.key))
        else:
            try:
                await self._store.update(new)
            except NoSuchEntry:  # a shared outbox: the lease ran out meanwhile
                _log.warn(
                    "webhook {key}: the outcome was not stored, its lease ran out",
                    key=new.key,
                )
            except Exception:  # the disk still has the pending entry: it is sent again later
                _log.failure(
                    "webhook {event_id}: the outcome was not stored", event_id=new.event_id
                )
        fields: dict[str, Any] = {
            "event_id": new.event_id,
            "endpoint": new.endpoint,
            "type": new.type,
            "status": result.status if result.status is not None else "no response",
            "latency": round(result.latency, 3),
            "verdict": verdict,
            "error": result.error or "",
            "attempts": new.attempts,
            "next_attempt": new.next_attempt,
            "state": new.state.value,
        }
        text = "webhook {event_id} to {endpoint}: {status} in {latency} s: {verdict}"
        if result.error:
            text += " ({error})"
        if new.state is EntryState.DEAD or result.outcome is Outcome.DISABLE:
            _log.warn(text, **fields)
        else:
            _log.info(text, **fields)
        # An endpoint removed by a reload while this attempt ran may be back by now.
        current = self._lanes.get(new.endpoint) if lane.removed else lane
        if new.state is EntryState.PENDING and self._store.shared:
            # The write gave the lease back: whichever node is free when it is due sends it.
            self.pending.pop(new.key, None)
        elif new.state is EntryState.PENDING and current is None:
            self.pending.pop(new.key, None)
            self._kept.setdefault(new.endpoint, {})[new.key] = new
        elif new.state is EntryState.PENDING and current is not None:
            self.pending[new.key] = new
            self._schedule(current, new.key, new.next_attempt or self._clock.seconds())
        else:
            self.pending.pop(new.key, None)
        if result.outcome is Outcome.DISABLE and lane.disabled is None:
            await self._disable(lane, result)

    def _count(self, new: OutboxEntry, result: AttemptResult) -> None:
        """The delivery metrics of one attempt (endpoint names come from the configuration:
        a bounded label set)."""
        metrics, endpoint = self._metrics, new.endpoint
        if new.state is EntryState.DONE:
            outcome = "delivered"
        elif new.state is EntryState.DEAD:
            outcome = "dead"
            metrics.webhook_dead_letters.labels(endpoint).inc()
        elif result.outcome is Outcome.DISABLE:
            outcome = "disabled"
        else:
            outcome = "retry"
        metrics.webhook_deliveries.labels(endpoint, outcome).inc()
        metrics.webhook_latency.labels(endpoint).observe(result.latency)

    async def _disable(self, lane: _Lane, result: AttemptResult) -> None:
        state = DisabledEndpoint(
            name=lane.endpoint.name,
            url=lane.endpoint.url,
            disabled_at=self._clock.seconds(),
            reason=f"HTTP {result.status} Gone",
        )
        lane.disabled = state
        if lane.removed and lane.endpoint.name not in self._lanes:
            self._kept_states[state.name] = state
        if lane.timer is not None and lane.timer.active():
            lane.timer.cancel()
        lane.timer = None
        self._let_go(state.name)
        _log.warn(
            "webhook endpoint {endpoint} answered 410 Gone: disabled; its events are kept and "
            "not sent until 'mailsrv webhooks redrive --endpoint {endpoint}' or a new URL",
            endpoint=state.name,
            url=state.url,
        )
        try:
            await self._states.put(state)
        except Exception:
            _log.failure("webhook endpoint {endpoint}: could not store", endpoint=state.name)
