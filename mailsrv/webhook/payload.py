"""Webhook event payloads: what a receiver gets, as documented by ``schema/event-v1.json``.

Every event is one JSON object (JSON Schema draft 2020-12, shipped beside this module and
returned by :func:`load_schema`)::

    {"version": 1, "id": "evt_...", "type": "message.received",
     "timestamp": "2026-12-01T10:00:00.123Z", "data": {...}}

``id`` is the event's stable id (also the ``webhook-id`` header); ``timestamp`` is when the event
happened (UTC, RFC 3339).  Two kinds of ``data``:

* ``message.received`` (accepted for local mailboxes) and ``message.queued`` (accepted for
  relay), built by :func:`build_message_event` from the stored message file and the
  :class:`~mailsrv.delivery.envelope.AcceptedMessage`: queue id, envelope (only the recipients
  the event is about: local ones for ``received``, remote ones for ``queued``), client, decoded
  headers, text and HTML bodies (capped, with ``truncated``), attachment metadata (filename,
  content type, size, SHA-256, content id), total size, the Maildir paths, the verdicts of the
  inbound checks (``authentication``: SPF, DKIM per signature, DMARC with its policy and
  disposition, ARC; null for mail not checked), and on request the whole message in base64
  (``raw``; above the cap ``raw_truncated`` and no ``raw``);
* ``message.delivered`` / ``message.deferred`` / ``message.bounced``: one recipient's relay
  outcome, built by :func:`build_delivery_event` from plain values (the remote reply, the remote
  MTA, the attempts so far, the next attempt when deferred).

**Parsing never fails the event.**  The stored form is the Maildir form (LF line ends,
``Return-Path:`` and ``Received:`` prepended).  MIME is parsed with the standard ``email``
package (``policy.default``).  Whatever is malformed (a header that does not parse, a missing
boundary, bad base64, 8-bit header bytes that are not UTF-8, which are read as Latin-1, an
unknown charset, an unreadable file) leaves the affected fields empty or best-effort and adds a
line to ``data.parse_errors``.  Every string is valid Unicode, so the JSON is valid UTF-8.

**Blocking, and its memory bound.**  :func:`build_message_event` reads and parses a file of up
to the largest message size: call it in a thread, never on the reactor.  The parser holds the
message in memory (measured: a peak of about 2.8 times the file size while parsing, then about
1 time); attachments are then measured by decoding their transfer encoding in 64 KiB pieces
straight into the size count and the SHA-256, so no decoded copy of an attachment is ever made
(a 20 MB attachment costs no 20 MB more).  Text bodies are decoded whole, then capped.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from email import policy
from email.generator import BytesGenerator
from email.message import EmailMessage, Message
from email.parser import BytesParser
from importlib import resources
from pathlib import Path
from typing import Any

from mailsrv.delivery.envelope import AcceptedMessage, ClientFacts, LocalRoute, Recipient
from mailsrv.webhook.endpoints import (
    DEFAULT_MAX_RAW_SIZE,
    MESSAGE_BOUNCED,
    MESSAGE_DEFERRED,
    MESSAGE_DELIVERED,
    MESSAGE_QUEUED,
    MESSAGE_RECEIVED,
)

SCHEMA_VERSION = 1
SCHEMA_RESOURCE = "schema/event-v1.json"

DEFAULT_MAX_BODY_SIZE = 1024 * 1024
"""Largest text or HTML body in a payload (UTF-8 bytes); longer ones are cut, ``truncated``."""
MAX_HEADER_FIELDS = 1000
MAX_HEADER_BYTES = 256 * 1024
MAX_ATTACHMENTS = 1000
MAX_PARSE_ERRORS = 100
MAX_REPLY_LENGTH = 4096

_CHUNK = 64 * 1024
_POLICY = policy.default
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_NOT_BASE64 = bytes(
    set(range(256)) - set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
)
_MSG_ID = re.compile(r"<[^<>\s]*>")
_REPLY = re.compile(r"([2-5]\d\d)(?:[ -]([245]\.\d{1,3}\.\d{1,3})\b)?")
_NOT_TEXT_CODECS = frozenset(
    {"unicode-escape", "raw-unicode-escape", "punycode", "idna", "undefined", "mbcs", "oem"}
)
"""Codecs that decode bytes to text but are no mail charset (``codecs.lookup(...).name``)."""
_ADDRESS_HEADERS = {"from": "from", "to": "to", "cc": "cc", "reply-to": "reply_to"}


class _Errors:
    """The ``parse_errors`` list: at most :data:`MAX_PARSE_ERRORS` distinct lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        line = _safe(" ".join(line.split()))[:500]
        if line in self.lines:
            return
        if len(self.lines) < MAX_PARSE_ERRORS:
            self.lines.append(line)
        elif len(self.lines) == MAX_PARSE_ERRORS:
            self.lines.append("more errors not listed")


# --- text hygiene ----------------------------------------------------------------------------


def _safe(text: str) -> str:
    """``text`` with any lone surrogate replaced, so that it encodes as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def _from_raw(text: str, what: str, errors: _Errors) -> str:
    """A parser string (8-bit bytes escaped as surrogates) as text: UTF-8, else Latin-1."""
    if not _ESCAPED_BYTE.search(text):
        return _safe(text)
    data = text.encode("utf-8", "surrogateescape")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        errors.add(f"{what}: 8-bit bytes that are not UTF-8, read as Latin-1")
        return data.decode("latin-1")


def iso_time(seconds: float) -> str:
    """``seconds`` since the epoch as RFC 3339 UTC with milliseconds: ``...T10:00:00.123Z``."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_event_id(now: float) -> str:
    """A new event id, ``evt_`` + 32 hex digits: milliseconds of ``now`` then 80 random bits.

    Ids sort by creation time; they are what ``webhook-id`` carries on every attempt.
    """
    return f"evt_{int(now * 1000) & 0xFFFFFFFFFFFF:012x}{secrets.token_hex(10)}"


# --- headers ---------------------------------------------------------------------------------


def _address_list(header: Any) -> list[dict[str, str]]:
    result = []
    for address in getattr(header, "addresses", ()):
        spec = _safe(address.addr_spec)
        if spec in ("", "<>"):
            continue
        result.append({"name": _safe(address.display_name or ""), "address": spec})
    return result


def _date_iso(header: Any) -> str | None:
    moment = getattr(header, "datetime", None)
    if not isinstance(moment, datetime):
        return None
    if moment.tzinfo is None:  # "-0000": the time is UTC, its zone unknown (RFC 5322 3.3)
        moment = moment.replace(tzinfo=UTC)
    return moment.isoformat().replace("+00:00", "Z")


def _headers(message: Message, errors: _Errors) -> dict[str, Any]:
    listed: list[dict[str, str]] = []
    listed_bytes = 0
    truncated = False
    first: dict[str, tuple[Any, str]] = {}
    for raw_name, raw_value in message.raw_items():
        name = _from_raw(raw_name, "header name", errors)
        value = _from_raw(raw_value, f"header {name}", errors)
        header: Any = None
        try:
            header = _POLICY.header_fetch_parse(name, value)
            text = _safe(str(header))
            for defect in getattr(header, "defects", ()):
                errors.add(f"header {name}: {defect or type(defect).__name__}")
        except Exception as e:  # the header parser has crashed on odd input before
            text = " ".join(value.split())
            errors.add(f"header {name}: cannot be parsed ({type(e).__name__})")
        cost = len(name) + len(text)
        if len(listed) < MAX_HEADER_FIELDS and listed_bytes + cost <= MAX_HEADER_BYTES:
            listed.append({"name": name, "value": text})
            listed_bytes += cost
        else:
            truncated = True
        first.setdefault(name.lower(), (header, text))

    def text_of(key: str) -> str | None:
        found = first.get(key)
        return found[1].strip() if found and found[1].strip() else None

    result: dict[str, Any] = {}
    for key, field in _ADDRESS_HEADERS.items():
        result[field] = _address_list(first[key][0]) if key in first else []
    result["subject"] = first["subject"][1] if "subject" in first else None
    result["date"] = text_of("date")
    result["date_iso"] = _date_iso(first["date"][0]) if "date" in first else None
    result["message_id"] = text_of("message-id")
    result["in_reply_to"] = text_of("in-reply-to")
    references = text_of("references") or ""
    result["references"] = _MSG_ID.findall(references) or references.split()
    result["all"] = listed
    result["truncated"] = truncated
    return result


# --- bodies ----------------------------------------------------------------------------------


def _charset(part: Message) -> str | None:
    try:
        charset = part.get_content_charset()
    except Exception:  # a broken Content-Type parameter
        return None
    return _safe(charset) if charset else None


def _decode_text(data: bytes, charset: str | None, what: str, errors: _Errors) -> str:
    """The declared charset if Python knows it as a text encoding; else UTF-8, else Latin-1."""
    if charset is not None:
        try:
            name: str | None = codecs.lookup(charset).name
        except LookupError:
            name = None
            errors.add(f"{what}: unknown charset {charset!r}")
        if name in _NOT_TEXT_CODECS:
            name = None
            errors.add(f"{what}: charset {charset!r} is not a text encoding")
        if name is not None:
            try:
                return _safe(data.decode(name, "replace"))
            except LookupError:  # a bytes-to-bytes codec such as rot13
                errors.add(f"{what}: charset {charset!r} is not a text encoding")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        errors.add(f"{what}: 8-bit text that is not UTF-8, read as Latin-1")
        return data.decode("latin-1")


def _body(part: Message, what: str, errors: _Errors, max_size: int) -> dict[str, Any] | None:
    try:
        data = part.get_payload(decode=True)
    except Exception as e:
        errors.add(f"{what}: cannot be decoded ({type(e).__name__})")
        return None
    if not isinstance(data, bytes):
        return None
    charset = _charset(part)
    text = _decode_text(data, charset, what, errors)
    encoded = text.encode("utf-8")
    truncated = len(encoded) > max_size
    if truncated:
        text = encoded[:max_size].decode("utf-8", "ignore")
    return {"content": text, "charset": charset, "size": len(encoded), "truncated": truncated}


def _find_body(message: Message, kind: str, errors: _Errors) -> Message | None:
    try:
        found = message.get_body(preferencelist=(kind,))  # type: ignore[attr-defined]
    except Exception as e:
        errors.add(f"{kind} body: the MIME structure cannot be searched ({type(e).__name__})")
        return None
    return found if isinstance(found, Message) else None


# --- attachments -----------------------------------------------------------------------------


class _Digest:
    """A write-only sink that counts and hashes what it is given (for BytesGenerator too)."""

    def __init__(self) -> None:
        self.size = 0
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes | str) -> None:
        chunk = data if isinstance(data, bytes) else data.encode("ascii", "surrogateescape")
        self.size += len(chunk)
        self.sha256.update(chunk)


def _pieces(payload: str) -> Iterator[bytes]:
    for start in range(0, len(payload), _CHUNK):
        yield payload[start : start + _CHUNK].encode("ascii", "surrogateescape")


def _base64_into(payload: str, sink: _Digest, what: str, errors: _Errors) -> None:
    carry = b""
    for piece in _pieces(payload):
        stripped = piece.translate(None, b" \t\r\n")
        data = stripped.translate(None, _NOT_BASE64)
        if len(data) != len(stripped):
            errors.add(f"{what}: characters that are not base64, skipped")
        data = carry + data
        cut = len(data) - len(data) % 4
        carry = data[cut:]
        try:
            sink.write(binascii.a2b_base64(data[:cut]))
        except binascii.Error:
            errors.add(f"{what}: bad base64")
    if carry.rstrip(b"="):
        try:
            sink.write(binascii.a2b_base64(carry + b"=" * (-len(carry) % 4)))
        except binascii.Error:
            errors.add(f"{what}: base64 ends in the middle of a character")


def _quoted_printable_into(payload: str, sink: _Digest) -> None:
    carry = b""
    for piece in _pieces(payload):
        data = carry + piece
        cut = data.rfind(b"\n") + 1  # decode whole lines: soft breaks stay together
        carry = data[cut:]
        sink.write(binascii.a2b_qp(data[:cut]))
    sink.write(binascii.a2b_qp(carry))


def _measure(part: Message, what: str, errors: _Errors) -> _Digest:
    """Size and SHA-256 of the part's decoded content, decoded piece by piece."""
    sink = _Digest()
    payload = part.get_payload()
    if isinstance(payload, list):  # message/rfc822 and the like: the attached message as is
        generator = BytesGenerator(sink, mangle_from_=False, policy=_POLICY)
        for inner in payload:
            if isinstance(inner, EmailMessage):
                generator.flatten(inner)
        return sink
    if not isinstance(payload, str):
        return sink
    encoding = str(part.get("content-transfer-encoding", "7bit")).strip().lower()
    if encoding == "base64":
        _base64_into(payload, sink, what, errors)
    elif encoding == "quoted-printable":
        _quoted_printable_into(payload, sink)
    elif encoding in ("x-uuencode", "uuencode", "uue", "x-uue"):
        data = part.get_payload(decode=True)  # rare and small in practice: stdlib decodes it
        sink.write(data if isinstance(data, bytes) else b"")
    else:
        for piece in _pieces(payload):
            sink.write(piece)
    return sink


def _parts(message: Message) -> Iterator[tuple[int, Message, bool]]:
    """``(number, part, is_leaf)`` for every part, depth first, numbered from 1 (the message).

    Attached messages (``message/*``) are leaves: their insides are not the outer message's
    structure.  No recursion, as nesting can be deep.
    """
    stack = [message]
    number = 0
    while stack:
        part = stack.pop()
        number += 1
        payload = part.get_payload()
        if part.get_content_maintype() == "multipart" and isinstance(payload, list):
            stack.extend(sub for sub in reversed(payload) if isinstance(sub, Message))
            yield number, part, False
        else:
            yield number, part, True


def _attachment(part: Message, what: str, errors: _Errors) -> dict[str, Any]:
    try:
        filename = part.get_filename()
    except Exception as e:
        filename = None
        errors.add(f"{what}: the filename cannot be decoded ({type(e).__name__})")
    content_id = part.get("content-id")
    cid = _safe(str(content_id)).strip().strip("<>") if content_id is not None else ""
    digest = _measure(part, what, errors)
    return {
        "filename": _from_raw(filename, f"{what} filename", errors) if filename else None,
        "content_type": _safe(part.get_content_type()),
        "disposition": _safe(disposition)
        if (disposition := part.get_content_disposition())
        else None,
        "size": digest.size,
        "sha256": digest.sha256.hexdigest(),
        "content_id": cid or None,
    }


def _attachments(
    message: Message, bodies: tuple[Message | None, ...], errors: _Errors
) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for number, part, leaf in _parts(message):
        if not leaf or any(part is body for body in bodies):
            continue
        if len(found) == MAX_ATTACHMENTS:
            errors.add(f"more than {MAX_ATTACHMENTS} attachments: the rest are not listed")
            break
        what = f"part {number}"
        try:
            found.append(_attachment(part, what, errors))
        except Exception as e:
            errors.add(f"{what}: cannot be measured ({type(e).__name__})")
    return found


def _defects(message: Message, errors: _Errors) -> None:
    for number, part, _leaf in _parts(message):
        for defect in part.defects:
            where = "message" if part is message else f"part {number}"
            errors.add(f"{where}: {type(defect).__name__}: {defect}".rstrip(": "))


# --- the parsed message ----------------------------------------------------------------------


def _empty_parse() -> dict[str, Any]:
    return {
        "headers": {
            "from": [],
            "to": [],
            "cc": [],
            "reply_to": [],
            "subject": None,
            "date": None,
            "date_iso": None,
            "message_id": None,
            "in_reply_to": None,
            "references": [],
            "all": [],
            "truncated": False,
        },
        "text": None,
        "html": None,
        "attachments": [],
    }


def _read(path: Path, errors: _Errors) -> tuple[Message | None, int | None, bool]:
    """The parsed file, its size, and whether its whole MIME structure was parsed."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                return BytesParser(policy=_POLICY).parse(f), size, True
            except Exception as e:  # e.g. RecursionError on absurd nesting: keep the headers
                errors.add(f"message: the MIME structure cannot be parsed ({type(e).__name__})")
                f.seek(0)
                return BytesParser(policy=_POLICY).parse(f, headersonly=True), size, False
    except OSError as e:
        errors.add(f"message file: cannot be read ({e.strerror or type(e).__name__})")
    except Exception as e:
        errors.add(f"message: cannot be parsed ({type(e).__name__})")
    return None, None, False


def parse_message_file(path: Path, max_body_size: int = DEFAULT_MAX_BODY_SIZE) -> dict[str, Any]:
    """Headers, bodies, attachments, size and ``parse_errors`` of a stored message.

    Blocking (reads and parses the whole file): run it in a thread.  Never raises: a file that
    cannot be read or parsed gives empty fields and says why in ``parse_errors``; ``size`` is
    None when the file cannot be read.
    """
    errors = _Errors()
    result = _empty_parse()
    message, size, whole = _read(path, errors)
    if message is not None:
        try:
            result["headers"] = _headers(message, errors)
        except Exception as e:
            errors.add(f"headers: cannot be read ({type(e).__name__})")
    if message is not None and whole:
        text_part = _find_body(message, "plain", errors)
        html_part = _find_body(message, "html", errors)
        for key, part in (("text", text_part), ("html", html_part)):
            if part is not None:
                try:
                    result[key] = _body(part, f"{key} body", errors, max_body_size)
                except Exception as e:
                    errors.add(f"{key} body: cannot be decoded ({type(e).__name__})")
        try:
            result["attachments"] = _attachments(message, (text_part, html_part), errors)
        except Exception as e:
            errors.add(f"attachments: cannot be listed ({type(e).__name__})")
        try:
            _defects(message, errors)
        except Exception as e:
            errors.add(f"message: defects cannot be listed ({type(e).__name__})")
    return {**result, "size": size, "parse_errors": errors.lines}


def raw_fields(path: Path, max_raw_size: int = DEFAULT_MAX_RAW_SIZE) -> dict[str, Any]:
    """``{"raw": <base64>, "raw_truncated": false}``, or ``{"raw_truncated": true}`` above the cap.

    Blocking (reads the file): run it in a thread.  An unreadable file counts as over the cap.
    """
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > max_raw_size:
                return {"raw_truncated": True}
            pieces = []
            while chunk := f.read(3 * _CHUNK):  # a multiple of 3: the pieces join cleanly
                pieces.append(base64.b64encode(chunk).decode("ascii"))
            return {"raw": "".join(pieces), "raw_truncated": False}
    except OSError:
        return {"raw_truncated": True}


# --- envelope and client ---------------------------------------------------------------------


def _recipient(recipient: Recipient) -> dict[str, Any]:
    route = recipient.route
    orcpt = recipient.dsn.orcpt
    return {
        "address": recipient.address,
        "route": "local" if isinstance(route, LocalRoute) else "remote",
        "mailboxes": list(route.mailboxes) if isinstance(route, LocalRoute) else [],
        "domain": None if isinstance(route, LocalRoute) else route.domain,
        "notify": sorted(n.value for n in recipient.dsn.notify),
        "orcpt": {"type": orcpt[0], "address": orcpt[1]} if orcpt is not None else None,
    }


def _envelope(message: AcceptedMessage, event_type: str) -> dict[str, Any]:
    local = event_type == MESSAGE_RECEIVED
    return {
        "mail_from": message.sender,
        "rcpt_to": [_recipient(r) for r in message.recipients if r.is_local == local],
        "smtputf8": message.smtputf8,
        "body_8bit": message.body_8bit,
        "envid": message.envid,
        "ret": message.ret.value if message.ret is not None else None,
    }


def _client(client: ClientFacts) -> dict[str, Any]:
    tls = None
    if client.tls_version is not None:
        tls = {"version": client.tls_version, "cipher": client.tls_cipher}
    return {
        "ip": client.ip,
        "helo": client.helo,
        "listener": client.listener,
        "authenticated_user": client.login,
        "tls": tls,
        "trusted": client.trusted,
    }


def _event(
    event_id: str, event_type: str, timestamp: float, data: dict[str, Any]
) -> dict[str, Any]:
    return {
        "version": SCHEMA_VERSION,
        "id": event_id,
        "type": event_type,
        "timestamp": iso_time(timestamp),
        "data": data,
    }


# --- the events ------------------------------------------------------------------------------


def build_message_event(
    message: AcceptedMessage,
    message_file: Path,
    maildir_paths: Mapping[str, str | os.PathLike[str]],
    *,
    event_id: str,
    event_type: str,
    timestamp: float,
    include_raw: bool = False,
    max_raw_size: int = DEFAULT_MAX_RAW_SIZE,
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
) -> dict[str, Any]:
    """The ``message.received`` or ``message.queued`` event for a stored message.

    **Blocking**: it reads and parses ``message_file`` (the stored Maildir form); run it in a
    thread (``deferToThreadPool``), never on the reactor.  ``maildir_paths`` maps each local
    mailbox to the file delivered there; ``timestamp`` is the event's time (the injected
    clock's).  Never raises for what is in the file; see the module docstring.
    """
    if event_type not in (MESSAGE_RECEIVED, MESSAGE_QUEUED):
        raise ValueError(f"not a message event type: {event_type!r}")
    parsed = parse_message_file(message_file, max_body_size)
    size = parsed.pop("size")
    data: dict[str, Any] = {
        "queue_id": message.queue_id,
        "received_at": iso_time(message.received_at),
        "size": message.size if size is None else size,
        "envelope": _envelope(message, event_type),
        "client": _client(message.client),
        **parsed,
        "authentication": (
            message.authentication.to_dict() if message.authentication is not None else None
        ),
        "storage": {
            "maildir": [
                {"mailbox": mailbox, "path": os.fspath(path)}
                for mailbox, path in maildir_paths.items()
            ]
        },
    }
    if include_raw:
        data.update(raw_fields(message_file, max_raw_size))
    return _event(event_id, event_type, timestamp, data)


def parse_reply(reply: str | None) -> dict[str, Any] | None:
    """An SMTP reply as ``{"code": 550, "enhanced_code": "5.1.1", "text": "550 5.1.1 ..."}``."""
    if reply is None:
        return None
    text = _safe(reply.strip())[:MAX_REPLY_LENGTH]
    match = _REPLY.match(text)
    return {
        "code": int(match.group(1)) if match else None,
        "enhanced_code": match.group(2) if match else None,
        "text": text,
    }


def build_delivery_event(
    event_type: str,
    *,
    event_id: str,
    timestamp: float,
    queue_id: str,
    mail_from: str,
    recipient: str,
    attempts: int,
    reply: str | None = None,
    remote_mta: str | None = None,
    next_attempt: float | None = None,
    envid: str | None = None,
    orcpt: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """One recipient's relay outcome: ``message.delivered``, ``.deferred`` or ``.bounced``.

    ``reply`` is the remote (or local, e.g. for an expired message) SMTP reply text,
    ``remote_mta`` the host that gave it, ``attempts`` the delivery attempts made so far and
    ``next_attempt`` (deferred only) when the next one is due, as a clock reading.  Pure.
    """
    if event_type not in (MESSAGE_DELIVERED, MESSAGE_DEFERRED, MESSAGE_BOUNCED):
        raise ValueError(f"not a delivery event type: {event_type!r}")
    data = {
        "queue_id": queue_id,
        "mail_from": mail_from,
        "recipient": recipient,
        "attempts": attempts,
        "remote_mta": remote_mta,
        "reply": parse_reply(reply),
        "next_attempt": iso_time(next_attempt) if next_attempt is not None else None,
        "envid": envid,
        "orcpt": {"type": orcpt[0], "address": orcpt[1]} if orcpt is not None else None,
    }
    return _event(event_id, event_type, timestamp, data)


def encode_event(event: Mapping[str, Any]) -> bytes:
    """The request body: compact JSON in UTF-8 (what is signed and sent)."""
    text = json.dumps(event, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8", "replace")


def load_schema() -> dict[str, Any]:
    """The shipped JSON Schema (draft 2020-12) of every event payload."""
    resource = resources.files("mailsrv.webhook").joinpath(SCHEMA_RESOURCE)
    schema: dict[str, Any] = json.loads(resource.read_text(encoding="utf-8"))
    return schema
