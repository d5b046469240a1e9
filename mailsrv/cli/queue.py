"""``mailsrv queue``: see and steer the relay queue, in the manner of postqueue and postsuper.

``list [--json]``, ``show ID``, ``flush [ID]``, ``delete ID [RECIPIENT]``,
``hold ID [RECIPIENT]``, ``release ID [RECIPIENT]``.

The command reads the same config file and ``SMTP_*`` environment as the server.  While a server
runs on the data directory (it holds ``queue/.lock``), the request goes to the server's control
socket and the server applies it in its reactor, with the same code as its own writes; when no
server runs, the command takes the lock itself and works on the files through that same code
(see :mod:`mailsrv.relay.queue_lock`).  ``flush`` needs a running server.  Run as root, it works
as the owner of the queue directory, so the files it writes stay the server's.

Errors are one line on standard error: exit status 1 for a bad or unknown queue id or recipient,
a refused operation or an unreachable server; 2 for a bad configuration or usage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, cast

from mailsrv.config import Config, ConfigError, load
from mailsrv.relay.control import ControlError, Request, ask, parse_request, perform
from mailsrv.relay.queue_lock import direct_access
from mailsrv.relay.queue_store import NoSuchMessage, QueueError
from mailsrv.relay.records import QueueRecord, RecordError, State, from_dict

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """An error to print as one line (exit status 1)."""


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


def _error(message: str) -> None:
    print(f"mailsrv: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Run one ``mailsrv queue`` action; returns the exit status."""
    try:
        config = load(args.config, os.environ)
    except ConfigError as e:
        _error(str(e))
        return EXIT_USAGE
    try:
        request = parse_request(
            {"action": args.queue_action, "queue_id": args.queue_id, "recipient": args.recipient}
        )
        response = _perform(config, request)
        if not response["ok"]:
            raise CommandError(str(response.get("error", "refused")))
        _render(args, request, response)
    except (CommandError, QueueError, ControlError) as e:
        _error(str(e))
        return EXIT_ERROR
    except RecordError as e:
        _error(f"unreadable queue record: {e}")
        return EXIT_ERROR
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        _error(f"{where}{e.strerror or type(e).__name__}")
        return EXIT_ERROR
    return EXIT_OK


def _perform(config: Config, request: Request) -> dict[str, Any]:
    root = config.queue_dir
    _become_queue_owner(root)
    with direct_access(root) as direct:
        if not direct:
            return ask(config.queue_socket, request)
        return _react(root, request)


def _become_queue_owner(root: Path) -> None:
    """As root, act as the queue directory's owner (files written stay readable by the server)."""
    if os.geteuid() != 0:
        return
    try:
        owner = root.stat()
    except FileNotFoundError:
        return
    if owner.st_uid != 0:
        os.setgroups([])
        os.setegid(owner.st_gid)
        os.seteuid(owner.st_uid)


def _react(root: Path, request: Request) -> dict[str, Any]:
    """Apply ``request`` to the files under ``root`` ourselves, on a reactor and its threads."""
    from twisted.internet import task
    from twisted.internet.threads import deferToThread
    from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher

    from mailsrv.relay.actions import StoreActions
    from mailsrv.relay.queue_store import FileQueueStore

    outcome: list[Any] = []

    def warn(event: dict[str, Any]) -> None:  # e.g. an unreadable record skipped by list
        if event.get("log_level", LogLevel.info) >= LogLevel.warn:
            _error(f"warning: {printable(formatEvent(event))}")

    async def main(reactor: Any) -> None:
        store = FileQueueStore(root, deferToThread)
        actions = StoreActions(store, reactor, deferToThread)
        try:
            if request.action == "flush":
                if request.queue_id is not None and await store.get(request.queue_id) is None:
                    raise NoSuchMessage(request.queue_id)
                raise CommandError(
                    f"no mailsrv server is running on {root.parent}: nothing can be retried "
                    "now (once it runs, each recipient is tried at its next attempt time)"
                )
            outcome.append(await perform(actions, request))
        except Exception as e:
            outcome.append(e)

    observer = cast(ILogObserver, warn)
    globalLogPublisher.addObserver(observer)
    try:
        task.react(main)
    except SystemExit:
        pass
    finally:
        globalLogPublisher.removeObserver(observer)
    if not outcome:
        raise CommandError("the queue command stopped unexpectedly")
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    result: dict[str, Any] = outcome[0]
    return result


# --- output ----------------------------------------------------------------------------------

_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters (but tab and newline) as ``\\xNN``."""
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m[0]):02x}", text.replace("\r\n", "\n"))


def duration(seconds: float) -> str:
    """A short human duration: ``45s``, ``12m``, ``2h05m``, ``3d04h``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _now() -> float:
    from twisted.internet import reactor

    seconds: float = reactor.seconds()
    return seconds


def _render(args: argparse.Namespace, request: Request, response: dict[str, Any]) -> None:
    if request.action == "list":
        if args.json:
            print(json.dumps(response["messages"], indent=2, ensure_ascii=False))
        else:
            records = [from_dict(raw) for raw in response["messages"]]
            for line in listing(records, _now()):
                print(line)
    elif request.action == "show":
        record = from_dict(response["record"])  # validated, as from disk
        print("*** RECORD ***")
        print(printable(json.dumps(response["record"], indent=2, ensure_ascii=False)))
        print(f"*** HEADERS ({record.size} bytes in all) ***")
        print(printable(response["headers"]), end="")
    else:
        print(printable(str(response["outcome"])))


def listing(records: list[QueueRecord], now: float) -> list[str]:
    """The ``mailsrv queue list`` lines for ``records`` (as ``postqueue -p``, one message per
    block: id, size, age and sender, then one line per recipient)."""
    if not records:
        return ["Mail queue is empty"]
    lines = [f"{'QUEUE ID':<18}{'SIZE':>10}{'AGE':>9}  SENDER / RECIPIENTS"]
    states: Counter[str] = Counter()
    for record in records:
        sender = printable(record.sender) if record.sender else "<>"
        age = duration(now - record.created_at)
        lines.append(f"{record.queue_id:<18}{record.size:>10}{age:>9}  {sender}")
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
