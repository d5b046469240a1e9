"""What the webhook sender trusts for HTTPS: the system CAs, or an endpoint's own CA bundle.

:func:`~mailsrv.trust.load_trust_root` reads a PEM bundle into a Twisted trust root (or
raises :class:`~mailsrv.trust.TrustError`); :func:`https_policy` is the ``IPolicyForHTTPS``
an ``Agent`` uses: browser-like verification of the host name (or IP address) against the
certificate, with that trust root or, without a CA file, the platform's trust store.  Reading
the file blocks; do it once at start.
"""

from __future__ import annotations

from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS

from mailsrv.trust import TrustError, load_trust_root

__all__ = ["TrustError", "https_policy", "load_trust_root"]


def https_policy(ca_file: str | None = None) -> IPolicyForHTTPS:
    """Verify HTTPS receivers against ``ca_file``'s CAs, or the system CAs when None."""
    root = load_trust_root(ca_file) if ca_file else None
    policy: IPolicyForHTTPS = BrowserLikePolicyForHTTPS(trustRoot=root)
    return policy
