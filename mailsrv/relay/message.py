"""The values the relay client works on: what to send, and what became of each recipient.

The scheduler maps its queue records onto :class:`OutboundMessage`; the client answers with one
:class:`RecipientResult` per recipient, the ``(reply, permanent?)`` pair of chasquid's courier
plus the facts a log line and a DSN need (remote MTA, address, TLS).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

NOTIFY_NEVER = "NEVER"
NOTIFY_SUCCESS = "SUCCESS"
NOTIFY_FAILURE = "FAILURE"
NOTIFY_DELAY = "DELAY"


@dataclass(frozen=True)
class OutboundRecipient:
    """One envelope recipient and its RFC 3461 DSN parameters (as received, decoded).

    ``notify`` holds the NOTIFY keywords (empty: none given); ``orcpt`` is the ORCPT value
    decoded from xtext, e.g. ``"rfc822;bob@example.net"``.
    """

    address: str
    notify: tuple[str, ...] = ()
    orcpt: str | None = None


@dataclass(frozen=True)
class OutboundMessage:
    """One message to hand to a next hop.

    ``sender`` is ``""`` for the null reverse-path ``<>``.  ``body_path`` is the stored body in
    the canonical Maildir form (LF line endings, ``Return-Path`` first, then ``Received``);
    ``size`` is its size on the wire (RFC 1870: CRLF, without Return-Path), used for the SIZE
    extension.  ``smtputf8`` says that the
    envelope or headers need SMTPUTF8 (RFC 6531); ``eight_bit`` that the body is 8BITMIME.
    ``envid`` and ``ret`` are the RFC 3461 MAIL parameters (``ret`` is ``"FULL"``, ``"HDRS"``
    or None).  ``headers`` are header lines (stored form, LF line ends) sent before the body:
    its DKIM signatures, counted in ``size``.  ``may_send``, when set, is asked right before
    the body goes out: False (this node lost the message's lease in a shared queue) aborts the
    transaction before DATA is complete, so nothing is delivered by it.
    """

    queue_id: str
    sender: str
    recipients: tuple[OutboundRecipient, ...]
    body_path: Path
    size: int
    smtputf8: bool = False
    eight_bit: bool = False
    envid: str | None = None
    ret: str | None = None
    headers: bytes = b""
    may_send: Callable[[], bool] | None = None


@dataclass(frozen=True)
class RecipientResult:
    """What the next hop (or the client itself) said about one recipient.

    ``code``/``enhanced``/``text`` are the reply (a reply the client made up, e.g. for a
    connection failure, has the same shape); ``permanent`` is True when retrying cannot help
    (5xx).  ``remote_mta`` is the next hop's host name and ``remote_address`` its IP address
    (both empty when no connection was made); ``tls`` the TLS protocol version, or None.
    ``dsn_passed_on`` is True when the next hop offered DSN, so the recipient's ``NOTIFY``
    request went with it and reporting success is the next hop's job from there.
    """

    recipient: str
    code: int
    enhanced: str
    text: str
    permanent: bool
    remote_mta: str = ""
    remote_address: str = ""
    tls: str | None = None
    dsn_passed_on: bool = False

    @property
    def delivered(self) -> bool:
        """True when the next hop took responsibility for the recipient (2xx after DATA)."""
        return 200 <= self.code < 300

    @property
    def reply_line(self) -> str:
        """The reply as one line, e.g. ``"550 5.1.1 No such user"`` (for logs and DSNs)."""
        parts = [str(self.code), self.enhanced, self.text]
        return " ".join(part for part in parts if part)
