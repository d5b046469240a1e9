"""The operator files in etc/: the systemd unit verifies, the alert rules name real metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mailsrv.ops.metrics import Metrics

ETC = Path(__file__).resolve().parent.parent / "etc"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    twistd = Path(sys.executable).parent / "twistd"
    unit = (ETC / "mailsrv.service").read_text().replace("/opt/mailsrv/bin/twistd", str(twistd))
    path = tmp_path / "mailsrv.service"
    path.write_text(unit)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "mailsrv.service" not in result.stdout + result.stderr, result.stderr


def test_the_unit_is_hardened_and_reloads_with_sighup() -> None:
    lines = set((ETC / "mailsrv.service").read_text().splitlines())
    for wanted in (
        "ExecStart=/opt/mailsrv/bin/twistd --nodaemon --pidfile= mailsrv",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=true",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/mailsrv",
        "PrivateTmp=true",
        "StandardOutput=journal",
        "User=mailsrv",
    ):
        assert wanted in lines, wanted


def exported_names() -> set[str]:
    """Every sample name the server's registry can export."""
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(
            family.name + suffix for suffix in ("_total", "_count", "_sum", "_bucket", "_created")
        )
    return names


@pytest.mark.parametrize("name", ["alerts.yml", "scrape.yml"])
def test_the_prometheus_examples_name_only_metrics_that_exist(name: str) -> None:
    text = (ETC / "prometheus" / name).read_text()
    used = set(re.findall(r"\bmailsrv_[a-z_]+", text))
    assert used <= exported_names(), used - exported_names()
    if name == "alerts.yml":
        assert {
            "mailsrv_relay_queue_messages",
            "mailsrv_webhook_dead_letters_total",
            "mailsrv_tls_certificate_expiry_timestamp_seconds",
        } <= used


def test_the_logrotate_snippet_signals_a_reopen() -> None:
    text = (ETC / "mailsrv.logrotate").read_text()
    assert "--signal=HUP" in text and "postrotate" in text


def test_the_readme_lists_every_metric() -> None:
    readme = (ETC.parent / "README.rst").read_text()
    section = readme[readme.index("Metrics and health\n") : readme.index("\nBenchmarks\n")]
    listed = set(re.findall(r"``(mailsrv_[a-z_]+)``", section))
    exported = set()
    for family in Metrics().registry.collect():
        exported.add(family.name + ("_total" if family.type == "counter" else ""))
    assert listed == exported
