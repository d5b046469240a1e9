"""Relay queue records: one message's envelope and per-recipient delivery state, as JSON.

A :class:`QueueRecord` is made from an :class:`~mailsrv.delivery.envelope.AcceptedMessage` when
the message is committed, and holds only its remote recipients, each as a
:class:`RecipientStatus`: its state (pending, deferred, sent, bounced, held), how many attempts
were made, when the next one is due, the last reply and the MTA that gave it, and the DSN request
(``NOTIFY``, ``ORCPT``) it came with, whether a delay warning was sent for it and whether the
next hop took the DSN request over.  Records are immutable; a change is a new record
(:func:`dataclasses.replace`, :meth:`QueueRecord.with_recipients`).

On disk a record is one JSON object, indented and in UTF-8 so an operator can read it::

    {"version": 2, "queue_id": "...", "created_at": 1767225600.5, "sender": "...", ...,
     "client": {...}, "recipients": [{"address": "...", "state": "deferred", ...}]}

Times are seconds since the epoch (the injected clock's time), as JSON numbers.  Loading is
strict: a missing or unknown key, a wrong type, an unknown state or ``version`` raises
:class:`RecordError`, whose message says which field is wrong; never a partial record.

Versions: 2 added ``wire_size`` (the RFC 1870 size of the message on the wire) and, per
recipient, ``delay_warned`` and ``dsn_passed_on``.  A version 1 record (written before the
upgrade) still loads, with ``wire_size`` null and both flags false; it is written back as
version 2 at its next change.  3 added ``relay_headers``: the header lines (the DKIM
signatures, LF line ends) sent on top of the stored body, which ``wire_size`` counts; a version
1 or 2 record loads with none.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from mailsrv.delivery.envelope import (
    AcceptedMessage,
    ClientFacts,
    DsnRequest,
    RemoteRoute,
    Ret,
)
from mailsrv.delivery.envelope_json import (
    DSN_KEYS,
    client_from,
    client_to_dict,
    dsn_from,
    dsn_to_dict,
)
from mailsrv.jsonstore.fields import Fields, decode_json, encode_json, enum_value
from mailsrv.jsonstore.fields import RecordError as RecordError  # the queue's readers use it

SCHEMA_VERSION = 3
"""The ``version`` written in every record."""

READABLE_VERSIONS = (1, 2, 3)
"""The versions :func:`decode` reads; a record of any other version is refused."""

_QUEUE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# Header lines: a field name and colon, or a folded continuation (not first), each ending in LF.
_HEADER_LINES = re.compile(r"(?:[!-9;-~]+:[ \t!-~]*\n)(?:[!-9;-~]+:[ \t!-~]*\n|[ \t][ \t!-~]*\n)*")


def valid_queue_id(text: str) -> bool:
    """True when ``text`` can be a queue id (letters, digits, ``_``, ``-``; safe as a file name)."""
    return _QUEUE_ID.fullmatch(text) is not None


class State(Enum):
    """Where one recipient stands."""

    PENDING = "pending"
    """Not tried yet (or released, or due at once)."""
    DEFERRED = "deferred"
    """Tried, failed temporarily; tried again at ``next_attempt``."""
    SENT = "sent"
    """The next hop accepted it (250): final."""
    BOUNCED = "bounced"
    """Refused for good (5xx, expired, deleted by policy): final."""
    HELD = "held"
    """Put aside by the operator; not tried until released."""

    @property
    def final(self) -> bool:
        """True for sent and bounced: nothing more happens to the recipient."""
        return self in (State.SENT, State.BOUNCED)


@dataclass(frozen=True)
class RecipientStatus:
    """One remote recipient of a queued message and its delivery state."""

    address: str
    domain: str
    state: State = State.PENDING
    attempts: int = 0
    next_attempt: float | None = None
    last_attempt: float | None = None
    last_reply: str | None = None
    remote_mta: str | None = None
    dsn: DsnRequest = field(default_factory=DsnRequest)
    delay_warned: bool = False
    """A delay DSN (``Action: delayed``) was sent for this recipient: at most one is."""
    dsn_passed_on: bool = False
    """The next hop that took this recipient offered DSN, so it got the ``NOTIFY`` request and
    reports success itself: we send no ``relayed`` DSN (RFC 3464 section 2.3.3)."""


@dataclass(frozen=True)
class QueueRecord:
    """A queued message: its envelope, who sent it, and each remote recipient's state."""

    queue_id: str
    created_at: float
    sender: str
    size: int
    client: ClientFacts
    recipients: tuple[RecipientStatus, ...]
    smtputf8: bool = False
    body_8bit: bool = False
    envid: str | None = None
    ret: Ret | None = None
    wire_size: int | None = None
    """The message's size on the wire (RFC 1870: CRLF line ends, no ``Return-Path``, dots not
    doubled, :attr:`relay_headers` included); None when unknown (a version 1 record), see
    :attr:`size_on_wire`."""
    relay_headers: str = ""
    """Header lines sent before the stored body (the DKIM signatures), LF line ends, ASCII."""

    @classmethod
    def from_message(cls, message: AcceptedMessage) -> QueueRecord | None:
        """The new record for ``message``'s remote recipients (None if it has none)."""
        recipients = tuple(
            RecipientStatus(address=r.address, domain=r.route.domain, dsn=r.dsn)
            for r in message.recipients
            if isinstance(r.route, RemoteRoute)
        )
        if not recipients:
            return None
        relay_headers = message.relay_headers.decode("ascii")
        wire_size = message.wire_size
        if wire_size is not None:
            wire_size += headers_wire_size(relay_headers)
        return cls(
            queue_id=message.queue_id,
            created_at=message.received_at,
            sender=message.sender,
            size=message.size,
            client=message.client,
            recipients=recipients,
            smtputf8=message.smtputf8,
            body_8bit=message.body_8bit,
            envid=message.envid,
            ret=message.ret,
            wire_size=wire_size,
            relay_headers=relay_headers,
        )

    @property
    def size_on_wire(self) -> int:
        """What to compare with a next hop's SIZE limit and send as ``SIZE=``.

        :attr:`wire_size` when known; else the stored size less our ``Return-Path`` line, a
        lower bound (each line end is one byte short), so a message that fits is never
        refused here, and one that does not is refused by the peer instead.
        """
        if self.wire_size is not None:
            return self.wire_size
        stored = max(0, self.size - len(f"Return-Path: <{self.sender}>\n".encode()))
        return stored + headers_wire_size(self.relay_headers)

    @property
    def unfinished(self) -> tuple[RecipientStatus, ...]:
        """The recipients still to deliver (pending, deferred or held)."""
        return tuple(r for r in self.recipients if not r.state.final)

    @property
    def done(self) -> bool:
        """True when every recipient is sent or bounced."""
        return not self.unfinished

    def find(self, address: str) -> RecipientStatus | None:
        """The recipient ``address`` (exact, else the one equal ignoring case), or None."""
        for recipient in self.recipients:
            if recipient.address == address:
                return recipient
        folded = [r for r in self.recipients if r.address.casefold() == address.casefold()]
        return folded[0] if len(folded) == 1 else None

    def with_recipients(self, changed: Iterable[RecipientStatus]) -> QueueRecord:
        """A copy where each recipient in ``changed`` replaces the one with its address."""
        by_address = {r.address: r for r in changed}
        unknown = by_address.keys() - {r.address for r in self.recipients}
        if unknown:
            raise ValueError(f"{self.queue_id} has no recipient {sorted(unknown)[0]}")
        return replace(
            self, recipients=tuple(by_address.get(r.address, r) for r in self.recipients)
        )


def headers_wire_size(headers: str) -> int:
    """The size on the wire of header lines in the stored form (each LF goes as CRLF)."""
    return len(headers) + headers.count("\n")


def valid_relay_headers(text: str) -> bool:
    """True when ``text`` is whole header lines (or nothing) that are safe to send as they are:
    printable ASCII, each line a ``Name:`` field or a folded continuation, LF-terminated, no
    empty line (which would end the header section)."""
    return not text or _HEADER_LINES.fullmatch(text) is not None


# --- JSON ----------------------------------------------------------------------------------


def to_dict(record: QueueRecord) -> dict[str, Any]:
    """The JSON object for ``record`` (what is written to disk and sent to the CLI)."""
    return {
        "version": SCHEMA_VERSION,
        "queue_id": record.queue_id,
        "created_at": record.created_at,
        "sender": record.sender,
        "size": record.size,
        "smtputf8": record.smtputf8,
        "body_8bit": record.body_8bit,
        "envid": record.envid,
        "ret": record.ret.value if record.ret is not None else None,
        "wire_size": record.wire_size,
        "relay_headers": record.relay_headers,
        "client": client_to_dict(record.client),
        "recipients": [_recipient_dict(r) for r in record.recipients],
    }


def _recipient_dict(recipient: RecipientStatus) -> dict[str, Any]:
    return {
        "address": recipient.address,
        "domain": recipient.domain,
        "state": recipient.state.value,
        "attempts": recipient.attempts,
        "next_attempt": recipient.next_attempt,
        "last_attempt": recipient.last_attempt,
        "last_reply": recipient.last_reply,
        "remote_mta": recipient.remote_mta,
        **dsn_to_dict(recipient.dsn),
        "delay_warned": recipient.delay_warned,
        "dsn_passed_on": recipient.dsn_passed_on,
    }


def encode(record: QueueRecord) -> bytes:
    """``record`` as stored: :func:`mailsrv.jsonstore.fields.encode_json` of its fields."""
    return encode_json(to_dict(record))


def decode(data: bytes, queue_id: str | None = None) -> QueueRecord:
    """Parse and validate a stored record; RecordError if anything is wrong.

    With ``queue_id``, the record must carry that id (the name of the file it came from).
    """
    record = from_dict(decode_json(data))
    if queue_id is not None and record.queue_id != queue_id:
        raise RecordError(f"queue_id {record.queue_id!r} does not match the file name")
    return record


def from_dict(raw: object) -> QueueRecord:
    """Validate a record's JSON object (see :func:`decode`)."""
    version = _version(raw)
    top = Fields(raw, "record", _RECORD_KEYS[version])
    queue_id = top.text("queue_id")
    if not valid_queue_id(queue_id):
        raise RecordError(f"queue_id {queue_id!r} is not a valid queue id")
    recipients_raw = top.value("recipients")
    if not isinstance(recipients_raw, list) or not recipients_raw:
        raise RecordError("recipients: expected a non-empty list")
    recipients = tuple(
        _recipient(item, f"recipients[{n}]", version) for n, item in enumerate(recipients_raw)
    )
    if len({r.address for r in recipients}) != len(recipients):
        raise RecordError("recipients: an address is listed twice")
    ret = top.optional_text("ret")
    relay_headers = top.text("relay_headers", True, True) if version >= 3 else ""
    if not valid_relay_headers(relay_headers):
        raise RecordError("relay_headers: expected header lines ending in LF")
    return QueueRecord(
        queue_id=queue_id,
        created_at=top.number("created_at"),
        sender=top.text("sender", allow_empty=True),
        size=top.count("size"),
        client=client_from(top.value("client"), "client"),
        recipients=recipients,
        smtputf8=top.flag("smtputf8"),
        body_8bit=top.flag("body_8bit"),
        envid=top.optional_text("envid"),
        ret=enum_value(Ret, ret, "ret") if ret is not None else None,
        wire_size=top.optional_count("wire_size") if version >= 2 else None,
        relay_headers=relay_headers,
    )


def _version(raw: object) -> int:
    if not isinstance(raw, Mapping):
        raise RecordError("record: expected an object")
    version = raw.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        *others, last = map(str, READABLE_VERSIONS)
        readable = f"{', '.join(others)} or {last}" if others else last
        raise RecordError(f"version {version!r} is not supported (this mailsrv reads {readable})")
    assert isinstance(version, int)
    return version


def _recipient(raw: object, where: str, version: int) -> RecipientStatus:
    fields = Fields(raw, where, _RECIPIENT_KEYS[version])
    return RecipientStatus(
        address=fields.text("address"),
        domain=fields.text("domain"),
        state=enum_value(State, fields.text("state"), f"{where}.state"),
        attempts=fields.count("attempts"),
        next_attempt=fields.optional_number("next_attempt"),
        last_attempt=fields.optional_number("last_attempt"),
        last_reply=fields.optional_text("last_reply", allow_controls=True),
        remote_mta=fields.optional_text("remote_mta"),
        dsn=dsn_from(fields),
        delay_warned=fields.flag("delay_warned") if version >= 2 else False,
        dsn_passed_on=fields.flag("dsn_passed_on") if version >= 2 else False,
    )


_RECORD_KEYS_V1 = frozenset(
    (
        "version",
        "queue_id",
        "created_at",
        "sender",
        "size",
        "smtputf8",
        "body_8bit",
        "envid",
        "ret",
        "client",
        "recipients",
    )
)
_RECIPIENT_KEYS_V1 = (
    frozenset(
        (
            "address",
            "domain",
            "state",
            "attempts",
            "next_attempt",
            "last_attempt",
            "last_reply",
            "remote_mta",
        )
    )
    | DSN_KEYS
)
_RECORD_KEYS_V2 = _RECORD_KEYS_V1 | {"wire_size"}
_RECORD_KEYS = {1: _RECORD_KEYS_V1, 2: _RECORD_KEYS_V2, 3: _RECORD_KEYS_V2 | {"relay_headers"}}
_RECIPIENT_KEYS_V2 = _RECIPIENT_KEYS_V1 | {"delay_warned", "dsn_passed_on"}
_RECIPIENT_KEYS = {1: _RECIPIENT_KEYS_V1, 2: _RECIPIENT_KEYS_V2, 3: _RECIPIENT_KEYS_V2}
