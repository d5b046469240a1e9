"""Outbox entries: one event for one endpoint, its delivery state, and what its payload needs.

An :class:`OutboxEntry` is immutable; a change is a new entry (:func:`dataclasses.replace`).
Its key, ``<event id>.<endpoint name>``, names its file in the outbox
(:mod:`mailsrv.webhook.outbox_store`).  Its state is one of:

* ``pending``: to be sent at ``next_attempt`` (kept, not sent, while its endpoint is disabled);
* ``dead``: given up (a permanent 4xx, or the retry schedule ran out); ``mailsrv webhooks
  redrive`` makes it pending again;
* ``done``: the receiver answered 2xx.  A done entry leaves the disk at once (with no sync of
  its own: if a crash undoes that, the event is sent again with its id); the running server
  remembers the last ones for ``mailsrv webhooks list`` and ``show``.

What the payload is built from travels with the entry, so that every attempt, before and after
a restart, sends the same event: for ``message.received`` and ``message.queued``
(:class:`MessageSource`) the accepted message and its Maildir paths, the message itself being the
entry's body file (a hard link of the stored message); for the relay outcomes
(:class:`DeliverySource`) the plain values of :func:`~mailsrv.webhook.payload.build_delivery_event`.

On disk an entry is one indented UTF-8 JSON object, read back strictly (every key known, each of
its type; :class:`~mailsrv.jsonstore.fields.RecordError` names the bad field)::

    {"version": 1, "event_id": "evt_...", "endpoint": "crm", "type": "message.received",
     "created_at": 1767225600.25, "state": "pending", "attempts": 2,
     "next_attempt": 1767225905.1, "last_attempt": 1767225605.0, "last_status": 503,
     "last_error": "HTTP 503: ...", "finished_at": null,
     "message": {...}, "maildir": [{"mailbox": "...", "path": "..."}], "delivery": null}
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from mailsrv.delivery.envelope import AcceptedMessage
from mailsrv.delivery.envelope_json import message_from, message_to_dict, orcpt_from
from mailsrv.jsonstore.fields import Fields, RecordError, decode_json, encode_json, enum_value
from mailsrv.webhook.endpoints import (
    EVENT_TYPES,
    MESSAGE_QUEUED,
    MESSAGE_RECEIVED,
    NAME_PATTERN,
    Endpoint,
)

ENTRY_VERSION = 1
"""The ``version`` written in every entry; an entry with another version is refused."""

MESSAGE_EVENTS = frozenset({MESSAGE_RECEIVED, MESSAGE_QUEUED})
"""Event types whose payload is built from a stored message."""

EVENT_ID_PATTERN = r"evt_[0-9a-f]{32}"
_EVENT_ID = re.compile(EVENT_ID_PATTERN)
_KEY = re.compile(rf"({EVENT_ID_PATTERN})\.({NAME_PATTERN})")


def valid_event_id(text: str) -> bool:
    """True for an event id: ``evt_`` and 32 lower-case hex digits."""
    return _EVENT_ID.fullmatch(text) is not None


def valid_key(text: str) -> bool:
    """True for an entry key: ``<event id>.<endpoint name>``."""
    return _KEY.fullmatch(text) is not None


def split_key(text: str) -> tuple[str, str]:
    """``(event id, endpoint name)`` of an entry key (ValueError if it is none)."""
    match = _KEY.fullmatch(text)
    if match is None:
        raise ValueError(f"not an outbox entry id: {text!r}")
    return match.group(1), match.group(2)


def delivery_event_id(queue_id: str, recipient: str, attempt: int) -> str:
    """The id of the relay outcome of ``recipient``'s ``attempt``-th delivery attempt.

    Derived, not random: when the server dies after the event is written but before the queue
    records the attempt, the attempt is made again and its event gets the same id, so the
    receiver can drop the duplicate.
    """
    digest = hashlib.sha256(f"relay\0{queue_id}\0{recipient}\0{attempt}".encode()).hexdigest()
    return f"evt_{digest[:32]}"


class EntryState(Enum):
    """Where an entry stands (see the module docstring)."""

    PENDING = "pending"
    DEAD = "dead"
    DONE = "done"


@dataclass(frozen=True)
class MessageSource:
    """What a message event is built from: the message (its body is the entry's body file)
    and the file delivered to each local mailbox."""

    message: AcceptedMessage
    maildir: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class DeliverySource:
    """What a relay outcome event is built from (see ``build_delivery_event``)."""

    queue_id: str
    mail_from: str
    recipient: str
    attempts: int
    reply: str | None = None
    remote_mta: str | None = None
    next_attempt: float | None = None
    envid: str | None = None
    orcpt: tuple[str, str] | None = None


@dataclass(frozen=True)
class OutboxEntry:
    """One event for one endpoint and its delivery state.

    ``created_at`` is the event's time (the payload's ``timestamp``); ``attempts`` counts the
    attempts made since the entry was made or redriven (while pending, all of them failed);
    ``last_status`` is the last HTTP status (None: no response); ``finished_at`` when it
    became done or dead.
    """

    event_id: str
    endpoint: str
    type: str
    created_at: float
    source: MessageSource | DeliverySource
    state: EntryState = EntryState.PENDING
    attempts: int = 0
    next_attempt: float | None = None
    last_attempt: float | None = None
    last_status: int | None = None
    last_error: str | None = None
    finished_at: float | None = None

    @property
    def key(self) -> str:
        """``<event id>.<endpoint name>``: the entry's id and file name."""
        return f"{self.event_id}.{self.endpoint}"

    @property
    def keeps_body(self) -> bool:
        """True while the entry needs the message file (a message event not yet done)."""
        return isinstance(self.source, MessageSource) and self.state is not EntryState.DONE


def new_entries(
    event_id: str,
    event_type: str,
    happened: float,
    source: MessageSource | DeliverySource,
    endpoints: Sequence[Endpoint],
) -> list[OutboxEntry]:
    """One pending entry of the event per endpoint, each due at its first retry delay."""
    return [
        OutboxEntry(
            event_id=event_id,
            endpoint=endpoint.name,
            type=event_type,
            created_at=happened,
            source=source,
            next_attempt=happened + endpoint.retry.delays[0],
        )
        for endpoint in endpoints
    ]


# --- JSON ----------------------------------------------------------------------------------

_ENTRY_KEYS = frozenset(
    (
        "version",
        "event_id",
        "endpoint",
        "type",
        "created_at",
        "state",
        "attempts",
        "next_attempt",
        "last_attempt",
        "last_status",
        "last_error",
        "finished_at",
        "message",
        "maildir",
        "delivery",
    )
)
_DELIVERY_KEYS = frozenset(
    (
        "queue_id",
        "mail_from",
        "recipient",
        "attempts",
        "reply",
        "remote_mta",
        "next_attempt",
        "envid",
        "orcpt",
    )
)
_MAILDIR_KEYS = frozenset(("mailbox", "path"))


def to_dict(entry: OutboxEntry) -> dict[str, Any]:
    """The JSON object of ``entry`` (on disk, and what the control socket sends)."""
    source = entry.source
    message = maildir = delivery = None
    if isinstance(source, MessageSource):
        message = message_to_dict(source.message)
        maildir = [{"mailbox": mailbox, "path": path} for mailbox, path in source.maildir]
    else:
        delivery = {
            "queue_id": source.queue_id,
            "mail_from": source.mail_from,
            "recipient": source.recipient,
            "attempts": source.attempts,
            "reply": source.reply,
            "remote_mta": source.remote_mta,
            "next_attempt": source.next_attempt,
            "envid": source.envid,
            "orcpt": list(source.orcpt) if source.orcpt is not None else None,
        }
    return {
        "version": ENTRY_VERSION,
        "event_id": entry.event_id,
        "endpoint": entry.endpoint,
        "type": entry.type,
        "created_at": entry.created_at,
        "state": entry.state.value,
        "attempts": entry.attempts,
        "next_attempt": entry.next_attempt,
        "last_attempt": entry.last_attempt,
        "last_status": entry.last_status,
        "last_error": entry.last_error,
        "finished_at": entry.finished_at,
        "message": message,
        "maildir": maildir,
        "delivery": delivery,
    }


def encode(entry: OutboxEntry) -> bytes:
    """``entry`` as stored: :func:`mailsrv.jsonstore.fields.encode_json` of its fields."""
    return encode_json(to_dict(entry))


def decode(data: bytes, key: str | None = None) -> OutboxEntry:
    """Parse and validate a stored entry; RecordError if anything is wrong.

    With ``key``, the entry must have that key (the name of the file it came from).
    """
    entry = from_dict(decode_json(data))
    if key is not None and entry.key != key:
        raise RecordError(f"event_id and endpoint {entry.key!r} do not match the file name")
    return entry


def from_dict(raw: object) -> OutboxEntry:
    """Validate an entry's JSON object (see :func:`decode`)."""
    top = Fields(raw, "entry", _ENTRY_KEYS, version=ENTRY_VERSION)
    event_id = top.text("event_id")
    if not valid_event_id(event_id):
        raise top.bad("event_id", "evt_ and 32 hex digits")
    endpoint = top.text("endpoint")
    if not re.fullmatch(NAME_PATTERN, endpoint):
        raise top.bad("endpoint", "an endpoint name")
    event_type = top.text("type")
    if event_type not in EVENT_TYPES:
        raise RecordError(f"entry.type: {event_type!r} is not an event type")
    status = top.optional_count("last_status")
    if status is not None and not 100 <= status <= 999:
        raise top.bad("last_status", "null or an HTTP status")
    source: MessageSource | DeliverySource
    if event_type in MESSAGE_EVENTS:
        if top.value("delivery") is not None:
            raise top.bad("delivery", f"null for a {event_type} event")
        source = MessageSource(
            message_from(top.value("message"), "entry.message"), _maildir(top.value("maildir"))
        )
    else:
        if top.value("message") is not None or top.value("maildir") is not None:
            raise top.bad("message", f"null for a {event_type} event")
        source = _delivery(top.value("delivery"))
    return OutboxEntry(
        event_id=event_id,
        endpoint=endpoint,
        type=event_type,
        created_at=top.number("created_at"),
        source=source,
        state=enum_value(EntryState, top.text("state"), "entry.state"),
        attempts=top.count("attempts"),
        next_attempt=top.optional_number("next_attempt"),
        last_attempt=top.optional_number("last_attempt"),
        last_status=status,
        last_error=top.optional_text("last_error", allow_controls=True),
        finished_at=top.optional_number("finished_at"),
    )


def _maildir(raw: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list):
        raise RecordError("entry.maildir: expected a list")
    paths = []
    for n, item in enumerate(raw):
        fields = Fields(item, f"entry.maildir[{n}]", _MAILDIR_KEYS)
        paths.append((fields.text("mailbox"), fields.text("path")))
    return tuple(paths)


def _delivery(raw: object) -> DeliverySource:
    fields = Fields(raw, "entry.delivery", _DELIVERY_KEYS)
    return DeliverySource(
        queue_id=fields.text("queue_id"),
        mail_from=fields.text("mail_from", allow_empty=True),
        recipient=fields.text("recipient"),
        attempts=fields.count("attempts"),
        reply=fields.optional_text("reply", allow_controls=True),
        remote_mta=fields.optional_text("remote_mta"),
        next_attempt=fields.optional_number("next_attempt"),
        envid=fields.optional_text("envid"),
        orcpt=orcpt_from(fields),
    )
