"""Webhook endpoints: the model, the [[webhooks]] tables, the environment pair, and the errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailsrv.config import Config, ConfigError, load
from mailsrv.webhook.endpoints import (
    EVENT_TYPES,
    Endpoint,
    EndpointError,
    env_endpoint,
    parse_endpoints,
    parse_table,
    parse_tables,
)
from mailsrv.webhook.retry import DEFAULT_SCHEDULE, RetrySchedule
from mailsrv.webhook.signing import generate_secret
from tests.test_config import run_mailsrv

SECRET = generate_secret()
OTHER = generate_secret(64)


@pytest.fixture
def ca_file(tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    path.write_bytes(trustme.CA().cert_pem.bytes() + trustme.CA().cert_pem.bytes())
    return str(path)


def table(**fields: Any) -> dict[str, Any]:
    return {"name": "crm", "url": "https://crm.example.org/hooks", "secrets": [SECRET], **fields}


def test_defaults() -> None:
    endpoint = parse_table(table())
    assert endpoint == Endpoint(name="crm", url="https://crm.example.org/hooks", secrets=(SECRET,))
    assert endpoint.events == EVENT_TYPES
    assert endpoint.timeout == 15.0
    assert endpoint.ca_file is None
    assert endpoint.include_raw is False
    assert endpoint.max_raw_size == 10 * 1024 * 1024
    assert endpoint.concurrency == 8
    assert endpoint.retry is DEFAULT_SCHEDULE
    assert all(endpoint.wants(kind) for kind in EVENT_TYPES)


def test_every_field(ca_file: str) -> None:
    endpoint = parse_table(
        table(
            secrets=[SECRET, OTHER],
            events=["message.received", "message.bounced"],
            timeout=2.5,
            ca_file=ca_file,
            include_raw=True,
            max_raw_size="1M",
            concurrency=2,
            retry_schedule=[0, 1, 60],
        )
    )
    assert endpoint.secrets == (SECRET, OTHER)
    assert endpoint.events == {"message.received", "message.bounced"}
    assert endpoint.wants("message.received") and not endpoint.wants("message.queued")
    assert (endpoint.timeout, endpoint.ca_file, endpoint.include_raw) == (2.5, ca_file, True)
    assert (endpoint.max_raw_size, endpoint.concurrency) == (1024 * 1024, 2)
    assert endpoint.retry == RetrySchedule(delays=(0.0, 1.0, 60.0))


def test_secrets_never_in_repr_or_str() -> None:
    endpoint = parse_table(table(secrets=[SECRET, OTHER]))
    for text in (repr(endpoint), str(endpoint)):
        assert SECRET not in text and OTHER not in text
        assert SECRET[6:] not in text
    assert str(endpoint) == "crm=https://crm.example.org/hooks"


# name, table fields (overriding the valid ones; None removes the key), expected message
C = 'endpoint "crm": '
KNOWN = "message.bounced, message.deferred, message.delivered, message.queued, message.received)"

BAD_TABLES: list[tuple[str, dict[str, Any], str]] = [
    (
        "unknown-key",
        {"secret": SECRET},
        C + "unknown key 'secret' (did you mean secrets?)",
    ),
    ("no-name", {"name": None}, "endpoint #1: name: missing"),
    (
        "bad-name",
        {"name": "a b"},
        "endpoint #1: name: expected 1-64 letters, digits, '.', '_' or '-', got 'a b'",
    ),
    (
        "name-not-text",
        {"name": 3},
        "endpoint #1: name: expected 1-64 letters, digits, '.', '_' or '-', got 3",
    ),
    ("no-url", {"url": None}, C + "url: missing"),
    ("no-secrets", {"secrets": None}, C + "secrets: missing"),
    (
        "ftp",
        {"url": "ftp://x.example/"},
        C + "url: expected an http:// or https:// URL, got 'ftp://x.example/'",
    ),
    (
        "relative",
        {"url": "/hooks"},
        C + "url: expected an http:// or https:// URL, got '/hooks'",
    ),
    ("no-host", {"url": "https:///x"}, C + "url: the URL has no host: 'https:///x'"),
    (
        "bad-port",
        {"url": "http://x.example:99999/"},
        C + "url: not a valid URL: 'http://x.example:99999/'",
    ),
    (
        "credentials",
        {"url": "https://u:p@x.example/"},
        C + "url: credentials in the URL are not allowed (requests are signed instead)",
    ),
    (
        "fragment",
        {"url": "https://x.example/#a"},
        C + "url: a URL fragment is not allowed: 'https://x.example/#a'",
    ),
    (
        "space",
        {"url": "https://x.example/a b"},
        C + "url: spaces, control and non-ASCII characters are not allowed (use %-escapes)",
    ),
    ("url-not-text", {"url": 5}, C + "url: expected a URL string, got int"),
    (
        "secret-prefix",
        {"secrets": ["abc"]},
        C + "secrets: secret 1: expected a secret starting with whsec_",
    ),
    (
        "secret-base64",
        {"secrets": [SECRET, "whsec_!!!!"]},
        C + "secrets: secret 2: expected base64 after whsec_",
    ),
    (
        "secret-short",
        {"secrets": ["whsec_" + "QUFB" * 4]},
        C + "secrets: secret 1: the secret decodes to 12 bytes; expected 24 to 64",
    ),
    (
        "secrets-empty",
        {"secrets": []},
        C + "secrets: at least one whsec_ secret is needed",
    ),
    (
        "secrets-type",
        {"secrets": [1]},
        C + "secrets: expected a list of whsec_ secrets",
    ),
    (
        "event-typo",
        {"events": ["message.recieved"]},
        C
        + "events: unknown event type 'message.recieved' (did you mean message.received?) (known: "
        + KNOWN,
    ),
    (
        "events-empty",
        {"events": []},
        C + "events: an empty list would send nothing; leave events out for all of them",
    ),
    (
        "events-type",
        {"events": "message.received"},
        C + "events: expected a list of event types",
    ),
    (
        "timeout-zero",
        {"timeout": 0},
        C + "timeout: must be more than 0 and at most 300 seconds, got 0.0",
    ),
    (
        "timeout-long",
        {"timeout": 301},
        C + "timeout: must be more than 0 and at most 300 seconds, got 301.0",
    ),
    (
        "timeout-text",
        {"timeout": "soon"},
        C + "timeout: expected a number of seconds, got 'soon'",
    ),
    (
        "include-raw",
        {"include_raw": "maybe"},
        C + "include_raw: expected true or false, got 'maybe'",
    ),
    (
        "raw-size",
        {"max_raw_size": "big"},
        C + "max_raw_size: expected a size like 10485760 or 10M, got 'big'",
    ),
    (
        "concurrency",
        {"concurrency": 0},
        C + "concurrency: must be between 1 and 256, got 0",
    ),
    (
        "schedule-type",
        {"retry_schedule": 5},
        C + "retry_schedule: expected a list of delays in seconds, e.g. [0, 5, 300]",
    ),
    (
        "schedule-empty",
        {"retry_schedule": []},
        C + "retry_schedule: expected 1 to 100 delays",
    ),
    (
        "schedule-negative",
        {"retry_schedule": [0, -5]},
        C + "retry_schedule: delay 2: must be a finite number of at least 0.0, got -5.0",
    ),
    (
        "ca-http",
        {"url": "http://x.example/", "ca_file": "CA"},
        C + "ca_file: only an https:// URL uses a CA bundle",
    ),
    (
        "ca-missing",
        {"ca_file": "/nonexistent/ca.pem"},
        C + "ca_file: /nonexistent/ca.pem: No such file or directory",
    ),
    (
        "ca-not-pem",
        {"ca_file": "NOTPEM"},
        C + "ca_file: NOTPEM: no PEM certificate in it",
    ),
    (
        "ca-empty",
        {"ca_file": ""},
        C + "ca_file: empty path (leave ca_file out to use the system CAs)",
    ),
]


@pytest.mark.parametrize(
    ("fields", "message"), [c[1:] for c in BAD_TABLES], ids=[c[0] for c in BAD_TABLES]
)
def test_bad_table_is_one_line_naming_endpoint_and_field(
    fields: dict[str, Any], message: str, ca_file: str, tmp_path: Path
) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    raw = table()
    for key, value in fields.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = (
                {"CA": ca_file, "NOTPEM": str(not_pem)}.get(value, value)
                if isinstance(value, str)
                else value
            )
    with pytest.raises(EndpointError) as caught:
        parse_tables([raw])
    text = str(caught.value)
    assert text == message.replace("NOTPEM", str(not_pem))
    assert "\n" not in text
    assert SECRET not in text and SECRET[6:] not in text


def test_duplicate_names_and_positions() -> None:
    with pytest.raises(EndpointError, match=r'^endpoint "crm": name: used twice$'):
        parse_tables([table(), table(url="http://other.example/")])
    with pytest.raises(EndpointError, match=r"^endpoint #2: expected a \[\[webhooks\]\] table$"):
        parse_tables([table(), "crm"])
    with pytest.raises(EndpointError, match=r"^expected \[\[webhooks\]\] tables"):
        parse_tables("crm")


def test_environment_pair() -> None:
    endpoint = env_endpoint("https://app.example/in", f"{SECRET} {OTHER}")
    assert endpoint is not None
    assert (endpoint.name, endpoint.url, endpoint.secrets) == (
        "default",
        "https://app.example/in",
        (SECRET, OTHER),
    )
    assert env_endpoint("", "") is None
    assert parse_endpoints("", "", []) == ()
    both = parse_endpoints("https://app.example/in", SECRET, [table()])
    assert [e.name for e in both] == ["default", "crm"]


ENV_CASES = [
    (
        "https://app.example/",
        "",
        "SMTP_WEBHOOK_SECRET: required with SMTP_WEBHOOK_URL (a whsec_ secret; every request is"
        " signed)",
    ),
    ("", SECRET, "SMTP_WEBHOOK_SECRET: set, but SMTP_WEBHOOK_URL is not"),
    (
        "gopher://x/",
        SECRET,
        "SMTP_WEBHOOK_URL: expected an http:// or https:// URL, got 'gopher://x/'",
    ),
    (
        "https://app.example/",
        "whsec_" + "A" * 8,
        "SMTP_WEBHOOK_SECRET: secret 1: the secret decodes to 6 bytes; expected 24 to 64",
    ),
    (
        "https://app.example/",
        f"{SECRET},nope",
        "SMTP_WEBHOOK_SECRET: secret 2: expected a secret starting with whsec_",
    ),
]


@pytest.mark.parametrize(("url", "secret", "message"), ENV_CASES)
def test_bad_environment_pair(url: str, secret: str, message: str) -> None:
    with pytest.raises(EndpointError) as caught:
        env_endpoint(url, secret)
    assert str(caught.value) == message


def test_environment_name_clashes_with_a_table() -> None:
    with pytest.raises(EndpointError) as caught:
        parse_endpoints("https://app.example/", SECRET, [table(name="default")])
    assert str(caught.value) == (
        'endpoint "default": name: used twice (the name of the SMTP_WEBHOOK_URL endpoint)'
    )


# --- through the configuration loader ------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mailsrv.toml"
    path.write_text(text)
    return str(path)


TOML = f"""
port = 2525

[[webhooks]]
name = "crm"
url = "https://crm.example.org/hooks"
secrets = ["{SECRET}"]
events = ["message.received"]

[[webhooks]]
name = "audit"
url = "http://127.0.0.1:8080/audit"
secrets = ["{SECRET}", "{OTHER}"]
retry_schedule = [0, 10]
"""


def test_config_file_tables_and_environment(tmp_path: Path) -> None:
    env = {"SMTP_WEBHOOK_URL": "https://app.example/in", "SMTP_WEBHOOK_SECRET": SECRET}
    config = load(_write(tmp_path, TOML), env)
    assert [e.name for e in config.webhooks] == ["crm", "audit"]
    assert [e.name for e in config.webhook_endpoints] == ["default", "crm", "audit"]
    assert config.webhooks[1].retry.delays == (0.0, 10.0)
    assert SECRET not in repr(config)
    assert Config().webhook_endpoints == ()


CONFIG_ERRORS = [
    (
        TOML.replace('name = "audit"', 'name = "crm"'),
        {},
        'config file {path}: webhooks: endpoint "crm": name: used twice',
    ),
    (
        TOML.replace("events =", "event ="),
        {},
        "config file {path}: webhooks: " + C + "unknown key 'event' (did you mean events?)",
    ),
    (
        "",
        {"SMTP_WEBHOOKS": "x"},
        "environment SMTP_WEBHOOKS: expected [[webhooks]] tables in the config file",
    ),
    (
        "",
        {"SMTP_WEBHOOK_URL": "https://app.example/"},
        "SMTP_WEBHOOK_SECRET: required with environment SMTP_WEBHOOK_URL (a whsec_ secret; every"
        " request is signed)",
    ),
    (
        f'webhook_url = "ftp://x/"\nwebhook_secret = "{SECRET}"\n',
        {},
        "config file {path}: webhook_url: expected an http:// or https:// URL, got 'ftp://x/'",
    ),
    (
        TOML.replace('name = "audit"', 'name = "default"'),
        {"SMTP_WEBHOOK_URL": "https://app.example/", "SMTP_WEBHOOK_SECRET": SECRET},
        'endpoint "default": name: used twice (the name of the SMTP_WEBHOOK_URL endpoint)',
    ),
]


@pytest.mark.parametrize(("text", "env", "message"), CONFIG_ERRORS)
def test_config_errors_are_one_line(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(path, env)
    assert str(caught.value) == message.format(path=path)
    assert SECRET not in str(caught.value)


def test_check_config_never_prints_the_secret(tmp_path: Path) -> None:
    env = {"SMTP_WEBHOOK_URL": "https://app.example/in", "SMTP_WEBHOOK_SECRET": f"{SECRET} {OTHER}"}
    result = run_mailsrv(tmp_path, "--config", _write(tmp_path, TOML), "check-config", env=env)
    assert result.returncode == 0, result.stderr
    everything = result.stdout + result.stderr
    assert SECRET not in everything and OTHER not in everything
    assert SECRET[6:20] not in everything and OTHER[6:20] not in everything
    lines = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert lines["SMTP_WEBHOOK_SECRET"] == "********"
    assert lines["SMTP_WEBHOOK_URL"] == "https://app.example/in"
    assert lines["SMTP_WEBHOOKS"] == (
        "crm=https://crm.example.org/hooks,audit=http://127.0.0.1:8080/audit"
    )


def test_check_config_bad_secret_is_one_line_without_it(tmp_path: Path) -> None:
    short = "whsec_" + SECRET[6:30]
    env = {"SMTP_WEBHOOK_URL": "https://app.example/in", "SMTP_WEBHOOK_SECRET": short}
    result = run_mailsrv(tmp_path, "check-config", env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "mailsrv: environment SMTP_WEBHOOK_SECRET: secret 1: the secret decodes to 18 bytes;"
        " expected 24 to 64\n"
    )


def test_names_in_errors_are_safe() -> None:
    # Endpoint names appear in file names and logs later: no path separators or quotes.
    for name in ("../x", 'a"b', "", "x" * 65, "-x"):
        with pytest.raises(EndpointError):
            parse_table(table(name=name))
    assert re.fullmatch(r"[\w.-]+", parse_table(table(name="crm.eu-1_a")).name)
