"""etc/mailsrv.toml says what each setting does.

``tests/test_config.py`` proves the example lists every setting, names its variable and, once
uncommented, gives exactly the defaults; this adds the last part of the contract: every
``#key = default`` line sits under a comment that describes it (one comment may describe a
group of lines, as for the three line-length limits).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "mailsrv.toml"
_SETTING_LINE = re.compile(r"^#([a-z0-9_]+) = ")


def described() -> list[tuple[str, str]]:
    """Each setting line's key and the comment line above its group ('' when none)."""
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    found = []
    for number, line in enumerate(lines):
        match = _SETTING_LINE.match(line)
        if not match:
            continue
        above = number - 1
        while above >= 0 and _SETTING_LINE.match(lines[above]):
            above -= 1
        comment = lines[above] if above >= 0 else ""
        is_description = comment.startswith("# ") and not comment.startswith("# ---")
        found.append((match.group(1), comment if is_description else ""))
    return found


@pytest.mark.parametrize(("key", "comment"), described(), ids=[k for k, _ in described()])
def test_every_setting_line_has_a_description_above_it(key: str, comment: str) -> None:
    assert comment, f"{EXAMPLE}: #{key} = ... has no comment saying what it does"
    assert len(comment.removeprefix("# ").split()) >= 3, comment
