"""How an admin command reaches the server's data: its control socket, or the files themselves.

While a server runs on the data directory (it holds ``queue/.lock``), a request goes to the
server's control socket and the server applies it in its reactor, with the same code as its own
writes; when no server runs, the command takes the lock itself and works on the files through
that same code, on a reactor of its own (see :mod:`mailsrv.relay.queue_lock`).  Run as root, it
works as the owner of the queue directory, so the files it writes stay the server's.
``mailsrv queue`` and ``mailsrv webhooks`` both go through :func:`perform`.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from mailsrv.config import Config
from mailsrv.relay.control import Sendable, ask
from mailsrv.relay.queue_lock import direct_access

R = TypeVar("R")

OnFiles = Callable[[Any], Awaitable[dict[str, Any]]]
"""Does the request on the files, given a running reactor; the response object."""


class CommandError(Exception):
    """An error to print as one line (exit status 1)."""


def error(message: str) -> None:
    """Print ``mailsrv: message`` on standard error."""
    print(f"mailsrv: {message}", file=sys.stderr)


def perform(config: Config, request: Sendable, on_files: OnFiles) -> dict[str, Any]:
    """The response to ``request``: from the running server, or from ``on_files``."""
    root = config.queue_dir
    become_queue_owner(root)
    with direct_access(root) as direct:
        if not direct:
            return ask(config.queue_socket, request)
        return run_on_files(on_files)


def become_queue_owner(root: Path) -> None:
    """As root, act as the queue directory's owner (files written stay readable by the server)."""
    become_owner_of(root)


def become_owner_of(path: Path) -> None:
    """As root, act as the owner of ``path`` (a directory or file of the server's; nothing if it
    is missing or root's), so what a command writes stays the server's."""
    if os.geteuid() != 0:
        return
    try:
        owner = path.stat()
    except FileNotFoundError:
        return
    if owner.st_uid != 0:
        os.setgroups([])
        os.setegid(owner.st_gid)
        os.seteuid(owner.st_uid)


def run_on_files(main: OnFiles) -> dict[str, Any]:
    """Run ``main`` on a reactor and its threads; its result, or the exception it raised.

    Warnings logged meanwhile (an unreadable record skipped by a listing) go to standard error.
    """
    from twisted.internet import task
    from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher

    outcome: list[Any] = []

    def warn(event: dict[str, Any]) -> None:
        if event.get("log_level", LogLevel.info) >= LogLevel.warn:
            error(f"warning: {printable(formatEvent(event))}")

    async def run(reactor: Any) -> None:
        try:
            outcome.append(await main(reactor))
        except Exception as e:
            outcome.append(e)

    observer = cast(ILogObserver, warn)
    globalLogPublisher.addObserver(observer)
    try:
        task.react(run)
    except SystemExit:
        pass
    finally:
        globalLogPublisher.removeObserver(observer)
    if not outcome:
        raise CommandError("the command stopped unexpectedly")
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


def now() -> float:
    """The time now, from the reactor's clock (the CLI's one reading of it)."""
    from twisted.internet import reactor

    seconds: float = reactor.seconds()
    return seconds


def command(
    config_file: str | None,
    parse: Callable[[], R],
    perform_request: Callable[[Config, R], dict[str, Any]],
    show: Callable[[R, dict[str, Any]], None],
    refused: tuple[type[Exception], ...],
    unreadable: str,
) -> int:
    """One admin command from start to exit status: load the configuration (2 and one line if
    it is bad), ``parse`` the request (1 and one line if it is refused, ``refused`` included),
    then :func:`answer` it with ``perform_request`` and ``show``."""
    from mailsrv.config import ConfigError, load
    from mailsrv.relay.control import ControlError

    try:
        config = load(config_file, os.environ)
    except ConfigError as e:
        error(str(e))
        return 2
    caught: tuple[type[Exception], ...] = (CommandError, ControlError, *refused)
    try:
        request = parse()
    except caught as e:
        error(str(e))
        return 1
    return answer(
        lambda: perform_request(config, request),
        lambda response: show(request, response),
        refused,
        unreadable,
    )


def answer(
    ask_server: Callable[[], dict[str, Any]],
    show: Callable[[dict[str, Any]], None],
    refused: tuple[type[Exception], ...],
    unreadable: str,
) -> int:
    """Send one request (``ask_server``), show its answer; the exit status, with one line on
    stderr for every way it can fail: 1 for a refusal (``refused``, a record that cannot be
    read, called ``unreadable``), a server that does not answer, or a file error."""
    from mailsrv.jsonstore.fields import RecordError
    from mailsrv.relay.control import ControlError

    caught: tuple[type[Exception], ...] = (CommandError, ControlError, *refused)
    try:
        response = ask_server()
        if not response["ok"]:
            raise CommandError(str(response.get("error", "refused")))
        show(response)
    except caught as e:
        error(str(e))
        return 1
    except RecordError as e:
        error(f"{unreadable}: {e}")
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        error(f"{where}{e.strerror or type(e).__name__}")
        return 1
    return 0
