"""Who may relay: authenticated users and trusted networks, nobody else (issue: no open relay).

In memory (the harness of ``test_session_protocol``) with a server whose committer has a relay
queue; the process tests cover the same over sockets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mailsrv.delivery.envelope import LocalRoute, RemoteRoute
from mailsrv.smtp import replies
from mailsrv.smtp.server import SMTPServer
from tests.test_session_protocol import UNTRUSTED_IP, Client, Harness, matches, run_now

TRUSTED_IP = "127.0.0.1"


def relaying_harness(tmp_path: Path, relay: bool = True, **overrides: Any) -> Harness:
    h = Harness(tmp_path, **overrides)
    h.server = SMTPServer(h.config, h.clock, run_now, h.committer, relay=relay)
    return h


def routes(c: Client) -> list[Any]:
    assert c.proto.transaction is not None
    return [r.route for r in c.proto.transaction.accepted]


def test_trusted_client_relays_to_other_domains(tmp_path: Path) -> None:
    c = relaying_harness(tmp_path).connect(TRUSTED_IP)
    c.transaction(
        "me@example.org", "alice@example.org", "Bob@Remote.TEST", "carol@XN--BCHER-KVA.example"
    )
    assert routes(c) == [
        LocalRoute(("alice@example.org",)),
        RemoteRoute("remote.test"),
        RemoteRoute("xn--bcher-kva.example"),
    ]


def test_untrusted_anonymous_client_cannot_relay(tmp_path: Path) -> None:
    c = relaying_harness(tmp_path).connect(UNTRUSTED_IP)
    c.ehlo()
    assert matches(c.cmd("MAIL FROM:<me@remote.test>"), replies.SENDER_OK)
    assert c.cmd("RCPT TO:<bob@remote.test>") == replies.RELAY_DENIED.format()


@pytest.mark.parametrize(
    "recipient",
    [
        "<@relay.test:bob@remote.test>",
        "<bob%remote.test@example.org>",
        "<remote.test!bob@example.org>",
        '<"bob@remote.test"@example.org>',
    ],
)
def test_relay_tricks_are_refused_even_for_trusted_clients(tmp_path: Path, recipient: str) -> None:
    c = relaying_harness(tmp_path).connect(TRUSTED_IP)
    c.ehlo()
    assert matches(c.cmd("MAIL FROM:<me@example.org>"), replies.SENDER_OK)
    reply = c.cmd(f"RCPT TO:{recipient}")
    assert reply.startswith(b"5"), reply
    assert c.proto.transaction is not None and c.proto.transaction.accepted == []


def test_without_a_relay_queue_nobody_relays(tmp_path: Path) -> None:
    c = relaying_harness(tmp_path, relay=False).connect(TRUSTED_IP)
    c.ehlo()
    assert matches(c.cmd("MAIL FROM:<me@example.org>"), replies.SENDER_OK)
    assert c.cmd("RCPT TO:<bob@remote.test>") == replies.RELAY_DENIED.format()
