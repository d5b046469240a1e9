"""MAIL and RCPT parameters: every value bounded before it is parsed, every bad one a 501/555.

The tables below give each parameter the server parses (and a few it does not) oversized and
garbage values; each must get its reply with an enhanced code, count as an error, leave the
session usable, and log no failure.  In memory over a StringTransport (the harness of
``test_session_protocol``), then a few over real sockets.
"""

from __future__ import annotations

import base64
import random
import string
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.logger import globalLogPublisher

from mailsrv.auth.realm import MailRealm
from mailsrv.smtp import replies
from mailsrv.smtp.address import AddressError, parse_path_argument
from mailsrv.smtp.parameters import (
    MAIL_PARAMETERS,
    RCPT_PARAMETERS,
    ParameterError,
    decode_xtext,
    parse_parameters,
)
from mailsrv.smtp.replies import Reply
from tests.conftest import RawClient, make_config, run_client, start_server
from tests.test_auth import PASSWORD, start_auth_server, tls_client
from tests.test_session_protocol import (
    _ENHANCED_LINE,
    SIMPLE_BODY,
    Client,
    Harness,
    matches,
)
from tests.test_tls import CertFiles

LONG = 5000  # int() refuses strings of more than 4300 digits


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    """Every log event emitted during the test."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def failures(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events that carry a traceback or are logged as errors."""
    return [
        e
        for e in events
        if "log_failure" in e or getattr(e.get("log_level"), "name", "") in ("error", "critical")
    ]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    """Harnesses whose MAIL lines may be long enough for 5000-digit values."""
    made: list[Harness] = []

    def factory(auth: bool = False, **overrides: Any) -> Harness:
        overrides.setdefault("max_mail_line_length", 8192)
        if auth:
            overrides.update(enable_auth=True, allow_plaintext_auth=True)
        harness = Harness(tmp_path, **overrides)
        if auth:  # AUTH offered; no accounts: every client stays anonymous
            harness.server.portal = Portal(MailRealm(None), [AllowAnonymousAccess()])
        made.append(harness)
        return harness

    yield factory
    for harness in made:
        harness.close_all()
        harness.clock.advance(3600)


def _answer(c: Client, line: str) -> bytes:
    errors = c.proto.errors
    reply = c.cmd(line)
    assert _ENHANCED_LINE.match(reply), reply
    if reply[:1] in b"45":
        assert c.proto.errors == errors + 1, "a refusal counts as an error"
    return reply


# --- the parameter table itself -------------------------------------------------------------------


def test_every_table_entry_is_bounded() -> None:
    for table in (MAIL_PARAMETERS, RCPT_PARAMETERS):
        for keyword, spec in table.items():
            assert keyword == keyword.upper()
            assert (spec.parse is None) == (spec.max_length == 0), keyword
            assert spec.max_length <= 1024, keyword


@pytest.mark.parametrize(
    ("text", "decoded"),
    [
        ("", ""),
        ("<>", "<>"),
        ("alice@example.org", "alice@example.org"),
        ("e+2Bsmith@example.org", "e+smith@example.org"),
        ("e+2bsmith@example.org", "e+smith@example.org"),
        ("+3D+2B", "=+"),
        ("j+C3+B6rg@example.org", "jörg@example.org"),
    ],
)
def test_xtext_decodes(text: str, decoded: str) -> None:
    assert decode_xtext(text) == decoded


@pytest.mark.parametrize(
    "text", ["+", "+4", "+ZZ", "a+4g", "a=b", "a b", "tab\t", "+FF", "+C3", "é", "a\x7f"]
)
def test_malformed_xtext_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        decode_xtext(text)


@pytest.mark.parametrize(
    ("params", "reply"),
    [
        ({"SIZE": "9" * LONG}, replies.MAIL_SYNTAX),
        ({"SIZE": "0" * LONG + "7"}, None),
        ({"AUTH": "a" * LONG}, replies.MAIL_SYNTAX),
        ({"SIZE": None}, replies.MAIL_SYNTAX),
        ({"SMTPUTF8": "x"}, replies.MAIL_SYNTAX),
        ({"AUTH": "+ZZ"}, replies.MAIL_SYNTAX),
        ({"BODY": "8BITMIME"}, replies.UNKNOWN_PARAMETER),  # 8BITMIME was not offered
        ({"XFOO": "1"}, replies.UNKNOWN_PARAMETER),
    ],
)
def test_parse_parameters_raises_only_parameter_errors(
    params: dict[str, str | None], reply: Reply | None
) -> None:
    offered = {"SIZE", "SMTPUTF8", "AUTH"}
    if reply is None:
        assert parse_parameters(params, MAIL_PARAMETERS, offered, replies.MAIL_SYNTAX) == {
            "SIZE": 7
        }
        return
    with pytest.raises(ParameterError) as caught:
        parse_parameters(params, MAIL_PARAMETERS, offered, replies.MAIL_SYNTAX)
    assert caught.value.reply is reply


# --- MAIL FROM parameters in a session ----------------------------------------------------------

BAD_MAIL_PARAMETERS = [
    # SIZE (RFC 1870)
    ("SIZE=" + "9" * LONG, replies.MAIL_SYNTAX),
    ("SIZE=" + "1" * 33, replies.MAIL_SYNTAX),
    ("SIZE=" + "0" * LONG + "1" * 33, replies.MAIL_SYNTAX),
    ("SIZE=", replies.MAIL_SYNTAX),
    ("SIZE=1e3", replies.MAIL_SYNTAX),
    ("SIZE=0x10", replies.MAIL_SYNTAX),
    ("SIZE=+1", replies.MAIL_SYNTAX),
    ("SIZE=1.5", replies.MAIL_SYNTAX),
    ("SIZE=\uff11\uff10", replies.MAIL_SYNTAX),  # full-width digits
    ("SIZE=²", replies.MAIL_SYNTAX),  # str.isdigit() says yes, int() raises
    ("SIZE=١٢", replies.MAIL_SYNTAX),  # Arabic-Indic digits
    ("SIZE=10=1", replies.MAIL_SYNTAX),
    ("SIZE=1\t", replies.MAIL_SYNTAX),
    ("SIZE=1\x7f", replies.MAIL_SYNTAX),
    ("SIZE=1 SIZE=" + "9" * LONG, replies.MAIL_SYNTAX),
    # BODY (RFC 6152)
    ("BODY=" + "8" * LONG, replies.MAIL_SYNTAX),
    ("BODY=8BITMIME" * 2, replies.MAIL_SYNTAX),
    ("BODY=", replies.MAIL_SYNTAX),
    ("BODY=BINARYMIME", replies.MAIL_SYNTAX),
    ("BODY=8BIT", replies.MAIL_SYNTAX),
    # SMTPUTF8 (RFC 6531) takes no value
    ("SMTPUTF8=" + "x" * LONG, replies.MAIL_SYNTAX),
    ("SMTPUTF8=", replies.MAIL_SYNTAX),
    # AUTH (RFC 4954) is a parameter only where AUTH is offered
    ("AUTH=<>", replies.UNKNOWN_PARAMETER),
    ("AUTH=" + "a" * LONG, replies.UNKNOWN_PARAMETER),
    # DSN (RFC 3461): RET and ENVID
    ("RET=" + "H" * LONG, replies.MAIL_SYNTAX),
    ("RET=", replies.MAIL_SYNTAX),
    ("RET=BODY", replies.MAIL_SYNTAX),
    ("RET", replies.MAIL_SYNTAX),
    ("ENVID=" + "x" * LONG, replies.MAIL_SYNTAX),
    ("ENVID=" + "x" * 101, replies.MAIL_SYNTAX),
    ("ENVID=", replies.MAIL_SYNTAX),
    ("ENVID=a+0Db", replies.MAIL_SYNTAX),  # CR hidden in xtext
    ("ENVID=a+C3+A9", replies.MAIL_SYNTAX),  # not printable ASCII
    ("ENVID=a+ZZ", replies.MAIL_SYNTAX),
    # parameters the server does not know, and words that are not parameters
    ("X" * LONG, replies.UNKNOWN_PARAMETER),
    ("X-FOO=" + "y" * LONG, replies.UNKNOWN_PARAMETER),
    ("=" + "y" * LONG, replies.MAIL_SYNTAX),
    ("-SIZE=1", replies.MAIL_SYNTAX),
    ("SIZE=1 size=2", replies.MAIL_SYNTAX),
    ("FOO=bär", replies.MAIL_SYNTAX),
]


@pytest.mark.parametrize(("params", "reply"), BAD_MAIL_PARAMETERS, ids=lambda v: str(v)[:24])
def test_bad_mail_parameters(
    make: Callable[..., Harness], log_events: list[dict[str, Any]], params: str, reply: Reply
) -> None:
    c = make().connect()
    c.ehlo()
    assert _answer(c, f"MAIL FROM:<a@b.test> {params}") == reply.format()
    assert reply.code in (501, 555) and reply.enhanced == "5.5.4"
    assert c.proto.transaction is None
    assert matches(c.cmd("MAIL FROM:<a@b.test> SIZE=100"), replies.SENDER_OK)
    assert failures(log_events) == []


@pytest.mark.parametrize(
    "params",
    ["SIZE=" + "0" * 4000 + "100", "SIZE=00", "BODY=7bit", "SIZE=1 BODY=8BITMIME SMTPUTF8"],
    ids=lambda v: v[:24],
)
def test_lenient_mail_parameters(make: Callable[..., Harness], params: str) -> None:
    c = make().connect()
    c.ehlo()
    assert c.cmd(f"MAIL FROM:<a@b.test> {params}") == replies.SENDER_OK.format()
    assert c.proto.errors == 0


def test_size_of_32_digits_is_too_big_not_a_syntax_error(make: Callable[..., Harness]) -> None:
    c = make().connect()
    c.ehlo()
    assert _answer(c, "MAIL FROM:<a@b.test> SIZE=" + "9" * 32) == replies.MESSAGE_TOO_BIG.format()


# --- AUTH= (RFC 4954 section 5) -------------------------------------------------------------------

AUTH_VALUES = [
    ("<>", replies.SENDER_OK),
    ("alice@example.org", replies.SENDER_OK),
    ("e+2Bsmith@example.org", replies.SENDER_OK),
    ("e+2bsmith@example.org", replies.SENDER_OK),
    ("+22quoted+20local+22@example.org", replies.SENDER_OK),
    ("user@[192.0.2.1]", replies.SENDER_OK),
    ("a" * 64 + "@" + "b" * 63 + ".test", replies.SENDER_OK),
    ("", replies.MAIL_SYNTAX),
    ("a" * (3 * 256 + 1), replies.MAIL_SYNTAX),
    ("+41" * 257, replies.MAIL_SYNTAX),
    ("a" * 65 + "@example.org", replies.MAIL_SYNTAX),
    ("+ZZ", replies.MAIL_SYNTAX),
    ("+4", replies.MAIL_SYNTAX),
    ("a+", replies.MAIL_SYNTAX),
    ("+FF+FE@example.org", replies.MAIL_SYNTAX),
    ("nobody", replies.MAIL_SYNTAX),
    ("+3Calice@example.org+3E", replies.MAIL_SYNTAX),
    ("+3C+3E+3C+3E", replies.MAIL_SYNTAX),
    ("@hop.test:alice@example.org", replies.MAIL_SYNTAX),
    ("a+20b@example.org", replies.MAIL_SYNTAX),
    ("alice@[999.1.1.1]", replies.MAIL_SYNTAX),
    ("alice@example.org+0D+0ARCPT", replies.MAIL_SYNTAX),
]


@pytest.mark.parametrize(("value", "reply"), AUTH_VALUES, ids=lambda v: str(v)[:24])
def test_auth_parameter_where_auth_is_offered(
    make: Callable[..., Harness], log_events: list[dict[str, Any]], value: str, reply: Reply
) -> None:
    c = make(auth=True).connect()
    assert c.ehlo().endswith(b"250 AUTH PLAIN LOGIN\r\n")
    assert _answer(c, f"MAIL FROM:<a@b.test> AUTH={value}") == reply.format()
    assert (c.proto.transaction is not None) == (reply is replies.SENDER_OK)
    assert failures(log_events) == []


def test_auth_parameter_is_dropped(make: Callable[..., Harness]) -> None:
    """Not authenticated: accepted and treated as AUTH=<> (nothing of it reaches the message)."""
    h = make(auth=True)
    c = h.connect()
    c.ehlo()
    assert matches(c.cmd("MAIL FROM:<a@b.test> AUTH=boss+40example.org"), replies.SENDER_OK)
    assert matches(c.cmd("RCPT TO:<alice@example.org>"), replies.RECIPIENT_OK)
    assert matches(c.data(SIMPLE_BODY), replies.MESSAGE_ACCEPTED)
    [message] = h.messages("alice@example.org")
    assert b"boss" not in message


def test_auth_parameter_needs_ehlo(make: Callable[..., Harness]) -> None:
    c = make(auth=True).connect()
    c.cmd("HELO client.test")
    assert _answer(c, "MAIL FROM:<a@b.test> AUTH=<>") == replies.UNKNOWN_PARAMETER.format()


# --- RCPT TO parameters ---------------------------------------------------------------------------

BAD_RCPT_PARAMETERS = [
    # DSN (RFC 3461): NOTIFY and ORCPT
    ("NOTIFY=" + "S" * LONG, replies.RCPT_SYNTAX),
    ("NOTIFY=", replies.RCPT_SYNTAX),
    ("NOTIFY=NEVER,SUCCESS", replies.RCPT_SYNTAX),
    ("NOTIFY=SUCCESS,SUCCESS", replies.RCPT_SYNTAX),
    ("NOTIFY=SOMETIMES", replies.RCPT_SYNTAX),
    ("NOTIFY=SUCCESS,", replies.RCPT_SYNTAX),
    ("NOTIFY", replies.RCPT_SYNTAX),
    ("ORCPT=rfc822;" + "a" * LONG, replies.RCPT_SYNTAX),
    ("ORCPT=rfc822;" + "a" * 494, replies.RCPT_SYNTAX),  # 501 characters
    ("ORCPT=", replies.RCPT_SYNTAX),
    ("ORCPT=rfc822", replies.RCPT_SYNTAX),
    ("ORCPT=;a@b.test", replies.RCPT_SYNTAX),
    ("ORCPT=rfc 822;a@b.test", replies.RCPT_SYNTAX),
    ("ORCPT=rfc822;a+0D+0Ab@b.test", replies.RCPT_SYNTAX),  # CR LF hidden in xtext
    ("ORCPT=rfc822;a+FFb", replies.RCPT_SYNTAX),  # not UTF-8
    ("SIZE=10", replies.UNKNOWN_PARAMETER),  # a MAIL parameter
    ("SMTPUTF8", replies.UNKNOWN_PARAMETER),
    ("X" * LONG, replies.UNKNOWN_PARAMETER),
    ("=x", replies.RCPT_SYNTAX),
    ("X=", replies.RCPT_SYNTAX),
    ("=" + "y" * LONG, replies.RCPT_SYNTAX),
    ("A=1 A=2", replies.RCPT_SYNTAX),
    ("A=ü", replies.RCPT_SYNTAX),
]


@pytest.mark.parametrize(("params", "reply"), BAD_RCPT_PARAMETERS, ids=lambda v: str(v)[:24])
def test_bad_rcpt_parameters(
    make: Callable[..., Harness], log_events: list[dict[str, Any]], params: str, reply: Reply
) -> None:
    c = make().connect()
    c.transaction()
    assert _answer(c, f"RCPT TO:<bob@example.org> {params}") == reply.format()
    assert reply.code in (501, 555) and reply.enhanced == "5.5.4"
    assert c.proto.transaction is not None and len(c.proto.transaction.recipients) == 1
    assert matches(c.cmd("RCPT TO:<bob@example.org>"), replies.RECIPIENT_OK)
    assert failures(log_events) == []


def test_bad_parameters_reach_the_error_limit(make: Callable[..., Harness]) -> None:
    c = make(max_errors=3).connect()
    c.ehlo()
    c.cmd("MAIL FROM:<a@b.test> SIZE=" + "9" * LONG)
    c.cmd("MAIL FROM:<a@b.test> X-FOO=" + "y" * LONG)
    assert c.cmd("MAIL FROM:<a@b.test> BODY=" + "8" * LONG) == (
        replies.MAIL_SYNTAX.format() + replies.TOO_MANY_ERRORS.format()
    )
    assert c.closing


GOOD_DSN_PARAMETERS = [
    (
        "MAIL FROM:<a@b.test> RET=HDRS ENVID=QQ+2B1",
        "RCPT TO:<bob@example.org> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Bob+40example.org",
        ("QQ+1", "HDRS", frozenset({"SUCCESS", "DELAY"}), ("rfc822", "Bob@example.org")),
    ),
    (
        "MAIL FROM:<a@b.test> ret=full",
        "RCPT TO:<bob@example.org> notify=never",
        (None, "FULL", frozenset({"NEVER"}), None),
    ),
    (
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<bob@example.org> ORCPT=UTF-8;bob+40example.org",
        (None, None, frozenset(), ("utf-8", "bob@example.org")),
    ),
]


@pytest.mark.parametrize(("mail", "rcpt", "expected"), GOOD_DSN_PARAMETERS)
def test_dsn_parameters_are_kept_per_recipient(
    make: Callable[..., Harness], mail: str, rcpt: str, expected: tuple[Any, ...]
) -> None:
    h = make()
    c = h.connect()
    assert b"250-DSN" in c.ehlo() or b"250 DSN" in c.ehlo()
    assert matches(c.cmd(mail), replies.SENDER_OK)
    assert matches(c.cmd(rcpt), replies.RECIPIENT_OK)
    transaction = c.proto.transaction
    assert transaction is not None
    (recipient,) = transaction.accepted
    envid, ret, notify, orcpt = expected
    assert transaction.envid == envid
    assert (transaction.ret.value if transaction.ret else None) == ret
    assert {n.value for n in recipient.dsn.notify} == notify
    assert recipient.dsn.orcpt == orcpt


def test_dsn_parameters_need_ehlo(make: Callable[..., Harness]) -> None:
    c = make().connect()
    c.cmd("HELO client.test")
    assert _answer(c, "MAIL FROM:<a@b.test> RET=FULL") == replies.UNKNOWN_PARAMETER.format()
    c.cmd("MAIL FROM:<a@b.test>")
    assert _answer(c, "RCPT TO:<bob@example.org> NOTIFY=NEVER") == (
        replies.UNKNOWN_PARAMETER.format()
    )


# --- <postmaster> without a domain ----------------------------------------------------------------


def test_bare_postmaster_is_shown_as_the_full_address(
    make: Callable[..., Harness], log_events: list[dict[str, Any]]
) -> None:
    h = make()
    c = h.connect()
    c.transaction("sender@remote.test", "postmaster")
    assert [str(r) for r in c.proto.transaction.recipients] == ["postmaster@example.org"]
    assert matches(c.data(SIMPLE_BODY), replies.MESSAGE_ACCEPTED)
    [message] = h.messages("postmaster@example.org")
    assert b"\tfor <postmaster@example.org>;\n" in message
    [logged] = [e for e in log_events if e.get("result") == "accepted"]
    assert logged["recipients"] == ["postmaster@example.org"]


# --- over real sockets ----------------------------------------------------------------------------


def _script(port: int, lines: list[bytes]) -> list[bytes]:
    client = RawClient(port)
    try:
        client.read_reply()
        client.command(b"EHLO client.test")
        return [client.command(line) for line in lines]
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_bad_parameters_over_a_socket(
    tmp_path: Path, log_events: list[dict[str, Any]]
) -> None:
    config = make_config(tmp_path, max_mail_line_length=16384, max_errors=50)
    running = await start_server(config)
    lines = [
        b"MAIL FROM:<a@b.test> SIZE=" + b"9" * 10_000,
        b"MAIL FROM:<a@b.test> BODY=" + b"8" * 10_000,
        b"MAIL FROM:<a@b.test> SMTPUTF8=" + b"x" * 10_000,
        b"MAIL FROM:<a@b.test> AUTH=" + b"a" * 10_000,
        b"MAIL FROM:<a@b.test> " + b"X" * 10_000,
        b"MAIL FROM:<a@b.test> SIZE=\xc2\xb2",
        b"MAIL FROM:<a@b.test> SIZE=" + b"0" * 10_000 + b"100",
        b"RCPT TO:<postmaster> NOTIFY=" + b"N" * 10_000,
        b"RCPT TO:<postmaster> =" + b"x" * 10_000,
        b"RCPT TO:<postmaster>",
        b"QUIT",
    ]
    try:
        answers = await run_client(_script, running.port, lines)
    finally:
        await running.service.stopService()
    assert answers == [
        replies.MAIL_SYNTAX.format(),
        replies.MAIL_SYNTAX.format(),
        replies.MAIL_SYNTAX.format(),
        replies.UNKNOWN_PARAMETER.format(),
        replies.UNKNOWN_PARAMETER.format(),
        replies.MAIL_SYNTAX.format(),
        replies.SENDER_OK.format(),
        replies.RCPT_SYNTAX.format(),  # NOTIFY (DSN) is known: its value is too long
        replies.RCPT_SYNTAX.format(),
        replies.RECIPIENT_OK.format(),
        replies.BYE.format(),
    ]
    assert failures(log_events) == []
    [closed] = [e for e in log_events if e.get("log_format", "").startswith("session closed")]
    assert closed["errors"] == 8


def _authenticated_mail(port: int, context: Any, values: list[str]) -> list[bytes]:
    client = tls_client(port, context)
    try:
        login = base64.b64encode(b"\0erin@example.org\0" + PASSWORD.encode())
        assert client.command(b"AUTH PLAIN " + login) == replies.AUTH_OK.format()
        answers = []
        for value in values:
            answers.append(client.command(f"MAIL FROM:<erin@example.org> AUTH={value}".encode()))
            client.command(b"RSET")
        return answers
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_auth_parameter_after_authentication(
    tmp_path: Path, log_events: list[dict[str, Any]]
) -> None:
    from twisted.internet import reactor

    from mailsrv.auth.sqlite_store import SQLiteUserStore

    store = SQLiteUserStore(tmp_path / "users.db", reactor)
    await store.open()
    certs = CertFiles(tmp_path / "tls")
    server = await start_auth_server(tmp_path, store, certs)
    values = ["<>", "erin+40example.org", "someone+2Belse@remote.test", "+ZZ", "x" * 769, "nobody"]
    try:
        answers = await run_client(
            _authenticated_mail, server.ports["submission"], server.context(), values
        )
    finally:
        await server.running.service.stopService()
        await store.close()
    assert answers == [replies.SENDER_OK.format()] * 3 + [replies.MAIL_SYNTAX.format()] * 3
    assert failures(log_events) == []


def test_random_mail_arguments_raise_only_syntax_errors() -> None:
    """Seeded random MAIL arguments built from tricky pieces: the parsers may refuse them, but
    only with AddressError or ParameterError (what the session turns into 501/555)."""
    rng = random.Random(20261202)
    chars = string.printable + "é²١\x00\xff"

    def junk(most: int) -> str:
        return "".join(rng.choice(chars) for _ in range(rng.randint(0, most)))

    locals_ = ["a", '"q\\"x"', "a.b", "a..b", "", "x" * 70, "j\u00f6rg"]
    domains = [
        *("b.test", "[1.2.3.4]", "[IPv6:::1]", "[IPv6:fe80::1%25x]", "[IPv6:" + "1:" * 20 + "]"),
        *("[tag:x]", "[01.2.3.4]", "[1.2.3]", "[IPv6:1::2::3]", "-a.b", "b" * 300),
    ]
    values = ["", "1", "9" * 40, "0" * 100 + "1", "8BITMIME", "<>", "+2B", "+ZZ", "a@b", "+C3+28"]
    keywords = ["SIZE", "BODY", "SMTPUTF8", "AUTH", "X"]
    offered = {"SIZE", "8BITMIME", "SMTPUTF8", "AUTH"}
    accepted = 0
    for _ in range(20_000):
        params = " ".join(
            rng.choice([*keywords, junk(3)])
            + ("=" + rng.choice([*values, junk(8)]) if rng.random() < 0.8 else "")
            for _ in range(rng.randint(0, 3))
        )
        local, domain = rng.choice([*locals_, junk(5)]), rng.choice([*domains, junk(6)])
        try:
            path = parse_path_argument(f"FROM:<{local}@{domain}> {params}", "FROM:", True)
            parse_parameters(path.params, MAIL_PARAMETERS, offered, replies.MAIL_SYNTAX)
            accepted += 1
        except (AddressError, ParameterError):
            pass
    assert 0 < accepted < 20_000
