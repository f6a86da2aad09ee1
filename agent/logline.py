"""Log lines that peer-supplied text cannot break or forge.

An AE title, a username, a certificate subject or a TLS alert text reaches the log through many
messages; rather than trust each call site, the formatter of both processes escapes what could end
a line or drive a terminal (C0 and C1 controls, DEL, Unicode line and paragraph separators) as
``\\xNN`` or ``\\uNNNN``. A traceback stays readable on several lines, each indented, so that none
of its lines can pass for a log line of its own.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import select
import socket
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

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


# Log lines a standard error that takes nothing may hold back, in characters (about 20,000 lines);
# beyond them lines are dropped and counted, and the count is told once it takes lines again.
BACKLOG_LIMIT = 4 * 1024 * 1024
CLOSE_WAIT_SECONDS = 1.0  # at the exit, for lines held back: a stalled standard error must not hold it
WRITER_PIECE = 64 * 1024  # bytes of held-back lines the writer thread writes at once


class NeverBlockingHandler(logging.Handler):
    """Writes each record to a stream without ever making the thread that logs wait for it.

    Standard error can stop taking lines: a terminal stopped with Ctrl-S (XOFF), a pipe into a pager
    nobody scrolls, an ssh session whose network went away, a stalled journald. A plain
    StreamHandler then blocked every thread that logged, the card loop included: measured, a card
    pulled after Ctrl-S at the agent's terminal left its open association relaying for as long as
    the terminal stayed stopped (45 s, until Ctrl-Q), and new associations hung unanswered.

    A line is written at once when the stream takes it, through a descriptor of our own that does
    not block (the terminal or pipe opened again with O_NONBLOCK, or ``send`` with MSG_DONTWAIT on
    the journal's socket; a regular file is written as it is): so the log of an agent that runs
    well is as immediate as before. What the stream does not take waits, in order, for a writer
    thread; beyond :data:`BACKLOG_LIMIT` new lines are dropped and counted, and a warning says how
    many once the stream takes lines again.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.encoding = getattr(stream, "encoding", None) or "utf-8"
        self._write, self._fd = _non_blocking_writer(stream)
        self._backlog: deque[bytes] = deque()
        self._held = 0  # bytes in the backlog, and in the writer's hands
        self._writing = False  # the writer thread is writing bytes taken from the backlog
        self._dropped = 0  # lines dropped since the backlog was last written out
        self._stalled_since = 0.0  # when the stream last refused bytes (time.monotonic())
        self._changed = threading.Condition(threading.Lock())
        self._closing = False
        self._writer: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode(self.encoding, "backslashreplace")
        except Exception:  # noqa: BLE001 - logging's own contract: a record that cannot be formatted is reported
            self.handleError(record)
            return
        with self._changed:
            if not self._backlog and not self._writing:
                line = line[self._write_what_it_takes(line):]
                if not line:
                    return
            if self._held + len(line) > BACKLOG_LIMIT:
                self._dropped += 1
                return
            self._backlog.append(line)
            self._held += len(line)
            self._start_writer()
            self._changed.notify()

    def _write_what_it_takes(self, data: bytes) -> int:
        """Bytes of ``data`` the stream took without waiting; 0 also when it cannot take any more."""
        try:
            written = self._write(data)
        except BlockingIOError:
            written = 0
        except OSError:  # broken or closed: the lines have nowhere to go
            return len(data)
        if written < len(data) and not self._stalled_since:
            self._stalled_since = time.monotonic()
        return written

    def _start_writer(self) -> None:
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_backlog, name="log writer", daemon=True)
            self._writer.start()

    def _write_backlog(self) -> None:
        """The writer thread: the backlog's lines, oldest first, in pieces of at most WRITER_PIECE
        bytes, each written without the lock (so that :meth:`emit` never waits for a write)."""
        while True:
            with self._changed:
                while not self._backlog and not self._closing:
                    self._changed.wait()
                if not self._backlog:
                    return
                piece = [self._backlog.popleft()]
                size = len(piece[0])
                while self._backlog and size + len(self._backlog[0]) <= WRITER_PIECE:
                    size += len(self._backlog[0])
                    piece.append(self._backlog.popleft())
                self._writing = True
            data = b"".join(piece)
            self._wait_until_writable()
            taken = self._write_what_it_takes(data)
            with self._changed:
                self._writing = False
                self._held -= taken
                if taken < len(data):
                    self._backlog.appendleft(data[taken:])
                elif not self._backlog:
                    self._tell_dropped()
                self._changed.notify_all()

    def _wait_until_writable(self) -> None:
        """Wait until the stream may take bytes (a second at most: then it is tried again)."""
        if self._fd is None:
            return
        with _polling(self._fd) as poller:
            poller.poll(1000)

    def _tell_dropped(self) -> None:
        """Once the backlog is out: how many lines were dropped and for how long nothing was taken."""
        stalled, self._stalled_since = time.monotonic() - self._stalled_since, 0.0
        if not self._dropped:
            return
        dropped, self._dropped = self._dropped, 0
        notice = logging.LogRecord(
            "agent.log", logging.WARNING, __file__, 0,
            "%d log line(s) were dropped: standard error took nothing for %.0f s (a terminal stopped with Ctrl-S, "
            "which Ctrl-Q lets go on; a pipe or pager nobody reads; a stalled journal). The agent worked on meanwhile",
            (dropped, stalled), None)
        line = (self.format(notice) + "\n").encode(self.encoding, "backslashreplace")
        self._backlog.append(line)
        self._held += len(line)

    def flush(self) -> None:
        """Wait for the lines held back, at most :data:`CLOSE_WAIT_SECONDS`."""
        deadline = time.monotonic() + CLOSE_WAIT_SECONDS
        with self._changed:
            while (self._backlog or self._writing) and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)

    def close(self) -> None:
        """The writer thread ends once what is held back is written (logging.shutdown has waited for
        it with :meth:`flush` already, within :data:`CLOSE_WAIT_SECONDS`)."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        super().close()


class _polling:
    """A poll object watching ``fd`` for room to write, for a ``with`` block."""

    def __init__(self, fd: int) -> None:
        self.poller = select.poll()
        self.fd = fd

    def __enter__(self) -> select.poll:
        self.poller.register(self.fd, select.POLLOUT)
        return self.poller

    def __exit__(self, *_: object) -> None:
        self.poller.unregister(self.fd)


def _non_blocking_writer(stream: TextIO) -> tuple[Callable[[bytes], int], int | None]:
    """A function writing bytes to ``stream``'s descriptor without waiting (it returns how many were
    taken, or raises BlockingIOError), and the descriptor to poll; for a stream with no descriptor
    (an embedder's, pytest's), its own write, which is not expected to wait."""
    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
    except (OSError, ValueError, AttributeError):
        def write_text(data: bytes) -> int:
            stream.write(data.decode("utf-8", "backslashreplace"))
            stream.flush()
            return len(data)
        return write_text, None
    if stat.S_ISREG(mode):  # a file takes what is written (O_APPEND kept: the descriptor is stderr's own)
        return functools.partial(os.write, fd), fd
    if stat.S_ISSOCK(mode):  # the journal's stream: a socket cannot be opened again, but send can not wait
        connection = socket.socket(fileno=os.dup(fd))
        return lambda data: connection.send(data, socket.MSG_DONTWAIT), connection.fileno()
    try:  # a terminal, a pipe: a description of our own, non-blocking; standard error's own stays as it was
        own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return functools.partial(_write_from_the_writer_only, fd), fd
    return functools.partial(os.write, own), own


def _write_from_the_writer_only(fd: int, data: bytes) -> int:
    """A stream that cannot be had without blocking: every line goes to the writer thread, which
    alone waits for it (the poll first says when it has room)."""
    if threading.current_thread().name != "log writer":
        raise BlockingIOError(errno.EAGAIN, "written by the log writer")
    return os.write(fd, data)


def configure(prefix: str, level: int | str = logging.INFO) -> None:
    """Log to standard error, one line per record: ``<N>PREFIX: LEVEL: message`` when standard
    error is the journal, ``TIME PREFIX: LEVEL: message`` otherwise (docs/deployment.md). Logging
    never waits for standard error (:class:`NeverBlockingHandler`)."""
    handler = NeverBlockingHandler(sys.stderr)
    line = f"{prefix}: %(levelname)s: %(message)s"
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter(line))
    else:
        handler.setFormatter(TimestampFormatter("%(asctime)s " + line))
    logging.basicConfig(level=level, handlers=[handler])


def error_line(text: str) -> str:
    """A command's final error message for standard error: ``<3>`` first when that is the journal."""
    return ("<3>" if stderr_is_journal() else "") + printable(text)
