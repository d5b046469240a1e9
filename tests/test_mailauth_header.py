"""Our Authentication-Results header (rendered, and valid RFC 8601 as authres parses it) and the
streaming removal of forged ones claiming our authserv-id."""

from __future__ import annotations

import random

import authres
import authres.arc
import authres.dkim_b
import authres.dmarc
import pytest

from mailsrv.mailauth.header import ForgedResultsFilter, _Read, authserv_id_of, render
from mailsrv.mailauth.verdict import ARCResult, DKIMResult, DMARCResult, SPFResult, Verdict

FEATURES = authres.FeatureContext(authres.dkim_b, authres.dmarc, authres.arc)

VERDICT = Verdict(
    spf_mailfrom=SPFResult("pass", "example.com"),
    spf_helo=SPFResult("none", "mail.example.com"),
    dkim=(
        DKIMResult("pass", "example.com", "sel", "rsa-sha256", "@example.com", "Hk2r/9Ym+P=="),
        DKIMResult("fail", "example.com", "ed", "ed25519-sha256", reason="body hash mismatch"),
    ),
    dmarc=DMARCResult("pass", "example.com", "reject", 100, "none"),
    arc=ARCResult("none"),
)


def parse(header: bytes) -> authres.AuthenticationResultsHeader:
    unfolded = header.decode().replace("\n\t", " ").rstrip("\n")
    return FEATURES.parse(unfolded)


def test_the_header_has_one_result_per_line_and_parses() -> None:
    header = render("mx.example.org", VERDICT)
    assert header == (
        b"Authentication-Results: mx.example.org;\n"
        b"\tspf=pass smtp.mailfrom=example.com;\n"
        b"\tspf=none smtp.helo=mail.example.com;\n"
        b"\tdkim=pass header.d=example.com header.s=sel header.a=rsa-sha256"
        b' header.b="Hk2r/9Ym+P==";\n'
        b'\tdkim=fail reason="body hash mismatch" header.d=example.com header.s=ed'
        b" header.a=ed25519-sha256;\n"
        b"\tdmarc=pass (p=reject pct=100 dis=none) header.from=example.com;\n"
        b"\tarc=none\n"
    )
    parsed = parse(header)
    assert parsed.authserv_id == "mx.example.org"
    assert [(r.method, r.result) for r in parsed.results] == [
        ("spf", "pass"),
        ("spf", "none"),
        ("dkim", "pass"),
        ("dkim", "fail"),
        ("dmarc", "pass"),
        ("arc", "none"),
    ]


def test_no_signature_is_dkim_none_and_unknown_parts_are_left_out() -> None:
    verdict = Verdict(
        SPFResult("temperror", "", "DNS timed out"),
        SPFResult("none"),
        (),
        DMARCResult("temperror", reason="time budget used up"),
        ARCResult("none"),
    )
    parsed = parse(render("mx.example.org", verdict))
    assert [(r.method, r.result) for r in parsed.results] == [
        ("spf", "temperror"),
        ("spf", "none"),
        ("dkim", "none"),
        ("dmarc", "temperror"),
        ("arc", "none"),
    ]


@pytest.mark.parametrize(
    "reason",
    [
        'quote " and backslash \\ and (parens)',
        "addr@example.com not allowed",
        "control\x00chars\x1b[31m and \u00fcnicode",
        "x" * 500,
    ],
)
def test_reasons_from_outside_cannot_break_the_syntax(reason: str) -> None:
    verdict = Verdict(
        SPFResult("fail", "example.com", reason),
        SPFResult("none"),
        (DKIMResult("fail", "example.com", "s", reason=reason),),
        DMARCResult("fail", "example.com", "none", reason=reason),
        ARCResult("fail", reason),
    )
    header = render("mx.example.org", verdict)
    assert all(0x20 <= b < 0x7F or b in b"\n\t" for b in header)
    parsed = parse(header)
    assert [r.result for r in parsed.results] == ["fail", "none", "fail", "fail", "fail"]


# --- the authserv-id of someone else's header ---------------------------------------------------

AUTHSERV_IDS = [
    (b" mx.example.org; spf=pass", True, (_Read.FOUND, b"mx.example.org")),
    (b"MX.Example.ORG;", True, (_Read.FOUND, b"mx.example.org")),
    (
        b" (comment (nested) \\) still) mx.example.org 1; none",
        True,
        (_Read.FOUND, b"mx.example.org"),
    ),
    (b' "mx.example.org"; none', True, (_Read.FOUND, b"mx.example.org")),
    (b' "mx.ex\\"ample"; none', True, (_Read.FOUND, b'mx.ex"ample')),
    (b"\n\t mx.example.org;", True, (_Read.FOUND, b"mx.example.org")),
    (b" mx.exam", False, (_Read.MORE, b"")),  # the token may go on in the next piece
    (b" (a comment not yet closed", False, (_Read.MORE, b"")),
    (b"   ", False, (_Read.MORE, b"")),
    (b"   ", True, (_Read.NONE, b"")),
    (b" mx.example.org", True, (_Read.FOUND, b"mx.example.org")),
]


@pytest.mark.parametrize(("value", "complete", "expected"), AUTHSERV_IDS)
def test_authserv_id_is_read_past_comments(
    value: bytes, complete: bool, expected: tuple[_Read, bytes]
) -> None:
    assert authserv_id_of(value, complete) == expected


# --- the filter ---------------------------------------------------------------------------------

OURS = b"Authentication-Results: mx.example.org; dkim=pass header.d=bank.test\n"
THEIRS = b"Authentication-Results: other.example; dkim=pass header.d=bank.test\n"
BODY = b"\nAuthentication-Results: mx.example.org; in the body, kept\nbye\n"

FILTER_CASES = [
    (
        "ours removed",
        b"From: a@b.test\n" + OURS + b"Subject: s\n" + BODY,
        b"From: a@b.test\nSubject: s\n" + BODY,
        1,
    ),
    ("theirs kept", b"From: a@b.test\n" + THEIRS + BODY, b"From: a@b.test\n" + THEIRS + BODY, 0),
    ("first line", OURS + THEIRS + BODY, THEIRS + BODY, 1),
    (
        "folded, id on the next line",
        b"X: 1\nauthentication-results:\n\t  mx.example.org;\n\tspf=pass\nY: 2\n" + BODY,
        b"X: 1\nY: 2\n" + BODY,
        1,
    ),
    (
        "comment first, upper case, trailing dot",
        b"AUTHENTICATION-RESULTS: (trust me) MX.EXAMPLE.ORG.; dmarc=pass\n" + BODY,
        BODY,
        1,
    ),
    (
        "quoted id",
        b'Authentication-Results: "mx.example.org"; none\nA: b\n' + BODY,
        b"A: b\n" + BODY,
        1,
    ),
    (
        "a longer name is someone else",
        b"Authentication-Results: mx.example.org.evil; none\n" + BODY,
        None,
        0,
    ),
    ("a similar field name", b"X-Authentication-Results: mx.example.org; none\n" + BODY, None, 0),
    ("two of ours", OURS + b"A: 1\n" + OURS + BODY, b"A: 1\n" + BODY, 2),
    ("no body", b"A: 1\n" + OURS, b"A: 1\n", 1),
    ("empty value", b"Authentication-Results:\nA: 1\n" + BODY, None, 0),
    (
        "hidden behind a long comment",
        b"Authentication-Results: (" + b"x" * 9000 + b") mx.example.org; none\nA: 1\n" + BODY,
        b"A: 1\n" + BODY,
        1,
    ),
    (
        "a line that is no field ends the header section",
        b"A: 1\nnot a field\n" + OURS + BODY,
        None,
        0,
    ),
    (
        "ours after a long field",
        b"X-Long: " + b"y" * 20000 + b"\n" + OURS + BODY,
        b"X-Long: " + b"y" * 20000 + b"\n" + BODY,
        1,
    ),
]


def run_filter(message: bytes, pieces: list[int]) -> tuple[bytes, ForgedResultsFilter]:
    out: list[bytes] = []
    forged = ForgedResultsFilter(out.append, "mx.example.org")
    pos = 0
    for size in pieces:
        forged.write(message[pos : pos + size])
        pos += size
    forged.write(message[pos:])
    forged.close()
    return b"".join(out), forged


@pytest.mark.parametrize(
    ("message", "expected", "fields"),
    [case[1:] for case in FILTER_CASES],
    ids=[case[0] for case in FILTER_CASES],
)
def test_forged_results_are_removed_however_the_message_is_cut(
    message: bytes, expected: bytes | None, fields: int
) -> None:
    expected = message if expected is None else expected
    rng = random.Random(7)
    splits = [[], [1] * len(message)] + [
        [rng.randint(1, 40) for _ in range(len(message) // 10)] for _ in range(5)
    ]
    for pieces in splits:
        out, forged = run_filter(message, pieces)
        assert out == expected
        assert forged.removed_fields == fields
        assert forged.removed_bytes == len(message) - len(expected)
        assert forged.removed_lines == message.count(b"\n") - expected.count(b"\n")


def test_the_body_streams_through_without_copies() -> None:
    out: list[bytes] = []
    forged = ForgedResultsFilter(out.append, "mx.example.org")
    forged.write(b"A: 1\n\n")
    chunk = b"x" * 100_000
    forged.write(chunk)
    assert out[-1] is chunk
