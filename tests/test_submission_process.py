"""The whole product as a user meets it: ``twistd -n mailsrv`` with TLS and AUTH, accounts made
with ``mailsrv users add``, and a mail client submitting on 2587 (STARTTLS) and 2465 (TLS) with
PLAIN, LOGIN and CRAM-MD5 — on SQLite and on PostgreSQL.  Also a certificate renewal by SIGHUP.
"""

from __future__ import annotations

import os
import signal
import smtplib
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.test_process import Server, free_port, make_server, wait_for  # noqa: F401 - fixture
from tests.test_tls import CertFiles

MAILSRV = os.path.join(os.path.dirname(sys.executable), "mailsrv")
PASSWORD = "tr0ub4dor&3 horse"
CHEAP_ARGON2 = {
    "SMTP_ARGON2_TIME_COST": "1",
    "SMTP_ARGON2_MEMORY_KIB": "8",
    "SMTP_ARGON2_PARALLELISM": "1",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    if request.param == "sqlite":
        return {"SMTP_DB_PATH": str(tmp_path / "accounts.db")}
    dsn = request.getfixturevalue("pg_cluster").create_database()
    return {"SMTP_DB_URL": dsn}


def users(server: Server, *args: str, password: str | None = None) -> None:
    command = [MAILSRV, "users", *args]
    if password is not None:
        command.append("--password-stdin")
    result = subprocess.run(
        command,
        input=(password + "\n") if password is not None else None,
        env=server.env(),
        cwd=server.workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def submit(
    port: int, context: ssl.SSLContext, mechanism: str, implicit: bool, token: str
) -> tuple[int, dict[str, Any]]:
    client: smtplib.SMTP
    if implicit:
        client = smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=20)
    else:
        client = smtplib.SMTP("127.0.0.1", port, timeout=20)
        client.starttls(context=context)
    with client:
        client.ehlo("laptop.example.net")
        client.user, client.password = "alice@example.org", PASSWORD
        method: Callable[..., str] = {
            "PLAIN": client.auth_plain,
            "LOGIN": client.auth_login,
            "CRAM-MD5": client.auth_cram_md5,
        }[mechanism]
        code, _ = client.auth(mechanism, method)
        refused = client.sendmail(
            "alice@example.org",
            ["bob@example.org"],
            f"Subject: {token}\r\n\r\nsent with {mechanism}\r\n".encode(),
        )
        return code, refused


def test_users_submit_on_2587_and_2465_with_every_mechanism(
    make_server: Callable[..., Server], tmp_path: Path, store_env: dict[str, str]
) -> None:
    certs = CertFiles(tmp_path / "tls")
    smtps_port = free_port()
    server = make_server(
        SMTP_ENABLE_TLS="true",
        SMTP_TLS_CERT=str(certs.chain),
        SMTP_TLS_KEY=str(certs.key),
        SMTP_ENABLE_AUTH="true",
        SMTP_ENABLE_CRAM_MD5="true",
        SMTP_SMTPS_PORT=str(smtps_port),
        SMTP_MAILBOXES="",
        **CHEAP_ARGON2,
        **store_env,
    )
    server.start()
    users(server, "add", "alice@example.org", "--cram-md5", password=PASSWORD)
    users(server, "add", "bob@example.org", password="bobs password")
    wait_for(lambda: _can_tls(smtps_port, certs), 10, "the implicit-TLS port")

    sent = []
    for mechanism in ("PLAIN", "LOGIN", "CRAM-MD5"):
        for port, implicit in ((server.submission_port, False), (smtps_port, True)):
            token = f"{mechanism}-{port}"
            code, refused = submit(port, certs.client_context(), mechanism, implicit, token)
            assert (code, refused) == (235, {}), token
            sent.append(token)

    new = server.data_dir / "mail" / "example.org" / "bob" / "new"
    delivered = [p.read_text() for p in sorted(new.iterdir())]
    assert len(delivered) == len(sent)
    for token in sent:
        assert sum(f"Subject: {token}\n" in text for text in delivered) == 1
    assert all("with ESMTPSA id" in text for text in delivered)
    assert PASSWORD not in server.output()
    assert server.stop() in (-signal.SIGTERM, 0)


def _can_tls(port: int, certs: CertFiles) -> bool:
    try:
        with smtplib.SMTP_SSL("127.0.0.1", port, context=certs.client_context(), timeout=5):
            return True
    except (OSError, smtplib.SMTPException):
        return False


def _handshake_trusted_by(port: int, ca: trustme.CA, certs: CertFiles) -> bool:
    try:
        with smtplib.SMTP_SSL("127.0.0.1", port, context=certs.client_context(ca), timeout=5):
            return True
    except ssl.SSLError:
        return False


def test_sighup_reloads_the_certificate(make_server: Callable[..., Server], tmp_path: Path) -> None:
    certs = CertFiles(tmp_path / "tls")
    smtps_port = free_port()
    server = make_server(
        SMTP_ENABLE_TLS="true",
        SMTP_TLS_CERT=str(certs.chain),
        SMTP_TLS_KEY=str(certs.key),
        SMTP_TLS_RELOAD_INTERVAL="0",  # only SIGHUP
        SMTP_SMTPS_PORT=str(smtps_port),
    )
    server.start()
    old_ca = certs.ca
    wait_for(lambda: _can_tls(smtps_port, certs), 10, "the implicit-TLS port")
    new_ca = trustme.CA()
    certs.issue(new_ca)
    assert _handshake_trusted_by(smtps_port, old_ca, certs)  # no reload without the signal
    server.signal(signal.SIGHUP)
    wait_for(lambda: _handshake_trusted_by(smtps_port, new_ca, certs), 10, "the new certificate")
    assert "TLS certificate reloaded" in server.log()
    assert server.stop() in (-signal.SIGTERM, 0)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [("missing", "tls_cert: "), ("garbage", "not a PEM certificate chain")],
)
def test_bad_certificate_stops_the_start(
    make_server: Callable[..., Server], tmp_path: Path, damage: str, expected: str
) -> None:
    certs = CertFiles(tmp_path / "tls")
    if damage == "missing":
        certs.chain.unlink()
    else:
        certs.chain.write_text("garbage")
    server = make_server(
        SMTP_ENABLE_TLS="true", SMTP_TLS_CERT=str(certs.chain), SMTP_TLS_KEY=str(certs.key)
    )
    with pytest.raises(AssertionError, match="twistd exited"):
        server.start(attempts=1)
    output = server.output()
    assert expected in output
    assert "Traceback" not in output
    assert server.process is not None and server.process.returncode != 0
