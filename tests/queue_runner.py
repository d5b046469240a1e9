"""A small queue process for the tests (no twistd): a control-socket server, or an update loop.

``python -m tests.queue_runner serve QUEUE_DIR [--churn ID]``
    Takes the queue lock, serves the control socket ``QUEUE_DIR/control.sock`` with the
    store-only actions, prints ``ready``; with ``--churn``, also changes record ID as fast as
    it can, as a scheduler would (attempts + 1 each time, through ``modify``), and prints
    ``churned N`` when stopped by SIGTERM.

``python -m tests.queue_runner update-loop QUEUE_DIR ID``
    Rewrites record ID with attempts 1, 2, 3, ... through ``update``, printing ``acked N`` once
    each write is durable; the tests SIGKILL it at random moments.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from twisted.internet import defer, reactor, threads

from mailsrv.relay.actions import StoreActions
from mailsrv.relay.control import QueueControlService
from mailsrv.relay.queue_lock import QueueLock
from mailsrv.relay.queue_store import FileQueueStore
from mailsrv.relay.records import QueueRecord


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def bump(record: QueueRecord) -> QueueRecord:
    """The record with one more attempt for every recipient."""
    return record.with_recipients(
        replace(r, attempts=r.attempts + 1, last_reply=f"451 4.4.1 attempt {r.attempts + 1}")
        for r in record.recipients
    )


def serve(root: Path, churn: str | None) -> None:
    lock = QueueLock(root)
    lock.acquire()
    store = FileQueueStore(root, threads.deferToThread)
    actions = StoreActions(store, reactor, threads.deferToThread)
    control = QueueControlService(root / "control.sock", actions, reactor, lock)
    churned = [0]
    running = [True]
    churning: list[defer.Deferred[None]] = []

    async def churn_loop(queue_id: str) -> None:
        while running[0]:
            await store.modify(queue_id, bump)
            churned[0] += 1

    async def stop() -> None:
        running[0] = False
        for loop in churning:
            await loop  # the change in flight is written and counted
        say(f"churned {churned[0]}")
        await control.stopService()

    def start() -> None:
        control.startService()
        reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
            "before", "shutdown", lambda: defer.ensureDeferred(stop())
        )
        if churn is not None:
            loop = defer.ensureDeferred(churn_loop(churn))
            loop.addErrback(lambda f: say(f"churn failed: {f.getErrorMessage()}"))
            churning.append(loop)
        say("ready")

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def update_loop(root: Path, queue_id: str) -> None:
    store = FileQueueStore(root, threads.deferToThread)

    async def loop() -> None:
        record = await store.get(queue_id)
        assert record is not None
        n = 0
        while True:
            n += 1
            record = record.with_recipients(replace(r, attempts=n) for r in record.recipients)
            await store.update(record)
            say(f"acked {n}")

    def start() -> None:
        defer.ensureDeferred(loop()).addErrback(lambda f: say(f"failed {f.getErrorMessage()}"))

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve")
    serve_parser.add_argument("root", type=Path)
    serve_parser.add_argument("--churn")
    loop_parser = commands.add_parser("update-loop")
    loop_parser.add_argument("root", type=Path)
    loop_parser.add_argument("queue_id")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.root, args.churn)
    else:
        update_loop(args.root, args.queue_id)


if __name__ == "__main__":
    main()
