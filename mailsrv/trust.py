"""Trust roots for outbound TLS: the CAs in a PEM bundle, as a Twisted trust root.

:func:`load_trust_root` is shared by every client that verifies its peer against an operator's
CA file (the relay's ``relay_ca_file``, a webhook endpoint's ``ca_file``); it raises
:class:`TrustError` with one line naming the file and the problem.  Reading the file blocks: do
it once at start.
"""

from __future__ import annotations

import re

from OpenSSL import crypto
from twisted.internet import ssl

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
