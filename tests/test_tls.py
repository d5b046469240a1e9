"""TLS over real sockets: STARTTLS, implicit TLS, injection, state reset, reload, s_client."""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from twisted.internet import task

from mailsrv.smtp import replies
from mailsrv.tls import (
    INTERMEDIATE_TLS12_CIPHERS,
    CertificateWatcher,
    ReloadingServerTLS,
    TLSConfigError,
)
from tests.conftest import RawClient, RunningServer, make_config, run_client, start_server

HOSTNAME = "mx.example.org"


class CertFiles:
    """A CA and a server certificate for mx.example.org/127.0.0.1 written as PEM files."""

    def __init__(self, folder: Path, key_type: trustme.KeyType = trustme.KeyType.ECDSA) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.chain = folder / "chain.pem"
        self.key = folder / "key.pem"
        self.ca_file = folder / "ca.pem"
        self.key_type = key_type
        self.issue(trustme.CA(key_type=key_type))

    def issue(self, ca: trustme.CA) -> None:
        """(Re)write the server files with a certificate from ``ca``."""
        self.ca = ca
        cert = ca.issue_cert(HOSTNAME, "127.0.0.1", "localhost", key_type=self.key_type)
        self.chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        self.key.write_bytes(cert.private_key_pem.bytes())
        self.ca_file.write_bytes(ca.cert_pem.bytes())

    def client_context(self, ca: trustme.CA | None = None) -> ssl.SSLContext:
        """A verifying client context trusting ``ca`` (default: the current CA)."""
        context = ssl.create_default_context()
        (ca or self.ca).configure_trust(context)
        return context


@pytest.fixture
def certs(tmp_path: Path) -> CertFiles:
    return CertFiles(tmp_path / "tls")


@pytest_twisted.async_yield_fixture
async def tls_smtp(tmp_path: Path, certs: CertFiles) -> Any:
    config = make_config(
        tmp_path, enable_tls=True, tls_cert=str(certs.chain), tls_key=str(certs.key)
    )
    tls = ReloadingServerTLS(str(certs.chain), str(certs.key))
    running = await start_server(config, listeners=("mx", "smtps"), tls=tls)
    yield running
    await running.service.stopService()


def _ehlo_lines(client: RawClient) -> list[bytes]:
    reply = client.command(b"EHLO client.test")
    return [line[4:] for line in reply.split(b"\r\n") if line]


def _starttls(client: RawClient, context: ssl.SSLContext) -> None:
    assert client.command(b"STARTTLS").startswith(b"220 2.0.0")
    client.sock = context.wrap_socket(client.sock, server_hostname=HOSTNAME)


# --- STARTTLS ---------------------------------------------------------------------------------


def _advertisement(port: int, context: ssl.SSLContext) -> tuple[list[bytes], list[bytes]]:
    client = RawClient(port)
    try:
        client.read_reply()
        before = _ehlo_lines(client)
        _starttls(client, context)
        after = _ehlo_lines(client)
        return before, after
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_starttls_is_advertised_only_before_tls(
    tls_smtp: RunningServer, certs: CertFiles
) -> None:
    before, after = await run_client(_advertisement, tls_smtp.port, certs.client_context())
    assert b"STARTTLS" in before
    assert b"STARTTLS" not in after
    assert b"PIPELINING" in after


def _send_over_starttls(port: int, context: ssl.SSLContext) -> dict[str, Any]:
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.starttls(context=context)
        return client.sendmail("a@remote.test", ["alice@example.org"], b"Subject: tls\r\n\r\nx\r\n")


@pytest_twisted.ensureDeferred
async def test_mail_over_starttls_records_tls_in_received(
    tls_smtp: RunningServer, certs: CertFiles
) -> None:
    assert await run_client(_send_over_starttls, tls_smtp.port, certs.client_context()) == {}
    [message] = tls_smtp.messages("alice@example.org")
    header = message.split(b"\n\n", 1)[0]
    assert b"with ESMTPS id" in header
    assert b"(using TLSv1." in header


def _injection(port: int, context: ssl.SSLContext) -> tuple[bytes, bytes, bytes]:
    client = RawClient(port, timeout=5)
    try:
        client.read_reply()
        _ehlo_lines(client)
        client.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<inj@remote.test>\r\n")
        ready = client.read_reply()
        client.sock = context.wrap_socket(client.sock, server_hostname=HOSTNAME)
        client.sock.settimeout(1.0)
        try:
            unsolicited = client.sock.recv(1024)
        except TimeoutError:
            unsolicited = b""
        client.sock.settimeout(5.0)
        rcpt = client.command(b"RCPT TO:<alice@example.org>")
        return ready, unsolicited, rcpt
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_starttls_discards_pipelined_plaintext(
    tls_smtp: RunningServer, certs: CertFiles
) -> None:
    ready, unsolicited, rcpt = await run_client(_injection, tls_smtp.port, certs.client_context())
    assert ready.startswith(b"220 2.0.0")
    assert unsolicited == b""
    assert rcpt == replies.NEED_MAIL.format()


def _state_script(port: int, context: ssl.SSLContext) -> list[bytes]:
    client = RawClient(port, timeout=5)
    try:
        client.read_reply()
        out = [client.command(b"STARTTLS")]  # before EHLO
        _ehlo_lines(client)
        out.append(client.command(b"STARTTLS now"))
        out.append(client.command(b"MAIL FROM:<a@remote.test>"))
        out.append(client.command(b"STARTTLS"))  # inside a transaction
        out.append(client.command(b"RSET"))
        _starttls(client, context)
        out.append(client.command(b"MAIL FROM:<a@remote.test>"))  # EHLO needed again
        _ehlo_lines(client)
        out.append(client.command(b"STARTTLS"))  # TLS already active
        out.append(client.command(b"MAIL FROM:<a@remote.test>"))
        return out
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_starttls_sequence_rules_and_state_reset(
    tls_smtp: RunningServer, certs: CertFiles
) -> None:
    out = await run_client(_state_script, tls_smtp.port, certs.client_context())
    assert out == [
        replies.NEED_HELO.format(),
        replies.NO_ARGUMENTS.format(),
        replies.SENDER_OK.format(),
        replies.NOT_IN_TRANSACTION.format(),
        replies.RESET_OK.format(),
        replies.NEED_HELO.format(),
        replies.TLS_ALREADY_ACTIVE.format(),
        replies.SENDER_OK.format(),
    ]


@pytest_twisted.ensureDeferred
async def test_starttls_without_certificate_is_not_offered(smtp: RunningServer) -> None:
    def script(port: int) -> tuple[list[bytes], bytes]:
        client = RawClient(port)
        try:
            client.read_reply()
            lines = _ehlo_lines(client)
            return lines, client.command(b"STARTTLS")
        finally:
            client.close()

    lines, reply = await run_client(script, smtp.port)
    assert b"STARTTLS" not in lines
    assert reply == replies.NOT_IMPLEMENTED.format()


# --- implicit TLS -------------------------------------------------------------------------------


def _implicit(port: int, context: ssl.SSLContext) -> tuple[bytes, list[bytes], str]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    client = RawClient.__new__(RawClient)
    client.sock = context.wrap_socket(raw, server_hostname=HOSTNAME)
    client._buf = b""
    try:
        greeting = client.read_reply()
        lines = _ehlo_lines(client)
        version = client.sock.version() or ""
        client.command(b"QUIT")
        return greeting, lines, version
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_implicit_tls_port(tls_smtp: RunningServer, certs: CertFiles) -> None:
    greeting, lines, version = await run_client(
        _implicit, tls_smtp.ports["smtps"], certs.client_context()
    )
    assert greeting.startswith(b"220 " + HOSTNAME.encode())
    assert b"STARTTLS" not in lines
    assert version in ("TLSv1.2", "TLSv1.3")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl command not installed")
@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
@pytest_twisted.ensureDeferred
async def test_tls_below_1_2_is_refused(tls_smtp: RunningServer, version: str) -> None:
    """A client forced to TLS 1.0/1.1 (security level 0 so it may try) gets no session."""

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                *("openssl", "s_client", version, "-cipher", "DEFAULT@SECLEVEL=0"),
                *("-connect", f"127.0.0.1:{tls_smtp.ports['smtps']}"),
            ],
            input="",
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )

    result = await run_client(run)
    assert result.returncode != 0
    assert "220 " not in result.stdout


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl command not installed")
@pytest_twisted.ensureDeferred
async def test_openssl_s_client_starttls(tls_smtp: RunningServer, certs: CertFiles) -> None:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "openssl",
                "s_client",
                "-starttls",
                "smtp",
                "-connect",
                f"127.0.0.1:{tls_smtp.port}",
                "-CAfile",
                str(certs.ca_file),
                "-verify_return_error",
                "-verify_hostname",
                HOSTNAME,
                "-crlf",
                "-ign_eof",
            ],
            input="EHLO openssl.test\nQUIT\n",
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )

    result = await run_client(run)
    assert result.returncode == 0, result.stderr
    assert "Verify return code: 0 (ok)" in result.stdout
    assert "250-PIPELINING" in result.stdout or "250 PIPELINING" in result.stdout
    assert "221 2.0.0" in result.stdout


# --- certificate reload -------------------------------------------------------------------------


def _peer_issuer(port: int, context: ssl.SSLContext) -> bool:
    """True when a STARTTLS handshake verifies with ``context``."""
    client = RawClient(port, timeout=5)
    try:
        client.read_reply()
        _ehlo_lines(client)
        try:
            _starttls(client, context)
        except ssl.SSLError:
            return False
        return client.command(b"NOOP") == replies.OK.format()
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_certificate_reload_keeps_open_sessions(
    tls_smtp: RunningServer, certs: CertFiles
) -> None:
    old_ca = certs.ca
    open_session = RawClient(tls_smtp.port, timeout=5)
    try:
        await run_client(open_session.read_reply)
        await run_client(_ehlo_lines, open_session)
        await run_client(_starttls, open_session, certs.client_context())

        new_ca = trustme.CA()
        certs.issue(new_ca)
        assert tls_smtp.server.tls.reload() is True

        assert await run_client(_peer_issuer, tls_smtp.port, certs.client_context(new_ca))
        assert not await run_client(_peer_issuer, tls_smtp.port, certs.client_context(old_ca))
        # The session opened before the reload goes on, on its old certificate.
        await run_client(_ehlo_lines, open_session)
        assert await run_client(open_session.command, b"NOOP") == replies.OK.format()
    finally:
        open_session.close()


def test_broken_renewal_keeps_the_current_certificate(certs: CertFiles) -> None:
    tls = ReloadingServerTLS(str(certs.chain), str(certs.key))
    before = tls.serverConnectionForTLS(None).get_context()
    certs.chain.write_text("not a certificate")
    assert tls.reload() is False
    assert tls.serverConnectionForTLS(None).get_context() is before


def test_watcher_reloads_when_files_change(certs: CertFiles) -> None:
    clock = task.Clock()
    tls = ReloadingServerTLS(str(certs.chain), str(certs.key))
    watcher = CertificateWatcher(tls, clock, interval=30)
    watcher.startService()
    try:
        before = tls.serverConnectionForTLS(None).get_context()
        clock.advance(30)
        assert tls.serverConnectionForTLS(None).get_context() is before  # nothing changed
        certs.issue(trustme.CA(key_type=trustme.KeyType.RSA))
        clock.advance(30)
        assert tls.serverConnectionForTLS(None).get_context() is not before
    finally:
        watcher.stopService()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing-cert", "tls_cert: {chain}: no such file"),
        ("missing-key", "tls_key: {key}: no such file"),
        ("cert-is-a-directory", "tls_cert: {chain}: is a directory"),
        ("garbage-cert", "tls_cert: {chain}: not a PEM certificate chain"),
        ("garbage-key", "tls_key: {key}: not a PEM private key"),
        ("key-is-the-certificate", "tls_key: {key}: not a PEM private key"),
        ("other-key", "tls_key: {key}: does not match the certificate"),
        (
            "passphrase",
            "tls_key: {key}: the key is protected by a passphrase, which mailsrv cannot ask for;",
        ),
    ],
)
def test_bad_certificate_or_key_is_one_clear_line(
    certs: CertFiles, damage: str, message: str
) -> None:
    if damage == "missing-cert":
        certs.chain.unlink()
    elif damage == "missing-key":
        certs.key.unlink()
    elif damage == "cert-is-a-directory":
        certs.chain.unlink()
        certs.chain.mkdir()
    elif damage == "garbage-cert":
        certs.chain.write_text("garbage\n")
    elif damage == "garbage-key":
        certs.key.write_text("garbage\n")
    elif damage == "key-is-the-certificate":
        certs.key.write_bytes(certs.chain.read_bytes())
    elif damage == "passphrase":
        encrypt_key(certs.key)
    else:
        other = trustme.CA().issue_cert(HOSTNAME)
        certs.key.write_bytes(other.private_key_pem.bytes())
    with pytest.raises(TLSConfigError) as caught:
        ReloadingServerTLS(str(certs.chain), str(certs.key))
    text = str(caught.value)
    assert text.startswith(message.format(chain=certs.chain, key=certs.key))
    assert "\n" not in text


def encrypt_key(path: Path, passphrase: bytes = b"correct horse battery staple") -> None:
    """Rewrite the PEM key at ``path`` encrypted with ``passphrase`` (PKCS#8)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )
    )


def test_undecodable_file_names_load_and_show_escaped(tmp_path: Path) -> None:
    """SMTP_TLS_CERT can name a file whose bytes are not UTF-8 (Python gives surrogates)."""
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/certs-\xff\xfe"))
    certs = CertFiles(folder)
    assert "\udcff" in str(certs.chain)
    ReloadingServerTLS(str(certs.chain), str(certs.key))  # loads
    missing = str(folder / "missing.pem")
    with pytest.raises(TLSConfigError) as caught:
        ReloadingServerTLS(missing, str(certs.key))
    assert str(caught.value) == f"tls_cert: {tmp_path}/certs-\\xff\\xfe/missing.pem: no such file"


# --- the TLS profile ----------------------------------------------------------------------------


def test_context_offers_the_intermediate_suites_and_openssls_tls13(certs: CertFiles) -> None:
    connection = ReloadingServerTLS(str(certs.chain), str(certs.key)).serverConnectionForTLS(None)
    offered = connection.get_cipher_list()
    assert [c for c in offered if not c.startswith("TLS_")] == list(INTERMEDIATE_TLS12_CIPHERS)
    default = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).get_ciphers()
    tls13 = {c["name"] for c in default if c["protocol"] == "TLSv1.3"}
    assert {c for c in offered if c.startswith("TLS_")} == tls13


# TLS 1.2 suites a client may offer that the profile refuses: RSA key exchange (no forward
# secrecy), CBC or CCM modes (not AEAD, or not in the profile), other ciphers, no encryption.
REFUSED_TLS12 = [
    "AES128-SHA",
    "AES256-SHA256",
    "AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-CCM",
    "ECDHE-RSA-AES128-SHA",
    "ECDHE-RSA-AES256-SHA384",
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA384",
    "ECDHE-ECDSA-AES128-CCM",
    "DHE-RSA-AES128-SHA",
    "DHE-RSA-AES256-SHA256",
    "ECDHE-ARIA128-GCM-SHA256",
    "ECDHE-RSA-NULL-SHA",
]
ACCEPTED_TLS12 = {
    trustme.KeyType.RSA: [c for c in INTERMEDIATE_TLS12_CIPHERS if "-RSA-" in c],
    trustme.KeyType.ECDSA: [c for c in INTERMEDIATE_TLS12_CIPHERS if "-ECDSA-" in c],
}


def _handshake(port: int, context: ssl.SSLContext) -> tuple[str, str] | str:
    """(version, cipher) and a greeting over implicit TLS, or the handshake error."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        try:
            sock = context.wrap_socket(raw, server_hostname=HOSTNAME)
        except (ssl.SSLError, ConnectionError) as e:
            return f"refused: {e}"
        with sock:
            assert sock.recv(4) == b"220 "
            version, cipher = sock.version(), sock.cipher()
            assert version is not None and cipher is not None
            return version, cipher[0]
    finally:
        raw.close()


def _tls12_client(certs: CertFiles, cipher: str) -> ssl.SSLContext:
    context = certs.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(f"{cipher}:@SECLEVEL=0")  # let the client offer even weak suites
    assert cipher in {c["name"] for c in context.get_ciphers()}, f"client cannot offer {cipher}"
    return context


@pytest.mark.parametrize("key_type", [trustme.KeyType.RSA, trustme.KeyType.ECDSA], ids=str)
@pytest_twisted.ensureDeferred
async def test_tls_profile_with_a_real_client(tmp_path: Path, key_type: trustme.KeyType) -> None:
    certs = CertFiles(tmp_path / "tls", key_type)
    config = make_config(
        tmp_path, enable_tls=True, tls_cert=str(certs.chain), tls_key=str(certs.key)
    )
    tls = ReloadingServerTLS(str(certs.chain), str(certs.key))
    running = await start_server(config, listeners=("smtps",), tls=tls)
    port = running.ports["smtps"]
    try:
        for cipher in ACCEPTED_TLS12[key_type]:
            result = await run_client(_handshake, port, _tls12_client(certs, cipher))
            assert result == ("TLSv1.2", cipher), cipher
        for cipher in REFUSED_TLS12:
            result = await run_client(_handshake, port, _tls12_client(certs, cipher))
            assert isinstance(result, str) and result.startswith("refused: "), (cipher, result)
        tls13 = certs.client_context()
        tls13.minimum_version = ssl.TLSVersion.TLSv1_3
        result = await run_client(_handshake, port, tls13)
        assert isinstance(result, tuple) and result[0] == "TLSv1.3", result
    finally:
        await running.service.stopService()
