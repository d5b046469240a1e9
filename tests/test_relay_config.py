"""The relay settings: host:port parsing, DNS server lists, and the password kept secret."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailsrv.config import ConfigError, load, split_host_port

REPO = Path(__file__).resolve().parent.parent
MAILSRV = str(Path(sys.executable).parent / "mailsrv")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", ""),
        ("smtp.example.net", "smtp.example.net:25"),
        ("Smtp.Example.NET:587", "smtp.example.net:587"),
        ("127.0.0.1:2525", "127.0.0.1:2525"),
        ("[::1]:2525", "[::1]:2525"),
        ("::1", "[::1]:25"),
    ],
)
def test_relay_host(raw: str, expected: str) -> None:
    assert load(None, {"SMTP_RELAY_HOST": raw}).relay_host == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("host:0", "environment SMTP_RELAY_HOST: bad port in 'host:0'"),
        ("host:99999", "environment SMTP_RELAY_HOST: bad port in 'host:99999'"),
        ("host:x", "environment SMTP_RELAY_HOST: bad port in 'host:x'"),
        (":25", "environment SMTP_RELAY_HOST: expected host:port, got ':25'"),
        ("[::1", "environment SMTP_RELAY_HOST: expected [address]:port, got '[::1'"),
        ("bad_host:25", "environment SMTP_RELAY_HOST: invalid domain 'bad_host'"),
    ],
)
def test_bad_relay_host(raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(None, {"SMTP_RELAY_HOST": raw})
    assert str(caught.value) == message


def test_dns_servers() -> None:
    config = load(None, {"SMTP_DNS_SERVERS": "127.0.0.1:5353, ::1"})
    assert config.dns_servers == ("127.0.0.1:5353", "[::1]:53")
    assert [split_host_port(s, 53) for s in config.dns_servers] == [
        ("127.0.0.1", 5353),
        ("::1", 53),
    ]
    assert load(None, {}).dns_servers == ()


def test_dns_servers_must_be_addresses() -> None:
    with pytest.raises(ConfigError) as caught:
        load(None, {"SMTP_DNS_SERVERS": "ns.example.net:53"})
    assert str(caught.value) == (
        "environment SMTP_DNS_SERVERS: a DNS server must be an IP address, got 'ns.example.net'"
    )


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("SMTP_RELAY_TLS", "ssl", "expected one of starttls, implicit, none, got 'ssl'"),
        ("SMTP_RELAY_MX_TLS", "dane", "expected one of may, encrypt, verify, got 'dane'"),
        ("SMTP_RELAY_MX_PORT", "0", "must be between 1 and 65535, got 0"),
        ("SMTP_RELAY_MIN_BACKOFF", "soon", "expected a number of seconds, got 'soon'"),
        ("SMTP_RELAY_RECIPIENTS_PER_TRANSACTION", "0", "must be between 1 and 100000, got 0"),
    ],
)
def test_bad_relay_values(name: str, raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(None, {name: raw})
    assert str(caught.value) == f"environment {name}: {message}"


def test_rfc5321_timeouts_and_postfix_retry_defaults() -> None:
    config = load(None, {})
    assert (
        config.relay_greeting_timeout,
        config.relay_mail_timeout,
        config.relay_rcpt_timeout,
        config.relay_data_timeout,
        config.relay_data_block_timeout,
        config.relay_data_done_timeout,
    ) == (300.0, 300.0, 300.0, 120.0, 180.0, 600.0)
    assert (config.relay_min_backoff, config.relay_max_backoff) == (300.0, 4000.0)
    assert config.relay_queue_lifetime == 5 * 86400
    assert config.relay_recipients_per_transaction == 50


def test_password_is_not_in_the_repr() -> None:
    config = load(None, {"SMTP_RELAY_PASSWORD": "s3cret-Passw0rd"})
    assert config.relay_password == "s3cret-Passw0rd"
    assert "s3cret-Passw0rd" not in repr(config)


def test_check_config_masks_the_password(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTP_")}
    env.update(PYTHONPATH=str(REPO), SMTP_RELAY_PASSWORD="s3cret-Passw0rd", SMTP_RELAY_USER="u")
    result = subprocess.run(
        [MAILSRV, "check-config"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "s3cret-Passw0rd" not in result.stdout + result.stderr
    assert "SMTP_RELAY_PASSWORD=********" in result.stdout.splitlines()
    assert "SMTP_RELAY_USER=u" in result.stdout.splitlines()
