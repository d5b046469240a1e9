"""Standard Webhooks signing, checked with the ``standardwebhooks`` reference verifier."""

from __future__ import annotations

import base64
import json
import time

import pytest
import standardwebhooks

from mailsrv import __version__
from mailsrv.webhook.signing import (
    SecretError,
    Signer,
    decode_secret,
    generate_secret,
    signature,
)

BODY = json.dumps({"type": "message.received", "data": {"subject": "Grüße"}}).encode()


def now() -> int:
    # The reference verifier compares with the wall clock (5 min tolerance), so the test signs
    # with it; mailsrv itself takes the time from its injected clock.
    return int(time.time())


@pytest.mark.parametrize("size", [24, 32, 64])
def test_generated_secret_format(size: int) -> None:
    secret = generate_secret(size)
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret[6:], validate=True)) == size
    assert decode_secret(secret) == base64.b64decode(secret[6:])
    assert generate_secret(size) != secret


@pytest.mark.parametrize("size", [0, 23, 65])
def test_generated_secret_size_bounds(size: int) -> None:
    with pytest.raises(ValueError, match="24 to 64 bytes"):
        generate_secret(size)


def test_reference_verifier_accepts_our_signature() -> None:
    secret = generate_secret()
    timestamp = now()
    headers = dict(Signer([secret]).headers("evt_0123abc", timestamp, BODY))
    assert headers["webhook-id"] == "evt_0123abc"
    assert headers["webhook-timestamp"] == str(timestamp)
    assert headers["webhook-signature"].startswith("v1,")
    assert headers["user-agent"] == f"mailsrv/{__version__}"
    assert headers["content-type"] == "application/json"
    assert standardwebhooks.Webhook(secret).verify(BODY, headers) == json.loads(BODY)


def test_rotation_every_secret_verifies_and_a_stranger_does_not() -> None:
    old, new = generate_secret(), generate_secret(48)
    headers = dict(Signer([old, new]).headers("evt_1", now(), BODY))
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        standardwebhooks.Webhook(secret).verify(BODY, headers)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(generate_secret()).verify(BODY, headers)


def test_tampering_is_detected() -> None:
    secret = generate_secret()
    headers = dict(Signer([secret]).headers("evt_1", now(), BODY))
    verifier = standardwebhooks.Webhook(secret)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verifier.verify(BODY.replace(b"Gr", b"gr"), headers)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verifier.verify(BODY, {**headers, "webhook-id": "evt_2"})
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verifier.verify(
            BODY, {**headers, "webhook-timestamp": str(int(headers["webhook-timestamp"]) + 1)}
        )


def test_signature_matches_the_specification_by_hand() -> None:
    # The spec's construction, independent of the Signer: HMAC-SHA256 over "id.ts.body".
    import hashlib
    import hmac

    key = bytes(range(32))
    expected = base64.b64encode(hmac.new(key, b"msg_1.1700000000." + BODY, hashlib.sha256).digest())
    assert signature(key, "msg_1", 1700000000, BODY) == "v1," + expected.decode()


def test_timestamp_is_floored_to_seconds() -> None:
    secret = generate_secret()
    headers = Signer([secret]).headers("evt_1", 1700000000.999, b"{}")
    assert headers["webhook-timestamp"] == "1700000000"


def test_unpadded_secret_is_accepted_like_the_reference() -> None:
    secret = generate_secret(25)  # 25 bytes: base64 ends with '=='
    assert secret.endswith("==")
    unpadded = secret.rstrip("=")
    assert decode_secret(unpadded) == decode_secret(secret)
    headers = dict(Signer([unpadded]).headers("evt_1", now(), BODY))
    standardwebhooks.Webhook(secret).verify(BODY, headers)


BAD_SECRETS = [
    ("", "expected a secret starting with whsec_"),
    ("sk_" + "A" * 40, "expected a secret starting with whsec_"),
    ("whsec_", "expected base64 after whsec_"),
    ("whsec_" + "A" * 41, "expected base64 after whsec_"),
    ("whsec_" + "-_" * 20, "expected base64 after whsec_"),
    ("whsec_ " + "A" * 40, "expected base64 after whsec_"),
    ("whsec_" + "A" * 28, "the secret decodes to 21 bytes; expected 24 to 64"),
    ("whsec_" + "A" * 88, "the secret decodes to 66 bytes; expected 24 to 64"),
]


@pytest.mark.parametrize(("secret", "message"), BAD_SECRETS)
def test_bad_secret_errors_never_quote_it(secret: str, message: str) -> None:
    with pytest.raises(SecretError) as caught:
        decode_secret(secret)
    assert str(caught.value) == message
    with pytest.raises(SecretError):
        Signer([secret])


def test_signer_needs_a_secret_and_hides_them() -> None:
    with pytest.raises(SecretError, match="at least one secret"):
        Signer([])
    secret = generate_secret()
    assert secret[6:] not in repr(Signer([secret]))


@pytest.mark.parametrize("message_id", ["", "a.b", "evt 1", "evt\r\n1", "é", "x" * 129])
def test_bad_message_ids_are_refused(message_id: str) -> None:
    with pytest.raises(ValueError, match="webhook id"):
        Signer([generate_secret()]).headers(message_id, 0, b"{}")
