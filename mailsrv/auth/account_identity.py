"""Which account an AUTH attempt is against, whatever the spelling: the throttle's identity.

A client may write its login in many ways that reach the same account: any case, surrounding
whitespace, a trailing dot on the domain, an alias.  Failure counters and lockouts are keyed on
the account's login as the user store holds it, so no spelling gets a fresh budget.  The
canonical form is the store's own (:func:`mailsrv.auth.migrations.lookup_key`, which the
checker's ``get_account`` goes through too), and the store resolves aliases to their account.

Names that match no account share a fixed number of buckets (a keyed hash picks one), so a
storm of made-up names keeps bounded state.  Account existence is no secret here anyway (the
MX answers ``550 5.1.1`` for unknown local recipients).
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from twisted.internet.defer import Deferred, succeed

from mailsrv.auth.migrations import lookup_key
from mailsrv.auth.store import IUserStore

# RFC 4616: a server must accept authentication identities of up to 255 octets; we refuse
# longer ones (and names that are not UTF-8) before keeping any state for them.
MAX_LOGIN_OCTETS = 255

UNKNOWN_BUCKETS = 1024
_BUCKET_PREFIX = "unknown#"


def login_text(username: bytes) -> str | None:
    """The user name as the checker and the throttle read it: UTF-8, trimmed.

    None when it is not UTF-8 or longer than :data:`MAX_LOGIN_OCTETS`.
    """
    if len(username) > MAX_LOGIN_OCTETS:
        return None
    try:
        return username.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None


class AccountIdentities:
    """Resolves a user name to its throttle identity: the account's login, or a bucket."""

    def __init__(self, store: IUserStore | None, buckets: int = UNKNOWN_BUCKETS) -> None:
        self._store = store
        self._buckets = buckets
        self._secret = secrets.token_bytes(16)  # so clients cannot aim at one bucket

    def resolve(self, name: str) -> Deferred[str]:
        """The identity of ``name`` (as :func:`login_text` returns it); may consult the store."""
        key = lookup_key(name)
        if key is None or self._store is None:
            return succeed(self.bucket(key or name))
        found: Deferred[Any] = self._store.find_owner(key)
        return found.addCallback(
            lambda account: self.bucket(key) if account is None else account.login
        )

    def bucket(self, name: str) -> str:
        """The shared identity of names that match no account (never a valid login)."""
        digest = hashlib.blake2b(
            name.encode("utf-8", "surrogatepass"), key=self._secret, digest_size=8
        ).digest()
        return f"{_BUCKET_PREFIX}{int.from_bytes(digest, 'big') % self._buckets}"

    @staticmethod
    def is_account(identity: str) -> bool:
        """True when ``identity`` is an account's login, False for a bucket of unknown names."""
        return not identity.startswith(_BUCKET_PREFIX)
