"""The faults of a clinical day, against a running agent (SoftHSM through the fault module, a
pynetdicom TLS PACS, pinentry-tty on a pseudo-terminal where the clinician types): a card pulled
while the PIN dialog is open, SIGTERM and associations during the dialog, a card-session process
that dies. The agent must stay up, answer at once, and never spend a PIN try on its own."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from agent_runner import agent_status, associate_rq, card_session_pid, running_agent, send_and_close, tunnel, wait_for
from conftest import USER_PIN, ProvisionedPki
from dicom_card_agent.dicom.pdu import parse_associate_rj
from dicom_card_agent.lifecycle.machine import MAX_SESSION_LOSSES
from fault_pkcs11 import FaultControl
from peers.pynetdicom_scp import echo, tls_scp
from pin_dialog import PINENTRY_TTY, Terminal, pinentry_processes, terminal  # noqa: F401 - a pytest fixture


def logins(card: FaultControl) -> list[str]:
    return [line for line in card.log_lines() if line.startswith("C_Login")]


def test_a_card_pulled_during_the_pin_dialog_closes_it_and_the_agent_carries_on(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, terminal: Terminal) -> None:
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], token="",
                           module=str(fault_module), env=card.env(), stdin=terminal.slave,
                           identity={"pin": f"pinentry:{PINENTRY_TTY}"}) as agent:
            terminal.wait_for_prompt()
            assert len(pinentry_processes(agent.process.pid)) == 1
            env = test_pki.env(**card.env())
            # The dialog is open: status and applications are answered at once.
            started = time.monotonic()
            assert agent_status(tmp_path / "agent", env)["state"] == "card present, PIN not yet entered"
            answer = send_and_close(agent.port(), associate_rq())
            assert time.monotonic() - started < 3.0
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
