"""How the outbound client behaves: timeouts, TLS, credentials, limits; built from the Config.

Two sets of options exist in a running server: one for the smarthost (``relay_tls``: verified
STARTTLS by default, AUTH allowed) and one for MX delivery (``relay_mx_tls``: opportunistic
STARTTLS by default, never AUTH).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mailsrv.config import Config
from mailsrv.relay.body import DEFAULT_CHUNK_SIZE

TLS_NONE = "none"  # plaintext, STARTTLS is not even tried
TLS_MAY = "may"  # STARTTLS when offered; plaintext otherwise
TLS_REQUIRE = "require"  # STARTTLS or no delivery
TLS_IMPLICIT = "implicit"  # TLS from the first byte (RFC 8314)


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for each step (RFC 5321 section 4.5.3.2 defaults) and to keep idle."""

    connect: float = 30.0
    greeting: float = 300.0
    command: float = 300.0  # EHLO, HELO, STARTTLS, AUTH, RSET, QUIT
    mail: float = 300.0
    rcpt: float = 300.0
    data: float = 120.0  # the 354 after DATA
    data_block: float = 180.0  # longest stall while the body is being sent
    data_done: float = 600.0  # the reply after the final dot
    idle: float = 5.0  # an unused connection is closed after this


@dataclass(frozen=True)
class ClientOptions:
    """Everything a connection needs besides the peer.

    ``tls`` is one of the ``TLS_*`` modes; ``verify`` checks the certificate against
    ``ca_file`` or the system CAs.  ``user``/``password`` enable AUTH (over TLS only).
    """

    hostname: str
    tls: str = TLS_MAY
    verify: bool = False
    ca_file: str = ""
    user: str = ""
    password: str = field(default="", repr=False)
    timeouts: Timeouts = field(default_factory=Timeouts)
    recipients_per_transaction: int = 50
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def __post_init__(self) -> None:
        if self.tls not in (TLS_NONE, TLS_MAY, TLS_REQUIRE, TLS_IMPLICIT):
            raise ValueError(f"unknown TLS mode {self.tls!r}")
        if self.recipients_per_transaction < 1:
            raise ValueError("recipients_per_transaction must be at least 1")


def timeouts_from(config: Config) -> Timeouts:
    """The relay_*_timeout settings."""
    return Timeouts(
        connect=config.relay_connect_timeout,
        greeting=config.relay_greeting_timeout,
        command=config.relay_command_timeout,
        mail=config.relay_mail_timeout,
        rcpt=config.relay_rcpt_timeout,
        data=config.relay_data_timeout,
        data_block=config.relay_data_block_timeout,
        data_done=config.relay_data_done_timeout,
        idle=config.relay_connection_idle,
    )


_SMARTHOST_TLS = {"starttls": TLS_REQUIRE, "implicit": TLS_IMPLICIT, "none": TLS_NONE}
_MX_TLS = {"may": (TLS_MAY, False), "encrypt": (TLS_REQUIRE, False), "verify": (TLS_REQUIRE, True)}


def smarthost_options(config: Config) -> ClientOptions:
    """Options for ``relay_host``: verified TLS unless ``relay_tls = none``, AUTH if a user."""
    mode = _SMARTHOST_TLS[config.relay_tls]
    return ClientOptions(
        hostname=config.server_name,
        tls=mode,
        verify=mode != TLS_NONE,
        ca_file=config.relay_ca_file,
        user=config.relay_user,
        password=config.relay_password,
        timeouts=timeouts_from(config),
        recipients_per_transaction=config.relay_recipients_per_transaction,
    )


def mx_options(config: Config) -> ClientOptions:
    """Options for direct MX delivery (``relay_mx_tls``); no credentials."""
    mode, verify = _MX_TLS[config.relay_mx_tls]
    return ClientOptions(
        hostname=config.server_name,
        tls=mode,
        verify=verify,
        ca_file=config.relay_ca_file if verify else "",
        timeouts=timeouts_from(config),
        recipients_per_transaction=config.relay_recipients_per_transaction,
    )
