"""The DKIM key directory on a real filesystem: names, modes, activation, rotation, broken
files, and the key ring the server signs with."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from mailsrv.dkim.keys import KeyDirectory, KeyRing, KeyType, key_type
from mailsrv.dkim.names import (
    DkimError,
    default_selector,
    parent_domains,
    selector_name,
    signing_domain,
)

RSA, ED = KeyType.RSA, KeyType.ED25519


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("example.org", "example.org"),
        ("Example.ORG.", "example.org"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("mail.example.co.uk", "mail.example.co.uk"),
    ],
)
def test_domains_are_stored_as_lower_case_a_labels(text: str, stored: str) -> None:
    assert signing_domain(text) == stored


@pytest.mark.parametrize(
    "text", ["", "localhost", "1.2.3.4", "[192.0.2.1]", "-bad.example", "a..example", "a b.org"]
)
def test_bad_domains_are_refused_in_one_line(text: str) -> None:
    with pytest.raises(DkimError) as caught:
        signing_domain(text)
    assert "invalid domain" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("s202612r", True),
        ("Mail-2026", True),
        ("-x", False),
        ("x-", False),
        ("a.b", False),  # sub-selectors are not offered
        ("a/b", False),
        ("", False),
        ("x" * 63, True),
        ("x" * 64, False),
    ],
)
def test_selector_is_one_dns_label(text: str, ok: bool) -> None:
    if ok:
        assert selector_name(text) == text.lower()
    else:
        with pytest.raises(DkimError, match="invalid selector"):
            selector_name(text)


def test_default_selector_is_dated_and_typed() -> None:
    november = 1_796_000_000.0  # 2026-11-30 in UTC
    assert default_selector(november, "r") == "s202611r"
    assert default_selector(november, "e") == "s202611e"
    assert key_type("RSA") is RSA and key_type("ed25519") is ED
    with pytest.raises(DkimError, match="unknown key type 'dsa': expected rsa or ed25519"):
        key_type("dsa")


def test_parent_domains_stop_before_the_top_level() -> None:
    assert parent_domains("a.b.example.org") == ["a.b.example.org", "b.example.org", "example.org"]
    assert parent_domains("example.org") == ["example.org"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keygen_writes_private_files_and_the_first_key_of_a_type_is_active(
    tmp_path: Path,
) -> None:
    keys = KeyDirectory(tmp_path / "dkim")
    rsa_key = keys.create("example.org", "s1", RSA)
    assert rsa_key.path == tmp_path / "dkim" / "example.org" / "s1.rsa.key"
    assert (mode(tmp_path / "dkim"), mode(rsa_key.path.parent), mode(rsa_key.path)) == (
        0o700,
        0o700,
        0o600,
    )
    assert rsa_key.active and rsa_key.description == "rsa-2048"
    assert rsa_key.path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert (rsa_key.path.parent / "active.rsa").read_text() == "s1\n"
    assert mode(rsa_key.path.parent / "active.rsa") == 0o600
    ed_key = keys.create("example.org", "s2", ED)
    assert ed_key.active and ed_key.description == "ed25519" and len(ed_key.public) == 32
    later = keys.create("example.org", "s3", RSA)
    assert not later.active  # a rotation's next key: published first, activated after
    ring = keys.load()
    assert [(k.selector, k.type, k.active) for k in ring.keys] == [
        ("s1", RSA, True),
        ("s2", ED, True),
        ("s3", RSA, False),
    ]
    assert [k.algorithm for k in ring.find("example.org")] == ["rsa-sha256", "ed25519-sha256"]
    assert sorted(os.listdir(rsa_key.path.parent)) == [
        "active.ed25519",
        "active.rsa",
        "s1.rsa.key",
        "s2.ed25519.key",
        "s3.rsa.key",
    ]  # no temporary file left


def test_an_existing_selector_is_never_overwritten(tmp_path: Path) -> None:
    keys = KeyDirectory(tmp_path / "dkim")
    first = keys.create("example.org", "s1", RSA)
    before = first.path.read_bytes()
    for kind in (RSA, ED):  # one selector names one key in DNS, whatever its type
        with pytest.raises(
            DkimError, match=re.escape("example.org has a key with selector 's1' already")
        ):
            keys.create("example.org", "s1", kind)
    assert first.path.read_bytes() == before
    assert keys.create("example.net", "s1", RSA).active  # another domain's s1 is its own


def test_activate_switches_the_active_key_of_its_type_and_remove_finishes_a_rotation(
    tmp_path: Path,
) -> None:
    keys = KeyDirectory(tmp_path / "dkim")
    keys.create("example.org", "old", RSA)
    keys.create("example.org", "ed", ED)
    keys.create("example.org", "new", RSA)
    assert keys.activate("example.org", "new").active
    ring = keys.load()
    assert [k.selector for k in ring.find("example.org")] == ["new", "ed"]
    assert not ring.get("example.org", "old").active  # type: ignore[union-attr]
    with pytest.raises(DkimError, match="is the active rsa key: activate another first"):
        keys.remove("example.org", "new")
    keys.remove("example.org", "old")
    assert [k.selector for k in keys.load().keys] == ["ed", "new"]
    with pytest.raises(DkimError, match=re.escape("example.org has no key with selector 'old'")):
        keys.activate("example.org", "old")
    keys.remove("example.org", "ed", force=True)  # stop signing with Ed25519
    assert [k.selector for k in keys.load().find("example.org")] == ["new"]
    assert not (tmp_path / "dkim" / "example.org" / "active.ed25519").exists()


def test_a_parent_domain_key_signs_for_its_subdomains(tmp_path: Path) -> None:
    keys = KeyDirectory(tmp_path / "dkim")
    keys.create("example.org", "s1", ED)
    keys.create("shop.example.org", "s1", RSA)
    ring = keys.load()
    assert [k.domain for k in ring.find("news.example.org")] == ["example.org"]
    assert [k.domain for k in ring.find("a.shop.example.org")] == ["shop.example.org"]
    assert ring.find("example.net") == ()
    assert ring.find("org") == ()
    assert ring.summary() == (
        "DKIM signing for 2 domain(s): example.org (ed25519 s1); shop.example.org (rsa s1)"
    )
    assert not KeyRing() and KeyRing().summary() == "no active DKIM key: nothing is signed"


def test_private_keys_are_not_shown(tmp_path: Path) -> None:
    key = KeyDirectory(tmp_path / "dkim").create("example.org", "s1", ED)
    assert key.signing.private not in repr(key).encode()
    assert key.signing.private.decode() not in repr(key.signing)


def pem(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def small_rsa_key() -> bytes:
    done = subprocess.run(
        ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:512"],
        capture_output=True,
        check=True,
    )
    return done.stdout


BROKEN = [
    ("s1.rsa.key", b"not a key\n", "s1.rsa.key: not a PEM private key"),
    ("s1.rsa.key", "ed25519", "s1.rsa.key: not an RSA key, as its name says"),
    ("s1.ed25519.key", "ec", "s1.ed25519.key: not an Ed25519 key, as its name says"),
    ("s1.rsa.key", "small", "s1.rsa.key: 512 bits; RSA keys need 1024 at least"),
    ("s1.rsa.key", "encrypted", "s1.rsa.key: encrypted; mailsrv needs it without a passphrase"),
    ("active.rsa", b"nothere\n", "active.rsa: names selector 'nothere', which has no rsa key"),
    ("active.ed25519", b"../x\n", "active.ed25519: invalid selector '../x"),
]


@pytest.mark.parametrize(("name", "content", "message"), BROKEN, ids=[b[2][:30] for b in BROKEN])
def test_a_broken_file_is_one_line(
    tmp_path: Path, name: str, content: bytes | str, message: str
) -> None:
    data = {
        "ed25519": lambda: pem(ed25519.Ed25519PrivateKey.generate()),
        "ec": lambda: pem(ec.generate_private_key(ec.SECP256R1())),
        "small": small_rsa_key,
        "encrypted": lambda: ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ),
    }
    folder = tmp_path / "dkim" / "example.org"
    folder.mkdir(parents=True)
    (folder / name).write_bytes(data[content]() if isinstance(content, str) else content)
    with pytest.raises(DkimError) as caught:
        KeyDirectory(tmp_path / "dkim").load()
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_other_files_are_left_alone_and_loose_modes_are_warned_about(tmp_path: Path) -> None:
    keys = KeyDirectory(tmp_path / "dkim")
    assert not keys.load()  # no directory: no key
    key = keys.create("example.org", "s1", ED)
    (key.path.parent / "README").write_text("notes")
    (key.path.parent / "s1.dsa.key").write_text("?")
    (key.path.parent / "s2.rsa.key.123.tmp").write_text("?")
    (tmp_path / "dkim" / "not a domain").mkdir()
    (tmp_path / "dkim" / "Example.NET").mkdir()  # not the stored form: not ours
    (tmp_path / "dkim" / "notes.txt").write_text("x")
    key.path.chmod(0o644)
    ring = keys.load()
    assert [k.selector for k in ring.keys] == ["s1"]
    assert ring.warnings == (
        f"{key.path} has mode 0644: a private key others may read (chmod 600)",
    )
