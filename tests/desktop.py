"""A real desktop for tests: Xvfb on a free display, a session D-Bus, the dunst notification server,
and what a clinician does there: find the PIN dialog window, type into it, read the notifications
back, take screenshots.

Every process is started by pid and stopped by that pid. Import the fixture into a test module:
``from desktop import desktop  # noqa: F401``. Without the tools the tests skip, except in CI
(CI=true), where a missing desktop tool fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TOOLS = ("Xvfb", "dbus-daemon", "dunst", "dunstctl", "xdotool", "import", "convert", "pinentry-gtk-2")
PINENTRY_GTK = "pinentry-gtk-2"
SCREEN = "1024x768x24"

# dunst: top-right, fixed width, no fading, nothing disappears on its own while a test reads it.
DUNSTRC = """\
[global]
    width = 360
    origin = top-right
    offset = 10x10
    font = DejaVu Sans 10
    frame_width = 1
    frame_color = "#5e81ac"
    separator_height = 2
    padding = 10
    horizontal_padding = 10
    markup = full
    format = "<b>%s</b>\\n%b"
    icon_position = off
[urgency_low]
    background = "#ffffff"
    foreground = "#222222"
    timeout = 0
[urgency_normal]
    background = "#ffffff"
    foreground = "#222222"
    timeout = 0
[urgency_critical]
    background = "#fff4e5"
    foreground = "#222222"
    frame_color = "#d08770"
    timeout = 0
"""


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


@dataclass
class Desktop:
    directory: Path
    display: str = ""
    bus: str = ""
    processes: list[subprocess.Popen] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """What a program needs to run in this desktop session."""
        return {"DISPLAY": self.display, "DBUS_SESSION_BUS_ADDRESS": self.bus}

    def _environ(self) -> dict[str, str]:
        return {**os.environ, **self.env()}

    def run(self, *command: str) -> str:
        return subprocess.run(command, env=self._environ(), capture_output=True, text=True, timeout=20,
                              check=True).stdout

    # -- starting and stopping --------------------------------------------------------------------

    def start(self) -> None:
        read, write = os.pipe()
        xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", SCREEN, "-nolisten", "tcp"],
                                pass_fds=[write], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        self.processes.append(xvfb)
        os.close(write)
        with os.fdopen(read) as display_number:
            number = display_number.readline().strip()
        if not number:
            raise AssertionError("Xvfb did not start")
        self.display = f":{number}"
        bus = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--nopidfile", "--print-address=1"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        self.processes.append(bus)
        assert bus.stdout is not None
        self.bus = bus.stdout.readline().strip()
        if not self.bus:
            raise AssertionError("dbus-daemon --session did not start")
        config = self.directory / "dunstrc"
        config.write_text(DUNSTRC)
        self.processes.append(subprocess.Popen(["dunst", "-config", str(config)], env=self._environ(),
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                               start_new_session=True))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if subprocess.run(["dunstctl", "is-paused"], env=self._environ(), capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError("dunst did not come up on the session bus")

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process.stdout is not None:
                process.stdout.close()
        self.processes.clear()

    # -- windows ----------------------------------------------------------------------------------

    def windows(self, name: str) -> list[str]:
        """Visible windows whose title contains ``name``."""
        result = subprocess.run(["xdotool", "search", "--onlyvisible", "--name", name], env=self._environ(),
                                capture_output=True, text=True, timeout=10)
        return result.stdout.split()

    def wait_for_window(self, name: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.windows(name)
            if found:
                time.sleep(0.5)  # drawn, and its keyboard grab taken
                return found[0]
            time.sleep(0.1)
        raise AssertionError(f"no window titled {name!r} appeared on {self.display}")

    def wait_for_no_window(self, name: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.windows(name):
            if time.monotonic() > deadline:
                raise AssertionError(f"the window titled {name!r} is still open")
            time.sleep(0.1)

    def type(self, text: str) -> None:
        """Type into the window that has the keyboard (pinentry grabs it)."""
        self.run("xdotool", "type", "--delay", "40", text)

    def key(self, *keys: str) -> None:
        self.run("xdotool", "key", *keys)

    # -- notifications ----------------------------------------------------------------------------

    def notifications(self) -> list[tuple[str, str]]:
        """(summary, body) of every notification dunst has shown, oldest first; shown ones are closed
        (into dunst's history) to be read."""
        self.run("dunstctl", "close-all")
        history = json.loads(self.run("dunstctl", "history"))
        shown = [(n["summary"]["data"], n["body"]["data"]) for n in history["data"][0]]
        return list(reversed(shown))

    def wait_for_notification(self, summary: str, timeout: float = 10.0) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            displayed = int(self.run("dunstctl", "count", "displayed").strip())
            if displayed or time.monotonic() + 0.2 > deadline:
                for shown in self.notifications():
                    if shown[0] == summary:
                        return shown
            time.sleep(0.1)
        raise AssertionError(f"no notification {summary!r}; dunst showed {self.notifications()}")

    def on_screen(self) -> list[tuple[str, str]]:
        """(summary, body) of the notifications displayed now, what the person at the screen reads,
        oldest first; read as :meth:`notifications` does, so they are closed afterwards (closing
        moves the displayed ones, in order, to the end of dunst's history)."""
        displayed = int(self.run("dunstctl", "count", "displayed").strip())
        return self.notifications()[-displayed:] if displayed else []

    def wait_until_displayed(self, count: int = 1, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while int(self.run("dunstctl", "count", "displayed").strip()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"dunst does not display {count} notification(s)")
            time.sleep(0.1)

    # -- screenshots ------------------------------------------------------------------------------

    def screenshot(self, path: Path) -> Path:
        """The screen, cropped to what is on it (the background is black), as a small PNG."""
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = self.directory / "screen.png"
        self.run("import", "-window", "root", str(raw))
        self.run("convert", str(raw), "-trim", "+repage", "-bordercolor", "black", "-border", "8",
                 "-strip", "-colors", "64", f"PNG8:{path}")
        return path


class TranscribedPinentry:
    """pinentry-gtk-2 itself, with a transcript of what the agent asks it to show (its commands:
    the PIN goes the other way, so it is never in the transcript), to read a dialog's exact words."""

    def __init__(self, directory: Path) -> None:
        self.program, self.transcript = directory / "pinentry-transcribed", directory / "pinentry-commands.log"
        real = shutil.which(PINENTRY_GTK)
        # exec: the agent's pid for the dialog is pinentry's own, so closing the dialog closes it.
        self.program.write_text(f'#!/bin/bash\nexec {real} "$@" < <(tee -a {self.transcript})\n')
        self.program.chmod(0o755)

    def said(self, command: str) -> list[str]:
        """The arguments of every ``command`` (SETDESC, SETOK, ...) sent so far, percent-escapes undone."""
        from dicom_card_agent.token.pinentry import unescape
        lines = self.transcript.read_text().splitlines() if self.transcript.exists() else []
        return [unescape(line[len(command) + 1:]) for line in lines if line.startswith(f"{command} ")]


def require_tools() -> None:
    missing = missing_tools()
    if missing and os.environ.get("CI") == "true":
        pytest.fail(f"the desktop stack is missing {', '.join(missing)}: scripts/setup installs it")
    if missing:
        pytest.skip(f"no desktop stack ({', '.join(missing)} missing; scripts/setup installs it)")


@pytest.fixture
def desktop(tmp_path: Path) -> Iterator[Desktop]:
    require_tools()
    stack = Desktop(tmp_path / "desktop")
    stack.directory.mkdir()
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
