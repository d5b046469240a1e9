"""DSNs (RFC 3464) composed, then parsed back with the email package and checked field by field."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailsrv.relay.body import wire_form
from mailsrv.relay.dsn import RecipientOutcome, compose, outcome_from_result
from mailsrv.relay.message import RecipientResult

ORIGINAL = (
    b"Return-Path: <alice@example.org>\n"
    b"Received: from client.test ([127.0.0.1])\n\tby mx.example.org (mailsrv) with ESMTPA id Q1;\n"
    b"\tTue, 14 Nov 2023 19:26:40 +0000\n"
    b"From: Alice <alice@example.org>\nTo: bob@example.net\nSubject: lunch\n"
    b"Message-ID: <m1@example.org>\n"
    b"\nShall we?\n.\n-- \nAlice\n"
)
NOW, ARRIVAL, TRIED = 1700000100.0, 1699990000.0, 1700000000.0

GONE = RecipientOutcome(
    "bob@example.net",
    "failed",
    "5.1.1",
    "550 5.1.1 No such user",
    "mx.example.net",
    TRIED,
    "rfc822;Bob@example.net",
)
SLOW = RecipientOutcome(
    "carol@example.net",
    "delayed",
    "4.4.1",
    "421 4.4.1 Cannot connect",
    "",
    TRIED,
    None,
    NOW + 86400,
)
DONE = RecipientOutcome(
    "dave@example.net", "delivered", "2.0.0", "250 2.0.0 Queued", "mx.example.net", TRIED
)


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(report: EmailMessage) -> list[EmailMessage]:
    return list(report.iter_parts())  # type: ignore[arg-type]


def status_blocks(report: EmailMessage) -> list[dict[str, str]]:
    status = parts(report)[1]
    assert status.get_content_type() == "message/delivery-status"
    return [{k: str(v) for k, v in block.items()} for block in status.get_payload()]  # type: ignore[union-attr]


def make(**kwargs: object) -> bytes:
    args: dict[str, object] = {
        "original": ORIGINAL,
        "sender": "alice@example.org",
        "outcomes": [GONE],
        "hostname": "mx.example.org",
        "now": NOW,
        "arrival": ARRIVAL,
        "envid": "ENV-1",
        "queue_id": "Q1",
    }
    args.update(kwargs)
    data = compose(**args)  # type: ignore[arg-type]
    assert data is not None
    return data


def test_bounce_top_level_fields() -> None:
    report = parse(make())
    assert report["Return-Path"] == "<>"
    assert report["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.org>"
    assert report["To"] == "alice@example.org"
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    assert report["Auto-Submitted"] == "auto-replied"
    assert report["Date"].datetime.timestamp() == NOW
    assert re.fullmatch(r"<1700000100\.[0-9a-f]{16}@mx\.example\.org>", report["Message-ID"])
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(report)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_delivery_status_fields() -> None:
    per_message, bob = status_blocks(parse(make()))
    assert per_message == {
        "Reporting-MTA": "dns; mx.example.org",
        "X-Mailsrv-Queue-ID": "Q1",
        "Original-Envelope-Id": "ENV-1",
        "Arrival-Date": "Tue, 14 Nov 2023 19:26:40 GMT",
    }
    assert bob == {
        "Original-Recipient": "rfc822; Bob@example.net",
        "Final-Recipient": "rfc822; bob@example.net",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.example.net",
        "Diagnostic-Code": "smtp; 550 5.1.1 No such user",
        "Last-Attempt-Date": "Tue, 14 Nov 2023 22:13:20 GMT",
    }


def test_human_part_names_each_recipient_and_reason() -> None:
    text = parts(parse(make(outcomes=[GONE, SLOW])))[0].get_content()
    assert "This is the mail system at mx.example.org." in text
    assert "<bob@example.net>: failed (host mx.example.net)" in text
    assert "550 5.1.1 No such user" in text
    assert "<carol@example.net>: delayed" in text


def test_one_dsn_for_all_recipients_worst_action_names_it() -> None:
    report = parse(make(outcomes=[DONE, SLOW, GONE]))
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    blocks = status_blocks(report)[1:]
    assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in blocks] == [
        ("rfc822; dave@example.net", "delivered", "2.0.0"),
        ("rfc822; carol@example.net", "delayed", "4.4.1"),
        ("rfc822; bob@example.net", "failed", "5.1.1"),
    ]
    assert blocks[1]["Will-Retry-Until"] == "Wed, 15 Nov 2023 22:15:00 GMT"
    assert "Remote-MTA" not in blocks[1]


@pytest.mark.parametrize(
    ("outcomes", "subject"),
    [([SLOW], "Delayed Mail (still being retried)"), ([DONE], "Successful Mail Delivery Report")],
)
def test_delay_and_success_reports(outcomes: list[RecipientOutcome], subject: str) -> None:
    report = parse(make(outcomes=outcomes))
    assert report["Subject"] == subject
    assert status_blocks(report)[1]["Action"] == outcomes[0].action


def test_headers_returned_without_our_return_path() -> None:
    returned = parts(parse(make()))[2]
    headers = returned.get_payload(decode=True)
    assert isinstance(headers, bytes)
    assert headers.startswith(b"Received: from client.test")
    assert b"Subject: lunch\n" in headers.replace(b"\r\n", b"\n")
    assert b"Return-Path" not in headers and b"Shall we?" not in headers


def test_ret_full_returns_the_whole_message(tmp_path: Path) -> None:
    path = tmp_path / "original"
    path.write_bytes(ORIGINAL)
    returned = parts(parse(make(original=path, ret="FULL")))[2]
    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_payload()[0]  # type: ignore[index]
    assert inner["Subject"] == "lunch" and inner["Message-ID"] == "<m1@example.org>"
    assert inner.get_content().startswith("Shall we?\n.\n")
    assert "Return-Path" not in inner


def test_ret_full_over_the_cap_falls_back_to_headers(tmp_path: Path) -> None:
    path = tmp_path / "original"
    path.write_bytes(ORIGINAL + b"x" * 2000 + b"\n")
    report = parse(make(original=path, ret="FULL", max_full_size=1000))
    assert parts(report)[2].get_content_type() == "text/rfc822-headers"
    assert len(make(original=path, ret="FULL", max_full_size=1000)) < 3000


def test_ret_hdrs_returns_headers_only() -> None:
    assert parts(parse(make(ret="HDRS")))[2].get_content_type() == "text/rfc822-headers"


def test_never_a_dsn_for_the_null_sender() -> None:
    assert compose(ORIGINAL, "", [GONE], "mx.example.org", NOW, ARRIVAL) is None


def test_stored_form_and_wire_safety() -> None:
    data = make(outcomes=[GONE, SLOW, DONE], ret="FULL")
    assert data.startswith(b"Return-Path: <>\n")
    assert b"\r" not in data
    assert all(len(line) <= 998 for line in data.split(b"\n"))
    # It goes out like any queued message: the wire form parses to the same report.
    wire = wire_form(data)
    assert wire.endswith(b"\r\n.\r\n")
    again = email.message_from_bytes(
        wire[: -len(b".\r\n")].replace(b"\r\n..", b"\r\n."), policy=email.policy.default
    )
    assert again["Subject"] == "Undelivered Mail Returned to Sender"


def test_utf8_recipient_uses_the_global_forms() -> None:
    utf8 = RecipientOutcome("jörg@bücher.example", "failed", "5.1.1", "550 5.1.1 Unknown")
    data = make(
        outcomes=[utf8], original=ORIGINAL.replace(b"Subject: lunch", "Subject: Grüße".encode())
    )
    report = parse(data)
    assert [p.get_content_type() for p in parts(report)][1:] == [
        "message/global-delivery-status",
        "message/global-headers",
    ]
    assert "Final-Recipient: utf-8; jörg@bücher.example".encode() in data


def test_outcome_from_a_client_result() -> None:
    result = RecipientResult(
        "bob@example.net", 550, "", "Rejected", True, "mx.example.net", "192.0.2.1", "TLSv1.3"
    )
    outcome = outcome_from_result(result, "failed", TRIED, orcpt="rfc822;bob@example.net")
    assert (outcome.status, outcome.diagnostic, outcome.remote_mta) == (
        "5.0.0",
        "550 Rejected",
        "mx.example.net",
    )


def test_unknown_action_is_refused() -> None:
    with pytest.raises(ValueError):
        RecipientOutcome("b@example.net", "bounced", "5.0.0")
