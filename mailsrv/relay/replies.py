"""The replies the relay makes up itself, in one table (RFC 3463 enhanced codes).

When no next hop answers (DNS says no, the connection fails, a timeout, a peer that lacks an
extension the message needs), the client still gives each recipient a reply of the same shape
as a real one, so the scheduler, the logs and the DSNs treat both alike: 4xx defers, 5xx bounces.
"""

from __future__ import annotations

from mailsrv.smtp.replies import Reply

# Next hop (DNS)
NULL_MX = Reply(556, "5.1.10", "Recipient domain accepts no mail (null MX)")
NO_SUCH_DOMAIN = Reply(550, "5.1.2", "Recipient domain not found")
BAD_DOMAIN = Reply(550, "5.1.2", "Recipient domain is not a valid domain name")
NO_ADDRESS = Reply(550, "5.4.4", "No address found for the recipient domain's mail exchangers")
DNS_TEMPORARY = Reply(451, "4.4.3", "Temporary DNS failure looking up the next hop")

# Connection
CONNECT_FAILED = Reply(421, "4.4.1", "Cannot connect to the next hop")
CONNECTION_LOST = Reply(421, "4.4.2", "Connection to the next hop lost")
TIMEOUT = Reply(421, "4.4.2", "Timed out waiting for the next hop")
CONNECTION_CLOSED = Reply(421, "4.4.2", "Connection to the next hop already closed")
PROTOCOL_ERROR = Reply(421, "4.5.0", "Next hop broke the SMTP protocol")
GREETING_REFUSED = Reply(421, "4.4.2", "Next hop refused the session")

# TLS and AUTH
TLS_NOT_OFFERED = Reply(421, "4.7.4", "TLS is required, but the next hop does not offer it")
TLS_FAILED = Reply(421, "4.7.5", "TLS with the next hop failed")
AUTH_NEEDS_TLS = Reply(421, "4.7.10", "Not sending credentials to the smarthost without TLS")
AUTH_NOT_OFFERED = Reply(421, "4.7.0", "Smarthost offers neither AUTH PLAIN nor AUTH LOGIN")
AUTH_REFUSED = Reply(421, "4.7.8", "Smarthost refused our credentials")

# The message itself
TOO_BIG_FOR_PEER = Reply(552, "5.3.4", "Message is larger than the next hop accepts")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Next hop does not support SMTPUTF8, which this mail needs")
BAD_RECIPIENT = Reply(553, "5.1.3", "Recipient address cannot be sent safely in SMTP")
BAD_SENDER = Reply(553, "5.1.7", "Sender address cannot be sent safely in SMTP")
BODY_UNREADABLE = Reply(451, "4.3.0", "Local error: cannot read the stored message")
LEASE_LOST = Reply(451, "4.4.0", "Not sent: another node of the cluster may be delivering this")
