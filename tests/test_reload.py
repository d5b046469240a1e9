"""Configuration reload on SIGHUP: unit tests of the reloader, and a real twistd reloaded while
a session stays open."""

from __future__ import annotations

import signal
import smtplib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from twisted.logger import capturedLogs

from mailsrv.config import Config, ConfigError, load
from mailsrv.reload import RELOADABLE, ConfigReloader
from tests.test_process import READY_TIMEOUT, Server, free_port, wait_for

BASE = 'local_domains = ["example.org"]\nmailboxes = ["alice@example.org"]\n'
WIDER = (
    'local_domains = ["example.org", "example.net"]\n'
    'mailboxes = ["alice@example.org", "bob@example.net"]\n'
)


@dataclass
class Applied:
    """A reload step that notes what it installed (and can refuse, like a bad CA file)."""

    configs: list[Config]
    changes: list[frozenset[str]] = field(default_factory=list)
    refuse: str = ""

    def __call__(self, config: Config, changed: frozenset[str]) -> Callable[[], None]:
        if self.refuse:
            raise ConfigError(self.refuse)

        def install() -> None:
            self.configs.append(config)
            self.changes.append(changed)

        return install


def reloader(tmp_path: Path, text: str, *more: Applied) -> tuple[ConfigReloader, Path, Applied]:
    path = tmp_path / "mailsrv.toml"
    path.write_text(text)
    applied = Applied([])
    current = load(str(path), {})
    return ConfigReloader(current, [applied, *more], str(path), {}), path, applied


def test_reloadable_changes_are_applied_and_the_rest_named(tmp_path: Path) -> None:
    reload, path, applied = reloader(tmp_path, BASE)
    path.write_text(WIDER + "port = 2626\nmax_recipients = 7\n")
    with capturedLogs() as events:
        outcome = reload()
    assert outcome is not None
    assert outcome.applied == ("local_domains", "mailboxes", "max_recipients")
    assert outcome.need_restart == ("port",)
    (config,) = applied.configs
    assert config.local_domains == ("example.org", "example.net")
    assert config.max_recipients == 7
    assert config.port == 2525, "a listener port keeps its running value"
    (line,) = [e["line"] for e in events if "line" in e]
    assert line == (
        "configuration reloaded: applied local_domains, mailboxes, max_recipients;"
        " needs a restart (running values kept): port"
    )


def test_the_steps_are_told_which_settings_changed(tmp_path: Path) -> None:
    reload, path, applied = reloader(tmp_path, BASE)
    path.write_text(BASE + 'relay_host = "smarthost.example:2525"\nlog_level = "debug"\n')
    assert reload() is not None
    assert applied.changes == [frozenset({"relay_host", "log_level"})]
    assert applied.configs[0].relay_host == "smarthost.example:2525"


def test_a_step_that_cannot_prepare_refuses_the_whole_reload(tmp_path: Path) -> None:
    refusing = Applied([], refuse="relay_ca_file: /nowhere.pem: No such file or directory")
    reload, path, applied = reloader(tmp_path, BASE, refusing)
    path.write_text(WIDER)
    with capturedLogs() as events:
        assert reload() is None
    assert applied.configs == [], "no step installs anything when one cannot prepare"
    (event,) = [e for e in events if e.get("log_level") is not None]
    assert event["error"] == "relay_ca_file: /nowhere.pem: No such file or directory"
    assert reload.current.local_domains == ("example.org",)
    refusing.refuse = ""
    assert reload() is not None
    assert [c.local_domains for c in applied.configs] == [("example.org", "example.net")]


def test_nothing_changed_is_said(tmp_path: Path) -> None:
    reload, _path, applied = reloader(tmp_path, BASE)
    outcome = reload()
    assert outcome is not None and outcome.line() == "configuration reloaded: nothing changed"
    assert applied.configs == []


def test_a_broken_configuration_is_refused_and_the_old_one_kept(tmp_path: Path) -> None:
    reload, path, applied = reloader(tmp_path, BASE)
    for broken in ("max_recipients = -1\n", "nonsense = 1\n", "local_domains = [\n"):
        path.write_text(BASE + broken)
        with capturedLogs() as events:
            assert reload() is None
        assert applied.configs == []
        (event,) = [e for e in events if e.get("log_level") is not None]
        assert "configuration reload refused" in event["log_format"]
        assert "\n" not in event["error"]
    path.write_text(WIDER)
    assert reload() is not None and len(applied.configs) == 1


def test_only_settings_that_exist_are_reloadable() -> None:
    assert RELOADABLE <= {field for field in Config.__dataclass_fields__}


class FileConfiguredServer(Server):
    """A twistd whose domains and mailboxes come from its config file only."""

    def env(self) -> dict[str, str]:
        env = super().env()
        for name in ("SMTP_LOCAL_DOMAINS", "SMTP_MAILBOXES"):
            env.pop(name, None)
        return env


def rcpt(client: smtplib.SMTP, address: str) -> int:
    code, _ = client.rcpt(address)
    return code


def test_sighup_adds_a_domain_for_new_sessions_while_an_open_one_keeps_its_view(
    tmp_path: Path,
) -> None:
    config = tmp_path / "mailsrv.toml"
    config.write_text(BASE)
    port = free_port()
    server = FileConfiguredServer(
        workdir=tmp_path,
        data_dir=tmp_path / "data",
        port=port,
        submission_port=free_port(port),
        # Loopback untrusted: a domain not local here is refused, not relayed.
        extra_env={"SMTP_CONFIG": str(config), "SMTP_TRUSTED_NETWORKS": "192.0.2.0/24"},
    )
    server.start()
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as before:
            before.ehlo("client.example")
            before.mail("sender@client.example")
            assert rcpt(before, "bob@example.net") >= 500
            config.write_text(WIDER + "io_threads = 4\n")
            server.signal(signal.SIGHUP)
            wait_for(
                lambda: "configuration reloaded: applied" in server.log(), READY_TIMEOUT, "reload"
            )
            assert "needs a restart (running values kept): io_threads" in server.log()
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as after:
                after.ehlo("client.example")
                after.mail("sender@client.example")
                assert rcpt(after, "bob@example.net") == 250
            assert rcpt(before, "bob@example.net") >= 500, "the open session keeps its view"
            assert rcpt(before, "alice@example.org") == 250
        config.write_text("local_domains = [\n")  # broken: refused, the server keeps serving
        server.signal(signal.SIGHUP)
        wait_for(lambda: "configuration reload refused" in server.log(), READY_TIMEOUT, "refusal")
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as later:
            later.ehlo("client.example")
            later.mail("sender@client.example")
            assert rcpt(later, "bob@example.net") == 250, "the last good configuration stays"
    finally:
        assert server.stop() == -signal.SIGTERM, server.output()
