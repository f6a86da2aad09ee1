"""Asking for the PIN with a GnuPG ``pinentry`` program (Assuan protocol).

pinentry-gnome3, -qt, -curses and -tty all speak it: the agent sends the description (which card,
which certificate, what the card says about remaining tries) and ``GETPIN``; the program answers
``D <pin>`` then ``OK``, or ``ERR ...`` when the user cancels. The PIN travels over a pipe only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from agent.errors import CardAgentError
from agent.lifecycle.cancel import current_scope

ASSUAN_CANCELLED = 83886179  # GPG_ERR_CANCELED in the pinentry source
TIMEOUT_SECONDS = 300


class PinentryError(CardAgentError):
    """The pinentry program could not be run, or gave no PIN."""


class PinEntryCancelledError(PinentryError):
    """The person at the dialog pressed Cancel: nothing was sent to the card."""


def escape(text: str) -> str:
    """Assuan percent-escaping of a command argument."""
    return "".join(f"%{ord(c):02X}" if c in "%\r\n" or ord(c) < 0x20 else c for c in text)


def unescape(text: str) -> str:
    raw = bytearray()
    index = 0
    encoded = text.encode("utf-8")
    while index < len(encoded):
        if encoded[index] == ord("%") and index + 2 < len(encoded):
            raw.append(int(encoded[index + 1:index + 3], 16))
            index += 3
        else:
            raw.append(encoded[index])
            index += 1
    return raw.decode("utf-8")


@dataclass(frozen=True)
class Response:
    ok: bool
    data: str = ""
    error_code: int | None = None
    error_text: str = ""


def parse_response(lines: list[str]) -> Response:
    """One Assuan response: ``D`` data lines, status (``S``) and comment (``#``) lines, then OK or ERR."""
    data = "".join(unescape(line[2:]) for line in lines if line.startswith("D "))
    last = lines[-1] if lines else ""
    if last == "OK" or last.startswith("OK "):
        return Response(True, data)
    if last.startswith("ERR "):
        code, _, text = last[4:].partition(" ")
        return Response(False, data, int(code) if code.isdigit() else None, text)
    raise PinentryError(f"the pinentry program answered something that is not Assuan: {last[:80]!r}")


class Pinentry:
    """One conversation with a pinentry program."""

    def __init__(self, program: str = "pinentry", ttyname: str | None = None) -> None:
        self.program = program
        self.ttyname = ttyname if ttyname is not None else (os.ttyname(0) if sys.stdin.isatty() else None)

    def get_pin(self, description: str, *, prompt: str = "PIN:", title: str = "Smart card sign-in") -> str:
        try:
            process = subprocess.Popen([self.program], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, text=True, encoding="utf-8")
        except OSError as error:
            raise PinentryError(f"cannot run the pinentry program {self.program!r}: {error.strerror}; install "
                                "pinentry-gnome3, pinentry-qt, pinentry-curses or pinentry-tty, or set the PIN "
                                "source to prompt") from None
        assert process.stdin is not None and process.stdout is not None
        scope = current_scope()
        if scope is not None:
            scope.dialog_opened(process)  # a pulled card, a lock or a stop closes the dialog
        try:
            self._expect_ok(process, None)
            if self.ttyname:
                self._expect_ok(process, f"OPTION ttyname={self.ttyname}")
                self._expect_ok(process, f"OPTION ttytype={os.environ.get('TERM', 'dumb')}")
            self._expect_ok(process, f"SETTITLE {escape(title)}")
            self._expect_ok(process, f"SETDESC {escape(description)}")
            self._expect_ok(process, f"SETPROMPT {escape(prompt)}")
            answer = self._command(process, "GETPIN")
            if not answer.ok:
                if answer.error_code == ASSUAN_CANCELLED:
                    raise PinEntryCancelledError("PIN entry cancelled: nothing was sent to the card")
                raise PinentryError(f"the pinentry program failed: {answer.error_text or answer.error_code}")
            if not answer.data:
                raise PinentryError("no PIN entered: nothing was sent to the card")
            return answer.data
        finally:
            try:
                process.stdin.write("BYE\n")
                process.stdin.close()
            except OSError:
                pass
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()

    def _command(self, process: subprocess.Popen, command: str | None) -> Response:
        if command is not None:
            process.stdin.write(command + "\n")
            process.stdin.flush()
        lines = []
        while True:
            line = process.stdout.readline()
            if not line:
                raise PinentryError(f"the pinentry program {self.program!r} exited (no display or terminal?)")
            line = line.rstrip("\n")
            lines.append(line)
            if line == "OK" or line.startswith(("OK ", "ERR ")):
                return parse_response(lines)

    def _expect_ok(self, process: subprocess.Popen, command: str | None) -> None:
        answer = self._command(process, command)
        if not answer.ok:
            raise PinentryError(f"the pinentry program refused {command!r}: {answer.error_text}")
