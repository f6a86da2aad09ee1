"""The clinician's side of a PIN dialog: a pseudo-terminal as the agent's stdin, where pinentry-tty
shows its prompt and the test types, and the pinentry processes of one agent.

Import the fixture into a test module: ``from pin_dialog import terminal  # noqa: F401``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_runner import stat_fields, wait_for

PINENTRY_TTY = "/usr/bin/pinentry-tty"


class Terminal:
    """The clinician's terminal: the agent's stdin, where pinentry-tty shows its dialog."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self.name = os.ttyname(self.slave)
        self._closed = False
        self.screen = b""  # everything shown so far: one thread reads the terminal, all others look here
        # The reader reads a descriptor of its own, which it closes as it ends (once nothing holds
        # the terminal's other side). Reading self.master, it went on reading that number after
        # close() while the GIL kept it from noticing: the next test's terminal had the number by
        # then, and part of that terminal's screen (pinentry's "[sc]? ") went to this one.
        self._reader = threading.Thread(target=self._read, args=(os.dup(self.master),), daemon=True)
        self._reader.start()

    def _read(self, master: int) -> None:
        try:
            while data := os.read(master, 4096):
                self.screen += data
        except OSError:  # EIO: nothing holds the terminal's other side any more
            pass
        finally:
            os.close(master)

    def wait_for_prompt(self, count: int = 1, timeout: float = 10.0) -> None:
        wait_for(lambda: self.screen.count(b"PIN:") >= count, timeout)

    def wait_for_text(self, text: bytes, timeout: float = 10.0) -> None:
        wait_for(lambda: text in self.screen, timeout)

    def type(self, keys: bytes) -> None:
        if self._closed:  # a person thread outliving its test: its number may be another terminal's now
            raise AssertionError(f"typing {keys!r} into a terminal already closed")
        os.write(self.master, keys)

    def type_when(self, prompt: bytes, keys: bytes, *more: tuple[bytes, bytes],
                  timeout: float = 30.0) -> threading.Thread:
        """Type ``keys`` once ``prompt`` is on the screen, then each further (prompt, keys) in turn
        (a person at the terminal); gives up on a prompt that does not come within ``timeout``."""
        def person() -> None:
            for each_prompt, each_keys in ((prompt, keys), *more):
                self.wait_for_text(each_prompt, timeout)
                self.type(each_keys)
        thread = threading.Thread(target=person, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self._closed = True
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    tty = Terminal()
    yield tty
    tty.close()


def pinentry_processes(session: int | None = None, *, parent: int | None = None) -> list[int]:
    """The running pinentry-tty processes; with ``session``, only those of that session (the agent's
    pid: running_agent starts it as a session leader, and its dialogs stay in its session even
    after it is gone), with ``parent`` only that process's children, so that dialogs of agents
    other tests run at the same time do not count."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes().split(b"\0")[0] != PINENTRY_TTY.encode():
                continue
            if session is not None and int(stat_fields(cmdline.parent.name)[3]) != session:
                continue
            if parent is not None and int(stat_fields(cmdline.parent.name)[1]) != parent:
                continue
        except (OSError, IndexError, ValueError):
            continue
        found.append(int(cmdline.parent.name))
    return found

