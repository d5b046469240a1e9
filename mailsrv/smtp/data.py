"""The DATA body decoder: finds the one true end of data, unstuffs dots, refuses smuggling.

Only ``CRLF . CRLF`` ends a message (RFC 5321 section 4.1.1.4).  Every bare CR or bare LF, and
every NUL, is detected (and by default refused with 554 5.6.0), so none of the smuggling variants
(``\\n.\\n``, ``\\r.\\r``, ``\\r\\n.\\n`` ...) can end the message or reach storage verbatim.
Lines of any length stay in DATA mode, and memory is bounded: the decoder keeps at most one
partial line of ``_MAX_CARRY`` bytes between calls.

The decoder hands out the message content with LF line endings (the Maildir convention); the
content is exact, since only CRLF pairs remain after the checks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import Enum

_END = b"\r\n.\r\n"
_MAX_CARRY = 4096
_ANY_LINE_ENDING = re.compile(rb"\r\n|\r|\n")


class BodyProblem(Enum):
    """Why a body is refused (the session maps each to a reply)."""

    BARE_LINE_ENDING = "bare CR or LF"
    NUL = "NUL byte"
    TOO_BIG = "too big"


class BodyDecoder:
    """Feed raw DATA bytes with :meth:`feed`; content goes to ``sink`` as it is decoded.

    ``feed`` returns ``None`` while the message continues, or the bytes that followed the end
    of data (the next pipelined commands) once it has ended.  After the end, ``problem`` tells
    whether the body was refused; the sink stops receiving content as soon as a problem is found.
    """

    def __init__(
        self, sink: Callable[[bytes], None], max_size: int, normalize_line_endings: bool = False
    ) -> None:
        self._sink = sink
        self._max_size = max_size
        self._normalize = normalize_line_endings
        # The carry always starts at a line start, preceded by the CRLF that ended the previous
        # line (virtual for the first line), unless _mid_line says a long line was cut.
        self._carry = b"\r\n"
        self._first = True
        self._mid_line = False
        self.size = 0
        self.problem: BodyProblem | None = None

    def feed(self, data: bytes) -> bytes | None:
        """Decode one chunk; see the class docstring for the return value."""
        buf = self._carry + data
        if self._mid_line:
            cut = buf.find(b"\r\n")
            if cut < 0:
                self._emit(buf[:-1], line_start=False)
                self._carry = buf[-1:]
                return None
            self._emit(buf[:cut], line_start=False)
            buf = buf[cut:]
            self._mid_line = False
        end = buf.find(_END)
        if end >= 0:
            self._emit(buf[: end + 2], line_start=True)
            self._carry = b""
            return buf[end + 5 :]
        last = buf.rfind(b"\r\n")
        if len(buf) - last > _MAX_CARRY:
            # A long line: emit all but its last byte (which may be the CR of a CRLF).
            self._emit(buf[:-1], line_start=True)
            self._carry = buf[-1:]
            self._mid_line = True
        else:
            self._emit(buf[:last], line_start=True)
            self._carry = buf[last:]
        return None

    def _emit(self, segment: bytes, line_start: bool) -> None:
        """Check and pass on a segment; ``line_start`` segments begin with the previous CRLF."""
        if line_start:
            segment = segment.replace(b"\r\n.", b"\r\n")
            if self._first and segment:
                segment = segment[2:]  # the virtual CRLF before the first line
                self._first = False
        if not segment or self.problem is not None:
            return
        crlf = segment.count(b"\r\n")
        if segment.count(b"\r") != crlf or segment.count(b"\n") != crlf:
            if not self._normalize:
                self.problem = BodyProblem.BARE_LINE_ENDING
                return
            segment = _ANY_LINE_ENDING.sub(b"\r\n", segment)
        if b"\x00" in segment:
            if not self._normalize:
                self.problem = BodyProblem.NUL
                return
            segment = segment.replace(b"\x00", b"")
        self.size += len(segment)
        if self.size > self._max_size:
            self.problem = BodyProblem.TOO_BIG
            return
        self._sink(segment.replace(b"\r\n", b"\n"))
