"""``mailsrv check-config``: load and check the configuration as the server would, and print it.

The checks are the server's own (:func:`mailsrv.preflight.check`: data directory, user
database, TLS pair, Argon2 cost), so a configuration that passes here starts, and a broken one
gives the same line here as from ``twistd mailsrv``.  Nothing is created or migrated.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from mailsrv.config import ConfigError, describe, display_path, load_with_sources, without_password
from mailsrv.preflight import PreflightError, check


def register(commands: Any) -> None:
    """Add the subcommand to the top-level parser."""
    parser = commands.add_parser(
        "check-config", help="validate the configuration and print the merged result"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when valid")
    parser.add_argument(
        "--show",
        action="store_true",
        help="print each value with where it came from (default, file, environment, flag)",
    )
    parser.set_defaults(run=run)


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(
            "=".join(str(part) for part in item) if isinstance(item, tuple) else str(item)
            for item in value
        )
    if isinstance(value, bool):
        return "true" if value else "false"
    # Endpoint and other values print as text; a URL in them keeps no password.
    return without_password(display_path(str(value)))  # an env path may not be UTF-8


def run(args: argparse.Namespace) -> int:
    """Validate the settings and run the start-up checks; print ``KEY=value`` lines; exit 2
    with one line on a bad configuration."""
    try:
        config, sources = load_with_sources(args.config, os.environ)
        check(config)
    except (ConfigError, PreflightError) as e:
        print(f"mailsrv: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        for key, env, value in describe(config):
            line = f"{env}={_show(value)}"
            if args.show:
                line += f"  # {sources.get(key, 'default')}"
            print(line)
        print("configuration OK", file=sys.stderr)
    return 0
