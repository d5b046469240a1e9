"""``mailsrv webhooks``: see and redrive the webhook outbox, and make signing secrets.

``list [--json]``, ``show ID``, ``redrive ID | --endpoint NAME | --all``,
``secret [--bytes N]``.

An ID is an event id (``evt_`` and 32 hex digits: every endpoint's entry of that event) or an
entry id (``<event id>.<endpoint>``: one).  Like ``mailsrv queue``, the command reads the same
config file and ``SMTP_*`` environment as the server, asks the running server over its control
socket, and works on the files itself under the queue's lock when no server runs
(:mod:`mailsrv.cli.reach`); a redrive then takes effect when the server starts.

Errors are one line on standard error: exit status 1 for a bad or unknown id or endpoint or an
unreachable server; 2 for a bad configuration or usage.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from mailsrv.cli import reach
from mailsrv.cli.reach import duration, now, printable
from mailsrv.config import Config
from mailsrv.webhook.control import WebhookRequest, parse_request, perform
from mailsrv.webhook.entries import EntryState, OutboxEntry, from_dict
from mailsrv.webhook.outbox_store import OutboxError
from mailsrv.webhook.signing import (
    DEFAULT_SECRET_BYTES,
    MAX_SECRET_BYTES,
    MIN_SECRET_BYTES,
    generate_secret,
)

EXIT_OK = 0


def register(commands: Any) -> None:
    """Add ``webhooks`` and its actions to the top-level parser."""
    parser = commands.add_parser(
        "webhooks",
        help="list and redrive webhook events, make secrets",
        description="List pending, dead-lettered and done webhook events, redrive dead "
        "letters, print a new signing secret.",
    )
    actions = parser.add_subparsers(dest="webhooks_action", metavar="ACTION", required=True)

    def action(name: str, summary: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = actions.add_parser(name, help=summary, description=summary)
        sub.set_defaults(run=run, id=None, endpoint=None, all=False, json=False)
        return sub

    listing = action("list", "list webhook events and endpoints")
    listing.add_argument("--json", action="store_true", help="print entries and endpoints as JSON")
    action("show", "print the entries of an event (or one entry)").add_argument(
        "id", metavar="ID", help="evt_... (every endpoint) or evt_....ENDPOINT (one)"
    )
    redrive = action("redrive", "send dead-lettered events again (and enable their endpoints)")
    which = redrive.add_mutually_exclusive_group(required=True)
    which.add_argument("id", metavar="ID", nargs="?", help="one event (or entry)")
    which.add_argument("--endpoint", metavar="NAME", help="every dead letter of one endpoint")
    which.add_argument("--all", action="store_true", help="every dead letter")
    secret = action("secret", "print a new whsec_ signing secret")
    secret.add_argument(
        "--bytes",
        type=int,
        default=DEFAULT_SECRET_BYTES,
        metavar="N",
        help=f"random bytes in it, {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} "
        f"(default {DEFAULT_SECRET_BYTES})",
    )
    secret.set_defaults(run=run_secret, parser=secret)


def run_secret(args: argparse.Namespace) -> int:
    """``mailsrv webhooks secret``: needs no configuration."""
    if not MIN_SECRET_BYTES <= args.bytes <= MAX_SECRET_BYTES:
        args.parser.error(f"--bytes: expected {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES}")
    print(generate_secret(args.bytes))
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Run one ``mailsrv webhooks`` action; returns the exit status."""
    return reach.command(
        args.config,
        lambda: parse_request(
            {"action": f"webhooks.{args.webhooks_action}", "id": args.id, "endpoint": args.endpoint}
        ),
        _perform,
        lambda request, response: _render(args, request, response),
        (OutboxError,),
        "unreadable outbox entry",
    )


def _perform(config: Config, request: WebhookRequest) -> dict[str, Any]:
    async def on_files(reactor: Any) -> dict[str, Any]:
        from twisted.internet.threads import deferToThread

        from mailsrv.webhook.actions import OutboxActions
        from mailsrv.webhook.service import open_stores

        if config.queue_url:
            return await _on_cluster(config, request, reactor)
        store, states = open_stores(config, deferToThread)
        actions = OutboxActions(store, states, config.webhook_endpoints, reactor)
        return await perform(actions, request)

    return reach.perform(config, request, on_files)


async def _on_cluster(config: Config, request: WebhookRequest, reactor: Any) -> dict[str, Any]:
    """With ``queue_url`` and no server running here: the request on the cluster's outbox in
    the queue database (every node follows a redrive: ``NOTIFY``)."""
    from twisted.internet.threads import deferToThread

    from mailsrv.relay.pg_queue import open_queue_database
    from mailsrv.relay.queue_store import QueueError
    from mailsrv.webhook.actions import OutboxActions
    from mailsrv.webhook.service import open_cluster_stores

    database = open_queue_database(config.queue_url, reactor)
    try:
        await database.open()
        store, states = open_cluster_stores(config, database, reactor, deferToThread)
        actions = OutboxActions(store, states, config.webhook_endpoints, reactor)
        return await perform(actions, request)
    except QueueError as e:
        raise OutboxError(str(e)) from None
    finally:
        await database.close()


# --- output ----------------------------------------------------------------------------------


def _render(args: argparse.Namespace, request: WebhookRequest, response: dict[str, Any]) -> None:
    if request.action == "list":
        if args.json:
            data = {"entries": response["entries"], "endpoints": response["endpoints"]}
            print(json.dumps(data, indent=2, ensure_ascii=False))
        else:
            entries = [from_dict(raw) for raw in response["entries"]]
            leases = response.get("leases") or {}
            for line in listing(entries, response["endpoints"], now(), leases):
                print(line)
    elif request.action == "show":
        for raw in response["entries"]:
            from_dict(raw)  # validated, as from disk
            print(printable(json.dumps(raw, indent=2, ensure_ascii=False)))
    else:
        print(printable(str(response["outcome"])))


def _when(entry: OutboxEntry, moment: float) -> str:
    if entry.state is EntryState.PENDING and entry.next_attempt is not None:
        wait = entry.next_attempt - moment
        return f"next in {duration(wait)}" if wait > 0 else "due now"
    if entry.finished_at is not None:
        return f"{duration(moment - entry.finished_at)} ago"
    return ""


def listing(
    entries: list[OutboxEntry],
    endpoints: list[dict[str, Any]],
    moment: float,
    leases: dict[str, dict[str, Any]] | None = None,
) -> list[str]:
    """The ``mailsrv webhooks list`` lines: the endpoints, then one block per entry (id, type,
    state, attempts, when; the last status or error beneath, and the node sending it, with
    several nodes)."""
    leases = leases or {}
    lines = []
    for endpoint in endpoints:
        where = printable(endpoint["url"]) if endpoint["url"] else "(not configured)"
        state = "enabled"
        disabled = endpoint["disabled"]
        if disabled:
            since = duration(moment - disabled["disabled_at"])
            state = f"DISABLED {since} ago ({printable(disabled['reason'])})"
        lines.append(
            f"endpoint {endpoint['name']} {where}: {state}; {endpoint['pending']} pending, "
            f"{endpoint['dead']} dead, {endpoint['done']} done"
        )
    if lines:
        lines.append("")
    if not entries:
        lines.append("Webhook outbox is empty")
        return lines
    states: Counter[str] = Counter()
    for entry in entries:
        states[entry.state.value] += 1
        tries = "1 attempt" if entry.attempts == 1 else f"{entry.attempts} attempts"
        lines.append(
            f"{entry.key}  {entry.type:<17} {entry.state.value:<7} {tries:<11} "
            f"{_when(entry, moment)}".rstrip()
        )
        if entry.last_attempt is not None:
            status = f"HTTP {entry.last_status}" if entry.last_status else "no response"
            said = entry.last_error or status
            lines.append(f"    (last: {' '.join(printable(said).split())})")
        lease = leases.get(entry.key)
        if lease is not None:
            left = duration(float(lease["until"]) - moment)
            lines.append(f"    (being sent by node {printable(str(lease['node']))}, lease {left})")
    summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    lines.append(f"-- {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}: {summary}")
    return lines
