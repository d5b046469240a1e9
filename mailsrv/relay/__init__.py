"""Outbound relay: the durable queue, the scheduler, the next-hop client, retry and bounces.

* :mod:`.records` and :mod:`.queue_store`: the durable queue (one JSON record per message);
* :mod:`.scheduler`: when each recipient is tried, over which connection, and what then;
* :mod:`.message`: the values going into the client (an :class:`~.message.OutboundMessage`)
  and coming out (one :class:`~.message.RecipientResult` per recipient);
* :mod:`.retry`: the pure retry policy (exponential backoff with jitter, queue lifetime);
* :mod:`.resolver`: the next hop (smarthost, or MX records with twisted.names);
* :mod:`.destinations`: the MX-rollup destination key and the dead-destination cache;
* :mod:`.client`: the outbound ESMTP client, one reusable connection per next hop;
* :mod:`.dsn`: RFC 3464 delivery status notifications;
* :mod:`.control` and :mod:`.actions`: ``mailsrv queue`` and the control socket.
"""
