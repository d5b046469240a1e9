"""Webhooks: a signed JSON event for every accepted message and every relay outcome.

The building blocks, each in its own module:

* :mod:`~mailsrv.webhook.endpoints`: the endpoint model and its validation (environment and
  ``[[webhooks]]`` tables);
* :mod:`~mailsrv.webhook.signing`: Standard Webhooks signatures and ``whsec_`` secrets;
* :mod:`~mailsrv.webhook.payload`: the event payloads (schema in ``schema/event-v1.json``);
* :mod:`~mailsrv.webhook.sender`: one HTTP POST attempt and the classification of its outcome;
* :mod:`~mailsrv.webhook.retry`: the retry schedule;
* :mod:`~mailsrv.webhook.trust`: the TLS trust roots the sender verifies receivers against.
"""
