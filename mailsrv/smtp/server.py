"""What all SMTP sessions share: limits, policy, spool, delivery, and the set of live sessions.

One :class:`SMTPServer` serves every listener (MX and submission), so connection caps are
global.  It also drains: :meth:`SMTPServer.drain` asks every session to finish its transaction
and close, and aborts the stragglers when the grace period ends.

**Stress.**  When the live sessions reach ``stress_threshold`` per cent of ``max_connections``,
the server is under stress (as Postfix is when its smtpd processes run out): every session's
idle and command timeouts shrink to ``stress_timeout``, so clients that sit idle or trickle
bytes are shed first and the slots go to clients that talk.  Sessions already open get the
short timeouts at once.  Stress ends when the sessions fall a tenth of the threshold below it
(hysteresis, so a server at the threshold does not switch at every connection).
"""

from __future__ import annotations

import functools
import itertools
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from mailsrv.auth.account_identity import AccountIdentities
from mailsrv.auth.hashqueue import HashQueue
from mailsrv.config import Config
from mailsrv.delivery.committer import GroupCommitter
from mailsrv.delivery.envelope import AcceptedMessage
from mailsrv.delivery.spool import Spool, SpoolFile
from mailsrv.jsonstore.spares import SparePool
from mailsrv.limits import TrustedNetworks
from mailsrv.mailauth.inbound import InboundChecks
from mailsrv.ops.metrics import Metrics
from mailsrv.screening.dnsbl import DnsblChecker
from mailsrv.screening.greylist import Greylist
from mailsrv.shared_limits import ILimits, LocalLimits
from mailsrv.smtp.policy import RecipientPolicy
from mailsrv.threads import RunInThread
from mailsrv.tls import ReloadingServerTLS

if TYPE_CHECKING:
    from mailsrv.smtp.session import SMTPSession

_log = Logger(namespace="mailsrv.security")

_QUEUE_ID_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"


def _base31(number: int, width: int) -> str:
    """``number`` modulo 31**width in ``width`` characters of the queue-id alphabet."""
    digits = []
    for _ in range(width):
        number, digit = divmod(number, len(_QUEUE_ID_ALPHABET))
        digits.append(_QUEUE_ID_ALPHABET[digit])
    return "".join(reversed(digits))


class SMTPServer:
    """Shared state and services for every session; built once by the composition root."""

    def __init__(
        self,
        config: Config,
        clock: IReactorTime,
        run_in_thread: RunInThread,
        committer: GroupCommitter,
        policy: RecipientPolicy | None = None,
        tls: ReloadingServerTLS | None = None,
        portal: Portal | None = None,
        limits: ILimits | None = None,
        relay: bool = False,
        identities: AccountIdentities | None = None,
        metrics: Metrics | None = None,
        dnsbl: DnsblChecker | None = None,
        greylist: Greylist | None = None,
        inbound: InboundChecks | None = None,
        spool_spares: SparePool | None = None,
    ) -> None:
        self.config = config
        self.relay = relay  # a relay queue is among the committer's sinks
        self.clock = clock
        self.run_in_thread = run_in_thread
        self.hostname = config.server_name
        self.policy = policy or RecipientPolicy(config)
        self.tls = tls
        self.committer = committer
        self.portal = portal
        self.spool = Spool(config.spool_dir, run_in_thread, spool_spares)
        self.trusted = TrustedNetworks(config.trusted_networks)
        self.limits: ILimits = limits if limits is not None else LocalLimits(config, clock)
        # AUTH: whose failure budget an attempt uses, and its turn at the hash threads.
        self.identities = identities if identities is not None else AccountIdentities(None)
        self.hash_queue = HashQueue(config.auth_hash_threads, config.auth_hash_queue)
        self.metrics = metrics if metrics is not None else Metrics()
        self.dnsbl = dnsbl  # MX clients are asked about when the configuration names zones
        self.greylist = greylist  # used when the configuration turns greylisting on
        if isinstance(self.limits, LocalLimits):
            self.metrics.before_scrape(self._export_throttled)
        # SPF/DKIM/DMARC/ARC of MX mail from clients neither trusted nor authenticated.
        self.inbound = inbound
        self.sessions: set[SMTPSession] = set()
        self.draining = False
        self.stressed = False
        self._set_stress_thresholds(config)
        self._counter = itertools.count()
        self._id_tag = "".join(secrets.choice(_QUEUE_ID_ALPHABET) for _ in range(4))
        self._drain_waiters: list[Deferred[None]] = []

    def _set_stress_thresholds(self, config: Config) -> None:
        self._stress_on = max(1, (config.max_connections * config.stress_threshold + 99) // 100)
        self._stress_off = self._stress_on - self._stress_on // 10

    def reconfigure(self, config: Config) -> None:
        """A reload: sessions that start from now on use ``config`` (its domains, mailboxes,
        aliases, trusted networks and per-session limits); open sessions keep theirs.  The
        limits all sessions share (connection caps, rates, AUTH failure budgets) take the new
        values at once and keep their counts.  Only settings in
        :data:`mailsrv.reload.RELOADABLE` may differ from the running ones."""
        self.config = config
        self.policy = self.policy.reconfigured(config)
        self.trusted = TrustedNetworks(config.trusted_networks)
        self._set_stress_thresholds(config)
        if isinstance(self.limits, LocalLimits):
            self.limits.reconfigure(config)

    def reload_step(self, config: Config, changed: frozenset[str]) -> Callable[[], None]:
        """A reload's SMTP part (a :data:`mailsrv.reload.ReloadStep`): :meth:`reconfigure`."""
        return functools.partial(self.reconfigure, config)

    # -- identifiers and delivery ---------------------------------------------------------------

    def new_queue_id(self) -> str:
        """A short unique id for one message: time in ms, this process's tag, a counter."""
        return (
            _base31(int(self.clock.seconds() * 1000), 8)
            + self._id_tag
            + _base31(next(self._counter), 3)
        )

    def commit(self, message: AcceptedMessage, spool_file: SpoolFile) -> Deferred[AcceptedMessage]:
        """Make ``message`` durable in every sink (Maildir copies, queue records) before the 250.

        See :class:`~mailsrv.delivery.committer.GroupCommitter`: fails, leaving nothing
        behind, when any part of the message cannot be stored.
        """
        return self.committer.commit(message, spool_file)

    # -- limits ---------------------------------------------------------------------------------

    def security_event(self, event: str, host: str, **fields: Any) -> None:
        """Log one structured security event (refusals, limits, auth).

        The text line shows every field that has a value (``login=... mechanism=...``), not
        only the event name; JSON lines carry them as keys either way.
        """
        self.metrics.security_event(event)
        shown = "".join(f" {key}={{{key}}}" for key, value in fields.items() if value is not None)
        _log.warn(
            "security {event} from {client_ip}" + shown, event=event, client_ip=host, **fields
        )

    def _export_throttled(self) -> None:
        """Set the throttled-clients gauge from the limits in this process (at each scrape)."""
        if isinstance(self.limits, LocalLimits):
            self.metrics.set_throttled(self.limits.census())

    def expire_limits(self) -> None:
        """Forget rate-limit state that left its window (run on a timer)."""
        if isinstance(self.limits, LocalLimits):
            self.limits.expire()

    # -- session registry and drain -------------------------------------------------------------

    def session_started(self, session: SMTPSession) -> None:
        """Register a live session; enter stress when there are enough (module docstring)."""
        self.sessions.add(session)
        if not self.stressed and len(self.sessions) >= self._stress_on:
            self.stressed = True
            _log.warn(
                "under stress: {sessions} sessions of {max_connections};"
                " idle and command timeouts now {timeout} s",
                sessions=len(self.sessions),
                max_connections=self.config.max_connections,
                timeout=self.config.stress_timeout,
            )
            for other in list(self.sessions):
                other.timeouts_changed()

    def session_ended(self, session: SMTPSession) -> None:
        """Forget a session; completes a drain when it was the last."""
        self.sessions.discard(session)
        if self.stressed and len(self.sessions) < self._stress_off:
            self.stressed = False
            _log.info("stress over: {sessions} sessions", sessions=len(self.sessions))
        if not self.sessions and self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def drain(self, grace: float) -> Deferred[None]:
        """Let sessions finish their transactions, then close them; abort after ``grace`` s."""
        self.draining = True
        for session in list(self.sessions):
            session.drain()
        if not self.sessions:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._drain_waiters.append(done)
        timer = self.clock.callLater(grace, self._abort_all)

        def stop_timer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        done.addBoth(stop_timer)
        return done

    def _abort_all(self) -> None:
        for session in list(self.sessions):
            session.shutdown_now()


class SMTPFactory(Factory):
    """Builds sessions for one listener: ``mx``, ``submission`` or ``smtps`` (implicit TLS).

    ``preadmitted``: the connection limits were asked before the session was built (see
    :mod:`mailsrv.smtp.admission`); the session only releases its slot at the end.
    """

    noisy = False

    def __init__(
        self,
        server: SMTPServer,
        listener: str,
        implicit_tls: bool = False,
        preadmitted: bool = False,
    ) -> None:
        self.server = server
        self.listener = listener
        self.implicit_tls = implicit_tls
        self.preadmitted = preadmitted

    def buildProtocol(self, addr: IAddress | None) -> SMTPSession:
        from mailsrv.smtp.session import SMTPSession

        return SMTPSession(
            self.server,
            self.listener,
            implicit_tls=self.implicit_tls,
            preadmitted=self.preadmitted,
        )
