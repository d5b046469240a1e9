"""Log output: ``twisted.logger`` events, filtered by level, as text lines or JSON lines.

Modules log structured events with ``Logger()``; this module only decides where they go.  No
event carries a message body or a credential: the SMTP session logs envelope facts only.
"""

from __future__ import annotations

import sys
from typing import IO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}


def make_observer(level: str, fmt: str, stream: IO[str] | None = None) -> ILogObserver:
    """An observer writing ``fmt`` ("text" or "json") lines at ``level`` or above to ``stream``."""
    out = sys.stdout if stream is None else stream
    if fmt == "json":
        base = jsonFileLogObserver(out, recordSeparator="")
    else:
        base = textFileLogObserver(out)
    predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[level])
    return FilteringLogObserver(base, [predicate])
