"""The signals the agent acts on (SIGTERM, SIGINT and SIGQUIT: stop; SIGHUP: reload), acted on in a
thread of their own, and those it ignores.

A Python signal handler runs in the main thread between two bytecodes, inside whatever code it
interrupts: that may be the handler of the signal before, setting the same ``threading.Event``
under that event's lock. The second handler then waited for the lock the first one held, in the
same thread, for good, and the agent answered no signal any more (`timeout` sends SIGTERM to the
agent and to its process group; an administrator presses Ctrl-C twice; two `systemctl reload`).
Here the handlers do nothing: CPython's C-level handler writes each signal's number to a pipe
(``signal.set_wakeup_fd``) before any Python code runs, and a thread reads the pipe and acts. No
lock is taken in signal context.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from types import FrameType

# What stops the agent, cleanly: SIGQUIT is the terminal's Ctrl-\, which ended it at once (its
# default action), without the audit trail's sign-out and Application Stop, echo left off at a prompt.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})
# What means nothing to the agent: logged and ignored. Each one's default action ends the process,
# and a stray one (`kill -USR1`, an administrator's habit from other daemons: reopen the logs) ended
# the agent mid-shift: the clinician's associations cut, their audit records and the Application
# Stop lost. The faults (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGSYS, SIGTRAP), the CPU limit's
# SIGXCPU and the real-time signals (no name, no habit sends them) still end it.
IGNORED_SIGNALS = frozenset({signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF,
                             signal.SIGIO, signal.SIGPWR, signal.SIGSTKFLT})
# What suspends the agent (Ctrl-Z, `kill -TSTP`), once a signed-in session is locked
# (agent/cli/run.py): suspended, the agent would not see the card pulled.
SUSPEND_SIGNAL = signal.SIGTSTP
# What the agent's supervisor acts on or ignores. Its card-session processes leave them to it:
# blocked from their first instruction (the supervisor starts them so), then ignored.
SUPERVISORS_SIGNALS = STOP_SIGNALS | {signal.SIGHUP, SUSPEND_SIGNAL} | IGNORED_SIGNALS
# What a terminal sends a process of a background job that reads it or changes its modes: it stops
# the whole job. Blocked, the read fails (EIO) and the change is made, and the agent goes on.
JOB_CONTROL_SIGNALS = frozenset({signal.SIGTTIN, signal.SIGTTOU})


@contextlib.contextmanager
def blocked(signals: Iterable[int]) -> Iterator[None]:
    """``signals`` blocked in this thread for the block. A process started in it inherits the mask
    and keeps them blocked until it unblocks them itself (for good, if it never does)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class SignalActions:
    """Acts on the signals given to :meth:`on`, each in the ``signals`` thread. Made in the main
    thread (``set_wakeup_fd`` may only be called there), once per process."""

    def __init__(self) -> None:
        self._actions: dict[int, Callable[[], None]] = {}
        self._read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # what set_wakeup_fd requires: a full pipe drops, never blocks
        # A full pipe (65,536 signals not yet read) drops the numbers of more: the action of the same
        # signal is under way already.
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._act, name="signals", daemon=True).start()

    def on(self, signum: signal.Signals, action: Callable[[], None]) -> None:
        """Call ``action`` in the signals thread each time ``signum`` arrives. ``action`` must be
        quick: the next signal waits for it."""
        self._actions[signum] = action
        signal.signal(signum, _written_to_the_pipe)

    def _act(self) -> None:
        while True:
            for signum in os.read(self._read_fd, 512):
                action = self._actions.get(signum)
                if action is not None:
                    action()


class StopRequest:
    """The agent's stop: :attr:`flag` set by the first request, :attr:`cause` that request's (the
    Application Stop audit record names it). Requested from the signals thread only."""

    def __init__(self) -> None:
        self.flag = threading.Event()
        self.cause = ""

    def request(self, cause: str) -> None:
        if not self.flag.is_set():
            self.cause = cause
        self.flag.set()


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15; ``signal 35`` for a number without a name (a real-time signal)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _written_to_the_pipe(signum: int, frame: FrameType | None) -> None:
    """The Python handler of an acted-on signal: nothing to do, the number is in the pipe already."""


class EarlyRequests:
    """An action asked for (a signal's) before what carries it out exists: kept, and done once
    :meth:`hand_to` gives the action. A SIGHUP while the start waits for an unattended sign-in (up
    to a minute) was ignored, and a configuration changed in that time was not read until the next
    one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._action: Callable[[], None] | None = None
        self._pending = False

    def request(self) -> None:
        with self._lock:
            if self._action is None:
                self._pending = True
                return
            action = self._action
        action()

    def hand_to(self, action: Callable[[], None]) -> bool:
        """From now on ``action`` carries the requests out; True (and ``action`` called) when one came before."""
        with self._lock:
            self._action, pending, self._pending = action, self._pending, False
        if pending:
            action()
        return pending
