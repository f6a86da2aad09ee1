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
"""

from __future__ import annotations

import signal
import sys


def main() -> None:
    # Before the command line is parsed, `run` is found where click finds it: the first argument
    # (no option of the top level takes a value).
    if sys.argv[1:2] == ["run"]:
        from dicom_card_agent.service.signals import IGNORED_SIGNALS

        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, *IGNORED_SIGNALS})
    from dicom_card_agent.cli.main import main as command_line

    command_line()
