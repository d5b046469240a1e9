"""MAIL/RCPT lines: only safe addresses, parameters only for offered extensions."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailsrv.relay.envelope import (
    EnvelopeError,
    check_address,
    mail_command,
    needs_smtputf8,
    rcpt_command,
    xtext,
)
from mailsrv.relay.message import OutboundMessage, OutboundRecipient

GOOD = [
    "a@example.net",
    "A.B+tag@Example.NET",
    '"quoted name"@example.net',
    "a@[192.0.2.1]",
    "ü@bücher.test",
]

BAD = [
    "",
    "a@example.net\r\nRCPT TO:<victim@example.net>",
    "a@example.net\nDATA",
    "a@example.net\rx",
    "a\x00@example.net",
    "a@example.net> SIZE=1",
    "a@example.net NOTIFY=NEVER",
    "<a@example.net>",
    "a@b@example.net",
    "@relay.test:a@example.net",
    "a@",
    "@example.net",
    "postmaster",
    "a b@example.net",
    '"a>b"@example.net',
    "a@exa mple.net",
    "a@example.net\x7f",
]


@pytest.mark.parametrize("address", GOOD)
def test_good_addresses_pass(address: str) -> None:
    assert check_address(address) == address


@pytest.mark.parametrize("address", BAD)
def test_bad_addresses_are_refused(address: str) -> None:
    with pytest.raises(EnvelopeError):
        check_address(address)


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        ("abc", "abc"),
        ("a+b=c", "a+2Bb+3Dc"),
        ("a b", "a+20b"),
        ("ü", "+C3+BC"),
        ("x\r\n", "x+0D+0A"),
    ],
)
def test_xtext(text: str, encoded: str) -> None:
    assert xtext(text) == encoded


def message(**kwargs: object) -> OutboundMessage:
    base: dict[str, object] = {
        "queue_id": "Q1",
        "sender": "alice@example.org",
        "recipients": (OutboundRecipient("bob@example.net"),),
        "body_path": Path("/nonexistent"),
        "size": 1234,
    }
    base.update(kwargs)
    return OutboundMessage(**base)  # type: ignore[arg-type]


ALL = {"SIZE": "10000", "8BITMIME": "", "SMTPUTF8": "", "DSN": "", "PIPELINING": ""}


def test_mail_with_every_extension() -> None:
    m = message(eight_bit=True, smtputf8=True, ret="HDRS", envid="id+1 x")
    assert mail_command(m, ALL) == (
        b"MAIL FROM:<alice@example.org> SIZE=1234 BODY=8BITMIME SMTPUTF8"
        b" RET=HDRS ENVID=id+2B1+20x\r\n"
    )


def test_mail_without_extensions_has_no_parameters() -> None:
    m = message(eight_bit=True, smtputf8=True, ret="FULL", envid="x")
    assert mail_command(m, {}) == b"MAIL FROM:<alice@example.org>\r\n"


def test_null_sender() -> None:
    assert mail_command(message(sender=""), {}) == b"MAIL FROM:<>\r\n"


def test_bad_ret_is_left_out() -> None:
    assert mail_command(message(ret="ALL"), {"DSN": ""}) == b"MAIL FROM:<alice@example.org>\r\n"


@pytest.mark.parametrize(
    ("recipient", "line"),
    [
        (OutboundRecipient("b@example.net"), b"RCPT TO:<b@example.net>\r\n"),
        (
            OutboundRecipient("b@example.net", ("SUCCESS", "failure"), "rfc822;B+x@example.net"),
            b"RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;B+2Bx@example.net\r\n",
        ),
        (
            OutboundRecipient("b@example.net", ("NEVER",)),
            b"RCPT TO:<b@example.net> NOTIFY=NEVER\r\n",
        ),
        (OutboundRecipient("b@example.net", ("BOGUS",)), b"RCPT TO:<b@example.net>\r\n"),
        (OutboundRecipient("b@example.net", (), "rfc822"), b"RCPT TO:<b@example.net>\r\n"),
        (OutboundRecipient("b@example.net", (), "x y;a@b"), b"RCPT TO:<b@example.net>\r\n"),
        (OutboundRecipient("b@example.net", (), "utf-8;ü@b"), b"RCPT TO:<b@example.net>\r\n"),
    ],
)
def test_rcpt_with_dsn(recipient: OutboundRecipient, line: bytes) -> None:
    assert rcpt_command(recipient, {"DSN": ""}) == line


def test_rcpt_without_dsn_drops_dsn_parameters() -> None:
    recipient = OutboundRecipient("b@example.net", ("SUCCESS",), "rfc822;b@example.net")
    assert rcpt_command(recipient, {}) == b"RCPT TO:<b@example.net>\r\n"


def test_injection_through_an_envelope_address_is_refused() -> None:
    with pytest.raises(EnvelopeError):
        rcpt_command(OutboundRecipient("b@example.net>\r\nDATA"), {})
    with pytest.raises(EnvelopeError):
        mail_command(message(sender="a@example.org> SIZE=1"), {})


def test_smtputf8_need() -> None:
    assert not needs_smtputf8(message())
    assert needs_smtputf8(message(smtputf8=True))
    assert needs_smtputf8(message(sender="ü@example.org"))
    assert needs_smtputf8(message(recipients=(OutboundRecipient("b@bücher.test"),)))
