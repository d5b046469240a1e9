"""Whether the published DNS record of a key matches it (``mailsrv dkim check``).

The TXT records at ``<selector>._domainkey.<domain>`` are asked of the server's DNS servers
(``SMTP_DNS_SERVERS``, else ``/etc/resolv.conf``: :func:`mailsrv.dns.make_resolver`), bounded
by ``SMTP_RELAY_DNS_TIMEOUT``, and compared with the key (:func:`mailsrv.dkim.record.compare`).
No such name, or no TXT record at it, is "missing"; a timeout or a server failure is a lookup
that failed, said as such.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.names import dns, error

from mailsrv.config import Config
from mailsrv.dkim.keys import StoredKey
from mailsrv.dkim.record import Verdict, compare


async def published(resolver: Any, clock: Any, name: str, within: float) -> list[bytes]:
    """The TXT records at ``name``, each one's strings joined; empty when there is none.

    Raises :class:`LookupError` (one line) when the lookup fails.
    """
    d = resolver.lookupText(name)
    d.addTimeout(within, clock)
    try:
        answers, _authority, _additional = await d
    except error.DNSNameError:
        return []
    except (defer.TimeoutError, error.DNSQueryTimeoutError):
        raise LookupError(f"the lookup of {name} timed out after {within:g} s") from None
    except error.DNSServerError:
        raise LookupError(f"the lookup of {name} failed: server failure (SERVFAIL)") from None
    except error.DNSQueryRefusedError:
        raise LookupError(f"the lookup of {name} was refused by the DNS server") from None
    except error.DomainError:  # the other DNS errors derive from it: after them
        return []
    except Exception as e:
        raise LookupError(f"the lookup of {name} failed: {type(e).__name__}") from None
    return [b"".join(r.payload.data) for r in answers if r.type == dns.TXT]


async def check_keys(config: Config, reactor: Any, keys: Sequence[StoredKey]) -> list[Verdict]:
    """A verdict for each of ``keys`` from the configured DNS servers (in order)."""
    from mailsrv.dns import dns_servers_of, make_resolver

    resolver = make_resolver(reactor, dns_servers_of(config))
    verdicts = []
    for key in keys:
        try:
            records = await published(resolver, reactor, key.dns_name, config.relay_dns_timeout)
        except LookupError as e:
            verdicts.append(Verdict(False, str(e)))
            continue
        verdicts.append(compare(key, records))
    return verdicts
