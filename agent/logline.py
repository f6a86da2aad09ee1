"""Log lines that peer-supplied text cannot break or forge.

An AE title, a username, a certificate subject or a TLS alert text reaches the log through many
messages; rather than trust each call site, the formatter of both processes escapes what could end
a line or drive a terminal (C0 and C1 controls, DEL, Unicode line and paragraph separators) as
``\\xNN`` or ``\\uNNNN``. A traceback stays readable on several lines, each indented, so that none
of its lines can pass for a log line of its own.
"""

from __future__ import annotations

import logging
import re
import sys

# C0 (tab and newline included), DEL, C1 (NEL U+0085 included), LINE and PARAGRAPH SEPARATOR.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
TRACEBACK_INDENT = "    "


def printable(text: str) -> str:
    """``text`` with every character that could break a log line or drive a terminal escaped."""
    return _UNSAFE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


class OneLineFormatter(logging.Formatter):
    """One log record, one line (tracebacks aside, which are indented under it)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))

    def formatException(self, ei) -> str:  # noqa: ANN001 - logging's own signature
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join(TRACEBACK_INDENT + printable(line) for line in text.split("\n"))


def configure(prefix: str, level: int | str = logging.INFO) -> None:
    """Log to standard error as ``PREFIX: LEVEL: message``, one line per record."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(f"{prefix}: %(levelname)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
