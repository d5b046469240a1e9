"""Configuration reload on SIGHUP: apply what can change safely, name what needs a restart.

The configuration is read again from the same sources as at start (the file, the environment,
the twistd flags) and validated the same way; a broken one is refused with its one line and
the running configuration stays.  Settings in :data:`RELOADABLE` take effect without a restart:
new SMTP sessions use the new limits, domains, mailboxes and trusted networks (a session keeps
the configuration, the recipient policy and the trusted networks it started with), the relay's
next attempts use its new settings (a transaction in flight finishes on the connection it has),
the webhook dispatcher its new endpoints, and the log its new level.  Any other changed
setting is named in the log line as needing a restart and keeps its running value.  The TLS
certificate and the log file are reloaded by their own SIGHUP hooks.

A reload happens in two steps, so that it is all or nothing: every :data:`ReloadStep` first
prepares its part from the new configuration (building what it needs, which may fail with a
:class:`~mailsrv.config.ConfigError`: a CA file that cannot be read, say), and only when every
part is prepared are they installed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from twisted.logger import Logger

from mailsrv.config import Config, ConfigError, load

_log = Logger(namespace="mailsrv")

RELOADABLE = frozenset(
    {
        # who gets mail
        "local_domains",
        "mailboxes",
        "aliases",
        "trusted_networks",
        # per-session limits and timeouts, read by each session from its configuration
        "max_message_size",
        "max_recipients",
        "max_errors",
        "max_line_length",
        "max_mail_line_length",
        "max_auth_line_length",
        "idle_timeout",
        "command_timeout",
        "data_timeout",
        "bare_line_endings",
        "allow_plaintext_auth",
        "auth_on_mx",
        "enable_cram_md5",
        # MX screening, read by each session from its configuration
        "dnsbl_zones",
        "dnsbl_timeout",
        "greylist",
        "greylist_delay",
        "greylist_expiry",
        "greylist_lifetime",
        # limits every session shares (the counts so far are kept)
        "max_connections",
        "max_connections_per_ip",
        "connection_rate_per_ip",
        "message_rate_per_ip",
        "rate_window",
        "stress_threshold",
        "stress_timeout",
        "auth_max_failures_per_ip",
        "auth_max_failures_per_account",
        "auth_failure_window",
        "auth_max_in_flight_per_client",
        # the relay: next hop, TLS, credentials, retry, concurrency, timeouts
        "relay_host",
        "relay_user",
        "relay_password",
        "relay_tls",
        "relay_ca_file",
        "relay_mx_tls",
        "relay_mx_port",
        "dns_servers",
        "relay_dns_timeout",
        "relay_min_backoff",
        "relay_max_backoff",
        "relay_queue_lifetime",
        "relay_delay_warning",
        "relay_recipients_per_transaction",
        "relay_destination_concurrency",
        "relay_concurrency",
        "relay_connect_timeout",
        "relay_greeting_timeout",
        "relay_command_timeout",
        "relay_mail_timeout",
        "relay_rcpt_timeout",
        "relay_data_timeout",
        "relay_data_block_timeout",
        "relay_data_done_timeout",
        "relay_connection_idle",
        "relay_bounce_size_limit",
        # webhook endpoints
        "webhook_url",
        "webhook_secret",
        "webhooks",
        # the log
        "log_level",
    }
)
"""Settings a reload applies; every other one needs a restart."""

ReloadStep = Callable[[Config, frozenset[str]], Callable[[], None] | None]
"""One part of the server's reload: given the new effective configuration and the names of the
settings that changed, prepare the change (raising ConfigError with one line when it cannot be
made) and return what installs it, or None when the part has nothing to change."""


@dataclasses.dataclass(frozen=True)
class ReloadOutcome:
    """What one reload did: the settings applied and those left for a restart."""

    applied: tuple[str, ...]
    need_restart: tuple[str, ...]

    def line(self) -> str:
        """The one log line that says it."""
        if not self.applied and not self.need_restart:
            return "configuration reloaded: nothing changed"
        parts = []
        if self.applied:
            parts.append("applied " + ", ".join(self.applied))
        if self.need_restart:
            parts.append("needs a restart (running values kept): " + ", ".join(self.need_restart))
        return "configuration reloaded: " + "; ".join(parts)


class ConfigReloader:
    """Re-reads the configuration and hands the reloadable part to ``steps``.

    ``current`` is the running configuration; each step gets the new effective one (the
    running configuration with the reloadable changes made), see :data:`ReloadStep`.
    """

    def __init__(
        self,
        current: Config,
        steps: Sequence[ReloadStep],
        config_file: str | None,
        environ: Mapping[str, str],
        flags: Mapping[str, object] | None = None,
    ) -> None:
        self.current = current
        self._steps = tuple(steps)
        self._config_file = config_file
        self._environ = environ
        self._flags = flags

    def __call__(self) -> ReloadOutcome | None:
        """Reload (reactor thread, on SIGHUP): the outcome, or None if the new configuration
        was refused (logged with its one line)."""
        try:
            new = load(self._config_file, self._environ, self._flags)
        except ConfigError as e:
            self._refused(e)
            return None
        changed = [
            field.name
            for field in dataclasses.fields(Config)
            if getattr(new, field.name) != getattr(self.current, field.name)
        ]
        applied = tuple(name for name in changed if name in RELOADABLE)
        need_restart = tuple(name for name in changed if name not in RELOADABLE)
        if applied:
            effective = dataclasses.replace(
                self.current, **{name: getattr(new, name) for name in applied}
            )
            names = frozenset(applied)
            try:
                installs = [step(effective, names) for step in self._steps]
            except ConfigError as e:
                self._refused(e)
                return None
            for install in installs:
                if install is not None:
                    install()
            self.current = effective
        outcome = ReloadOutcome(applied, need_restart)
        _log.info(
            "{line}", line=outcome.line(), applied=list(applied), need_restart=list(need_restart)
        )
        return outcome

    @staticmethod
    def _refused(error: ConfigError) -> None:
        _log.error(
            "configuration reload refused, the running configuration stays: {error}",
            error=str(error),
        )
