"""Inbound mail authentication: SPF, DKIM, DMARC and ARC of mail arriving on the MX listener.

The parts, in the order a message meets them:

* :mod:`.inbound`: what the SMTP session calls at the start and the end of DATA;
* :mod:`.header`: drops forged ``Authentication-Results`` while the body streams in, and
  renders ours;
* :mod:`.verifier`: runs the checks in its own threads within the time budget;
* :mod:`.checks`: the checks in order, with :mod:`.spf_check` (pyspf), :mod:`.dkim_check`
  (dkimpy, DKIM and ARC) and :mod:`.dmarc_check` (the ``dmarc`` library and the Public Suffix
  List), all asking DNS through :mod:`.lookups` (the server's resolver, from a thread);
* :mod:`.policy`: deliver, mark (quarantine) or refuse;
* :mod:`.verdict`: the result values, carried on to the commit sinks and the webhooks.

Mail from authenticated users and trusted networks is not checked and gets no header.
"""
