"""The card-session process's watch on its supervisor (agent/session/orphan.py), with real
processes: a parent killed with SIGKILL, and a parent gone before the watch began. The whole agent
is tested in test_card_lifecycle_faults.py (a card-session process stuck in C_Login)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent_runner import wait_for
from conftest import ProvisionedPki
from test_card_lifecycle_faults import process_alive

# Stands in for the card-session process: watches the pid it is given, exits 7 when it has gone.
WATCHER = """
import os, sys, time
from pathlib import Path
from dicom_card_agent.session.orphan import SupervisorWatch
SupervisorWatch(int(sys.argv[1]), Path(sys.argv[2]), lambda: os._exit(7)).start()
print("watching", flush=True)
time.sleep(60)
"""
# Stands in for the supervisor: starts the watcher in a session of its own, as the agent does.
PARENT = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2]], start_new_session=True,
                         stdout=subprocess.PIPE, text=True)
child.stdout.readline()
print(child.pid, flush=True)
time.sleep(60)
"""


def session_directory(tmp_path: Path) -> Path:
    directory = tmp_path / "session-x"
    directory.mkdir()
    (directory / "chain.pem").write_text("public, but the card's\n")
    return directory


def test_a_watcher_ends_and_removes_the_session_files_when_its_parent_is_killed(tmp_path: Path) -> None:
    directory = session_directory(tmp_path)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, WATCHER, str(directory)], stdout=subprocess.PIPE,
                              text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        time.sleep(0.3)
        assert process_alive(child) and directory.exists()  # the parent is there: it keeps watching
        parent.kill()
        parent.wait()
        killed = time.monotonic()
        wait_for(lambda: not process_alive(child), timeout=5)
        assert time.monotonic() - killed < 1.0
        assert not directory.exists()
    finally:
        if process_alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_watcher_whose_parent_is_not_the_pid_given_ends_at_once(tmp_path: Path) -> None:
    """The supervisor died before the watch began: the process was given to init (or a subreaper)."""
    directory = session_directory(tmp_path)
    not_the_parent = os.getppid()  # alive, but not the watcher's parent
    watcher = subprocess.run([sys.executable, "-c", WATCHER, str(not_the_parent), str(directory)],
                             capture_output=True, text=True, timeout=10)
    assert watcher.returncode == 7, watcher.stderr
    assert not directory.exists()


def test_an_agent_removes_the_session_files_a_killed_agent_left(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """Both processes killed with SIGKILL leave their session's files (nothing removes them): the
    next agent on that runtime directory removes them, and says so, before it signs anyone in."""
    from agent_runner import running_agent, tunnel

    run = tmp_path / "agent" / "run"  # agent_runner's runtime_dir
    left = run / "session-left1234"
    left.mkdir(parents=True, mode=0o700)
    run.chmod(0o700)
    (left / "openssl.cnf").write_text("# the killed session's\n")
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 104)]) as agent:
        log = agent.wait_for_log("event=sign-in ")
        sessions = [p.name for p in run.glob("session-*")]
    assert not left.exists()
    assert (f"card-agent: WARNING: removed {left}: the files of a card session whose agent ended without "
            "removing them") in log, log
    assert len(sessions) == 1 and sessions != [left.name], sessions  # the new session's own
