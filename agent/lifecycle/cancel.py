"""Giving up a sign-in that is under way: closing its PIN dialog and keeping it off the card.

A sign-in runs in a thread of its own (the PIN dialog may stay open for minutes). The card loop
gives it a :class:`SignInScope`; the code deep inside it (the pinentry conversation, the login)
finds the scope of its thread with :func:`current_scope` and lets it close the dialog when the
sign-in is cancelled: the card was pulled, the session locked, the agent stopped, the dialog
timed out. A PIN typed into a dialog that was cancelled meanwhile never reaches the card.
"""

from __future__ import annotations

import contextvars
import subprocess
import threading
from collections.abc import Callable
from typing import TypeVar

from dicom_card_agent.errors import CardAgentError

T = TypeVar("T")
_SCOPE: contextvars.ContextVar[SignInScope | None] = contextvars.ContextVar("sign_in_scope", default=None)


class SignInCancelledError(CardAgentError):
    """The sign-in was given up (card pulled, lock, stop, dialog timeout); no PIN try was spent."""


class SignInScope:
    """One sign-in attempt's handle for cancelling it, and for saying that its PIN was entered."""

    def __init__(self, on_pin_entered: Callable[[], None] = lambda: None) -> None:
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._processes: list[subprocess.Popen] = []
        self._on_pin_entered = on_pin_entered
        self.reason = ""
        self.pin_was_entered = False  # set in the sign-in's own thread, as the PIN comes in

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self, reason: str) -> None:
        """Close the dialog, if one is open, and make the sign-in stop before it reaches the card."""
        with self._lock:
            if self._cancelled.is_set():
                return
            self.reason = reason
            self._cancelled.set()
            processes = list(self._processes)
        for process in processes:
            _close(process)

    def ends_with(self, process: subprocess.Popen) -> None:
        """A process of this sign-in (its PIN dialog, its card-session process) is ended if the
        sign-in is cancelled."""
        with self._lock:
            if not self._cancelled.is_set():
                self._processes.append(process)
                return
        _close(process)

    def pin_entered(self) -> None:
        """The PIN is in; what follows is the login. Raises if the sign-in was cancelled meanwhile."""
        self.check()
        self.pin_was_entered = True
        self._on_pin_entered()

    def wait(self, seconds: float) -> bool:
        """Wait ``seconds`` unless the sign-in is cancelled first; True when it was."""
        return self._cancelled.wait(seconds)

    def check(self) -> None:
        if self._cancelled.is_set():
            raise SignInCancelledError(f"sign-in given up: {self.reason}; nothing was sent to the card")

    def run(self, function: Callable[[], T]) -> T:
        """Call ``function`` with this scope as the current one (in this thread)."""
        token = _SCOPE.set(self)
        try:
            return function()
        finally:
            _SCOPE.reset(token)


def current_scope() -> SignInScope | None:
    """The scope of the sign-in this thread runs, if it runs one."""
    return _SCOPE.get()


def _close(process: subprocess.Popen) -> None:
    try:
        process.terminate()
    except OSError:
        pass
