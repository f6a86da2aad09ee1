"""The terminal the ``prompt`` PIN source asks on: the agent's controlling terminal, else its standard
input (docs/pin-handling.md).

Read here rather than with :func:`getpass.getpass`, which (tests/test_pin_prompt.py):

- went on reading after its sign-in was given up (the card pulled): with echo still off, the line
  typed at the next card's prompt went to it, and its end turned echo back on under that prompt, so
  the PIN typed again showed on the screen;
- turned echo off from the background (``card-agent run &``), which stops the whole job (SIGTTOU):
  the agent answered neither applications nor ``status`` until someone typed ``fg``;
- reads with echo on, after a warning, when it cannot turn echo off;
- gives a ``str``, which cannot be wiped.

Here one question or prompt reads the terminal at a time; one that is given up stops within
:data:`POLL_SECONDS` and gives the terminal back as it found it, what was typed for it discarded.
Nothing is read or changed on the terminal while the agent is in its background: the prompt waits
for ``fg`` and says so once. The PIN is read into a buffer that is wiped.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import locale
import logging
import os
import select
import stat
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.lifecycle.cancel import SignInCancelledError, current_scope
from dicom_card_agent.logline import printable
from dicom_card_agent.service.signals import JOB_CONTROL_SIGNALS, blocked
from dicom_card_agent.token.pinentry import NoPinEnteredError, PinEntryCancelledError, PinEntryTimedOutError
from dicom_card_agent.token.secret import Secret, wipe

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2  # how often a reader looks whether its sign-in was given up, or the agent brought forward
LONGEST_LINE = 4096  # the longest line a terminal hands over in its line mode (Linux's N_TTY_BUF_SIZE)
PROMPT_CANCELLED = "PIN entry cancelled (Ctrl-D)"
_ONE_READER = threading.Lock()


class TerminalUnusableError(CardAgentError):
    """The terminal cannot be asked on (there is none, its echo cannot be turned off, the agent runs
    in its background where no shell can bring it forward), or what was typed cannot be a PIN."""


class TerminalClosedError(PinEntryCancelledError):
    """The terminal was closed (hung up) as it asked: as a Cancel, nothing was sent to the card."""


@dataclass(frozen=True)
class _Line:
    length: int  # the bytes typed, without the newline
    entered: bool  # ended by Enter; False: by Ctrl-D (the end of input)


@dataclass(frozen=True)
class _Terminal:
    fd: int  # read, and its mode changed
    shown_on: int  # what is shown goes there
    what: str  # "the PIN prompt for Alice Example": the log's name for what waits on it
    deadline: float | None  # time.monotonic(); past it, a question times out
    timed_out: str  # what a question that times out says

    def show(self, text: str) -> None:
        """``text`` in the terminal's encoding, its lines kept; escaped: control characters (which
        would drive the terminal) and what the encoding cannot show (a name in another script)."""
        lines = "\n".join(printable(line) for line in text.split("\n"))
        try:
            os.write(self.shown_on, lines.encode(locale.getpreferredencoding(False), "backslashreplace"))
        except OSError as error:
            raise self.closed(error) from None

    def closed(self, error: OSError | None = None) -> TerminalClosedError:
        why = f" ({error.strerror or error})" if error is not None else ""
        return TerminalClosedError(f"{self.what} ended: its terminal was closed{why}; nothing was sent to the card")

    def given_up(self) -> bool:
        scope = current_scope()
        return scope is not None and scope.cancelled

    def check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise PinEntryTimedOutError(self.timed_out)

    def wait(self) -> bool:
        """Wait :data:`POLL_SECONDS`; True when the sign-in was given up meanwhile."""
        self.check_deadline()
        scope = current_scope()
        if scope is None:
            time.sleep(POLL_SECONDS)
            return False
        return scope.wait(POLL_SECONDS)

    def in_foreground(self) -> bool:
        return _in_foreground(self.fd)

    def wait_for_foreground(self) -> bool:
        """True once the agent is in the foreground of its terminal; False when the sign-in is given
        up first. Says once that it waits: in the log, and on the terminal unless the log is shown
        there (the person at it is who can type `fg`)."""
        told = False
        while not self.in_foreground():
            if _no_shell_can_bring_forward():
                raise TerminalUnusableError(
                    f"{self.what} cannot be shown: the agent runs in the background of its terminal, and no shell "
                    "can bring it to the foreground (the one that started it has ended): nothing was sent to the "
                    "card. Run the agent in the foreground of a terminal, or use pin = \"pinentry\"")
            if not told:
                waits = (f"{self.what} waits: the agent runs in the background of its terminal, where nothing can be "
                         "typed to it; bring it to the foreground (fg) to answer it")
                log.warning("%s", waits)
                if not _same_terminal(self.shown_on, 2):  # the log: standard error
                    self.show(f"\ncard-agent: {waits}\n")
                told = True
            if self.wait():
                return False
        return True

    def read_line(self, buffer: bytearray, show_again: Callable[[], None]) -> _Line | None:
        """The line typed next, into ``buffer``; None when the sign-in was given up first. Sent to
        the background meanwhile (Ctrl-Z, bg), it waits for the foreground again and then calls
        ``show_again``: the shell had the terminal, its modes and its screen in between."""
        filled = 0
        with memoryview(buffer) as view:
            while True:
                self.check_deadline()
                if self.given_up():
                    return None
                if not self.in_foreground():
                    if not self.wait_for_foreground():
                        return None
                    show_again()
                    filled = 0  # what was typed before is the shell's now
                events = _typed_within(self.fd, POLL_SECONDS)
                if not events:
                    continue
                try:
                    count = os.readv(self.fd, [view[filled:]])
                except OSError as error:
                    if error.errno == errno.EIO and not self.in_foreground():
                        continue  # sent to the background as it read: wait for fg again
                    raise self.closed(error) from None
                if count == 0 and events & select.POLLHUP:  # the window closed, not Ctrl-D
                    raise self.closed()
                if count == 0:
                    return _Line(filled, entered=False)
                newline = buffer.find(b"\n", filled, filled + count)
                filled += count
                if newline >= 0:
                    return _Line(newline, entered=True)
                if filled == len(buffer):
                    raise TerminalUnusableError(f"more than {len(buffer)} bytes typed without Enter: nothing was sent "
                                                "to the card")


@contextmanager
def _terminal(what: str, *, path: str = "/dev/tty", timeout: float | None = None,
              timed_out: str = "") -> Iterator[_Terminal | None]:
    """The terminal ``path`` (by default the controlling terminal, else stdin), to this caller alone;
    None when the sign-in was given up while another question or prompt (given up, ending) still had it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        owned, shown_on = True, fd
    except OSError as error:  # no controlling terminal: stdin, as getpass does
        try:
            fd, owned, shown_on = sys.stdin.fileno(), False, sys.stderr.fileno()
        except (OSError, ValueError):  # none either (closed)
            raise TerminalUnusableError(f"{what} has no terminal ({path}: {error.strerror}; no standard input): "
                                        "nothing was sent to the card") from None
    deadline = None if timeout is None else time.monotonic() + timeout
    terminal = _Terminal(fd, shown_on, what, deadline, timed_out)
    try:
        while not _ONE_READER.acquire(timeout=POLL_SECONDS):
            if terminal.given_up():
                yield None
                return
        try:
            # From the background, a read fails and a mode change is made instead of stopping every
            # process of the agent: the reader waits for `fg` itself.
            with blocked(JOB_CONTROL_SIGNALS):
                yield terminal
        finally:
            _ONE_READER.release()
    finally:
        if owned:
            os.close(fd)


@contextmanager
def _echo_off(terminal: _Terminal) -> Iterator[Callable[[], None]]:
    """Echo off for the block (what was typed before it is discarded), then the terminal's mode as
    it was, what was typed after the line discarded. Never a PIN read with echo on. Gives a
    function that turns echo off again (after a shell had the terminal)."""
    try:
        before = termios.tcgetattr(terminal.fd)
    except termios.error as error:
        raise _no_echo_control(error) from None
    quiet = list(before)
    quiet[3] &= ~termios.ECHO  # the local modes

    def echo_off() -> None:
        try:
            termios.tcsetattr(terminal.fd, termios.TCSAFLUSH, quiet)
        except termios.error as error:
            raise _no_echo_control(error) from None

    echo_off()
    try:
        yield echo_off
    finally:
        with contextlib.suppress(termios.error):  # a terminal gone meanwhile has no mode to give back
            termios.tcsetattr(terminal.fd, termios.TCSAFLUSH, before)


def _no_echo_control(error: termios.error) -> TerminalUnusableError:
    return TerminalUnusableError(f"the terminal's echo could not be turned off ({error.args[-1]}): the PIN is not "
                                 "asked, it would show as typed; nothing was sent to the card")


def read_pin(prompt: str, what: str) -> Secret:
    """The PIN typed after ``prompt``, with echo off, as a :class:`Secret` the caller wipes. ``what``
    names the prompt in the log ("the PIN prompt for Alice Example"). Raises
    :class:`PinEntryCancelledError` for Ctrl-D, :class:`NoPinEnteredError` for Enter alone,
    :class:`SignInCancelledError` when the sign-in is given up first, and
    :class:`TerminalUnusableError` when the terminal cannot be asked on."""
    buffer = bytearray(LONGEST_LINE)
    try:
        with _terminal(what) as terminal:
            line = None
            if terminal is not None and terminal.wait_for_foreground():
                with _echo_off(terminal) as echo_off:
                    def show_again() -> None:
                        echo_off()
                        terminal.show(f"\n{prompt}")

                    terminal.show(prompt)
                    line = terminal.read_line(buffer, show_again)
                    terminal.show("\n")  # Enter, which echo did not show; or the end of a prompt given up
        if line is None:
            _given_up()
        if not line.entered and not line.length:
            raise PinEntryCancelledError(f"{PROMPT_CANCELLED}: nothing was sent to the card")
        if not line.length:
            raise NoPinEnteredError("no PIN entered: nothing was sent to the card")
        return pin_as_utf8(buffer, line.length, locale.getpreferredencoding(False))
    finally:
        wipe(buffer)


def pin_as_utf8(buffer: bytearray, length: int, encoding: str) -> Secret:
    """The PIN in the first ``length`` bytes of ``buffer``, typed on a terminal of ``encoding``, in
    UTF-8 as PKCS#11 takes it: "Zürich" typed on a Latin-1 terminal is the card's "Zürich". Only such
    a PIN (not ASCII, on a terminal that is not UTF-8) passes through a ``str``, which cannot be wiped."""
    with memoryview(buffer) as view:
        if buffer.isascii() or codecs.lookup(encoding).name == "utf-8":  # the rest of buffer: zeros
            return Secret(view[:length])
        try:
            text = str(view[:length], encoding)
        except UnicodeDecodeError:
            raise TerminalUnusableError(f"the PIN typed is not {encoding} text, the terminal's encoding (LANG, "
                                        "LC_ALL): nothing was sent to the card") from None
    utf8 = bytearray(text, "utf-8")
    try:
        return Secret(utf8)
    finally:
        wipe(utf8)


def ask(question: str, what: str, *, timeout: float | None = None, timed_out: str = "") -> bool:
    """Ask ``question`` (its answer echoed); True only for "y" or "yes": False for any other answer,
    and when the sign-in is given up first. Keys typed before it is shown are discarded. Raises
    :class:`PinEntryTimedOutError` (``timed_out``) after ``timeout`` s without an answer."""
    buffer = bytearray(LONGEST_LINE)
    with _terminal(what, timeout=timeout, timed_out=timed_out) as terminal:
        if terminal is None or not terminal.wait_for_foreground():
            return False
        with contextlib.suppress(termios.error):  # stdin that is no terminal has nothing typed ahead
            termios.tcflush(terminal.fd, termios.TCIFLUSH)
        terminal.show(f"\n{question}")
        line = terminal.read_line(buffer, lambda: terminal.show(f"\n{question}"))
        if line is None:  # given up: the next line of the terminal is not the question's
            terminal.show("\n")
            return False
    return bytes(buffer[:line.length]).strip().lower() in (b"y", b"yes")


def in_foreground_of(ttyname: str) -> bool:
    """Whether the agent is in the foreground of the terminal ``ttyname`` (True when it is not the
    agent's controlling terminal, or cannot be opened: no job control applies)."""
    try:
        fd = os.open(ttyname, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        return _in_foreground(fd)
    finally:
        os.close(fd)


def _in_foreground(fd: int) -> bool:
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:  # not the agent's controlling terminal (its stdin, without one): no job control
        return True


def wait_for_foreground(what: str, ttyname: str) -> None:
    """Return once the agent is in the foreground of the terminal ``ttyname`` (at once when it is not
    the agent's controlling terminal), for a dialog another program draws there (pinentry-tty): it
    would be stopped with the agent, from the background. Raises :class:`SignInCancelledError` when
    the sign-in is given up first, and :class:`TerminalUnusableError` when no shell can bring the
    agent forward."""
    with _terminal(what, path=ttyname) as terminal:
        if terminal is None or not terminal.wait_for_foreground():
            _given_up()


def _given_up() -> NoReturn:
    scope = current_scope()
    if scope is not None:
        scope.check()  # raises, with the reason the sign-in was given up for
    raise SignInCancelledError("sign-in given up: nothing was sent to the card")


def _typed_within(fd: int, seconds: float) -> int:
    """What ``fd`` has within ``seconds``: POLLIN (something to read, or its end), POLLHUP (hung
    up), or 0. poll, not select: the descriptor's number may be past select's 1024 in a busy agent."""
    waiting = select.poll()
    waiting.register(fd, select.POLLIN)
    return sum(events for _, events in waiting.poll(seconds * 1000))


def _same_terminal(fd: int, other: int) -> bool:
    """Whether ``fd`` and ``other`` are the same terminal device."""
    try:
        mine, theirs = os.fstat(fd), os.fstat(other)
    except OSError:
        return False
    return stat.S_ISCHR(theirs.st_mode) and mine.st_rdev == theirs.st_rdev


def _no_shell_can_bring_forward() -> bool:
    """Whether nothing can make the agent's process group the terminal's foreground: only a parent
    in the same session, outside the group, can (a shell's `fg`). A group without one is orphaned,
    and its reads and mode changes fail."""
    parent = os.getppid()
    try:
        return os.getsid(parent) != os.getsid(0) or os.getpgid(parent) == os.getpgrp()
    except OSError:  # the parent is gone: reparented, so no shell of the session
        return True
