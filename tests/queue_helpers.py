"""Helpers for the relay-queue tests: accepted messages, and queue files made as the committer
makes them (spool body written, staged, then one filesystem sync)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path

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
from mailsrv.delivery.fssync import filesystem_syncer
from mailsrv.relay.queue_store import FileQueueStore
from mailsrv.relay.records import QueueRecord

CLIENT = ClientFacts(
    ip="192.0.2.7",
    helo="client.example.com",
    listener="submission",
    login="alice@example.org",
    tls_version="TLSv1.3",
    tls_cipher="TLS_AES_256_GCM_SHA384",
    trusted=False,
)

BODY = (
    b"Return-Path: <alice@example.org>\n"
    b"Received: from client.example.com by mx.example.org\n"
    b"From: Alice <alice@example.org>\n"
    b"To: bob@example.net\n"
    b"Subject: queued\n"
    b"\n"
    b"Hello.\n"
)

_ids = itertools.count(1)
_syncers: dict[Path, Callable[[], None]] = {}


def _sync(directory: Path) -> None:
    if directory not in _syncers:
        _syncers[directory] = filesystem_syncer(directory)
    _syncers[directory]()


def new_id() -> str:
    """A fresh queue id in the server's alphabet."""
    return f"7ZK2P1QH{next(_ids):07d}"


def remote(address: str, notify: frozenset[Notify] = frozenset(), orcpt: bool = False) -> Recipient:
    domain = address.rpartition("@")[2].lower()
    dsn = DsnRequest(notify, ("rfc822", address) if orcpt else None)
    return Recipient(address, RemoteRoute(domain), dsn)


def local(address: str) -> Recipient:
    return Recipient(address, LocalRoute((address,)))


def accepted(
    queue_id: str | None = None,
    recipients: tuple[Recipient, ...] | None = None,
    sender: str = "alice@example.org",
    received_at: float = 1_767_225_600.25,
    **extra: object,
) -> AcceptedMessage:
    """An accepted message with two remote recipients (one asking for DSNs) by default."""
    if recipients is None:
        recipients = (
            remote("bob@example.net", frozenset({Notify.SUCCESS, Notify.FAILURE}), orcpt=True),
            remote("carol@example.com"),
        )
    return AcceptedMessage(
        queue_id=queue_id or new_id(),
        sender=sender,
        recipients=recipients,
        client=CLIENT,
        received_at=received_at,
        size=len(BODY),
        **extra,  # type: ignore[arg-type]
    )


def full_message(queue_id: str | None = None, **extra: object) -> AcceptedMessage:
    """A message using every field: DSN parameters, SMTPUTF8, a local recipient too."""
    return accepted(
        queue_id,
        recipients=(
            remote("bob@example.net", frozenset({Notify.DELAY, Notify.FAILURE}), orcpt=True),
            remote("dörte@bücher.example", frozenset({Notify.NEVER})),
            local("alice@example.org"),
        ),
        smtputf8=True,
        body_8bit=True,
        envid="QQ314159",
        ret=Ret.HDRS,
        **extra,
    )


def spool_body(directory: Path, name: str, body: bytes = BODY) -> Path:
    """A spool file as the session leaves it (written, not yet synced)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(body)
    return path


def commit(
    store: FileQueueStore, spool: Path, message: AcceptedMessage, body: bytes = BODY
) -> QueueRecord:
    """Queue ``message`` as the committer does: body on disk, stage, one sync, drop the spool
    name."""
    store.root.mkdir(parents=True, exist_ok=True)
    path = spool_body(spool, message.queue_id, body)
    record = store.stage_blocking(message, path)
    assert record is not None
    _sync(store.root)
    os.unlink(path)
    return record
