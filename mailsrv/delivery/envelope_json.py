"""The JSON form of the accepted-message values, for the stores that keep them on disk.

The relay queue keeps a message's client facts and each remote recipient's DSN request
(:mod:`mailsrv.relay.records`); the webhook outbox keeps the whole
:class:`~mailsrv.delivery.envelope.AcceptedMessage` its payload is built from
(:mod:`mailsrv.webhook.entries`).  Both read and write those parts here, with the strict
checks of :mod:`mailsrv.jsonstore.fields` (every key known, RecordError naming the bad field).
"""

from __future__ import annotations

from typing import Any

from mailsrv.delivery.envelope import (
    AcceptedMessage,
    ClientFacts,
    DsnRequest,
    LocalRoute,
    Notify,
    Recipient,
    RemoteRoute,
    Ret,
)
from mailsrv.jsonstore.fields import Fields, RecordError, enum_value
from mailsrv.mailauth.verdict import Verdict

CLIENT_KEYS = frozenset(("ip", "helo", "listener", "login", "tls_version", "tls_cipher", "trusted"))
DSN_KEYS = frozenset(("notify", "orcpt"))
_RECIPIENT_KEYS = frozenset(("address", "local", "mailboxes", "domain")) | DSN_KEYS
_MESSAGE_KEYS = frozenset(
    (
        "queue_id",
        "sender",
        "recipients",
        "client",
        "received_at",
        "size",
        "smtputf8",
        "body_8bit",
        "envid",
        "ret",
    )
)


def client_to_dict(client: ClientFacts) -> dict[str, Any]:
    """``client`` as a JSON object."""
    return {
        "ip": client.ip,
        "helo": client.helo,
        "listener": client.listener,
        "login": client.login,
        "tls_version": client.tls_version,
        "tls_cipher": client.tls_cipher,
        "trusted": client.trusted,
    }


def client_from(raw: object, where: str) -> ClientFacts:
    """The client facts stored as ``raw`` (RecordError if anything is wrong)."""
    client = Fields(raw, where, CLIENT_KEYS)
    return ClientFacts(
        ip=client.text("ip"),
        helo=client.text("helo", allow_empty=True),
        listener=client.text("listener"),
        login=client.optional_text("login"),
        tls_version=client.optional_text("tls_version"),
        tls_cipher=client.optional_text("tls_cipher"),
        trusted=client.flag("trusted"),
    )


def dsn_to_dict(dsn: DsnRequest) -> dict[str, Any]:
    """The ``notify`` and ``orcpt`` keys of a recipient's JSON object."""
    return {
        "notify": sorted(n.value for n in dsn.notify),
        "orcpt": list(dsn.orcpt) if dsn.orcpt is not None else None,
    }


def dsn_from(fields: Fields) -> DsnRequest:
    """The DSN request in the ``notify`` and ``orcpt`` keys of a recipient's object."""
    where = fields.where
    notify_raw = fields.value("notify")
    if not isinstance(notify_raw, list) or not all(isinstance(n, str) for n in notify_raw):
        raise RecordError(f"{where}.notify: expected a list of strings")
    notify = frozenset(enum_value(Notify, n, f"{where}.notify") for n in notify_raw)
    if Notify.NEVER in notify and len(notify) > 1:
        raise RecordError(f"{where}.notify: NEVER cannot be combined with other keywords")
    return DsnRequest(notify=notify, orcpt=orcpt_from(fields))


def orcpt_from(fields: Fields) -> tuple[str, str] | None:
    """The ``orcpt`` key: null or ``[address type, address]``."""
    raw = fields.value("orcpt")
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) != 2 or not all(isinstance(p, str) and p for p in raw):
        raise fields.bad("orcpt", "null or [address type, address]")
    return (raw[0], raw[1])


def _recipient_dict(recipient: Recipient) -> dict[str, Any]:
    route = recipient.route
    local = isinstance(route, LocalRoute)
    return {
        "address": recipient.address,
        "local": local,
        "mailboxes": list(route.mailboxes) if isinstance(route, LocalRoute) else [],
        "domain": route.domain if isinstance(route, RemoteRoute) else None,
        **dsn_to_dict(recipient.dsn),
    }


def _recipient(raw: object, where: str) -> Recipient:
    fields = Fields(raw, where, _RECIPIENT_KEYS)
    route: LocalRoute | RemoteRoute
    if fields.flag("local"):
        route = LocalRoute(tuple(fields.text_list("mailboxes")))
    else:
        domain = fields.optional_text("domain")
        if domain is None:
            raise fields.bad("domain", "the domain of a remote recipient")
        route = RemoteRoute(domain)
    return Recipient(fields.text("address"), route, dsn_from(fields))


def message_to_dict(message: AcceptedMessage) -> dict[str, Any]:
    """``message`` as a JSON object (everything but the body); ``authentication`` only when
    the message was checked (records written before it existed have none)."""
    extra = {}
    if message.authentication is not None:
        extra["authentication"] = message.authentication.to_dict()
    return {
        "queue_id": message.queue_id,
        "sender": message.sender,
        "recipients": [_recipient_dict(r) for r in message.recipients],
        "client": client_to_dict(message.client),
        "received_at": message.received_at,
        "size": message.size,
        "smtputf8": message.smtputf8,
        "body_8bit": message.body_8bit,
        "envid": message.envid,
        "ret": message.ret.value if message.ret is not None else None,
        **extra,
    }


def message_from(raw: object, where: str) -> AcceptedMessage:
    """The accepted message stored as ``raw`` (RecordError if anything is wrong)."""
    checked = isinstance(raw, dict) and "authentication" in raw
    fields = Fields(raw, where, _MESSAGE_KEYS | ({"authentication"} if checked else set()))
    recipients_raw = fields.value("recipients")
    if not isinstance(recipients_raw, list) or not recipients_raw:
        raise fields.bad("recipients", "a non-empty list")
    ret = fields.optional_text("ret")
    return AcceptedMessage(
        queue_id=fields.text("queue_id"),
        sender=fields.text("sender", allow_empty=True),
        recipients=tuple(
            _recipient(item, f"{where}.recipients[{n}]") for n, item in enumerate(recipients_raw)
        ),
        client=client_from(fields.value("client"), f"{where}.client"),
        received_at=fields.number("received_at"),
        size=fields.count("size"),
        smtputf8=fields.flag("smtputf8"),
        body_8bit=fields.flag("body_8bit"),
        envid=fields.optional_text("envid"),
        ret=enum_value(Ret, ret, f"{where}.ret") if ret is not None else None,
        authentication=(
            Verdict.from_dict(fields.value("authentication"), f"{where}.authentication")
            if checked
            else None
        ),
    )
