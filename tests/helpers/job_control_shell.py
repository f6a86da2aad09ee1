"""A shell's job control for one command, as bash does it for ``COMMAND &``: run from a process whose
stdin is a terminal, it takes that terminal as its controlling terminal (it is started as a session
leader, like a login shell), keeps the terminal's foreground for itself, and starts COMMAND in a
process group of its own, in the background.

    job_control_shell.py COMMAND [ARG...]
    job_control_shell.py --shell-ended COMMAND [ARG...]

SIGUSR1 is the shell's ``fg``: the terminal's foreground goes to the job, which is continued.
SIGUSR2 is what the shell does once Ctrl-Z (typed on the terminal) has stopped the job, then ``bg``:
it takes the terminal back with its own modes (echo on, as a shell leaves it to the commands it
runs) and continues the job in the background.
SIGTERM and SIGINT are passed on to the job as ``kill %1`` does (with SIGCONT, since a stopped job
takes no other signal). It exits with the job's exit status once the job has ended.

With ``--shell-ended``, COMMAND runs as a job left behind by a shell that has ended (a launcher
script that ran it with ``&``): in the background of the terminal, and no process of the session can
bring it forward (an orphaned process group). This process becomes COMMAND, as the session's
leader; a child of it keeps the terminal's foreground until COMMAND ends.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
import termios
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def main() -> int:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    if sys.argv[1] == "--shell-ended":
        leave_behind(sys.argv[2:])
    shell = os.getpid()
    job = os.fork()
    if job == 0:
        os.setpgid(0, 0)
        # The job ends with this process, however it ends: a fault here (an exception) left the
        # agent running after its test, in a group no test's stop reaches.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != shell:
            os._exit(1)
        os.execvp(sys.argv[1], sys.argv[1:])
    try:
        os.setpgid(job, job)  # as a shell does too: whichever of the two runs first, the job is in its group
    except PermissionError:  # the job ran first, and has exec'd already: in its group
        pass

    def foreground(*_: object) -> None:
        os.tcsetpgrp(0, job)
        os.killpg(job, signal.SIGCONT)

    def pass_on(number: int, _: object) -> None:
        os.kill(job, number)
        os.killpg(job, signal.SIGCONT)

    def background(*_: object) -> None:
        os.tcsetpgrp(0, os.getpgrp())
        modes = termios.tcgetattr(0)
        modes[3] |= termios.ECHO
        termios.tcsetattr(0, termios.TCSANOW, modes)
        os.killpg(job, signal.SIGCONT)

    signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # the shell gives its terminal away from the background, too
    signal.signal(signal.SIGUSR1, foreground)
    signal.signal(signal.SIGUSR2, background)
    signal.signal(signal.SIGTERM, pass_on)
    signal.signal(signal.SIGINT, pass_on)
    _, status = os.waitpid(job, 0)
    return os.waitstatus_to_exitcode(status)


def leave_behind(command: list[str]) -> None:
    leader = os.getpid()
    foreground = os.fork()
    if foreground == 0:
        os.setpgid(0, 0)
        while os.getppid() == leader:  # until COMMAND ends
            time.sleep(0.2)
        os._exit(0)
    os.setpgid(foreground, foreground)
    os.tcsetpgrp(0, foreground)
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
