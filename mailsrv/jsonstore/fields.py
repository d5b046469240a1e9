"""Strict reading of stored JSON records: every key known, every value of its type.

A record store refuses anything it did not write itself, with a :class:`RecordError` whose
message names the field (``recipients[1].state: 'lost' is not one of pending, ...``), so a
broken file is moved aside with a reason an operator can act on, never half-loaded.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from enum import Enum
from typing import Any, TypeVar

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

E = TypeVar("E", bound=Enum)


class RecordError(ValueError):
    """A stored record is broken or of an unknown version; the message says what is wrong."""


def _refuse_constant(name: str) -> float:
    raise RecordError(f"{name} is not a number")


_COMPACT = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(", ", ": "))


def encode_json(value: object) -> bytes:
    """``value`` as UTF-8 JSON with a final newline (how records are stored): an object has
    one key per line, and a list of objects one object per line, each value on one line.

    Readable with ``cat`` and diffable per field, and written by the C encoder: ``indent=``
    makes :mod:`json` fall back to its pure-Python encoder, several times slower, and records
    are encoded on the committer's thread for every message.
    """
    if not isinstance(value, dict) or not value:
        return (_COMPACT.encode(value) + "\n").encode("utf-8")
    lines = []
    for key, item in value.items():
        name = _COMPACT.encode(key)
        if isinstance(item, list) and item and all(isinstance(x, dict) for x in item):
            rows = ",\n".join("    " + _COMPACT.encode(x) for x in item)
            lines.append(f"  {name}: [\n{rows}\n  ]")
        else:
            lines.append(f"  {name}: {_COMPACT.encode(item)}")
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode("utf-8")


def decode_json(data: bytes) -> object:
    """Parse stored JSON; RecordError (not UTF-8, not JSON, NaN or Infinity) says where."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as e:
        raise RecordError(f"not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RecordError(f"not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def enum_value(kind: type[E], value: str, where: str) -> E:
    """The member of ``kind`` whose value is ``value``; RecordError listing the allowed ones."""
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(str(member.value) for member in kind)
        raise RecordError(f"{where}: {value!r} is not one of {allowed}") from None


class Fields:
    """Typed access to a JSON object with exactly ``keys``; RecordError names the bad field.

    With ``version``, the object's ``version`` key must equal it (a record of another version
    is refused before anything else is looked at).
    """

    def __init__(
        self, raw: object, where: str, keys: frozenset[str], version: int | None = None
    ) -> None:
        if not isinstance(raw, Mapping):
            raise RecordError(f"{where}: expected an object")
        if version is not None:
            found = raw.get("version")
            if found != version or isinstance(found, bool):
                raise RecordError(
                    f"version {found!r} is not supported (this mailsrv reads {version})"
                )
        missing = keys - raw.keys()
        if missing:
            raise RecordError(f"{where}: missing {', '.join(sorted(missing))}")
        unknown = raw.keys() - keys
        if unknown:
            raise RecordError(f"{where}: unknown {', '.join(sorted(map(str, unknown)))}")
        self._raw = raw
        self.where = where

    def value(self, key: str) -> Any:
        """The raw value of ``key``."""
        return self._raw[key]

    def bad(self, key: str, expected: str) -> RecordError:
        """The error for ``key`` not being what was ``expected``."""
        return RecordError(f"{self.where}.{key}: expected {expected}")

    def text(self, key: str, allow_empty: bool = False, allow_controls: bool = False) -> str:
        """A string (non-empty unless ``allow_empty``; no control characters unless allowed)."""
        value = self._raw[key]
        if not isinstance(value, str) or not (value or allow_empty):
            raise self.bad(key, "a string" if allow_empty else "a non-empty string")
        if not allow_controls and _CONTROL.search(value):
            raise self.bad(key, "no control characters")
        return value

    def optional_text(self, key: str, allow_controls: bool = False) -> str | None:
        """:meth:`text` or null."""
        if self._raw[key] is None:
            return None
        return self.text(key, allow_controls=allow_controls)

    def number(self, key: str) -> float:
        """A time: a finite, non-negative number of seconds since the epoch."""
        value = self._raw[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.bad(key, "a number")
        if not math.isfinite(value) or value < 0:
            raise self.bad(key, "a finite number of seconds since the epoch")
        return float(value)

    def optional_number(self, key: str) -> float | None:
        """:meth:`number` or null."""
        return None if self._raw[key] is None else self.number(key)

    def count(self, key: str) -> int:
        """A non-negative integer."""
        value = self._raw[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.bad(key, "a non-negative integer")
        return value

    def optional_count(self, key: str) -> int | None:
        """:meth:`count` or null."""
        return None if self._raw[key] is None else self.count(key)

    def flag(self, key: str) -> bool:
        """true or false."""
        value = self._raw[key]
        if not isinstance(value, bool):
            raise self.bad(key, "true or false")
        return value

    def text_list(self, key: str) -> list[str]:
        """A list of strings."""
        value = self._raw[key]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.bad(key, "a list of strings")
        return value
