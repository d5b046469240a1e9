"""``mailsrv dkim`` as the installed console script: keygen's files and record, ``check`` and
``activate`` against a real ``twisted.names`` DNS server on loopback, and every bad input as
one line with a non-zero exit."""

from __future__ import annotations

import base64
import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.names import dns

from tests.relay_dns import start_black_hole, start_dns

MAILSRV = Path(sys.executable).parent / "mailsrv"
ZONE_STRING = re.compile(r'"([^"]*)"')


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Cli:
    """The command against a data directory (and a DNS server, once one is set)."""

    data_dir: Path
    env: dict[str, str]

    def __call__(self, *args: str, **env: str) -> Result:
        done = subprocess.run(
            [str(MAILSRV), "dkim", *args],
            capture_output=True,
            text=True,
            env={**self.env, **env},
            timeout=60,
        )
        assert "Traceback" not in done.stderr, done.stderr
        return Result(done.returncode, done.stdout, done.stderr)

    def in_thread(self, *args: str, **env: str) -> Any:
        """Run while the test's reactor (serving DNS) keeps running."""
        return threads.deferToThread(self, *args, **env)

    def keygen(self, domain: str, *args: str) -> tuple[str, list[bytes]]:
        """Make a key; its record's name and strings, as printed."""
        result = self("keygen", domain, *args)
        assert result.code == 0, result
        [line] = [line for line in result.out.splitlines() if not line.startswith(";")]
        return line.split()[0].rstrip("."), [s.encode() for s in ZONE_STRING.findall(line)]


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTP_")}
    env.update(SMTP_DATA_DIR=str(data_dir), SMTP_DNS_SERVERS="127.0.0.1:9")
    return Cli(data_dir, env)


def test_keygen_writes_a_private_key_and_prints_the_record_to_publish(cli: Cli) -> None:
    result = cli("keygen", "Example.ORG", "--selector", "mail2026")
    assert result.code == 0 and result.err == "", result
    path = cli.data_dir / "dkim" / "example.org" / "mail2026.rsa.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((cli.data_dir / "dkim").stat().st_mode) == 0o700
    comments, records = [], []
    for line in result.out.splitlines():
        (comments if line.startswith(";") else records).append(line)
    assert comments == [
        "; example.org: rsa-2048 key, selector mail2026, active: it signs example.org's mail "
        "from now on",
        f"; key file: {path}",
        "; publish this TXT record, then check it: mailsrv dkim check example.org",
    ]
    [record] = records
    assert record.startswith('mail2026._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; p=')
    strings = ZONE_STRING.findall(record)
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    public = subprocess.run(  # the key file is plain PEM: openssl reads it
        ["openssl", "pkey", "-in", str(path), "-pubout", "-outform", "DER"],
        capture_output=True,
        check=True,
    ).stdout
    assert "".join(strings).endswith("p=" + base64.b64encode(public).decode())

    ed = cli("keygen", "example.org", "--type", "ed25519")
    assert ed.code == 0, ed
    assert re.search(
        r'^s\d{6}e\._domainkey\.example\.org\. IN TXT \( "v=DKIM1; k=ed25519; p=', ed.out, re.M
    )
    later = cli("keygen", "example.org", "--selector", "next")
    assert "not active yet" in later.out
    assert "then sign with it: mailsrv dkim activate example.org next" in later.out
    again = cli("record", "example.org")
    assert again.code == 0
    assert [line.split()[0] for line in again.out.splitlines() if not line.startswith(";")] == [
        "mail2026._domainkey.example.org.",
        re.findall(r"^(s\d{6}e\._domainkey\.example\.org\.)", ed.out, re.M)[0],
    ]


BAD = [
    (("keygen", "bad_domain"), {}, "mailsrv: invalid domain 'bad_domain'"),
    (("keygen", "localhost"), {}, "mailsrv: invalid domain 'localhost': expected a name like"),
    (("keygen", "192.0.2.1"), {}, "mailsrv: invalid domain '192.0.2.1'"),
    (("keygen", "example.org", "--type", "dsa"), {}, "mailsrv: unknown key type 'dsa'"),
    (("keygen", "example.org", "--selector", "a.b"), {}, "mailsrv: invalid selector 'a.b'"),
    (("keygen", "example.org", "--selector", "../x"), {}, "mailsrv: invalid selector '../x'"),
    (
        ("keygen", "example.org", "--selector", "taken"),
        {},
        "mailsrv: example.org has a key with selector 'taken' already",
    ),
    (
        ("keygen", "example.org", "--selector", "taken", "--type", "ed25519"),
        {},
        "mailsrv: example.org has a key with selector 'taken' already",
    ),
    (
        ("keygen", "example.org"),
        {"SMTP_DATA_DIR": "/nonexistent/data"},
        "mailsrv: data_dir /nonexistent/data does not exist: create it (mode 0700) or start",
    ),
    (
        ("activate", "example.org", "nope"),
        {},
        "mailsrv: example.org has no key with selector 'nope'",
    ),
    (
        ("remove", "example.org", "taken"),
        {},
        "mailsrv: example.org taken is the active rsa key: activate another first",
    ),
    (("check", "example.net"), {}, "mailsrv: example.net has no active DKIM key"),
    (
        ("record", "example.org", "--selector", "nope"),
        {},
        "mailsrv: example.org has no key with selector 'nope'",
    ),
]


@pytest.mark.parametrize(("args", "env", "message"), BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_is_one_line_and_exit_1(
    cli: Cli, args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    assert cli("keygen", "example.org", "--selector", "taken", "--type", "rsa").code == 0
    result = cli(*args, **env)
    assert result.code == 1, result
    assert result.err.startswith(message), result.err
    assert result.err.count("\n") == 1


def test_a_bad_configuration_or_usage_is_exit_2(cli: Cli) -> None:
    bad = cli("list", SMTP_PORT="abc")
    assert (bad.code, bad.err) == (
        2,
        "mailsrv: environment SMTP_PORT: expected an integer, got 'abc'\n",
    )
    usage = cli("activate", "example.org")
    assert usage.code == 2 and "the following arguments are required: SELECTOR" in usage.err


def test_a_broken_key_file_is_one_line(cli: Cli) -> None:
    cli.keygen("example.org", "--selector", "s1")
    key = cli.data_dir / "dkim" / "example.org" / "s1.rsa.key"
    key.write_text("garbage")
    result = cli("list")
    assert (result.code, result.err) == (1, f"mailsrv: DKIM key {key}: not a PEM private key\n")


def txt(strings: list[bytes]) -> dns.Record_TXT:
    return dns.Record_TXT(*strings, ttl=60)


@pytest_twisted.ensureDeferred
async def test_check_and_activate_against_a_real_dns_server(cli: Cli) -> None:
    rsa_name, rsa_strings = cli.keygen("example.test", "--selector", "r1")
    ed_name, _ = cli.keygen("example.test", "--selector", "e1", "--type", "ed25519")
    next_name, next_strings = cli.keygen("example.test", "--selector", "r2")
    other_name, _ = cli.keygen("other.test", "--selector", "r1")
    names = start_dns(
        {
            rsa_name: [txt(rsa_strings)],  # published as printed: matches
            ed_name: [txt(rsa_strings)],  # the RSA key's record under the Ed25519 name
            other_name: [txt(next_strings)],  # another key's record
            "broken._domainkey.example.test": [txt([b"v=DKIM1; p="])],
        },
        servfail=["e2._domainkey.example.test"],
    )
    dns_env = {"SMTP_DNS_SERVERS": f"127.0.0.1:{names.port}"}
    try:
        good = await cli.in_thread("check", "example.test", "--selector", "r1", **dns_env)
        assert (good.code, good.out, good.err) == (
            0,
            "example.test r1 (rsa, active): the published record matches the key\n",
            "",
        )
        both = await cli.in_thread("check", "example.test", **dns_env)  # the active keys
        assert both.code == 1
        assert both.out == "example.test r1 (rsa, active): the published record matches the key\n"
        assert both.err == (
            "mailsrv: example.test e1 (ed25519, active): the record is for k=rsa, the key is "
            "ed25519\n"
        )
        mismatch = await cli.in_thread("check", "other.test", **dns_env)
        assert (mismatch.code, mismatch.err) == (
            1,
            "mailsrv: other.test r1 (rsa, active): the record holds a different public key\n",
        )
        missing = await cli.in_thread("check", "example.test", "--selector", "r2", **dns_env)
        assert (missing.code, missing.err) == (
            1,
            "mailsrv: example.test r2 (rsa, not active): no TXT record at "
            "r2._domainkey.example.test\n",
        )

        # Rotation: r2 is not published yet, so activating it is refused; once it is, it works.
        refused = await cli.in_thread("activate", "example.test", "r2", **dns_env)
        assert refused.code == 1
        assert refused.err == (
            "mailsrv: example.test r2 not activated: no TXT record at r2._domainkey.example.test"
            " (publish it first: mailsrv dkim record example.test --selector r2; or --force)\n"
        )
        names.factory.resolver.resolvers[0].records[next_name.encode()] = [txt(next_strings)]
        done = await cli.in_thread("activate", "example.test", "r2", **dns_env)
        assert (done.code, done.out) == (
            0,
            "example.test r2 is the active rsa key (instead of r1)\n",
        )
        listing = await cli.in_thread("list")
        states = {tuple(row.split()[:2]): row.split()[3] for row in listing.out.splitlines()[1:]}
        assert states[("example.test", "r1")] == "-" and states[("example.test", "r2")] == "active"
        removed = await cli.in_thread("remove", "example.test", "r1")
        assert (
            removed.code == 0 and "its TXT record r1._domainkey.example.test can go" in removed.out
        )
        forced = await cli.in_thread("activate", "other.test", "r1", "--force", **dns_env)
        assert forced.code == 0

        # A server failure and no answer at all are said as such.
        servfail = cli.keygen("example.test", "--selector", "e2", "--type", "ed25519")
        assert servfail
        failed = await cli.in_thread("check", "example.test", "--selector", "e2", **dns_env)
        assert (failed.code, failed.err) == (
            1,
            "mailsrv: example.test e2 (ed25519, not active): the lookup of "
            "e2._domainkey.example.test failed: server failure (SERVFAIL)\n",
        )
    finally:
        await names.stop()
    port, _protocol = start_black_hole()
    try:
        silent = await cli.in_thread(
            "check",
            "example.test",
            "--selector",
            "r2",
            SMTP_DNS_SERVERS=f"127.0.0.1:{port.getHost().port}",
            SMTP_RELAY_DNS_TIMEOUT="1",
        )
        assert (silent.code, silent.err) == (
            1,
            "mailsrv: example.test r2 (rsa, active): the lookup of r2._domainkey.example.test "
            "timed out after 1 s\n",
        )
    finally:
        await port.stopListening()
