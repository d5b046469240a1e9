"""What an operator can do to the webhook outbox (``mailsrv webhooks``).

:class:`OutboxActions` works on the stores and, when the server runs, tells its dispatcher of
every change so that it follows at once; the CLI uses the same class on the files when no server
runs, so the rules are the same everywhere:

* ``list``: every entry (pending and dead-lettered ones from the disk, and the last done ones
  the running server remembers) and every endpoint, configured or still named by entries,
  with its disabled state;
* ``show ID``: the entries of an event (``evt_...``: one per endpoint) or one entry
  (``evt_....<endpoint>``);
* ``redrive``: dead-lettered entries become pending with a fresh retry schedule: one event or
  entry (by id), every one of an endpoint, or all.  It also enables the endpoints it redrives
  for (all of them, for ``redrive`` of everything), since a 410 is undone the same way.
  Redriving nothing is no error; an unknown id or endpoint is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

from mailsrv.webhook.endpoint_state import DisabledEndpoint, EndpointStates
from mailsrv.webhook.endpoint_state import to_dict as state_dict
from mailsrv.webhook.endpoints import Endpoint
from mailsrv.webhook.entries import EntryState, OutboxEntry, valid_event_id, valid_key
from mailsrv.webhook.entries import to_dict as entry_dict
from mailsrv.webhook.outbox_store import NoSuchEntry, Outbox, OutboxError


@dataclass(frozen=True)
class EndpointView:
    """One endpoint as ``list`` shows it."""

    name: str
    url: str | None  # None: not configured any more
    disabled: DisabledEndpoint | None
    pending: int = 0
    dead: int = 0
    done: int = 0


@dataclass(frozen=True)
class OutboxView:
    """What ``list`` shows: the entries, oldest first, and the endpoints."""

    entries: list[OutboxEntry]
    endpoints: list[EndpointView]
    leases: dict[str, tuple[str, float]] = field(default_factory=dict)
    """A shared outbox: the node sending each entry being sent, and until when its lease
    lasts."""


class IOutboxActions(Interface):
    """The operations of ``mailsrv webhooks``; each fires with its result or OutboxError."""

    def list_entries() -> Deferred[OutboxView]:
        """Every entry and endpoint."""

    def show(ident: str) -> Deferred[list[OutboxEntry]]:
        """The entries of an event id, or the one entry of an entry id."""

    def redrive(ident: str | None, endpoint: str | None) -> Deferred[str]:
        """Redrive dead letters (of ``ident``, of ``endpoint``, or all if both are None)."""


class DispatcherHooks(Protocol):
    """What a running dispatcher needs to hear of an operator's change."""

    def redriven(self, entries: Sequence[OutboxEntry]) -> None:
        """Entries were made pending again."""

    def enabled(self, name: str) -> None:
        """The endpoint ``name`` was enabled again."""

    def delivered(self) -> list[OutboxEntry]:
        """The newest done entries, which are no longer on disk."""


def redriven(entry: OutboxEntry, now: float) -> OutboxEntry:
    """A dead-lettered ``entry`` made pending, due at ``now``, with a fresh retry schedule."""
    return replace(entry, state=EntryState.PENDING, attempts=0, next_attempt=now, finished_at=None)


@implementer(IOutboxActions)
class OutboxActions:
    """:class:`IOutboxActions` on the stores, telling the running ``dispatcher`` (if any)."""

    def __init__(
        self,
        store: Outbox,
        states: EndpointStates,
        endpoints: Sequence[Endpoint],
        clock: IReactorTime,
        dispatcher: DispatcherHooks | None = None,
    ) -> None:
        self._store = store
        self._states = states
        self._endpoints = {endpoint.name: endpoint for endpoint in endpoints}
        self._clock = clock
        self._dispatcher = dispatcher

    def reconfigure(self, endpoints: Sequence[Endpoint]) -> None:
        """A reload: ``endpoints`` are the configured ones from now on."""
        self._endpoints = {endpoint.name: endpoint for endpoint in endpoints}

    def list_entries(self) -> Deferred[OutboxView]:
        return Deferred.fromCoroutine(self._list())

    async def _entries(self) -> list[OutboxEntry]:
        """Every entry on disk, and the done ones the running server remembers."""
        entries = await self._store.records()
        if self._dispatcher is not None:
            on_disk = {entry.key for entry in entries}
            entries += [e for e in self._dispatcher.delivered() if e.key not in on_disk]
            entries.sort(key=self._store.sort_key)
        return entries

    async def _list(self) -> OutboxView:
        entries = await self._entries()
        disabled = {state.name: state for state in await self._states.records()}
        names = dict.fromkeys([*self._endpoints, *(e.endpoint for e in entries)])
        views = []
        for name in names:
            states = [e.state for e in entries if e.endpoint == name]
            configured = self._endpoints.get(name)
            views.append(
                EndpointView(
                    name=name,
                    url=configured.url if configured else None,
                    disabled=disabled.get(name),
                    pending=states.count(EntryState.PENDING),
                    dead=states.count(EntryState.DEAD),
                    done=states.count(EntryState.DONE),
                )
            )
        return OutboxView(entries, views, await self._store.leases())

    def show(self, ident: str) -> Deferred[list[OutboxEntry]]:
        return Deferred.fromCoroutine(self._find(ident))

    async def _find(self, ident: str) -> list[OutboxEntry]:
        if valid_key(ident):
            entry = await self._store.get(ident)
            remembered = self._dispatcher.delivered() if self._dispatcher is not None else []
            found = [entry] if entry else [e for e in remembered if e.key == ident]
        elif valid_event_id(ident):
            found = [e for e in await self._entries() if e.event_id == ident]
        else:
            raise OutboxError(f"invalid webhook event id {ident!r} (expected evt_...)")
        if not found:
            raise NoSuchEntry(ident)
        return found

    def redrive(self, ident: str | None, endpoint: str | None) -> Deferred[str]:
        return Deferred.fromCoroutine(self._redrive(ident, endpoint))

    async def _redrive(self, ident: str | None, endpoint: str | None) -> str:
        disabled = {state.name for state in await self._states.records()}
        if ident is not None:
            targets = await self._find(ident)
            enable = {entry.endpoint for entry in targets}
        else:
            targets = await self._store.records()
            if endpoint is not None:
                targets = [entry for entry in targets if entry.endpoint == endpoint]
                if not targets and endpoint not in self._endpoints.keys() | disabled:
                    raise OutboxError(f"no such webhook endpoint {endpoint}")
                enable = {endpoint}
            else:
                enable = disabled
        done = []
        for entry in targets:
            if entry.state is not EntryState.DEAD:
                continue
            try:
                new = await self._store.modify(entry.key, self._redrive_one)
            except NoSuchEntry:
                continue  # removed meanwhile
            if new is not None and new.state is EntryState.PENDING:
                done.append(new)
        enabled = sorted(enable & disabled)
        for name in enabled:
            await self._states.remove(name)
            if self._dispatcher is not None:
                self._dispatcher.enabled(name)
        if self._dispatcher is not None and done:
            self._dispatcher.redriven(done)
        line = f"{len(done)} dead-lettered event(s) redriven"
        if enabled:
            line += f"; endpoint(s) enabled again: {', '.join(enabled)}"
        if not done and not enabled and ident is not None:
            states = sorted({entry.state.value for entry in targets})
            line = f"{ident}: nothing to redrive ({', '.join(states)}, not dead-lettered)"
        return line

    def _redrive_one(self, entry: OutboxEntry) -> OutboxEntry:
        if entry.state is not EntryState.DEAD:
            return entry
        return redriven(entry, self._clock.seconds())


def view_to_dict(view: OutboxView) -> dict[str, Any]:
    """The ``list`` answer as JSON (what the control socket sends and ``--json`` prints)."""
    return {
        "entries": [entry_dict(entry) for entry in view.entries],
        "endpoints": [
            {
                "name": e.name,
                "url": e.url,
                "configured": e.url is not None,
                "disabled": state_dict(e.disabled) if e.disabled else None,
                "pending": e.pending,
                "dead": e.dead,
                "done": e.done,
            }
            for e in view.endpoints
        ],
        "leases": {
            key: {"node": node, "until": until} for key, (node, until) in view.leases.items()
        },
    }
