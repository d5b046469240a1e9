"""The rows of ``mailsrv users import``: formats, and every way a row is refused."""

from __future__ import annotations

import json

import pytest
from passlib.hash import argon2, bcrypt

from mailsrv.cli.user_import import parse_rows

ARGON = argon2.using(type="ID", rounds=1, memory_cost=8, parallelism=1).hash("pw")
BCRYPT = bcrypt.using(rounds=4).hash("pw")


@pytest.mark.parametrize(
    "line",
    [
        f"a@example.org,{ARGON}",
        f'a@example.org,"{ARGON}"',
        f'a@example.org,"{ARGON}",true',
        f"a@example.org,{ARGON},yes",
        json.dumps({"address": "a@example.org", "hash": ARGON}),
        json.dumps({"address": "a@example.org", "hash": "{ARGON2ID}" + ARGON, "enabled": True}),
    ],
)
def test_an_argon2_hash_with_its_commas_is_taken_quoted_or_not(line: str) -> None:
    rows, rejected = parse_rows(line + "\n")
    assert rejected == []
    (row,) = rows
    assert (row.login, row.scheme, row.enabled) == ("a@example.org", "argon2id", True)
    assert row.password_hash.endswith(ARGON)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"address": "a@example.org"', "not JSON"),
        ('{"address": "a@example.org", "hash": "x"}\n[1, 2]', "not a JSON object"),
        (json.dumps({"address": "a@example.org", "hash": BCRYPT, "pw": "x"}), "unknown field"),
        (json.dumps({"hash": BCRYPT}), "no address"),
        (json.dumps({"address": "a@example.org", "hash": BCRYPT, "enabled": "perhaps"}), "enabled"),
        ("a@example.org", "expected address,hash"),
        ("a@example.org,", "no password hash"),
        (f"a@@example.org,{BCRYPT}", ""),
        ("a@example.org,{PLAIN}secret", "not one mailsrv can verify"),
        ("a@example.org,{MD5-CRYPT}$1$abc$def", "not one mailsrv can verify"),
    ],
)
def test_bad_rows_are_refused_with_a_reason(text: str, reason: str) -> None:
    rows, rejected = parse_rows(text)
    assert rejected, rows
    assert reason in rejected[-1].reason
    assert "\n" not in rejected[-1].reason


def test_blank_lines_comments_and_a_header_are_skipped_and_lines_counted() -> None:
    text = f"\n# accounts\naddress,hash,enabled\nx@example.org,{BCRYPT},no\n\ny@example.org,bad\n"
    rows, rejected = parse_rows(text)
    assert [(r.line, r.login, r.enabled) for r in rows] == [(4, "x@example.org", False)]
    assert [r.line for r in rejected] == [6]
