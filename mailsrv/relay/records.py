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
version 2 at its next change.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from mailsrv.delivery.envelope import (
    AcceptedMessage,
    ClientFacts,
    DsnRequest,
    Notify,
    RemoteRoute,
    Ret,
)

SCHEMA_VERSION = 2
"""The ``version`` written in every record."""

READABLE_VERSIONS = (1, 2)
"""The versions :func:`decode` reads; a record of any other version is refused."""

_QUEUE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def valid_queue_id(text: str) -> bool:
    """True when ``text`` can be a queue id (letters, digits, ``_``, ``-``; safe as a file name)."""
    return _QUEUE_ID.fullmatch(text) is not None


class RecordError(ValueError):
    """A stored record is broken or of an unknown version; the message says what is wrong."""


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
    doubled); None when unknown (a version 1 record), see :attr:`size_on_wire`."""

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
            wire_size=message.wire_size,
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
        return max(0, self.size - len(f"Return-Path: <{self.sender}>\n".encode()))

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


# --- JSON ----------------------------------------------------------------------------------


def to_dict(record: QueueRecord) -> dict[str, Any]:
    """The JSON object for ``record`` (what is written to disk and sent to the CLI)."""
    client = record.client
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
        "client": {
            "ip": client.ip,
            "helo": client.helo,
            "listener": client.listener,
            "login": client.login,
            "tls_version": client.tls_version,
            "tls_cipher": client.tls_cipher,
            "trusted": client.trusted,
        },
        "recipients": [_recipient_dict(r) for r in record.recipients],
    }


def _recipient_dict(recipient: RecipientStatus) -> dict[str, Any]:
    orcpt = recipient.dsn.orcpt
    return {
        "address": recipient.address,
        "domain": recipient.domain,
        "state": recipient.state.value,
        "attempts": recipient.attempts,
        "next_attempt": recipient.next_attempt,
        "last_attempt": recipient.last_attempt,
        "last_reply": recipient.last_reply,
        "remote_mta": recipient.remote_mta,
        "notify": sorted(n.value for n in recipient.dsn.notify),
        "orcpt": list(orcpt) if orcpt is not None else None,
        "delay_warned": recipient.delay_warned,
        "dsn_passed_on": recipient.dsn_passed_on,
    }


def encode(record: QueueRecord) -> bytes:
    """``record`` as indented UTF-8 JSON with a final newline."""
    text = json.dumps(to_dict(record), indent=2, ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")


def _refuse_constant(name: str) -> float:
    raise RecordError(f"{name} is not a number")


def decode(data: bytes, queue_id: str | None = None) -> QueueRecord:
    """Parse and validate a stored record; RecordError if anything is wrong.

    With ``queue_id``, the record must carry that id (the name of the file it came from).
    """
    try:
        raw = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as e:
        raise RecordError(f"not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RecordError(f"not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    record = from_dict(raw)
    if queue_id is not None and record.queue_id != queue_id:
        raise RecordError(f"queue_id {record.queue_id!r} does not match the file name")
    return record


def from_dict(raw: object) -> QueueRecord:
    """Validate a record's JSON object (see :func:`decode`)."""
    version = _version(raw)
    top = _Fields(raw, "record", _RECORD_KEYS[version])
    queue_id = top.text("queue_id")
    if not valid_queue_id(queue_id):
        raise RecordError(f"queue_id {queue_id!r} is not a valid queue id")
    client = _Fields(top.value("client"), "client", _CLIENT_KEYS)
    recipients_raw = top.value("recipients")
    if not isinstance(recipients_raw, list) or not recipients_raw:
        raise RecordError("recipients: expected a non-empty list")
    recipients = tuple(
        _recipient(item, f"recipients[{n}]", version) for n, item in enumerate(recipients_raw)
    )
    if len({r.address for r in recipients}) != len(recipients):
        raise RecordError("recipients: an address is listed twice")
    ret = top.optional_text("ret")
    return QueueRecord(
        queue_id=queue_id,
        created_at=top.number("created_at"),
        sender=top.text("sender", allow_empty=True),
        size=top.count("size"),
        client=ClientFacts(
            ip=client.text("ip"),
            helo=client.text("helo", allow_empty=True),
            listener=client.text("listener"),
            login=client.optional_text("login"),
            tls_version=client.optional_text("tls_version"),
            tls_cipher=client.optional_text("tls_cipher"),
            trusted=client.flag("trusted"),
        ),
        recipients=recipients,
        smtputf8=top.flag("smtputf8"),
        body_8bit=top.flag("body_8bit"),
        envid=top.optional_text("envid"),
        ret=_enum(Ret, ret, "ret") if ret is not None else None,
        wire_size=top.optional_count("wire_size") if version >= 2 else None,
    )


def _version(raw: object) -> int:
    if not isinstance(raw, Mapping):
        raise RecordError("record: expected an object")
    version = raw.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        readable = " or ".join(map(str, READABLE_VERSIONS))
        raise RecordError(f"version {version!r} is not supported (this mailsrv reads {readable})")
    assert isinstance(version, int)
    return version


def _recipient(raw: object, where: str, version: int) -> RecipientStatus:
    fields = _Fields(raw, where, _RECIPIENT_KEYS[version])
    notify_raw = fields.value("notify")
    if not isinstance(notify_raw, list) or not all(isinstance(n, str) for n in notify_raw):
        raise RecordError(f"{where}.notify: expected a list of strings")
    notify = frozenset(_enum(Notify, n, f"{where}.notify") for n in notify_raw)
    if Notify.NEVER in notify and len(notify) > 1:
        raise RecordError(f"{where}.notify: NEVER cannot be combined with other keywords")
    orcpt_raw = fields.value("orcpt")
    orcpt: tuple[str, str] | None = None
    if orcpt_raw is not None:
        if (
            not isinstance(orcpt_raw, list)
            or len(orcpt_raw) != 2
            or not all(isinstance(part, str) and part for part in orcpt_raw)
        ):
            raise RecordError(f"{where}.orcpt: expected null or [address type, address]")
        orcpt = (orcpt_raw[0], orcpt_raw[1])
    return RecipientStatus(
        address=fields.text("address"),
        domain=fields.text("domain"),
        state=_enum(State, fields.text("state"), f"{where}.state"),
        attempts=fields.count("attempts"),
        next_attempt=fields.optional_number("next_attempt"),
        last_attempt=fields.optional_number("last_attempt"),
        last_reply=fields.optional_text("last_reply", allow_controls=True),
        remote_mta=fields.optional_text("remote_mta"),
        dsn=DsnRequest(notify=notify, orcpt=orcpt),
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
_CLIENT_KEYS = frozenset(
    ("ip", "helo", "listener", "login", "tls_version", "tls_cipher", "trusted")
)
_RECIPIENT_KEYS_V1 = frozenset(
    (
        "address",
        "domain",
        "state",
        "attempts",
        "next_attempt",
        "last_attempt",
        "last_reply",
        "remote_mta",
        "notify",
        "orcpt",
    )
)
_RECORD_KEYS = {1: _RECORD_KEYS_V1, 2: _RECORD_KEYS_V1 | {"wire_size"}}
_RECIPIENT_KEYS = {1: _RECIPIENT_KEYS_V1, 2: _RECIPIENT_KEYS_V1 | {"delay_warned", "dsn_passed_on"}}


def _enum(kind: type[Any], value: str, where: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(member.value for member in kind)
        raise RecordError(f"{where}: {value!r} is not one of {allowed}") from None


class _Fields:
    """Typed access to a JSON object with exactly ``keys``; RecordError names the bad field."""

    def __init__(self, raw: object, where: str, keys: frozenset[str]) -> None:
        if not isinstance(raw, Mapping):
            raise RecordError(f"{where}: expected an object")
        missing = keys - raw.keys()
        if missing:
            raise RecordError(f"{where}: missing {', '.join(sorted(missing))}")
        unknown = raw.keys() - keys
        if unknown:
            raise RecordError(f"{where}: unknown {', '.join(sorted(map(str, unknown)))}")
        self._raw = raw
        self._where = where

    def value(self, key: str) -> object:
        return self._raw[key]

    def _bad(self, key: str, expected: str) -> RecordError:
        return RecordError(f"{self._where}.{key}: expected {expected}")

    def text(self, key: str, allow_empty: bool = False, allow_controls: bool = False) -> str:
        value = self._raw[key]
        if not isinstance(value, str) or not (value or allow_empty):
            raise self._bad(key, "a string" if allow_empty else "a non-empty string")
        if not allow_controls and _CONTROL.search(value):
            raise self._bad(key, "no control characters")
        return value

    def optional_text(self, key: str, allow_controls: bool = False) -> str | None:
        if self._raw[key] is None:
            return None
        return self.text(key, allow_controls=allow_controls)

    def number(self, key: str) -> float:
        value = self._raw[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(key, "a number")
        if not math.isfinite(value) or value < 0:
            raise self._bad(key, "a finite number of seconds since the epoch")
        return float(value)

    def optional_number(self, key: str) -> float | None:
        return None if self._raw[key] is None else self.number(key)

    def count(self, key: str) -> int:
        value = self._raw[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self._bad(key, "a non-negative integer")
        return value

    def optional_count(self, key: str) -> int | None:
        return None if self._raw[key] is None else self.count(key)

    def flag(self, key: str) -> bool:
        value = self._raw[key]
        if not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value
