"""Webhook endpoints: where events go, how they are signed, and what each endpoint wants.

An :class:`Endpoint` is an immutable value.  Endpoints come from two places:

* the environment pair ``SMTP_WEBHOOK_URL`` / ``SMTP_WEBHOOK_SECRET`` (or ``webhook_url`` /
  ``webhook_secret`` in the file): one endpoint named ``default`` with every other field at
  its default; the secret may list several ``whsec_`` secrets separated by spaces or commas;
* any number of ``[[webhooks]]`` tables in the TOML config file, one endpoint each::

      [[webhooks]]
      name = "crm"                             # required; letters, digits, . _ -
      url = "https://crm.example.org/hooks"    # required; http:// or https://
      secrets = ["whsec_..."]                  # required; several = rotation
      events = ["message.received"]            # default: every event type
      timeout = 15                             # seconds for the whole request
      ca_file = "/etc/mailsrv/crm-ca.pem"      # https only; default: the system CAs
      include_raw = false                      # the whole message, base64, in the payload
      max_raw_size = "10M"                     # above it: raw_truncated, no raw
      concurrency = 8                          # requests in flight to this endpoint
      retry_schedule = [0, 5, 300, 1800]       # seconds; default: Standard Webhooks

Validation is strict and every error is one line naming the endpoint and the field, e.g.
``endpoint "crm": url: expected an http:// or https:// URL, got 'ftp://x'``: unknown keys,
missing or wrong types, a bad URL, a secret that is not ``whsec_`` + base64 of 24-64 bytes (the
value is never quoted), an unknown event type, a duplicate name, an unreadable CA bundle.
Secrets are never part of a repr.  Reading ``ca_file`` blocks: parse at start, not on the reactor.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from mailsrv.config import parse_bool, parse_int, parse_path, parse_seconds, parse_size
from mailsrv.webhook.retry import DEFAULT_SCHEDULE, RetrySchedule
from mailsrv.webhook.signing import SecretError, decode_secret
from mailsrv.webhook.trust import TrustError, load_trust_root

MESSAGE_RECEIVED = "message.received"
MESSAGE_QUEUED = "message.queued"
MESSAGE_DELIVERED = "message.delivered"
MESSAGE_DEFERRED = "message.deferred"
MESSAGE_BOUNCED = "message.bounced"

EVENT_TYPES = frozenset(
    {MESSAGE_RECEIVED, MESSAGE_QUEUED, MESSAGE_DELIVERED, MESSAGE_DEFERRED, MESSAGE_BOUNCED}
)
"""Every event type: accepted for local mailboxes, accepted for relay, and the relay outcomes."""

ENV_ENDPOINT_NAME = "default"
ENV_URL = "SMTP_WEBHOOK_URL"
ENV_SECRET = "SMTP_WEBHOOK_SECRET"  # noqa: S105 - the variable's name, not a secret
DEFAULT_TIMEOUT = 15.0
MAX_TIMEOUT = 300.0
DEFAULT_MAX_RAW_SIZE = 10 * 1024 * 1024
DEFAULT_CONCURRENCY = 8
MAX_SECRETS = 10

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class EndpointError(ValueError):
    """An endpoint is badly configured; the message is one line naming it and the field."""


@dataclass(frozen=True)
class Endpoint:
    """One webhook receiver and how events are sent to it."""

    name: str
    url: str
    secrets: tuple[str, ...] = field(repr=False)
    events: frozenset[str] = EVENT_TYPES
    timeout: float = DEFAULT_TIMEOUT
    ca_file: str | None = None
    include_raw: bool = False
    max_raw_size: int = DEFAULT_MAX_RAW_SIZE
    concurrency: int = DEFAULT_CONCURRENCY
    retry: RetrySchedule = DEFAULT_SCHEDULE

    def wants(self, event_type: str) -> bool:
        """True when this endpoint subscribes to ``event_type``."""
        return event_type in self.events

    def __str__(self) -> str:
        """``name=url``, as ``mailsrv check-config`` shows it (no secrets)."""
        return f"{self.name}={self.url}"


# --- field parsers: each raises ValueError with the field's problem -------------------------


def parse_url(raw: object) -> str:
    """An absolute ``http://`` or ``https://`` URL with a host and no credentials."""
    if not isinstance(raw, str):
        raise ValueError(f"expected a URL string, got {type(raw).__name__}")
    text = raw.strip()
    if not text.isascii() or re.search(r"[\x00-\x20\x7f]", text):
        raise ValueError("spaces, control and non-ASCII characters are not allowed (use %-escapes)")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        raise ValueError(f"not a valid URL: {text!r}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"expected an http:// or https:// URL, got {text!r}")
    if not parts.hostname:
        raise ValueError(f"the URL has no host: {text!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are not allowed (requests are signed instead)")
    if parts.fragment:
        raise ValueError(f"a URL fragment is not allowed: {text!r}")
    return text


def parse_secrets(raw: object) -> tuple[str, ...]:
    """One or more ``whsec_`` secrets: a list, or a string separated by spaces or commas."""
    if isinstance(raw, str):
        items = [part for part in re.split(r"[\s,]+", raw) if part]
    elif isinstance(raw, list | tuple) and all(isinstance(item, str) for item in raw):
        items = [item.strip() for item in raw]
    else:
        raise ValueError("expected a list of whsec_ secrets")
    if not items:
        raise ValueError("at least one whsec_ secret is needed")
    if len(items) > MAX_SECRETS:
        raise ValueError(f"at most {MAX_SECRETS} secrets")
    for number, item in enumerate(items, 1):
        try:
            decode_secret(item)
        except SecretError as e:
            raise ValueError(f"secret {number}: {e}") from None
    return tuple(dict.fromkeys(items))


def parse_events(raw: object) -> frozenset[str]:
    """A non-empty list of event types (see :data:`EVENT_TYPES`)."""
    if not isinstance(raw, list | tuple) or not all(isinstance(item, str) for item in raw):
        raise ValueError("expected a list of event types")
    events = [item.strip() for item in raw]
    if not events:
        raise ValueError("an empty list would send nothing; leave events out for all of them")
    for event in events:
        if event not in EVENT_TYPES:
            raise ValueError(
                f"unknown event type {event!r}{_suggest(event, EVENT_TYPES)}"
                f" (known: {', '.join(sorted(EVENT_TYPES))})"
            )
    return frozenset(events)


def parse_timeout(raw: object) -> float:
    """Seconds for one whole request, more than 0 and at most 300."""
    value: float = parse_seconds(0.0)(raw)
    if not 0 < value <= MAX_TIMEOUT:
        raise ValueError(f"must be more than 0 and at most {MAX_TIMEOUT:g} seconds, got {value}")
    return value


def parse_ca_file(raw: object) -> str:
    """A readable PEM bundle of CA certificates."""
    path: str = parse_path(raw)
    if not path:
        raise ValueError("empty path (leave ca_file out to use the system CAs)")
    try:
        load_trust_root(path)
    except TrustError as e:
        raise ValueError(str(e)) from None
    return path


def parse_schedule(raw: object) -> RetrySchedule:
    """A non-empty list of delays in seconds: before the first attempt, after each failure."""
    if not isinstance(raw, list | tuple):
        raise ValueError("expected a list of delays in seconds, e.g. [0, 5, 300]")
    if not raw or len(raw) > 100:
        raise ValueError("expected 1 to 100 delays")
    delays = []
    for number, item in enumerate(raw, 1):
        try:
            delays.append(parse_seconds(0.0)(item))
        except ValueError as e:
            raise ValueError(f"delay {number}: {e}") from None
    return RetrySchedule(delays=tuple(delays))


_FIELDS = {
    "name": None,
    "url": parse_url,
    "secrets": parse_secrets,
    "events": parse_events,
    "timeout": parse_timeout,
    "ca_file": parse_ca_file,
    "include_raw": parse_bool,
    "max_raw_size": parse_size(1),
    "concurrency": parse_int(1, 256),
    "retry_schedule": parse_schedule,
}
_REQUIRED = ("name", "url", "secrets")


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _parse_name(raw: object, label: str) -> str:
    if not isinstance(raw, str) or not _NAME.fullmatch(raw.strip()):
        raise EndpointError(
            f"{label}: name: expected 1-64 letters, digits, '.', '_' or '-', got {raw!r}"
        )
    return raw.strip()


def parse_table(table: object, number: int = 1) -> Endpoint:
    """One ``[[webhooks]]`` table (``number`` counts from 1, for the error messages)."""
    label = f"endpoint #{number}"
    if not isinstance(table, Mapping):
        raise EndpointError(f"{label}: expected a [[webhooks]] table")
    if "name" in table:
        label = f'endpoint "{_parse_name(table["name"], label)}"'
    for key in table:
        if key not in _FIELDS:
            raise EndpointError(f"{label}: unknown key {key!r}{_suggest(str(key), _FIELDS)}")
    for key in _REQUIRED:
        if key not in table:
            raise EndpointError(f"{label}: {key}: missing")
    values: dict[str, Any] = {}
    for key, raw in table.items():
        parse = _FIELDS[key]
        if parse is None:
            continue
        try:
            values["retry" if key == "retry_schedule" else str(key)] = parse(raw)
        except ValueError as e:
            raise EndpointError(f"{label}: {key}: {e}") from None
    name = _parse_name(table["name"], label)
    url, secrets = values.pop("url"), values.pop("secrets")
    endpoint = replace(Endpoint(name=name, url=url, secrets=secrets), **values)
    if endpoint.ca_file and urlsplit(endpoint.url).scheme.lower() != "https":
        raise EndpointError(f"{label}: ca_file: only an https:// URL uses a CA bundle")
    return endpoint


def parse_tables(raw: object) -> tuple[Endpoint, ...]:
    """Every ``[[webhooks]]`` table, in order; names must differ."""
    if not isinstance(raw, list | tuple):
        raise EndpointError("expected [[webhooks]] tables in the config file")
    endpoints = tuple(parse_table(table, number) for number, table in enumerate(raw, 1))
    return combine(None, endpoints)


def env_endpoint(
    url: str,
    secret: str,
    url_source: str = ENV_URL,
    secret_source: str = ENV_SECRET,
) -> Endpoint | None:
    """The ``default`` endpoint from the URL/secret pair; None when neither is set.

    ``url_source`` and ``secret_source`` name where the values came from, for the errors.
    """
    if not url and not secret:
        return None
    if not url:
        raise EndpointError(f"{secret_source}: set, but {url_source} is not")
    if not secret:
        raise EndpointError(
            f"{secret_source}: required with {url_source} (a whsec_ secret; every request is"
            " signed)"
        )
    try:
        checked_url = parse_url(url)
    except ValueError as e:
        raise EndpointError(f"{url_source}: {e}") from None
    try:
        secrets = parse_secrets(secret)
    except ValueError as e:
        raise EndpointError(f"{secret_source}: {e}") from None
    return Endpoint(name=ENV_ENDPOINT_NAME, url=checked_url, secrets=secrets)


def combine(env: Endpoint | None, tables: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
    """The environment's endpoint (if any) then the tables' ones; a name used twice is refused."""
    endpoints = ((env,) if env is not None else ()) + tuple(tables)
    seen: set[str] = set()
    for endpoint in endpoints:
        if endpoint.name in seen:
            where = (
                " (the name of the SMTP_WEBHOOK_URL endpoint)"
                if env and endpoint.name == env.name
                else ""
            )
            raise EndpointError(f'endpoint "{endpoint.name}": name: used twice{where}')
        seen.add(endpoint.name)
    return endpoints


def parse_endpoints(env_url: str, env_secret: str, tables: object) -> tuple[Endpoint, ...]:
    """Every endpoint: from the environment pair, then from the ``[[webhooks]]`` tables."""
    return combine(env_endpoint(env_url, env_secret), parse_tables(tables))
