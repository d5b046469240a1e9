"""Screening of MX clients before their mail is accepted: DNS blocklists at connect
(:mod:`~mailsrv.screening.dnsbl`) and greylisting at RCPT (:mod:`~mailsrv.screening.greylist`).

Authenticated users and trusted networks are never screened, and neither is the submission
port.
"""
