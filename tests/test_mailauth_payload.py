"""The verdicts travel on: stored with the outbox entry (strictly read back), and in the
``authentication`` field of the message.received payload, valid against the shipped schema."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from mailsrv.jsonstore.fields import RecordError
from mailsrv.mailauth.verdict import (
    ARCResult,
    DKIMResult,
    DMARCResult,
    DNSBLResult,
    SPFResult,
    Verdict,
)
from mailsrv.webhook.entries import MessageSource, OutboxEntry, decode, encode, to_dict
from mailsrv.webhook.payload import build_message_event, load_schema
from tests.queue_helpers import full_message

VALIDATOR = jsonschema.Draft202012Validator(load_schema())
EVENT = "evt_" + "c" * 32

VERDICT = Verdict(
    spf_mailfrom=SPFResult("pass", "example.test"),
    spf_helo=SPFResult("none", "mail.example.test", "no SPF record"),
    dkim=(
        DKIMResult("pass", "example.test", "sel", "rsa-sha256", "@example.test", "Hk2r/9Ym+P=="),
        DKIMResult("fail", "example.test", "ed", "ed25519-sha256", reason="body hash mismatch"),
    ),
    dmarc=DMARCResult("pass", "example.test", "reject", 100, "none"),
    arc=ARCResult("none"),
)
LISTED = replace(
    VERDICT,
    dnsbl=(
        DNSBLResult("zen.example.test", False, (), "refuse"),
        DNSBLResult("tag.example.test", True, ("127.0.0.4", "127.0.0.10"), "tag"),
    ),
)


def entry(verdict: Verdict | None) -> OutboxEntry:
    message = replace(full_message("QID00001"), authentication=verdict)
    return OutboxEntry(
        event_id=EVENT,
        endpoint="crm",
        type="message.received",
        created_at=1_767_225_600.25,
        source=MessageSource(message, (("alice@example.org", "/m/new/1"),)),
        next_attempt=1_767_225_600.25,
    )


@pytest.mark.parametrize(
    "verdict", [VERDICT, LISTED, None], ids=["checked", "checked with DNSBL", "not checked"]
)
def test_the_verdict_is_stored_with_the_entry(verdict: Verdict | None) -> None:
    stored = entry(verdict)
    data = encode(stored)
    assert (b'"authentication"' in data) == (verdict is not None)
    assert decode(data, stored.key) == stored


BROKEN = [
    (("dmarc", "result"), "maybe", "dmarc.result: 'maybe' is not one of"),
    (("dmarc", "pct"), 101, "dmarc.pct: expected a percentage"),
    (("spf", "helo"), None, "spf.helo: expected an object"),
    (("dkim",), {}, "dkim: expected a list"),
    (("arc", "surprise"), 1, "arc: unknown surprise"),
    (("dnsbl",), {}, "dnsbl: expected a list"),
    (("dnsbl", 0, "listed"), "yes", "dnsbl[0].listed: expected true or false"),
    (("dnsbl", 1, "action"), "drop", "dnsbl[1].action: 'drop' is not one of"),
    (("dnsbl", 1, "codes"), [2], "dnsbl[1].codes: expected a list of strings"),
]


@pytest.mark.parametrize(
    ("path", "value", "error"), BROKEN, ids=[".".join(map(str, b[0])) for b in BROKEN]
)
def test_a_broken_stored_verdict_is_refused_naming_the_field(
    path: tuple[Any, ...], value: Any, error: str
) -> None:
    raw = to_dict(entry(LISTED))
    target = raw["message"]["authentication"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(RecordError, match=error.replace("(", r"\(").replace("[", r"\[")):
        decode(json.dumps(raw).encode())


def event(tmp_path: Path, verdict: Verdict | None) -> dict[str, Any]:
    path = tmp_path / "stored.eml"
    path.write_bytes(b"Return-Path: <a@example.test>\nFrom: a@example.test\n\nhi\n")
    message = replace(full_message("QID00001"), authentication=verdict)
    built = build_message_event(
        message,
        path,
        {},
        event_id=EVENT,
        event_type="message.received",
        timestamp=1_767_225_600.5,
    )
    VALIDATOR.validate(built)
    return built


def test_the_payload_carries_the_verdicts(tmp_path: Path) -> None:
    authentication = event(tmp_path, VERDICT)["data"]["authentication"]
    assert authentication["spf"] == {
        "mailfrom": {"result": "pass", "domain": "example.test", "reason": ""},
        "helo": {"result": "none", "domain": "mail.example.test", "reason": "no SPF record"},
    }
    assert [(d["result"], d["selector"], d["algorithm"]) for d in authentication["dkim"]] == [
        ("pass", "sel", "rsa-sha256"),
        ("fail", "ed", "ed25519-sha256"),
    ]
    assert authentication["dmarc"] == {
        "result": "pass",
        "from_domain": "example.test",
        "policy": "reject",
        "pct": 100,
        "disposition": "none",
        "reason": "",
    }
    assert authentication["arc"] == {"result": "none", "reason": ""}
    assert "dnsbl" not in authentication, "no zone was asked"
    assert event(tmp_path, LISTED)["data"]["authentication"]["dnsbl"] == [
        {"zone": "zen.example.test", "listed": False, "codes": [], "action": "refuse"},
        {
            "zone": "tag.example.test",
            "listed": True,
            "codes": ["127.0.0.4", "127.0.0.10"],
            "action": "tag",
        },
    ]


def test_mail_not_checked_has_null(tmp_path: Path) -> None:
    assert event(tmp_path, None)["data"]["authentication"] is None


def test_the_schema_refuses_unknown_results(tmp_path: Path) -> None:
    built = event(tmp_path, LISTED)
    unknown = copy.deepcopy(built)
    unknown["data"]["authentication"]["dnsbl"][0]["answers"] = ["127.0.0.2"]
    assert not VALIDATOR.is_valid(unknown)
    wrong = copy.deepcopy(built)
    wrong["data"]["authentication"]["dmarc"]["result"] = "maybe"
    assert not VALIDATOR.is_valid(wrong)
    older = copy.deepcopy(built)
    del older["data"]["authentication"]  # events of messages accepted before the field
    VALIDATOR.validate(older)
