"""Every SMTP reply the server sends, in one table (RFC 5321 codes, RFC 3463 enhanced codes).

Tests compare against these constants rather than literal strings, so wording can change in one
place.  ``Reply.format`` renders one reply, multi-line when given several lines of text.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: basic code, enhanced status code (may be empty) and text."""

    code: int
    enhanced: str
    text: str

    def format(self, *extra_lines: str, text: str | None = None) -> bytes:
        """Render the reply; ``extra_lines`` become continuation lines after the first."""
        lines = [self.text if text is None else text, *extra_lines]
        out = []
        for index, line in enumerate(lines):
            sep = " " if index == len(lines) - 1 else "-"
            prefix = f"{self.code}{sep}{self.enhanced} " if self.enhanced else f"{self.code}{sep}"
            out.append(f"{prefix}{line}\r\n")
        return "".join(out).encode("utf-8")

    def with_text(self, text: str) -> Reply:
        """The same codes with other words."""
        return Reply(self.code, self.enhanced, text)

    @property
    def is_error(self) -> bool:
        """True for 4xx and 5xx replies."""
        return self.code >= 400


Response = Reply | bytes | None
"""What a command handler returns: a reply, pre-rendered lines (EHLO, 334), or nothing."""

# 2xx
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
RESET_OK = Reply(250, "2.0.0", "Reset OK")
MESSAGE_ACCEPTED = Reply(250, "2.0.0", "OK: queued as {queue_id}")
BYE = Reply(221, "2.0.0", "Bye")
HELP = Reply(214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY")
CANNOT_VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")

# 4xx
SERVICE_UNAVAILABLE = Reply(421, "4.3.2", "Service shutting down, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_CONNECTIONS_FROM_IP = Reply(
    421, "4.7.0", "Too many connections from your address, try again later"
)
CONNECTION_RATE_EXCEEDED = Reply(421, "4.7.0", "Connection rate limit exceeded, try again later")
MESSAGE_RATE_EXCEEDED = Reply(451, "4.7.1", "Message rate limit exceeded, try again later")
GREYLISTED = Reply(451, "4.7.1", "Greylisted, try again in {seconds} seconds")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
COMMAND_TIMEOUT = Reply(421, "4.4.2", "Command line timeout, closing connection")
DATA_TIMEOUT = Reply(421, "4.4.2", "DATA timeout, closing connection")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
STORAGE_ERROR = Reply(452, "4.3.1", "Insufficient system storage, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
LOOKUP_FAILED = Reply(451, "4.3.0", "Temporary lookup failure, try again later")
AUTH_TEMPORARY_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure, try again later")
AUTH_ACCOUNT_THROTTLED = Reply(
    454, "4.7.0", "Too many failed authentications for this account, try again later"
)
AUTH_IP_THROTTLED = Reply(
    421, "4.7.0", "Too many failed authentications from your address, closing connection"
)
AUTH_BUSY = Reply(454, "4.7.0", "Too many authentications in progress, try again later")

# 5xx: syntax and sequence
UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BAD_CHARACTERS = Reply(500, "5.5.2", "Invalid characters in command")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
HELO_SYNTAX = Reply(501, "5.5.4", "Syntax: EHLO domain-or-address-literal")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]")
NO_ARGUMENTS = Reply(501, "5.5.4", "This command takes no arguments")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
NEED_HELO = Reply(503, "5.5.1", "Send EHLO or HELO first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL before RCPT")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT before DATA")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "TLS already active")
NOT_IN_TRANSACTION = Reply(503, "5.5.1", "Not allowed during a mail transaction")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
AUTH_SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
AUTH_MALFORMED = Reply(501, "5.5.2", "Malformed authentication response")
AUTH_BAD_USER_NAME = Reply(501, "5.5.2", "User name must be UTF-8 of at most 255 octets")
AUTH_ABORTED = Reply(501, "5.0.0", "Authentication aborted")
AUTH_MECHANISM_UNKNOWN = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
ENCRYPTION_REQUIRED = Reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unsupported MAIL or RCPT parameter")

# 5xx: policy and content
NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")
MAILBOX_NAME_REFUSED = Reply(
    550, "5.1.1", "No such user here: the name has characters no mailbox here may use"
)
MAILBOX_DISABLED = Reply(550, "5.2.1", "Mailbox disabled, not accepting messages")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by the authenticated user")
RELAY_NOT_AVAILABLE = Reply(554, "5.7.1", "Delivery to other domains is not enabled on this server")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
DNSBL_LISTED = Reply(554, "5.7.1", "Service unavailable; client [{client_ip}] listed by {zone}")
REFUSED_SESSION = Reply(503, "5.7.1", "Service refused at the greeting: only QUIT is accepted")
RELAY_TRICK = Reply(554, "5.7.1", "Routing in addresses is not accepted")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
BARE_LINE_ENDING = Reply(554, "5.6.0", "Bare CR or LF not accepted in message; use CRLF")
NUL_IN_MESSAGE = Reply(554, "5.6.0", "NUL characters not accepted in message")
DMARC_REJECTED = Reply(550, "5.7.1", "Message refused by the DMARC policy of {domain}")
SPF_REJECTED = Reply(550, "5.7.23", "SPF check failed for {domain}")  # RFC 7372
