"""The ``mailsrv`` admin command.  Subcommands: ``check-config``, ``users``, ``queue``,
``webhooks``, ``dkim``.

Every subcommand reads the same config file and ``SMTP_*`` environment as the server, and on
error prints one line to standard error and exits non-zero.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence

from mailsrv import __version__
from mailsrv.cli import check_config, dkim, queue, users, webhooks

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="mailsrv", description="mailsrv administration")
    parser.add_argument("--version", action="version", version=f"mailsrv {__version__}")
    parser.add_argument(
        "-c", "--config", help="TOML config file (default: $SMTP_CONFIG)", default=None
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    check_config.register(commands)
    users.register(commands)
    queue.register(commands)
    webhooks.register(commands)
    dkim.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    status: int = args.run(args)
    return status


def entry_point() -> None:
    """Console-script wrapper."""
    if isinstance(sys.stdout, io.TextIOWrapper):  # addresses may be UTF-8: never a traceback
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        sys.exit(main())
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(EXIT_ERROR)
