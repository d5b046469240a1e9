"""``mailsrv check-config``: load the configuration as the server would and print it."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from mailsrv.config import ConfigError, describe, load
from mailsrv.tls import ReloadingServerTLS, TLSConfigError


def register(commands: Any) -> None:
    """Add the subcommand to the top-level parser."""
    parser = commands.add_parser(
        "check-config", help="validate the configuration and print the merged result"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when valid")
    parser.set_defaults(run=run)


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(
            "=".join(str(part) for part in item) if isinstance(item, tuple) else str(item)
            for item in value
        )
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def run(args: argparse.Namespace) -> int:
    """Validate (settings, and the TLS pair if TLS is on); print ``KEY=value`` lines; exit 2
    with one line on a bad configuration."""
    try:
        config = load(args.config, os.environ)
        if config.enable_tls:
            ReloadingServerTLS(config.tls_cert, config.tls_key)  # the same check as at start
    except (ConfigError, TLSConfigError) as e:
        print(f"mailsrv: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        for _key, env, value in describe(config):
            print(f"{env}={_show(value)}")
        print("configuration OK", file=sys.stderr)
    return 0
