"""``mailsrv webhooks`` as a user runs it (the real command in a subprocess) on an outbox with
no server running: list, show, redrive, secret; bad input answered with one line and exit 1 or
2.  The same command against a running server is in ``test_webhook_process.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import standardwebhooks

from mailsrv.webhook.endpoint_state import DisabledEndpoint, DisabledEndpoints
from mailsrv.webhook.entries import EntryState, OutboxEntry, decode
from mailsrv.webhook.outbox_store import OutboxStore
from mailsrv.webhook.signing import decode_secret
from tests.test_webhook_outbox_store import delivery_entry, message_entry
from tests.webhook_rig import SECRET, run_now

MAILSRV = Path(sys.executable).parent / "mailsrv"


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Outbox:
    """A data directory with an outbox, and the CLI run against it."""

    data_dir: Path

    @property
    def root(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def store(self) -> OutboxStore:
        return OutboxStore(self.root, run_now)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SMTP_")}
        env["SMTP_DATA_DIR"] = str(self.data_dir)
        env["SMTP_WEBHOOK_URL"] = "https://hooks.example/in"
        env["SMTP_WEBHOOK_SECRET"] = SECRET
        return env

    def __call__(self, *args: str) -> Result:
        done = subprocess.run(
            [str(MAILSRV), "webhooks", *args],
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=60,
        )
        assert "Traceback" not in done.stderr, done.stderr
        return Result(done.returncode, done.stdout, done.stderr)

    def ok(self, *args: str) -> str:
        result = self(*args)
        assert result.code == 0, result
        assert result.err == ""
        return result.out

    def add(self, entry: OutboxEntry) -> OutboxEntry:
        self.root.mkdir(parents=True, exist_ok=True)
        body = self.data_dir / "spool" / entry.key
        body.parent.mkdir(parents=True, exist_ok=True)
        body.write_bytes(b"Subject: x\n\nhello\n")
        self.store.stage_blocking(entry, body)
        return entry

    def entry(self, key: str) -> OutboxEntry:
        return decode((self.root / f"{key}.json").read_bytes(), key)


@pytest.fixture
def outbox(tmp_path: Path) -> Outbox:
    return Outbox(tmp_path / "data")


def one_line_error(result: Result, code: int = 1) -> str:
    assert result.code == code, result
    assert result.out == ""
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("mailsrv: ")
    return lines[0]


def test_an_empty_outbox_lists_its_endpoint_and_creates_nothing(outbox: Outbox) -> None:
    out = outbox.ok("list")
    assert out.splitlines() == [
        "endpoint default https://hooks.example/in: enabled; 0 pending, 0 dead, 0 done",
        "",
        "Webhook outbox is empty",
    ]
    data = json.loads(outbox.ok("list", "--json"))
    assert data["entries"] == []
    assert data["endpoints"][0]["name"] == "default"
    assert not outbox.data_dir.exists()


def test_list_shows_state_attempts_and_the_last_error(outbox: Outbox) -> None:
    pending = outbox.add(
        message_entry(
            endpoint="default",
            attempts=3,
            next_attempt=9e9,
            last_attempt=1_767_225_700.0,
            last_status=503,
            last_error="HTTP 503: busy\r\nnow",
        )
    )
    dead = outbox.add(delivery_entry(endpoint="old-crm"))
    lines = outbox.ok("list").splitlines()
    assert lines[0].startswith("endpoint default https://hooks.example/in: enabled; 1 pending")
    assert lines[1] == "endpoint old-crm (not configured): enabled; 0 pending, 1 dead, 0 done"
    assert lines[3].split()[:5] == [pending.key, "message.received", "pending", "3", "attempts"]
    assert "next in" in lines[3]
    assert lines[4] == "    (last: HTTP 503: busy now)"
    assert lines[5].split()[:5] == [dead.key, "message.deferred", "dead", "11", "attempts"]
    assert lines[-1] == "-- 2 entries: 1 dead, 1 pending"
    data = json.loads(outbox.ok("list", "--json"))
    assert [e["event_id"] for e in data["entries"]] == [pending.event_id, dead.event_id]


def test_show_by_event_or_entry_id(outbox: Outbox) -> None:
    first = outbox.add(message_entry(endpoint="default"))
    second = outbox.add(message_entry(endpoint="erp"))
    shown = outbox.ok("show", first.event_id)
    assert shown.count('"event_id": "' + first.event_id) == 2
    assert '"endpoint": "erp"' in shown
    one = outbox.ok("show", second.key)
    assert json.loads(one)["endpoint"] == "erp"


def test_redrive_makes_dead_letters_pending_and_enables_endpoints(outbox: Outbox) -> None:
    dead = outbox.add(message_entry(endpoint="default", state=EntryState.DEAD, attempts=1))
    also = outbox.add(delivery_entry(endpoint="default"))
    states = DisabledEndpoints(outbox.root / "endpoints", run_now)
    states.put(DisabledEndpoint("default", "https://hooks.example/in", 1.0, "HTTP 410 Gone"))
    assert outbox.ok("redrive", dead.key) == (
        "1 dead-lettered event(s) redriven; endpoint(s) enabled again: default\n"
    )
    redriven = outbox.entry(dead.key)
    assert (redriven.state, redriven.attempts, redriven.finished_at) == (
        EntryState.PENDING,
        0,
        None,
    )
    assert not (outbox.root / "endpoints" / "default.json").exists()
    assert outbox.ok("redrive", "--endpoint", "default") == "1 dead-lettered event(s) redriven\n"
    assert outbox.entry(also.key).state is EntryState.PENDING
    assert outbox.ok("redrive", "--all") == "0 dead-lettered event(s) redriven\n"
    assert outbox.ok("redrive", dead.event_id) == (
        f"{dead.event_id}: nothing to redrive (pending, not dead-lettered)\n"
    )


BAD_IDS = [
    (("show", "evt_" + "0" * 32), "no such webhook event evt_" + "0" * 32),
    (("show", "evt_" + "0" * 32 + ".default"), "no such webhook event"),
    (("show", "nope"), "invalid webhook event id 'nope' (expected evt_...)"),
    (("show", "evt_" + "0" * 32 + ".bad name"), "invalid webhook event id"),
    (("redrive", "../etc"), "invalid webhook event id '../etc'"),
    (("redrive", "--endpoint", "zzz"), "no such webhook endpoint zzz"),
    (("redrive", "--endpoint", "a/b"), "invalid endpoint name 'a/b'"),
]


@pytest.mark.parametrize(("args", "error"), BAD_IDS, ids=[" ".join(a) for a, _ in BAD_IDS])
def test_bad_ids_get_one_line_and_exit_1(outbox: Outbox, args: tuple[str, ...], error: str) -> None:
    assert error in one_line_error(outbox(*args))


USAGE = [
    ("redrive",),
    ("redrive", "--all", "--endpoint", "x"),
    ("show",),
    ("list", "extra"),
    ("secret", "--bytes", "10"),
    ("secret", "--bytes", "65"),
    ("frobnicate",),
]


@pytest.mark.parametrize("args", USAGE, ids=[" ".join(a) for a in USAGE])
def test_usage_errors_exit_2(outbox: Outbox, args: tuple[str, ...]) -> None:
    result = outbox(*args)
    assert result.code == 2, result
    assert result.out == ""
    assert "usage:" in result.err


def test_a_broken_config_exits_2_with_one_line(outbox: Outbox, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(MAILSRV), "webhooks", "list"],
        capture_output=True,
        text=True,
        env={**outbox.env(), "SMTP_WEBHOOK_SECRET": "not-a-secret"},
        timeout=60,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and "SMTP_WEBHOOK_SECRET" in done.stderr


@pytest.mark.parametrize("size", [None, "24", "64"])
def test_secret_prints_a_new_secret_a_verifier_accepts(outbox: Outbox, size: str | None) -> None:
    args = ("secret",) if size is None else ("secret", "--bytes", size)
    first, second = outbox.ok(*args).strip(), outbox.ok(*args).strip()
    assert first != second and first.startswith("whsec_")
    assert len(decode_secret(first)) == int(size or 32)
    hook = standardwebhooks.Webhook(first)
    assert hook.sign("evt_1", datetime.now(), "{}").startswith("v1,")


def test_a_broken_entry_is_reported_not_fatal(outbox: Outbox) -> None:
    good = outbox.add(message_entry(endpoint="default"))
    (outbox.root / f"evt_{'f' * 32}.default.json").write_text("{")
    result = outbox("list")
    assert result.code == 0, result
    assert good.key in result.out
    assert result.err.startswith("mailsrv: warning: skipping outbox entry")
