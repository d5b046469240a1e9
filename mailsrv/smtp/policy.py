"""Who may receive mail here: local domains, mailboxes, aliases, postmaster, and no open relay."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from mailsrv.config import Config
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


class RecipientPolicy:
    """Resolves RCPT TO addresses against the configured local domains, mailboxes and aliases."""

    def __init__(self, config: Config) -> None:
        self.local_domains = frozenset(config.local_domains)
        self.primary_domain = config.local_domains[0] if config.local_domains else ""
        self._mailboxes = frozenset(config.mailboxes)
        self._aliases: dict[str, list[str]] = defaultdict(list)
        for alias, target in config.aliases:
            self._aliases[alias].append(target)

    def is_local(self, domain: str) -> bool:
        """True when ``domain`` is delivered here."""
        return domain in self.local_domains

    def resolve(self, address: Address) -> RecipientDecision:
        """Decide one recipient (RFC 5321 section 4.5.1: postmaster always exists)."""
        if address.has_routing:
            return RecipientDecision(replies.RELAY_TRICK)
        domain = address.domain or self.primary_domain
        if not self.is_local(domain):
            return RecipientDecision(replies.RELAY_DENIED)
        local = address.local
        if address.is_quoted:
            local = local[1:-1].replace("\\", "")
        mailbox = f"{local.lower()}@{domain}"
        if mailbox in self._aliases:
            return RecipientDecision(replies.RECIPIENT_OK, tuple(self._aliases[mailbox]))
        if mailbox in self._mailboxes or local.lower() == "postmaster":
            return RecipientDecision(replies.RECIPIENT_OK, (mailbox,))
        return RecipientDecision(replies.NO_SUCH_USER)
