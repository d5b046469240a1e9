"""The configuration reference in README.rst, rendered from the declaration in mailsrv.config.

Every setting is rendered from its :func:`~mailsrv.config.setting` declaration: the file key,
the ``SMTP_*`` variable and the ``twistd mailsrv`` flag (from :class:`mailsrv.tap.Options`), the
default as an operator writes it in the environment or a flag (secrets show none), the one-line
description, and whether a ``SIGHUP`` applies a change (:data:`mailsrv.reload.RELOADABLE`, read
when the reference is rendered).  The output depends on nothing else, so it is the same on every
machine.

``python -m mailsrv.config_reference`` prints the block; ``--write README.rst`` replaces the
block between the :data:`BEGIN` and :data:`END` comments of that file.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import Field

from mailsrv import reload
from mailsrv.config import SETTINGS, env_name, flag_name

BEGIN = ".. BEGIN config reference"
END = ".. END config reference"
REGENERATE = "python -m mailsrv.config_reference --write README.rst"

_UNITS = (("G", 1024**3), ("M", 1024**2), ("K", 1024))


def _accepts(parse: Callable[[object], object], text: str) -> bool:
    try:
        parse(text)
    except ValueError:
        return False
    return True


def _is_size(parse: Callable[[object], object]) -> bool:
    """Whether the parser reads sizes with K/M/G suffixes (then defaults are shown so)."""
    try:
        return parse("1K") == 1024
    except ValueError:
        return False


def written(value: object, size: bool = False) -> str:
    """``value`` as it is written in the environment or a flag: lists comma-separated,
    ``alias=target`` pairs, ``true``/``false``, whole seconds without ``.0``, sizes with the
    largest exact K/M/G suffix when ``size``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and size and value:
        for suffix, unit in _UNITS:
            if value % unit == 0:
                return f"{value // unit}{suffix}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple):
        return ",".join("=".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value)
    return str(value)


def _flags() -> set[str]:
    """The flags ``twistd mailsrv`` declares (imported here: the tap pulls in every part)."""
    from mailsrv.tap import Options

    return {str(parameter[0]) for parameter in Options.optParameters}


def _sentence(doc: str) -> str:
    """The description as RST: `code` as a literal, a trailing ``_`` or a ``*`` escaped."""
    text = re.sub(r"`([^`]+)`", r"``\1``", doc)
    text = re.sub(r"(?<=\w)_(?=\s|$)", r"\\_", text)
    text = text.replace("*", r"\*").replace("|", r"\|")
    return text if text.endswith(".") else text + "."


def entry(key: str, spec: Field[object], flags: set[str]) -> list[str]:
    """The definition-list entry of one setting."""
    parse = spec.metadata["parse"]
    default = spec.default
    text = written(default)
    lines = [f"``{key}``", f"    {_sentence(spec.metadata['doc'])}"]
    if spec.metadata["secret"]:
        shown = "Secret: no default shown, masked by ``check-config``"
    elif text:
        shown = f"Default ``{written(default, _is_size(parse))}``"
    else:
        shown = "Default empty"
    applies = "``SIGHUP`` applies it" if key in reload.RELOADABLE else "needs a restart"
    lines.append(f"    {shown}; {applies}.")
    if not _accepts(parse, text):  # its parser takes TOML tables only (``[[webhooks]]``)
        lines.append("    Config file only: no variable or flag.")
    else:
        names = [f"``{env_name(key)}``"]
        if flag_name(key) in flags:
            names.append(f"``--{flag_name(key)}``")
        lines.append(f"    {', '.join(names)}.")
    return lines


def render() -> str:
    """The whole block, markers included, ending with a newline."""
    flags = _flags()
    lines = [
        BEGIN,
        "   Generated from mailsrv/config.py; do not edit by hand.  Regenerate with:",
        f"   {REGENERATE}",
        "",
    ]
    for key, spec in SETTINGS.items():
        lines.extend(entry(key, spec, flags))
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


class MarkerError(ValueError):
    """The file has no (or a broken) pair of reference markers."""


def current_block(text: str) -> str:
    """The block between the markers in ``text``, markers included (MarkerError if none)."""
    start = text.find(BEGIN + "\n")
    end = text.find(END + "\n", start + 1)
    if start < 0 or end < 0 or text.count(BEGIN) != 1 or text.count(END) != 1:
        raise MarkerError(f"expected one {BEGIN!r} line and one {END!r} line after it")
    return text[start : end + len(END) + 1]


def replace_block(text: str, block: str) -> str:
    """``text`` with its reference block replaced by ``block``."""
    return text.replace(current_block(text), block, 1)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the reference, or write it into a file; 1 with one line when the file is unusable."""
    parser = argparse.ArgumentParser(
        prog="python -m mailsrv.config_reference",
        description="Render the configuration reference of README.rst from mailsrv/config.py.",
    )
    parser.add_argument("--write", metavar="FILE", help="replace the block between the markers")
    args = parser.parse_args(argv)
    block = render()
    if args.write is None:
        sys.stdout.write(block)
        return 0
    try:
        with open(args.write, encoding="utf-8") as f:
            text = f.read()
        new = replace_block(text, block)
        if new != text:
            with open(args.write, "w", encoding="utf-8") as f:
                f.write(new)
    except (OSError, MarkerError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        print(f"config_reference: {args.write}: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
