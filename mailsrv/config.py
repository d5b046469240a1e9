"""Configuration: defaults < config file < environment (``SMTP_*``) < command-line flags.

Every setting is declared once, as a field of :class:`Config` with its default, its parser and
its documentation.  The same parser reads the value whatever its source, so ``SMTP_PORT=2525``,
``port = 2525`` in the file and ``--port 2525`` mean the same thing.  The merged result is an
immutable :class:`Config` that the composition root passes explicitly to whatever needs it.

Unknown keys and bad values raise :class:`ConfigError` with one line naming the source, the key
and what is wrong.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailsrv.identity import InvalidAddress, canonical_address, canonical_domain

if TYPE_CHECKING:
    from mailsrv.webhook.endpoints import Endpoint

ENV_PREFIX = "SMTP_"
CONFIG_FILE_ENV = "SMTP_CONFIG"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A setting is unknown or has a bad value; the message is one line for the operator."""


# --- value parsers: each takes the raw value (str from env/flags, or a TOML value) ------------


def _as_text(raw: object) -> str:
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise ValueError(f"expected a string, got {type(raw).__name__}")
    return str(raw).strip()


def parse_int(minimum: int = 0, maximum: int = 2**63) -> Callable[[object], int]:
    """Integer within ``[minimum, maximum]``."""

    def parse(raw: object) -> int:
        if isinstance(raw, bool):
            raise ValueError("expected an integer, got a boolean")
        if isinstance(raw, int):
            value = raw
        else:
            text = _as_text(raw)
            if not re.fullmatch(r"[+-]?\d+", text):
                raise ValueError(f"expected an integer, got {text!r}")
            value = int(text)
        if not minimum <= value <= maximum:
            raise ValueError(f"must be between {minimum} and {maximum}, got {value}")
        return value

    return parse


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_size(minimum: int = 1) -> Callable[[object], int]:
    """A byte count; accepts a plain integer or a K/M/G suffix (powers of 1024)."""

    def parse(raw: object) -> int:
        if isinstance(raw, bool):
            raise ValueError("expected a size, got a boolean")
        if isinstance(raw, int):
            value = raw
        else:
            text = _as_text(raw)
            match = re.fullmatch(r"(\d+)\s*([KMG]?)I?B?", text.upper())
            if not match:
                raise ValueError(f"expected a size like 10485760 or 10M, got {text!r}")
            value = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
        if value < minimum:
            raise ValueError(f"must be at least {minimum} bytes, got {value}")
        return value

    return parse


def parse_seconds(minimum: float = 0.0) -> Callable[[object], float]:
    """A duration in seconds (a number; fractions allowed)."""

    def parse(raw: object) -> float:
        if isinstance(raw, bool):
            raise ValueError("expected a number of seconds, got a boolean")
        if isinstance(raw, int | float):
            value = float(raw)
        else:
            text = _as_text(raw)
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"expected a number of seconds, got {text!r}") from None
        if not value >= minimum or value != value or value == float("inf"):
            raise ValueError(f"must be a finite number of at least {minimum}, got {value}")
        return value

    return parse


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(raw: object) -> bool:
    """true/false, yes/no, on/off, 1/0."""
    if isinstance(raw, bool):
        return raw
    text = _as_text(raw).lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_str(raw: object) -> str:
    """Any text."""
    return _as_text(raw)


def parse_choice(*choices: str) -> Callable[[object], str]:
    """One of a fixed set of words (case-insensitive)."""

    def parse(raw: object) -> str:
        text = _as_text(raw).lower()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text

    return parse


def _items(raw: object) -> list[str]:
    if isinstance(raw, list | tuple):
        if not all(isinstance(item, str) for item in raw):
            raise ValueError("expected a list of strings")
        return [item.strip() for item in raw if item.strip()]
    if not isinstance(raw, str):
        raise ValueError(f"expected a list or a comma-separated string, got {type(raw).__name__}")
    return [part.strip() for part in raw.split(",") if part.strip()]


def _domain(text: str) -> str:
    try:
        return canonical_domain(text)
    except InvalidAddress as error:
        raise ValueError(f"invalid domain {text!r}" + _why(error)) from None


def _why(error: InvalidAddress) -> str:
    return f" ({error.reason})" if error.reason else ""


def parse_domains(raw: object) -> tuple[str, ...]:
    """Comma-separated domain names (canonical: lower-case, IDNs as A-labels)."""
    return tuple(dict.fromkeys(_domain(item) for item in _items(raw)))


_DNSBL_ACTIONS = ("refuse", "tag")


def parse_dnsbl_zones(raw: object) -> tuple[tuple[str, str], ...]:
    """Comma-separated ``zone`` or ``zone=refuse|tag`` items (refuse when not said)."""
    zones: dict[str, str] = {}
    for item in _items(raw):
        name, _, action = item.partition("=")
        action = action.strip().lower() or "refuse"
        if action not in _DNSBL_ACTIONS:
            raise ValueError(f"{item!r}: the action is refuse or tag, got {action!r}")
        zones[_domain(name.strip())] = action
    return tuple(zones.items())


def _mailbox(text: str) -> str:
    try:
        return canonical_address(text)
    except InvalidAddress as error:
        raise ValueError(f"invalid mailbox address {text!r}" + _why(error)) from None


def parse_mailbox(raw: object) -> str:
    """One mailbox address in canonical form (``mailsrv.identity``); ValueError if invalid."""
    return _mailbox(_as_text(raw))


def parse_mailboxes(raw: object) -> tuple[str, ...]:
    """Comma-separated mailbox addresses (canonical form, ``mailsrv.identity``)."""
    return tuple(dict.fromkeys(_mailbox(item) for item in _items(raw)))


def parse_aliases(raw: object) -> tuple[tuple[str, str], ...]:
    """Comma-separated ``alias=target`` pairs; an alias may be listed once per target."""
    if isinstance(raw, Mapping):
        pairs = [
            (str(k), str(t)) for k, v in raw.items() for t in (v if isinstance(v, list) else [v])
        ]
    else:
        pairs = []
        for item in _items(raw):
            alias, sep, target = item.partition("=")
            if not sep:
                raise ValueError(f"expected alias=target, got {item!r}")
            pairs.append((alias, target))
    return tuple(dict.fromkeys((_mailbox(a), _mailbox(t)) for a, t in pairs))


def parse_webhook_tables(raw: object) -> tuple[Endpoint, ...]:
    """``[[webhooks]]`` tables (see ``mailsrv.webhook.endpoints``); not from the environment."""
    from mailsrv.webhook.endpoints import parse_tables

    return parse_tables(raw)


def parse_networks(raw: object) -> tuple[Network, ...]:
    """Comma-separated CIDR networks (IPv4 or IPv6); empty means none."""
    networks = []
    for item in _items(raw):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"invalid network {item!r}") from None
    return tuple(networks)


def parse_host(raw: object) -> str:
    """An IP address to listen on (``::`` is every IPv4 and IPv6 address)."""
    text = _as_text(raw).strip("[]")
    if text in ("", "*"):
        return "::"
    if text == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"expected an IP address such as :: or 0.0.0.0, got {text!r}") from None


def parse_hostname(raw: object) -> str:
    """A fully qualified host name for the greeting and Received headers; empty = the FQDN."""
    text = _as_text(raw)
    return _domain(text) if text else ""


def parse_path(raw: object) -> str:
    """A filesystem path (``~`` is expanded); empty means unset."""
    text = _as_text(raw)
    return os.path.expanduser(text) if text else ""


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"``, ``"host"`` -> ``(host, port)``; ValueError if bad."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"expected [address]:port, got {text!r}")
        port_text = rest[1:]
    elif text.count(":") > 1:  # a bare IPv6 address
        host, port_text = text, ""
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"expected host:port, got {text!r}")
    if not _is_ip(host):
        host = _domain(host)
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port_text)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_relay_host(raw: object) -> str:
    """``host:port`` of a smarthost (port 25 if omitted); empty = none (deliver by MX)."""
    text = _as_text(raw)
    return _join_host_port(*split_host_port(text, 25)) if text else ""


def parse_dns_servers(raw: object) -> tuple[str, ...]:
    """Comma-separated ``address:port`` DNS servers (port 53 if omitted); empty = resolv.conf."""
    servers = [split_host_port(item, 53) for item in _items(raw)]
    for host, _port in servers:
        if not _is_ip(host):
            raise ValueError(f"a DNS server must be an IP address, got {host!r}")
    return tuple(_join_host_port(host, port) for host, port in servers)


def display_path(path: str) -> str:
    """``path`` for a message: bytes that are not UTF-8 (surrogates here) shown as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# --- the settings ------------------------------------------------------------------------------


def setting(default: Any, parse: Callable[[object], Any], doc: str, secret: bool = False) -> Any:
    """Declare one setting: its default, its parser and a one-line description.

    A ``secret`` setting is left out of the Config's repr and masked by :func:`describe`.
    """
    return field(
        default=default, repr=not secret, metadata={"parse": parse, "doc": doc, "secret": secret}
    )


@dataclass(frozen=True)
class Config:
    """The merged, validated configuration.  Immutable; pass it to what needs it."""

    host: str = setting("::", parse_host, "Address to listen on; :: is dual-stack IPv4+IPv6")
    port: int = setting(2525, parse_int(0, 65535), "MX listener port (25 in production; 0 = off)")
    submission_port: int = setting(
        2587, parse_int(0, 65535), "Submission listener port (587 in production; 0 = off)"
    )
    hostname: str = setting("", parse_hostname, "Name in the greeting; empty = this host's FQDN")
    data_dir: str = setting("./var", parse_path, "Directory for mail, spool and databases")
    local_domains: tuple[str, ...] = setting(
        ("localhost",), parse_domains, "Domains delivered here (comma-separated)"
    )
    mailboxes: tuple[str, ...] = setting(
        (), parse_mailboxes, "Local mailboxes, e.g. alice@example.org,bob@example.org"
    )
    aliases: tuple[tuple[str, str], ...] = setting(
        (), parse_aliases, "Aliases as alias=target pairs, e.g. info@example.org=alice@example.org"
    )
    trusted_networks: tuple[Network, ...] = setting(
        parse_networks("127.0.0.0/8,::1/128"),
        parse_networks,
        "Clients exempt from per-IP limits (CIDR list; empty = none)",
    )
    max_connections: int = setting(1000, parse_int(1, 1_000_000), "Concurrent sessions, in all")
    max_connections_per_ip: int = setting(
        20, parse_int(1, 1_000_000), "Concurrent sessions from one client IP"
    )
    connection_rate_per_ip: int = setting(
        120, parse_int(1, 1_000_000), "New connections per client IP per rate window"
    )
    message_rate_per_ip: int = setting(
        120, parse_int(1, 1_000_000), "Messages per client IP per rate window"
    )
    rate_window: float = setting(60.0, parse_seconds(1.0), "Sliding window for per-IP rates (s)")
    dnsbl_zones: tuple[tuple[str, str], ...] = setting(
        (),
        parse_dnsbl_zones,
        "DNS blocklists asked at connect on the MX port: zone[=refuse|tag], comma-separated",
    )
    dnsbl_timeout: float = setting(
        3.0,
        parse_seconds(0.1),
        "Longest wait for DNSBL answers before the greeting (then: not listed)",
    )
    greylist: bool = setting(
        False, parse_bool, "Greylist unknown (client network, sender, recipient) at RCPT on the MX"
    )
    greylist_delay: float = setting(
        300.0, parse_seconds(1.0), "How long a greylisted sender must wait before a retry passes"
    )
    greylist_expiry: float = setting(
        86_400.0, parse_seconds(60.0), "Time after the first attempt within which a retry passes"
    )
    greylist_lifetime: float = setting(
        36 * 86_400.0, parse_seconds(3600.0), "How long a passed triplet is remembered (renewed)"
    )
    max_message_size: int = setting(
        10 * 1024 * 1024, parse_size(1024), "Largest message accepted (bytes; K/M/G allowed)"
    )
    max_recipients: int = setting(100, parse_int(1, 100_000), "Recipients per message")
    max_errors: int = setting(
        20, parse_int(1, 10_000), "Bad commands per session before 421 and close"
    )
    max_line_length: int = setting(
        512, parse_int(512, 65536), "Longest command line (RFC 5321: 512 octets with CRLF)"
    )
    max_mail_line_length: int = setting(
        2048, parse_int(512, 65536), "Longest MAIL/RCPT line with extension parameters"
    )
    max_auth_line_length: int = setting(
        12288, parse_int(512, 65536), "Longest AUTH line (RFC 4954: 12288 octets)"
    )
    idle_timeout: float = setting(300.0, parse_seconds(1.0), "Idle time allowed between commands")
    command_timeout: float = setting(
        300.0, parse_seconds(1.0), "Time for a whole command line, from when the server is ready"
    )
    stress_threshold: int = setting(
        80, parse_int(1, 100), "Percent of max_connections in use at which stress timeouts apply"
    )
    stress_timeout: float = setting(
        10.0, parse_seconds(1.0), "Idle and command timeout under stress (Postfix: 10 s)"
    )
    data_timeout: float = setting(600.0, parse_seconds(1.0), "Total time allowed for one DATA")
    bare_line_endings: str = setting(
        "reject",
        parse_choice("reject", "normalize"),
        "Bare CR or LF in DATA: reject (554 5.6.0) or normalize to CRLF",
    )
    shutdown_grace: float = setting(
        30.0, parse_seconds(0.0), "Time sessions get to finish on SIGTERM before 421"
    )
    listen_backlog: int = setting(1024, parse_int(1, 65535), "TCP listen backlog per listener")
    io_threads: int = setting(16, parse_int(1, 256), "Threads for disk I/O (fsync, rename)")
    queue_control_socket: str = setting(
        "", parse_path, "Control socket of `mailsrv queue`; empty = <data_dir>/queue/control.sock"
    )
    enable_tls: bool = setting(False, parse_bool, "Offer STARTTLS (needs tls_cert and tls_key)")
    smtps_port: int = setting(
        2465, parse_int(0, 65535), "Implicit-TLS submission port, RFC 8314 (465; 0 = off)"
    )
    tls_cert: str = setting("", parse_path, "PEM certificate chain file")
    tls_key: str = setting("", parse_path, "PEM private key file")
    tls_reload_interval: float = setting(
        60.0,
        parse_seconds(0.0),
        "Check the cert/key files for changes this often (0 = only SIGHUP)",
    )
    enable_auth: bool = setting(False, parse_bool, "Offer SMTP AUTH (after TLS unless relaxed)")
    auth_on_mx: bool = setting(True, parse_bool, "Also offer AUTH on the MX port")
    allow_plaintext_auth: bool = setting(
        False, parse_bool, "Allow AUTH without TLS (for local tests only)"
    )
    enable_cram_md5: bool = setting(
        False, parse_bool, "Offer CRAM-MD5 (only accounts with a CRAM-MD5 secret can use it)"
    )
    auth_max_failures_per_ip: int = setting(
        10, parse_int(1, 1_000_000), "Failed AUTHs per client IP (IPv6: /64) per window, then 421"
    )
    auth_max_failures_per_account: int = setting(
        20, parse_int(1, 1_000_000), "Failed AUTHs per account per window before 454 4.7.0"
    )
    auth_failure_window: float = setting(
        900.0, parse_seconds(1.0), "Window for counting failed AUTHs (s)"
    )
    auth_max_in_flight_per_client: int = setting(
        3, parse_int(1, 10_000), "AUTHs in progress at once per client IP (IPv6: /64), then 454"
    )
    auth_hash_threads: int = setting(2, parse_int(1, 64), "Threads for password hashing")
    auth_hash_queue: int = setting(
        32, parse_int(0, 100_000), "AUTHs waiting for a hash thread before new ones get 454"
    )
    auth_throttle_max_keys: int = setting(
        50_000, parse_int(100, 10_000_000), "Clients and accounts the AUTH throttle tracks"
    )
    argon2_time_cost: int = setting(3, parse_int(1, 100), "Argon2id iterations")
    argon2_memory_kib: int = setting(65536, parse_int(8, 4_194_304), "Argon2id memory (KiB)")
    argon2_parallelism: int = setting(4, parse_int(1, 64), "Argon2id lanes")
    db_path: str = setting("", parse_path, "SQLite user database; empty = <data_dir>/mailsrv.db")
    db_url: str = setting(
        "", parse_str, "PostgreSQL DSN (postgresql://user@host/db); empty = SQLite at db_path"
    )
    queue_url: str = setting(
        "",
        parse_str,
        "PostgreSQL DSN of the relay queue shared by several nodes; empty = files in data_dir",
    )
    queue_node: str = setting(
        "", parse_str, "This node's name in the shared queue; empty = <host name>:<data_dir>"
    )
    queue_lease: float = setting(
        300.0, parse_seconds(2.0), "How long a node's claim on a queued message lasts (s)"
    )
    queue_poll: float = setting(
        5.0, parse_seconds(0.1), "How often a node looks for due work in the shared queue (s)"
    )
    queue_statement_timeout: float = setting(
        10.0, parse_seconds(0.1), "Longest statement on the shared queue's database (s)"
    )
    relay_host: str = setting(
        "", parse_relay_host, "Smarthost host:port for all outbound mail; empty = direct MX"
    )
    relay_user: str = setting("", parse_str, "User name for AUTH at the smarthost; empty = none")
    relay_password: str = setting(
        "", parse_str, "Password for AUTH at the smarthost (sent only over TLS)", secret=True
    )
    relay_tls: str = setting(
        "starttls",
        parse_choice("starttls", "implicit", "none"),
        "TLS to the smarthost: starttls (verified), implicit (verified), none",
    )
    relay_ca_file: str = setting(
        "", parse_path, "PEM CA file for verified relay TLS; empty = the system CAs"
    )
    relay_mx_tls: str = setting(
        "may",
        parse_choice("may", "encrypt", "verify"),
        "STARTTLS to MX hosts: may (opportunistic), encrypt (required), verify (verified)",
    )
    relay_mx_port: int = setting(25, parse_int(1, 65535), "Port of MX hosts (25; tests change it)")
    dns_servers: tuple[str, ...] = setting(
        (), parse_dns_servers, "DNS servers as address:port list; empty = /etc/resolv.conf"
    )
    relay_dns_timeout: float = setting(
        60.0, parse_seconds(1.0), "Time one next-hop DNS lookup may take before it is deferred"
    )
    relay_min_backoff: float = setting(
        300.0, parse_seconds(1.0), "First retry delay of a deferred recipient (s), then doubled"
    )
    relay_max_backoff: float = setting(4000.0, parse_seconds(1.0), "Longest retry delay (s)")
    relay_queue_lifetime: float = setting(
        432000.0, parse_seconds(0.0), "Time a message may stay queued before it bounces (s)"
    )
    relay_delay_warning: float = setting(
        0.0,
        parse_seconds(0.0),
        "Warn senders of mail still deferred this long after arrival (s); 0 = only NOTIFY=DELAY",
    )
    relay_recipients_per_transaction: int = setting(
        50, parse_int(1, 100_000), "Recipients per outbound transaction (more: another one)"
    )
    relay_destination_concurrency: int = setting(
        20, parse_int(1, 10_000), "Outbound connections per destination at most"
    )
    relay_concurrency: int = setting(100, parse_int(1, 100_000), "Outbound connections at most")
    relay_connect_timeout: float = setting(30.0, parse_seconds(1.0), "Outbound TCP connect (s)")
    relay_greeting_timeout: float = setting(300.0, parse_seconds(1.0), "Wait for the 220 (s)")
    relay_command_timeout: float = setting(
        300.0, parse_seconds(1.0), "Wait for EHLO/STARTTLS/AUTH/RSET/QUIT replies (s)"
    )
    relay_mail_timeout: float = setting(300.0, parse_seconds(1.0), "Wait for the MAIL reply (s)")
    relay_rcpt_timeout: float = setting(300.0, parse_seconds(1.0), "Wait for a RCPT reply (s)")
    relay_data_timeout: float = setting(120.0, parse_seconds(1.0), "Wait for the DATA 354 (s)")
    relay_data_block_timeout: float = setting(
        180.0, parse_seconds(1.0), "Longest stall while sending the body (s)"
    )
    relay_data_done_timeout: float = setting(
        600.0, parse_seconds(1.0), "Wait for the reply to the final dot (s)"
    )
    relay_connection_idle: float = setting(
        5.0, parse_seconds(0.0), "Keep an unused outbound connection open this long (s)"
    )
    relay_bounce_size_limit: int = setting(
        50000, parse_size(0), "Largest original returned whole in a DSN (RET=FULL; bytes)"
    )
    auth_checks: bool = setting(
        True, parse_bool, "Check SPF, DKIM, DMARC, ARC of MX mail; add Authentication-Results"
    )
    auth_check_timeout: float = setting(
        5.0, parse_seconds(0.1), "Time the checks of one message may take; the rest is temperror"
    )
    auth_check_threads: int = setting(
        4, parse_int(1, 256), "Threads for the checks (they mostly wait for DNS answers)"
    )
    dmarc_enforce: bool = setting(
        False, parse_bool, "Refuse DMARC p=reject failures (550 5.7.1), mark p=quarantine ones"
    )
    spf_reject_fail: bool = setting(
        False, parse_bool, "Refuse mail whose MAIL FROM fails SPF (-all), whatever DMARC says"
    )
    log_level: str = setting(
        "info", parse_choice("debug", "info", "warn", "error", "critical"), "Lowest level logged"
    )
    log_format: str = setting("text", parse_choice("text", "json"), "Log output: text or json")
    log_file: str = setting(
        "", parse_path, "Log to this file, reopened on SIGHUP (logrotate); empty = standard output"
    )
    metrics_port: int = setting(
        0, parse_int(0, 65535), "Ops HTTP port for /metrics, /healthz, /readyz (0 = off)"
    )
    metrics_host: str = setting(
        "127.0.0.1", parse_host, "Address of the ops HTTP listener (loopback by default)"
    )
    metrics_token: str = setting(
        "", parse_str, "Bearer token the ops HTTP listener requires; empty = none", secret=True
    )
    ready_min_free_bytes: int = setting(
        100 * 1024 * 1024, parse_size(0), "Free space data_dir needs for /readyz (K/M/G allowed)"
    )
    webhook_url: str = setting(
        "", parse_str, "URL of the 'default' webhook endpoint; empty = none ([[webhooks]] too)"
    )
    webhook_secret: str = setting(
        "", parse_str, "whsec_ secret(s) signing the default endpoint's requests", secret=True
    )
    webhooks: tuple[Endpoint, ...] = setting(
        (), parse_webhook_tables, "Webhook endpoints: [[webhooks]] tables in the config file"
    )

    @property
    def server_name(self) -> str:
        """The host name used in greetings and headers."""
        return self.hostname or socket.getfqdn().lower()

    @property
    def mail_dir(self) -> Path:
        """Root of the per-domain Maildirs."""
        return Path(self.data_dir) / "mail"

    @property
    def spool_dir(self) -> Path:
        """Where message bodies are written while they arrive."""
        return Path(self.data_dir) / "spool"

    @property
    def queue_dir(self) -> Path:
        """The relay queue: one JSON record and one body per message."""
        return Path(self.data_dir) / "queue"

    @property
    def outbox_dir(self) -> Path:
        """The webhook outbox: one JSON entry per event and endpoint."""
        return Path(self.data_dir) / "outbox"

    @property
    def queue_cache_dir(self) -> Path:
        """The shared queue's bodies this node is working on (a cache of the database's)."""
        return Path(self.data_dir) / "queue-cache"

    @property
    def outbox_cache_dir(self) -> Path:
        """The shared outbox's messages this node is sending events of (a cache)."""
        return Path(self.data_dir) / "outbox-cache"

    @property
    def queue_node_name(self) -> str:
        """This node's name in the shared queue: ``queue_node``, or host name and data_dir."""
        if self.queue_node:
            return self.queue_node
        return f"{socket.gethostname()}:{os.path.abspath(self.data_dir)}"

    @property
    def dkim_dir(self) -> Path:
        """The DKIM signing keys: ``<domain>/<selector>.<type>.key`` (see mailsrv.dkim.keys)."""
        return Path(self.data_dir) / "dkim"

    @property
    def queue_socket(self) -> Path:
        """Where the running server listens for ``mailsrv queue``."""
        return Path(self.queue_control_socket or self.queue_dir / "control.sock")

    @property
    def sqlite_path(self) -> Path:
        """The SQLite user database."""
        return Path(self.db_path) if self.db_path else Path(self.data_dir) / "mailsrv.db"

    @property
    def webhook_endpoints(self) -> tuple[Endpoint, ...]:
        """Every webhook endpoint: the default one (webhook_url), then the [[webhooks]] ones."""
        from mailsrv.webhook.endpoints import combine, env_endpoint

        return combine(env_endpoint(self.webhook_url, self.webhook_secret), self.webhooks)


SETTINGS = {f.name: f for f in fields(Config)}


def env_name(key: str) -> str:
    """The environment variable for a setting: ``max_recipients`` -> ``SMTP_MAX_RECIPIENTS``."""
    return ENV_PREFIX + key.upper()


def flag_name(key: str) -> str:
    """The command-line flag for a setting: ``max_recipients`` -> ``max-recipients``."""
    return key.replace("_", "-")


def default_of(key: str) -> Any:
    """The default value of a setting."""
    spec = SETTINGS[key]
    assert spec.default is not MISSING
    return spec.default


def _parse_one(source: str, key: str, raw: object) -> Any:
    try:
        return SETTINGS[key].metadata["parse"](raw)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def read_file(path: str) -> dict[str, object]:
    """Read a TOML config file into a ``{key: raw value}`` dict (keys checked, values not)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: invalid TOML: {e}") from None
    for key, value in data.items():
        if isinstance(value, dict) and not key == "aliases":
            raise ConfigError(f"config file {path}: unexpected table [{key}]")
    return data


def load(
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
) -> Config:
    """Merge defaults, the config file, the environment and flags into one :class:`Config`.

    ``config_file`` defaults to ``$SMTP_CONFIG``; ``flags`` maps setting names to raw values
    (``None`` values are ignored: the flag was not given).
    """
    return load_with_sources(config_file, environ, flags)[0]


def load_with_sources(
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
) -> tuple[Config, dict[str, str]]:
    """:func:`load`, and where each value that is not a default came from (setting name ->
    ``config file PATH: key``, ``environment SMTP_X`` or ``flag --x``; the last one wins)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # key -> where its value came from, for error messages
    path = config_file or environ.get(CONFIG_FILE_ENV) or None
    if path:
        for key, raw in read_file(path).items():
            sources[key] = f"config file {path}: {key}"
            if key not in SETTINGS:
                raise ConfigError(f"{sources[key]}: unknown setting{_suggest(key, SETTINGS)}")
            values[key] = _parse_one(sources[key], key, raw)
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_FILE_ENV:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in SETTINGS:
            hint = _suggest(name, [env_name(k) for k in SETTINGS])
            raise ConfigError(f"environment {name}: unknown setting{hint}")
        sources[key] = f"environment {name}"
        values[key] = _parse_one(sources[key], key, raw)
    for key, raw in (flags or {}).items():
        if raw is None:
            continue
        if key not in SETTINGS:
            raise ConfigError(f"flag --{flag_name(key)}: unknown setting")
        sources[key] = f"flag --{flag_name(key)}"
        values[key] = _parse_one(sources[key], key, raw)
    return check(Config(**values), sources), sources


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def check(config: Config, sources: Mapping[str, str] | None = None) -> Config:
    """Cross-setting rules that no single parser can see.

    ``sources`` maps keys to where their value came from (see :func:`load`), so an error names
    the environment variable, file or flag to fix; keys not in it are named as they are.
    """

    def where(key: str) -> str:
        return (sources or {}).get(key, key)

    if not config.local_domains:
        raise ConfigError(f"{where('local_domains')}: empty: at least one local domain is needed")
    if config.argon2_memory_kib < 8 * config.argon2_parallelism:
        raise ConfigError(
            f"{where('argon2_memory_kib')}: must be at least 8 KiB per lane"
            f" ({8 * config.argon2_parallelism} for argon2_parallelism"
            f" {config.argon2_parallelism}), got {config.argon2_memory_kib}"
        )
    if not config.port and not config.submission_port:
        raise ConfigError("port and submission_port are both 0: nothing to listen on")
    if config.enable_tls and not (config.tls_cert and config.tls_key):
        raise ConfigError(f"{where('enable_tls')}: TLS is on but tls_cert or tls_key is not set")
    ports = [p for p in (config.port, config.submission_port, config.smtps_port) if p]
    if len(ports) != len(set(ports)):
        raise ConfigError("port, submission_port and smtps_port must differ (0 turns one off)")
    if config.db_url and not config.db_url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("db_url: expected a postgresql:// URL")
    if config.queue_url and not config.queue_url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("queue_url: expected a postgresql:// URL")
    if config.max_mail_line_length < config.max_line_length:
        raise ConfigError(
            f"{where('max_mail_line_length')}: must be at least max_line_length"
            f" ({config.max_line_length})"
        )
    if config.greylist_expiry <= config.greylist_delay:
        raise ConfigError(
            f"{where('greylist_expiry')}: must be longer than greylist_delay"
            f" ({config.greylist_delay:g} s), or no retry could pass"
        )
    domains = set(config.local_domains)
    local = f"(local_domains: {','.join(config.local_domains)})"
    for mailbox in config.mailboxes:
        if mailbox.rpartition("@")[2] not in domains:
            raise ConfigError(f"{where('mailboxes')}: {mailbox} is not in a local domain {local}")
    mailboxes = set(config.mailboxes)
    for alias, target in config.aliases:
        if alias.rpartition("@")[2] not in domains:
            raise ConfigError(f"{where('aliases')}: {alias} is not in a local domain {local}")
        if target not in mailboxes and not target.startswith("postmaster@"):
            raise ConfigError(f"{where('aliases')}: target {target} of {alias} is not in mailboxes")
    if config.webhook_url or config.webhook_secret:
        from mailsrv.webhook.endpoints import EndpointError, combine, env_endpoint

        try:
            url, secret = config.webhook_url, config.webhook_secret
            names = [(sources or {}).get(k, env_name(k)) for k in ("webhook_url", "webhook_secret")]
            env = env_endpoint(url, secret, *names)
            combine(env, config.webhooks)
        except EndpointError as e:
            raise ConfigError(str(e)) from None
    return config


MASK = "********"


def without_password(url: str) -> str:
    """``url`` with the password of its user part (``scheme://user:password@host``) masked."""
    scheme, separator, rest = url.partition("://")
    user_part, at, host = rest.rpartition("@")
    if not separator or not at or ":" not in user_part:
        return url
    return f"{scheme}://{user_part.partition(':')[0]}:{MASK}@{host}"


def describe(config: Config) -> Iterable[tuple[str, str, object]]:
    """``(key, env name, value)`` for every setting, for ``mailsrv check-config``: secret
    settings masked, and the password of a URL's user part."""
    for key, spec in SETTINGS.items():
        value = getattr(config, key)
        if spec.metadata["secret"] and value:
            value = MASK
        elif isinstance(value, str) and "://" in value:
            value = without_password(value)
        yield key, env_name(key), value
