"""Which pinentry program shows the PIN dialog when the configuration says ``pin = "pinentry"``.

A graphical session (DISPLAY or WAYLAND_DISPLAY set) gets the first graphical pinentry of
``[desktop] pinentry`` that is installed; a terminal session gets pinentry-tty on the terminal the
agent was started from. Without either there is nobody to ask: that is said at start-up, with the fix.
The program found is given the card's PIN: agent/token/pin.py refuses it, as a trusted file
(agent/file_trust.py), when another user could have changed it, each time before it runs.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence

from dicom_card_agent.errors import CardAgentError

TERMINAL_PINENTRY = "pinentry-tty"
# Pinentries whose dialog is the terminal itself, whatever the session; without a display, any is.
TERMINAL_PINENTRIES = (TERMINAL_PINENTRY, "pinentry-curses")


class NoPinentryError(CardAgentError):
    """No pinentry program fits the session the agent runs in."""


def is_graphical(environ: Mapping[str, str]) -> bool:
    return bool(environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY"))


def shows_on_terminal(program: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the dialog of the pinentry ``program`` is drawn on the terminal it is given."""
    environ = os.environ if environ is None else environ
    return os.path.basename(program) in TERMINAL_PINENTRIES or not is_graphical(environ)


def choose_pinentry(graphical: Sequence[str], environ: Mapping[str, str] | None = None,
                    has_terminal: bool | None = None) -> str:
    """The path of the pinentry program for this session."""
    environ = os.environ if environ is None else environ
    has_terminal = sys.stdin.isatty() if has_terminal is None else has_terminal
    path = environ.get("PATH", os.defpath)
    if is_graphical(environ):
        for program in graphical:
            found = shutil.which(program, path=path)
            if found is not None:
                return found
    if has_terminal:
        found = shutil.which(TERMINAL_PINENTRY, path=path)
        if found is not None:
            return found
    if is_graphical(environ):
        raise NoPinentryError(
            f"no graphical pinentry is installed (looked for {', '.join(graphical)} on PATH): install one "
            "(e.g. `apt install pinentry-gnome3`) or set [desktop] pinentry to one that is installed")
    if has_terminal:
        raise NoPinentryError(f"{TERMINAL_PINENTRY} is not installed: install it (`apt install pinentry-tty`)")
    raise NoPinentryError(
        "pin = \"pinentry\" needs a desktop session (DISPLAY or WAYLAND_DISPLAY) or a terminal to show the PIN "
        "dialog, and the agent has neither: start it in the clinician's desktop session (systemd --user), "
        "or use a PIN pad (pin = \"protected\")")
