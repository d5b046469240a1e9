"""What the webhook sender trusts for HTTPS: the system CAs, or an endpoint's own CA bundle.

:func:`load_trust_root` reads a PEM bundle (one or more ``CERTIFICATE`` blocks) into a Twisted
trust root, or raises :class:`TrustError` with one line naming the file and the problem.
:func:`https_policy` is the ``IPolicyForHTTPS`` an ``Agent`` uses: browser-like verification of
the host name (or IP address) against the certificate, with that trust root or, without a CA
file, the platform's trust store.  Reading the file blocks; do it once at start.
"""

from __future__ import annotations

import re

from OpenSSL import crypto
from twisted.internet import ssl
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


class TrustError(ValueError):
    """A CA bundle cannot be used; the message is one line for the operator."""


def load_trust_root(ca_file: str) -> object:
    """The trust root (``IOpenSSLTrustRoot``) of every certificate in the PEM file ``ca_file``."""
    try:
        with open(ca_file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TrustError(f"{ca_file}: {e.strerror or e}") from None
    blocks = _PEM_CERTIFICATE.findall(data)
    if not blocks:
        raise TrustError(f"{ca_file}: no PEM certificate in it")
    certificates = []
    for number, block in enumerate(blocks, 1):
        try:
            certificates.append(ssl.Certificate.loadPEM(block))
        except (crypto.Error, ValueError):
            raise TrustError(f"{ca_file}: certificate {number} is not valid PEM") from None
    return ssl.trustRootFromCertificates(certificates)


def https_policy(ca_file: str | None = None) -> IPolicyForHTTPS:
    """Verify HTTPS receivers against ``ca_file``'s CAs, or the system CAs when None."""
    root = load_trust_root(ca_file) if ca_file else None
    policy: IPolicyForHTTPS = BrowserLikePolicyForHTTPS(trustRoot=root)
    return policy
