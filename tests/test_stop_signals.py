"""Stopping the agent while an association is open, as systemd stops it: the audit trail keeps the
association's end and its instances, and the card is not signed in again during the stop.

systemd's default KillMode=control-group (a unit without KillMode=mixed, which the shipped unit now
sets) sends SIGTERM to every process of the unit at once, the card-session process included. No
systemd runs as PID 1 here: the tests send the signals it sends, to the real processes. Real agent,
SoftHSM identity, a real pynetdicom PACS over TLS, 8 real C-STOREs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import subprocess
import termios
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pynetdicom.association import Association

from agent_runner import (
    RunningAgent,
    agent_status,
    card_session_pid,
    log_lines,
    port_of,
    running_agent,
    tunnel,
    wait_for,
    write_config,
)
from conftest import CARD_AGENT, USER_PIN, ProvisionedPki
from peers.pynetdicom_scp import associate, tls_scp
from peers.study import make_study, sop_instance_uid

SUBJECT = "CN=Alice Example,O=Example Hospital Test PKI"


def audit_events(audit_file: Path) -> list[tuple[str, str, str]]:
    """(EventID, EventTypeCode or "", EventOutcomeDescription or "") of each record, in order."""
    events = []
    for line in audit_file.read_bytes().splitlines():
        identification = ET.fromstring(line).find("EventIdentification")
        event_type = identification.find("EventTypeCode")
        events.append((identification.find("EventID").get("csd-code"),
                       event_type.get("csd-code") if event_type is not None else "",
                       identification.findtext("EventOutcomeDescription") or ""))
    return events


def instances_recorded(audit_file: Path) -> list[str]:
    """The SOP Instance UIDs the DICOM Instances Transferred (110104) records name, sorted, each as
    often as it is named."""
    found = []
    for line in audit_file.read_bytes().splitlines():
        message = ET.fromstring(line)
        if message.find("EventIdentification/EventID").get("csd-code") == "110104":
            found += [instance.get("UID") for instance in message.iter("Instance")]
    return sorted(found)


@dataclass
class HeldAssociation:
    agent: RunningAgent
    pacs: Any  # peers.pynetdicom_scp's PACS: what it received
    association: Association
    study: list[Path]
    datasets: list[Dataset]
    audit_file: Path


@contextlib.contextmanager
def association_held(test_pki: ProvisionedPki, tmp_path: Path, files: int) -> Iterator[HeldAssociation]:
    """A signed-in agent, its audit trail in a file, with a tunnel to a pynetdicom TLS PACS and an
    association open through it for the SOP classes of a study of ``files`` instances."""
    study = make_study(tmp_path / "study", files=files)
    datasets = [dcmread(path) for path in study]
    audit_file = tmp_path / "audit.log"
    with tls_scp(pki_dir=test_pki.pki) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)],
                          audit={"file": str(audit_file)}) as agent:
        agent.wait_for_log('event=sign-in subject="CN=Alice Example')
        association = associate(agent.port(), sop_classes=sorted({ds.SOPClassUID for ds in datasets}))
        assert association.is_established
        yield HeldAssociation(agent, pacs, association, study, datasets, audit_file)


@pytest.mark.parametrize(("stop_signal", "signalled"), [
    (signal.SIGTERM, "the agent"),
    (signal.SIGTERM, "every process of the unit"),
    # Ctrl-\ on the terminal the agent runs in, or `kill -QUIT`: its default action ended the agent
    # at once, with neither the association's end nor the Logout and Application Stop recorded.
    (signal.SIGQUIT, "the agent"),
], ids=["SIGTERM-agent", "SIGTERM-unit", "SIGQUIT-agent"])
def test_a_stop_with_an_association_open_records_its_end_and_signs_in_nobody(
        test_pki: ProvisionedPki, tmp_path: Path, stop_signal: signal.Signals, signalled: str) -> None:
    with association_held(test_pki, tmp_path, files=8) as held:
        agent, pacs, study, audit_file = held.agent, held.pacs, held.study, held.audit_file
        statuses = [held.association.send_c_store(ds) for ds in held.datasets]
        assert [status.Status for status in statuses] == [0] * 8
        worker = card_session_pid(agent.process.pid)
        assert worker is not None
        # What `systemctl --user stop` sends: to the main process (KillMode=mixed), or to every
        # process of the unit at the same moment (KillMode=control-group, the default).
        os.kill(agent.process.pid, stop_signal)
        if signalled == "every process of the unit":
            os.kill(worker, stop_signal)
        assert agent.process.wait(20) == 0
        log = agent.log()
    stopped = log_lines(log)[next(i for i, line in enumerate(log_lines(log)) if line == "card-agent: INFO: stopping"):]
    assert not [line for line in stopped if "card session started" in line or "event=sign-in " in line
                or "lost:" in line], log
    assert log.count("event=sign-in ") == 1
    # The instances go in one message per half second of answers (agent/tunnel/transfers.py): on a
    # loaded host the 8 stores take longer, and come in two. That each is recorded once, instances_recorded says.
    recorded = audit_events(audit_file)
    events = [event for previous, event in zip([None, *recorded], recorded, strict=False)
              if event[0] != "110104" or previous is None or previous[0] != "110104"]
    assert events == [
        ("110100", "110120", ""),  # Application Start
        ("110114", "110122", ""),  # Login
        ("ASSOCIATION", "ASSOCIATION-BEGIN", ""),
        ("110104", "", ""),  # the 8 instances stored
        ("ASSOCIATION", "ASSOCIATION-END", "card session ended: the agent is stopping"),
        ("110114", "110123", "the agent is stopping"),  # Logout
        ("110100", "110121", stop_signal.name),  # Application Stop
    ], events
    assert instances_recorded(audit_file) == sorted(sop_instance_uid(path) for path in study)
    assert len(pacs.received) == 8


# Each of these ended the process it was sent to (their default action); none means anything to the agent.
MEANINGLESS_SIGNALS = [signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF,
                       signal.SIGIO, signal.SIGPWR, signal.SIGSTKFLT]


def test_a_signal_that_means_nothing_to_the_agent_is_logged_and_ends_neither_it_nor_its_card_session(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """`kill -USR1` (other daemons' habit: reopen the logs) or `pkill -USR2 -f card-agent` mid-shift
    ended the agent, or its card session, at once: the clinician's association cut, its end and the
    Application Stop missing from the audit trail. Each is now logged by the agent and ignored by
    both; the association open meanwhile goes on."""
    with association_held(test_pki, tmp_path, files=2) as held:
        agent, pacs, study, audit_file = held.agent, held.pacs, held.study, held.audit_file
        assert held.association.send_c_store(held.datasets[0]).Status == 0
        worker = card_session_pid(agent.process.pid)
        assert worker is not None
        for signum in MEANINGLESS_SIGNALS:
            os.kill(agent.process.pid, signum)
            os.kill(worker, signum)
        wait_for(lambda: all(f"WARNING: {signum.name} ignored" in agent.log() for signum in MEANINGLESS_SIGNALS))
        assert held.association.send_c_store(held.datasets[1]).Status == 0
        held.association.release()
        assert card_session_pid(agent.process.pid) == worker
        os.kill(agent.process.pid, signal.SIGTERM)
        assert agent.process.wait(20) == 0
        log = agent.log()
    assert ("card-agent: WARNING: SIGUSR1 ignored: it means nothing to card-agent (SIGHUP reloads its "
            "configuration; SIGTERM, SIGINT and SIGQUIT stop it)\n") in log, log
    assert log.count(" ignored: it means nothing to card-agent") == len(MEANINGLESS_SIGNALS), log
    assert len(pacs.received) == 2
    assert audit_events(audit_file)[-3:] == [
        ("ASSOCIATION", "ASSOCIATION-END", ""),
        ("110114", "110123", "the agent is stopping"),  # Logout
        ("110100", "110121", "SIGTERM"),  # Application Stop
    ]
    assert instances_recorded(audit_file) == sorted(sop_instance_uid(path) for path in study)


def test_a_card_session_lost_as_the_agent_stops_is_not_signed_in_again(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The card-session process dies (SIGKILL: the OOM killer, a crash) just as the agent is told
    to stop. A loss while signed in asks for a new sign-in; during a stop, it used to log in to the
    card once more, with no Login record, only to log out at once."""
    audit_file = tmp_path / "audit.log"
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 104)], audit={"file": str(audit_file)}) as agent:
        agent.wait_for_log('event=sign-in subject="CN=Alice Example')
        worker = card_session_pid(agent.process.pid)
        assert worker is not None
        os.kill(worker, signal.SIGKILL)
        os.kill(agent.process.pid, signal.SIGTERM)
        assert agent.process.wait(20) == 0
        log = agent.log()
    assert log.count("card session started (pid") == 1, log
    assert log.count("event=sign-in ") == 1, log
    logins = [event for event in audit_events(audit_file) if event[:2] == ("110114", "110122")]
    assert len(logins) == 1
    # The loop may notice the loss before it sees the stop, or end the session as it stops.
    logout, stop = audit_events(audit_file)[-2:]
    assert logout in {("110114", "110123", "the card-session process was killed by SIGKILL"),
                      ("110114", "110123", "the agent is stopping")}
    assert stop == ("110100", "110121", "SIGTERM")


@pytest.mark.parametrize("burst", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_burst_of_signals_never_wedges_the_agent(test_pki: ProvisionedPki, tmp_path: Path,
                                                   burst: signal.Signals) -> None:
    """A signal that came while the handler of the one before was setting its event (`timeout`
    sends SIGTERM to the agent and to its group, an administrator presses Ctrl-C twice, two
    `systemctl reload`): the handler ran again inside the first, waited for the lock the first one
    held, and the agent answered no signal any more, its tunnels open. Found with `timeout`."""
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 104)]) as agent:
        agent.wait_for_log('event=sign-in subject="CN=Alice Example')
        # SIGHUP: 2 s of reload requests. SIGTERM: until the agent says it stops (one that comes as the
        # interpreter ends, its handlers gone, ends it as SIGTERM's default does: -15).
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and "card-agent: INFO: stopping" not in agent.log():
            for _ in range(100):
                os.kill(agent.process.pid, burst)
        if burst == signal.SIGHUP:
            assert agent_status(tmp_path / "agent", test_pki.env())["state"] == "signed in"
            os.kill(agent.process.pid, signal.SIGTERM)
        assert agent.process.wait(20) == 0, agent.log()[-3000:]
        log = agent.log()
    assert "card-agent: INFO: stopping" in log


def test_closing_the_terminal_the_agent_runs_in_stops_it(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """A terminal window closed hangs its terminal up, and the shell passes the SIGHUP on to its jobs.
    The agent took it for a reload and went on without the terminal: signed in, unable to ask for a
    PIN there or to show its log, while the clinician who closed the window believed it had stopped.
    It now stops as the terminal's other programs do; a SIGHUP while the terminal is there reloads
    (test_reload.py, the PIN-dialog tests run the agent on a terminal)."""
    window, terminal = os.openpty()  # no thread reads it: a read under way would keep it from closing
    audit_file = tmp_path / "audit.log"
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 9)], stdin=terminal,
                       audit={"file": str(audit_file)}) as agent:
        os.close(terminal)
        agent.wait_for_log('event=sign-in subject="CN=Alice Example')
        os.close(window)  # the window closed: the terminal hangs up
        agent.process.send_signal(signal.SIGHUP)  # as the shell passes it on
        agent.process.wait(30)
        log = agent.log()
    assert agent.process.returncode == 0, log
    assert "card-agent: INFO: SIGHUP: the terminal the agent was started from was closed: stopping\n" in log, log
    assert 'event=sign-out reason="the agent is stopping"' in log, log
    assert "reloaded" not in log, log
    assert audit_events(audit_file)[-1] == ("110100", "110121", "SIGHUP: the terminal it was started from was closed")


def test_a_stop_while_a_reload_waits_for_the_card_session_changes_nothing_and_says_so(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """A reload waits for the card session to take the new tunnels (up to its start timeout when that
    process is stopped or starved). A stop then closed the listeners under it, and the reload went
    on to put its new socket into service in the closed selector: `internal error (ValueError: I/O
    operation on closed epoll object)` and its traceback in the log of an agent that stopped as asked."""
    first, added = tunnel("first", 9), tunnel("added", 9)
    with running_agent(test_pki, tmp_path / "agent", [first]) as agent:
        agent.wait_for_log('event=sign-in subject="CN=Alice Example')
        config = tmp_path / "agent" / "agent.toml"
        session = card_session_pid(agent.process.pid)
        assert session is not None
        os.kill(session, signal.SIGSTOP)  # the reload waits for its answer
        try:
            write_config(config, test_pki, [first, added])
            agent.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while not listening(port_of(added)):  # opened: the reload now waits for the card session
                assert time.monotonic() < deadline, agent.log()
                time.sleep(0.02)
            agent.process.send_signal(signal.SIGTERM)
            assert agent.process.wait(30) == 0, agent.log()
        finally:
            with contextlib.suppress(ProcessLookupError):  # the stop ended it, stopped as it was
                os.kill(session, signal.SIGCONT)
        log = agent.log()
    assert f"card-agent: INFO: SIGHUP: configuration {config} not put into effect: the agent is stopping\n" in log, log
    assert "internal error" not in log and "Traceback" not in log, log
    assert not listening(port_of(added))


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return False
    return True


def test_an_agent_suspended_with_ctrl_z_in_bash_is_locked_and_stops_when_its_window_is_closed(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """A real interactive bash on a pseudo-terminal: the agent signed in, in the foreground; Ctrl-Z
    locks its session and suspends it (bash: "Stopped"); the window closed, bash continues its
    stopped job and ends it (the hang-up passed on, or SIGTERM as bash itself exits), and the agent
    stops as its terminal's programs do, its stop audited."""
    (tmp_path / "agent").mkdir()
    audit_file, log_path = tmp_path / "audit.log", tmp_path / "agent.log"
    config = write_config(tmp_path / "agent" / "agent.toml", test_pki, [tunnel("pacs", 104)],
                          audit={"file": str(audit_file)})
    window, terminal = os.openpty()
    bash = subprocess.Popen(["bash", "--norc", "--noprofile", "-i"], stdin=terminal, stdout=terminal,
                            stderr=terminal, env={**test_pki.env(CARD_PIN=USER_PIN), "PS1": "$ ", "TERM": "dumb"},
                            start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(terminal)
    shown = bytearray()
    try:
        # Typed once bash shows its prompt: a line typed while it still sets up the terminal may be
        # discarded with the modes it changes.
        wait_for(lambda: _read_into(shown, window) and shown.endswith(b"$ "), timeout=30)
        os.write(window, f"{CARD_AGENT} run --config {config} 2>{log_path}\n".encode())
        wait_for(lambda: log_path.exists() and 'event=sign-in subject="CN=Alice Example' in log_path.read_text(),
                 timeout=30)
        os.write(window, b"\x1a")  # Ctrl-Z
        wait_for(lambda: _read_into(shown, window) and b"Stopped" in shown, timeout=10)
        [agent] = map(int, Path(f"/proc/{bash.pid}/task/{bash.pid}/children").read_text().split())  # bash's job
        os.close(window)  # the window closed: the terminal hangs up
        wait_for(lambda: not Path(f"/proc/{agent}").exists(), timeout=20)
    finally:
        with contextlib.suppress(OSError):
            os.close(window)
        bash.kill()
        bash.wait(10)
    log = log_path.read_text()
    assert 'event=sign-out reason="locked"' in log, log
    assert "card-agent: INFO: stopping\n" in log, log
    # Which of bash's two ways to end its stopped job comes first is a race within bash: the hang-up
    # passed on (SIGHUP, with SIGCONT), or its own exit at the terminal's end, which terminates
    # stopped jobs (SIGTERM, with SIGCONT). Either is a clean stop, audited with its cause.
    logout, application_stop = audit_events(audit_file)[-2:]
    assert logout == ("110114", "110123", "locked")  # at the Ctrl-Z
    assert application_stop in {("110100", "110121", "SIGHUP: the terminal it was started from was closed"),
                                ("110100", "110121", "SIGTERM")}, application_stop
    if application_stop[2] == "SIGTERM":
        assert "SIGHUP: the terminal the agent was started from was closed" not in log, log
    else:
        assert "card-agent: INFO: SIGHUP: the terminal the agent was started from was closed: stopping\n" in log, log


def _read_into(shown: bytearray, window: int) -> bool:
    """What the terminal shows, read into ``shown`` as far as it has come; True once anything has."""
    while select.select([window], [], [], 0.05)[0]:
        try:
            shown += os.read(window, 4096)
        except OSError:  # the terminal hung up
            break
    return bool(shown)

