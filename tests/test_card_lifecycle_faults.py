"""The faults of a clinical day, against a running agent (SoftHSM through the fault module, a
pynetdicom TLS PACS, pinentry-tty on a pseudo-terminal where the clinician types): a card pulled
while the PIN dialog is open, SIGTERM and associations during the dialog, a card-session process
that dies. The agent must stay up, answer at once, and never spend a PIN try on its own."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_runner import (
    RunningAgent,
    agent_status,
    associate_rq,
    card_session_pid,
    running_agent,
    send_and_close,
    tunnel,
    wait_for,
)
from conftest import USER_PIN, ProvisionedPki
from dicom_card_agent.dicom.pdu import parse_associate_rj
from dicom_card_agent.lifecycle.machine import MAX_SESSION_LOSSES
from fault_pkcs11 import FaultControl
from peers.pynetdicom_scp import echo, tls_scp
from pin_dialog import PINENTRY_TTY, Terminal, pinentry_processes, terminal  # noqa: F401 - a pytest fixture
from test_stored_pin_after_login import when_the_login_waits


def logins(card: FaultControl) -> list[str]:
    return [line for line in card.log_lines() if line.startswith("C_Login")]


@contextlib.contextmanager
def agent_asking_for_the_pin(test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path,
                             terminal: Terminal) -> Iterator[tuple[FaultControl, RunningAgent]]:
    """alice's card in the reader, the agent in front of a TLS PACS, its PIN dialog open on ``terminal``."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], token="",
                           module=str(fault_module), env=card.env(), stdin=terminal.slave,
                           identity={"pin": f"pinentry:{PINENTRY_TTY}"}) as agent:
            terminal.wait_for_prompt()
            yield card, agent


def test_a_card_pulled_during_the_pin_dialog_closes_it_and_the_agent_carries_on(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, terminal: Terminal) -> None:
    with agent_asking_for_the_pin(test_pki, tmp_path, fault_module, terminal) as (card, agent):
        assert len(pinentry_processes(agent.process.pid)) == 1
        env = test_pki.env(**card.env())
        # The dialog is open (for 120 s unless answered): status and applications are answered at
        # once; `status` is timed with its own Python's start, a second or more on a busy machine.
        started = time.monotonic()
        assert agent_status(tmp_path / "agent", env)["state"] == "card present, PIN not yet entered"
        assert time.monotonic() - started < 10.0
        started = time.monotonic()
        answer = send_and_close(agent.port(), associate_rq())
        assert time.monotonic() - started < 2.0
        assert parse_associate_rj(answer).describe().startswith("rejected-transient")
        agent.wait_for_log("rejected: card present, PIN not yet entered")

        card.remove_card()
        pulled = time.monotonic()
        wait_for(lambda: not pinentry_processes(agent.process.pid), timeout=2)
        assert time.monotonic() - pulled < 1.0, "the PIN dialog stayed open after the card was pulled"
        terminal.type(USER_PIN.encode() + b"\r")  # typed into a dialog that is gone: nothing happens
        time.sleep(0.3)
        assert agent.process.poll() is None
        assert agent_status(tmp_path / "agent", env)["state"] == "no card inserted"
        assert logins(card) == []  # no PIN try was spent

        card.insert_card()
        terminal.wait_for_prompt(count=2)
        terminal.type(USER_PIN.encode() + b"\r")
        agent.wait_for_log('event=sign-in subject="CN=Alice Example')
        assert echo(agent.port())
        log = agent.log()
    assert len(logins(card)) == 1 and "rv=0x0" in logins(card)[0]  # one try, by the card-session process
    assert USER_PIN not in log


def test_sigterm_during_the_pin_dialog_stops_the_agent_within_a_second(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, terminal: Terminal) -> None:
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 104)], module=str(fault_module),
                       env=card.env(), stdin=terminal.slave, identity={"pin": f"pinentry:{PINENTRY_TTY}"}) as agent:
        terminal.wait_for_prompt()
        assert len(pinentry_processes(agent.process.pid)) == 1
        started = time.monotonic()
        agent.process.send_signal(signal.SIGTERM)
        status_code = agent.process.wait(5)
        stopped_in = time.monotonic() - started
        wait_for(lambda: not pinentry_processes(agent.process.pid), timeout=2)
    assert status_code == 0 and stopped_in < 1.0, f"stopped in {stopped_in:.2f} s with status {status_code}"
    assert logins(card) == []


def test_a_card_session_process_killed_during_the_pin_dialog_gives_a_new_dialog_at_once(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, terminal: Terminal) -> None:
    """The card-session process runs from insertion (it probes the card before the dialog). Killed
    while the dialog is open, the dialog closes and a new sign-in starts at once, with a new process
    and a new dialog, instead of the PIN going, once typed, to a process that is gone. The new
    dialog asks first (tests/test_desktop_unasked.py shows why), and "s" goes on to the PIN."""
    with agent_asking_for_the_pin(test_pki, tmp_path, fault_module, terminal) as (card, agent):
        first = card_session_pid(agent.process.pid)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: b"[sc]?" in terminal.screen, timeout=5)
        assert time.monotonic() - killed < 3.0
        terminal.type(b"s")
        terminal.wait_for_prompt(count=2, timeout=5)
        second = card_session_pid(agent.process.pid)
        assert second is not None and second != first
        assert len(pinentry_processes(agent.process.pid)) == 1
        assert agent_status(tmp_path / "agent", test_pki.env(**card.env()))["state"] == \
            "card present, PIN not yet entered"
        terminal.type(USER_PIN.encode() + b"\r")
        agent.wait_for_log('event=sign-in subject="CN=Alice Example')
        assert echo(agent.port())
        log = agent.log()
    assert "the card-session process was killed by SIGKILL while the PIN was asked for" in log
    assert len(logins(card)) == 1  # the one try, by the second process


def test_a_killed_card_session_is_noticed_and_signed_in_again_then_not_looped(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], module=str(fault_module),
                           env=card.env(), audit={"file": str(tmp_path / "audit.log")}) as agent:
            env = test_pki.env(**card.env())
            assert echo(agent.port())
            for loss in range(1, MAX_SESSION_LOSSES + 1):
                worker = card_session_pid(agent.process.pid)
                assert worker is not None
                os.kill(worker, signal.SIGKILL)
                killed = time.monotonic()
                agent.wait_for_log("event=sign-out reason=\"the card-session process was killed by SIGKILL\"")
                noticed = agent.log().count("card-session process was killed by SIGKILL")
                assert noticed >= loss
                if loss < MAX_SESSION_LOSSES:
                    wait_for(lambda loss=loss: agent.log().count('event=sign-in subject="CN=Alice Example') == loss + 1)
                    assert time.monotonic() - killed < 3.0
                    assert echo(agent.port())
            assert agent.process.poll() is None
            state = agent_status(tmp_path / "agent", env)["state"]
            assert not echo(agent.port())
            log = agent.log()
    assert state == (f"card present, the card session ended unexpectedly {MAX_SESSION_LOSSES} times: remove and "
                     "re-insert the card to sign in again"), state
    assert log.count("card session of CN=Alice Example,O=Example Hospital Test PKI lost") == MAX_SESSION_LOSSES
    audit = (tmp_path / "audit.log").read_text()
    assert audit.count("the card-session process was killed by SIGKILL") >= MAX_SESSION_LOSSES


def test_a_module_crashing_while_the_card_is_read_is_tried_three_times_then_waits_for_re_insertion(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    """A PKCS#11 module that crashes every time it reads this card (the fault module aborts in
    C_FindObjectsInit, which only the card-session process's probe calls: a fake, as no real part
    crashes on demand). Each crash is a loss and a new process reads the card again, at most
    MAX_SESSION_LOSSES times for one insertion; then the agent waits for re-insertion, says why,
    and never asked for or sent a PIN. Re-inserted, once the module no longer crashes, it signs in."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    card.crash_in("C_FindObjectsInit")
    waiting = (f"card present, the card session ended unexpectedly {MAX_SESSION_LOSSES} times: remove and "
               "re-insert the card to sign in again")
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], module=str(fault_module),
                           env=card.env()) as agent:
            env = test_pki.env(**card.env())
            wait_for(lambda: agent_status(tmp_path / "agent", env)["state"] == waiting, timeout=30)
            time.sleep(1.0)  # no further attempt follows
            crashes = [line for line in card.log_lines() if line.startswith("crash in C_FindObjectsInit")]
            log_when_waiting = agent.log()
            assert not echo(agent.port())
            card.crash_in(None)
            card.remove_card()
            wait_for(lambda: agent_status(tmp_path / "agent", env)["state"] == "no card inserted")
            card.insert_card()
            agent.wait_for_log('event=sign-in subject="CN=Alice Example', timeout=30)
            assert echo(agent.port())
            assert agent.process.poll() is None
    assert len(crashes) == MAX_SESSION_LOSSES, crashes
    assert log_when_waiting.count("the card-session process was killed by SIGABRT while it read the card") \
        == MAX_SESSION_LOSSES, log_when_waiting
    assert "event=sign-in-failed" not in log_when_waiting and "event=sign-in " not in log_when_waiting
    assert len(logins(card)) == 1, logins(card)


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody reaped yet has ended: it holds no card, no file)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def session_files(runtime_dir: Path) -> list[Path]:
    """The card sessions' files in the runtime directory (chain, key URI, OpenSSL configuration)."""
    return sorted(p for directory in runtime_dir.glob("session-*") for p in directory.iterdir())


@pytest.mark.parametrize("stage", ["stuck in C_Login", "signed in"])
def test_a_card_session_process_ends_with_a_killed_supervisor_and_removes_the_card_files(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, stage: str) -> None:
    """Run by hand or from a desktop session (no systemd cgroup), a card-session process started in
    its own session must not outlive a supervisor killed with SIGKILL, at any stage of its life: still
    logging in on a slow card (the fault module's C_Login waits 60 s) or signed in."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    card.remove_card()  # inserted once the agent is ready: a sign-in at start-up comes before "ready"
    if stage == "stuck in C_Login":
        card.login_delay(60_000)
    runtime_dir = tmp_path / "agent" / "run"
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], module=str(fault_module),
                           env=card.env()) as agent:
            card.insert_card()
            if stage == "stuck in C_Login":
                wait_for(lambda: any(line.startswith("login-delay ms=60000") for line in card.log_lines()))
            else:
                agent.wait_for_log('event=sign-in subject="CN=Alice Example')
            worker = card_session_pid(agent.process.pid)
            assert worker is not None, agent.log()
            files = session_files(runtime_dir)
            assert {p.name for p in files} >= {"chain.pem", "key.pem", "openssl.cnf"}, files
            os.kill(agent.process.pid, signal.SIGKILL)
            killed = time.monotonic()
            agent.process.wait(5)
            try:
                wait_for(lambda: not process_alive(worker), timeout=10)
            finally:
                if process_alive(worker):  # the old code: it would have stayed, logged in (no leftovers)
                    os.kill(worker, signal.SIGKILL)
            ended_in = time.monotonic() - killed
            log = agent.log()
    assert ended_in < 5.0, f"the card-session process ended {ended_in:.1f} s after its supervisor"
    assert session_files(runtime_dir) == [], log
    if stage == "stuck in C_Login":
        assert f"the agent (pid {agent.process.pid}) has ended: this card session ends with it" in log, log
        assert [line for line in logins(card) if "rv=" in line] == []  # it never got to try the PIN
    else:  # the end of the channel or the watch, whichever is first
        assert ("card session ending: the agent went away" in log
                or f"the agent (pid {agent.process.pid}) has ended" in log), log


def test_a_card_reset_as_its_session_starts_signs_in_again(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    """The card took the PIN, then lost its login before the card session had started (reset, or
    pulled and put back, between the login and the session's first use of it; on the virtual-CAC
    stack, pcscd restarted then). The start failed as a sign-in that failed, and the agent waited
    for the card to be pulled and put back; now it is a lost session's start, and the card signs in
    again (here with the stored PIN, which the card took). The fault module stands for the card:
    the reset is timed within C_Login, which it slows down."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    card.login_delay(3000)

    def reset() -> None:
        card.bounce()
        card.login_delay(None)

    armed = when_the_login_waits(card, reset)
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 9)], module=str(fault_module),
                       env=card.env()) as agent:
        armed.join()
        log = agent.wait_for_log('event=sign-in subject="CN=Alice Example', timeout=30)
    logins = [line for line in card.log_lines() if line.startswith("C_Login")]
    assert len(logins) == 2 and all("rv=0x0 " in line for line in logins), logins
    assert ("the card-session process could not start: the PKCS#11 module failed with SessionHandleInvalid: its "
            "login was lost (the card was pulled and put back, reset, or its reader restarted): SessionHandleInvalid; "
            "the card signs in again") in log, log
    assert "event=sign-in-failed" not in log and "event=card-removed" not in log, log
    assert "Traceback" not in log, log  # python-pkcs11's finalizer on the dead session is not printed


def test_a_card_pulled_and_put_back_between_two_looks_signs_in_again(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    """Pulled and put back between two looks of the card loop, the card looks the same (label and
    serial), but its login is gone: the card session stayed "signed in" and every full handshake
    failed with "EVP lib" until the card was pulled again. The first handshake the card cannot sign
    now ends the session as a lost one, and the card signs in again (the PIN here comes from the
    environment; a dialog asks for it otherwise). The fault module stands for the card: a pull and
    re-insertion within one look cannot be timed with a real reader."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port, session_resumption=False)],
                           module=str(fault_module), env=card.env(),
                           audit={"file": str(tmp_path / "audit.log")}) as agent:
            assert echo(agent.port())
            card.bounce()  # pulled and put back: the card loop's next look sees the same card
            refused = echo(agent.port())
            agent.wait_for_log('event=sign-out reason="the card no longer signs: its login was lost (the card was '
                               'pulled and put back, reset, or its reader restarted): SessionHandleInvalid"')
            wait_for(lambda: agent.log().count('event=sign-in subject="CN=Alice Example') == 2)
            assert echo(agent.port())
            log = agent.log()
    assert not refused
    assert "card-agent[session]: ERROR: the card no longer signs: its login was lost (the card was pulled and put " \
           "back, reset, or its reader restarted): SessionHandleInvalid; the card session ends" in log
    assert "the card did not sign the TLS handshake: its login was lost" in log
    assert "Traceback" not in log  # python-pkcs11's finalizer on the dead session is not printed
    assert log.count("event=card-removed") == 0  # the card loop never saw it go
