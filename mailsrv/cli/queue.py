"""``mailsrv queue``: see and steer the relay queue, in the manner of postqueue and postsuper.

``list [--json]``, ``show ID``, ``flush [ID]``, ``delete ID [RECIPIENT]``,
``hold ID [RECIPIENT]``, ``release ID [RECIPIENT]``.

The command reads the same config file and ``SMTP_*`` environment as the server.  While a server
runs on the data directory (it holds ``queue/.lock``), the request goes to the server's control
socket and the server applies it in its reactor, with the same code as its own writes; when no
server runs, the command takes the lock itself and works on the files through that same code
(see :mod:`mailsrv.relay.queue_lock`).  ``flush`` needs a running server.  With ``queue_url``
(several nodes, one queue in PostgreSQL) it works on the database from any node, and every node
follows (:mod:`mailsrv.relay.cluster_admin`); ``list`` shows which node holds a message.  Run
as root, it works as the owner of the queue directory, so the files it writes stay the server's.

Errors are one line on standard error: exit status 1 for a bad or unknown queue id or recipient,
a refused operation or an unreachable server; 2 for a bad configuration or usage.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from mailsrv.cli import reach
from mailsrv.cli.reach import CommandError, duration, now, printable
from mailsrv.config import Config
from mailsrv.relay.control import Request, parse_request, perform
from mailsrv.relay.queue_store import NoSuchMessage, QueueError
from mailsrv.relay.records import QueueRecord, State, from_dict, to_dict

EXIT_OK = 0


def register(commands: Any) -> None:
    """Add ``queue`` and its actions to the top-level parser."""
    parser = commands.add_parser(
        "queue",
        help="list and steer the relay queue",
        description="List, show, retry, hold, release and delete queued outbound mail.",
    )
    actions = parser.add_subparsers(dest="queue_action", metavar="ACTION", required=True)

    def action(name: str, summary: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = actions.add_parser(name, help=summary, description=summary)
        sub.set_defaults(run=run, queue_id=None, recipient=None)
        return sub

    listing = action("list", "list queued messages and each recipient's state")
    listing.add_argument("--json", action="store_true", help="print the records as JSON")
    action("show", "print a message's record and headers").add_argument("queue_id", metavar="ID")
    flush = action("flush", "make the running server retry deferred mail now (one message or all)")
    flush.add_argument("queue_id", metavar="ID", nargs="?")
    for name, summary in (
        ("delete", "delete a message, or one recipient, without a bounce"),
        ("hold", "put a message, or one recipient, on hold"),
        ("release", "release a held message, or one recipient"),
    ):
        sub = action(name, summary)
        sub.add_argument("queue_id", metavar="ID")
        sub.add_argument("recipient", metavar="RECIPIENT", nargs="?")


def run(args: argparse.Namespace) -> int:
    """Run one ``mailsrv queue`` action; returns the exit status."""
    return reach.command(
        args.config,
        lambda: parse_request(
            {"action": args.queue_action, "queue_id": args.queue_id, "recipient": args.recipient}
        ),
        _perform,
        lambda request, response: _render(args, request, response),
        (QueueError,),
        "unreadable queue record",
    )


def _perform(config: Config, request: Request) -> dict[str, Any]:
    if config.queue_url:
        return _perform_on_cluster(config, request)
    root = config.queue_dir

    async def on_files(reactor: Any) -> dict[str, Any]:
        from twisted.internet.threads import deferToThread

        from mailsrv.relay.actions import StoreActions
        from mailsrv.relay.queue_store import FileQueueStore

        store = FileQueueStore(root, deferToThread)
        actions = StoreActions(store, reactor, deferToThread)
        if request.action == "flush":
            if request.queue_id is not None and await store.get(request.queue_id) is None:
                raise NoSuchMessage(request.queue_id)
            raise CommandError(
                f"no mailsrv server is running on {root.parent}: nothing can be retried "
                "now (once it runs, each recipient is tried at its next attempt time)"
            )
        return await perform(actions, request)

    return reach.perform(config, request, on_files)


def _perform_on_cluster(config: Config, request: Request) -> dict[str, Any]:
    """The request on the shared queue database (see :mod:`mailsrv.relay.cluster_admin`)."""
    from mailsrv.relay.cluster_admin import ClusterQueueAdmin, Row

    admin = ClusterQueueAdmin(config.queue_url, now, config.queue_statement_timeout)

    def with_lease(row: Row) -> dict[str, Any]:
        lease = None if row.lease is None else {"node": row.lease.node, "until": row.lease.until}
        return {**to_dict(row.record), "lease": lease}

    if request.action == "list":
        return {"ok": True, "messages": [with_lease(row) for row in admin.rows()]}
    if request.action == "show":
        assert request.queue_id is not None
        row, headers = admin.show(request.queue_id)
        text = headers.decode("utf-8", errors="replace")
        return {"ok": True, "record": with_lease(row), "headers": text}
    if request.action == "flush":
        return {"ok": True, "outcome": admin.flush(request.queue_id)}
    assert request.queue_id is not None
    method = {"delete": admin.delete, "hold": admin.hold, "release": admin.release}
    return {"ok": True, "outcome": method[request.action](request.queue_id, request.recipient)}


def _render(args: argparse.Namespace, request: Request, response: dict[str, Any]) -> None:
    if request.action == "list":
        if args.json:
            print(json.dumps(response["messages"], indent=2, ensure_ascii=False))
        else:
            raws = response["messages"]
            leases = {raw["queue_id"]: raw.pop("lease") for raw in raws if "lease" in raw}
            records = [from_dict(raw) for raw in raws]
            for line in listing(records, now(), leases):
                print(line)
    elif request.action == "show":
        lease = response["record"].pop("lease", None)
        record = from_dict(response["record"])  # validated, as from disk
        if lease is not None:
            print(f"*** LEASE: node {printable(lease['node'])} ***")
        print("*** RECORD ***")
        print(printable(json.dumps(response["record"], indent=2, ensure_ascii=False)))
        print(f"*** HEADERS ({record.size} bytes in all) ***")
        print(printable(response["headers"]), end="")
    else:
        print(printable(str(response["outcome"])))


def listing(
    records: list[QueueRecord], now: float, leases: dict[str, Any] | None = None
) -> list[str]:
    """The ``mailsrv queue list`` lines for ``records`` (as ``postqueue -p``, one message per
    block: id, size, age and sender, then one line per recipient).  With ``leases`` (the
    shared queue), a message a node works on says which."""
    if not records:
        return ["Mail queue is empty"]
    lines = [f"{'QUEUE ID':<18}{'SIZE':>10}{'AGE':>9}  SENDER / RECIPIENTS"]
    states: Counter[str] = Counter()
    for record in records:
        sender = printable(record.sender) if record.sender else "<>"
        age = duration(now - record.created_at)
        lease = (leases or {}).get(record.queue_id)
        held_by = f"  [node {printable(lease['node'])}]" if lease else ""
        lines.append(f"{record.queue_id:<18}{record.size:>10}{age:>9}  {sender}{held_by}")
        for r in record.recipients:
            states[r.state.value] += 1
            tries = "1 attempt" if r.attempts == 1 else f"{r.attempts} attempts"
            line = f"    {r.state.value:<9}{tries:<12} {printable(r.address)}"
            if r.state in (State.PENDING, State.DEFERRED) and r.next_attempt is not None:
                wait = r.next_attempt - now
                line += f"  next in {duration(wait)}" if wait > 0 else "  due now"
            lines.append(line)
            if r.last_reply:
                said = f"{printable(r.remote_mta)} said: " if r.remote_mta else ""
                reply = " ".join(printable(r.last_reply).split())
                lines.append(f"        ({said}{reply})")
        lines.append("")
    total = sum(r.size for r in records)
    count = sum(states.values())
    summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    plural = "message" if len(records) == 1 else "messages"
    lines.append(f"-- {len(records)} {plural}, {total} bytes, {count} recipient(s): {summary}")
    return lines
