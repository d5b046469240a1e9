"""Endpoints disabled by a ``410 Gone``, remembered across restarts.

Standard Webhooks: a receiver answering 410 wants no more events, so the endpoint is disabled:
its events are kept (pending) but not sent.  That is remembered in
``<data_dir>/outbox/endpoints/<name>.json`` (a :class:`DisabledEndpoint`), so a restart keeps
the endpoint disabled.  It is enabled again, and its events sent, by ``mailsrv webhooks
redrive`` (all, that endpoint, or one of its events), or by a change of the endpoint's URL in
the configuration: a 410 says that URL is gone, and a new URL is a new receiver.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailsrv.jsonstore.directory import RecordDirectory
from mailsrv.jsonstore.fields import Fields, RecordError, decode_json, encode_json
from mailsrv.threads import RunInThread
from mailsrv.webhook.endpoints import NAME_PATTERN
from mailsrv.webhook.outbox_store import OutboxError

_log = Logger(namespace="mailsrv.webhook")

STATE_VERSION = 1
_KEYS = frozenset(("version", "name", "url", "disabled_at", "reason"))


@dataclass(frozen=True)
class DisabledEndpoint:
    """An endpoint disabled at ``disabled_at`` (clock time) for ``reason``, while at ``url``."""

    name: str
    url: str
    disabled_at: float
    reason: str


def to_dict(state: DisabledEndpoint) -> dict[str, Any]:
    """The JSON object of ``state``."""
    return {
        "version": STATE_VERSION,
        "name": state.name,
        "url": state.url,
        "disabled_at": state.disabled_at,
        "reason": state.reason,
    }


def from_dict(raw: object) -> DisabledEndpoint:
    """Validate a stored state (RecordError if anything is wrong)."""
    fields = Fields(raw, "endpoint", _KEYS, version=STATE_VERSION)
    return DisabledEndpoint(
        name=fields.text("name"),
        url=fields.text("url"),
        disabled_at=fields.number("disabled_at"),
        reason=fields.text("reason", allow_controls=True),
    )


class EndpointStates(Protocol):
    """Where disabled endpoints are remembered: this node's files (:class:`DisabledEndpoints`)
    or, for several nodes, the queue database
    (:class:`~mailsrv.webhook.pg_outbox.ClusterDisabledEndpoints`)."""

    def records(self) -> Deferred[list[DisabledEndpoint]]:
        """Every disabled endpoint."""

    def put(self, record: DisabledEndpoint) -> Deferred[None]:
        """Remember a disabled endpoint."""

    def remove(self, key: str) -> Deferred[None]:
        """Enable endpoint ``key`` again (nothing if it is not disabled)."""


class DisabledEndpoints(RecordDirectory[DisabledEndpoint]):
    """The disabled endpoints, one file each under ``root`` (no bodies)."""

    what = "disabled endpoint"
    bodies_what = "stray files"
    orphan_note = "no record refers to them"

    def __init__(
        self, root: Path, run_in_thread: RunInThread, sync: Callable[[], None] | None = None
    ) -> None:
        super().__init__(root, run_in_thread, sync, _log)

    def encode(self, record: DisabledEndpoint) -> bytes:
        return encode_json(to_dict(record))

    def decode(self, data: bytes, key: str) -> DisabledEndpoint:
        state = from_dict(decode_json(data))
        if state.name != key:
            raise RecordError(f"name {state.name!r} does not match the file name")
        return state

    def key_of(self, record: DisabledEndpoint) -> str:
        return record.name

    def valid_key(self, key: str) -> bool:
        return re.fullmatch(NAME_PATTERN, key) is not None

    def sort_key(self, record: DisabledEndpoint) -> tuple[float, str]:
        return (record.disabled_at, record.name)

    def needs_body(self, record: DisabledEndpoint) -> bool:
        return False

    def invalid_key(self, key: str) -> Exception:
        return OutboxError(f"invalid endpoint name {key!r}")

    def missing(self, key: str) -> Exception:
        return OutboxError(f"endpoint {key} is not disabled")

    def loaded_line(self, records: list[DisabledEndpoint]) -> None:
        for state in records:
            _log.warn(
                "webhook endpoint {endpoint} is disabled since it answered {reason} "
                "(mailsrv webhooks redrive --endpoint {endpoint} enables it)",
                endpoint=state.name,
                reason=state.reason,
                url=state.url,
            )
