"""The ops HTTP listener of a real ``twistd mailsrv``: /metrics after real SMTP traffic,
/healthz, /readyz (ready, and 503 naming the failing check), the bearer token, 404 and 405."""

from __future__ import annotations

import base64
import json
import smtplib
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from mailsrv.ops.readiness import STORE_TIMEOUT
from tests.conftest_pg import PgCluster
from tests.test_process import Server, can_connect, free_port, make_server, wait_for
from tests.test_submission_process import PASSWORD, users

__all__ = ["make_server"]  # the fixture, used by name

TOKEN = "s3cret-token"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def request(port: int, path: str, method: str = "GET", token: str | None = None) -> Answer:
    """One HTTP request to the ops listener; any status is returned, not raised."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as response:  # noqa: S310 - loopback
            return Answer(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as e:
        return Answer(e.code, dict(e.headers), e.read())


def samples(
    port: int, token: str | None = None
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    answer = request(port, "/metrics", token=token)
    assert answer.status == 200, answer
    assert answer.headers["Content-Type"].startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(answer.body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def start(make_server: Callable[..., Server], **env: str) -> tuple[Server, int]:
    metrics_port = free_port()
    server = make_server(SMTP_METRICS_PORT=str(metrics_port), **env)
    server.start()
    wait_for(lambda: can_connect(metrics_port), 10, "the ops listener")
    return server, metrics_port


AUTH_ENV = {
    "SMTP_ENABLE_AUTH": "true",
    "SMTP_ALLOW_PLAINTEXT_AUTH": "true",
    "SMTP_ARGON2_TIME_COST": "1",
    "SMTP_ARGON2_MEMORY_KIB": "64",
    "SMTP_ARGON2_PARALLELISM": "1",
}


def test_counters_move_by_exactly_the_traffic(make_server: Callable[..., Server]) -> None:
    server, port = start(make_server, **AUTH_ENV)
    before = samples(port)
    mx = (("listener", "mx"),)
    wait_for(lambda: samples(port)[("mailsrv_connections_current", mx)] == 0, 10, "probes to close")
    before = samples(port)  # start() probed the ports: count from here
    assert ("process_resident_memory_bytes", ()) in before
    # The relay queue is read from the scheduler at each scrape: empty here.
    assert before[("mailsrv_relay_queue_messages", ())] == 0
    assert before[("mailsrv_relay_oldest_message_age_seconds", ())] == 0
    body = b"Subject: hi\r\n\r\n" + b"x" * 2000 + b"\r\n"
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail("sender@example.net", ["alice@example.org"], body)
        client.sendmail("sender@example.net", ["alice@example.org"], body)
        code, _ = client.rcpt("nobody@example.org")  # no MAIL yet: a 503, counted too
        client.mail("sender@example.net")
        code, _ = client.rcpt("nobody@example.org")
        assert code == 550
        client.rset()
    with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=10) as client:
        client.ehlo()
        code, _ = client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0x@example.org\0no").decode())
        assert code == 535
    wait_for(
        lambda: samples(port)[("mailsrv_connections_current", mx)] == 0, 10, "sessions to close"
    )
    after = samples(port)

    def moved(name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert moved("mailsrv_connections_total", mx) == 1
    assert moved("mailsrv_connections_total", (("listener", "submission"),)) == 1
    assert moved("mailsrv_messages_accepted_total", mx) == 2
    rejected = {
        labels: value - before.get((name, labels), 0.0)
        for (name, labels), value in after.items()
        if name == "mailsrv_messages_rejected_total"
    }
    assert rejected == {
        (("class", "5.5.1"), ("listener", "mx")): 1,  # RCPT before MAIL
        (("class", "5.1.1"), ("listener", "mx")): 1,  # no such user
    }
    assert moved("mailsrv_message_size_bytes_count") == 2
    assert 2 * 2000 < moved("mailsrv_message_size_bytes_sum") < 2 * 3000
    assert moved("mailsrv_accept_latency_seconds_count") == 2
    assert moved("mailsrv_commit_batch_messages_sum") == 2
    assert (
        moved("mailsrv_auth_attempts_total", (("mechanism", "PLAIN"), ("result", "failure"))) == 1
    )
    assert moved("mailsrv_security_events_total", (("event", "auth-failure"),)) == 1
    # The AUTH throttle's census, read at the scrape: 127.0.0.1 is trusted (not counted), the
    # account name that does not exist still has its failure on record.
    throttled = {
        labels: value
        for (name, labels), value in after.items()
        if name == "mailsrv_throttled_clients"
    }
    assert throttled == {
        (("kind", "ip"), ("state", "locked")): 0,
        (("kind", "ip"), ("state", "delayed")): 0,
        (("kind", "account"), ("state", "locked")): 0,
        (("kind", "account"), ("state", "delayed")): 1,
    }
    assert server.stop() == -15  # SIGTERM re-raised after a clean drain


def test_health_ready_and_routes(make_server: Callable[..., Server]) -> None:
    server, port = start(make_server)
    health = request(port, "/healthz")
    assert (health.status, health.body) == (200, b"ok\n")
    ready = request(port, "/readyz")
    assert ready.status == 200, ready.body
    report = json.loads(ready.body)
    assert report["ready"] is True
    assert set(report["checks"]) == {
        "listeners",
        "user_store",
        "data_dir_writable",
        "data_dir_free_space",
    }
    assert all(check["ok"] for check in report["checks"].values())
    assert request(port, "/nothing").status == 404
    refused = request(port, "/metrics", method="POST")
    assert refused.status == 405 and refused.headers["Allow"] == "GET, HEAD"
    head = request(port, "/healthz", method="HEAD")
    assert (head.status, head.body) == (200, b"")
    assert server.stop() == -15  # SIGTERM re-raised after a clean drain


def test_readyz_names_the_failing_check(make_server: Callable[..., Server]) -> None:
    server, port = start(make_server, SMTP_READY_MIN_FREE_BYTES=str(2**62))
    ready = request(port, "/readyz")
    assert ready.status == 503
    report = json.loads(ready.body)
    assert report["ready"] is False
    failing = {name for name, check in report["checks"].items() if not check["ok"]}
    assert failing == {"data_dir_free_space"}
    assert "below the minimum" in report["checks"]["data_dir_free_space"]["detail"]
    assert server.stop() == -15  # SIGTERM re-raised after a clean drain


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz", "/nothing"])
def test_token_is_required_on_every_path(make_server: Callable[..., Server], path: str) -> None:
    server, port = start(make_server, SMTP_METRICS_TOKEN=TOKEN)
    for token in (None, "wrong", TOKEN + "x", ""):
        answer = request(port, path, token=token)
        assert answer.status == 401, (token, answer)
        assert answer.headers["WWW-Authenticate"] == "Bearer"
    expected = 404 if path == "/nothing" else 200
    assert request(port, path, token=TOKEN).status == expected
    assert TOKEN not in server.output()
    assert server.stop() == -15  # SIGTERM re-raised after a clean drain


def test_tls_handshakes_and_sessions_are_counted(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    from tests.test_tls import CertFiles

    certs = CertFiles(tmp_path / "tls")
    server, port = start(
        make_server,
        SMTP_ENABLE_TLS="true",
        SMTP_TLS_CERT=str(certs.chain),
        SMTP_TLS_KEY=str(certs.key),
    )
    mx = (("listener", "mx"),)
    wait_for(lambda: samples(port)[("mailsrv_connections_current", mx)] == 0, 10, "probes to close")
    before = samples(port)
    context = certs.client_context()
    context.check_hostname = False  # we dial 127.0.0.1; the chain is still verified
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.starttls(context=context)
        client.ehlo("client.example")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.recv(1024)
        raw.sendall(b"EHLO x\r\nSTARTTLS\r\n")
        wait_for(lambda: b"220" in raw.recv(1024), 10, "the STARTTLS go-ahead")
        raw.sendall(b"this is not a TLS ClientHello\r\n" * 4)  # the handshake fails
    wait_for(lambda: samples(port)[("mailsrv_connections_current", mx)] == 0, 10, "sessions to end")
    after = samples(port)

    def moved(name: str, labels: tuple[tuple[str, str], ...]) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    handshakes = "mailsrv_tls_handshakes_total"
    ok = (("listener", "mx"), ("result", "ok"), ("version", "TLSv1.3"))
    failed = (("listener", "mx"), ("result", "failed"), ("version", "none"))
    assert moved(handshakes, ok) == 1
    assert moved(handshakes, failed) == 1
    sessions = "mailsrv_sessions_total"
    assert moved(sessions, (("auth", "no"), ("listener", "mx"), ("tls", "yes"))) == 1
    assert moved(sessions, (("auth", "no"), ("listener", "mx"), ("tls", "no"))) == 1
    expected = x509.load_pem_x509_certificate(certs.chain.read_bytes()).not_valid_after_utc
    expiry = after[("mailsrv_tls_certificate_expiry_timestamp_seconds", ())]
    assert expiry == expected.timestamp()
    assert server.stop() == -15


# --- /readyz and AUTH across a PostgreSQL outage -----------------------------------------------

AUTH_WITHIN = 15.0  # seconds an AUTH may wait for the database (reconnect_wait is 10 s)


def auth_plain(port: int, login: str, password: str) -> tuple[int, float]:
    """One AUTH PLAIN on a fresh session: the reply code and how long it took."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("laptop.example.net")
        token = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        started = time.monotonic()
        code, _ = client.docmd("AUTH", "PLAIN " + token)
        return code, time.monotonic() - started


def readyz(port: int) -> tuple[Answer, float]:
    """GET /readyz and how long the answer took."""
    started = time.monotonic()
    answer = request(port, "/readyz")
    return answer, time.monotonic() - started


def test_readyz_and_auth_follow_postgresql_down_and_back(
    make_server: Callable[..., Server], own_pg_cluster: PgCluster
) -> None:
    cluster = own_pg_cluster  # this test's own: stopping it disturbs no other test
    server, port = start(
        make_server, SMTP_DB_URL=cluster.create_database(), SMTP_MAILBOXES="", **AUTH_ENV
    )
    users(server, "add", "alice@example.org", password=PASSWORD)
    ready, _ = readyz(port)
    assert ready.status == 200, ready.body
    assert auth_plain(server.submission_port, "alice@example.org", PASSWORD)[0] == 235

    cluster.stop()
    ready, took = readyz(port)
    assert ready.status == 503, ready.body
    # Answered at once with the reason, not after the check's timeout.
    assert took < STORE_TIMEOUT
    report = json.loads(ready.body)
    assert report["ready"] is False
    failing = {name: check for name, check in report["checks"].items() if not check["ok"]}
    assert set(failing) == {"user_store"}, report
    assert failing["user_store"]["detail"].startswith(
        "StoreError: no connection to PostgreSQL, reconnecting"
    ), failing
    assert request(port, "/healthz").status == 200  # the reactor still turns
    code, took = auth_plain(server.submission_port, "alice@example.org", PASSWORD)
    assert code == 454  # 4.7.0 try again later: not a 535, not a hang
    assert took < AUTH_WITHIN

    cluster.start()  # the same data directory and port: the pool reconnects by itself
    wait_for(lambda: readyz(port)[0].status == 200, 30, "/readyz to be 200 again")
    assert auth_plain(server.submission_port, "alice@example.org", PASSWORD)[0] == 235
    assert PASSWORD not in server.output()
    assert server.stop() == -15


def test_readyz_reports_the_shared_queue_database(
    make_server: Callable[..., Server], own_pg_cluster: PgCluster
) -> None:
    cluster = own_pg_cluster  # this test's own: stopping it disturbs no other test
    server, port = start(make_server, SMTP_QUEUE_URL=cluster.create_database())
    ready, _ = readyz(port)
    assert ready.status == 200, ready.body
    assert json.loads(ready.body)["checks"]["queue_database"]["ok"] is True
    cluster.stop()
    ready, took = readyz(port)
    assert ready.status == 503, ready.body
    assert took < STORE_TIMEOUT
    report = json.loads(ready.body)
    failing = {name for name, check in report["checks"].items() if not check["ok"]}
    assert failing == {"queue_database"}, report
    assert "no connection to PostgreSQL" in report["checks"]["queue_database"]["detail"]
    cluster.start()
    wait_for(lambda: readyz(port)[0].status == 200, 30, "/readyz to be 200 again")
    assert server.stop() == -15
