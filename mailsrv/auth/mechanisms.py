"""SASL mechanisms for SMTP AUTH (RFC 4954): PLAIN (RFC 4616), LOGIN and CRAM-MD5 (RFC 2195).

Each mechanism is a generator: it yields server challenges (raw bytes, the session base64-encodes
them into ``334`` replies), receives the client's decoded responses, and returns credentials for
the Portal.  Malformed input raises :class:`MalformedResponse`, which the session answers with
``501 5.5.2``; nothing a client sends can raise anything else.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Generator

from twisted.cred.credentials import IUsernameHashedPassword, UsernamePassword
from zope.interface import implementer

Exchange = Generator[bytes, bytes, object]


class MalformedResponse(ValueError):
    """The client's SASL response does not follow the mechanism's syntax."""


@implementer(IUsernameHashedPassword)
class CramMD5Response:
    """A CRAM-MD5 answer: the checker compares ``response`` with the stored HMAC context."""

    def __init__(self, username: bytes, challenge: bytes, response: bytes) -> None:
        self.username = username
        self.challenge = challenge
        self.response = response

    def checkPassword(self, password: bytes) -> bool:
        """Not supported: passwords are never stored in the clear."""
        return False


def plain(initial: bytes | None, hostname: str) -> Exchange:
    """PLAIN: ``authzid NUL authcid NUL passwd`` in one response."""
    data = initial if initial is not None else (yield b"")
    parts = data.split(b"\x00")
    if len(parts) != 3 or not parts[1]:
        raise MalformedResponse("PLAIN response needs authzid NUL authcid NUL password")
    authzid, authcid, password = parts
    if authzid and authzid != authcid:
        raise MalformedResponse("PLAIN authorization identity must be empty or the login")
    return UsernamePassword(authcid, password)


def login(initial: bytes | None, hostname: str) -> Exchange:
    """LOGIN: user name, then password, each in its own response."""
    username = initial if initial is not None else (yield b"Username:")
    password = yield b"Password:"
    if not username:
        raise MalformedResponse("empty user name")
    return UsernamePassword(username, password)


def cram_md5(initial: bytes | None, hostname: str) -> Exchange:
    """CRAM-MD5: a fresh challenge from ``secrets``; the answer is ``user SP hex-digest``."""
    if initial is not None:
        raise MalformedResponse("CRAM-MD5 takes no initial response")
    challenge = f"<{secrets.randbelow(10**12)}.{secrets.token_hex(8)}@{hostname}>".encode()
    answer = yield challenge
    username, _, digest = answer.rpartition(b" ")
    if not username or len(digest) != 32 or not all(c in b"0123456789abcdefABCDEF" for c in digest):
        raise MalformedResponse("CRAM-MD5 response needs user SP 32 hex digits")
    return CramMD5Response(username, challenge, digest)


MECHANISMS: dict[str, Callable[[bytes | None, str], Exchange]] = {
    "PLAIN": plain,
    "LOGIN": login,
    "CRAM-MD5": cram_md5,
}
