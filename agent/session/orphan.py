"""A card-session process never outlives its supervisor.

The card-session process runs in its own session (no controlling terminal: OpenSSL's UI fallback
must never ask for a PIN), so neither a terminal hang-up nor a signal to the agent's process group
reaches it; under systemd the unit's cgroup ends it only after TimeoutStopSec (KillMode=mixed: the
stop signal goes to the supervisor alone), and run by hand or from a desktop session a supervisor
that dies would leave it behind: logged in to the card, holding the card's key, and
while it is still starting (a slow ``C_Login``, an OCSP request about the card's certificate) not
reading the channel whose end of stream would tell it. This watch ends it instead, at any stage.

It watches the supervisor process itself, through a pidfd (Linux 5.3), which becomes readable
when the process ends, whichever thread started the card-session process.
``PR_SET_PDEATHSIG`` is not used: it fires when the *thread* that forked ends (prctl(2)), and the
supervisor starts card-session processes from short-lived sign-in threads.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("agent.session")
POLL_SECONDS = 0.5  # without pidfd_open (kernel < 5.3): how often the parent is looked at


class SupervisorWatch:
    """Calls ``on_gone`` (from its own thread) once the process ``supervisor_pid``, this process's
    parent, has ended; at once if it has ended already."""

    def __init__(self, supervisor_pid: int, session_directory: Path | None, on_gone: Callable[[], None]) -> None:
        self.supervisor_pid = supervisor_pid
        self.session_directory = session_directory
        self.on_gone = on_gone
        self._thread = threading.Thread(target=self._run, name="supervisor-watch", daemon=True)

    def start(self) -> SupervisorWatch:
        self._thread.start()
        return self

    def _run(self) -> None:
        pidfd = self._open_pidfd()
        try:
            if pidfd is not None:
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                while not poller.poll():
                    pass
            else:
                while self._parent_alive():
                    threading.Event().wait(POLL_SECONDS)
        finally:
            if pidfd is not None:
                os.close(pidfd)
        self._gone()

    def _open_pidfd(self) -> int | None:
        """A pidfd of the supervisor, or None (gone already: the caller finds it so; no pidfd_open)."""
        try:
            pidfd = os.pidfd_open(self.supervisor_pid)
        except ProcessLookupError:
            return None
        except (AttributeError, OSError):  # an old kernel: look at the parent every POLL_SECONDS
            return None
        # Opened first, then checked: while it is still our parent the pid cannot have been reused,
        # so the pidfd is the supervisor's.
        if not self._parent_alive():
            os.close(pidfd)
            return None
        return pidfd

    def _parent_alive(self) -> bool:
        return os.getppid() == self.supervisor_pid

    def _gone(self) -> None:
        log.warning("the agent (pid %d) has ended: this card session ends with it", self.supervisor_pid)
        self.remove_session_files()
        self.on_gone()

    def remove_session_files(self) -> None:
        """The session's files (certificate chain, key URI, OpenSSL configuration): the supervisor,
        which removes them when a session ends, cannot any more."""
        if self.session_directory is not None:
            shutil.rmtree(self.session_directory, ignore_errors=True)
