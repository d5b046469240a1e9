"""``mailsrv users``: accounts and aliases in the configured user store.

``add LOGIN``, ``delete LOGIN``, ``passwd LOGIN``, ``list``, ``show LOGIN``, ``enable LOGIN``,
``disable LOGIN``, and ``alias add ADDRESS LOGIN``, ``alias delete ADDRESS``, ``alias list``.

The command reads the same config file and ``SMTP_*`` environment as the server, and goes
through the same store code (``open_user_store``) on the Twisted reactor (``task.react``), so it
works against SQLite or PostgreSQL alike, also while the server runs.  Passwords come from the
terminal (asked twice) or from one line of standard input (``--password-stdin``), never from the
command line, and are stored as Argon2id hashes (plus a CRAM-MD5 context with ``--cram-md5``).
Errors are one line on standard error: exit status 1 for a refused operation, 2 for a bad
configuration or usage.
"""

from __future__ import annotations

import argparse
import getpass
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from mailsrv.auth.factory import describe_error, store_location
from mailsrv.auth.store import DuplicateAccount
from mailsrv.cli.reach import become_owner_of
from mailsrv.cli.user_import import parse_rows
from mailsrv.config import Config, ConfigError, load
from mailsrv.identity import InvalidAddress, canonical_address, display_address

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 130


class CommandError(Exception):
    """An error to print as one line, with the exit status to use."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Context:
    """What an action needs: its arguments, the configuration, an open store, the reactor."""

    args: argparse.Namespace
    config: Config
    store: Any
    reactor: Any
    out: TextIO

    def now(self) -> float:
        seconds: float = self.reactor.seconds()
        return seconds

    def say(self, line: str) -> None:
        print(line, file=self.out)


Action = Callable[[Context], Awaitable[None]]


# --- argument parsing --------------------------------------------------------------------------


def register(commands: Any) -> None:
    """Add ``users`` and its actions to the top-level parser."""
    parser = commands.add_parser(
        "users",
        help="manage user accounts and aliases",
        description="Manage the accounts (logins for SMTP AUTH) and their aliases.",
    )
    actions = parser.add_subparsers(dest="users_action", metavar="ACTION", required=True)

    def action(name: str, function: Action, summary: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = actions.add_parser(name, help=summary, description=summary)
        sub.set_defaults(run=run, action=function)
        return sub

    def password_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--password-stdin",
            action="store_true",
            help="read the password from one line of standard input instead of the terminal",
        )
        sub.add_argument(
            "--cram-md5",
            action="store_true",
            help="also store a CRAM-MD5 secret (password-equivalent for CRAM-MD5 only)",
        )

    add = action("add", _add, "create an enabled account; asks for its password")
    add.add_argument("login", help="the login, a mail address (local@domain)")
    password_options(add)
    add.add_argument(
        "--send-as-any", action="store_true", help="allow MAIL FROM any address, not only its own"
    )
    action("delete", _delete, "delete an account and its aliases").add_argument("login")
    passwd = action("passwd", _passwd, "set a new password; asks for it")
    passwd.add_argument("login")
    password_options(passwd)
    action("list", _list, "list the accounts, one per line, with their status")
    action("show", _show, "show one account (never its password hash)").add_argument("login")
    action("enable", _enable, "let an account log in again").add_argument("login")
    action("disable", _disable, "stop an account from logging in").add_argument("login")

    importing = action(
        "import",
        _import,
        "create accounts from FILE with the password hashes they already have (CSV"
        " address,hash[,enabled] or JSON lines; Argon2id, bcrypt, SHA512-crypt, Dovecot"
        " {SCHEME} prefixes)",
    )
    importing.add_argument("file", metavar="FILE", help="the accounts file, or - for stdin")
    importing.add_argument(
        "--dry-run", action="store_true", help="check every row and say what would be imported"
    )

    alias = actions.add_parser("alias", help="manage aliases (addresses delivered to an account)")
    alias_actions = alias.add_subparsers(dest="alias_action", metavar="ACTION", required=True)
    alias_add = alias_actions.add_parser("add", help="deliver ADDRESS to the account LOGIN")
    alias_add.add_argument("address")
    alias_add.add_argument("login")
    alias_add.set_defaults(run=run, action=_alias_add)
    alias_delete = alias_actions.add_parser("delete", help="remove an alias")
    alias_delete.add_argument("address")
    alias_delete.set_defaults(run=run, action=_alias_delete)
    alias_list = alias_actions.add_parser("list", help="list aliases: ADDRESS<TAB>LOGIN")
    alias_list.set_defaults(run=run, action=_alias_list)


# --- running -------------------------------------------------------------------------------------


def _error(message: str) -> None:
    print(f"mailsrv: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Load the configuration, then run the action on the reactor; returns the exit status."""
    try:
        config = load(args.config, os.environ)
    except ConfigError as e:
        _error(str(e))
        return EXIT_USAGE
    try:  # refuse bad addresses and unreadable files before touching the database
        for name in ("login", "address"):
            if isinstance(getattr(args, name, None), str):
                address(getattr(args, name))
        if getattr(args, "action", None) is _import:
            args.import_rows = parse_rows(read_import_file(args.file))
    except CommandError as e:
        _error(str(e))
        return e.status
    if not config.db_url:  # run as root, the SQLite files it writes stay the server's
        from mailsrv.auth import migrations

        migrations.available("sqlite")  # read (and import what reads them) while still root
        database = config.sqlite_path
        become_owner_of(database if database.exists() else database.parent)
    from twisted.internet import task

    status: list[int] = []

    async def main(reactor: Any) -> None:
        status.append(await _execute(reactor, args, config))

    try:
        task.react(main)
    except SystemExit as e:
        if not status:  # react() only exits on its own if main() failed unexpectedly
            return e.code if isinstance(e.code, int) else EXIT_ERROR
    return status[0] if status else EXIT_ERROR


async def _execute(reactor: Any, args: argparse.Namespace, config: Config) -> int:
    from mailsrv.auth.factory import open_user_store

    store = open_user_store(config, reactor)
    try:
        try:
            await store.open()
        except Exception as e:
            where = store_location(config)
            raise CommandError(f"cannot open the user store {where}: {describe_error(e)}") from None
        await args.action(Context(args, config, store, reactor, sys.stdout))
        return EXIT_OK
    except CommandError as e:
        _error(str(e))
        return e.status
    except KeyboardInterrupt:
        _error("cancelled")
        return EXIT_CANCELLED
    except Exception as e:
        _error(describe_error(e))
        return EXIT_ERROR
    finally:
        try:
            await store.close()
        except Exception as e:
            _error(f"closing the user store: {describe_error(e)}")


# --- helpers -----------------------------------------------------------------------------------


def address(text: str) -> str:
    """The address in canonical form (``mailsrv.identity``), or CommandError."""
    try:
        return canonical_address(text)
    except InvalidAddress as error:
        raise CommandError(str(error)) from None


async def existing(ctx: Context, login: str) -> Any:
    """The account ``login`` (validated), or CommandError."""
    account = await ctx.store.get_account(address(login))
    if account is None:
        raise CommandError(f"no such user {address(login)}")
    return account


def _have_terminal() -> bool:
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return sys.stdin.isatty()
    os.close(fd)
    return True


def read_password(args: argparse.Namespace) -> str:
    """The new password: one line of stdin, or asked twice on the terminal.

    Blocking, on purpose: nothing else runs in this command while it waits for the user.
    Ctrl-C works meanwhile (the reactor's SIGINT handler is set aside).
    """
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
    else:
        if not _have_terminal():
            raise CommandError(
                "no terminal to ask for the password: use --password-stdin", EXIT_USAGE
            )
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            password = getpass.getpass("Password: ")
            if password and getpass.getpass("Repeat password: ") != password:
                raise CommandError("the passwords do not match")
        except EOFError:
            raise CommandError("no password given") from None
        finally:
            signal.signal(signal.SIGINT, previous)
    if not password:
        raise CommandError("empty password refused")
    return password


async def hash_password(ctx: Context, password: str) -> tuple[str, str | None]:
    """The Argon2id hash (and the CRAM-MD5 context if asked), computed in a thread."""
    from twisted.internet.threads import deferToThread

    from mailsrv.auth import cram
    from mailsrv.auth.factory import make_hasher

    def compute() -> tuple[str, str | None]:
        hashed = make_hasher(ctx.config).hash(password)
        return hashed, cram.make_context(password) if ctx.args.cram_md5 else None

    result: tuple[str, str | None] = await deferToThread(compute)
    return result


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


# --- the actions -----------------------------------------------------------------------------


async def _add(ctx: Context) -> None:
    login = address(ctx.args.login)
    if await ctx.store.get_account(login) is not None:
        raise CommandError(f"user {login} already exists")
    owner = await ctx.store.find_owner(login)
    if owner is not None:
        raise CommandError(f"{login} is already an alias of {owner.login}")
    password_hash, context = await hash_password(ctx, read_password(ctx.args))
    await ctx.store.add_account(login, password_hash, context, ctx.args.send_as_any, ctx.now())
    ctx.say(f"user {login} added")


async def _delete(ctx: Context) -> None:
    login = address(ctx.args.login)
    await ctx.store.delete_account(login)
    ctx.say(f"user {login} deleted")


async def _passwd(ctx: Context) -> None:
    account = await existing(ctx, ctx.args.login)
    password_hash, context = await hash_password(ctx, read_password(ctx.args))
    await ctx.store.set_password(account.login, password_hash, context, ctx.now())
    ctx.say(f"password of {account.login} changed")
    if account.cram_md5 and context is None:
        print(
            f"mailsrv: note: the CRAM-MD5 secret of {account.login} was removed"
            " (use --cram-md5 to keep CRAM-MD5 working)",
            file=sys.stderr,
        )


async def _list(ctx: Context) -> None:
    for account in await ctx.store.list_accounts():
        ctx.say(f"{account.login}\t{'enabled' if account.enabled else 'disabled'}")


async def _show(ctx: Context) -> None:
    account = await existing(ctx, ctx.args.login)
    readable = display_address(account.login)
    ctx.say(
        f"login:       {account.login}" + (f" ({readable})" if readable != account.login else "")
    )
    ctx.say(f"enabled:     {_yes(account.enabled)}")
    ctx.say(f"send-as-any: {_yes(account.send_as_any)}")
    ctx.say(f"cram-md5:    {_yes(account.cram_md5 is not None)}")
    ctx.say(f"aliases:     {', '.join(account.aliases) if account.aliases else '-'}")
    ctx.say(f"created:     {_iso(account.created)}")
    ctx.say(f"updated:     {_iso(account.updated)}")


async def _set_enabled(ctx: Context, enabled: bool) -> None:
    login = address(ctx.args.login)
    await ctx.store.set_enabled(login, enabled, ctx.now())
    ctx.say(f"user {login} {'enabled' if enabled else 'disabled'}")


async def _enable(ctx: Context) -> None:
    await _set_enabled(ctx, True)


async def _disable(ctx: Context) -> None:
    await _set_enabled(ctx, False)


def read_import_file(path: str) -> str:
    """The text of the accounts file (``-``: standard input), or CommandError."""
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise CommandError(f"{path}: not UTF-8 text", EXIT_USAGE) from None
    except OSError as e:
        raise CommandError(f"{path}: {e.strerror}", EXIT_USAGE) from None


async def _import(ctx: Context) -> None:
    rows, rejected = ctx.args.import_rows
    reasons = {r.line: r.reason for r in rejected}
    imported = 0
    for row in rows:
        taken = await ctx.store.get_account(row.login) or await ctx.store.find_owner(row.login)
        if taken is not None:
            reasons[row.line] = f"{row.login} already exists (account {taken.login})"
            continue
        if ctx.args.dry_run:
            imported += 1
            continue
        try:
            await ctx.store.add_account(row.login, row.password_hash, None, False, ctx.now())
        except DuplicateAccount:
            reasons[row.line] = f"{row.login} already exists"
            continue
        if not row.enabled:
            await ctx.store.set_enabled(row.login, False, ctx.now())
        imported += 1
    where = "standard input" if ctx.args.file == "-" else ctx.args.file
    for line in sorted(reasons):
        _error(f"{where}: line {line}: {reasons[line]}")
    verb = "would import" if ctx.args.dry_run else "imported"
    ctx.say(f"{verb} {imported} account(s); {len(reasons)} row(s) rejected")
    if reasons:
        raise CommandError(f"{len(reasons)} row(s) of {where} not imported")


async def _alias_add(ctx: Context) -> None:
    alias, login = address(ctx.args.address), address(ctx.args.login)
    await ctx.store.add_alias(alias, login, ctx.now())
    ctx.say(f"alias {alias} -> {login} added")


async def _alias_delete(ctx: Context) -> None:
    alias = address(ctx.args.address)
    await ctx.store.remove_alias(alias)
    ctx.say(f"alias {alias} deleted")


async def _alias_list(ctx: Context) -> None:
    for alias, login in await ctx.store.list_aliases():
        ctx.say(f"{alias}\t{login}")
