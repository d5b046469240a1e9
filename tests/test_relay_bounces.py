"""DSNs through the commit path: what is reported (delay warnings, relayed, local success), and
the reports as a sender finds them in its Maildir, parsed back with ``email``.

A real :class:`SMTPServer` with the inline committer on a ``task.Clock``: Maildir copies and
the DSNs' own commits run for real under ``tmp_path``; sessions go over a StringTransport.
"""

from __future__ import annotations

import email
import email.policy
from dataclasses import replace
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from zope.interface.verify import verifyObject

from mailsrv.delivery.committer import GroupCommitter
from mailsrv.delivery.envelope import (
    AcceptedMessage,
    DsnRequest,
    LocalRoute,
    Notify,
    Recipient,
    Ret,
)
from mailsrv.delivery.fssync import filesystem_syncer
from mailsrv.delivery.maildir import MaildirSink, MaildirStore
from mailsrv.delivery.sinks import ICommitSink, StagedMessage
from mailsrv.relay import dsn
from mailsrv.relay.bounces import DsnSubmitter, outcomes_to_report
from mailsrv.relay.local_success import LocalSuccessSink
from mailsrv.relay.records import QueueRecord, RecipientStatus, State
from mailsrv.smtp import replies
from mailsrv.smtp.server import SMTPServer
from tests.conftest import make_config
from tests.queue_helpers import accepted
from tests.test_session_protocol import Client, matches, run_now

LIFETIME = 5 * 86400.0
ORIGINAL = (
    b"Return-Path: <alice@example.org>\n"
    b"Received: from client.test ([192.0.2.9])\n\tby mx.example.org (mailsrv) with ESMTPA id Q\n"
    b"From: alice@example.org\nTo: bob@example.net\nSubject: the original\n\n"
    b"the secret body\n"
)


class Rig:
    """A server whose committer has the Maildir and local-success sinks, and the submitter."""

    def __init__(self, tmp_path: Path) -> None:
        self.config = make_config(tmp_path)
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.sink = LocalSuccessSink()
        store = MaildirStore(self.config.mail_dir, self.config.server_name)
        sync = filesystem_syncer(self.config.spool_dir, self.config.mail_dir)
        self.committer = GroupCommitter.inline([MaildirSink(store), self.sink], sync)
        self.committer.startService()
        self.server = SMTPServer(self.config, self.clock, run_now, self.committer)
        self.server.spool.prepare()
        self.bodies = tmp_path / "bodies"
        self.bodies.mkdir()
        self.submitter = DsnSubmitter(
            self.server, lambda qid: self.bodies / qid, run_now, 50000, LIFETIME
        )
        self.sink.report_with(self.submitter.delivered)

    def queued(self, **message: Any) -> QueueRecord:
        record = QueueRecord.from_message(accepted(received_at=self.clock.seconds(), **message))
        assert record is not None
        (self.bodies / record.queue_id).write_bytes(ORIGINAL)
        return record

    def maildir(self, mailbox: str) -> list[EmailMessage]:
        local, _, domain = mailbox.partition("@")
        new = self.config.mail_dir / domain / local / "new"
        files = sorted(new.iterdir()) if new.exists() else []
        return [
            email.message_from_bytes(f.read_bytes(), policy=email.policy.default) for f in files
        ]

    def reports(self, mailbox: str = "alice@example.org") -> list[EmailMessage]:
        return [m for m in self.maildir(mailbox) if m.get_content_type() == "multipart/report"]


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def blocks(report: EmailMessage) -> list[Any]:
    """The delivery-status part's field blocks: per message, then one per recipient."""
    status = list(report.iter_parts())[1]
    assert status.get_content_type() == "message/delivery-status"
    return list(status.get_payload())


def status(
    address: str, state: State, notify: frozenset[Notify] = frozenset(), **fields: Any
) -> RecipientStatus:
    return RecipientStatus(
        address, address.rpartition("@")[2], state, dsn=DsnRequest(notify), **fields
    )


SUCCESS = frozenset({Notify.SUCCESS})


@pytest.mark.parametrize(
    ("recipient", "action"),
    [
        (status("a@x.test", State.BOUNCED, last_reply="550 5.1.1 no"), dsn.FAILED),
        (status("a@x.test", State.BOUNCED, frozenset({Notify.SUCCESS})), None),
        (status("a@x.test", State.BOUNCED, frozenset({Notify.NEVER})), None),
        (status("a@x.test", State.SENT), None),
        (status("a@x.test", State.SENT, SUCCESS), dsn.RELAYED),
        (status("a@x.test", State.SENT, SUCCESS, dsn_passed_on=True), None),
        (status("a@x.test", State.DEFERRED, delay_warned=True), dsn.DELAYED),
        (status("a@x.test", State.DEFERRED), None),
    ],
    ids=[
        "bounced",
        "bounced-success-only",
        "bounced-never",
        "sent",
        "sent-success",
        "sent-success-next-hop-has-dsn",
        "deferred-warned",
        "deferred",
    ],
)
def test_what_a_report_contains(recipient: RecipientStatus, action: str | None) -> None:
    outcomes = outcomes_to_report([recipient], retry_until=1234.0)
    assert [o.action for o in outcomes] == ([action] if action else [])
    if action == dsn.DELAYED:
        assert outcomes[0].will_retry_until == 1234.0
    elif outcomes:
        assert outcomes[0].will_retry_until is None


def test_a_delay_warning_as_the_sender_reads_it(rig: Rig) -> None:
    record = rig.queued(ret=Ret.FULL, envid="ENV-7")
    bob = replace(
        record.recipients[0],
        state=State.DEFERRED,
        attempts=4,
        last_attempt=rig.clock.seconds(),
        last_reply="451 4.7.1 Greylisted",
        remote_mta="mx.example.net",
        delay_warned=True,
    )
    rig.clock.advance(7200)
    rig.submitter(record, [bob])
    [report] = rig.reports()
    assert report["Subject"] == "Delayed Mail (still being retried)"
    assert report["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.example.org"
    per_message, per_recipient = blocks(report)
    assert per_message["Original-Envelope-Id"] == "ENV-7"
    assert per_recipient["Final-Recipient"] == "rfc822; bob@example.net"
    assert per_recipient["Original-Recipient"] == "rfc822; bob@example.net"
    assert per_recipient["Action"] == "delayed"
    assert per_recipient["Status"] == "4.7.1"
    assert per_recipient["Diagnostic-Code"] == "smtp; 451 4.7.1 Greylisted"
    assert per_recipient["Remote-MTA"] == "dns; mx.example.net"
    until = parsedate_to_datetime(per_recipient["Will-Retry-Until"]).timestamp()
    assert until == record.created_at + LIFETIME
    returned = list(report.iter_parts())[2]
    # RET=FULL is for failure reports: a warning carries the headers only.
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"Subject: the original" in returned.as_bytes()
    assert b"the secret body" not in report.as_bytes()


def test_a_failure_report_returns_the_whole_message_with_ret_full(rig: Rig) -> None:
    record = rig.queued(ret=Ret.FULL)
    bounced = replace(record.recipients[1], state=State.BOUNCED, last_reply="550 5.1.1 no")
    rig.submitter(record, [record.recipients[0], bounced])
    [report] = rig.reports()
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    assert [b["Action"] for b in blocks(report)[1:]] == ["failed"]
    assert list(report.iter_parts())[2].get_content_type() == "message/rfc822"
    assert b"the secret body" in report.as_bytes()


# --- local recipients and NOTIFY=SUCCESS ---------------------------------------------------------


def test_the_sink_provides_the_interface() -> None:
    assert verifyObject(ICommitSink, LocalSuccessSink())


def send(rig: Rig, sender: str, rcpts: list[str], mail_params: str = "") -> None:
    client = Client(rig.server, "192.0.2.9", 40000)
    client.ehlo()
    assert matches(client.cmd(f"MAIL FROM:<{sender}>{mail_params}"), replies.SENDER_OK)
    for rcpt in rcpts:
        assert matches(client.cmd(f"RCPT TO:{rcpt}"), replies.RECIPIENT_OK), rcpt
    reply = client.data(b"From: alice@example.org\r\nSubject: hello\r\n\r\nthe body\r\n")
    assert reply.startswith(b"250 "), reply
    client.lose()


@pytest.mark.parametrize(
    ("sender", "rcpts", "reported"),
    [
        ("alice@example.org", ["<bob@example.org> NOTIFY=SUCCESS"], ["delivered"]),
        ("alice@example.org", ["<bob@example.org> NOTIFY=SUCCESS,FAILURE"], ["delivered"]),
        ("alice@example.org", ["<info@example.org> NOTIFY=SUCCESS"], ["expanded"]),
        ("alice@example.org", ["<bob@example.org>"], []),
        ("alice@example.org", ["<bob@example.org> NOTIFY=FAILURE,DELAY"], []),
        ("alice@example.org", ["<bob@example.org> NOTIFY=NEVER"], []),
        ("", ["<bob@example.org> NOTIFY=SUCCESS"], []),  # never a DSN to <>
        (
            "alice@example.org",
            ["<bob@example.org> NOTIFY=SUCCESS", "<carol@example.net>"],
            ["delivered"],
        ),
    ],
    ids=["success", "success-failure", "alias", "none", "failure-delay", "never", "null", "mixed"],
)
def test_local_recipients_that_asked_for_success_get_a_delivered_report(
    rig: Rig, sender: str, rcpts: list[str], reported: list[str]
) -> None:
    send(rig, sender, rcpts)
    assert len(rig.maildir("bob@example.org")) == 1  # the message itself, delivered
    reports = rig.reports()
    if not reported:
        assert reports == []
        return
    [report] = reports
    assert report["Subject"] == "Successful Mail Delivery Report"
    assert report["To"].addresses[0].addr_spec == "alice@example.org"
    per_recipient = blocks(report)[1:]
    assert [b["Action"] for b in per_recipient] == reported
    assert [b["Status"] for b in per_recipient] == ["2.0.0"]
    assert per_recipient[0]["Final-Recipient"] == f"rfc822; {rcpts[0].split('>')[0][1:]}"


def test_a_local_success_report_keeps_orcpt_and_envid_and_returns_headers_only(
    rig: Rig,
) -> None:
    send(
        rig,
        "alice@example.org",
        ["<bob@example.org> NOTIFY=SUCCESS ORCPT=rfc822;Bob+2Bx@example.org"],
        " RET=FULL ENVID=E-42",
    )
    [report] = rig.reports()
    per_message, per_recipient = blocks(report)
    assert per_message["Original-Envelope-Id"] == "E-42"
    assert per_recipient["Original-Recipient"] == "rfc822; Bob+x@example.org"
    returned = list(report.iter_parts())[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"Subject: hello" in returned.as_bytes()
    assert b"the body" not in report.as_bytes()
    # The report itself came from <> and asks for nothing: no report about the report.
    assert rig.maildir("alice@example.org")[0]["Return-Path"] == "<>"


def test_a_rolled_back_message_leaves_nothing_to_report(tmp_path: Path) -> None:
    sink = LocalSuccessSink()
    reported: list[tuple[str, bytes]] = []

    def report(message: AcceptedMessage, headers: bytes) -> Deferred[None]:
        reported.append((message.queue_id, headers))
        return succeed(None)

    sink.report_with(report)
    bob = Recipient("bob@example.org", LocalRoute(("bob@example.org",)), DsnRequest(SUCCESS))
    message = accepted(recipients=(bob,))
    body = tmp_path / "body"
    body.write_bytes(ORIGINAL)
    staged = StagedMessage(message, body)
    assert sink.write([staged]) == {}
    sink.rollback(staged)  # another sink failed it: no 250, no report
    sink.committed([message])
    assert reported == []
    assert sink.write([staged]) == {}
    sink.committed([message])
    [(queue_id, headers)] = reported
    assert queue_id == message.queue_id
    assert headers.endswith(b"Subject: the original\n")
    assert b"secret" not in headers
