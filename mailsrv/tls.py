"""Server TLS: certificate chain and key from PEM files, reloadable in place.

The profile is the "intermediate" one of Mozilla's server-side TLS recommendations: TLS 1.2
with only AEAD suites that have forward secrecy (ECDHE or DHE with AES-GCM or ChaCha20-Poly1305;
DHE over the RFC 7919 ffdhe2048 group), and TLS 1.3 with the suites OpenSSL ships; the client
picks among them (all are strong).  No compression, no renegotiation.

:class:`ReloadingServerTLS` provides ``IOpenSSLServerConnectionCreator``: each new TLS session
takes the current ``SSL.Context``.  :meth:`ReloadingServerTLS.reload` builds a fresh context from
the files and swaps it in only if it loads cleanly, so a renewal needs no restart, a broken
renewal keeps the old certificate, and sessions already running are untouched.
:class:`CertificateWatcher` calls it on SIGHUP (wired in ``tap.py``) and when the files change.

The key is read with ``cryptography``, never by OpenSSL's file loader: that one asks for the
passphrase of an encrypted key on the terminal, which would block the reactor.  An encrypted key
is refused with one line instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from mailsrv.config import display_path

_log = Logger(namespace="mailsrv.tls")

# TLS 1.2 suites of the "intermediate" profile (ssl-config.mozilla.org, guidelines 5.7).
INTERMEDIATE_TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-CHACHA20-POLY1305",
)
_DH_GROUP = "ffdhe2048.pem"


class TLSConfigError(Exception):
    """The certificate or key cannot be used; the message is one line for the operator."""


def _read(label: str, path: str) -> bytes:
    shown = display_path(path)
    try:
        with open(os.fsencode(path), "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise TLSConfigError(f"{label}: {shown}: no such file") from None
    except IsADirectoryError:
        raise TLSConfigError(f"{label}: {shown}: is a directory") from None
    except OSError as e:
        raise TLSConfigError(f"{label}: {shown}: cannot read: {e.strerror}") from None


def _private_key(key_path: str) -> Any:
    data = _read("tls_key", key_path)
    shown = display_path(key_path)
    try:
        return load_pem_private_key(data, password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        raise TLSConfigError(
            f"tls_key: {shown}: the key is protected by a passphrase, which mailsrv cannot ask"
            " for; decrypt it (openssl pkey -in KEY -out NEW) and keep it readable to mailsrv only"
        ) from None
    except UnsupportedAlgorithm as e:
        raise TLSConfigError(f"tls_key: {shown}: unsupported key type ({e})") from None
    except ValueError:
        raise TLSConfigError(f"tls_key: {shown}: not a PEM private key") from None


def _reason(error: SSL.Error) -> str:
    """OpenSSL's first reason (``no start line``), not its whole error stack."""
    stack = error.args[0] if error.args and isinstance(error.args[0], list) else []
    for entry in stack:
        if isinstance(entry, tuple) and len(entry) == 3 and entry[2]:
            return str(entry[2])
    return str(error) or "unknown error"


def load_context(cert_path: str, key_path: str) -> SSL.Context:
    """An ``SSL.Context`` for the PEM chain and key, or :class:`TLSConfigError`."""
    _read("tls_cert", cert_path)  # one clear line for a missing or unreadable file
    key = _private_key(key_path)
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    context.set_cipher_list(":".join(INTERMEDIATE_TLS12_CIPHERS).encode())
    with resources.as_file(resources.files(__package__ or "mailsrv").joinpath(_DH_GROUP)) as dh:
        context.load_tmp_dh(os.fsencode(dh))
    try:
        context.use_certificate_chain_file(os.fsencode(cert_path))
    except SSL.Error as e:
        raise TLSConfigError(
            f"tls_cert: {display_path(cert_path)}: not a PEM certificate chain ({_reason(e)})"
        ) from None
    try:
        context.use_privatekey(key)
        context.check_privatekey()
    except SSL.Error:
        raise TLSConfigError(
            f"tls_key: {display_path(key_path)}: does not match the certificate"
        ) from None
    return context


def certificate_expiry(cert_path: str) -> float | None:
    """When the first certificate of the PEM chain at ``cert_path`` expires (Unix time), or
    None if it cannot be read (the context loader reports that)."""
    try:
        data = _read("tls_cert", cert_path)
        certificate = x509.load_pem_x509_certificate(data)
    except (TLSConfigError, ValueError):
        return None
    return certificate.not_valid_after_utc.timestamp()


@dataclass(frozen=True)
class _FileStamp:
    cert: tuple[float, int]
    key: tuple[float, int]


def _stamp(cert_path: str, key_path: str) -> _FileStamp | None:
    try:
        c, k = os.stat(cert_path), os.stat(key_path)
    except OSError:
        return None
    return _FileStamp((c.st_mtime, c.st_size), (k.st_mtime, k.st_size))


@implementer(IOpenSSLServerConnectionCreator)
class ReloadingServerTLS:
    """Server-side TLS creator whose certificate can be replaced while running."""

    def __init__(self, cert_path: str, key_path: str) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self._context = load_context(cert_path, key_path)
        self._stamp = _stamp(cert_path, key_path)
        self.expires_at = certificate_expiry(cert_path)
        """When the certificate in use expires (Unix time), for the ops metrics."""

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """A new server connection on the current context."""
        return SSL.Connection(self._context, None)

    def reload(self) -> bool:
        """Load the files again; keep the old context if they are broken.  True if swapped."""
        try:
            context = load_context(self.cert_path, self.key_path)
        except TLSConfigError as e:
            _log.error("TLS reload failed, keeping the current certificate: {error}", error=str(e))
            return False
        self._context = context
        self._stamp = _stamp(self.cert_path, self.key_path)
        self.expires_at = certificate_expiry(self.cert_path)
        _log.info("TLS certificate reloaded from {cert}", cert=self.cert_path)
        return True

    def reload_if_changed(self) -> bool:
        """Reload when either file's mtime or size changed since the last load."""
        stamp = _stamp(self.cert_path, self.key_path)
        if stamp is None or stamp == self._stamp:
            return False
        return self.reload()


class CertificateWatcher(Service):
    """Polls the certificate files and reloads them when they change."""

    def __init__(self, tls: ReloadingServerTLS, clock: IReactorTime, interval: float) -> None:
        self.tls = tls
        self.interval = interval
        self._loop = LoopingCall(tls.reload_if_changed)
        self._loop.clock = clock
        self.setName("tls-watcher")

    def startService(self) -> None:
        super().startService()
        if self.interval > 0:
            self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()


def describe_session(transport: Any) -> str | None:
    """``"TLSv1.3 TLS_AES_256_GCM_SHA384"`` for a TLS transport, None if not TLS (yet)."""
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    handle = get_handle()
    if not isinstance(handle, SSL.Connection):
        return None
    version = handle.get_protocol_version_name()
    cipher = handle.get_cipher_name()
    if not cipher:
        return None
    return f"{version} {cipher}"
