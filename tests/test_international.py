"""Internationalised names end to end: real sockets, smtplib with SMTPUTF8, the installed
``mailsrv users`` command on SQLite and PostgreSQL, AUTH over real TLS.

A local domain configured as a U-label or an A-label is one domain whatever form a client
sends; UTF-8 local parts made with ``mailsrv users add`` receive mail and log in under any
case or normalisation form; compatibility spellings of an ASCII mailbox never reach it.
"""

from __future__ import annotations

import smtplib
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from mailsrv.auth.factory import open_user_store
from mailsrv.config import load, parse_domains, parse_mailboxes
from mailsrv.smtp import replies
from tests.conftest import RawClient, RunningServer, make_config, run_client, start_server
from tests.test_auth import PASSWORD, _plain, start_auth_server, tls_client
from tests.test_cli_users import Cli, one_line
from tests.test_cli_users import cli as cli  # the fixture: SQLite and PostgreSQL
from tests.test_tls import CertFiles

BUCHER = "xn--bcher-kva.example"
MESSAGE = b"Subject: gr\xc3\xbc\xc3\x9fe\r\n\r\nhello\r\n"


def nfd(text: str) -> str:
    decomposed = unicodedata.normalize("NFD", text)
    assert decomposed != text
    return decomposed


def answer(reply: replies.Reply) -> tuple[int, bytes]:
    """What smtplib returns for ``reply``: (code, text without the code)."""
    return reply.code, f"{reply.enhanced} {reply.text}".encode()


def _send_each(port: int, recipients: list[str], smtputf8: bool = True) -> list[tuple[int, bytes]]:
    """One transaction per recipient with smtplib; the RCPT answer of each (250s get DATA)."""
    answers = []
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.test")
        for recipient in recipients:
            client.mail("sender@remote.test", ["SMTPUTF8"] if smtputf8 else [])
            code, text = client.rcpt(recipient)
            answers.append((code, text))
            if code == 250:
                assert client.data(MESSAGE)[0] == 250
            else:
                client.rset()
    return answers


# --- a local domain in either form, over real smtplib -------------------------------------------

# (RCPT address as sent, needs SMTPUTF8)
SPELLINGS = [
    ("alice@bücher.example", True),
    ("Alice@BÜCHER.EXAMPLE", True),
    (nfd("alice@bücher.example"), True),
    (f"alice@{BUCHER}", False),
    (f"ALICE@{BUCHER.upper()}", False),
    ("info@bücher.example", True),  # an alias
    (f"postmaster@{BUCHER}", False),
]


async def _idn_server(tmp_path: Path, configured: str) -> RunningServer:
    config = make_config(
        tmp_path,
        local_domains=parse_domains(f"example.org,example.net,{configured}"),
        mailboxes=parse_mailboxes(
            f"alice@example.org,bob@example.org,carol@example.net,alice@{configured}"
        ),
        aliases=((f"info@{BUCHER}", f"alice@{BUCHER}"),),
    )
    return await start_server(config)


@pytest.mark.parametrize("configured", ["bücher.example", "BÜCHER.example", BUCHER])
@pytest_twisted.ensureDeferred
async def test_u_label_and_a_label_reach_one_maildir(tmp_path: Path, configured: str) -> None:
    running = await _idn_server(tmp_path, configured)
    try:
        assert running.config.local_domains[-1] == BUCHER
        utf8 = [address for address, needs in SPELLINGS if needs]
        ascii_ = [address for address, needs in SPELLINGS if not needs]
        got = await run_client(_send_each, running.port, utf8)
        got += await run_client(_send_each, running.port, ascii_, False)
    finally:
        await running.service.stopService()
    assert got == [answer(replies.RECIPIENT_OK)] * len(SPELLINGS)
    mail = running.config.mail_dir
    assert sorted(p.name for p in mail.iterdir()) == [BUCHER]  # nothing else was made
    assert len(running.messages(f"alice@{BUCHER}")) == len(SPELLINGS) - 1
    assert len(running.messages(f"postmaster@{BUCHER}")) == 1


def _raw_rcpt(port: int, lines: list[bytes]) -> list[bytes]:
    client = RawClient(port)
    try:
        client.read_reply()
        client.command(b"EHLO client.test")
        return [client.command(line) for line in lines]
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_u_label_needs_smtputf8_a_label_does_not(tmp_path: Path) -> None:
    running = await _idn_server(tmp_path, "bücher.example")
    try:
        got = await run_client(
            _raw_rcpt,
            running.port,
            [
                b"MAIL FROM:<sender@remote.test>",
                "RCPT TO:<alice@bücher.example>".encode(),
                f"RCPT TO:<alice@{BUCHER}>".encode(),
            ],
        )
    finally:
        await running.service.stopService()
    assert got[1:] == [replies.NON_ASCII_ADDRESS.format(), replies.RECIPIENT_OK.format()]


# --- compatibility spellings never reach the ASCII mailbox --------------------------------------

LOOK_ALIKES = [
    ("\u212aelly@example.org", replies.MAILBOX_NAME_REFUSED),  # KELVIN SIGN
    ("\uff4belly@example.org", replies.MAILBOX_NAME_REFUSED),  # fullwidth k
    ("\uff2b\uff25\uff2c\uff2c\uff39@example.org", replies.MAILBOX_NAME_REFUSED),  # fullwidth KELLY
    ("\U0001d424elly@example.org", replies.MAILBOX_NAME_REFUSED),  # mathematical bold k
    ("ke\u00adlly@example.org", replies.MAILBOX_NAME_REFUSED),  # soft hyphen
    ("kel\u200bly@example.org", replies.MAILBOX_NAME_REFUSED),  # zero width space
    ("\ufb01nance@example.org", replies.MAILBOX_NAME_REFUSED),  # fi ligature
    ("\uff26\uff29nance@example.org", replies.MAILBOX_NAME_REFUSED),  # fullwidth FI
    ("kelly@\uff45xample.org", replies.RELAY_DENIED),  # fullwidth e in the domain
    ("kelly@example\u3002org", replies.RELAY_DENIED),  # ideographic full stop
]


@pytest_twisted.ensureDeferred
async def test_compatibility_spellings_do_not_reach_an_ascii_mailbox(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        mailboxes=parse_mailboxes(
            "alice@example.org,bob@example.org,carol@example.net,kelly@example.org,"
            "finance@example.org"
        ),
    )
    running = await start_server(config)
    try:
        got = await run_client(_send_each, running.port, [a for a, _ in LOOK_ALIKES])
        control = await run_client(_send_each, running.port, ["Kelly@example.org"], False)
    finally:
        await running.service.stopService()
    assert got == [answer(reply) for _, reply in LOOK_ALIKES]
    assert control == [answer(replies.RECIPIENT_OK)]
    assert len(running.messages("kelly@example.org")) == 1  # the control message only
    assert running.messages("finance@example.org") == []
    assert sorted(p.name for p in (config.mail_dir / "example.org").iterdir()) == ["kelly"]


# --- UTF-8 accounts made with `mailsrv users`, both databases -----------------------------------

JORG = f"jörg@{BUCHER}"


def _make_accounts(cli: Cli) -> None:
    out = cli.ok("users", "add", "Jörg@Bücher.example", "--password-stdin", stdin=PASSWORD + "\n")
    assert one_line(out) == f"user {JORG} added"
    out = cli.ok("users", "alias", "add", "Info@BÜCHER.example", nfd("jörg@bücher.example"))
    assert one_line(out) == f"alias info@{BUCHER} -> {JORG} added"
    cli.ok("users", "add", "kelly@example.org", "--password-stdin", stdin=PASSWORD + "\n")


CLI_REFUSALS = [
    (
        ("users", "add", "\u212aelly@example.org", "--password-stdin"),
        "invalid address '\u212aelly@example.org' (U+212A KELVIN SIGN would fold to ASCII)",
    ),
    (
        ("users", "alias", "add", "\uff4belly@example.org", "kelly@example.org"),
        "invalid address '\uff4belly@example.org'"
        " (U+FF4B FULLWIDTH LATIN SMALL LETTER K would fold to ASCII)",
    ),
    (
        ("users", "add", "jörg½@bücher.example", "--password-stdin"),
        "invalid address 'jörg½@bücher.example'"
        " (compatibility character U+00BD VULGAR FRACTION ONE HALF)",
    ),
    (
        ("users", "add", nfd("JÖRG@bücher.example"), "--password-stdin"),
        f"user {JORG} already exists",
    ),
    (("users", "add", "INFO@bücher.example", "--password-stdin"), f"info@{BUCHER} is already"),
]


def test_cli_accepts_utf8_addresses_in_canonical_form(cli: Cli) -> None:
    _make_accounts(cli)
    assert [row[0] for row in cli.rows()] == [JORG, "kelly@example.org"]
    assert unicodedata.is_normalized("NFC", cli.rows()[0][0])
    shown = cli.ok("users", "show", nfd("JÖRG@bücher.example"))
    assert f"login:       {JORG} (jörg@bücher.example)\n" in shown
    assert f"aliases:     info@{BUCHER}\n" in shown
    assert cli.ok("users", "alias", "list") == f"info@{BUCHER}\t{JORG}\n"
    for args, message in CLI_REFUSALS:
        result = cli(*args, stdin=PASSWORD + "\n")
        assert result.code == 1
        assert one_line(result.err).startswith(f"mailsrv: {message}"), result.err
    assert [row[0] for row in cli.rows()] == [JORG, "kelly@example.org"]


def _deliver_and_log_in(port: int, submission: int, context: Any) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    facts["rcpt"] = _send_each(
        port,
        [
            "jörg@bücher.example",
            nfd("Jörg@Bücher.example"),
            f"JÖRG@{BUCHER}",
            "info@bücher.example",
            "\u212aelly@example.org",
            "\uff4belly@example.org",
        ],
    )
    facts["auth"] = [
        _plain(submission, context, login, PASSWORD)
        for login in (
            "jörg@bücher.example",
            f"JÖRG@{BUCHER}",
            nfd("jörg@bücher.example"),
            "kelly@example.org",
            "\u212aelly@example.org",
            "\uff4belly@example.org",
        )
    ]
    client = tls_client(submission, context)
    try:
        login = nfd("Jörg@bücher.example")
        facts["mail"] = [client.command(b"AUTH PLAIN " + _b64(f"\0{login}\0{PASSWORD}"))]
        for sender in ("info@BÜCHER.example", f"jörg@{BUCHER}", "kelly@example.org"):
            facts["mail"].append(client.command(f"MAIL FROM:<{sender}> SMTPUTF8".encode()))
            client.command(b"RSET")
    finally:
        client.close()
    return facts


def _b64(text: str) -> bytes:
    import base64

    return base64.b64encode(text.encode())


@pytest_twisted.ensureDeferred
async def test_utf8_accounts_receive_mail_and_log_in(cli: Cli, tmp_path: Path) -> None:
    await threads.deferToThread(_make_accounts, cli)
    store = open_user_store(load(None, cli.env), reactor)
    await store.open()
    certs = CertFiles(tmp_path / "tls")
    server = await start_auth_server(
        tmp_path, store, certs, local_domains=("example.org", "example.net", BUCHER)
    )
    try:
        facts = await run_client(
            _deliver_and_log_in, server.ports["mx"], server.ports["submission"], server.context()
        )
    finally:
        await server.running.service.stopService()
        await store.close()
    assert (
        facts["rcpt"]
        == [answer(replies.RECIPIENT_OK)] * 4 + [answer(replies.MAILBOX_NAME_REFUSED)] * 2
    )
    assert len(server.running.messages(JORG)) == 4
    assert (server.running.config.mail_dir / BUCHER / "jörg" / "new").is_dir()
    assert server.running.messages("kelly@example.org") == []
    ok, failed = replies.AUTH_OK.format(), replies.AUTH_FAILED.format()
    assert facts["auth"] == [ok, ok, ok, ok, failed, failed]
    assert facts["mail"] == [
        ok,
        replies.SENDER_OK.format(),
        replies.SENDER_OK.format(),
        replies.SENDER_NOT_OWNED.format(),
    ]
