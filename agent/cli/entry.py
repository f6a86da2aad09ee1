"""The ``card-agent`` executable's first code: what must come before anything is imported.

``card-agent run`` acts on SIGHUP (a reload) only once its signal handling is set up, after the
command line's and the agent's imports and the configuration's reading: about half a second of
CPU, longer on a loaded machine. A SIGHUP in that time (configuration management that writes the
file and signals every agent, one of which is just starting) took its default action and ended the
agent. It is blocked here instead, before the first import that takes time, and stays pending until
``run`` unblocks it with its handler in place (agent/cli/run.py), which then reads the configuration
again once the agent is ready. The signals the agent ignores (agent/service/signals.py) are held
the same way: their default action ends the process too. The other commands keep the defaults: a
terminal's hang-up ends them.

Standard input, output and error are made to exist first: a launcher that closed them (`2>&-`, an
autostart or cron entry started with them closed) had the agent's first files take their numbers,
and the signal handling's pipe became its standard error: whatever a library or a child process
wrote there was read as signals (a byte 2 a SIGINT, a stop; 1 a SIGHUP), and the log went nowhere.
"""

from __future__ import annotations

import io
import os
import signal
import sys


def main() -> None:
    _open_standard_descriptors()
    # Before the command line is parsed, `run` is found where click finds it: the first argument
    # (no option of the top level takes a value).
    if sys.argv[1:2] == ["run"]:
        from dicom_card_agent.service.signals import IGNORED_SIGNALS

        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, *IGNORED_SIGNALS})
    from dicom_card_agent.cli.main import main as command_line

    command_line()


def _open_standard_descriptors() -> None:
    """Descriptors 0, 1 and 2 that are closed are opened on /dev/null (inherited by the processes
    the agent starts), and Python's streams for them, which it leaves as None, made on them."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDWR)  # the lowest number free: ``fd``, those below being open
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        os.set_inheritable(fd, True)
        if getattr(sys, name) is None:
            setattr(sys, name, io.open(fd, "r" if fd == 0 else "w", closefd=False, errors="backslashreplace"))
