"""Delivery status notifications (RFC 3464): one report for the given recipients of a message.

:func:`compose` builds the ``multipart/report; report-type=delivery-status`` message with the
standard library's ``email`` package: a human-readable part, the ``message/delivery-status``
part (per message: Reporting-MTA, Original-Envelope-Id, Arrival-Date; per recipient:
Original-Recipient, Final-Recipient, Action, Status, Remote-MTA, Diagnostic-Code,
Last-Attempt-Date, Will-Retry-Until), and the original's header section, or the whole original
with ``RET=FULL`` when it is no larger than the size cap.  Addresses or headers that need UTF-8
use the RFC 6533 forms (``message/global-delivery-status``, ``message/global-headers``,
``message/global``).  The result is in the canonical stored form (LF line endings, a
``Return-Path: <>`` line first), ready to be queued from ``<>``.  A message from ``<>`` never
gets a DSN (RFC 3461 section 6.2): :func:`compose` returns None for it.

It reads the original from disk: call it in a thread.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from email import policy as email_policy
from email.generator import BytesGenerator
from email.message import EmailMessage, Message, MIMEPart
from email.parser import BytesParser
from email.utils import formatdate
from io import BytesIO
from pathlib import Path

from mailsrv.relay.message import RecipientResult

FAILED = "failed"
DELAYED = "delayed"
DELIVERED = "delivered"
RELAYED = "relayed"
EXPANDED = "expanded"
ACTIONS = (FAILED, DELAYED, DELIVERED, RELAYED, EXPANDED)

_POLICY = email_policy.default.clone(linesep="\n", cte_type="8bit", max_line_length=78)
_SUBJECTS = {
    FAILED: "Undelivered Mail Returned to Sender",
    DELAYED: "Delayed Mail (still being retried)",
    DELIVERED: "Successful Mail Delivery Report",
}
_INTROS = {
    FAILED: "Your message could not be delivered to one or more recipients.\n"
    "The mail system gave up; the reasons are below.",
    DELAYED: "Your message could not be delivered yet to one or more recipients.\n"
    "The mail system will keep trying; you need not send it again.",
    DELIVERED: "Your message was delivered to the recipients below, as you asked.",
}


@dataclass(frozen=True)
class RecipientOutcome:
    """What to report for one recipient.

    ``status`` is the RFC 3463 code (``"5.1.1"``); ``diagnostic`` the reply line that decided
    it (``"550 5.1.1 No such user"``); ``orcpt`` the ORCPT given at submission, decoded
    (``"rfc822;bob@example.net"``).  Times are POSIX seconds.
    """

    recipient: str
    action: str
    status: str
    diagnostic: str = ""
    remote_mta: str = ""
    last_attempt: float | None = None
    orcpt: str | None = None
    will_retry_until: float | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown DSN action {self.action!r}")


def outcome_from_result(
    result: RecipientResult,
    action: str,
    last_attempt: float,
    orcpt: str | None = None,
    will_retry_until: float | None = None,
) -> RecipientOutcome:
    """The outcome to report for a client result (the scheduler picks the action)."""
    status = result.enhanced or f"{result.code // 100}.0.0"
    return RecipientOutcome(
        recipient=result.recipient,
        action=action,
        status=status,
        diagnostic=result.reply_line,
        remote_mta=result.remote_mta,
        last_attempt=last_attempt,
        orcpt=orcpt,
        will_retry_until=will_retry_until,
    )


def _date(when: float) -> str:
    return formatdate(when, localtime=False, usegmt=True)


def _address_field(address: str) -> str:
    return f"{'rfc822' if address.isascii() else 'utf-8'}; {address}"


def _original_recipient(orcpt: str) -> str:
    addr_type, _sep, value = orcpt.partition(";")
    return f"{addr_type.strip()}; {value.strip()}"


def _fields(pairs: list[tuple[str, str]]) -> Message:
    block = Message(policy=_POLICY)
    for name, value in pairs:
        block[name] = value
    return block


def _per_message(
    hostname: str, queue_id: str, envid: str | None, arrival: float
) -> list[tuple[str, str]]:
    pairs = [("Reporting-MTA", f"dns; {hostname}")]
    if queue_id:
        pairs.append(("X-Mailsrv-Queue-ID", queue_id))
    if envid:
        pairs.append(("Original-Envelope-Id", envid))
    pairs.append(("Arrival-Date", _date(arrival)))
    return pairs


def _per_recipient(outcome: RecipientOutcome) -> list[tuple[str, str]]:
    pairs = []
    if outcome.orcpt and ";" in outcome.orcpt:
        pairs.append(("Original-Recipient", _original_recipient(outcome.orcpt)))
    pairs += [
        ("Final-Recipient", _address_field(outcome.recipient)),
        ("Action", outcome.action),
        ("Status", outcome.status),
    ]
    if outcome.remote_mta:
        pairs.append(("Remote-MTA", f"dns; {outcome.remote_mta}"))
    if outcome.diagnostic:
        pairs.append(("Diagnostic-Code", f"smtp; {outcome.diagnostic}"))
    if outcome.last_attempt is not None:
        pairs.append(("Last-Attempt-Date", _date(outcome.last_attempt)))
    if outcome.will_retry_until is not None:
        pairs.append(("Will-Retry-Until", _date(outcome.will_retry_until)))
    return pairs


def _human(hostname: str, kind: str, outcomes: Sequence[RecipientOutcome]) -> str:
    lines = [f"This is the mail system at {hostname}.", "", _INTROS[kind], ""]
    for outcome in outcomes:
        where = f" (host {outcome.remote_mta})" if outcome.remote_mta else ""
        lines.append(f"<{outcome.recipient}>: {outcome.action}{where}")
        if outcome.diagnostic:
            lines.append(f"    {outcome.diagnostic}")
        if outcome.will_retry_until is not None:
            lines.append(f"    Still trying until {_date(outcome.will_retry_until)}.")
    return "\n".join(lines) + "\n"


def _headers_only(original: Path | bytes) -> bytes:
    """The original's header section, read only as far as needed."""
    if isinstance(original, bytes):
        data = original
    else:
        chunks = []
        with open(original, "rb") as f:
            while True:
                chunk = f.read(65536)
                chunks.append(chunk)
                if not chunk or b"\n\n" in b"".join(chunks[-2:]):
                    break
        data = b"".join(chunks)
    if data[:12].lower() == b"return-path:":
        data = data.split(b"\n", 1)[1] if b"\n" in data else b""
    end = data.find(b"\n\n")
    return data[: end + 1] if end >= 0 else data


def _full(original: Path | bytes, limit: int) -> bytes | None:
    """The whole original (without our Return-Path) if it fits in ``limit`` bytes, else None."""
    if isinstance(original, bytes):
        data = original
    else:
        with open(original, "rb") as f:
            data = f.read(limit + 4096)
    if data[:12].lower() == b"return-path:":
        data = data.split(b"\n", 1)[1] if b"\n" in data else b""
    return data if len(data) <= limit else None


def _returned_part(original: Path | bytes, ret: str | None, limit: int) -> MIMEPart:
    part = MIMEPart(policy=_POLICY)
    whole = _full(original, limit) if ret == "FULL" else None
    if whole is not None:
        parsed = BytesParser(policy=email_policy.compat32).parsebytes(whole)
        part["Content-Type"] = "message/rfc822" if whole.isascii() else "message/global"
        if not whole.isascii():
            part["Content-Transfer-Encoding"] = "8bit"
        part.set_payload([parsed])
        part["Content-Description"] = "Undelivered message"
        return part
    headers = _headers_only(original)
    if headers.isascii():
        part["Content-Type"] = "text/rfc822-headers"
    else:
        part["Content-Type"] = "message/global-headers"
        part["Content-Transfer-Encoding"] = "8bit"
    part["Content-Description"] = "Headers of the undelivered message"
    part.set_payload(headers.decode("ascii", "surrogateescape"))
    return part


def _status_part(
    per_message: list[tuple[str, str]], per_recipient: list[list[tuple[str, str]]]
) -> MIMEPart:
    part = MIMEPart(policy=_POLICY)
    part["Content-Description"] = "Delivery report"
    blocks = [per_message, *per_recipient]
    if all(name.isascii() and value.isascii() for block in blocks for name, value in block):
        part["Content-Type"] = "message/delivery-status"
        part.set_payload([_fields(block) for block in blocks])
        return part
    # RFC 6533: UTF-8 in the report, which the email package has no writer for: render it.
    part["Content-Type"] = "message/global-delivery-status"
    part["Content-Transfer-Encoding"] = "8bit"
    text = "\n".join("".join(f"{n}: {v}\n" for n, v in block) for block in blocks)
    part.set_payload(text.encode("utf-8").decode("ascii", "surrogateescape"))
    return part


class _Generator(BytesGenerator):
    """Writes the raw bytes (kept as surrogate escapes) of ``message/global*`` string payloads.

    The stock generator encodes a string payload of a ``message/*`` part as strict ASCII.
    """

    def _encode(self, s: str) -> bytes:
        return s.encode("ascii", "surrogateescape")


def compose(
    original: Path | bytes,
    sender: str,
    outcomes: Sequence[RecipientOutcome],
    hostname: str,
    now: float,
    arrival: float,
    envid: str | None = None,
    ret: str | None = None,
    max_full_size: int = 50000,
    queue_id: str = "",
) -> bytes | None:
    """The DSN to send to ``sender`` about ``outcomes``, or None for the null sender ``<>``.

    ``original`` is the stored message (path or bytes, canonical form); ``now`` dates the
    report, ``arrival`` is when the original was accepted.  With ``ret == "FULL"`` the whole
    original is returned when it is at most ``max_full_size`` bytes; otherwise its headers.
    """
    if not sender:
        return None  # never a DSN for a DSN (or any mail from <>)
    if not outcomes:
        raise ValueError("a DSN needs at least one recipient outcome")
    actions = {o.action for o in outcomes}
    kind = FAILED if FAILED in actions else DELAYED if DELAYED in actions else DELIVERED

    report = EmailMessage(policy=_POLICY)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = f"<{sender}>"
    report["Subject"] = _SUBJECTS[kind]
    report["Date"] = _date(now)
    report["Message-ID"] = f"<{int(now)}.{secrets.token_hex(8)}@{hostname}>"
    report["Auto-Submitted"] = "auto-replied"
    report["MIME-Version"] = "1.0"
    report["Content-Type"] = "multipart/report; report-type=delivery-status"

    human = MIMEPart(policy=_POLICY)
    human.set_content(_human(hostname, kind, outcomes), subtype="plain", charset="utf-8")
    human["Content-Description"] = "Notification"
    status = _status_part(
        _per_message(hostname, queue_id, envid, arrival), [_per_recipient(o) for o in outcomes]
    )
    report.set_payload([human, status, _returned_part(original, ret, max_full_size)])
    report.set_boundary(f"=_dsn_{secrets.token_hex(12)}")

    out = BytesIO()
    _Generator(out, policy=_POLICY).flatten(report)
    return b"Return-Path: <>\n" + out.getvalue()
