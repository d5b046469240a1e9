"""Webhook payloads built from real stored message files, each validated against the schema."""

from __future__ import annotations

import base64
import gc
import hashlib
import json
import os
import tracemalloc
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from mailsrv.delivery.envelope import (
    AcceptedMessage,
    ClientFacts,
    DsnRequest,
    LocalRoute,
    Notify,
    Recipient,
    RemoteRoute,
    Ret,
)
from mailsrv.webhook.payload import (
    MAX_PARSE_ERRORS,
    build_delivery_event,
    build_message_event,
    encode_event,
    iso_time,
    load_schema,
    new_event_id,
    parse_message_file,
    parse_reply,
    raw_fields,
)

RECEIVED_AT = 1767225600.25  # 2026-01-01T00:00:00.250Z
VALIDATOR = jsonschema.Draft202012Validator(load_schema())


def validate(event: dict[str, Any]) -> dict[str, Any]:
    """Schema-valid, and the body is strict UTF-8 JSON that reads back equal."""
    VALIDATOR.validate(event)
    body = encode_event(event)
    assert json.loads(body.decode("utf-8", "strict")) == event
    return event


def accepted(
    sender: str = "sender@example.net",
    recipients: tuple[Recipient, ...] | None = None,
    size: int = 0,
    **kwargs: Any,
) -> AcceptedMessage:
    if recipients is None:
        recipients = (
            Recipient("alice@example.org", LocalRoute(("alice@example.org",))),
            Recipient(
                "info@example.org",
                LocalRoute(("alice@example.org", "bob@example.org")),
                DsnRequest(frozenset({Notify.SUCCESS, Notify.FAILURE}), ("rfc822", "info@x.test")),
            ),
            Recipient("dave@remote.test", RemoteRoute("remote.test")),
        )
    client = ClientFacts(
        ip="192.0.2.7",
        helo="client.example.net",
        listener="submission",
        login="sender@example.net",
        tls_version="TLSv1.3",
        tls_cipher="TLS_AES_256_GCM_SHA384",
    )
    return AcceptedMessage(
        queue_id="Q1a2b3c",
        sender=sender,
        recipients=recipients,
        client=client,
        received_at=RECEIVED_AT,
        size=size,
        **kwargs,
    )


def store(tmp_path: Path, body: bytes, sender: str = "sender@example.net") -> Path:
    """The canonical stored form: LF line ends, Return-Path and Received prepended."""
    trace = (
        f"Return-Path: <{sender}>\n"
        "Received: from client.example.net ([192.0.2.7]) by mx.example.org with ESMTPSA"
        " id Q1a2b3c; Thu, 1 Jan 2026 00:00:00 +0000\n"
    ).encode()
    path = tmp_path / "stored.eml"
    path.write_bytes(trace + body.replace(b"\r\n", b"\n"))
    return path


def event_for(path: Path, message: AcceptedMessage | None = None, **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("event_type", "message.received")
    event = build_message_event(
        message or accepted(size=path.stat().st_size),
        path,
        {"alice@example.org": "/var/mail/example.org/alice/new/1.M1P1Q1.mx,S=1"},
        event_id="evt_0123456789abcdef",
        timestamp=RECEIVED_AT + 0.5,
        **kwargs,
    )
    return validate(event)


def as_bytes(message: EmailMessage) -> bytes:
    return message.as_bytes(policy=policy.SMTP)


# --- ordinary messages -----------------------------------------------------------------------


def test_plain_text_message(tmp_path: Path) -> None:
    path = store(
        tmp_path,
        b"From: Sender <sender@example.net>\n"
        b"To: Alice <alice@example.org>, info@example.org\n"
        b"Cc: carol@example.net\n"
        b"Reply-To: replies@example.net\n"
        b"Subject: Hello there\n"
        b"Date: Thu, 01 Jan 2026 01:00:00 +0100\n"
        b"Message-ID: <m1@example.net>\n"
        b"In-Reply-To: <m0@example.net>\n"
        b"References: <a@example.net>\n <m0@example.net>\n"
        b"\n"
        b"Hi Alice,\nsee you.\n",
    )
    event = event_for(path)
    assert (event["version"], event["id"], event["type"]) == (
        1,
        "evt_0123456789abcdef",
        "message.received",
    )
    assert event["timestamp"] == "2026-01-01T00:00:00.750Z"
    data = event["data"]
    assert data["queue_id"] == "Q1a2b3c"
    assert data["received_at"] == "2026-01-01T00:00:00.250Z"
    assert data["size"] == path.stat().st_size
    headers = data["headers"]
    assert headers["from"] == [{"name": "Sender", "address": "sender@example.net"}]
    assert headers["to"] == [
        {"name": "Alice", "address": "alice@example.org"},
        {"name": "", "address": "info@example.org"},
    ]
    assert headers["cc"] == [{"name": "", "address": "carol@example.net"}]
    assert headers["reply_to"] == [{"name": "", "address": "replies@example.net"}]
    assert headers["subject"] == "Hello there"
    assert headers["date"] == "Thu, 01 Jan 2026 01:00:00 +0100"
    assert headers["date_iso"] == "2026-01-01T01:00:00+01:00"
    assert headers["message_id"] == "<m1@example.net>"
    assert headers["in_reply_to"] == "<m0@example.net>"
    assert headers["references"] == ["<a@example.net>", "<m0@example.net>"]
    names = [h["name"] for h in headers["all"]]
    assert names[:3] == ["Return-Path", "Received", "From"]
    assert headers["all"][0]["value"] == "<sender@example.net>"
    assert headers["truncated"] is False
    assert data["text"] == {
        "content": "Hi Alice,\nsee you.\n",
        "charset": None,
        "size": 19,
        "truncated": False,
    }
    assert data["html"] is None
    assert data["attachments"] == []
    assert data["parse_errors"] == []
    assert data["storage"] == {
        "maildir": [
            {
                "mailbox": "alice@example.org",
                "path": "/var/mail/example.org/alice/new/1.M1P1Q1.mx,S=1",
            }
        ]
    }
    assert "raw" not in data and "raw_truncated" not in data


def test_envelope_and_client(tmp_path: Path) -> None:
    path = store(tmp_path, b"Subject: x\n\nbody\n")
    message = accepted(envid="E-1", ret=Ret.HDRS, body_8bit=True, size=path.stat().st_size)
    received = event_for(path, message)["data"]
    envelope = received["envelope"]
    assert envelope["mail_from"] == "sender@example.net"
    assert envelope["rcpt_to"] == [
        {
            "address": "alice@example.org",
            "route": "local",
            "mailboxes": ["alice@example.org"],
            "domain": None,
            "notify": [],
            "orcpt": None,
        },
        {
            "address": "info@example.org",
            "route": "local",
            "mailboxes": ["alice@example.org", "bob@example.org"],
            "domain": None,
            "notify": ["FAILURE", "SUCCESS"],
            "orcpt": {"type": "rfc822", "address": "info@x.test"},
        },
    ]
    assert (envelope["smtputf8"], envelope["body_8bit"], envelope["envid"], envelope["ret"]) == (
        False,
        True,
        "E-1",
        "HDRS",
    )
    assert received["client"] == {
        "ip": "192.0.2.7",
        "helo": "client.example.net",
        "listener": "submission",
        "authenticated_user": "sender@example.net",
        "tls": {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"},
        "trusted": False,
    }
    queued = event_for(path, message, event_type="message.queued")
    assert queued["type"] == "message.queued"
    assert [r["address"] for r in queued["data"]["envelope"]["rcpt_to"]] == ["dave@remote.test"]
    assert queued["data"]["envelope"]["rcpt_to"][0]["domain"] == "remote.test"


def test_plain_client_without_tls_or_login(tmp_path: Path) -> None:
    path = store(tmp_path, b"Subject: x\n\nbody\n")
    message = AcceptedMessage(
        queue_id="Q2",
        sender="",
        recipients=(Recipient("alice@example.org", LocalRoute(("alice@example.org",))),),
        client=ClientFacts(ip="::1", helo="[::1]", listener="mx", trusted=True),
        received_at=RECEIVED_AT,
        size=1,
    )
    data = event_for(path, message)["data"]
    assert data["envelope"]["mail_from"] == ""
    assert data["client"]["tls"] is None and data["client"]["authenticated_user"] is None
    assert data["client"]["trusted"] is True


def test_multipart_alternative(tmp_path: Path) -> None:
    message = EmailMessage()
    message["From"] = "sender@example.net"
    message["Subject"] = "Both"
    message.set_content("Plain text body\n")
    message.add_alternative("<p>HTML body</p>\n", subtype="html")
    data = event_for(store(tmp_path, as_bytes(message)))["data"]
    assert data["text"]["content"] == "Plain text body\n"
    assert data["text"]["charset"] == "utf-8"
    assert data["html"]["content"] == "<p>HTML body</p>\n"
    assert data["attachments"] == []
    assert data["parse_errors"] == []


def test_attachments_metadata(tmp_path: Path) -> None:
    pdf = os.urandom(5000)
    text_file = "line one\nligne deux é\n".encode("latin-1")
    message = EmailMessage()
    message["From"] = "sender@example.net"
    message["Subject"] = "Files"
    message.set_content("See the files.\n")
    message.add_alternative('<p>See <img src="cid:logo@x"></p>\n', subtype="html")
    html = message.get_payload()[1]  # type: ignore[index]
    html.add_related(b"\x89PNG....", "image", "png", cid="<logo@x>")
    message.add_attachment(pdf, "application", "pdf", filename="report.pdf")
    message.add_attachment(text_file, "text", "plain", filename="notes.txt", cte="quoted-printable")
    inner = EmailMessage()
    inner["Subject"] = "forwarded"
    inner.set_content("inner body\n")
    message.add_attachment(inner, filename="fwd.eml")
    message.add_attachment(b"\x00\x01", "application", "octet-stream", filename="Grüße résumé.bin")
    data = event_for(store(tmp_path, as_bytes(message)))["data"]
    assert data["text"]["content"] == "See the files.\n"
    assert data["html"]["content"].startswith("<p>See")
    found = {a["filename"]: a for a in data["attachments"]}
    assert list(found) == [None, "report.pdf", "notes.txt", "fwd.eml", "Grüße résumé.bin"]
    logo = found[None]
    assert (logo["content_type"], logo["content_id"], logo["disposition"]) == (
        "image/png",
        "logo@x",
        "inline",
    )
    assert logo["size"] == 8 and logo["sha256"] == hashlib.sha256(b"\x89PNG....").hexdigest()
    report = found["report.pdf"]
    assert (report["content_type"], report["disposition"], report["size"]) == (
        "application/pdf",
        "attachment",
        5000,
    )
    assert report["sha256"] == hashlib.sha256(pdf).hexdigest()
    notes = found["notes.txt"]
    assert notes["size"] == len(text_file.replace(b"\r\n", b"\n"))
    assert notes["sha256"] == hashlib.sha256(text_file).hexdigest()
    assert found["fwd.eml"]["content_type"] == "message/rfc822"
    assert found["fwd.eml"]["size"] > 0
    assert found["Grüße résumé.bin"]["sha256"] == hashlib.sha256(b"\x00\x01").hexdigest()
    assert data["parse_errors"] == []


def test_twenty_megabyte_attachment_metadata_without_decoding_it_whole(tmp_path: Path) -> None:
    blob = os.urandom(20 * 1024 * 1024)
    message = EmailMessage()
    message["From"] = "sender@example.net"
    message["Subject"] = "big"
    message.set_content("A big one.\n")
    message.add_attachment(blob, "application", "octet-stream", filename="big.bin")
    path = store(tmp_path, as_bytes(message))
    expected = hashlib.sha256(blob).hexdigest()
    del blob, message
    gc.collect()

    # What the standard parser alone needs for this file, then what the whole payload needs.
    tracemalloc.start()
    try:
        with path.open("rb") as f:
            parsed = BytesParser(policy=policy.default).parse(f)
        parser_peak = tracemalloc.get_traced_memory()[1]
        del parsed
        gc.collect()
        tracemalloc.reset_peak()
        data = parse_message_file(path)
        payload_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # A decoded copy of the attachment would add 20 MiB (stdlib's own decode, ~50 MiB).
    assert payload_peak < parser_peak + 4 * 1024 * 1024, (parser_peak, payload_peak)

    (attachment,) = data["attachments"]
    assert (attachment["filename"], attachment["size"], attachment["sha256"]) == (
        "big.bin",
        20 * 1024 * 1024,
        expected,
    )
    event = event_for(path)
    assert event["data"]["attachments"] == [attachment]
    assert len(encode_event(event)) < 10_000  # metadata only


# --- text in odd encodings -------------------------------------------------------------------


def test_rfc2047_encoded_words_and_rfc2231_filenames(tmp_path: Path) -> None:
    path = store(
        tmp_path,
        b"From: =?UTF-8?Q?J=C3=B6rg_M=C3=BCller?= <joerg@example.net>\n"
        b"To: =?ISO-8859-1?B?Suly9G1l?= <j@example.org>\n"
        b"Subject: =?utf-8?B?R3LDvMOfZQ==?= aus =?iso-8859-15?q?K=F6ln_=A4?=\n"
        b"MIME-Version: 1.0\n"
        b"Content-Type: multipart/mixed; boundary=b\n"
        b"\n"
        b"--b\n"
        b"Content-Type: text/plain; charset=iso-8859-1\n"
        b"Content-Transfer-Encoding: quoted-printable\n"
        b"\n"
        b"Gr=FC=DFe\n"
        b"--b\n"
        b"Content-Type: application/octet-stream\n"
        b"Content-Disposition: attachment; filename*=UTF-8''%C3%A9t%C3%A9.txt\n"
        b"\n"
        b"data\n"
        b"--b--\n",
    )
    data = event_for(path)["data"]
    headers = data["headers"]
    assert headers["from"] == [{"name": "Jörg Müller", "address": "joerg@example.net"}]
    assert headers["to"] == [{"name": "Jérôme", "address": "j@example.org"}]
    assert headers["subject"] == "Grüße aus Köln €"
    subject_line = [h for h in headers["all"] if h["name"] == "Subject"]
    assert subject_line == [{"name": "Subject", "value": "Grüße aus Köln €"}]
    assert data["text"]["content"] == "Grüße"  # the last line break belongs to the boundary
    assert data["text"]["charset"] == "iso-8859-1"
    assert data["attachments"][0]["filename"] == "été.txt"
    assert data["parse_errors"] == []


def test_raw_latin1_bytes_in_headers(tmp_path: Path) -> None:
    path = store(
        tmp_path,
        b"From: Ren\xe9 <rene@example.net>\nSubject: caf\xe9 cr\xe8me\nX-Note: \xff\xfe\n\nbody\n",
    )
    data = event_for(path)["data"]
    assert data["headers"]["subject"] == "café crème"
    assert data["headers"]["from"] == [{"name": "René", "address": "rene@example.net"}]
    assert {"name": "X-Note", "value": "ÿþ"} in data["headers"]["all"]
    assert "header Subject: 8-bit bytes that are not UTF-8, read as Latin-1" in data["parse_errors"]


def test_smtputf8_envelope_and_utf8_headers(tmp_path: Path) -> None:
    path = store(
        tmp_path,
        "From: Ünal <ünal@bücher.example>\n"
        "To: 用户 <用户@例子.测试>\n"
        "Subject: Привет\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n"
        "\n"
        "Здравствуйте\n".encode(),
        sender="ünal@bücher.example",
    )
    message = accepted(
        sender="ünal@bücher.example",
        recipients=(Recipient("用户@例子.测试", LocalRoute(("用户@例子.测试",))),),
        smtputf8=True,
        body_8bit=True,
        size=path.stat().st_size,
    )
    data = event_for(path, message)["data"]
    assert data["envelope"]["mail_from"] == "ünal@bücher.example"
    assert data["envelope"]["rcpt_to"][0]["address"] == "用户@例子.测试"
    assert data["envelope"]["smtputf8"] is True
    assert data["headers"]["from"] == [{"name": "Ünal", "address": "ünal@bücher.example"}]
    assert data["headers"]["to"] == [{"name": "用户", "address": "用户@例子.测试"}]
    assert data["headers"]["subject"] == "Привет"
    assert data["headers"]["all"][0] == {"name": "Return-Path", "value": "<ünal@bücher.example>"}
    assert data["text"]["content"] == "Здравствуйте\n"
    assert not [e for e in data["parse_errors"] if "Latin-1" in e]


@pytest.mark.parametrize(
    ("content_type", "body", "expected", "error"),
    [
        ("text/plain; charset=x-unknown", b"hello\n", "hello\n", "unknown charset 'x-unknown'"),
        ("text/plain", b"caf\xe9\n", "café\n", "8-bit text that is not UTF-8, read as Latin-1"),
        ("text/plain; charset=rot13", b"uryyb\n", "uryyb\n", "'rot13' is not a text encoding"),
        ("text/plain", "café\n".encode(), "café\n", None),
        (
            "text/plain; charset=unicode_escape",
            b"\\ud800 x\n",
            "\\ud800 x\n",
            "is not a text encoding",
        ),
        ("text/plain; charset=utf-8", b"bad \xff end\n", "bad \ufffd end\n", None),
    ],
)
def test_body_charsets(
    tmp_path: Path, content_type: str, body: bytes, expected: str, error: str | None
) -> None:
    path = store(tmp_path, f"Content-Type: {content_type}\n\n".encode() + body)
    data = event_for(path)["data"]
    assert data["text"]["content"] == expected
    if error:
        assert any(error in line for line in data["parse_errors"]), data["parse_errors"]


def test_body_cap(tmp_path: Path) -> None:
    path = store(tmp_path, b"Content-Type: text/html; charset=utf-8\n\n" + "é".encode() * 600)
    data = event_for(path, max_body_size=1001)["data"]
    html = data["html"]
    assert html["truncated"] is True and html["size"] == 1200
    assert html["content"] == "é" * 500  # cut on a character boundary
    assert data["text"] is None


# --- malformed MIME: degraded fields, never an exception -------------------------------------

MALFORMED: list[tuple[str, bytes, str]] = [
    (
        "no-boundary-parameter",
        b"Content-Type: multipart/mixed\n\n--x\nContent-Type: text/plain\n\nhi\n--x--\n",
        "NoBoundaryInMultipartDefect",
    ),
    (
        "boundary-never-seen",
        b"Content-Type: multipart/mixed; boundary=zzz\n\n--x\n\nhi\n",
        "StartBoundaryNotFoundDefect",
    ),
    (
        "no-closing-boundary",
        b"Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nhi\n",
        "CloseBoundaryNotFoundDefect",
    ),
    (
        "bad-base64",
        b"Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: application/pdf\n"
        b"Content-Transfer-Encoding: base64\n\nQUJD!!!RE\n--b--\n",
        "part 2: characters that are not base64, skipped",
    ),
    (
        "base64-cut-short",
        b"Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: application/pdf\n"
        b"Content-Transfer-Encoding: base64\n\nQUJDR\n--b--\n",
        "part 2: base64 ends in the middle of a character",
    ),
    (
        "broken-address-header",
        b'From: <<<@@@>>>, "unterminated\nTo: ;;;\nSubject: ok\n\nbody\n',
        "header From",
    ),
    (
        "bad-date",
        b"Date: yesterday-ish\nSubject: ok\n\nbody\n",
        "header Date",
    ),
    (
        "header-without-colon",
        b"Subject: ok\nthis is not a header\n\nbody\n",
        "MissingHeaderBodySeparatorDefect",
    ),
]


@pytest.mark.parametrize(
    ("raw", "expected_error"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_mime_degrades_into_parse_errors(
    tmp_path: Path, raw: bytes, expected_error: str
) -> None:
    data = event_for(store(tmp_path, raw))["data"]
    assert any(expected_error in line for line in data["parse_errors"]), data["parse_errors"]
    assert data["headers"]["all"][0]["name"] == "Return-Path"


def test_undecodable_encoded_words_are_decoded_as_far_as_they_go(tmp_path: Path) -> None:
    raw = b"Subject: =?utf-8?B?!!!?= =?nonsense?Q?x?= =?utf-8?B?QUJ?= end\n\nbody\n"
    data = event_for(store(tmp_path, raw))["data"]
    # RFC 2047 6.2: the space between two encoded words is not part of the text.
    assert data["headers"]["subject"] == "xAB end"


def test_absurd_nesting_keeps_the_headers(tmp_path: Path) -> None:
    depth = 3000
    body = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (i, i) for i in range(depth)
    )
    body += b"Content-Type: text/plain\n\nhi\n"
    body += b"".join(b"--b%d--\n" % i for i in reversed(range(depth)))
    data = event_for(store(tmp_path, b"Subject: deep\n" + body))["data"]
    assert data["headers"]["subject"] == "deep"
    assert any("MIME structure cannot be parsed" in e for e in data["parse_errors"])


def test_parse_errors_are_bounded(tmp_path: Path) -> None:
    raw = b"".join(b"X-Bad-%d: caf\xe9\n" % i for i in range(500)) + b"\nbody\n"
    data = event_for(store(tmp_path, raw))["data"]
    assert len(data["parse_errors"]) == MAX_PARSE_ERRORS + 1
    assert data["parse_errors"][-1] == "more errors not listed"


def test_header_list_is_bounded(tmp_path: Path) -> None:
    raw = b"".join(b"X-Many: %d\n" % i for i in range(1500)) + b"\nbody\n"
    headers = event_for(store(tmp_path, raw))["data"]["headers"]
    assert len(headers["all"]) == 1000 and headers["truncated"] is True


def test_missing_file_still_gives_a_valid_event(tmp_path: Path) -> None:
    message = accepted(size=1234)
    data = event_for(tmp_path / "gone.eml", message)["data"]
    assert data["size"] == 1234
    assert data["headers"]["all"] == [] and data["text"] is None
    assert data["parse_errors"] == ["message file: cannot be read (No such file or directory)"]


def test_a_binary_file_is_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "stored.eml"
    path.write_bytes(os.urandom(64 * 1024))
    validate(
        build_message_event(
            accepted(size=65536),
            path,
            {},
            event_id="evt_1",
            event_type="message.received",
            timestamp=RECEIVED_AT,
            include_raw=True,
        )
    )


# --- include_raw -----------------------------------------------------------------------------


def test_include_raw_under_the_cap(tmp_path: Path) -> None:
    path = store(tmp_path, b"Subject: raw\n\n" + os.urandom(300_000).hex().encode() + b"\n")
    data = event_for(path, include_raw=True, max_raw_size=path.stat().st_size)["data"]
    assert data["raw_truncated"] is False
    assert base64.b64decode(data["raw"], validate=True) == path.read_bytes()


def test_include_raw_over_the_cap(tmp_path: Path) -> None:
    path = store(tmp_path, b"Subject: raw\n\nbody\n")
    data = event_for(path, include_raw=True, max_raw_size=path.stat().st_size - 1)["data"]
    assert data["raw_truncated"] is True
    assert "raw" not in data


def test_raw_fields_of_a_missing_file(tmp_path: Path) -> None:
    assert raw_fields(tmp_path / "gone") == {"raw_truncated": True}


def test_schema_refuses_raw_with_raw_truncated(tmp_path: Path) -> None:
    event = event_for(store(tmp_path, b"Subject: x\n\nbody\n"), include_raw=True)
    event["data"]["raw_truncated"] = True
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(event)


# --- relay outcome events --------------------------------------------------------------------


def test_delivery_events() -> None:
    common = {
        "timestamp": RECEIVED_AT,
        "queue_id": "Q1a2b3c",
        "mail_from": "sender@example.net",
        "recipient": "dave@remote.test",
    }
    delivered = validate(
        build_delivery_event(
            "message.delivered",
            event_id="evt_d",
            attempts=1,
            reply="250 2.0.0 Ok: queued as 4ABC",
            remote_mta="mx1.remote.test",
            **common,  # type: ignore[arg-type]
        )
    )
    assert delivered["data"]["reply"] == {
        "code": 250,
        "enhanced_code": "2.0.0",
        "text": "250 2.0.0 Ok: queued as 4ABC",
    }
    assert delivered["data"]["next_attempt"] is None
    deferred = validate(
        build_delivery_event(
            "message.deferred",
            event_id="evt_e",
            attempts=2,
            reply="451 4.7.1 Greylisted, try again",
            remote_mta="mx1.remote.test",
            next_attempt=RECEIVED_AT + 600,
            **common,  # type: ignore[arg-type]
        )
    )
    assert deferred["data"]["next_attempt"] == "2026-01-01T00:10:00.250Z"
    bounced = validate(
        build_delivery_event(
            "message.bounced",
            event_id="evt_f",
            attempts=3,
            reply="550-5.1.1 No such user\n550 5.1.1 here",
            remote_mta="mx1.remote.test",
            envid="E-1",
            orcpt=("rfc822", "dave@remote.test"),
            **common,  # type: ignore[arg-type]
        )
    )
    assert bounced["data"]["reply"]["code"] == 550
    assert bounced["data"]["reply"]["enhanced_code"] == "5.1.1"
    assert bounced["data"]["orcpt"] == {"type": "rfc822", "address": "dave@remote.test"}
    expired = validate(
        build_delivery_event("message.bounced", event_id="evt_g", attempts=9, **common)  # type: ignore[arg-type]
    )
    assert expired["data"]["reply"] is None and expired["data"]["remote_mta"] is None


@pytest.mark.parametrize(
    ("reply", "code", "enhanced"),
    [
        ("250 ok", 250, None),
        ("421 4.4.2 timeout", 421, "4.4.2"),
        ("connection refused", None, None),
        ("", None, None),
        ("999 odd", None, None),
    ],
)
def test_parse_reply(reply: str, code: int | None, enhanced: str | None) -> None:
    parsed = parse_reply(reply)
    assert parsed is not None
    assert (parsed["code"], parsed["enhanced_code"]) == (code, enhanced)


def test_wrong_event_types_are_programming_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_delivery_event(
            "message.received",
            event_id="e",
            timestamp=0,
            queue_id="q",
            mail_from="",
            recipient="r",
            attempts=0,
        )
    with pytest.raises(ValueError):
        build_message_event(
            accepted(), tmp_path, {}, event_id="e", event_type="message.bounced", timestamp=0
        )


def test_schema_refuses_what_it_does_not_describe(tmp_path: Path) -> None:
    event = event_for(store(tmp_path, b"Subject: x\n\nbody\n"))
    for damage in (
        lambda e: e["data"].__setitem__("surprise", 1),
        lambda e: e.__setitem__("type", "message.lost"),
        lambda e: e["data"]["headers"].pop("subject"),
        lambda e: e.__setitem__("timestamp", "yesterday"),
    ):
        broken = json.loads(json.dumps(event))
        damage(broken)
        with pytest.raises(jsonschema.ValidationError):
            VALIDATOR.validate(broken)


def test_ids_and_times() -> None:
    first, second = new_event_id(RECEIVED_AT), new_event_id(RECEIVED_AT + 0.001)
    assert first.startswith("evt_") and len(first) == 36 and first != second
    assert first[:16] < second[:16]  # sortable by time
    assert iso_time(0) == "1970-01-01T00:00:00.000Z"
