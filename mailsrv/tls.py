"""Server TLS: certificate chain and key from PEM files, TLS 1.2 or newer, reloadable in place.

:class:`ReloadingServerTLS` provides ``IOpenSSLServerConnectionCreator``: each new TLS session
takes the current ``SSL.Context``.  :meth:`ReloadingServerTLS.reload` builds a fresh context from
the files and swaps it in only if it loads cleanly, so a renewal needs no restart, a broken
renewal keeps the old certificate, and sessions already running are untouched.
:class:`CertificateWatcher` calls it on SIGHUP (wired in ``tap.py``) and when the files change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

_log = Logger(namespace="mailsrv.tls")

_CIPHERS = (
    "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:ECDHE+AES:!aNULL:!eNULL:!MD5:!DSS:!RC4"
)


class TLSConfigError(Exception):
    """The certificate or key cannot be used; the message is one line for the operator."""


def load_context(cert_path: str, key_path: str) -> SSL.Context:
    """An ``SSL.Context`` for the PEM chain and key, or :class:`TLSConfigError`."""
    for label, path in (("tls_cert", cert_path), ("tls_key", key_path)):
        if not os.path.isfile(path):
            raise TLSConfigError(f"{label}: {path}: no such file")
        if not os.access(path, os.R_OK):
            raise TLSConfigError(f"{label}: {path}: not readable")
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(
        SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION
    )
    context.set_cipher_list(_CIPHERS.encode())
    try:
        context.use_certificate_chain_file(cert_path.encode())
    except SSL.Error as e:
        raise TLSConfigError(f"tls_cert: {cert_path}: not a PEM certificate chain ({e})") from None
    try:
        context.use_privatekey_file(key_path.encode())
    except SSL.Error as e:
        if "mismatch" in str(e):
            raise TLSConfigError(f"tls_key: {key_path}: does not match the certificate") from None
        raise TLSConfigError(f"tls_key: {key_path}: not a PEM private key ({e})") from None
    try:
        context.check_privatekey()
    except SSL.Error:
        raise TLSConfigError(f"tls_key: {key_path}: does not match the certificate") from None
    return context


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
