"""SMTP AUTH end to end: real TLS, the real user stores, smtplib and raw clients.

Every test runs against SQLite and PostgreSQL (the ``user_store`` fixture), so both stores are
held to one behaviour.
"""

from __future__ import annotations

import base64
import hmac
import select
import smtplib
import ssl
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import pytest_twisted
from twisted.internet import task, threads
from twisted.logger import globalLogPublisher

from mailsrv.auth import cram
from mailsrv.auth.account_identity import AccountIdentities
from mailsrv.auth.migrations import lookup_key
from mailsrv.auth.passwords import CHEAP_PROFILE, PasswordHasher
from mailsrv.auth.portal import build_portal
from mailsrv.auth.throttle import (
    ACCOUNT_THROTTLED,
    IP_THROTTLED,
    REJECTED,
    AuthAttempt,
    AuthThrottle,
)
from mailsrv.smtp import replies
from mailsrv.smtp.policy import RecipientPolicy
from mailsrv.tls import ReloadingServerTLS
from tests.conftest import RawClient, RunningServer, make_config, run_client, start_server
from tests.test_tls import HOSTNAME, CertFiles

PASSWORD = "correct horse battery"
UTF8_PASSWORD = "pässwörd 🐇"
NOW = 1_800_000_000.0


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class CountingHasher(PasswordHasher):
    """A real hasher that also counts verifications (to see unknown users cost the same)."""

    def __init__(self) -> None:
        super().__init__(CHEAP_PROFILE)
        self.verifications: list[bool] = []

    def verify(self, password: str, stored: str | None) -> Any:
        self.verifications.append(stored is not None)
        return super().verify(password, stored)


async def populate(store: Any, hasher: PasswordHasher) -> None:
    """Accounts used below: erin (with CRAM-MD5 and an alias), dave (disabled), sam (send as
    anyone), old (a legacy bcrypt hash as exported from Dovecot)."""
    await store.add_account(
        "erin@example.org", hasher.hash(PASSWORD), cram.make_context(PASSWORD), False, NOW
    )
    await store.add_alias("e.smith@example.org", "erin@example.org", NOW)
    await store.add_account("dave@example.org", hasher.hash(PASSWORD), None, False, NOW)
    await store.set_enabled("dave@example.org", False, NOW)
    await store.add_account("sam@example.org", hasher.hash(PASSWORD), None, True, NOW)
    legacy = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$")
    await store.add_account("old@example.org", "{BLF-CRYPT}" + legacy, None, False, NOW)
    await store.add_account("utf@example.org", hasher.hash(UTF8_PASSWORD), None, False, NOW)
    # for the Unicode case-folding spellings of the throttle tests
    for login in ("kate@example.org", "strasse@example.org"):
        await store.add_account(
            login, hasher.hash(PASSWORD), cram.make_context(PASSWORD), False, NOW
        )


class AuthServer:
    """A running server with TLS, AUTH and a populated store."""

    def __init__(self, running: RunningServer, store: Any, hasher: CountingHasher, certs: Any):
        self.running = running
        self.store = store
        self.hasher = hasher
        self.certs = certs

    @property
    def ports(self) -> dict[str, int]:
        return self.running.ports

    def context(self) -> ssl.SSLContext:
        return self.certs.client_context()


async def start_auth_server(
    tmp_path: Path,
    store: Any,
    certs: CertFiles,
    runner: Any = None,
    clock: Any = None,
    **overrides: Any,
) -> AuthServer:
    """``runner`` runs the password hashing (default: Twisted's thread pool); ``clock`` is
    the server's time (default: the reactor)."""
    from twisted.internet import reactor

    settings: dict[str, Any] = {
        "enable_tls": True,
        "tls_cert": str(certs.chain),
        "tls_key": str(certs.key),
        "enable_auth": True,
        "enable_cram_md5": True,
    }
    settings.update(overrides)
    config = make_config(tmp_path, **settings)
    hasher = CountingHasher()
    await populate(store, hasher)
    portal = build_portal(
        store,
        hasher,
        runner or (lambda f, *a, **kw: threads.deferToThread(f, *a, **kw)),
        reactor,
    )
    running = await start_server(
        config,
        listeners=("mx", "submission", "smtps"),
        tls=ReloadingServerTLS(str(certs.chain), str(certs.key)),
        portal=portal,
        policy=RecipientPolicy(config, store),
        identities=AccountIdentities(store),
        clock=clock,
    )
    return AuthServer(running, store, hasher, certs)


@pytest.fixture
def certs(tmp_path: Path) -> CertFiles:
    return CertFiles(tmp_path / "tls")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Builds each user store on a fresh database (PostgreSQL: the session's cluster)."""
    from twisted.internet import reactor

    from mailsrv.auth.pg_store import PostgresUserStore
    from mailsrv.auth.sqlite_store import SQLiteUserStore

    if request.param == "sqlite":
        return lambda: SQLiteUserStore(tmp_path / "users.db", reactor)
    dsn = request.getfixturevalue("pg_cluster").create_database()
    return lambda: PostgresUserStore(dsn, reactor)


@pytest_twisted.async_yield_fixture
async def user_store(store_factory: Any) -> Any:
    """An open user store, once per backend."""
    store = store_factory()
    await store.open()
    yield store
    await store.close()


@pytest_twisted.async_yield_fixture
async def auth(tmp_path: Path, user_store: Any, certs: CertFiles) -> Any:
    server = await start_auth_server(tmp_path, user_store, certs)
    yield server
    await server.running.service.stopService()


def tls_client(port: int, context: ssl.SSLContext) -> RawClient:
    """A raw client on the submission port, after EHLO + STARTTLS + EHLO."""
    client = RawClient(port, timeout=10)
    client.read_reply()
    client.command(b"EHLO client.test")
    assert client.command(b"STARTTLS").startswith(b"220")
    client.sock = context.wrap_socket(client.sock, server_hostname=HOSTNAME)
    client.command(b"EHLO client.test")
    return client


def ehlo_keywords(reply: bytes) -> list[bytes]:
    return [line[4:] for line in reply.split(b"\r\n") if line]


# --- advertisement and TLS requirement ---------------------------------------------------------


def _advertised(port: int, context: ssl.SSLContext) -> tuple[list[bytes], bytes, list[bytes]]:
    client = RawClient(port, timeout=10)
    try:
        client.read_reply()
        before = ehlo_keywords(client.command(b"EHLO client.test"))
        refused = client.command(b"AUTH PLAIN " + b64(b"\0erin@example.org\0" + PASSWORD.encode()))
        client.command(b"STARTTLS")
        client.sock = context.wrap_socket(client.sock, server_hostname=HOSTNAME)
        after = ehlo_keywords(client.command(b"EHLO client.test"))
        return before, refused, after
    finally:
        client.close()


@pytest.mark.parametrize("listener", ["submission", "mx"])
@pytest_twisted.ensureDeferred
async def test_auth_offered_only_after_tls(auth: AuthServer, listener: str) -> None:
    before, refused, after = await run_client(_advertised, auth.ports[listener], auth.context())
    assert not any(k.startswith(b"AUTH") for k in before)
    assert refused == replies.ENCRYPTION_REQUIRED.format()
    assert b"AUTH PLAIN LOGIN CRAM-MD5" in after


@pytest_twisted.ensureDeferred
async def test_auth_can_be_turned_off_for_the_mx_port(
    tmp_path: Path, user_store: Any, certs: CertFiles
) -> None:
    server = await start_auth_server(tmp_path, user_store, certs, auth_on_mx=False)
    try:
        _, _, after_mx = await run_client(_advertised, server.ports["mx"], server.context())
        _, _, after_sub = await run_client(
            _advertised, server.ports["submission"], server.context()
        )
    finally:
        await server.running.service.stopService()
    assert not any(k.startswith(b"AUTH") for k in after_mx)
    assert any(k.startswith(b"AUTH") for k in after_sub)


# --- the three mechanisms with smtplib ---------------------------------------------------------


def _submit(port: int, context: ssl.SSLContext, mechanism: str, implicit: bool) -> Any:
    if implicit:
        client: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", port, context=context)
    else:
        client = smtplib.SMTP("127.0.0.1", port)
        client.starttls(context=context)
    with client:
        client.ehlo("client.test")
        client.user, client.password = "erin@example.org", PASSWORD
        method = {
            "PLAIN": client.auth_plain,
            "LOGIN": client.auth_login,
            "CRAM-MD5": client.auth_cram_md5,
        }[mechanism]
        code, _ = client.auth(mechanism, method)
        refused = client.sendmail(
            "e.smith@example.org",
            ["alice@example.org", "erin@example.org"],
            b"Subject: s\r\n\r\nx\r\n",
        )
        return code, refused


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
@pytest.mark.parametrize("listener", ["submission", "smtps"])
@pytest_twisted.ensureDeferred
async def test_submission_with_each_mechanism(
    auth: AuthServer, mechanism: str, listener: str
) -> None:
    code, refused = await run_client(
        _submit, auth.ports[listener], auth.context(), mechanism, listener == "smtps"
    )
    assert code == 235
    assert refused == {}
    [message] = auth.running.messages("erin@example.org")
    assert b"with ESMTPSA id" in message
    assert PASSWORD.encode() not in message


# --- failures look alike ----------------------------------------------------------------------


def _plain(port: int, context: ssl.SSLContext, login: str, password: str) -> bytes:
    client = tls_client(port, context)
    try:
        return client.command(b"AUTH PLAIN " + b64(f"\0{login}\0{password}".encode()))
    finally:
        client.close()


@pytest.mark.parametrize(
    ("login", "password"),
    [
        ("erin@example.org", "wrong"),
        ("nobody@example.org", PASSWORD),
        ("dave@example.org", PASSWORD),  # disabled
        ("ERIN@EXAMPLE.ORG", "wrong"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_failed_logins_get_one_reply_and_the_same_work(
    auth: AuthServer, login: str, password: str
) -> None:
    reply = await run_client(_plain, auth.ports["submission"], auth.context(), login, password)
    assert reply == replies.AUTH_FAILED.format()
    assert len(auth.hasher.verifications) == 1  # unknown users are verified against a dummy


@pytest_twisted.ensureDeferred
async def test_utf8_password(auth: AuthServer) -> None:
    reply = await run_client(
        _plain, auth.ports["submission"], auth.context(), "utf@example.org", UTF8_PASSWORD
    )
    assert reply == replies.AUTH_OK.format()


@pytest_twisted.ensureDeferred
async def test_login_is_case_insensitive(auth: AuthServer) -> None:
    reply = await run_client(
        _plain, auth.ports["submission"], auth.context(), "Erin@Example.ORG", PASSWORD
    )
    assert reply == replies.AUTH_OK.format()


# --- AUTH protocol rules ----------------------------------------------------------------------


def _script(port: int, context: ssl.SSLContext, lines: list[bytes]) -> list[bytes]:
    client = tls_client(port, context)
    try:
        return [client.command(line) for line in lines]
    finally:
        client.close()


GOOD_PLAIN = b"AUTH PLAIN " + b64(b"\0erin@example.org\0" + PASSWORD.encode())

RULES = [
    ([b"AUTH"], [replies.AUTH_SYNTAX]),
    ([b"AUTH NTLM"], [replies.AUTH_MECHANISM_UNKNOWN]),
    ([b"AUTH PLAIN !!notbase64!!"], [replies.AUTH_MALFORMED]),
    ([b"AUTH PLAIN " + b64(b"just-one-part")], [replies.AUTH_MALFORMED]),
    ([b"AUTH PLAIN " + b64(b"other\0erin@example.org\0x")], [replies.AUTH_MALFORMED]),
    ([b"AUTH PLAIN ="], [replies.AUTH_MALFORMED]),  # RFC 4954 empty initial response
    ([b"AUTH PLAIN", b"="], [None, replies.AUTH_MALFORMED]),
    ([b"AUTH PLAIN", b"*"], [None, replies.AUTH_ABORTED]),
    (
        [b"AUTH LOGIN " + b64(b"erin@example.org"), b64(PASSWORD.encode())],
        [None, replies.AUTH_OK],
    ),
    ([b"AUTH LOGIN", b"", b"x"], [None, None, replies.AUTH_MALFORMED]),
    ([b"AUTH LOGIN", b"*"], [None, replies.AUTH_ABORTED]),
    ([b"AUTH LOGIN", b"%%%"], [None, replies.AUTH_MALFORMED]),
    ([b"AUTH CRAM-MD5", b64(b"no-space-here")], [None, replies.AUTH_MALFORMED]),
    ([b"AUTH CRAM-MD5 " + b64(b"initial")], [replies.AUTH_MALFORMED]),
    ([GOOD_PLAIN, GOOD_PLAIN], [replies.AUTH_OK, replies.ALREADY_AUTHENTICATED]),
    (
        [b"MAIL FROM:<erin@example.org>"],
        [replies.AUTH_REQUIRED],
    ),
    (
        [b"AUTH PLAIN " + b64(b"\0erin@example.org\0wrong"), b"NOOP"],
        [replies.AUTH_FAILED, replies.OK],
    ),
]


@pytest.mark.parametrize(("lines", "expected"), RULES)
@pytest_twisted.ensureDeferred
async def test_auth_rules_on_submission(
    auth: AuthServer, lines: list[bytes], expected: list[Any]
) -> None:
    got = await run_client(_script, auth.ports["submission"], auth.context(), lines)
    for reply, want in zip(got, expected, strict=True):
        if want is None:
            assert reply.startswith(b"334 ")
        else:
            assert reply == want.format()


@pytest_twisted.ensureDeferred
async def test_auth_inside_a_transaction_is_refused(auth: AuthServer) -> None:
    got = await run_client(
        _script,
        auth.ports["mx"],
        auth.context(),
        [b"MAIL FROM:<x@remote.test>", GOOD_PLAIN],
    )
    assert got == [replies.SENDER_OK.format(), replies.NOT_IN_TRANSACTION.format()]


@pytest_twisted.ensureDeferred
async def test_pipelined_auth_mail_rcpt_in_order(auth: AuthServer) -> None:
    def run(port: int, context: ssl.SSLContext) -> list[bytes]:
        client = tls_client(port, context)
        try:
            client.send(
                GOOD_PLAIN
                + b"\r\nMAIL FROM:<erin@example.org>\r\nRCPT TO:<alice@example.org>\r\nRSET\r\n"
            )
            return [client.read_reply() for _ in range(4)]
        finally:
            client.close()

    got = await run_client(run, auth.ports["submission"], auth.context())
    assert got == [
        replies.AUTH_OK.format(),
        replies.SENDER_OK.format(),
        replies.RECIPIENT_OK.format(),
        replies.RESET_OK.format(),
    ]


# --- what an authenticated user may do --------------------------------------------------------


SENDER_CASES = [
    ("erin@example.org", "erin@example.org", replies.SENDER_OK),
    ("erin@example.org", "E.Smith@example.org", replies.SENDER_OK),  # own alias, any case
    ("erin@example.org", "alice@example.org", replies.SENDER_NOT_OWNED),
    ("erin@example.org", "", replies.SENDER_OK),  # null sender (bounces)
    ("sam@example.org", "anyone@remote.test", replies.SENDER_OK),  # may send as anyone
]


@pytest.mark.parametrize(("login", "sender", "expected"), SENDER_CASES)
@pytest_twisted.ensureDeferred
async def test_mail_from_is_bound_to_the_login(
    auth: AuthServer, login: str, sender: str, expected: Any
) -> None:
    plain = b"AUTH PLAIN " + b64(f"\0{login}\0{PASSWORD}".encode())
    got = await run_client(
        _script, auth.ports["submission"], auth.context(), [plain, f"MAIL FROM:<{sender}>".encode()]
    )
    assert got == [replies.AUTH_OK.format(), expected.format()]


@pytest_twisted.ensureDeferred
async def test_recipients_come_from_accounts_and_aliases(auth: AuthServer) -> None:
    got = await run_client(
        _script,
        auth.ports["mx"],
        auth.context(),
        [
            b"MAIL FROM:<x@remote.test>",
            b"RCPT TO:<erin@example.org>",
            b"RCPT TO:<E.SMITH@example.org>",
            b"RCPT TO:<dave@example.org>",
            b"RCPT TO:<nobody@example.org>",
            b"RCPT TO:<someone@remote.test>",
        ],
    )
    assert got == [
        replies.SENDER_OK.format(),
        replies.RECIPIENT_OK.format(),
        replies.RECIPIENT_OK.format(),
        replies.MAILBOX_DISABLED.format(),
        replies.NO_SUCH_USER.format(),
        replies.RELAY_DENIED.format(),
    ]


@pytest_twisted.ensureDeferred
async def test_authenticated_remote_recipient_is_refused_until_relay_exists(
    auth: AuthServer,
) -> None:
    got = await run_client(
        _script,
        auth.ports["submission"],
        auth.context(),
        [GOOD_PLAIN, b"MAIL FROM:<erin@example.org>", b"RCPT TO:<friend@remote.test>"],
    )
    assert got[2] == replies.RELAY_NOT_AVAILABLE.format()


# --- STARTTLS forgets a plaintext AUTH --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_starttls_forgets_earlier_authentication(
    tmp_path: Path, user_store: Any, certs: CertFiles
) -> None:
    server = await start_auth_server(tmp_path, user_store, certs, allow_plaintext_auth=True)

    def run(port: int, context: ssl.SSLContext) -> list[bytes]:
        client = RawClient(port, timeout=10)
        try:
            client.read_reply()
            client.command(b"EHLO client.test")
            first = client.command(GOOD_PLAIN)
            client.command(b"STARTTLS")
            client.sock = context.wrap_socket(client.sock, server_hostname=HOSTNAME)
            client.command(b"EHLO client.test")
            return [
                first,
                client.command(b"MAIL FROM:<erin@example.org>"),
                client.command(GOOD_PLAIN),
            ]
        finally:
            client.close()

    try:
        got = await run_client(run, server.ports["submission"], server.context())
    finally:
        await server.running.service.stopService()
    assert got == [
        replies.AUTH_OK.format(),
        replies.AUTH_REQUIRED.format(),
        replies.AUTH_OK.format(),
    ]


# --- legacy hashes migrate ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_legacy_bcrypt_hash_is_rehashed_to_argon2id(auth: AuthServer) -> None:
    before = await auth.store.get_account("old@example.org")
    assert before.password_hash.startswith("{BLF-CRYPT}$2y$")
    reply = await run_client(
        _plain, auth.ports["submission"], auth.context(), "old@example.org", PASSWORD
    )
    assert reply == replies.AUTH_OK.format()
    after = await auth.store.get_account("old@example.org")
    assert after.password_hash.startswith("$argon2id$")
    assert (
        await run_client(
            _plain, auth.ports["submission"], auth.context(), "old@example.org", PASSWORD
        )
        == replies.AUTH_OK.format()
    )


# --- throttling -------------------------------------------------------------------------------


def fail_once(throttle: AuthThrottle, ip: str, identity: str) -> float:
    """One whole failed attempt: begin, the delay before the 535, finish."""
    attempt = throttle.begin(ip, identity)
    assert isinstance(attempt, AuthAttempt), attempt
    delay = throttle.failure_delay(attempt)
    throttle.finish(attempt, REJECTED)
    return delay


def test_throttle_delays_grow_then_block_and_expire() -> None:
    clock = task.Clock()
    throttle = AuthThrottle(clock, per_ip=4, per_account=6, window=900)
    delays = [fail_once(throttle, "203.0.113.9", f"user{i}@example.org") for i in range(4)]
    assert delays == [0.5, 1.0, 2.0, 4.0]
    assert throttle.ip_blocked("203.0.113.9")
    assert throttle.begin("203.0.113.9", "other@example.org") == IP_THROTTLED
    assert not throttle.ip_blocked("203.0.113.10")
    clock.advance(901)
    assert not throttle.ip_blocked("203.0.113.9")
    for n in range(5):
        fail_once(throttle, f"198.51.100.{n}", "erin@example.org")
    assert fail_once(throttle, "198.51.100.99", "erin@example.org") == 8.0  # capped
    assert throttle.account_blocked("erin@example.org")
    assert throttle.begin("198.51.100.100", "erin@example.org") == ACCOUNT_THROTTLED
    clock.advance(901)
    throttle.expire()
    assert not throttle.account_blocked("erin@example.org")
    assert throttle.tracked() == (0, 0)


@pytest_twisted.ensureDeferred
async def test_failed_auth_from_one_ip_ends_in_421(
    tmp_path: Path, user_store: Any, certs: CertFiles
) -> None:
    server = await start_auth_server(
        tmp_path, user_store, certs, trusted_networks=(), auth_max_failures_per_ip=2
    )
    bad = b"AUTH PLAIN " + b64(b"\0erin@example.org\0wrong")
    try:
        got = await run_client(
            _script, server.ports["submission"], server.context(), [bad, bad, bad]
        )
    finally:
        await server.running.service.stopService()
    assert got == [
        replies.AUTH_FAILED.format(),
        replies.AUTH_FAILED.format(),
        replies.AUTH_IP_THROTTLED.format(),
    ]


@pytest_twisted.ensureDeferred
async def test_failed_auth_for_one_account_gets_454(
    tmp_path: Path, user_store: Any, certs: CertFiles
) -> None:
    server = await start_auth_server(tmp_path, user_store, certs, auth_max_failures_per_account=1)
    bad = b"AUTH PLAIN " + b64(b"\0erin@example.org\0wrong")
    try:
        got = await run_client(
            _script, server.ports["submission"], server.context(), [bad, GOOD_PLAIN]
        )
    finally:
        await server.running.service.stopService()
    assert got == [replies.AUTH_FAILED.format(), replies.AUTH_ACCOUNT_THROTTLED.format()]


# --- one throttle identity per account ---------------------------------------------------------

# (account, spelling, names the account).  None: whether it does depends on how far the store's
# canonical form (lookup_key / parse_mailbox) folds Unicode; the tests then ask that function.
SPELLINGS: list[tuple[str, str, bool | None]] = [
    ("erin@example.org", "erin@example.org", True),
    ("erin@example.org", "ERIN@EXAMPLE.ORG", True),
    ("erin@example.org", "Erin@Example.Org", True),
    ("erin@example.org", "  erin@example.org\t", True),
    ("erin@example.org", "erin@example.org.", True),
    ("erin@example.org", "Erin@EXAMPLE.org.", True),
    ("erin@example.org", "e.smith@example.org", True),  # an alias of the account
    ("erin@example.org", "E.Smith@Example.org.", True),
    ("kate@example.org", "\u212aate@example.org", None),  # KELVIN SIGN (lower-cases to k)
    ("strasse@example.org", "STRASSE@example.org", True),
    ("strasse@example.org", "stra\u00dfe@example.org", None),  # sharp s: folds to ss
    ("strasse@example.org", "STRA\u1e9eE@example.org", None),  # capital sharp s
]
LISTENERS = ("mx", "submission", "smtps")
MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


def next_row(row: tuple[str, ...]) -> tuple[str, str, bool | None]:
    """The SPELLINGS entry of a (spelling, ...) table row."""
    return next(entry for entry in SPELLINGS if entry[1] == row[0])


def names_account(account: str, spelling: str, expected: bool | None) -> bool:
    if expected is not None:
        return expected
    return lookup_key(spelling) == account


def open_session(port: int, context: ssl.SSLContext, implicit: bool) -> RawClient:
    """A raw client after EHLO, over TLS: implicit (smtps) or STARTTLS."""
    if not implicit:
        return tls_client(port, context)
    client = RawClient(port, timeout=10)
    client.sock = context.wrap_socket(client.sock, server_hostname=HOSTNAME)
    client.read_reply()
    client.command(b"EHLO client.test")
    return client


def authenticate(client: RawClient, mechanism: str, login: str, password: str) -> bytes:
    """One AUTH exchange with ``mechanism``; returns the final reply."""
    user, secret = login.encode(), password.encode()
    if mechanism == "PLAIN":
        return client.command(b"AUTH PLAIN " + b64(b"\0" + user + b"\0" + secret))
    if mechanism == "LOGIN":
        assert client.command(b"AUTH LOGIN").startswith(b"334 ")
        assert client.command(b64(user)).startswith(b"334 ")
        return client.command(b64(secret))
    challenge = client.command(b"AUTH CRAM-MD5")
    assert challenge.startswith(b"334 ")
    digest = hmac.new(secret, base64.b64decode(challenge[4:].strip()), "md5").hexdigest()
    return client.command(b64(user + b" " + digest.encode()))


def _auth_on(ports: dict[str, int], context: ssl.SSLContext, attempts: list[Any]) -> list[bytes]:
    """Each of ``attempts`` = (listener, mechanism, login, password) in a session of its own."""
    got = []
    for listener, mechanism, login, password in attempts:
        client = open_session(ports[listener], context, listener == "smtps")
        try:
            got.append(authenticate(client, mechanism, login, password))
        finally:
            client.close()
    return got


@pytest_twisted.ensureDeferred
async def test_every_spelling_resolves_to_the_account(user_store: Any) -> None:
    await populate(user_store, PasswordHasher(CHEAP_PROFILE))
    identities = AccountIdentities(user_store)
    for account, spelling, expected in SPELLINGS:
        identity = await identities.resolve(spelling.strip())
        if names_account(account, spelling, expected):
            assert identity == account, spelling
        else:
            assert identity.startswith("unknown#"), spelling
    unknown = await identities.resolve("nobody@example.org")
    assert unknown.startswith("unknown#")
    assert unknown == await identities.resolve("NOBODY@example.org.")


@pytest_twisted.ensureDeferred
async def test_spellings_that_name_an_account_log_in(auth: AuthServer) -> None:
    """The lock test below is not vacuous: these spellings do reach the account."""
    attempts = [("submission", "PLAIN", spelling, PASSWORD) for _, spelling, _ in SPELLINGS]
    got = await run_client(_auth_on, auth.ports, auth.context(), attempts)
    want = []
    for account, spelling, expected in SPELLINGS:
        logs_in = names_account(account, spelling, expected) and "smith" not in spelling.lower()
        want.append((replies.AUTH_OK if logs_in else replies.AUTH_FAILED).format())
    assert dict(zip([s for _, s, _ in SPELLINGS], got, strict=True)) == dict(
        zip([s for _, s, _ in SPELLINGS], want, strict=True)
    )


@pytest_twisted.ensureDeferred
async def test_a_locked_account_is_locked_for_every_spelling_listener_and_mechanism(
    tmp_path: Path, user_store: Any, certs: CertFiles
) -> None:
    server = await start_auth_server(tmp_path, user_store, certs, auth_max_failures_per_account=1)
    accounts = sorted({account for account, _, _ in SPELLINGS})
    table = [
        (account, spelling, expected, listener, mechanism)
        for account, spelling, expected in SPELLINGS
        for listener in LISTENERS
        for mechanism in MECHANISMS
    ]
    try:
        locking = [("submission", "PLAIN", account, "wrong") for account in accounts]
        assert await run_client(_auth_on, server.ports, server.context(), locking) == [
            replies.AUTH_FAILED.format()
        ] * len(accounts)
        attempts = [(lst, mech, spelling, PASSWORD) for _, spelling, _, lst, mech in table]
        got = await run_client(_auth_on, server.ports, server.context(), attempts)
    finally:
        await server.running.service.stopService()
    results = {
        (s, lst, mech): reply for (_, s, _, lst, mech), reply in zip(table, got, strict=True)
    }
    locked = replies.AUTH_ACCOUNT_THROTTLED.format()
    # A spelling that cannot reach the account has nothing to lock; it fails (535, or 454 once
    # its own unknown-name bucket has used up its failures) and never logs in.
    others = {replies.AUTH_FAILED.format(), locked}
    wrong = {
        row: reply
        for row, reply in results.items()
        if reply not in ({locked} if names_account(*next_row(row)) else others)
    }
    assert wrong == {}
    assert server.hasher.verifications.count(True) == len(accounts)  # no hash for the locked


@pytest_twisted.ensureDeferred
async def test_failures_under_every_spelling_use_one_budget(user_store: Any) -> None:
    await populate(user_store, PasswordHasher(CHEAP_PROFILE))
    identities = AccountIdentities(user_store)
    erin = [spelling for account, spelling, _ in SPELLINGS if account == "erin@example.org"]
    throttle = AuthThrottle(task.Clock(), per_ip=100, per_account=len(erin), window=900)
    for n, spelling in enumerate(erin):
        identity = await identities.resolve(spelling.strip())
        attempt = throttle.begin(f"203.0.113.{n}", identity)
        assert isinstance(attempt, AuthAttempt), spelling
        throttle.finish(attempt, REJECTED)
    assert throttle.account_blocked("erin@example.org")
    assert throttle.tracked() == (len(erin), 1)


@pytest_twisted.ensureDeferred
async def test_failures_under_two_spellings_lock_the_account_everywhere(
    tmp_path: Path, user_store: Any, certs: CertFiles
) -> None:
    server = await start_auth_server(tmp_path, user_store, certs, auth_max_failures_per_account=2)
    wrong = [
        ("mx", "LOGIN", "ERIN@Example.ORG.", "wrong"),
        ("smtps", "CRAM-MD5", "e.smith@example.org", "wrong"),
    ]
    right = [(lst, mech, "erin@example.org", PASSWORD) for lst in LISTENERS for mech in MECHANISMS]
    try:
        got = await run_client(_auth_on, server.ports, server.context(), wrong)
        after = await run_client(_auth_on, server.ports, server.context(), right)
    finally:
        await server.running.service.stopService()
    assert got == [replies.AUTH_FAILED.format()] * 2
    assert after == [replies.AUTH_ACCOUNT_THROTTLED.format()] * len(right)


BAD_USER_NAMES = [
    b"erin\xff@example.org",  # not UTF-8
    b"\xc3",  # truncated UTF-8
    b"a" * 256,  # longer than 255 octets
    b"a" * 200 + b"@" + b"b" * 60 + b".org",
]


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("user", BAD_USER_NAMES)
@pytest_twisted.ensureDeferred
async def test_bad_user_names_are_refused_before_any_state(
    auth: AuthServer, mechanism: str, user: bytes
) -> None:
    def run(port: int, context: ssl.SSLContext) -> list[bytes]:
        client = tls_client(port, context)
        try:
            if mechanism == "PLAIN":
                first = client.command(b"AUTH PLAIN " + b64(b"\0" + user + b"\0" + b"pw"))
            elif mechanism == "LOGIN":
                client.command(b"AUTH LOGIN")
                client.command(b64(user))
                first = client.command(b64(b"pw"))
            else:
                client.command(b"AUTH CRAM-MD5")
                first = client.command(b64(user + b" " + b"0" * 32))
            return [first, client.command(b"NOOP")]
        finally:
            client.close()

    got = await run_client(run, auth.ports["submission"], auth.context())
    assert got == [replies.AUTH_BAD_USER_NAME.format(), replies.OK.format()]
    assert auth.running.server.limits.auth_throttle.tracked() == (0, 0)
    assert auth.hasher.verifications == []


# --- attempts in flight and the hash queue -----------------------------------------------------


class HeldHashing:
    """The password-hash runner with a door: real threads, but only once the test opens it.

    Jobs asked for while it is shut wait here; ``asked(n)`` fires when n jobs are waiting.
    """

    def __init__(self) -> None:
        self._held: list[tuple[Any, Any, tuple[Any, ...]]] = []
        self._waiters: list[tuple[int, Any]] = []
        self.open = False

    def __call__(self, function: Any, *args: Any) -> Any:
        from twisted.internet import defer

        if self.open:
            return threads.deferToThread(function, *args)
        result: Any = defer.Deferred()
        self._held.append((result, function, args))
        for waiter in [w for w in self._waiters if len(self._held) >= w[0]]:
            self._waiters.remove(waiter)
            waiter[1].callback(None)
        return result

    def asked(self, count: int) -> Any:
        from twisted.internet import defer

        if len(self._held) >= count:
            return defer.succeed(None)
        waiter: Any = defer.Deferred()
        self._waiters.append((count, waiter))
        return waiter

    def release(self) -> None:
        self.open = True
        held, self._held = self._held, []
        for result, function, args in held:
            threads.deferToThread(function, *args).chainDeferred(result)


def _start_auth(port: int, context: ssl.SSLContext, login: str = "erin@example.org") -> RawClient:
    """A session that has sent a good AUTH PLAIN and not read the answer yet."""
    client = tls_client(port, context)
    client.send(b"AUTH PLAIN " + b64(f"\0{login}\0{PASSWORD}".encode()) + b"\r\n")
    return client


@pytest_twisted.ensureDeferred
async def test_attempts_in_flight_per_client_are_limited(
    tmp_path: Path, user_store: Any, certs: CertFiles
) -> None:
    hashing = HeldHashing()
    server = await start_auth_server(
        tmp_path,
        user_store,
        certs,
        runner=hashing,
        trusted_networks=(),
        auth_max_in_flight_per_client=1,
    )
    port = server.ports["submission"]
    first = None
    try:
        first = await run_client(_start_auth, port, server.context())
        await hashing.asked(1)  # its password is being checked
        second = await run_client(_plain, port, server.context(), "sam@example.org", PASSWORD)
        assert second == replies.AUTH_BUSY.format()  # at once: the hash is still held
        hashing.release()
        assert await run_client(first.read_reply) == replies.AUTH_OK.format()
        after = await run_client(_plain, port, server.context(), "sam@example.org", PASSWORD)
        assert after == replies.AUTH_OK.format()
    finally:
        hashing.release()
        if first is not None:
            first.close()
        await server.running.service.stopService()


def _race_for_the_queue(port: int, context: ssl.SSLContext) -> tuple[list[RawClient], bytes]:
    """Two more sessions send AUTH; returns them (the answered one first) and its answer."""
    waiting = [_start_auth(port, context, "sam@example.org"), _start_auth(port, context)]
    ready, _, _ = select.select([c.sock for c in waiting], [], [], 10)
    assert len(ready) == 1, "exactly one of the two is answered before the hash threads free up"
    answered = next(c for c in waiting if c.sock is ready[0])
    waiting.remove(answered)
    return [answered, *waiting], answered.read_reply()


@pytest_twisted.ensureDeferred
async def test_full_hash_queue_answers_454_at_once(
    tmp_path: Path, user_store: Any, certs: CertFiles
) -> None:
    hashing = HeldHashing()
    server = await start_auth_server(
        tmp_path, user_store, certs, runner=hashing, auth_hash_threads=1, auth_hash_queue=1
    )
    port = server.ports["submission"]
    clients: list[RawClient] = []
    try:
        clients.append(await run_client(_start_auth, port, server.context()))
        await hashing.asked(1)  # the one hash thread is busy with it
        sessions, answer = await run_client(_race_for_the_queue, port, server.context())
        clients.extend(sessions)
        assert answer == replies.AUTH_BUSY.format()
        assert server.running.server.hash_queue.waiting == 1
        hashing.release()
        assert await run_client(clients[0].read_reply) == replies.AUTH_OK.format()
        assert await run_client(clients[2].read_reply) == replies.AUTH_OK.format()
        assert await run_client(clients[1].command, GOOD_PLAIN) == replies.AUTH_OK.format()
    finally:
        hashing.release()
        for client in clients:
            client.close()
        await server.running.service.stopService()


# --- logs -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_auth_events_are_logged_without_secrets(auth: AuthServer) -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        await run_client(
            _plain, auth.ports["submission"], auth.context(), "erin@example.org", "s3cret-guess"
        )
        await run_client(
            _plain, auth.ports["submission"], auth.context(), "erin@example.org", PASSWORD
        )
    finally:
        globalLogPublisher.removeObserver(events.append)
    kinds = [e.get("event") for e in events if e.get("log_namespace") == "mailsrv.security"]
    assert "auth-failure" in kinds
    assert any(e.get("login") == "erin@example.org" and "client_ip" in e for e in events)
    assert any("auth success" in e.get("log_format", "") for e in events)
    dump = repr(events)
    assert "s3cret-guess" not in dump
    assert PASSWORD not in dump
    assert b64(b"\0erin@example.org\0s3cret-guess").decode() not in dump


# --- CRAM-MD5 checks against the stored context -----------------------------------------------


def test_cram_context_matches_hmac_md5() -> None:
    context = cram.make_context(PASSWORD)
    challenge = b"<1896.697170952@mx.example.org>"
    digest = hmac.new(PASSWORD.encode(), challenge, "md5").hexdigest().encode()
    assert cram.check_response(context, challenge, digest)
    assert not cram.check_response(context, challenge, b"0" * 32)


@pytest_twisted.ensureDeferred
async def test_a_store_that_cannot_answer_is_a_454_and_one_warning(
    tmp_path: Path, certs: CertFiles
) -> None:
    """The database goes away under the running server: AUTH gets 454 4.7.0 (try later), and
    the log says why in one line: no traceback for a known store error."""
    from twisted.internet import reactor

    from mailsrv.auth.sqlite_store import SQLiteUserStore

    store = SQLiteUserStore(tmp_path / "users.db", reactor)
    await store.open()
    server = await start_auth_server(tmp_path, store, certs)
    try:
        await store.close()
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        try:
            reply = await run_client(
                _plain, server.ports["submission"], server.context(), "erin@example.org", PASSWORD
            )
        finally:
            globalLogPublisher.removeObserver(events.append)
        assert reply.startswith(b"454 4.7.0 "), reply
        assert not [e.get("log_format") for e in events if "log_failure" in e], "no traceback"
        [warning] = [e for e in events if e.get("log_format", "").startswith("authentication")]
        assert warning["log_level"].name == "warn"
        assert "the user store is not open" in warning["error"]
        assert PASSWORD not in repr(warning)
    finally:
        await server.running.service.stopService()
