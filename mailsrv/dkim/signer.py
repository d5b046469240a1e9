"""DKIM signing as a commit step: each relayed message is signed once, before its 250.

:class:`DkimSigner` is one of the committer's preparers
(:class:`~mailsrv.delivery.sinks.ICommitPreparer`).  A message is signed when it has a remote
recipient and was sent by an authenticated user, from a trusted network, or by mailsrv itself
(a DSN: its ``From:`` is ``MAILER-DAEMON@<hostname>``, so it is signed when the host name's
domain, or a parent of it, has a key, as Postfix does when bounces go through its signing
milter).  Mail from anyone else (the MX: local recipients only, and alias forwarding of it)
is never signed.  The signatures become the message's ``relay_headers``: the queue record
keeps them, every delivery attempt sends them as they are, and local copies never see them.

The work happens off the reactor in two steps: the ``From:`` domain is read from the start of
the message in an I/O thread, then, if a key is found (:func:`~mailsrv.dkim.signing.
choose_keys`), the signing runs in a worker process (:class:`~mailsrv.processes.
ProcessPoolService`), because dkimpy's RSA is pure Python (about 7 ms of CPU for a 2048-bit
signature on the development machine, against 0.2 ms for Ed25519) and would otherwise hold the
GIL the reactor needs.  The worker reads the spooled message itself; only its last part (at
most the spool's 256 KiB chunk) and the keys cross the pipe.  Signing adds no sync: the
signatures are written with the queue record in the committer's batch.

A message that cannot be signed (dkimpy cannot parse its header, a worker died) is sent
unsigned with a warning rather than refused: the client could not do better by retrying, and a
receiver treats a message without a valid signature as unsigned anyway.

The keys are read at start (:func:`mailsrv.preflight.check`: a broken key file stops the start
with one line) and again on SIGHUP (:meth:`DkimSigner.reload`, in a thread; a broken directory
then keeps the keys in use, with the error logged) or when ``mailsrv dkim`` asks over the
control socket (``dkim.reload``), so new and activated keys sign without a restart.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from mailsrv.delivery.envelope import AcceptedMessage
from mailsrv.delivery.sinks import ICommitPreparer, PendingBody
from mailsrv.dkim.keys import KeyDirectory, KeyRing
from mailsrv.dkim.names import DkimError
from mailsrv.dkim.signing import choose_keys, from_domain_of_spooled, sign_spooled
from mailsrv.relay.bounces import DSN_LISTENER
from mailsrv.threads import RunInThread

_log = Logger(namespace="mailsrv.dkim")

RELOAD_ACTION = "dkim.reload"
"""The control-socket action that makes the running server read its keys again."""


def signs_for(message: AcceptedMessage) -> bool:
    """Whether ``message`` is one we sign (when a key is found): it is relayed, and it comes
    from an account, a trusted network or mailsrv itself."""
    client = message.client
    if not message.remote_recipients:
        return False
    return client.login is not None or client.trusted or client.listener == DSN_LISTENER


@implementer(ICommitPreparer)
class DkimSigner(Service):
    """Signs relayed messages with the keys of ``directory`` (see the module docstring).

    ``ring`` is the keys read at start; ``run_in_thread`` runs the blocking reads,
    ``run_elsewhere`` the signing (a worker process pool; a thread pool in tests).
    """

    name = "dkim"

    def __init__(
        self,
        directory: KeyDirectory,
        ring: KeyRing,
        run_in_thread: RunInThread,
        run_elsewhere: RunInThread,
    ) -> None:
        self.directory = directory
        self.ring = ring
        self._run = run_in_thread
        self._elsewhere = run_elsewhere
        self.signed = 0
        self.unsigned = 0
        self.setName("dkim")

    def startService(self) -> None:
        super().startService()
        self._announce(self.ring)
        if self.ring:  # start the workers now, not with the first message's 250
            self._elsewhere(_warm_up).addErrback(
                lambda failure: _log.failure("DKIM signing workers did not start", failure)
            )

    # -- ICommitPreparer ------------------------------------------------------------------------

    def prepare(
        self, message: AcceptedMessage, body: PendingBody
    ) -> Deferred[AcceptedMessage] | None:
        if not self.ring or not signs_for(message):
            return None
        return Deferred.fromCoroutine(self._sign(message, body, self.ring))

    async def _sign(
        self, message: AcceptedMessage, body: PendingBody, ring: KeyRing
    ) -> AcceptedMessage:
        path = str(body.path)
        header_from = None
        try:
            header_from = await self._run(from_domain_of_spooled, path, body.rest)
            keys = choose_keys(ring, header_from, message.sender, message.client.login)
            if not keys:
                self.unsigned += 1
                _log.debug(
                    "{queue_id} not DKIM-signed: no key for From {header_from} or MAIL FROM "
                    "<{sender}>",
                    queue_id=message.queue_id,
                    header_from=header_from,
                    sender=message.sender,
                )
                return message
            headers: bytes = await self._elsewhere(sign_spooled, path, body.rest, keys)
        except Exception as e:
            self.unsigned += 1
            _log.warn(
                "{queue_id} goes out without a DKIM signature: signing failed ({error})",
                queue_id=message.queue_id,
                header_from=header_from,
                error=f"{type(e).__name__}: {e}",
            )
            return message
        self.signed += 1
        _log.debug(
            "{queue_id} DKIM-signed by {signers}",
            queue_id=message.queue_id,
            signers=[f"{k.domain} {k.selector} {k.algorithm}" for k in keys],
        )
        return replace(message, relay_headers=headers)

    # -- keys -----------------------------------------------------------------------------------

    def install(self, ring: KeyRing) -> None:
        """Sign with ``ring`` from now on (messages being signed finish with the old one)."""
        self.ring = ring
        self._announce(ring)

    def reload(self) -> Deferred[KeyRing | None]:
        """Read the key directory again (in a thread) and install it; a directory that cannot
        be read keeps the keys in use, with the error logged.  The SIGHUP hook."""
        return Deferred.fromCoroutine(self._reload())

    async def _reload(self) -> KeyRing | None:
        try:
            ring: KeyRing = await self._run(self.directory.load)
        except DkimError as e:
            _log.error("DKIM keys not reloaded, the keys in use stay: {error}", error=str(e))
            return None
        self.install(ring)
        return ring

    @property
    def control(self) -> dict[str, Any]:
        """The control-socket handlers (``mailsrv dkim`` after it changed the keys)."""
        return {RELOAD_ACTION: self._control_reload}

    async def _control_reload(self, raw: object) -> dict[str, Any]:
        try:
            ring: KeyRing = await self._run(self.directory.load)
        except DkimError as e:
            return {"ok": False, "error": f"the server kept its keys: {e}"}
        self.install(ring)
        return {"ok": True, "outcome": ring.summary()}

    def _announce(self, ring: KeyRing) -> None:
        _log.info("{summary}", summary=ring.summary(), active_keys=ring.active_count)
        for warning in ring.warnings:
            _log.warn("{warning}", warning=warning)


def _warm_up() -> None:
    """In a worker: import what signing needs."""
    import dkim  # noqa: F401
