"""Password hashing: Argon2id, legacy imports that upgrade, and the unknown-user dummy."""

from __future__ import annotations

import bcrypt
import pytest
from passlib.hash import sha512_crypt

from mailsrv.auth.passwords import CHEAP_PROFILE, Argon2Profile, PasswordHasher

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def hasher() -> PasswordHasher:
    return PasswordHasher(CHEAP_PROFILE)


def _bcrypt(prefix: str) -> str:
    raw = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    return prefix + raw.replace("$2b$", "$2y$")


LEGACY = {
    "dovecot BLF-CRYPT": lambda: _bcrypt("{BLF-CRYPT}"),
    "bare $2y$": lambda: _bcrypt(""),
    "dovecot SHA512-CRYPT": lambda: (
        "{SHA512-CRYPT}" + sha512_crypt.using(rounds=5000).hash(PASSWORD)
    ),
    "bare $6$": lambda: sha512_crypt.using(rounds=5000).hash(PASSWORD),
}


def test_new_hashes_are_argon2id_and_verify(hasher: PasswordHasher) -> None:
    stored = hasher.hash(PASSWORD)
    assert stored.startswith("$argon2id$")
    assert hasher.verify(PASSWORD, stored).ok
    assert hasher.verify(PASSWORD, stored).new_hash is None
    assert not hasher.verify("wrong", stored).ok


@pytest.mark.parametrize("kind", sorted(LEGACY))
def test_legacy_hashes_verify_and_come_back_as_argon2id(hasher: PasswordHasher, kind: str) -> None:
    stored = LEGACY[kind]()
    assert hasher.is_known_hash(stored)
    good = hasher.verify(PASSWORD, stored)
    assert good.ok
    assert good.new_hash is not None and good.new_hash.startswith("$argon2id$")
    assert hasher.verify(PASSWORD, good.new_hash).ok
    bad = hasher.verify("wrong", stored)
    assert not bad.ok and bad.new_hash is None


def test_weaker_argon2_parameters_are_upgraded(hasher: PasswordHasher) -> None:
    stronger = PasswordHasher(Argon2Profile(time_cost=2, memory_kib=16, parallelism=1))
    result = stronger.verify(PASSWORD, hasher.hash(PASSWORD))
    assert result.ok and result.new_hash is not None and "t=2" in result.new_hash


@pytest.mark.parametrize("stored", [None, "", "garbage", "{PLAIN}" + PASSWORD, "$1$salt$abc"])
def test_unknown_or_unusable_hashes_fail_closed(hasher: PasswordHasher, stored: str | None) -> None:
    assert hasher.verify(PASSWORD, stored).ok is False
