"""The twistd plugin: ``twistd mailsrv`` builds the service tree in :mod:`mailsrv.tap`."""

from twisted.application.service import ServiceMaker

mailsrv = ServiceMaker(
    "mailsrv",
    "mailsrv.tap",
    "mailsrv: a durable, hardened ESMTP server (MX, submission, Maildir)",
    "mailsrv",
)
