"""The credentials checker: PLAIN/LOGIN against Argon2id (or legacy) hashes, CRAM-MD5 against
the stored HMAC context.

Unknown accounts, disabled accounts and wrong passwords fail the same way and cost the same time
(an unknown login is verified against a dummy hash).  Hashing runs in a thread.  A legacy or
outdated hash is replaced by a fresh Argon2id hash after a successful login.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailsrv.auth import cram
from mailsrv.auth.account_identity import login_text
from mailsrv.auth.mechanisms import CramMD5Response
from mailsrv.auth.migrations import lookup_key
from mailsrv.auth.passwords import PasswordHasher
from mailsrv.auth.store import IUserStore
from mailsrv.delivery.spool import RunInThread

_log = Logger(namespace="mailsrv.auth")


@implementer(ICredentialsChecker)
class AccountChecker:
    """Checks credentials against the user store; returns the login as avatar id."""

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    def __init__(
        self,
        store: IUserStore,
        hasher: PasswordHasher,
        run_in_thread: RunInThread,
        clock: IReactorTime,
    ) -> None:
        self._store = store
        self._hasher = hasher
        self._run = run_in_thread
        self._clock = clock

    @inlineCallbacks
    def requestAvatarId(self, credentials: Any) -> Any:
        text = login_text(credentials.username)  # None: not UTF-8, or too long
        login = lookup_key(text) if text else None
        account = yield self._store.get_account(login) if login else None
        if isinstance(credentials, CramMD5Response):
            context = account.cram_md5 if account is not None else None
            ok = context is not None and cram.check_response(
                context, credentials.challenge, credentials.response
            )
            if ok and account.enabled:
                return account.login
            raise UnauthorizedLogin("CRAM-MD5 check failed")
        try:
            password = credentials.password.decode("utf-8")
        except UnicodeDecodeError:
            password = None
        stored = account.password_hash if account is not None else None
        result = yield self._run(self._hasher.verify, password or "", stored)
        if not result.ok or password is None or not account.enabled:
            raise UnauthorizedLogin("password check failed")
        if result.new_hash is not None and stored is not None:
            yield self._upgrade(account.login, stored, result.new_hash)
        return account.login

    @inlineCallbacks
    def _upgrade(self, login: str, old_hash: str, new_hash: str) -> Any:
        try:
            yield self._store.replace_hash(login, old_hash, new_hash, self._clock.seconds())
            _log.info("password hash of {login} upgraded to Argon2id", login=login)
        except Exception:
            _log.failure("could not upgrade the password hash of {login}", login=login)
