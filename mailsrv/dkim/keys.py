"""The DKIM key directory: private keys by domain and selector, and which ones are active.

Layout of ``<data_dir>/dkim/`` (directories ``0700``, files ``0600``)::

    <domain>/<selector>.rsa.key        an RSA private key (PKCS#8 PEM, unencrypted)
    <domain>/<selector>.ed25519.key    an Ed25519 private key (PKCS#8 PEM, unencrypted)
    <domain>/active.rsa                the selector of the RSA key that signs (one line)
    <domain>/active.ed25519            the selector of the Ed25519 key that signs

A domain may hold many selectors (old, current, next: a rotation), and has at most one active
key of each type; when both types have one, a message gets both signatures.  The files are
standard PEM, so ``openssl pkey -in <file> -pubout`` reads them, and a key made elsewhere (say
by OpenDKIM's tools) can be copied in under the same naming and activated.

Everything here blocks: the CLI calls it directly, the server at start (before the reactor
runs) and on a reload (in a thread).  Writes are durable before they return: a new key is
written under a temporary name, fsync'd, then linked to its name (which refuses an existing
selector atomically) and the directory fsync'd; an activation replaces ``active.<type>`` the
same way.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailsrv.dkim.names import DkimError, parent_domains, selector_name, signing_domain
from mailsrv.filemodes import PRIVATE_FILE, make_private_dirs
from mailsrv.fileops import fsync_directory, unlink_if_present, write_all

RSA_BITS = 2048
MIN_RSA_BITS = 1024  # RFC 8301: verifiers need not accept shorter keys
KEY_SUFFIX = ".key"
ACTIVE_PREFIX = "active."


class KeyType(Enum):
    """The two DKIM key types: RSA (``rsa-sha256``) and Ed25519 (``ed25519-sha256``, RFC 8463)."""

    RSA = "rsa"
    ED25519 = "ed25519"

    @property
    def algorithm(self) -> str:
        """The ``a=`` of its signatures."""
        return "rsa-sha256" if self is KeyType.RSA else "ed25519-sha256"

    @property
    def letter(self) -> str:
        """The last letter of its default selector (:func:`.names.default_selector`)."""
        return "r" if self is KeyType.RSA else "e"


def key_type(text: str) -> KeyType:
    """The key type named ``text`` (``rsa`` or ``ed25519``); :class:`DkimError` otherwise."""
    try:
        return KeyType(text.strip().lower())
    except ValueError:
        raise DkimError(f"unknown key type {text!r}: expected rsa or ed25519") from None


@dataclass(frozen=True)
class SigningKey:
    """What signing needs of one key: plain values, so it can go to a worker process.

    ``private`` is in the form dkimpy takes: PEM for RSA, the base64 of the 32-byte seed for
    Ed25519.  It is never shown (not in ``repr``, never logged).
    """

    domain: str
    selector: str
    algorithm: str
    private: bytes = field(repr=False)


@dataclass(frozen=True)
class StoredKey:
    """One key file of the directory, read and checked."""

    domain: str
    selector: str
    type: KeyType
    path: Path
    created: float  # the file's modification time: when it was written
    active: bool
    public: bytes  # what the DNS record's p= holds, decoded
    bits: int
    signing: SigningKey = field(repr=False)

    @property
    def description(self) -> str:
        """``rsa-2048`` or ``ed25519``."""
        return f"rsa-{self.bits}" if self.type is KeyType.RSA else "ed25519"

    @property
    def dns_name(self) -> str:
        """Where its TXT record is published: ``<selector>._domainkey.<domain>``."""
        return f"{self.selector}._domainkey.{self.domain}"


class KeyRing:
    """Every key of the directory at one moment, and the active ones by domain.

    Immutable: a reload makes a new ring and the signer swaps it in whole.  ``warnings`` are
    lines for the log (a key file others may read).
    """

    def __init__(self, keys: Iterable[StoredKey] = (), warnings: Iterable[str] = ()) -> None:
        self.keys = tuple(sorted(keys, key=lambda k: (k.domain, k.selector)))
        self.warnings = tuple(warnings)
        active: dict[str, list[StoredKey]] = {}
        for key in self.keys:
            if key.active:
                active.setdefault(key.domain, []).append(key)
        # RSA first: a verifier that checks only the topmost signature knows RSA.
        self._active = {
            domain: tuple(k.signing for k in sorted(keys, key=lambda k: k.type is not KeyType.RSA))
            for domain, keys in active.items()
        }

    def __bool__(self) -> bool:
        """True when some key is active (there is something to sign with)."""
        return bool(self._active)

    @property
    def active_count(self) -> int:
        """How many keys sign."""
        return sum(len(keys) for keys in self._active.values())

    def find(self, domain: str) -> tuple[SigningKey, ...]:
        """The active keys for mail of ``domain``: its own, else those of its nearest parent
        that has any (a key for ``example.org`` signs for ``news.example.org`` too, which
        DMARC's relaxed alignment accepts); empty if none."""
        for candidate in parent_domains(domain):
            keys = self._active.get(candidate)
            if keys:
                return keys
        return ()

    def of_domain(self, domain: str) -> list[StoredKey]:
        """Every key of ``domain`` (active or not), by selector."""
        return [key for key in self.keys if key.domain == domain]

    def get(self, domain: str, selector: str) -> StoredKey | None:
        """The key ``selector`` of ``domain``, or None."""
        for key in self.keys:
            if key.domain == domain and key.selector == selector:
                return key
        return None

    def summary(self) -> str:
        """One line for the log: the active keys, by domain."""
        if not self._active:
            return "no active DKIM key: nothing is signed"
        parts = []
        for domain in sorted(self._active):
            keys = [k for k in self.of_domain(domain) if k.active]
            parts.append(f"{domain} ({', '.join(f'{k.type.value} {k.selector}' for k in keys)})")
        return f"DKIM signing for {len(parts)} domain(s): " + "; ".join(parts)


class KeyDirectory:
    """The key files under ``root`` (``<data_dir>/dkim``); see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # -- reading --------------------------------------------------------------------------------

    def load(self) -> KeyRing:
        """Read every key; :class:`DkimError` (one line) for a file that cannot be used, or an
        ``active.<type>`` that names no key of its type.  A missing directory is no key."""
        keys: list[StoredKey] = []
        warnings: list[str] = []
        try:
            domains = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return KeyRing()
        except OSError as e:
            raise DkimError(f"DKIM keys {self.root}: {e.strerror}") from None
        for name in domains:
            folder = self.root / name
            if not folder.is_dir():
                continue
            try:
                domain = signing_domain(name)
            except DkimError:
                continue  # not a domain directory of ours
            if domain != name:
                continue
            keys.extend(self._load_domain(domain, folder, warnings))
        return KeyRing(keys, warnings)

    def _load_domain(self, domain: str, folder: Path, warnings: list[str]) -> list[StoredKey]:
        actives = {t: self._active_selector(folder, t) for t in KeyType}
        found = []
        for name in sorted(os.listdir(folder)):
            parsed = _key_file_name(name)
            if parsed is None:
                continue
            selector, kind = parsed
            path = folder / name
            found.append(read_key(path, domain, selector, kind, actives[kind] == selector))
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                warnings.append(
                    f"{path} has mode {mode:04o}: a private key others may read (chmod 600)"
                )
        for kind, active in actives.items():
            if active is not None and not any(
                k.selector == active and k.type is kind for k in found
            ):
                raise DkimError(
                    f"DKIM keys {folder / (ACTIVE_PREFIX + kind.value)}: names selector "
                    f"{active!r}, which has no {kind.value} key in {folder}"
                )
        return found

    def _active_selector(self, folder: Path, kind: KeyType) -> str | None:
        path = folder / f"{ACTIVE_PREFIX}{kind.value}"
        try:
            text = path.read_text("ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not ASCII"
            raise DkimError(f"DKIM keys {path}: {reason}") from None
        try:
            return selector_name(text)
        except DkimError as e:
            raise DkimError(f"DKIM keys {path}: {e}") from None

    # -- writing --------------------------------------------------------------------------------

    def create(self, domain: str, selector: str, kind: KeyType) -> StoredKey:
        """Generate a key and write it durably; the first key of its type for the domain
        becomes active.  :class:`DkimError` if the selector exists (of either type)."""
        folder = self.root / domain
        if self.root.exists() and not self.root.is_dir():
            raise DkimError(f"{self.root} is not a directory")
        if folder.is_dir() and any(
            (folder / f"{selector}.{t.value}{KEY_SUFFIX}").exists() for t in KeyType
        ):
            raise DkimError(f"{domain} has a key with selector {selector!r} already")
        created = make_private_dirs(folder)
        for parent in {p.parent for p in created}:
            fsync_directory(parent)
        path = folder / f"{selector}.{kind.value}{KEY_SUFFIX}"
        try:
            _write_new(path, generate(kind))
        except FileExistsError:
            raise DkimError(f"{domain} has a key with selector {selector!r} already") from None
        first = self._active_selector(folder, kind) is None
        if first:
            self._set_active(folder, kind, selector)
        return read_key(path, domain, selector, kind, first)

    def activate(self, domain: str, selector: str) -> StoredKey:
        """Make ``selector`` the active key of its type for ``domain`` (the one active before
        stops signing).  :class:`DkimError` if there is no such key."""
        key = self._existing(domain, selector)
        if not key.active:
            self._set_active(self.root / domain, key.type, selector)
        return read_key(key.path, domain, selector, key.type, True)

    def remove(self, domain: str, selector: str, force: bool = False) -> StoredKey:
        """Delete the key ``selector`` of ``domain``; an active one only with ``force`` (its
        type then signs no more for the domain)."""
        key = self._existing(domain, selector)
        folder = self.root / domain
        if key.active:
            if not force:
                raise DkimError(
                    f"{domain} {selector} is the active {key.type.value} key: activate another "
                    "first (or --force to stop signing with this type)"
                )
            unlink_if_present(folder / f"{ACTIVE_PREFIX}{key.type.value}")
        key.path.unlink()
        fsync_directory(folder)
        return key

    def _existing(self, domain: str, selector: str) -> StoredKey:
        key = self.load().get(domain, selector)
        if key is None:
            raise DkimError(f"{domain} has no key with selector {selector!r}")
        return key

    def _set_active(self, folder: Path, kind: KeyType, selector: str) -> None:
        path = folder / f"{ACTIVE_PREFIX}{kind.value}"
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        _write_file(temporary, f"{selector}\n".encode("ascii"), exclusive=False)
        os.replace(temporary, path)
        fsync_directory(folder)


# --- key files -----------------------------------------------------------------------------


def generate(kind: KeyType) -> bytes:
    """A new private key of ``kind`` as unencrypted PKCS#8 PEM (RSA: 2048 bits, e = 65537)."""
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if kind is KeyType.RSA:
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def read_key(path: Path, domain: str, selector: str, kind: KeyType, active: bool) -> StoredKey:
    """The key file ``path`` checked and ready to sign with; :class:`DkimError` if it is not
    an unencrypted PEM private key of ``kind`` (RSA: at least 1024 bits)."""
    try:
        data = path.read_bytes()
        created = path.stat().st_mtime
    except OSError as e:
        raise DkimError(f"DKIM key {path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise DkimError(
            f"DKIM key {path}: encrypted; mailsrv needs it without a passphrase"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise DkimError(f"DKIM key {path}: not a PEM private key") from None
    if kind is KeyType.RSA:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise DkimError(f"DKIM key {path}: not an RSA key, as its name says")
        if key.key_size < MIN_RSA_BITS:
            raise DkimError(
                f"DKIM key {path}: {key.key_size} bits; RSA keys need {MIN_RSA_BITS} at least"
            )
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        bits = key.key_size
    else:
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise DkimError(f"DKIM key {path}: not an Ed25519 key, as its name says")
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        private = base64.b64encode(seed)
        bits = 256
    signing = SigningKey(domain, selector, kind.algorithm, private)
    return StoredKey(domain, selector, kind, path, created, active, public, bits, signing)


def _key_file_name(name: str) -> tuple[str, KeyType] | None:
    """``(selector, type)`` of a key file's name, or None for any other file."""
    if not name.endswith(KEY_SUFFIX):
        return None
    selector, _, kind = name[: -len(KEY_SUFFIX)].rpartition(".")
    try:
        return selector_name(selector), KeyType(kind)
    except (DkimError, ValueError):
        return None


def _write_file(path: Path, data: bytes, exclusive: bool = True) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, PRIVATE_FILE)
    try:
        if not exclusive:
            os.fchmod(fd, PRIVATE_FILE)
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes) -> None:
    """Write ``path`` durably, refusing (FileExistsError) if it exists, never leaving part of
    a file under its name."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    unlink_if_present(temporary)
    try:
        _write_file(temporary, data)
        os.link(temporary, path)
    finally:
        unlink_if_present(temporary)
    fsync_directory(path.parent)
