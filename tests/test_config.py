"""Configuration: precedence, the predecessor's ``SMTP_*`` variables, the example file, and one
exact, one-line error for every kind of broken configuration (library and ``mailsrv`` command).
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from mailsrv.config import SETTINGS, Config, ConfigError, describe, env_name, load

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "etc" / "mailsrv.toml"


def write(tmp_path: Path, text: str, name: str = "mailsrv.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- precedence --------------------------------------------------------------------------------

# key, TOML value in the file, env value, flag value, and the parsed value at each level.
PRECEDENCE = [
    ("port", "3025", "4025", "5025", (2525, 3025, 4025, 5025)),
    ("max_message_size", '"1M"', "2M", "3M", (10 * 2**20, 2**20, 2 * 2**20, 3 * 2**20)),
    ("enable_auth", "true", "false", "yes", (False, True, False, True)),
    (
        "local_domains",
        '["a.example"]',
        "b.example,c.example",
        "d.example",
        (("localhost",), ("a.example",), ("b.example", "c.example"), ("d.example",)),
    ),
    ("log_level", '"debug"', "warn", "error", ("info", "debug", "warn", "error")),
    ("idle_timeout", "30", "40.5", "50", (300.0, 30.0, 40.5, 50.0)),
]


@pytest.mark.parametrize(
    ("key", "in_file", "in_env", "in_flag", "expected"), PRECEDENCE, ids=[p[0] for p in PRECEDENCE]
)
def test_precedence_defaults_file_env_flags(
    tmp_path: Path, key: str, in_file: str, in_env: str, in_flag: str, expected: tuple[Any, ...]
) -> None:
    path = write(tmp_path, f"{key} = {in_file}\n")
    env = {env_name(key): in_env}
    flags = {key: in_flag}
    default, from_file, from_env, from_flag = expected
    assert getattr(load(None, {}), key) == default
    assert getattr(load(path, {}), key) == from_file
    assert getattr(load(path, env), key) == from_env
    assert getattr(load(path, env, flags), key) == from_flag
    # A flag of None means "not given": the lower levels show through.
    assert getattr(load(path, env, {key: None}), key) == from_env
    # Each level alone wins over the defaults.
    assert getattr(load(None, env), key) == from_env
    assert getattr(load(None, {}, flags), key) == from_flag


def test_config_file_from_smtp_config_and_explicit_file_wins(tmp_path: Path) -> None:
    via_env = write(tmp_path, "port = 3001\n", "env.toml")
    explicit = write(tmp_path, "port = 3002\n", "explicit.toml")
    assert load(None, {"SMTP_CONFIG": via_env}).port == 3001
    assert load(explicit, {"SMTP_CONFIG": via_env}).port == 3002
    # SMTP_CONFIG itself is not a setting, so it is not "unknown".
    assert load(None, {"SMTP_CONFIG": ""}) == Config()


def test_other_environment_variables_are_ignored() -> None:
    assert load(None, {"PATH": "/bin", "SMTPX": "1", "smtp_port": "1"}) == Config()


# --- the predecessor's variables (and a few more) ----------------------------------------------

ENV_CASES = [
    ("SMTP_HOST", "0.0.0.0", "host", "0.0.0.0"),
    ("SMTP_HOST", "127.0.0.1", "host", "127.0.0.1"),
    ("SMTP_HOST", "::", "host", "::"),
    ("SMTP_HOST", "[::1]", "host", "::1"),
    ("SMTP_HOST", "localhost", "host", "127.0.0.1"),
    ("SMTP_PORT", "25", "port", 25),
    ("SMTP_PORT", " 2500 ", "port", 2500),
    ("SMTP_PORT", "0", "port", 0),
    ("SMTP_HOSTNAME", "MX.Example.ORG.", "hostname", "mx.example.org"),
    ("SMTP_HOSTNAME", "", "hostname", ""),
    ("SMTP_MAX_CONNECTIONS", "50", "max_connections", 50),
    ("SMTP_MAX_MESSAGE_SIZE", "1048576", "max_message_size", 1048576),
    ("SMTP_MAX_MESSAGE_SIZE", "25M", "max_message_size", 25 * 2**20),
    ("SMTP_MAX_RECIPIENTS", "5", "max_recipients", 5),
    ("SMTP_ENABLE_TLS", "false", "enable_tls", False),
    ("SMTP_ENABLE_AUTH", "true", "enable_auth", True),
    ("SMTP_ENABLE_AUTH", "1", "enable_auth", True),
    ("SMTP_ENABLE_AUTH", "No", "enable_auth", False),
    ("SMTP_ENABLE_AUTH", "off", "enable_auth", False),
    ("SMTP_TLS_CERT", "/etc/ssl/mail.pem", "tls_cert", "/etc/ssl/mail.pem"),
    ("SMTP_TLS_CERT", "~/mail.pem", "tls_cert", os.path.expanduser("~/mail.pem")),
    ("SMTP_TLS_KEY", "/etc/ssl/private/mail.key", "tls_key", "/etc/ssl/private/mail.key"),
    ("SMTP_DB_PATH", "/var/lib/mailsrv/users.db", "db_path", "/var/lib/mailsrv/users.db"),
    ("SMTP_DATA_DIR", "/srv/mail", "data_dir", "/srv/mail"),
    (
        "SMTP_LOCAL_DOMAINS",
        "Example.ORG, example.net,,",
        "local_domains",
        ("example.org", "example.net"),
    ),
    ("SMTP_LOCAL_DOMAINS", "a.example,a.example", "local_domains", ("a.example",)),
    ("SMTP_SUBMISSION_PORT", "587", "submission_port", 587),
    ("SMTP_LOG_LEVEL", "DEBUG", "log_level", "debug"),
    ("SMTP_LOG_LEVEL", "critical", "log_level", "critical"),
    ("SMTP_LOG_FORMAT", "json", "log_format", "json"),
    (
        "SMTP_TRUSTED_NETWORKS",
        "10.0.0.0/8, 2001:db8::/32",
        "trusted_networks",
        (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")),
    ),
    ("SMTP_TRUSTED_NETWORKS", "", "trusted_networks", ()),
    ("SMTP_SHUTDOWN_GRACE", "0", "shutdown_grace", 0.0),
    ("SMTP_DATA_TIMEOUT", "1.5", "data_timeout", 1.5),
    (
        "SMTP_DNSBL_ZONES",
        "Zen.Example, b.example=Tag, zen.example=tag",
        "dnsbl_zones",
        (("zen.example", "tag"), ("b.example", "tag")),
    ),
    ("SMTP_DNSBL_ZONES", "", "dnsbl_zones", ()),
    ("SMTP_GREYLIST", "yes", "greylist", True),
    ("SMTP_GREYLIST_DELAY", "60", "greylist_delay", 60.0),
]


@pytest.mark.parametrize(
    ("variable", "raw", "key", "expected"), ENV_CASES, ids=[f"{c[0]}={c[1]}" for c in ENV_CASES]
)
def test_environment_variable_is_recognised_and_parsed(
    variable: str, raw: str, key: str, expected: object
) -> None:
    config = load(None, {variable: raw})
    assert getattr(config, key) == expected
    assert env_name(key) == variable


def test_enable_tls_with_certificate_and_key() -> None:
    config = load(
        None, {"SMTP_ENABLE_TLS": "yes", "SMTP_TLS_CERT": "/c.pem", "SMTP_TLS_KEY": "/k.pem"}
    )
    assert (config.enable_tls, config.tls_cert, config.tls_key) == (True, "/c.pem", "/k.pem")


def test_mailboxes_from_environment() -> None:
    config = load(
        None,
        {
            "SMTP_LOCAL_DOMAINS": "example.org",
            "SMTP_MAILBOXES": "Alice@Example.org, bob@example.org,alice@example.org",
        },
    )
    assert config.mailboxes == ("alice@example.org", "bob@example.org")


SIZES = [
    ("1024", 1024),
    ("512K", 512 * 1024),
    ("512k", 512 * 1024),
    ("10M", 10 * 2**20),
    ("10m", 10 * 2**20),
    ("2 M", 2 * 2**20),
    ("10MB", 10 * 2**20),
    ("10MiB", 10 * 2**20),
    ("1G", 2**30),
]


@pytest.mark.parametrize(("raw", "expected"), SIZES)
def test_sizes_with_suffixes(tmp_path: Path, raw: str, expected: int) -> None:
    assert load(None, {"SMTP_MAX_MESSAGE_SIZE": raw}).max_message_size == expected
    assert load(None, {}, {"max_message_size": raw}).max_message_size == expected
    path = write(tmp_path, f'max_message_size = "{raw}"\n')
    assert load(path, {}).max_message_size == expected


def test_size_as_toml_integer(tmp_path: Path) -> None:
    assert load(write(tmp_path, "max_message_size = 2048\n"), {}).max_message_size == 2048


def test_lists_comma_separated_in_env_and_arrays_in_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'local_domains = ["example.org", "Example.NET"]\n'
        'mailboxes = ["alice@example.org", "bob@example.net"]\n'
        'trusted_networks = ["192.0.2.0/24", "::1/128"]\n',
    )
    env = {
        "SMTP_LOCAL_DOMAINS": "example.org,Example.NET",
        "SMTP_MAILBOXES": "alice@example.org, bob@example.net",
        "SMTP_TRUSTED_NETWORKS": "192.0.2.0/24,::1/128",
    }
    from_file, from_env = load(path, {}), load(None, env)
    assert from_file == from_env
    assert from_file.local_domains == ("example.org", "example.net")
    assert from_file.mailboxes == ("alice@example.org", "bob@example.net")
    assert from_file.trusted_networks == (
        ipaddress.ip_network("192.0.2.0/24"),
        ipaddress.ip_network("::1/128"),
    )
    # An empty TOML array is an empty list.
    assert load(write(tmp_path, "trusted_networks = []\n", "e.toml"), {}).trusted_networks == ()


ALIAS_BASE = (
    'local_domains = ["example.org"]\nmailboxes = ["alice@example.org", "bob@example.org"]\n'
)
ALIASES = (
    ("info@example.org", "alice@example.org"),
    ("info@example.org", "bob@example.org"),
    ("sales@example.org", "bob@example.org"),
    ("abuse@example.org", "postmaster@example.org"),
)


def test_aliases_as_pairs_and_as_toml_table(tmp_path: Path) -> None:
    env = {
        "SMTP_LOCAL_DOMAINS": "example.org",
        "SMTP_MAILBOXES": "alice@example.org,bob@example.org",
        "SMTP_ALIASES": "info@example.org=alice@example.org, info@example.org=bob@example.org,"
        "sales@example.org=bob@example.org,abuse@example.org=postmaster@example.org",
    }
    assert load(None, env).aliases == ALIASES
    table = write(
        tmp_path,
        ALIAS_BASE + "[aliases]\n"
        '"info@example.org" = ["alice@example.org", "bob@example.org"]\n'
        '"sales@example.org" = "bob@example.org"\n'
        '"Abuse@Example.org" = "postmaster@example.org"\n',
        "table.toml",
    )
    assert load(table, {}).aliases == ALIASES
    pairs = write(
        tmp_path,
        ALIAS_BASE + 'aliases = ["info@example.org=alice@example.org",'
        ' "info@example.org=bob@example.org", "sales@example.org=bob@example.org",'
        ' "abuse@example.org=postmaster@example.org"]\n',
        "pairs.toml",
    )
    assert load(pairs, {}).aliases == ALIASES


# --- the example configuration -----------------------------------------------------------------

_COMMENTED_SETTING = re.compile(r"^#([a-z0-9_]+) = ", re.MULTILINE)


def test_example_config_loads_as_the_defaults() -> None:
    assert load(str(EXAMPLE), {}) == Config()


def test_example_config_shows_every_setting_and_its_variable() -> None:
    text = EXAMPLE.read_text()
    shown = set(_COMMENTED_SETTING.findall(text)) | set(re.findall(r"^#\[(\w+)\]$", text, re.M))
    missing = sorted(set(SETTINGS) - shown)
    assert not missing, f"settings missing from {EXAMPLE}: {missing}"
    assert not shown - set(SETTINGS), f"example shows unknown keys: {sorted(shown - set(SETTINGS))}"
    unnamed = sorted(env_name(key) for key in SETTINGS if env_name(key) not in text)
    assert not unnamed, f"variables not named in {EXAMPLE}: {unnamed}"


def test_example_config_uncommented_equals_the_defaults(tmp_path: Path) -> None:
    """Uncommenting every ``#key = value`` line must give valid TOML and exactly the defaults."""
    original = EXAMPLE.read_text()
    keys = _COMMENTED_SETTING.findall(original)
    text = _COMMENTED_SETTING.sub(r"\1 = ", original)
    path = write(tmp_path, text, "uncommented.toml")
    assert load(path, {}) == Config()
    # The file really sets those keys now, each once (whether all settings are shown is
    # test_example_config_shows_every_setting_and_its_variable's business).
    with open(path, "rb") as f:
        assert sorted(tomllib.load(f)) == sorted(keys)
    assert len(keys) == len(set(keys)) > 30


# --- broken configurations: one exact line each ------------------------------------------------


def _no_listeners() -> dict[str, str]:
    env = {"SMTP_PORT": "0", "SMTP_SUBMISSION_PORT": "0"}
    if "smtps_port" in SETTINGS:
        env["SMTP_SMTPS_PORT"] = "0"
    return env


# id, environment, config file text (None = no file), flags, expected message ({path} = file)
BROKEN: list[tuple[str, dict[str, str], str | None, dict[str, object], str]] = [
    (
        "unknown-env",
        {"SMTP_PROT": "2525"},
        None,
        {},
        "environment SMTP_PROT: unknown setting (did you mean SMTP_PORT?)",
    ),
    (
        "unknown-env-no-hint",
        {"SMTP_XYZZY": "1"},
        None,
        {},
        "environment SMTP_XYZZY: unknown setting",
    ),
    (
        "unknown-file-key",
        {},
        "prot = 2525\n",
        {},
        "config file {path}: prot: unknown setting (did you mean port?)",
    ),
    (
        "file-table",
        {},
        "[limits]\nmax_recipients = 5\n",
        {},
        "config file {path}: unexpected table [limits]",
    ),
    (
        "port-abc",
        {"SMTP_PORT": "abc"},
        None,
        {},
        "environment SMTP_PORT: expected an integer, got 'abc'",
    ),
    (
        "port-70000",
        {"SMTP_PORT": "70000"},
        None,
        {},
        "environment SMTP_PORT: must be between 0 and 65535, got 70000",
    ),
    (
        "port-negative",
        {"SMTP_PORT": "-1"},
        None,
        {},
        "environment SMTP_PORT: must be between 0 and 65535, got -1",
    ),
    (
        "port-flag",
        {},
        None,
        {"port": "x25"},
        "flag --port: expected an integer, got 'x25'",
    ),
    (
        "size-lots",
        {"SMTP_MAX_MESSAGE_SIZE": "lots"},
        None,
        {},
        "environment SMTP_MAX_MESSAGE_SIZE: expected a size like 10485760 or 10M, got 'lots'",
    ),
    (
        "size-too-small",
        {"SMTP_MAX_MESSAGE_SIZE": "1000"},
        None,
        {},
        "environment SMTP_MAX_MESSAGE_SIZE: must be at least 1024 bytes, got 1000",
    ),
    (
        "tls-maybe",
        {"SMTP_ENABLE_TLS": "maybe"},
        None,
        {},
        "environment SMTP_ENABLE_TLS: expected true or false, got 'maybe'",
    ),
    (
        "tls-without-cert",
        {"SMTP_ENABLE_TLS": "true"},
        None,
        {},
        "environment SMTP_ENABLE_TLS: TLS is on but tls_cert or tls_key is not set",
    ),
    (
        "tls-without-key-file",
        {"SMTP_TLS_CERT": "/etc/ssl/mail.pem"},
        "enable_tls = true\n",
        {},
        "config file {path}: enable_tls: TLS is on but tls_cert or tls_key is not set",
    ),
    (
        "host-not-ip",
        {"SMTP_HOST": "not-an-ip"},
        None,
        {},
        "environment SMTP_HOST: expected an IP address such as :: or 0.0.0.0, got 'not-an-ip'",
    ),
    (
        "bad-domain",
        {"SMTP_LOCAL_DOMAINS": "example.org,bad_domain!"},
        None,
        {},
        "environment SMTP_LOCAL_DOMAINS: invalid domain 'bad_domain!'",
    ),
    (
        "bad-hostname",
        {"SMTP_HOSTNAME": "mx..example.org"},
        None,
        {},
        "environment SMTP_HOSTNAME: invalid domain 'mx..example.org'",
    ),
    (
        "mailbox-not-local",
        {"SMTP_MAILBOXES": "alice@other.test"},
        None,
        {},
        "environment SMTP_MAILBOXES: alice@other.test is not in a local domain"
        " (local_domains: localhost)",
    ),
    (
        "mailbox-no-at",
        {"SMTP_MAILBOXES": "no-at-sign"},
        None,
        {},
        "environment SMTP_MAILBOXES: invalid mailbox address 'no-at-sign'",
    ),
    (
        "mailbox-path",
        {"SMTP_MAILBOXES": "../etc@localhost"},
        None,
        {},
        "environment SMTP_MAILBOXES: invalid mailbox address '../etc@localhost'",
    ),
    (
        "alias-target-not-mailbox",
        {
            "SMTP_LOCAL_DOMAINS": "example.org",
            "SMTP_MAILBOXES": "alice@example.org",
            "SMTP_ALIASES": "info@example.org=bob@example.org",
        },
        None,
        {},
        "environment SMTP_ALIASES: target bob@example.org of info@example.org is not in mailboxes",
    ),
    (
        "alias-target-not-mailbox-file",
        {},
        'local_domains = ["example.org"]\n[aliases]\n"info@example.org" = "bob@example.org"\n',
        {},
        "config file {path}: aliases: target bob@example.org of info@example.org"
        " is not in mailboxes",
    ),
    (
        "alias-not-local",
        {"SMTP_ALIASES": "info@other.test=postmaster@localhost"},
        None,
        {},
        "environment SMTP_ALIASES: info@other.test is not in a local domain"
        " (local_domains: localhost)",
    ),
    (
        "alias-no-equals",
        {"SMTP_ALIASES": "info@localhost"},
        None,
        {},
        "environment SMTP_ALIASES: expected alias=target, got 'info@localhost'",
    ),
    (
        "network-33",
        {"SMTP_TRUSTED_NETWORKS": "127.0.0.0/8,10.0.0.0/33"},
        None,
        {},
        "environment SMTP_TRUSTED_NETWORKS: invalid network '10.0.0.0/33'",
    ),
    (
        "log-level-loud",
        {"SMTP_LOG_LEVEL": "loud"},
        None,
        {},
        "environment SMTP_LOG_LEVEL: expected one of debug, info, warn, error, critical,"
        " got 'loud'",
    ),
    (
        "log-format",
        {"SMTP_LOG_FORMAT": "xml"},
        None,
        {},
        "environment SMTP_LOG_FORMAT: expected one of text, json, got 'xml'",
    ),
    (
        "port-equals-submission",
        {"SMTP_SUBMISSION_PORT": "2525"},
        None,
        {},
        "port, submission_port and smtps_port must differ (0 turns one off)"
        if "smtps_port" in SETTINGS
        else "port and submission_port must differ (use 0 to turn one off)",
    ),
    (
        "both-ports-zero",
        _no_listeners(),
        None,
        {},
        "port and submission_port are both 0: nothing to listen on",
    ),
    (
        "invalid-toml",
        {},
        "port = \n",
        {},
        "config file {path}: invalid TOML: Invalid value (at line 1, column 8)",
    ),
    (
        "invalid-toml-duplicate",
        {},
        "port = 1\nport = 2\n",
        {},
        "config file {path}: invalid TOML: Cannot overwrite a value (at line 2, column 9)",
    ),
    (
        "file-port-bool",
        {},
        "port = true\n",
        {},
        "config file {path}: port: expected an integer, got a boolean",
    ),
    (
        "file-port-float",
        {},
        "port = 25.5\n",
        {},
        "config file {path}: port: expected an integer, got '25.5'",
    ),
    (
        "file-domains-int",
        {},
        "local_domains = 5\n",
        {},
        "config file {path}: local_domains: expected a list or a comma-separated string, got int",
    ),
    (
        "file-domains-list-of-int",
        {},
        "local_domains = [5]\n",
        {},
        "config file {path}: local_domains: expected a list of strings",
    ),
    (
        "file-host-array",
        {},
        'host = ["::"]\n',
        {},
        "config file {path}: host: expected a string, got list",
    ),
    (
        "file-tls-string",
        {},
        'enable_tls = "maybe"\n',
        {},
        "config file {path}: enable_tls: expected true or false, got 'maybe'",
    ),
    (
        "idle-timeout-zero",
        {"SMTP_IDLE_TIMEOUT": "0"},
        None,
        {},
        "environment SMTP_IDLE_TIMEOUT: must be a finite number of at least 1.0, got 0.0",
    ),
    (
        "idle-timeout-negative",
        {"SMTP_IDLE_TIMEOUT": "-5"},
        None,
        {},
        "environment SMTP_IDLE_TIMEOUT: must be a finite number of at least 1.0, got -5.0",
    ),
    (
        "shutdown-grace-negative",
        {"SMTP_SHUTDOWN_GRACE": "-1"},
        None,
        {},
        "environment SMTP_SHUTDOWN_GRACE: must be a finite number of at least 0.0, got -1.0",
    ),
    (
        "data-timeout-nan",
        {"SMTP_DATA_TIMEOUT": "nan"},
        None,
        {},
        "environment SMTP_DATA_TIMEOUT: must be a finite number of at least 1.0, got nan",
    ),
    (
        "data-timeout-inf",
        {"SMTP_DATA_TIMEOUT": "inf"},
        None,
        {},
        "environment SMTP_DATA_TIMEOUT: must be a finite number of at least 1.0, got inf",
    ),
    (
        "data-timeout-word",
        {"SMTP_DATA_TIMEOUT": "ten"},
        None,
        {},
        "environment SMTP_DATA_TIMEOUT: expected a number of seconds, got 'ten'",
    ),
    (
        "local-domains-empty",
        {"SMTP_LOCAL_DOMAINS": ""},
        None,
        {},
        "environment SMTP_LOCAL_DOMAINS: empty: at least one local domain is needed",
    ),
    (
        "local-domains-empty-file",
        {},
        "local_domains = []\n",
        {},
        "config file {path}: local_domains: empty: at least one local domain is needed",
    ),
    (
        "argon2-memory-per-lane",
        {"SMTP_ARGON2_MEMORY_KIB": "31"},
        None,
        {},
        "environment SMTP_ARGON2_MEMORY_KIB: must be at least 8 KiB per lane"
        " (32 for argon2_parallelism 4), got 31",
    ),
    (
        "argon2-lanes-flag",
        {"SMTP_ARGON2_MEMORY_KIB": "256"},
        None,
        {"argon2_parallelism": "64"},
        "environment SMTP_ARGON2_MEMORY_KIB: must be at least 8 KiB per lane"
        " (512 for argon2_parallelism 64), got 256",
    ),
    (
        "mail-line-shorter-than-line",
        {"SMTP_MAX_LINE_LENGTH": "4096"},
        None,
        {},
        "max_mail_line_length: must be at least max_line_length (4096)",
    ),
    (
        "dnsbl-unknown-action",
        {"SMTP_DNSBL_ZONES": "zen.example=drop"},
        None,
        {},
        "environment SMTP_DNSBL_ZONES: 'zen.example=drop': the action is refuse or tag, got 'drop'",
    ),
    (
        "dnsbl-bad-zone",
        {"SMTP_DNSBL_ZONES": "bad zone!"},
        None,
        {},
        "environment SMTP_DNSBL_ZONES: invalid domain 'bad zone!'",
    ),
    (
        "dnsbl-no-zone",
        {"SMTP_DNSBL_ZONES": "=tag"},
        None,
        {},
        "environment SMTP_DNSBL_ZONES: invalid domain ''",
    ),
    (
        "dnsbl-timeout-zero",
        {"SMTP_DNSBL_TIMEOUT": "0"},
        None,
        {},
        "environment SMTP_DNSBL_TIMEOUT: must be a finite number of at least 0.1, got 0.0",
    ),
    (
        "greylist-not-a-boolean",
        {"SMTP_GREYLIST": "maybe"},
        None,
        {},
        "environment SMTP_GREYLIST: expected true or false, got 'maybe'",
    ),
    (
        "greylist-expiry-before-delay",
        {"SMTP_GREYLIST_DELAY": "3600", "SMTP_GREYLIST_EXPIRY": "600"},
        None,
        {},
        "environment SMTP_GREYLIST_EXPIRY: must be longer than greylist_delay (3600 s), or no"
        " retry could pass",
    ),
]


@pytest.mark.parametrize(
    ("environ", "file_text", "flags", "expected"),
    [case[1:] for case in BROKEN],
    ids=[case[0] for case in BROKEN],
)
def test_broken_config_has_one_exact_line(
    tmp_path: Path,
    environ: dict[str, str],
    file_text: str | None,
    flags: dict[str, object],
    expected: str,
) -> None:
    path = write(tmp_path, file_text) if file_text is not None else None
    with pytest.raises(ConfigError) as caught:
        load(path, environ, flags)
    message = str(caught.value)
    assert message == expected.format(path=path)
    assert "\n" not in message


def test_missing_config_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as caught:
        load(path, {})
    assert str(caught.value) == f"config file {path}: not found"
    with pytest.raises(ConfigError) as caught:
        load(None, {"SMTP_CONFIG": path})
    assert str(caught.value) == f"config file {path}: not found"


def test_config_file_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(str(tmp_path), {})
    assert str(caught.value) == f"config file {tmp_path}: Is a directory"


def test_overridden_bad_value_is_still_an_error(tmp_path: Path) -> None:
    """Every level is parsed: a typo is reported, naming its own source, even when overridden."""
    path = write(tmp_path, "port = 2600\n")
    with pytest.raises(ConfigError) as caught:
        load(path, {"SMTP_PORT": "x"}, {"port": "2700"})
    assert str(caught.value) == "environment SMTP_PORT: expected an integer, got 'x'"


# --- the mailsrv check-config command, end to end ----------------------------------------------

MAILSRV = os.path.join(os.path.dirname(sys.executable), "mailsrv")


def run_mailsrv(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SMTP_")}
    clean["PYTHONPATH"] = str(REPO)
    clean.update(env or {})
    return subprocess.run(
        [MAILSRV, *args],
        env=clean,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_defaults(tmp_path: Path) -> None:
    result = run_mailsrv(tmp_path, "check-config")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "SMTP_PORT=2525" in lines
    assert "SMTP_SUBMISSION_PORT=2587" in lines
    assert "SMTP_LOCAL_DOMAINS=localhost" in lines
    assert "SMTP_TRUSTED_NETWORKS=127.0.0.0/8,::1/128" in lines
    assert {line.partition("=")[0] for line in lines} == {env_name(key) for key in SETTINGS}
    assert result.stderr == "configuration OK\n"


def test_check_config_quiet(tmp_path: Path) -> None:
    result = run_mailsrv(tmp_path, "check-config", "-q")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_check_config_broken_env_is_one_line(tmp_path: Path) -> None:
    result = run_mailsrv(tmp_path, "check-config", env={"SMTP_PORT": "abc"})
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "mailsrv: environment SMTP_PORT: expected an integer, got 'abc'\n"
    assert "Traceback" not in result.stderr


def test_check_config_unknown_env_is_one_line(tmp_path: Path) -> None:
    result = run_mailsrv(tmp_path, "check-config", env={"SMTP_PROT": "2525"})
    assert result.returncode == 2
    assert result.stderr == (
        "mailsrv: environment SMTP_PROT: unknown setting (did you mean SMTP_PORT?)\n"
    )


def test_check_config_with_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'port = 3025\nlocal_domains = ["example.org"]\nmailboxes = ["alice@example.org"]\n'
        '[aliases]\n"info@example.org" = "alice@example.org"\n',
    )
    for args, env in (
        (("--config", path, "check-config"), {}),
        (("-c", path, "check-config"), {}),
        (("check-config",), {"SMTP_CONFIG": path}),
    ):
        result = run_mailsrv(tmp_path, *args, env=env)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert "SMTP_PORT=3025" in lines
        assert "SMTP_LOCAL_DOMAINS=example.org" in lines
        assert "SMTP_MAILBOXES=alice@example.org" in lines
        assert "SMTP_ALIASES=info@example.org=alice@example.org" in lines
    # The environment overrides the file.
    result = run_mailsrv(tmp_path, "--config", path, "check-config", env={"SMTP_PORT": "3026"})
    assert "SMTP_PORT=3026" in result.stdout.splitlines()


def test_check_config_with_broken_or_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, "port = true\n")
    result = run_mailsrv(tmp_path, "--config", path, "check-config")
    assert result.returncode == 2
    assert (
        result.stderr == f"mailsrv: config file {path}: port: expected an integer, got a boolean\n"
    )
    missing = str(tmp_path / "missing.toml")
    result = run_mailsrv(tmp_path, "--config", missing, "check-config")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"mailsrv: config file {missing}: not found\n"


def test_check_config_example_file(tmp_path: Path) -> None:
    result = run_mailsrv(tmp_path, "--config", str(EXAMPLE), "check-config", "-q")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_check_config_loads_the_tls_pair(tmp_path: Path) -> None:
    import trustme

    cert = trustme.CA().issue_cert("mx.example.org")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    env = {"SMTP_ENABLE_TLS": "true", "SMTP_TLS_CERT": str(chain), "SMTP_TLS_KEY": str(key)}
    assert run_mailsrv(tmp_path, "check-config", "-q", env=env).returncode == 0
    key.write_text("not a key\n")
    result = run_mailsrv(tmp_path, "check-config", "-q", env=env)
    assert result.returncode == 2
    assert result.stderr.startswith(f"mailsrv: tls_key: {key}: not a PEM private key")
    assert result.stderr.count("\n") == 1


# --- check-config --show: values with their sources, secrets masked -----------------------------

SECRET = "s3cr3t-value-that-must-not-show"
WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
# For every secret setting: the environment that makes it valid, with the secret in it.
SECRET_CASES = {
    "relay_password": {
        "SMTP_RELAY_HOST": "smarthost.example:587",
        "SMTP_RELAY_USER": "relay-user",
        "SMTP_RELAY_PASSWORD": SECRET,
    },
    "metrics_token": {"SMTP_METRICS_TOKEN": SECRET},
    "webhook_secret": {
        "SMTP_WEBHOOK_URL": "https://hooks.example/in",
        "SMTP_WEBHOOK_SECRET": WHSEC,
    },
}


def test_every_secret_setting_has_a_masking_case() -> None:
    secrets = {key for key, spec in SETTINGS.items() if spec.metadata["secret"]}
    assert secrets == set(SECRET_CASES)


@pytest.mark.parametrize("key", sorted(SECRET_CASES))
def test_check_config_show_masks_every_secret(tmp_path: Path, key: str) -> None:
    env = SECRET_CASES[key]
    secret = env[env_name(key)]
    for args in (("check-config",), ("check-config", "--show")):
        result = run_mailsrv(tmp_path, *args, env=env)
        assert result.returncode == 0, result.stderr
        assert secret not in result.stdout + result.stderr
        line = next(x for x in result.stdout.splitlines() if x.startswith(f"{env_name(key)}="))
        assert line.startswith(f"{env_name(key)}=********")


def test_check_config_show_says_where_each_value_came_from(tmp_path: Path) -> None:
    path = write(tmp_path, 'port = 3025\nlocal_domains = ["example.org"]\n')
    result = run_mailsrv(
        tmp_path, "--config", path, "check-config", "--show", env={"SMTP_SUBMISSION_PORT": "3587"}
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"SMTP_PORT=3025  # config file {path}: port" in lines
    assert "SMTP_SUBMISSION_PORT=3587  # environment SMTP_SUBMISSION_PORT" in lines
    assert "SMTP_HOST=::  # default" in lines
    assert all("  # " in line for line in lines)
    assert {line.partition("=")[0] for line in lines} == {env_name(key) for key in SETTINGS}


def test_check_config_show_refuses_a_bad_config_with_one_line(tmp_path: Path) -> None:
    result = run_mailsrv(tmp_path, "check-config", "--show", env={"SMTP_PORT": "abc"})
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "SMTP_PORT" in result.stderr


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://mail:pw@db.example/mail", "postgresql://mail:********@db.example/mail"),
        ("postgresql://mail@db.example/mail", "postgresql://mail@db.example/mail"),
        ("postgresql://db.example/mail", "postgresql://db.example/mail"),
        ("postgresql://a:b:c@db.example/x", "postgresql://a:********@db.example/x"),
    ],
)
def test_described_urls_keep_no_password(url: str, shown: str) -> None:
    described = {key: value for key, _env, value in describe(Config(db_url=url))}
    assert described["db_url"] == shown
