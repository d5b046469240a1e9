"""Password hashing: Argon2id for everything new; legacy hashes verify and get upgraded.

One ``passlib`` ``CryptContext`` (from ``libpass``, the maintained fork) over argon2-cffi.  Hashes
exported from Dovecot or other servers (bcrypt ``$2y$``/``{BLF-CRYPT}``, SHA512-crypt ``$6$``/
``{SHA512-CRYPT}``) verify, and :meth:`PasswordHasher.verify` returns the Argon2id replacement
for the caller to store, so accounts migrate at their next successful login.  Every call here is
CPU-heavy (about 130 ms with the default profile): run it in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from passlib.context import CryptContext

_DOVECOT_PREFIXES = ("{ARGON2ID}", "{BLF-CRYPT}", "{SHA512-CRYPT}", "{CRYPT}")


@dataclass(frozen=True)
class Argon2Profile:
    """Argon2id cost parameters (RFC 9106 low-memory profile by default)."""

    time_cost: int = 3
    memory_kib: int = 65536
    parallelism: int = 4


CHEAP_PROFILE = Argon2Profile(time_cost=1, memory_kib=8, parallelism=1)


@dataclass(frozen=True)
class Verification:
    """The result of a password check; ``new_hash`` is set when the stored hash should change."""

    ok: bool
    new_hash: str | None = None


def normalize_imported_hash(stored: str) -> str:
    """Strip a Dovecot ``{SCHEME}`` prefix so passlib recognises the hash."""
    for prefix in _DOVECOT_PREFIXES:
        if stored.upper().startswith(prefix):
            return stored[len(prefix) :]
    return stored


_IMPORTABLE = CryptContext(schemes=["argon2", "bcrypt", "sha512_crypt"])


def importable_scheme(stored: str) -> str | None:
    """The scheme of a hash another server exported (``argon2id``, ``bcrypt``,
    ``sha512_crypt``; with or without a Dovecot ``{SCHEME}`` prefix), or None when
    :class:`PasswordHasher` could not verify it.  Only Argon2's ``id`` variant is taken."""
    candidate = normalize_imported_hash(stored.strip())
    try:
        scheme = _IMPORTABLE.identify(candidate, required=False)
    except (ValueError, TypeError):
        return None
    if scheme is None:
        return None
    if scheme == "argon2" and not candidate.startswith("$argon2id$"):
        return None
    handler = _IMPORTABLE.handler(scheme)
    try:
        parsed = handler.from_string(candidate)
    except (ValueError, TypeError):
        return None
    if not getattr(parsed, "checksum", None):
        return None  # a salt and settings with no hash: nothing to verify against
    return "argon2id" if scheme == "argon2" else str(scheme)


class PasswordHasher:
    """Hash and verify passwords; blocking, call from a thread."""

    def __init__(self, profile: Argon2Profile = Argon2Profile()) -> None:
        self.profile = profile
        self._context = CryptContext(
            schemes=["argon2", "bcrypt", "sha512_crypt"],
            default="argon2",
            deprecated=["bcrypt", "sha512_crypt"],
            argon2__type="ID",
            argon2__rounds=profile.time_cost,
            argon2__memory_cost=profile.memory_kib,
            argon2__parallelism=profile.parallelism,
        )
        # Verified against when the account does not exist, so both cases cost the same time.
        self._dummy = self._context.hash("mailsrv dummy password for timing equality")

    def hash(self, password: str) -> str:
        """A new Argon2id hash of ``password``."""
        result: str = self._context.hash(password)
        return result

    def verify(self, password: str, stored: str | None) -> Verification:
        """Check ``password`` against ``stored`` (None: unknown account, same cost, fails)."""
        if stored is None:
            self._context.verify(password, self._dummy)
            return Verification(False)
        candidate = normalize_imported_hash(stored)
        try:
            ok, replacement = self._context.verify_and_update(password, candidate)
        except (ValueError, TypeError):
            self._context.verify(password, self._dummy)
            return Verification(False)
        if ok and replacement is None and candidate != stored:
            replacement = self._context.hash(password)
        return Verification(bool(ok), replacement if ok else None)

    def is_known_hash(self, stored: str) -> bool:
        """True when ``stored`` is a hash format this hasher can verify (for imports)."""
        return self._context.identify(normalize_imported_hash(stored), required=False) is not None
