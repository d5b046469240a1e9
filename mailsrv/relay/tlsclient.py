"""Client TLS for the relay: verified (smarthost, MX ``verify``) or opportunistic (MX ``may``).

Verified connections use Twisted's ``optionsForClientTLS`` (service_identity checks the name,
an IP address too) against the system CAs or a CA file.  Opportunistic ones (RFC 7435: encrypt,
do not authenticate) use a context that checks no certificate but still sends SNI, since many
MXs present self-signed certificates and plaintext would be the only alternative.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from mailsrv.trust import TrustError, load_trust_root


class TLSClientConfigError(Exception):
    """The CA file cannot be used; one line for the operator."""


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """Encrypts without checking the peer's certificate (RFC 7435 opportunistic TLS)."""

    def __init__(self, context: SSL.Context, hostname: str) -> None:
        self._context = context
        self._sni = b"" if _is_ip(hostname) else hostname.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: Protocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if self._sni:
            connection.set_tlsext_host_name(self._sni)
        return connection


class ClientTLS:
    """Makes the TLS connection creator for one next hop.

    ``verify`` checks the certificate against ``ca_file`` (PEM, one or more CAs) or, without
    one, the system's trust store.  The CA file is read here, once, at start.
    """

    def __init__(self, verify: bool, ca_file: str = "") -> None:
        self.verify = verify
        self._trust: Any = None
        if verify:
            self._trust = _load_trust(ca_file) if ca_file else ssl.platformTrust()
        self._unverified_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self._unverified_context.set_options(SSL.OP_NO_COMPRESSION)
        self._unverified_context.set_verify(SSL.VERIFY_NONE)

    def creator(self, hostname: str) -> IOpenSSLClientConnectionCreator:
        """The connection creator for a peer known by ``hostname`` (a name or an address)."""
        if self.verify:
            creator: IOpenSSLClientConnectionCreator = ssl.optionsForClientTLS(
                hostname, trustRoot=self._trust
            )
            return creator
        return _Unverified(self._unverified_context, hostname)


def _load_trust(ca_file: str) -> Any:
    try:
        return load_trust_root(ca_file)
    except TrustError as e:
        raise TLSClientConfigError(f"relay_ca_file: {e}") from None


def tls_version(transport: Any) -> str | None:
    """``"TLSv1.3"`` for a transport with finished TLS, None otherwise."""
    get_handle = getattr(transport, "getHandle", None)
    handle = get_handle() if get_handle is not None else None
    if not isinstance(handle, SSL.Connection) or not handle.get_cipher_name():
        return None
    version = handle.get_protocol_version_name()
    return str(version) if version else None
