"""Durable stores of human-readable JSON records, one file each, with optional body files.

The relay queue (:mod:`mailsrv.relay.queue_store`) and the webhook outbox
(:mod:`mailsrv.webhook.outbox_store`) are both one of these:

* :mod:`~mailsrv.jsonstore.files`: atomic writes (temporary file, rename), hard links;
* :mod:`~mailsrv.jsonstore.fields`: strict validation of a record's JSON object;
* :mod:`~mailsrv.jsonstore.directory`: :class:`~mailsrv.jsonstore.directory.RecordDirectory`,
  the directory of records: staging in the committer's batch, group-committed changes from the
  reactor, recovery at start, broken records moved aside.
"""
