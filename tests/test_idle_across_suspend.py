"""The idle lock counts the time the workstation was suspended.

Linux's CLOCK_MONOTONIC (``time.monotonic()``) stops during a suspend; CLOCK_BOOTTIME goes on. The
agent measured idle time with the first, so a laptop closed for 8 hours came back with the session
still signed in for whatever idle time was left. It now measures it with CLOCK_BOOTTIME
(agent/clock.py), in both of its processes.

A real suspend cannot be made in a test container, and libfaketime cannot stand in for one: it fakes
CLOCK_BOOTTIME together with CLOCK_MONOTONIC, or neither (``DONT_FAKE_MONOTONIC=1`` leaves both
alone and moves only the wall clock). The stand-in here: both agent processes are stopped (SIGSTOP)
for longer than ``idle_timeout``, during which every clock goes on, as CLOCK_BOOTTIME does during a
suspend; before they run again, their ``time.monotonic()`` is set back by the length of the stop (a
``sitecustomize`` on their PYTHONPATH), as a suspend leaves CLOCK_MONOTONIC. That fake is the one
part not real: what a suspend does to CLOCK_MONOTONIC, which no test can do to the kernel's clock.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from agent_runner import agent_status, card_session_pid, decided_at, running_agent, stop_process, tunnel, wait_for
from conftest import ProvisionedPki
from dicom_card_agent.clock import awake_or_asleep
from peers.pynetdicom_scp import echo, tls_scp

IDLE_TIMEOUT = 10
# time.monotonic() minus the seconds in $SUSPENDED_SECONDS_FILE: what a suspend of that length leaves
# CLOCK_MONOTONIC at. Read again at most every 0.1 s (a file read per call would slow the agent down).
MONOTONIC_AS_AFTER_A_SUSPEND = '''
import os, time
_path = os.environ.get("SUSPENDED_SECONDS_FILE")
if _path:
    _real, _read = time.monotonic, {"at": -1.0, "seconds": 0.0}
    def _suspended():
        now = _real()
        if now - _read["at"] > 0.1:
            try:
                with open(_path) as file:
                    _read["seconds"] = float(file.read().strip() or 0)
            except (OSError, ValueError):
                pass
            _read["at"] = now
        return _read["seconds"]
    time.monotonic = lambda: _real() - _suspended()
'''


def test_the_helper_reads_the_clock_that_counts_a_suspend() -> None:
    assert abs(awake_or_asleep() - time.clock_gettime(time.CLOCK_BOOTTIME)) < 0.5


def test_the_idle_lock_counts_the_time_the_workstation_was_suspended(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    site = tmp_path / "as-after-a-suspend"
    site.mkdir()
    (site / "sitecustomize.py").write_text(MONOTONIC_AS_AFTER_A_SUSPEND)
    suspended = tmp_path / "suspended-seconds"
    suspended.write_text("0\n")
    env = {"PYTHONPATH": str(site), "SUSPENDED_SECONDS_FILE": str(suspended)}
    with tls_scp(pki_dir=test_pki.pki) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], env=env,
                          agent={"idle_timeout": IDLE_TIMEOUT}) as agent:
        agent.wait_for_log('event=sign-in subject="CN=Alice Example')
        assert echo(agent.port())  # the clinician's last association before the lid closes
        supervisor = agent.process.pid
        worker = card_session_pid(supervisor)
        stopped_at = time.monotonic()
        stop_process(worker)
        stop_process(supervisor)
        time.sleep(IDLE_TIMEOUT + 2)  # "the lid is closed"
        suspended.write_text(f"{time.monotonic() - stopped_at:.3f}\n")  # CLOCK_MONOTONIC did not count it
        os.kill(supervisor, signal.SIGCONT)
        os.kill(worker, signal.SIGCONT)
        resumed = time.time()
        # Ending the session takes its own time (up to supervisor.END_TIMEOUT_SECONDS on a busy
        # machine) before the sign-out line: what counts is when the lock was decided, that line's
        # time less the closed_in_ms it reports. Without the fix it comes a whole idle_timeout later.
        log = agent.wait_for_log('event=sign-out reason="idle timeout"', timeout=3 * IDLE_TIMEOUT)
        locked_after = decided_at(log, 'event=sign-out reason="idle timeout"') - resumed
        state = agent_status(tmp_path / "agent", test_pki.env())["state"]
        wait_for(lambda: not echo(agent.port()), timeout=5)
    assert locked_after < IDLE_TIMEOUT / 2, f"locked {locked_after:.1f} s after the workstation woke up"
    assert state == f"locked after {IDLE_TIMEOUT} s without activity: remove and re-insert the card"
    assert [association.peer_subject for association in pacs.associations][:1] == [
        "CN=Alice Example,O=Example Hospital Test PKI"]
    assert len(pacs.associations) == 1, "an association went through after the suspend"

