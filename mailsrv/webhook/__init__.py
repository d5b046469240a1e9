"""Webhooks: a signed JSON event for every accepted message and every relay outcome.

The building blocks, each in its own module:

* :mod:`~mailsrv.webhook.endpoints`: the endpoint model and its validation (environment and
  ``[[webhooks]]`` tables);
* :mod:`~mailsrv.webhook.signing`: Standard Webhooks signatures and ``whsec_`` secrets;
* :mod:`~mailsrv.webhook.payload`: the event payloads (schema in ``schema/event-v1.json``);
* :mod:`~mailsrv.webhook.sender`: one HTTP POST attempt and the classification of its outcome;
* :mod:`~mailsrv.webhook.retry`: the retry schedule;
* :mod:`~mailsrv.webhook.trust`: the TLS trust roots the sender verifies receivers against;

and the outbox they make up:

* :mod:`~mailsrv.webhook.entries` and :mod:`~mailsrv.webhook.outbox_store`: one durable JSON
  entry per event and endpoint under ``<data_dir>/outbox/``;
* :mod:`~mailsrv.webhook.sink`: message events, written in the committer's batch;
* :mod:`~mailsrv.webhook.relay_events`: relay outcome events, written before the queue records
  the outcome;
* :mod:`~mailsrv.webhook.dispatcher`: sends pending entries, one lane per endpoint, with
  retries, dead letters and 410 (:mod:`~mailsrv.webhook.endpoint_state`);
* :mod:`~mailsrv.webhook.build`: the request body of an entry;
* :mod:`~mailsrv.webhook.actions` and :mod:`~mailsrv.webhook.control`: ``mailsrv webhooks``
  on the files or through the server's control socket;
* :mod:`~mailsrv.webhook.service`: their composition.
"""
