"""The ``mailsrv webhooks`` requests on the server's control socket.

The server's one control socket (:mod:`mailsrv.relay.control`) answers these actions beside the
queue's, with the same framing (one JSON object per line each way)::

    {"action": "webhooks.list"}                  -> {"ok": true, "entries": [ENTRY, ...],
                                                     "endpoints": [ENDPOINT, ...]}
    {"action": "webhooks.show", "id": ID}        -> {"ok": true, "entries": [ENTRY, ...]}
    {"action": "webhooks.redrive", "id": ID|null, "endpoint": NAME|null}
                                                 -> {"ok": true, "outcome": LINE}
    anything refused                             -> {"ok": false, "error": LINE}

``redrive`` with neither an id nor an endpoint redrives everything.  ENTRY is an outbox entry
as stored (:func:`mailsrv.webhook.entries.to_dict`); ENDPOINT is described by
:func:`mailsrv.webhook.actions.view_to_dict`.  :func:`perform` is also what the CLI runs itself
when no server is running.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mailsrv.webhook.actions import IOutboxActions, view_to_dict
from mailsrv.webhook.endpoints import NAME_PATTERN
from mailsrv.webhook.entries import to_dict, valid_event_id, valid_key
from mailsrv.webhook.outbox_store import OutboxError

PREFIX = "webhooks."
ACTIONS = ("list", "show", "redrive")
_FIELDS = frozenset(("action", "id", "endpoint"))

Handler = Callable[[object], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class WebhookRequest:
    """One validated ``webhooks.*`` request (``action`` without the prefix)."""

    action: str
    id: str | None = None
    endpoint: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The request as sent on the socket."""
        return {"action": PREFIX + self.action, "id": self.id, "endpoint": self.endpoint}


def parse_request(raw: object) -> WebhookRequest:
    """A :class:`WebhookRequest` from its JSON object; OutboxError (one line) if not valid."""
    if not isinstance(raw, dict) or not isinstance(raw.get("action"), str):
        raise OutboxError("bad request: expected an object with an action")
    name = raw["action"]
    action = name[len(PREFIX) :] if name.startswith(PREFIX) else ""
    if action not in ACTIONS:
        raise OutboxError(f"bad request: unknown action {name!r}")
    unknown = raw.keys() - _FIELDS
    if unknown:
        raise OutboxError(f"bad request: unknown field {sorted(unknown)[0]!r}")
    ident, endpoint = raw.get("id"), raw.get("endpoint")
    if ident is not None and (
        not isinstance(ident, str) or not (valid_event_id(ident) or valid_key(ident))
    ):
        raise OutboxError(f"invalid webhook event id {ident!r} (expected evt_...)")
    if endpoint is not None and (
        not isinstance(endpoint, str) or not re.fullmatch(NAME_PATTERN, endpoint)
    ):
        raise OutboxError(f"invalid endpoint name {endpoint!r}")
    if action == "show" and ident is None:
        raise OutboxError("bad request: show needs an id")
    if action != "redrive" and endpoint is not None:
        raise OutboxError(f"bad request: {action} takes no endpoint")
    if action == "list" and ident is not None:
        raise OutboxError("bad request: list takes no id")
    if ident is not None and endpoint is not None:
        raise OutboxError("bad request: redrive takes an id or an endpoint, not both")
    return WebhookRequest(action, ident, endpoint)


async def perform(actions: IOutboxActions, request: WebhookRequest) -> dict[str, Any]:
    """Run ``request`` on ``actions``; the successful response (OutboxError is passed on)."""
    if request.action == "list":
        return {"ok": True, **view_to_dict(await actions.list_entries())}
    if request.action == "show":
        assert request.id is not None
        entries = await actions.show(request.id)
        return {"ok": True, "entries": [to_dict(entry) for entry in entries]}
    outcome = await actions.redrive(request.id, request.endpoint)
    return {"ok": True, "outcome": outcome}


def handlers(actions: IOutboxActions) -> dict[str, Handler]:
    """The control socket's handlers of the ``webhooks.*`` actions."""

    async def handle(raw: object) -> dict[str, Any]:
        return await perform(actions, parse_request(raw))

    return {PREFIX + action: handle for action in ACTIONS}
