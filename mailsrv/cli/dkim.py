"""``mailsrv dkim``: DKIM signing keys, their DNS records, and rotation.

``keygen DOMAIN [--selector S] [--type rsa|ed25519]``, ``list [--json]``,
``record DOMAIN [--selector S]``, ``check DOMAIN [--selector S]``,
``activate DOMAIN SELECTOR [--force]``, ``remove DOMAIN SELECTOR [--force]``.

Keys live under ``<data_dir>/dkim`` (:mod:`mailsrv.dkim.keys`); the command reads the same
config file and ``SMTP_*`` environment as the server.  ``keygen`` prints the TXT record to
publish as zone-file lines (comments start with ``;``), so its output can go into a zone file
as it is.  After a change, a running server is told over its control socket to read the keys
again, so it signs with them at once (a server that cannot be told is named in a warning:
send it SIGHUP).  Run as root, the command writes as the owner of the data directory.

Errors are one line on standard error: exit status 1 for a refused operation (a bad domain,
selector or type, an existing selector, no data directory, a record that does not match), 2
for a bad configuration or usage.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailsrv.cli import reach
from mailsrv.cli.reach import error, printable
from mailsrv.config import Config, ConfigError, load
from mailsrv.dkim.keys import KeyDirectory, KeyRing, KeyType, StoredKey, key_type
from mailsrv.dkim.names import DkimError, default_selector, selector_name, signing_domain

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2

Action = Callable[[argparse.Namespace, Config], int]


def register(commands: Any) -> None:
    """Add ``dkim`` and its actions to the top-level parser."""
    parser = commands.add_parser(
        "dkim",
        help="DKIM signing keys: make, list, check, activate, remove",
        description="Make DKIM signing keys and print the DNS records to publish, check the "
        "published records, and rotate keys (several selectors per domain, one active per type).",
    )
    actions = parser.add_subparsers(dest="dkim_action", metavar="ACTION", required=True)

    def action(name: str, function: Action, summary: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = actions.add_parser(name, help=summary, description=summary)
        sub.set_defaults(run=run, action=function)
        return sub

    keygen = action(
        "keygen",
        _keygen,
        "make a key for DOMAIN and print its DNS record (the first key of a type is active)",
    )
    keygen.add_argument("domain", metavar="DOMAIN")
    keygen.add_argument(
        "--selector", metavar="S", help="its selector (default: s<yyyymm> and r or e: s202612r)"
    )
    keygen.add_argument("--type", default="rsa", metavar="TYPE", help="rsa (2048 bits) or ed25519")
    listing = action("list", _list, "list every key: domain, selector, type, state, created")
    listing.add_argument("--json", action="store_true", help="print the keys as JSON")
    record = action("record", _record, "print the DNS record of DOMAIN's active keys again")
    record.add_argument("domain", metavar="DOMAIN")
    record.add_argument("--selector", metavar="S", help="of this key instead")
    check = action("check", _check, "look the published records up and compare them with the keys")
    check.add_argument("domain", metavar="DOMAIN")
    check.add_argument("--selector", metavar="S", help="check this key (default: the active ones)")
    activate = action(
        "activate", _activate, "sign with SELECTOR from now on (checks its record first)"
    )
    activate.add_argument("domain", metavar="DOMAIN")
    activate.add_argument("selector", metavar="SELECTOR")
    activate.add_argument(
        "--force", action="store_true", help="even if its published record does not match"
    )
    remove = action("remove", _remove, "delete a key that no longer signs")
    remove.add_argument("domain", metavar="DOMAIN")
    remove.add_argument("selector", metavar="SELECTOR")
    remove.add_argument(
        "--force", action="store_true", help="even the active one (its type stops signing)"
    )


def run(args: argparse.Namespace) -> int:
    """Run one ``mailsrv dkim`` action; returns the exit status."""
    try:
        config = load(args.config, os.environ)
    except ConfigError as e:
        error(str(e))
        return EXIT_CONFIG
    try:
        status: int = args.action(args, config)
    except DkimError as e:
        error(printable(str(e)))
        return EXIT_ERROR
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        error(printable(f"{where}{e.strerror or type(e).__name__}"))
        return EXIT_ERROR
    return status


# --- actions ---------------------------------------------------------------------------------


def _keygen(args: argparse.Namespace, config: Config) -> int:
    domain = signing_domain(args.domain)
    kind = key_type(args.type)
    selector = selector_name(args.selector) if args.selector else None
    data_dir = Path(config.data_dir)
    if not data_dir.is_dir():
        raise DkimError(
            f"data_dir {data_dir} does not exist: create it (mode 0700) or start the server once"
        )
    reach.become_queue_owner(data_dir)
    if selector is None:
        selector = default_selector(reach.now(), kind.letter)
    key = KeyDirectory(config.dkim_dir).create(domain, selector, kind)
    if key.active:
        state = f"active: it signs {domain}'s mail from now on"
        then = f"publish this TXT record, then check it: mailsrv dkim check {domain}"
    else:
        state = "not active yet"
        then = (
            "publish this TXT record, let it reach the resolvers (its TTL), then sign with it: "
            f"mailsrv dkim activate {domain} {selector}"
        )
    print(f"; {domain}: {key.description} key, selector {selector}, {state}")
    print(f"; key file: {key.path}")
    print(f"; {then}")
    _print_record(key)
    if key.active:
        _tell_server(config)
    return EXIT_OK


def _list(args: argparse.Namespace, config: Config) -> int:
    ring = _keys(config)
    if args.json:
        print(json.dumps([_as_json(key) for key in ring.keys], indent=2))
        return EXIT_OK
    if not ring.keys:
        print("No DKIM keys (mailsrv dkim keygen DOMAIN makes one)")
        return EXIT_OK
    rows = [("DOMAIN", "SELECTOR", "TYPE", "STATE", "CREATED")]
    rows += [
        (k.domain, k.selector, k.description, "active" if k.active else "-", _when(k.created))
        for k in ring.keys
    ]
    widths = [max(len(row[n]) for row in rows) for n in range(len(rows[0]) - 1)]
    for *cells, created in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)),
            created,
            sep="  ",
        )
    return EXIT_OK


def _record(args: argparse.Namespace, config: Config) -> int:
    for key in _selected(config, signing_domain(args.domain), args.selector):
        print(f"; {key.domain}: {key.description} key, selector {key.selector}, {_state(key)}")
        _print_record(key)
    return EXIT_OK


def _check(args: argparse.Namespace, config: Config) -> int:
    keys = _selected(config, signing_domain(args.domain), args.selector)
    verdicts = _verdicts(config, keys)
    status = EXIT_OK
    for key, verdict in zip(keys, verdicts, strict=True):
        line = f"{key.domain} {key.selector} ({key.type.value}, {_state(key)}): {verdict.reason}"
        if verdict.matches:
            print(line)
        else:
            error(printable(line))
            status = EXIT_ERROR
    return status


def _activate(args: argparse.Namespace, config: Config) -> int:
    domain, selector = signing_domain(args.domain), selector_name(args.selector)
    directory = KeyDirectory(config.dkim_dir)
    ring = _keys(config)
    key = ring.get(domain, selector)
    if key is None:
        raise DkimError(f"{domain} has no key with selector {selector!r}")
    if not args.force:
        [verdict] = _verdicts(config, [key])
        if not verdict.matches:
            raise DkimError(
                f"{domain} {selector} not activated: {verdict.reason} (publish it first: "
                f"mailsrv dkim record {domain} --selector {selector}; or --force)"
            )
    before = [k.selector for k in ring.of_domain(domain) if k.active and k.type is key.type]
    reach.become_queue_owner(Path(config.data_dir))
    directory.activate(domain, selector)
    was = f" (instead of {before[0]})" if before and before[0] != selector else ""
    print(f"{domain} {selector} is the active {key.type.value} key{was}")
    _tell_server(config)
    return EXIT_OK


def _remove(args: argparse.Namespace, config: Config) -> int:
    domain, selector = signing_domain(args.domain), selector_name(args.selector)
    reach.become_queue_owner(Path(config.data_dir))
    key = KeyDirectory(config.dkim_dir).remove(domain, selector, args.force)
    print(
        f"removed {domain} {selector} ({key.description}); its TXT record {key.dns_name} can go "
        "once the mail it signed has been delivered"
    )
    if key.active:
        _tell_server(config)
    return EXIT_OK


# --- helpers ---------------------------------------------------------------------------------


def _keys(config: Config) -> KeyRing:
    return KeyDirectory(config.dkim_dir).load()


def _selected(config: Config, domain: str, selector: str | None) -> list[StoredKey]:
    """The key ``selector`` of ``domain``, or its active keys (DkimError if there is none)."""
    ring = _keys(config)
    if selector is not None:
        key = ring.get(domain, selector_name(selector))
        if key is None:
            raise DkimError(f"{domain} has no key with selector {selector_name(selector)!r}")
        return [key]
    keys = [key for key in ring.of_domain(domain) if key.active]
    if not keys:
        raise DkimError(f"{domain} has no active DKIM key (mailsrv dkim list shows every key)")
    return sorted(keys, key=lambda k: k.type is not KeyType.RSA)


def _verdicts(config: Config, keys: list[StoredKey]) -> list[Any]:
    from mailsrv.dkim.check import check_keys

    async def look_up(reactor: Any) -> dict[str, Any]:
        return {"verdicts": await check_keys(config, reactor, keys)}

    verdicts: list[Any] = reach.run_on_files(look_up)["verdicts"]
    return verdicts


def _print_record(key: StoredKey) -> None:
    from mailsrv.dkim.record import zone_line

    print(zone_line(key))


def _state(key: StoredKey) -> str:
    return "active" if key.active else "not active"


def _when(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _as_json(key: StoredKey) -> dict[str, Any]:
    from mailsrv.dkim.record import txt_value

    return {
        "domain": key.domain,
        "selector": key.selector,
        "type": key.type.value,
        "bits": key.bits,
        "active": key.active,
        "created": key.created,
        "path": str(key.path),
        "dns_name": key.dns_name,
        "record": txt_value(key),
    }


@dataclass(frozen=True)
class _Reload:
    """The control-socket request that makes the running server read its keys again."""

    def to_json(self) -> dict[str, Any]:
        from mailsrv.dkim.signer import RELOAD_ACTION

        return {"action": RELOAD_ACTION}


def _tell_server(config: Config) -> None:
    """Have a running server read the keys again (nothing when none runs: it reads them when
    it starts); a server that cannot be told is a warning, the change is made either way."""
    from mailsrv.relay.control import ControlError, ask
    from mailsrv.relay.queue_lock import direct_access

    try:
        with direct_access(config.queue_dir) as direct:
            if direct:
                return
            response = ask(config.queue_socket, _Reload())
    except (ControlError, OSError) as e:
        response = {"ok": False, "error": str(e)}
    if response.get("ok"):
        error(f"the running server reloaded its keys: {response.get('outcome', '')}")
    else:
        reason = printable(str(response.get("error", "refused")))
        error(f"warning: the running server did not reload its keys ({reason}): send it SIGHUP")
