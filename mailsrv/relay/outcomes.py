"""Who hears of each relay attempt's outcome before the queue records it: the webhook outbox.

The queue record and the outbox are separate files, which cannot change in one atomic step.
So the scheduler tells an :class:`IOutcomeListener` first and waits until the listener made its
part durable; only then does it store the queue record.  A crash in between makes the attempt
happen again after the restart, and the listener is told again (the outbox gives that outcome
the same event id, derived from the queue id, recipient and attempt number: at least once, with
a stable id).  The other order could lose the event.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from mailsrv.relay.records import QueueRecord, RecipientStatus


class IOutcomeListener(Interface):
    """Told of every recipient's attempt outcome before the queue stores it."""

    listening = Attribute("False while the listener wants no outcome: it is not told then.")

    def outcomes(record: QueueRecord, recipients: Sequence[RecipientStatus]) -> Deferred[None]:
        """``record`` as it is about to be stored, and the recipients of it whose attempt just
        ended (sent, bounced, deferred, or held while in flight).

        Fires once whatever the listener keeps of them is durable.  Never fails (a listener
        that cannot store logs it): the queue must record the attempt either way, or the
        message could be sent twice.
        """
