"""Outbound relay: the building blocks the relay scheduler calls.

* :mod:`.message`: the values going in (an :class:`~.message.OutboundMessage`) and coming out
  (one :class:`~.message.RecipientResult` per recipient);
* :mod:`.retry`: the pure retry policy (exponential backoff with jitter, queue lifetime);
* :mod:`.resolver`: the next hop (smarthost, or MX records with twisted.names);
* :mod:`.destinations`: the MX-rollup destination key and the dead-destination cache;
* :mod:`.client`: the outbound ESMTP client, one reusable connection per next hop;
* :mod:`.dsn`: RFC 3464 delivery status notifications.
"""
