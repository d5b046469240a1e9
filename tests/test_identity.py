"""The canonical address form (``mailsrv.identity``) and every place that must agree with it.

The tables here run in memory: the rules themselves, a property over every code point of the
BMP and the SMP, and one table of spellings pushed through every canonicalising site (config,
both stores' key function, the CLI, RCPT resolution, sender ownership, the AUTH checker's
key).  ``tests/test_international.py`` shows the same behaviour over real sockets and the real
``mailsrv users`` command.
"""

from __future__ import annotations

import unicodedata

import pytest

from mailsrv.auth.migrations import lookup_key, new_address
from mailsrv.auth.realm import Sender
from mailsrv.auth.store import StoreError
from mailsrv.cli.users import CommandError
from mailsrv.cli.users import address as cli_address
from mailsrv.config import parse_aliases, parse_domains, parse_mailbox, parse_mailboxes
from mailsrv.identity import (
    InvalidAddress,
    canonical_address,
    canonical_domain,
    canonical_local,
    display_address,
    display_domain,
)
from mailsrv.smtp import replies
from mailsrv.smtp.address import Address
from mailsrv.smtp.policy import RecipientPolicy
from tests.conftest import make_config

BUCHER = "xn--bcher-kva.example"
NFD_BUCHER = unicodedata.normalize("NFD", "bücher.example")
assert NFD_BUCHER != "bücher.example"

# --- domains -----------------------------------------------------------------------------------

DOMAINS = [
    ("example.org", "example.org"),
    ("Example.ORG", "example.org"),
    (" example.org. ", "example.org"),
    ("bücher.example", BUCHER),
    ("BÜCHER.Example", BUCHER),
    (NFD_BUCHER, BUCHER),
    (BUCHER, BUCHER),
    ("XN--BCHER-KVA.EXAMPLE", BUCHER),
    ("faß.de", "xn--fa-hia.de"),  # IDNA 2008: ß is a letter of its own, not "ss"
    ("日本.example", "xn--wgv71a.example"),
    ("ελληνικά.example", "xn--hxargifdar.example"),
    ("r3---sn-abc.example", "r3---sn-abc.example"),  # ASCII labels keep the LDH rule
    ("ab--cd.bücher.example", "ab--cd." + BUCHER),
]


@pytest.mark.parametrize(("text", "expected"), DOMAINS)
def test_domain_forms(text: str, expected: str) -> None:
    assert canonical_domain(text) == expected
    assert canonical_domain(expected) == expected
    assert canonical_domain(display_domain(expected)) == expected


def test_display_domain_is_the_u_label() -> None:
    assert display_domain(BUCHER) == "bücher.example"
    assert display_domain("example.org") == "example.org"
    assert display_address(f"jörg@{BUCHER}") == "jörg@bücher.example"
    assert display_address("alice@example.org") == "alice@example.org"


BAD_DOMAINS = [
    ("", ""),
    (".", ""),
    ("a..b", ""),
    ("-a.example", ""),
    ("a_b.example", ""),
    ("x" * 64 + ".example", ""),
    (".".join(["abcdefghi"] * 26), "domain too long"),
    ("\uff45xample.org", "U+FF45 FULLWIDTH LATIN SMALL LETTER E would fold to ASCII"),
    ("\u212aelvin.example", "U+212A KELVIN SIGN would fold to ASCII"),
    ("example\u3002org", "U+3002 IDEOGRAPHIC FULL STOP would fold to ASCII"),
    ("exam\u00adple.org", "U+00AD SOFT HYPHEN would vanish"),
    ("xn--zz.example", "not an IDNA 2008 domain"),
    ("xn--abc-.example", "not an IDNA 2008 domain"),
    ("b\u00fccher\u200b.example", "U+200B ZERO WIDTH SPACE would vanish"),
    ("\u2603.example", "not an IDNA 2008 domain"),  # a snowman is not a letter (IDNA 2008)
    ("[192.0.2.1]", ""),
]


@pytest.mark.parametrize(("text", "reason"), BAD_DOMAINS)
def test_bad_domains(text: str, reason: str) -> None:
    with pytest.raises(InvalidAddress) as caught:
        canonical_domain(text)
    assert caught.value.reason.startswith(reason) if reason else caught.value.reason == ""


# --- local parts -------------------------------------------------------------------------------

LOCALS = [
    ("alice", "alice"),
    ("Alice.Smith", "alice.smith"),
    ("o'brien+tag", "o'brien+tag"),
    ('"alice"', "alice"),
    ("jörg", "jörg"),
    ("JÖRG", "jörg"),
    (unicodedata.normalize("NFD", "Jörg"), "jörg"),
    ("ß", "ß"),  # toLowerCase keeps it; case folding would make it "ss", another mailbox
    ("ẞ", "ß"),
    ("ΣΑΣ", "σας"),
    ("İstanbul", "i\u0307stanbul"),
    ("用户", "用户"),
    ("Δοκιμή", "δοκιμή"),
    ("ü" * 32, "ü" * 32),  # 64 octets
]


@pytest.mark.parametrize(("text", "expected"), LOCALS)
def test_local_part_forms(text: str, expected: str) -> None:
    assert canonical_local(text) == expected
    assert canonical_local(expected) == expected


BAD_LOCALS = [
    ("", ""),
    (".alice", ""),
    ("alice.", ""),
    ("a..b", ""),
    ("../etc", ""),
    ("a/b", ""),
    ("a%b", ""),
    ("a b", ""),
    ('"a b"', ""),
    ('"a@b"', ""),
    ("a\x00b", ""),
    ("x" * 65, "local part over 64 octets"),
    ("ü" * 33, "local part over 64 octets"),
    ("\u212aelly", "U+212A KELVIN SIGN would fold to ASCII"),
    ("\uff4belly", "U+FF4B FULLWIDTH LATIN SMALL LETTER K would fold to ASCII"),
    (
        "\uff2b\uff25\uff2c\uff2c\uff39",
        "U+FF2B FULLWIDTH LATIN CAPITAL LETTER K would fold to ASCII",
    ),
    ("\ufb01nance", "U+FB01 LATIN SMALL LIGATURE FI would fold to ASCII"),
    ("\u017fam", "U+017F LATIN SMALL LETTER LONG S would fold to ASCII"),
    ("ke\u00adlly", "U+00AD SOFT HYPHEN would vanish"),
    ("kel\u037e", "U+037E GREEK QUESTION MARK would fold to ASCII"),
    ("a\u00a0b", "U+00A0 NO-BREAK SPACE would fold to ASCII"),
    ("jörg\ufe0f", "U+FE0F VARIATION SELECTOR-16 would vanish"),
    ("jörg\u00b2", "U+00B2 SUPERSCRIPT TWO would fold to ASCII"),
    ("jörg½", "compatibility character U+00BD VULGAR FRACTION ONE HALF"),
    (
        "\uff7c\uff9e\uff6e\uff70\uff7c\uff9e",
        "compatibility character U+FF7C HALFWIDTH KATAKANA LETTER SI",
    ),
    ("jö\u200brg", "U+200B ZERO WIDTH SPACE would vanish"),
    ("jö\u200erg", "U+200E LEFT-TO-RIGHT MARK is not allowed"),
    ("jö\u202erg", "U+202E RIGHT-TO-LEFT OVERRIDE is not allowed"),
    ("jö\u0085rg", "U+0085 unnamed character is not allowed"),
    ("jö\ue000rg", "U+E000 unnamed character is not allowed"),
    ("jö\u0378rg", "U+0378 unnamed character is not allowed"),
    ("jö\u2028rg", "U+2028 LINE SEPARATOR is not allowed"),
    ("jö\ud800rg", "U+D800 unnamed character is not allowed"),
]


@pytest.mark.parametrize(("text", "reason"), BAD_LOCALS)
def test_bad_local_parts(text: str, reason: str) -> None:
    with pytest.raises(InvalidAddress) as caught:
        canonical_local(text)
    assert caught.value.reason == reason


def _every_code_point() -> list[str]:
    return [chr(cp) for cp in range(0x80, 0x20000) if not 0xD800 <= cp < 0xE000]


def test_no_non_ascii_spelling_of_a_local_part_is_ascii() -> None:
    """Every non-ASCII code point of the BMP and SMP: refused, or it stays non-ASCII, and the
    canonical form is a fixed point."""
    folding = []
    for char in _every_code_point():
        try:
            result = canonical_local(f"a{char}b")
        except InvalidAddress as error:
            if "fold to ASCII" in error.reason or "vanish" in error.reason:
                folding.append(char)
            continue
        assert not result.isascii(), f"U+{ord(char):04X}"
        assert canonical_local(result) == result, f"U+{ord(char):04X}"
    assert "\u212a" in folding and "\uff4b" in folding and "\ufb01" in folding
    # the same characters never fold a domain into an ASCII one either
    for char in folding:
        with pytest.raises(InvalidAddress):
            canonical_domain(f"a{char}b.example")


# --- whole addresses, and every site that canonicalises them -----------------------------------

SAME = [
    # (spelling, canonical form)
    ("alice@example.org", "alice@example.org"),
    (" Alice@Example.ORG. ", "alice@example.org"),
    ('"alice"@example.org', "alice@example.org"),
    ("jörg@bücher.example", f"jörg@{BUCHER}"),
    ("JÖRG@BÜCHER.EXAMPLE", f"jörg@{BUCHER}"),
    (unicodedata.normalize("NFD", "Jörg@Bücher.example"), f"jörg@{BUCHER}"),
    (f"jörg@{BUCHER}", f"jörg@{BUCHER}"),
    (f"Jörg@{BUCHER.upper()}", f"jörg@{BUCHER}"),
]

REFUSED = [
    "\u212aelly@example.org",
    "\uff4belly@example.org",
    "\ufb01nance@example.org",
    "kelly@\uff45xample.org",
    "kelly@example\u3002org",
    "ke\u200blly@example.org",
    "kelly",
    "@example.org",
    "kelly@",
    "kelly@[192.0.2.1]",
]


@pytest.mark.parametrize(("text", "canonical"), SAME)
def test_every_site_agrees_on_the_canonical_form(text: str, canonical: str) -> None:
    assert canonical_address(text) == canonical
    assert parse_mailbox(text) == canonical
    assert parse_mailboxes(f"{text},{canonical}") == (canonical,)
    assert parse_aliases(f"{text}={canonical}") == ((canonical, canonical),)
    assert new_address(text) == canonical
    assert lookup_key(text) == canonical  # the store key, and the AUTH checker's login
    assert cli_address(text) == canonical
    assert Sender("someone@example.org", frozenset({canonical})).may_send_as(text)
    assert parse_domains(text.rpartition("@")[2]) == (canonical.rpartition("@")[2],)


@pytest.mark.parametrize("text", REFUSED)
def test_every_site_refuses_the_same_addresses(text: str) -> None:
    with pytest.raises(InvalidAddress):
        canonical_address(text)
    with pytest.raises(ValueError, match="invalid mailbox address"):
        parse_mailbox(text)
    with pytest.raises(StoreError, match="invalid address"):
        new_address(text)
    assert lookup_key(text) is None
    with pytest.raises(CommandError, match="invalid address"):
        cli_address(text)
    owner = Sender("kelly@example.org", frozenset({"kelly@example.org", "finance@example.org"}))
    assert not owner.may_send_as(text)


def test_config_error_names_the_rule() -> None:
    with pytest.raises(ValueError) as caught:
        parse_mailbox("\u212aelly@example.org")
    assert str(caught.value) == (
        "invalid mailbox address '\u212aelly@example.org' (U+212A KELVIN SIGN would fold to ASCII)"
    )
    with pytest.raises(ValueError) as caught:
        parse_domains("example.org,xn--zz.example")
    assert str(caught.value).startswith("invalid domain 'xn--zz.example' (not an IDNA 2008")


def _policy(tmp_path: object, **overrides: object) -> RecipientPolicy:
    config = make_config(
        tmp_path,  # type: ignore[arg-type]
        local_domains=parse_domains("example.org,bücher.example"),
        mailboxes=parse_mailboxes("kelly@example.org,finance@example.org,jörg@bücher.example"),
        aliases=parse_aliases("Info@Bücher.example=jörg@bücher.example"),
        **overrides,
    )
    return RecipientPolicy(config)


RCPT = [
    # (local part as sent, domain as sent, reply, mailboxes)
    ("kelly", "example.org", replies.RECIPIENT_OK, ("kelly@example.org",)),
    ("KELLY", "EXAMPLE.ORG", replies.RECIPIENT_OK, ("kelly@example.org",)),
    ('"kelly"', "example.org", replies.RECIPIENT_OK, ("kelly@example.org",)),
    ("jörg", "bücher.example", replies.RECIPIENT_OK, (f"jörg@{BUCHER}",)),
    ("JÖRG", BUCHER, replies.RECIPIENT_OK, (f"jörg@{BUCHER}",)),
    (unicodedata.normalize("NFD", "jörg"), NFD_BUCHER, replies.RECIPIENT_OK, (f"jörg@{BUCHER}",)),
    ("info", "BÜCHER.example", replies.RECIPIENT_OK, (f"jörg@{BUCHER}",)),
    ("postmaster", BUCHER, replies.RECIPIENT_OK, (f"postmaster@{BUCHER}",)),
    ("\u212aelly", "example.org", replies.MAILBOX_NAME_REFUSED, ()),
    ("\uff4belly", "example.org", replies.MAILBOX_NAME_REFUSED, ()),
    ("\uff2b\uff25\uff2c\uff2c\uff39", "example.org", replies.MAILBOX_NAME_REFUSED, ()),
    ("\ufb01nance", "example.org", replies.MAILBOX_NAME_REFUSED, ()),
    ("ke\u00adlly", "example.org", replies.MAILBOX_NAME_REFUSED, ()),
    ('"a b"', "example.org", replies.MAILBOX_NAME_REFUSED, ()),
    ("kelly", "\uff45xample.org", replies.RELAY_DENIED, ()),
    ("kelly", "xn--zz.example", replies.RELAY_DENIED, ()),
    ("kelly", "[192.0.2.1]", replies.RELAY_DENIED, ()),
    ("nobody", "example.org", replies.NO_SUCH_USER, ()),
]


@pytest.mark.parametrize(("local", "domain", "reply", "mailboxes"), RCPT)
def test_recipient_resolution(
    tmp_path: object, local: str, domain: str, reply: replies.Reply, mailboxes: tuple[str, ...]
) -> None:
    decision = _policy(tmp_path).resolve(Address(local, domain.lower()))
    assert (decision.reply, decision.mailboxes) == (reply, mailboxes)


def test_postmaster_without_a_domain_uses_the_first_local_domain(tmp_path: object) -> None:
    decision = _policy(tmp_path).resolve(Address("postmaster", ""))
    assert decision.mailboxes == ("postmaster@example.org",)
