"""Standard Webhooks signatures: the headers every webhook request carries, and secrets.

A request for event ``id`` sent at ``timestamp`` (whole seconds since the epoch, the time of
that attempt) with body ``body`` carries::

    webhook-id: <id>                      the event id: the same on every retry and restart
    webhook-timestamp: <timestamp>
    webhook-signature: v1,<sig> [v1,<sig> ...]

where ``sig`` is the base64 HMAC-SHA256 of ``"<id>.<timestamp>." + body`` keyed with the
decoded secret.  An endpoint with several secrets (rotation: the old and the new one) gets one
signature per secret, separated by spaces; a receiver accepts the request if any of them
matches, as the ``standardwebhooks`` verifier does.

A secret is ``whsec_`` followed by the base64 of 24 to 64 random bytes; :func:`generate_secret`
makes one from the ``secrets`` module.  Secrets never appear in a repr, a log line or an error
message: :class:`SecretError` says what is wrong without quoting the value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re
import secrets
from collections.abc import Iterable, Mapping

from mailsrv import __version__

SECRET_PREFIX = "whsec_"  # noqa: S105 - the prefix, not a secret
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
DEFAULT_SECRET_BYTES = 32

USER_AGENT = f"mailsrv/{__version__}"
"""The ``User-Agent`` of every webhook request."""

_MESSAGE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


class SecretError(ValueError):
    """A secret is not ``whsec_`` + base64 of 24-64 bytes (the message never quotes it)."""


def generate_secret(size: int = DEFAULT_SECRET_BYTES) -> str:
    """A new random secret, ``whsec_`` + base64 of ``size`` bytes (24-64)."""
    if not MIN_SECRET_BYTES <= size <= MAX_SECRET_BYTES:
        raise ValueError(f"a secret has {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes")
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(size)).decode("ascii")


def decode_secret(text: str) -> bytes:
    """The key bytes of a ``whsec_`` secret (padding optional); :class:`SecretError` if bad."""
    if not text.startswith(SECRET_PREFIX):
        raise SecretError(f"expected a secret starting with {SECRET_PREFIX}")
    encoded = text[len(SECRET_PREFIX) :]
    core = encoded.rstrip("=")
    if not _BASE64.fullmatch(encoded) or len(core) % 4 == 1:
        raise SecretError(f"expected base64 after {SECRET_PREFIX}")
    try:
        key = base64.b64decode(core + "=" * (-len(core) % 4), validate=True)
    except binascii.Error:
        raise SecretError(f"expected base64 after {SECRET_PREFIX}") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise SecretError(
            f"the secret decodes to {len(key)} bytes; expected {MIN_SECRET_BYTES}"
            f" to {MAX_SECRET_BYTES}"
        )
    return key


def signature(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature of ``body`` for ``message_id`` at ``timestamp``."""
    signed = b"%s.%d.%s" % (message_id.encode("ascii"), timestamp, body)
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


class Signer:
    """Signs requests with one endpoint's secrets (decoded once, never shown)."""

    def __init__(self, secret_texts: Iterable[str]) -> None:
        self._keys = tuple(decode_secret(text) for text in secret_texts)
        if not self._keys:
            raise SecretError("at least one secret is needed")

    def __repr__(self) -> str:
        return f"<Signer with {len(self._keys)} secret(s)>"

    def signature_header(self, message_id: str, timestamp: int, body: bytes) -> str:
        """The ``webhook-signature`` value: one signature per secret, space-separated."""
        return " ".join(signature(key, message_id, timestamp, body) for key in self._keys)

    def headers(self, message_id: str, timestamp: float, body: bytes) -> Mapping[str, str]:
        """Every header of a webhook request for ``body`` (``timestamp`` floored to seconds).

        ``message_id`` is the event id: letters, digits, ``_`` and ``-`` (ValueError if not).
        """
        if not _MESSAGE_ID.fullmatch(message_id):
            raise ValueError("a webhook id is 1-128 letters, digits, '_' or '-'")
        seconds = math.floor(timestamp)
        return {
            "webhook-id": message_id,
            "webhook-timestamp": str(seconds),
            "webhook-signature": self.signature_header(message_id, seconds, body),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
        }
