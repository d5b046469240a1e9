"""The configuration reference in README.rst: current, complete, and true to the declaration."""

from __future__ import annotations

import functools
import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from mailsrv import config_reference as ref
from mailsrv.config import SETTINGS, Config, ConfigError, env_name, flag_name, load
from mailsrv.reload import RELOADABLE

README = Path(__file__).resolve().parent.parent / "README.rst"


def readme_block() -> str:
    return ref.current_block(README.read_text(encoding="utf-8"))


def test_the_readme_reference_is_current() -> None:
    assert readme_block() == ref.render(), (
        "README.rst's configuration reference differs from mailsrv/config.py"
        f" (and mailsrv/reload.py's RELOADABLE): run `{ref.REGENERATE}` and commit the result"
    )


@functools.cache
def entries() -> dict[str, str]:
    """Each setting's entry in the rendered reference: key -> its indented lines."""
    found: dict[str, str] = {}
    for chunk in ref.render().split("\n\n")[1:-1]:
        term, _, body = chunk.partition("\n")
        found[term.strip("`")] = body
    return found


def test_every_setting_has_one_entry_in_declaration_order() -> None:
    assert list(entries()) == list(SETTINGS)


def default_shown(body: str) -> str | None:
    """The default an entry shows ('' for "Default empty"), None when it shows none."""
    if "Default empty;" in body:
        return ""
    if "Default ``" not in body:
        return None
    return body.split("Default ``", 1)[1].split("``", 1)[0]


FILE_ONLY = {"webhooks"}
TEXT_KEYS = [key for key in SETTINGS if key not in FILE_ONLY]


@pytest.mark.parametrize("key", TEXT_KEYS)
def test_an_entry_names_the_variable_and_the_flag(key: str) -> None:
    body = entries()[key]
    assert f"``{env_name(key)}``, ``--{flag_name(key)}``." in body


@pytest.mark.parametrize("key", [key for key in TEXT_KEYS if not SETTINGS[key].metadata["secret"]])
def test_the_default_shown_is_what_an_operator_can_write(key: str) -> None:
    """The default as shown, given as the variable and as the flag, loads as the default."""
    shown = default_shown(entries()[key])
    assert shown is not None
    assert getattr(load(None, {env_name(key): shown}), key) == getattr(Config(), key)
    assert getattr(load(None, {}, {key: shown}), key) == getattr(Config(), key)


@pytest.mark.parametrize("key", [key for key in SETTINGS if SETTINGS[key].metadata["secret"]])
def test_a_secret_shows_no_default(key: str) -> None:
    body = entries()[key]
    assert default_shown(body) is None
    assert "Secret: no default shown" in body


def test_settings_taken_only_from_the_file_say_so_and_are_refused_elsewhere() -> None:
    only = {key for key, body in entries().items() if "Config file only" in body}
    assert only == FILE_ONLY
    for key in only:
        assert env_name(key) not in entries()[key]
        with pytest.raises(ConfigError, match=env_name(key)):
            load(None, {env_name(key): ""})


@pytest.mark.parametrize("key", list(SETTINGS))
def test_the_reload_note_follows_reloadable(key: str) -> None:
    status = entries()[key].splitlines()[1]  # the line after the description
    wanted = "; ``SIGHUP`` applies it." if key in RELOADABLE else "; needs a restart."
    assert status.endswith(wanted), status


WRITTEN = [
    (True, False, "true"),
    (False, False, "false"),
    (60.0, False, "60"),
    (2.5, False, "2.5"),
    (0.0, False, "0"),
    (2525, False, "2525"),
    (10 * 1024 * 1024, True, "10M"),
    (100 * 1024 * 1024, True, "100M"),
    (3 * 1024**3, True, "3G"),
    (1536, True, "1536"),
    (50000, True, "50000"),
    (0, True, "0"),
    ((), False, ""),
    (("a.example", "b.example"), False, "a.example,b.example"),
    (
        (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        False,
        "127.0.0.0/8,::1/128",
    ),
    ((("info@a.example", "bob@a.example"),), False, "info@a.example=bob@a.example"),
    ("./var", False, "./var"),
]


@pytest.mark.parametrize(("value", "size", "text"), WRITTEN, ids=[w[2] or "empty" for w in WRITTEN])
def test_values_are_written_as_in_the_environment(value: object, size: bool, text: str) -> None:
    assert ref.written(value, size) == text


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailsrv.config_reference", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_module_prints_the_block() -> None:
    result = run_module()
    assert (result.returncode, result.stdout, result.stderr) == (0, ref.render(), "")


def test_write_replaces_only_the_block(tmp_path: Path) -> None:
    before = "Title\n=====\n\nText before.\n\n"
    after = "\nText after.\n"
    stale = f"{ref.BEGIN}\n\n``old``\n    Gone.\n\n{ref.END}\n"
    path = tmp_path / "README.rst"
    path.write_text(before + stale + after, encoding="utf-8")
    result = run_module("--write", str(path))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert path.read_text(encoding="utf-8") == before + ref.render() + after


BAD_FILES = [
    ("no markers", "Just text.\n", "expected one '.. BEGIN config reference' line"),
    ("no end", f"{ref.BEGIN}\nstale\n", "expected one '.. BEGIN config reference' line"),
    (
        "two blocks",
        f"{ref.BEGIN}\n{ref.END}\n{ref.BEGIN}\n{ref.END}\n",
        "expected one '.. BEGIN config reference' line",
    ),
    ("missing", None, "No such file or directory"),
]


@pytest.mark.parametrize(("name", "text", "message"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_write_refuses_a_file_without_one_block(
    tmp_path: Path, name: str, text: str | None, message: str
) -> None:
    path = tmp_path / "README.rst"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    result = run_module("--write", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"config_reference: {path}: {message}")
    assert result.stderr.count("\n") == 1
    if text is not None:
        assert path.read_text(encoding="utf-8") == text
