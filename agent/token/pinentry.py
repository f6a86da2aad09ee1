"""Asking for the PIN with a GnuPG ``pinentry`` program (Assuan protocol).

pinentry-gnome3, -qt, -curses and -tty all speak it: the agent sends the description (which card,
which certificate, what the card says about remaining tries) and ``GETPIN``; the program answers
``D <pin>`` then ``OK``, or ``ERR ...`` when the user cancels. The PIN travels over a pipe only,
and is read from it into a wipeable buffer (no ``str`` of it is ever made).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import termios
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from dicom_card_agent.desktop.pinentry_choice import shows_on_terminal
from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.lifecycle.cancel import current_scope
from dicom_card_agent.service.signals import JOB_CONTROL_SIGNALS, blocked, signal_name
from dicom_card_agent.token.secret import Secret, wipe

ASSUAN_CANCELLED = 83886179  # GPG_ERR_CANCELED in the pinentry source
ASSUAN_TIMEOUT = 83886142  # GPG_ERR_TIMEOUT: SETTIMEOUT's time ran out with the dialog unanswered
MAX_LINE = 1002  # Assuan lines are at most 1000 bytes plus the newline
PROGRAM_END_SECONDS = 1.0  # for a program whose output ended to be seen exit, and how
MAX_COMMAND = 1000  # bytes of a command line without its newline: a longer one ends the pinentry program
ELLIPSIS = "\u2026"

log = logging.getLogger("agent.pinentry")


class PinentryError(CardAgentError):
    """The pinentry program could not be run, or gave no PIN."""


class PinEntryCancelledError(PinentryError):
    """The person at the dialog pressed Cancel: nothing was sent to the card."""


class PinEntryTimedOutError(PinEntryCancelledError):
    """Nobody answered the dialog within its timeout: nothing was sent to the card."""


class PinDialogEndedError(PinEntryCancelledError):
    """The dialog's program was ended by a signal while it was open (`pkill pinentry`, the OOM
    killer, the session's end): closed before a PIN was typed, nothing was sent to the card."""


class NoPinEnteredError(PinentryError):
    """The dialog was answered with an empty PIN: nothing was sent to the card."""


def escape(text: str) -> str:
    """Assuan percent-escaping of a command argument."""
    return "".join(f"%{ord(c):02X}" if c in "%\r\n" or ord(c) < 0x20 else c for c in text)


# What a program's own fault ends it with: a crash, where another signal is someone ending it.
_CRASHES = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT, signal.SIGSYS,
                      signal.SIGTRAP})


def command(verb: str, text: str) -> str:
    """``verb`` with ``text`` percent-escaped as its argument, in one Assuan line: a text too long
    for it (a certificate's name, tunnels' names) is shortened, ending with an ellipsis. A line over
    the limit ended the pinentry program, and the sign-in failed as `the pinentry program ...
    exited (no display or terminal?)`."""
    line = f"{verb} {escape(text)}"
    if len(line.encode("utf-8")) <= MAX_COMMAND:
        return line
    room = MAX_COMMAND - len(f"{verb} {ELLIPSIS}".encode())
    kept: list[str] = []
    for character in text:
        escaped = escape(character)
        room -= len(escaped.encode("utf-8"))
        if room < 0:
            break
        kept.append(escaped)
    log.warning("a text of the PIN dialog (%s) was shortened to fit pinentry's %d-byte line: %d of its %d characters "
                "are shown; a shorter [desktop] site_label or helpdesk, or shorter tunnel names, make it fit",
                verb, MAX_COMMAND, len(kept), len(text))
    return f"{verb} {''.join(kept)}{ELLIPSIS}"


def unescape(text: str) -> str:
    """Assuan percent-unescaping of a non-secret line (status, error text)."""
    raw = bytearray(text.encode("utf-8"))
    return raw[:unescape_in_place(raw)].decode("utf-8")


def unescape_in_place(data: bytearray, start: int = 0, end: int | None = None) -> int:
    """Undo percent-escaping of ``data[start:end]`` in place, writing from ``start``; returns where
    the unescaped bytes end. Nothing is copied out, so a PIN can be decoded where it was read."""
    end = len(data) if end is None else end
    read, write = start, start
    while read < end:
        if data[read] == ord("%") and read + 2 < end:
            data[write] = _hex_value(data[read + 1]) * 16 + _hex_value(data[read + 2])
            read += 3
        else:
            data[write] = data[read]
            read += 1
        write += 1
    return write


def _hex_value(byte: int) -> int:
    if 0x30 <= byte <= 0x39:
        return byte - 0x30
    if 0x41 <= byte <= 0x46 or 0x61 <= byte <= 0x66:
        return (byte | 0x20) - 0x61 + 10
    raise PinentryError("the pinentry program sent a malformed percent escape")


@dataclass(frozen=True)
class Response:
    ok: bool
    error_code: int | None = None
    error_text: str = ""


def parse_status(line: str) -> Response:
    """The OK or ERR line that ends an Assuan response."""
    if line == "OK" or line.startswith("OK "):
        return Response(True)
    if line.startswith("ERR "):
        code, _, text = line[4:].partition(" ")
        return Response(False, int(code) if code.isdigit() else None, unescape(text))
    raise PinentryError(f"the pinentry program answered something that is not Assuan: {line[:80]!r}")


class _AssuanPipe:
    """The pinentry's output, read through a raw pipe into one bytearray that is wiped at the end:
    the ``D`` line carrying the PIN never becomes a ``str`` or ``bytes`` object."""

    def __init__(self, process: subprocess.Popen, program: str) -> None:
        assert process.stdout is not None  # started with stdout=PIPE
        self.process = process
        self.descriptor = process.stdout.fileno()
        self.program = program
        self.buffer = bytearray(MAX_LINE)
        self.filled = 0
        self.greeted = False  # the program's first OK came: it runs, and shows its dialog when asked

    def next_line(self) -> tuple[int, int]:
        """Where the next line (without its newline) is in :attr:`buffer`; it stays valid until the
        next call."""
        while True:
            newline = self.buffer.find(b"\n", 0, self.filled)
            if newline >= 0:
                return 0, newline
            if self.filled == len(self.buffer):
                raise PinentryError(f"the pinentry program {self.program!r} sent a line longer than {MAX_LINE} bytes")
            with memoryview(self.buffer) as view:
                count = os.readv(self.descriptor, [view[self.filled:]])
            if count == 0:
                raise self.ended()
            self.filled += count

    def ended(self) -> PinentryError:
        """What to say of the program, whose output has ended (or whose input is closed)."""
        if not self.greeted:
            return PinentryError(f"the pinentry program {self.program!r} exited (no display or terminal?)")
        try:
            status = self.process.wait(PROGRAM_END_SECONDS)
        except subprocess.TimeoutExpired:
            status = None
        if status is not None and status < 0 and -status not in _CRASHES:
            return PinDialogEndedError(f"the PIN dialog ({self.program}) was ended by {signal_name(-status)}: "
                                       "nothing was sent to the card")
        how = ("closed its output" if status is None else f"crashed ({signal_name(-status)})" if status < 0
               else f"exited with status {status}")
        return PinentryError(f"the pinentry program {self.program!r} {how} while its dialog was open: nothing was "
                             "sent to the card")

    def consume(self, end: int) -> None:
        """Drop the line ending at ``end`` (its newline included), wiping what moves."""
        rest = self.filled - (end + 1)
        base = ctypes.addressof((ctypes.c_char * len(self.buffer)).from_buffer(self.buffer))
        ctypes.memmove(base, base + end + 1, rest)  # in place: no temporary copy of what follows
        ctypes.memset(base + rest, 0, self.filled - rest)
        self.filled = rest

    def text(self, start: int, end: int) -> str:
        return self.buffer[start:end].decode("utf-8", "replace")

    def wipe(self) -> None:
        wipe(self.buffer)


class Pinentry:
    """One conversation with a pinentry program."""

    def __init__(self, program: str = "pinentry", ttyname: str | None = None) -> None:
        self.program = program
        self.ttyname = ttyname if ttyname is not None else (os.ttyname(0) if sys.stdin.isatty() else None)

    @property
    def on_terminal(self) -> bool:
        """Whether the dialog is drawn on the agent's terminal (pinentry-tty, or any without a display)."""
        return self.ttyname is not None and shows_on_terminal(self.program)

    def get_pin(self, description: str, *, prompt: str = "PIN:", title: str = "Smart card sign-in",
                confirm: Confirmation | Sequence[Confirmation] = (), timeout: float | None = None) -> Secret:
        """The PIN typed in the dialog; ``confirm`` is asked first (OK/Cancel, each question in turn)
        in the same conversation, and ``timeout`` (seconds) closes the dialog unanswered."""
        questions = (confirm,) if isinstance(confirm, Confirmation) else tuple(confirm)
        with _terminal_kept(self.ttyname):
            return self._converse(description, prompt, title, questions, timeout)

    def _converse(self, description: str, prompt: str, title: str, questions: tuple[Confirmation, ...],
                  timeout: float | None) -> Secret:
        try:
            # SIGHUP blocked for good in the dialog: one sent to every process of the agent
            # (`systemctl kill -s HUP`) is the agent's reload, and closed the dialog as the clinician
            # typed. Not SIGTERM: a cancelled sign-in closes the dialog with it. On the terminal,
            # SIGTTIN and SIGTTOU too: sent to the background (Ctrl-Z, bg) as it reads, the dialog
            # ends, cancelled, instead of stopping every process of the agent (the caller asks again
            # once the agent is back in the foreground).
            with blocked({signal.SIGHUP, *(JOB_CONTROL_SIGNALS if self.on_terminal else ())}):
                process = subprocess.Popen([self.program], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           stderr=subprocess.DEVNULL, bufsize=0)
        except OSError as error:
            raise PinentryError(f"cannot run the pinentry program {self.program!r}: {error.strerror}; install "
                                "pinentry-gnome3, pinentry-qt, pinentry-gtk2 or pinentry-tty, or set the PIN "
                                "source to prompt") from None
        assert process.stdin is not None and process.stdout is not None
        pipe = _AssuanPipe(process, self.program)
        scope = current_scope()
        if scope is not None:
            scope.ends_with(process)  # a pulled card, a lock or a stop closes the dialog
        try:
            self._expect_ok(process, pipe, None)
            pipe.greeted = True
            if self.ttyname:
                self._expect_ok(process, pipe, f"OPTION ttyname={self.ttyname}")
                self._expect_ok(process, pipe, f"OPTION ttytype={os.environ.get('TERM', 'dumb')}")
            self._expect_ok(process, pipe, command("SETTITLE", title))
            if timeout:
                self._expect_ok(process, pipe, f"SETTIMEOUT {max(1, round(timeout))}")
            for question in questions:
                self._confirm(process, pipe, question)
            self._expect_ok(process, pipe, command("SETDESC", description))
            self._expect_ok(process, pipe, command("SETPROMPT", prompt))
            return self._get_pin(process, pipe)
        finally:
            pipe.wipe()
            try:
                process.stdin.write(b"BYE\n")
                process.stdin.close()
            except OSError:
                pass
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
            process.stdout.close()

    def _confirm(self, process: subprocess.Popen, pipe: _AssuanPipe, confirm: Confirmation) -> None:
        """Ask ``confirm.question``; Cancel (or the timeout) ends the conversation before any PIN."""
        self._expect_ok(process, pipe, command("SETDESC", confirm.question))
        self._expect_ok(process, pipe, command("SETOK", confirm.ok))
        self._expect_ok(process, pipe, command("SETCANCEL", confirm.cancel))
        self._send(process, pipe, "CONFIRM")
        answer = self._response(pipe)
        if not answer.ok:
            _raise_unanswered(answer, "not confirmed")
        self._expect_ok(process, pipe, "SETOK OK")
        self._expect_ok(process, pipe, "SETCANCEL Cancel")

    def _get_pin(self, process: subprocess.Popen, pipe: _AssuanPipe) -> Secret:
        self._send(process, pipe, "GETPIN")
        pin = bytearray(MAX_LINE)  # the D lines' data, unescaped in place, then copied into the Secret
        length = 0
        try:
            while True:
                start, end = pipe.next_line()
                if pipe.buffer.startswith(b"D ", start, end):
                    written = unescape_in_place(pipe.buffer, start + 2, end)
                    piece = written - (start + 2)
                    if length + piece > len(pin):
                        raise PinentryError("the pinentry program sent an overlong PIN")
                    pin[length:length + piece] = memoryview(pipe.buffer)[start + 2:written]
                    length += piece
                    pipe.consume(end)
                    continue
                if pipe.buffer.startswith((b"S ", b"#"), start, end) or start == end:
                    pipe.consume(end)
                    continue
                answer = parse_status(pipe.text(start, end))
                pipe.consume(end)
                if not answer.ok:
                    _raise_unanswered(answer, "PIN entry cancelled")
                if length == 0:
                    raise NoPinEnteredError("no PIN entered: nothing was sent to the card")
                with memoryview(pin) as view:
                    return Secret(view[:length])
        finally:
            wipe(pin)

    def _send(self, process: subprocess.Popen, pipe: _AssuanPipe, command: str) -> None:
        assert process.stdin is not None  # started with stdin=PIPE
        try:
            process.stdin.write(command.encode("utf-8") + b"\n")
        except BrokenPipeError:  # it ended between two commands
            raise pipe.ended() from None

    def _expect_ok(self, process: subprocess.Popen, pipe: _AssuanPipe, command: str | None) -> None:
        if command is not None:
            self._send(process, pipe, command)
        answer = self._response(pipe)
        if not answer.ok:
            raise PinentryError(f"the pinentry program refused {command!r}: {answer.error_text}")

    def _response(self, pipe: _AssuanPipe) -> Response:
        """The OK or ERR that ends the answer to a command without data (status lines skipped)."""
        while True:
            start, end = pipe.next_line()
            if pipe.buffer.startswith((b"S ", b"#", b"D "), start, end) or start == end:
                pipe.consume(end)
                continue
            answer = parse_status(pipe.text(start, end))
            pipe.consume(end)
            return answer


@dataclass(frozen=True)
class Confirmation:
    """A question the dialog asks before the PIN (pinentry CONFIRM), with its two buttons' labels."""

    question: str
    ok: str = "OK"
    cancel: str = "Cancel"


def _raise_unanswered(answer: Response, what: str) -> None:
    """Cancel or timeout in the dialog: nothing was sent to the card; anything else is a failure."""
    if answer.error_code == ASSUAN_CANCELLED:
        raise PinEntryCancelledError(f"{what}: nothing was sent to the card")
    if answer.error_code == ASSUAN_TIMEOUT:
        raise PinEntryTimedOutError(f"{what}: the dialog timed out; nothing was sent to the card")
    raise PinentryError(f"the pinentry program failed: {answer.error_text or answer.error_code}")


@contextlib.contextmanager
def _terminal_kept(ttyname: str | None) -> Iterator[None]:
    """The terminal's settings as they were, once the dialog on it has ended, however it ended.
    pinentry-tty turns echo off (and, for a question, canonical input too) and restores them only
    when it ends by itself: closed by a pulled card, a lock or a stop, it left the clinician's
    terminal not showing what she types, and Ctrl-D and Enter no longer ending a line."""
    saved = _terminal_settings(ttyname)
    try:
        yield
    finally:
        if saved is not None:
            fd, settings = saved
            # SIGTTOU blocked: from the background (the agent sent there meanwhile) the settings are
            # given back all the same, where SIGTTOU would stop every process of the agent.
            with contextlib.suppress(termios.error), blocked({signal.SIGTTOU}):
                termios.tcsetattr(fd, termios.TCSANOW, settings)
            os.close(fd)


def _terminal_settings(ttyname: str | None) -> tuple[int, list] | None:
    """An open descriptor of ``ttyname`` and its settings now; None without a terminal."""
    if ttyname is None:
        return None
    try:
        fd = os.open(ttyname, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return fd, termios.tcgetattr(fd)
    except termios.error:
        os.close(fd)
        return None
