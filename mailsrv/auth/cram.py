"""CRAM-MD5 without the plaintext: the Dovecot-compatible ``{CRAM-MD5}`` HMAC-MD5 context.

HMAC-MD5(key, challenge) = MD5((key ^ opad) || MD5((key ^ ipad) || challenge)).  The two MD5
states after absorbing the padded key blocks are all a server needs to check a CRAM-MD5
response; Dovecot stores them as 32 bytes (outer a,b,c,d then inner a,b,c,d, little-endian
uint32) in hex.  ``hashlib`` cannot resume from a saved state, so this module carries a small
MD5 compression function (RFC 1321).

The context is password-equivalent *for CRAM-MD5* (whoever has it can log in with CRAM-MD5) but
does not reveal the password, so PLAIN/LOGIN, checked against Argon2id, are not exposed.
"""

from __future__ import annotations

import hmac
import math
import struct

_S = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4
_K = [int(abs(math.sin(i + 1)) * 2**32) & 0xFFFFFFFF for i in range(64)]
_INIT = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_MASK = 0xFFFFFFFF

PREFIX = "{CRAM-MD5}"


def _rotl(x: int, c: int) -> int:
    return ((x << c) | (x >> (32 - c))) & _MASK


def _compress(state: tuple[int, int, int, int], block: bytes) -> tuple[int, int, int, int]:
    words = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & d), i
        elif i < 32:
            f, g = (d & b) | (~d & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | ~d & _MASK), (7 * i) % 16
        f = (f + a + _K[i] + words[g]) & _MASK
        a, d, c = d, c, b
        b = (b + _rotl(f, _S[i])) & _MASK
    return (
        (state[0] + a) & _MASK,
        (state[1] + b) & _MASK,
        (state[2] + c) & _MASK,
        (state[3] + d) & _MASK,
    )


def _finish(state: tuple[int, int, int, int], data: bytes, prefix_length: int) -> bytes:
    """MD5 of ``data`` continuing from ``state`` after ``prefix_length`` bytes already hashed."""
    total = prefix_length + len(data)
    padded = data + b"\x80" + b"\x00" * ((55 - total) % 64) + struct.pack("<Q", total * 8)
    for offset in range(0, len(padded), 64):
        state = _compress(state, padded[offset : offset + 64])
    return struct.pack("<4I", *state)


def _key_block(password: bytes) -> bytes:
    if len(password) > 64:
        password = _finish(_INIT, password, 0)
    return password.ljust(64, b"\x00")


def make_context(password: str) -> str:
    """The ``{CRAM-MD5}<64 hex>`` context for ``password`` (byte-identical to ``doveadm pw``)."""
    key = _key_block(password.encode("utf-8"))
    inner = _compress(_INIT, bytes(k ^ 0x36 for k in key))
    outer = _compress(_INIT, bytes(k ^ 0x5C for k in key))
    return PREFIX + struct.pack("<8I", *outer, *inner).hex()


def expected_response(context: str, challenge: bytes) -> str:
    """The hex HMAC-MD5 a client that knows the password sends for ``challenge``."""
    raw = bytes.fromhex(context.removeprefix(PREFIX))
    values = struct.unpack("<8I", raw)
    outer, inner = values[:4], values[4:]
    inner_digest = _finish((inner[0], inner[1], inner[2], inner[3]), challenge, 64)
    return _finish((outer[0], outer[1], outer[2], outer[3]), inner_digest, 64).hex()


def check_response(context: str, challenge: bytes, response: bytes) -> bool:
    """Constant-time check of a client's hex response against the stored context."""
    try:
        expected = expected_response(context, challenge).encode("ascii")
    except ValueError:
        return False
    return hmac.compare_digest(expected, response.lower())
