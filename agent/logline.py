"""Log lines that peer-supplied text cannot break or forge.

An AE title, a username, a certificate subject or a TLS alert text reaches the log through many
messages; rather than trust each call site, the formatter of both processes escapes what could end
a line or drive a terminal (C0 and C1 controls, DEL, Unicode line and paragraph separators) as
``\\xNN`` or ``\\uNNNN``. A traceback stays readable on several lines, each indented, so that none
of its lines can pass for a log line of its own.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time

# C0 (tab and newline included), DEL, C1 (NEL U+0085 included), LINE and PARAGRAPH SEPARATOR, and
# the bidirectional controls (Unicode's "Trojan Source" set, CVE-2021-42574), with which a peer's
# text could display a log or `status` line in another order than it was written.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
TRACEBACK_INDENT = "    "


# The end of a text cut already (by :func:`cut`), and how many characters it had after the cut.
_CUT = re.compile(r"\.\.\. \((\d+) more characters(?: not recorded)?\)\Z")


def cut(text: str, limit: int, note: str = "more characters") -> str:
    """``text`` cut after ``limit`` characters and marked with how many followed (``... (N
    more characters)``). A text cut already, in another process or by another limit, is cut again
    with the count of both: a peer's 64 KB UID clipped for a report, then for an audit field, is
    said to have had its 64 K characters, not those of the first cut's text."""
    if len(text) <= limit:
        return text
    cut_already = _CUT.search(text)
    body, more = (text[:cut_already.start()], int(cut_already[1])) if cut_already else (text, 0)
    if len(body) <= limit:
        return f"{body}... ({more} {note})"  # cut already, within the limit but for its mark
    return f"{body[:limit]}... ({len(body) - limit + more} {note})"


def printable(text: str) -> str:
    """``text`` with every character that could break a log line or drive a terminal escaped."""
    return _UNSAFE.sub(_escape, text)


def printable_xml(text: str) -> str:
    """XML ``text`` with the characters :func:`printable` escapes written as character references:
    the same document, and nothing in it drives a terminal (C1 controls and bidirectional ones
    are valid XML, and a peer's text can carry them into an audit message)."""
    return _UNSAFE.sub(lambda match: f"&#x{ord(match.group()):X};", text)


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


# syslog(3) priorities journald reads from a line's `<N>` prefix (SyslogLevelPrefix=, on by default).
_PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (a custom level takes the next more severe one)."""
    return next((priority for level, priority in sorted(_PRIORITIES.items()) if levelno <= level), 2)


def stderr_is_journal() -> bool:
    """True when standard error is the journal's stream: systemd sets JOURNAL_STREAM to its
    ``device:inode``, which a redirected stderr (a file, a pipe of a child's own) no longer matches."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        status = os.fstat(sys.stderr.fileno())
        return (int(device), int(inode)) == (status.st_dev, status.st_ino)
    except (ValueError, OSError, AttributeError):
        return False


class JournalFormatter(OneLineFormatter):
    """Every line of a record (an indented traceback's too) starts with its ``<N>`` priority, so
    that ``journalctl -p warning`` finds it; journald adds the time."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


class TimestampFormatter(OneLineFormatter):
    """Each record starts with its local time, ISO 8601 to the millisecond with the UTC offset."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = time.localtime(record.created)
        return (time.strftime("%Y-%m-%dT%H:%M:%S", moment) + f".{int(record.msecs):03d}"
                + _utc_offset(moment))


def _utc_offset(moment: time.struct_time) -> str:
    offset = time.strftime("%z", moment)  # +0100
    return offset[:3] + ":" + offset[3:]


def configure(prefix: str, level: int | str = logging.INFO) -> None:
    """Log to standard error, one line per record: ``<N>PREFIX: LEVEL: message`` when standard
    error is the journal, ``TIME PREFIX: LEVEL: message`` otherwise (docs/deployment.md)."""
    handler = logging.StreamHandler(sys.stderr)
    line = f"{prefix}: %(levelname)s: %(message)s"
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter(line))
    else:
        handler.setFormatter(TimestampFormatter("%(asctime)s " + line))
    logging.basicConfig(level=level, handlers=[handler])


def error_line(text: str) -> str:
    """A command's final error message for standard error: ``<3>`` first when that is the journal."""
    return ("<3>" if stderr_is_journal() else "") + printable(text)
