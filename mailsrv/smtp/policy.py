"""Who may receive mail here: local domains, mailboxes, aliases, postmaster, and no open relay."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailsrv.auth.store import IUserStore
from mailsrv.config import Config
from mailsrv.identity import InvalidAddress, canonical_domain, canonical_local
from mailsrv.smtp import replies
from mailsrv.smtp.address import Address
from mailsrv.smtp.replies import Reply


@dataclass(frozen=True)
class RecipientDecision:
    """Either a refusal (``reply``) or the local mailboxes that receive a copy."""

    reply: Reply
    mailboxes: tuple[str, ...] = ()

    @property
    def accepted(self) -> bool:
        """True when the recipient is accepted."""
        return not self.reply.is_error


_log = Logger(namespace="mailsrv.smtp")


class RecipientPolicy:
    """Resolves RCPT TO addresses: configured mailboxes and aliases first, then user accounts.

    An account receives mail for its login and its aliases in the Maildir named by its login;
    a disabled account refuses mail (``550 5.2.1``).  Addresses are compared in canonical form
    (``mailsrv.identity``); a local part that can never be a mailbox here (compatibility
    characters, a non-ASCII spelling of ASCII, controls) gets ``550 5.1.1`` before any lookup.
    """

    def __init__(self, config: Config, store: IUserStore | None = None) -> None:
        self._store = store
        self.local_domains = frozenset(config.local_domains)
        self.primary_domain = config.local_domains[0] if config.local_domains else ""
        self._mailboxes = frozenset(config.mailboxes)
        self._aliases: dict[str, list[str]] = defaultdict(list)
        for alias, target in config.aliases:
            self._aliases[alias].append(target)

    def reconfigured(self, config: Config) -> RecipientPolicy:
        """A policy for ``config``'s domains, mailboxes and aliases over the same user store."""
        return RecipientPolicy(config, self._store)

    def is_local(self, domain: str) -> bool:
        """True when ``domain`` (canonical, ``mailsrv.identity``) is delivered here."""
        return domain in self.local_domains

    def resolve(self, address: Address) -> RecipientDecision | Deferred[RecipientDecision]:
        """Decide one recipient (RFC 5321 section 4.5.1: postmaster always exists)."""
        if address.has_routing:
            return RecipientDecision(replies.RELAY_TRICK)
        try:
            domain = canonical_domain(address.domain) if address.domain else self.primary_domain
        except InvalidAddress:
            domain = ""  # a domain literal, or not a valid IDNA 2008 name: never local
        if not self.is_local(domain):
            return RecipientDecision(replies.RELAY_DENIED)
        try:
            mailbox = f"{canonical_local(address.local)}@{domain}"
        except InvalidAddress:
            return RecipientDecision(replies.MAILBOX_NAME_REFUSED)
        if mailbox in self._aliases:
            return RecipientDecision(replies.RECIPIENT_OK, tuple(self._aliases[mailbox]))
        if mailbox in self._mailboxes:
            return RecipientDecision(replies.RECIPIENT_OK, (mailbox,))
        if self._store is None:
            return self._postmaster_or_unknown(mailbox)
        found: Deferred[Any] = self._store.find_owner(mailbox)
        return found.addCallbacks(self._account_decision, self._lookup_failed, (mailbox,))

    def _postmaster_or_unknown(self, mailbox: str) -> RecipientDecision:
        if mailbox.partition("@")[0] == "postmaster":
            return RecipientDecision(replies.RECIPIENT_OK, (mailbox,))
        return RecipientDecision(replies.NO_SUCH_USER)

    def _account_decision(self, account: Any, mailbox: str) -> RecipientDecision:
        if account is None:
            return self._postmaster_or_unknown(mailbox)
        if not account.enabled:
            return RecipientDecision(replies.MAILBOX_DISABLED)
        return RecipientDecision(replies.RECIPIENT_OK, (account.login,))

    def _lookup_failed(self, failure: Any) -> RecipientDecision:
        _log.failure("user store lookup failed", failure)
        return RecipientDecision(replies.LOOKUP_FAILED)


def remote_domain(address: Address) -> str | None:
    """The domain to relay ``address`` to, in its canonical (A-label) form, or None when it
    cannot be a next hop (no domain, or one that is not a valid host name)."""
    domain = address.domain
    if not domain:
        return None
    if domain.startswith("["):
        return domain
    try:
        return canonical_domain(domain)
    except ValueError:
        return None
