"""Configuration reload on SIGHUP: apply what can change safely, name what needs a restart.

The configuration is read again from the same sources as at start (the file, the environment,
the twistd flags) and validated the same way; a broken one is refused with its one line and
the running configuration stays.  Settings in :data:`RELOADABLE` take effect for sessions
that start after the reload (a session keeps the configuration, the recipient policy and the
trusted networks it started with); any other changed setting is named in the log line as
needing a restart and keeps its running value.  The TLS certificate and the log file are
reloaded by their own SIGHUP hooks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

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
    }
)
"""Settings a reload applies (to new sessions); every other one needs a restart."""


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
    """Re-reads the configuration and hands the reloadable part to ``apply``.

    ``current`` is the running configuration; ``apply`` gets the new effective one (the
    running configuration with the reloadable changes made) and installs it for new sessions.
    """

    def __init__(
        self,
        current: Config,
        apply: Callable[[Config], None],
        config_file: str | None,
        environ: Mapping[str, str],
        flags: Mapping[str, object] | None = None,
    ) -> None:
        self.current = current
        self._apply = apply
        self._config_file = config_file
        self._environ = environ
        self._flags = flags

    def __call__(self) -> ReloadOutcome | None:
        """Reload (reactor thread, on SIGHUP): the outcome, or None if the new configuration
        was refused (logged with its one line)."""
        try:
            new = load(self._config_file, self._environ, self._flags)
        except ConfigError as e:
            _log.error(
                "configuration reload refused, the running configuration stays: {error}",
                error=str(e),
            )
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
            self._apply(effective)
            self.current = effective
        outcome = ReloadOutcome(applied, need_restart)
        _log.info(
            "{line}", line=outcome.line(), applied=list(applied), need_restart=list(need_restart)
        )
        return outcome
