"""Queue records: made from accepted messages, JSON round trips, strict validation, and the
operator's rules (hold, release, delete, flush) as pure functions."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

import pytest

from mailsrv.delivery.envelope import Notify, Ret
from mailsrv.jsonstore.fields import encode_json
from mailsrv.relay import actions
from mailsrv.relay.queue_store import QueueError
from mailsrv.relay.records import (
    SCHEMA_VERSION,
    QueueRecord,
    RecordError,
    State,
    decode,
    encode,
    from_dict,
    to_dict,
    valid_queue_id,
)
from tests.queue_helpers import CLIENT, accepted, full_message, local


def test_record_from_message_keeps_envelope_client_and_dsn_of_remote_recipients() -> None:
    message = full_message("7ZK2P1QHBCDF001")
    record = QueueRecord.from_message(message)
    assert record is not None
    assert record.queue_id == "7ZK2P1QHBCDF001"
    assert record.created_at == message.received_at
    assert (record.sender, record.size, record.client) == (message.sender, message.size, CLIENT)
    assert (record.smtputf8, record.body_8bit, record.envid, record.ret) == (
        True,
        True,
        "QQ314159",
        Ret.HDRS,
    )
    assert [r.address for r in record.recipients] == ["bob@example.net", "dörte@bücher.example"]
    bob, dorte = record.recipients
    assert bob.domain == "example.net"
    assert bob.dsn.notify == frozenset({Notify.DELAY, Notify.FAILURE})
    assert bob.dsn.orcpt == ("rfc822", "bob@example.net")
    assert dorte.domain == "bücher.example"
    assert dorte.dsn.notify == frozenset({Notify.NEVER})
    assert all(r.state is State.PENDING and r.attempts == 0 for r in record.recipients)
    assert all(r.next_attempt is None and r.last_reply is None for r in record.recipients)


def test_only_local_recipients_make_no_record() -> None:
    assert QueueRecord.from_message(accepted(recipients=(local("alice@example.org"),))) is None


def test_json_round_trip_is_exact_and_human_readable() -> None:
    record = QueueRecord.from_message(full_message())
    assert record is not None
    bob = replace(
        record.recipients[0],
        state=State.DEFERRED,
        attempts=3,
        next_attempt=1_767_229_200.5,
        last_attempt=1_767_228_900.125,
        last_reply="451 4.7.1 Greylisted,\nplease try again later",
        remote_mta="mx1.example.net [192.0.2.25]",
    )
    record = record.with_recipients([bob])
    data = encode(record)
    assert decode(data) == record
    assert decode(data, record.queue_id) == record
    text = data.decode("utf-8")
    assert text.endswith("}\n")
    assert '\n  "queue_id": ' in text  # indented, one key per line
    assert "dörte@bücher.example" in text  # UTF-8, not \u escapes
    assert json.loads(text)["version"] == SCHEMA_VERSION
    assert json.loads(text)["recipients"][0]["notify"] == ["DELAY", "FAILURE"]


def test_null_sender_and_no_dsn_parameters_round_trip() -> None:
    record = QueueRecord.from_message(accepted(sender=""))
    assert record is not None
    assert record.sender == "" and record.envid is None and record.ret is None
    assert decode(encode(record)) == record


def _good() -> dict[str, Any]:
    record = QueueRecord.from_message(full_message("7ZK2P1QHBCDF002"))
    assert record is not None
    return to_dict(record)


def _set(path: str, value: Any) -> dict[str, Any]:
    """A good record with the field at ``path`` (dots; ``-`` deletes) set to ``value``."""
    raw = _good()
    *parents, key = path.split(".")
    target: Any = raw
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    if value == "-":
        del target[key]
    else:
        target[key] = value
    return raw


BROKEN = [
    ("version", 4, "version 4 is not supported (this mailsrv reads 1, 2 or 3)"),
    ("version", "1", "version '1' is not supported"),
    ("version", True, "version True is not supported"),
    ("version", "-", "version None is not supported"),
    ("queue_id", "../etc/passwd", "not a valid queue id"),
    ("queue_id", "", "expected a non-empty string"),
    ("created_at", "yesterday", "record.created_at: expected a number"),
    ("created_at", -1, "record.created_at: expected a finite number"),
    ("created_at", True, "record.created_at: expected a number"),
    ("sender", None, "record.sender: expected a string"),
    ("sender", "a@b\r\nRCPT TO:<x@y>", "record.sender: expected no control characters"),
    ("size", -5, "record.size: expected a non-negative integer"),
    ("size", 1.5, "record.size: expected a non-negative integer"),
    ("smtputf8", "yes", "record.smtputf8: expected true or false"),
    ("ret", "BODY", "ret: 'BODY' is not one of FULL, HDRS"),
    ("surprise", 1, "record: unknown surprise"),
    ("client", "-", "record: missing client"),
    ("client", [], "client: expected an object"),
    ("client.ip", 7, "client.ip: expected a non-empty string"),
    ("client.trusted", 1, "client.trusted: expected true or false"),
    ("client.extra", "x", "client: unknown extra"),
    ("recipients", [], "recipients: expected a non-empty list"),
    ("recipients", {}, "recipients: expected a non-empty list"),
    ("recipients.0.state", "lost", "recipients[0].state: 'lost' is not one of pending"),
    ("recipients.0.attempts", -1, "recipients[0].attempts: expected a non-negative integer"),
    ("recipients.0.attempts", False, "recipients[0].attempts: expected a non-negative"),
    ("recipients.0.next_attempt", "soon", "recipients[0].next_attempt: expected a number"),
    ("recipients.0.address", "", "recipients[0].address: expected a non-empty string"),
    ("recipients.1.address", "bob@example.net", "recipients: an address is listed twice"),
    ("recipients.0.notify", "NEVER", "recipients[0].notify: expected a list of strings"),
    ("recipients.0.notify", ["SOMETIMES"], "recipients[0].notify: 'SOMETIMES' is not one of"),
    ("recipients.0.notify", ["NEVER", "DELAY"], "NEVER cannot be combined"),
    ("recipients.0.orcpt", ["rfc822"], "recipients[0].orcpt: expected null or [address type"),
    ("recipients.0.orcpt", "bob@example.net", "recipients[0].orcpt: expected null or"),
    ("recipients.0.remote_mta", "-", "recipients[0]: missing remote_mta"),
    ("wire_size", -1, "record.wire_size: expected a non-negative integer"),
    ("wire_size", "-", "record: missing wire_size"),
    ("recipients.0.delay_warned", None, "recipients[0].delay_warned: expected true or false"),
    ("recipients.0.delay_warned", "-", "recipients[0]: missing delay_warned"),
    ("recipients.1.dsn_passed_on", 0, "recipients[1].dsn_passed_on: expected true or false"),
    ("relay_headers", "-", "record: missing relay_headers"),
    ("relay_headers", None, "record.relay_headers: expected a string"),
    ("relay_headers", "DKIM-Signature: v=1", "relay_headers: expected header lines ending in LF"),
    ("relay_headers", " folded first\n", "relay_headers: expected header lines"),
    ("relay_headers", "A: 1\n\nB: 2\n", "relay_headers: expected header lines"),
    ("relay_headers", "A: 1\r\n", "relay_headers: expected header lines"),
    ("relay_headers", "A: \x00\n", "relay_headers: expected header lines"),
    ("relay_headers", "A: \u00e9\n", "relay_headers: expected header lines"),
    ("relay_headers", "No colon\n", "relay_headers: expected header lines"),
    ("relay_headers", ".\n", "relay_headers: expected header lines"),
]


@pytest.mark.parametrize(("path", "value", "message"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_records_are_refused_with_the_field_named(
    path: str, value: Any, message: str
) -> None:
    data = json.dumps(_set(path, value)).encode()
    with pytest.raises(RecordError) as caught:
        decode(data)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def _version_1(record: QueueRecord) -> dict[str, Any]:
    """``record`` as the previous mailsrv wrote it: version 1, without the version 2 fields."""
    raw = to_dict(record)
    raw["version"] = 1
    del raw["wire_size"], raw["relay_headers"]
    for recipient in raw["recipients"]:
        del recipient["delay_warned"], recipient["dsn_passed_on"]
    return raw


def test_a_version_1_record_loads_with_the_new_fields_unset() -> None:
    record = QueueRecord.from_message(full_message("7ZK2P1QHBCDF003", wire_size=1234))
    assert record is not None
    record = record.with_recipients([replace(record.recipients[0], delay_warned=True)])
    old = from_dict(_version_1(record))
    assert old.wire_size is None
    assert not any(r.delay_warned or r.dsn_passed_on for r in old.recipients)
    assert old == replace(
        record,
        wire_size=None,
        recipients=tuple(replace(r, delay_warned=False) for r in record.recipients),
    )
    assert json.loads(encode(old))["version"] == SCHEMA_VERSION == 3  # written back as 3


@pytest.mark.parametrize(
    ("field", "where"),
    [
        ("wire_size", "record: unknown wire_size"),
        ("recipients.0.delay_warned", "recipients[0]: unknown delay_warned"),
    ],
)
def test_a_version_1_record_may_not_carry_version_2_fields(field: str, where: str) -> None:
    record = QueueRecord.from_message(full_message("7ZK2P1QHBCDF004"))
    assert record is not None
    raw = _version_1(record)
    *parents, key = field.split(".")
    target: Any = raw
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    target[key] = 0 if key == "wire_size" else False
    with pytest.raises(RecordError, match=re.escape(where)):
        from_dict(raw)


def test_version_2_fields_round_trip() -> None:
    record = QueueRecord.from_message(full_message("7ZK2P1QHBCDF005", wire_size=777))
    assert record is not None
    bob, dorte = record.recipients
    record = record.with_recipients(
        [replace(bob, delay_warned=True), replace(dorte, state=State.SENT, dsn_passed_on=True)]
    )
    assert decode(encode(record)) == record
    assert record.wire_size == record.size_on_wire == 777


def test_a_version_2_record_loads_without_relay_headers_and_may_not_carry_them() -> None:
    record = QueueRecord.from_message(full_message("7ZK2P1QHBCDF007", wire_size=500))
    assert record is not None
    raw = to_dict(record)
    raw["version"] = 2
    del raw["relay_headers"]
    assert from_dict(raw) == record
    raw["relay_headers"] = ""
    with pytest.raises(RecordError, match="record: unknown relay_headers"):
        from_dict(raw)


SIGNATURE = "DKIM-Signature: v=1; a=rsa-sha256; d=example.org;\n b=AAAA\n BBBB==\n"


def test_relay_headers_round_trip_and_count_on_the_wire() -> None:
    message = replace(
        full_message("7ZK2P1QHBCDF008", wire_size=1000), relay_headers=SIGNATURE.encode()
    )
    record = QueueRecord.from_message(message)
    assert record is not None
    assert record.relay_headers == SIGNATURE
    assert record.wire_size == record.size_on_wire == 1000 + len(SIGNATURE) + 3  # CRLF x3
    assert decode(encode(record)) == record
    unknown = replace(message, wire_size=None)
    counted = QueueRecord.from_message(unknown)
    assert counted is not None and counted.wire_size is None
    less_return_path = counted.size - len(f"Return-Path: <{counted.sender}>\n".encode())
    assert counted.size_on_wire == less_return_path + len(SIGNATURE) + 3


def test_size_on_wire_without_a_count_is_the_stored_size_less_return_path() -> None:
    record = QueueRecord.from_message(accepted("7ZK2P1QHBCDF006", sender="a@b.example"))
    assert record is not None and record.wire_size is None
    assert record.size_on_wire == record.size - len(b"Return-Path: <a@b.example>\n")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not JSON"),
        (b'{"version": 1, "queue_id": "X"', "not JSON"),  # a torn write
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "record: expected an object"),
        (b'{"version": NaN}', "NaN is not a number"),
        (b"null", "record: expected an object"),
    ],
)
def test_unparseable_records_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        decode(data)


def test_record_must_match_its_file_name() -> None:
    data = json.dumps(_good()).encode()
    with pytest.raises(RecordError, match="does not match the file name"):
        decode(data, "7ZK2P1QHBCDF999")


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("7ZK2P1QHBCDF001", True),
        ("a", True),
        ("dsn-7ZK2_1", True),
        ("", False),
        ("-x", False),
        ("a/b", False),
        ("..", False),
        ("a.json", False),
        ("x" * 65, False),
        ("a b", False),
    ],
)
def test_queue_id_syntax(text: str, valid: bool) -> None:
    assert valid_queue_id(text) is valid


# --- the operator's rules ------------------------------------------------------------------


def _record(*states: tuple[State, int]) -> QueueRecord:
    """A record whose recipients r0@x.example, r1@x.example... have these (state, attempts)."""
    base = QueueRecord.from_message(accepted("7ZK2P1QHBCDF003"))
    assert base is not None
    recipients = tuple(
        replace(base.recipients[0], address=f"r{n}@x.example", state=state, attempts=attempts)
        for n, (state, attempts) in enumerate(states)
    )
    return replace(base, recipients=recipients)


def _states(record: QueueRecord | None) -> list[str]:
    assert record is not None
    return [r.state.value for r in record.recipients]


def test_hold_and_release_a_whole_message() -> None:
    record = _record((State.PENDING, 0), (State.DEFERRED, 2), (State.SENT, 1), (State.BOUNCED, 1))
    held, line = actions.hold(record, None)
    assert _states(held) == ["held", "held", "sent", "bounced"]
    assert line == "7ZK2P1QHBCDF003: 2 recipients put on hold"
    again, line = actions.hold(held, None)
    assert again is held and line == "7ZK2P1QHBCDF003: already on hold"
    released, line = actions.release(held, None)
    assert _states(released) == ["pending", "deferred", "sent", "bounced"]  # by attempts made
    assert line == "7ZK2P1QHBCDF003: 2 recipients released"
    assert actions.release(released, None)[1] == "7ZK2P1QHBCDF003: nothing on hold"


def test_release_keeps_the_next_attempt_and_flush_makes_deferred_due() -> None:
    record = _record((State.DEFERRED, 2), (State.HELD, 1), (State.PENDING, 0))
    later = replace(record.recipients[0], next_attempt=5000.0)
    record = record.with_recipients([later])
    flushed, count = actions.flush(record, now=1000.0)
    assert count == 1
    assert flushed.recipients[0].next_attempt == 1000.0
    assert flushed.recipients[1].state is State.HELD  # flush does not release
    released, _ = actions.release(record, "r1@x.example")
    assert released.recipients[1].state is State.DEFERRED


def test_one_recipient_by_address_ignoring_case() -> None:
    record = _record((State.PENDING, 0), (State.DEFERRED, 1))
    held, line = actions.hold(record, "R1@X.Example")
    assert _states(held) == ["pending", "held"]
    assert line == "7ZK2P1QHBCDF003: r1@x.example put on hold"


def test_delete_a_recipient_then_the_last_one_deletes_the_message() -> None:
    record = _record((State.SENT, 1), (State.DEFERRED, 1), (State.HELD, 0))
    left, line = actions.delete(record, "r1@x.example")
    assert left is not None and [r.address for r in left.recipients] == [
        "r0@x.example",
        "r2@x.example",
    ]
    assert line == "7ZK2P1QHBCDF003: deleted r1@x.example"
    only = _record((State.DEFERRED, 1))
    assert actions.delete(only, "r0@x.example") == (
        None,
        "7ZK2P1QHBCDF003: deleted r0@x.example, the last recipient",
    )
    assert actions.delete(record, None) == (None, "7ZK2P1QHBCDF003: deleted")


REFUSED = [
    (actions.hold, "nobody@x.example", "7ZK2P1QHBCDF003 has no recipient nobody@x.example"),
    (actions.hold, "r0@x.example", "cannot hold r0@x.example of 7ZK2P1QHBCDF003: already sent"),
    (actions.release, "r1@x.example", "cannot release r1@x.example of 7ZK2P1QHBCDF003: already"),
    (actions.delete, "r0@x.example", "cannot delete r0@x.example of 7ZK2P1QHBCDF003: already"),
    (actions.delete, "nobody@x.example", "has no recipient nobody@x.example"),
]


@pytest.mark.parametrize(("rule", "address", "message"), REFUSED)
def test_refused_rules(rule: Any, address: str, message: str) -> None:
    record = _record((State.SENT, 1), (State.BOUNCED, 3), (State.DEFERRED, 1))
    with pytest.raises(QueueError) as caught:
        rule(record, address)
    assert message in str(caught.value)


def test_a_finished_message_has_nothing_to_hold() -> None:
    record = _record((State.SENT, 1), (State.BOUNCED, 1))
    with pytest.raises(QueueError, match="has no recipient left to deliver"):
        actions.hold(record, None)


def test_from_dict_accepts_what_to_dict_makes() -> None:
    record = QueueRecord.from_message(full_message())
    assert record is not None
    assert from_dict(json.loads(json.dumps(to_dict(record)))) == record


@pytest.mark.parametrize(
    "value",
    [
        {},
        [],
        {"a": 1},
        {"a": [{"b": 1}, {"c": [1, 2]}], "d": "é ✓", "e": None, "f": [], "g": [1, 2]},
        {"x": {"y": [{"z": True}]}},
    ],
)
def test_stored_json_reads_back_the_same_with_one_key_per_line(value: Any) -> None:
    data = encode_json(value)
    assert json.loads(data) == value
    assert data.endswith(b"\n")
    text = data.decode("utf-8")
    if isinstance(value, dict) and value:
        assert len(text.splitlines()) >= len(value) + 2  # "{", a line per key, "}"


def test_stored_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        encode_json({"a": float("nan")})
