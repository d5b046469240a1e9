"""The accepted-message value: what the session hands the committer, and every sink reads.

One immutable :class:`AcceptedMessage` per message that reached the end of DATA: its queue id,
the envelope (sender, each recipient with its route and its DSN request), the facts about the
client that sent it, and the body's size.  The committer makes the body durable once, then
every sink (Maildir links, relay queue records, webhook outbox records) writes its part from this
value, so no sink has to reach back into the SMTP session.

Addresses are text as the session accepted them (``""`` is the null reverse-path).  The body
itself is not part of the value: sinks get the path of the durable spool file beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from mailsrv.mailauth.verdict import Verdict


class Notify(Enum):
    """RFC 3461 ``NOTIFY=`` keywords."""

    NEVER = "NEVER"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    DELAY = "DELAY"


class Ret(Enum):
    """RFC 3461 ``RET=``: what a DSN carries of the original message."""

    FULL = "FULL"
    HDRS = "HDRS"


@dataclass(frozen=True)
class DsnRequest:
    """One recipient's DSN request (RFC 3461 section 4).

    ``notify`` empty means the client gave no ``NOTIFY=`` (the default: failures only, and a
    delay warning only when the server is configured for it).  ``orcpt`` is the decoded
    ``ORCPT=`` as ``(address-type, address)``, e.g. ``("rfc822", "bob@example.net")``.
    """

    notify: frozenset[Notify] = frozenset()
    orcpt: tuple[str, str] | None = None

    def wants(self, kind: Notify) -> bool:
        """True when a DSN of ``kind`` should be sent (``FAILURE`` is the default)."""
        if Notify.NEVER in self.notify:
            return False
        if not self.notify:
            return kind is Notify.FAILURE
        return kind in self.notify


@dataclass(frozen=True)
class LocalRoute:
    """Delivered here: the Maildir mailboxes (``local@domain``) that receive a copy."""

    mailboxes: tuple[str, ...]


@dataclass(frozen=True)
class RemoteRoute:
    """Relayed: queued for the next hop of ``domain`` (the recipient's domain, lower-cased)."""

    domain: str


Route = LocalRoute | RemoteRoute


@dataclass(frozen=True)
class Recipient:
    """One accepted ``RCPT TO`` with where it goes and what DSNs it asked for."""

    address: str
    route: Route
    dsn: DsnRequest = DsnRequest()

    @property
    def is_local(self) -> bool:
        """True when the recipient is delivered to local Maildirs."""
        return isinstance(self.route, LocalRoute)


@dataclass(frozen=True)
class ClientFacts:
    """Who sent the message and how: what trace headers, logs and webhooks report."""

    ip: str
    helo: str
    listener: str
    login: str | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    trusted: bool = False


@dataclass(frozen=True)
class AcceptedMessage:
    """A message accepted at the end of DATA, before it is durable (see the module docstring).

    ``received_at`` is the injected clock's time at the end of DATA; ``size`` the stored body's
    size in bytes (trace headers included); ``envid`` and ``ret`` the RFC 3461 MAIL parameters;
    ``wire_size`` the size a next hop's SIZE limit applies to (RFC 1870: CRLF line ends, the
    ``Received`` header but not ``Return-Path``, dots not doubled), None when not counted;
    ``authentication`` the verdict of the inbound checks (:mod:`mailsrv.mailauth`), None for
    mail that is not checked (authenticated users, trusted networks, submission).
    ``relay_headers`` are header lines (stored form: LF line ends) that only the copies leaving
    through the relay carry, on top of the body: the DKIM signatures (:mod:`mailsrv.dkim`);
    ``size`` and ``wire_size`` do not count them, and local copies never have them.
    """

    queue_id: str
    sender: str
    recipients: tuple[Recipient, ...]
    client: ClientFacts
    received_at: float
    size: int
    smtputf8: bool = False
    body_8bit: bool = False
    envid: str | None = None
    ret: Ret | None = None
    wire_size: int | None = None
    relay_headers: bytes = b""
    authentication: Verdict | None = None

    @property
    def local_mailboxes(self) -> tuple[str, ...]:
        """Every local mailbox that receives a copy, each once, in recipient order."""
        seen: dict[str, None] = {}
        for recipient in self.recipients:
            if isinstance(recipient.route, LocalRoute):
                seen.update(dict.fromkeys(recipient.route.mailboxes))
        return tuple(seen)

    @property
    def remote_recipients(self) -> tuple[Recipient, ...]:
        """The recipients that go to the relay queue."""
        return tuple(r for r in self.recipients if isinstance(r.route, RemoteRoute))
