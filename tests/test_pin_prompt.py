"""The ``prompt`` PIN source (the PIN typed on the terminal the agent runs in), when the terminal is
not simply there and waiting: a card pulled while its prompt is shown, an agent in the background of
its shell.

The agent runs with a real pseudo-terminal as its controlling terminal; the card is SoftHSM through
the fault module, which counts C_Login calls and stands in for the card's removal and insertion.
"""

from __future__ import annotations

import os
import signal
import sys
import termios
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agent_runner import RunningAgent, agent_status, running_agent, stat_fields, tunnel, wait_for
from conftest import HELPERS, USER_PIN, ProvisionedPki
from fault_pkcs11 import FaultControl
from peers.ports import free_port
from peers.pynetdicom_scp import associate, tls_scp
from pin_dialog import Terminal, pinentry_processes, terminal  # noqa: F401 - a pytest fixture
from test_prompt_asks_first import CANCELLED, ON_ITS_TERMINAL, PIN_PROMPT, logins

PIN_PENDING = "card present, PIN not yet entered"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# `card-agent run &` in an interactive shell: the agent in a process group of its own, in the
# background of the terminal; the shell (this helper) gives it the terminal on SIGUSR1, as `fg`.
IN_THE_BACKGROUND = [sys.executable, str(HELPERS / "job_control_shell.py")]


def echo_is_on(terminal: Terminal) -> bool:
    return bool(termios.tcgetattr(terminal.slave)[3] & termios.ECHO)


def signed_in(log: str, count: int = 1) -> bool:
    return log.count('event=sign-in subject="CN=Alice Example') == count


@contextmanager
def agent_asking_on(terminal: Terminal, test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, *,
                    pin: str = "prompt", prefix: list[str] = ON_ITS_TERMINAL,
                    tunnels: list[dict[str, Any]] | None = None,
                    **config: Any) -> Iterator[tuple[RunningAgent, FaultControl]]:
    """The agent, alice's card in its reader (the fault module, which counts C_Login calls), the PIN
    asked on ``terminal``: its controlling terminal, started there as ``prefix`` says. ``tunnels``:
    one, "pacs", unless given."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    with running_agent(test_pki, tmp_path / "agent", tunnels or [tunnel("pacs", free_port())], token="",
                       module=str(fault_module), env=card.env(), stdin=terminal.slave, prefix=prefix,
                       identity={"pin": pin}, **config) as agent:
        yield agent, card


def state(test_pki: ProvisionedPki, tmp_path: Path, card: FaultControl) -> str:
    return str(agent_status(tmp_path / "agent", test_pki.env(**card.env()))["state"])


def test_a_card_pulled_at_the_pin_prompt_gives_the_terminal_back_and_the_next_prompt_takes_the_pin(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, terminal: Terminal) -> None:
    """The prompt of a card that left goes with it. Before, getpass went on reading, with echo off:
    the terminal stayed silent for whatever was typed next, and once the card was back, the line
    typed at its prompt could go to the prompt that was given up (no sign-in), and that one, ending,
    turned echo back on under the new prompt: the PIN typed again showed on the screen."""
    with agent_asking_on(terminal, test_pki, tmp_path, fault_module) as (agent, card):
        wait_for(lambda: PIN_PROMPT in terminal.screen, timeout=20)
        assert not echo_is_on(terminal)
        card.remove_card()
        agent.wait_for_log("event=card-removed")
        wait_for(lambda: echo_is_on(terminal), timeout=5)

        shown = len(terminal.screen)
        card.insert_card()
        wait_for(lambda: PIN_PROMPT in terminal.screen[shown:], timeout=20)
        terminal.type(USER_PIN.encode() + b"\r")
        wait_for(lambda: signed_in(agent.log()), timeout=20)
        wait_for(lambda: echo_is_on(terminal), timeout=5)
        log = agent.log()
    assert USER_PIN.encode() not in terminal.screen
    assert len(logins(card)) == 1 and "rv=0x0" in logins(card)[0], logins(card)
    assert USER_PIN not in log


# What waits on the terminal, by PIN source: the agent's own prompt, and pinentry-tty's dialog.
ON_THE_TERMINAL = {"prompt": "the PIN prompt", "pinentry:/usr/bin/pinentry-tty": "the PIN dialog"}


@pytest.mark.parametrize("pin", list(ON_THE_TERMINAL))
def test_an_agent_in_the_background_of_its_shell_answers_meanwhile_and_asks_once_brought_to_the_foreground(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, terminal: Terminal, pin: str) -> None:
    """`card-agent run &`: the PIN prompt (or pinentry-tty's dialog) waits for `fg`, and says so in
    the log and on the terminal, while the agent answers `status` and the card's removal. Before,
    the terminal's echo turned off from the background stopped the whole job (SIGTTOU): the agent
    answered nothing until someone typed `fg`."""
    with agent_asking_on(terminal, test_pki, tmp_path, fault_module, pin=pin,
                         prefix=IN_THE_BACKGROUND) as (agent, card):
        agent.wait_for_log("bring it to the foreground")
        assert state(test_pki, tmp_path, card) == PIN_PENDING
        card.remove_card()
        wait_for(lambda: state(test_pki, tmp_path, card) == "no card inserted", timeout=10)
        card.insert_card()
        wait_for(lambda: agent.log().count("bring it to the foreground") == 2, timeout=20)
        assert PIN_PROMPT not in terminal.screen

        os.kill(agent.process.pid, signal.SIGUSR1)  # fg
        wait_for(lambda: PIN_PROMPT in terminal.screen, timeout=20)
        terminal.type(USER_PIN.encode() + b"\r")
        wait_for(lambda: signed_in(agent.log()), timeout=20)
        log = agent.log()
    assert log.count("bring it to the foreground") == 2, log  # once per insertion
    waits = (f"{ON_THE_TERMINAL[pin]} for Alice Example waits: the agent runs in the background of its terminal, "
             "where nothing can be typed to it; bring it to the foreground (fg) to answer it")
    assert f"card-agent: WARNING: {waits}\n" in log, log
    # On the terminal too (the log goes to a file here): the person at it is who can type `fg`.
    assert terminal.screen.count(f"\r\ncard-agent: {waits}\r\n".encode()) == 2, terminal.screen
    assert USER_PIN.encode() not in terminal.screen
    assert len(logins(card)) == 1 and "rv=0x0" in logins(card)[0], logins(card)


def test_an_agent_left_in_the_background_by_a_shell_that_ended_says_the_prompt_cannot_be_shown(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, terminal: Terminal) -> None:
    """A launcher script that ran `card-agent run &` and ended: nothing can bring the agent to the
    foreground. The sign-in ends at once with what to do, and no PIN goes anywhere. Before, it ended
    with "the terminal the PIN was asked on is gone (Input/output error)", while the terminal was there."""
    with agent_asking_on(terminal, test_pki, tmp_path, fault_module,
                         prefix=[*IN_THE_BACKGROUND, "--shell-ended"]) as (agent, card):
        wait_for(lambda: state(test_pki, tmp_path, card) != PIN_PENDING, timeout=20)
        status = state(test_pki, tmp_path, card)
        log = agent.log()
    assert status == (
        "card present, not signed in: the PIN prompt for Alice Example cannot be shown: the agent runs in the "
        "background of its terminal, and no shell can bring it to the foreground (the one that started it has "
        "ended): nothing was sent to the card. Run the agent in the foreground of a terminal, or use "
        "pin = \"pinentry\""), status
    assert PIN_PROMPT not in terminal.screen
    assert "bring it to the foreground (fg)" not in log, log
    assert logins(card) == []


def job_stopped(shell: int) -> bool:
    """Whether the job of the job-control shell ``shell`` is stopped (Ctrl-Z)."""
    job = Path(f"/proc/{shell}/task/{shell}/children").read_text().split()[0]
    return stat_fields(job)[0] == "T"


@pytest.mark.parametrize("pin", list(ON_THE_TERMINAL))
def test_a_prompt_the_clinician_sent_away_with_ctrl_z_and_bg_asks_again_with_echo_off_once_back(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, terminal: Terminal, pin: str) -> None:
    """Ctrl-Z at the PIN prompt (or pinentry-tty's), then `bg`: the shell has the terminal, with
    echo on. The agent goes on serving, waits for `fg` again, then asks again with echo off.
    Before, the prompt's read went on where it was, with the shell's modes: the prompt was not shown
    again, and the PIN showed; pinentry-tty's read from the background stopped the whole agent
    again (SIGTTIN) until `fg`."""
    with agent_asking_on(terminal, test_pki, tmp_path, fault_module, pin=pin,
                         prefix=IN_THE_BACKGROUND) as (agent, card):
        shell = agent.process.pid
        agent.wait_for_log("bring it to the foreground")
        os.kill(shell, signal.SIGUSR1)  # fg
        wait_for(lambda: PIN_PROMPT in terminal.screen, timeout=20)

        terminal.type(b"\x1a")  # Ctrl-Z
        wait_for(lambda: job_stopped(shell), timeout=10)
        os.kill(shell, signal.SIGUSR2)  # the shell takes the terminal back, echo on; bg
        wait_for(lambda: agent.log().count(f"{ON_THE_TERMINAL[pin]} for Alice Example waits") == 2, timeout=20)
        assert state(test_pki, tmp_path, card) == PIN_PENDING
        assert echo_is_on(terminal)

        os.kill(shell, signal.SIGUSR1)  # fg
        wait_for(lambda: terminal.screen.count(PIN_PROMPT) == 2, timeout=20)
        assert not echo_is_on(terminal)
        terminal.type(USER_PIN.encode() + b"\r")
        wait_for(lambda: signed_in(agent.log()), timeout=20)
        wait_for(lambda: echo_is_on(terminal), timeout=5)
    assert USER_PIN.encode() not in terminal.screen
    assert len(logins(card)) == 1 and "rv=0x0" in logins(card)[0], logins(card)


@pytest.mark.parametrize("pin", list(ON_THE_TERMINAL))
@pytest.mark.parametrize("stop", ["ctrl-c", "ctrl-backslash", "sigterm"])
def test_an_agent_stopped_at_its_pin_prompt_gives_the_terminal_back_with_echo_on(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, terminal: Terminal, stop: str, pin: str) -> None:
    """Ctrl-C or Ctrl-\\ at the prompt (or `kill`): the agent stops, and the shell the clinician
    returns to shows what she types. Before, the process ended with the prompt's thread still
    reading, echo off; Ctrl-\\ (SIGQUIT) ended it at once, echo off, the stop not audited."""
    audit_file = tmp_path / "audit.log"
    with agent_asking_on(terminal, test_pki, tmp_path, fault_module, pin=pin,
                         audit={"file": str(audit_file)}) as (agent, card):
        wait_for(lambda: PIN_PROMPT in terminal.screen and not echo_is_on(terminal), timeout=20)
        if stop == "sigterm":
            os.kill(agent.process.pid, signal.SIGTERM)
        else:
            terminal.type({"ctrl-c": b"\x03", "ctrl-backslash": b"\x1c"}[stop])
        assert agent.process.wait(20) == 0
        log = agent.log()
    assert echo_is_on(terminal)
    assert "card-agent: INFO: stopping" in log, log
    assert logins(card) == []
    application_stop = ET.fromstring(audit_file.read_bytes().splitlines()[-1]).find("EventIdentification")
    assert application_stop.find("EventTypeCode").get("csd-code") == "110121"
    assert application_stop.findtext("EventOutcomeDescription") == {
        "ctrl-c": "SIGINT", "ctrl-backslash": "SIGQUIT", "sigterm": "SIGTERM"}[stop]


def test_what_the_prompt_writes_on_the_terminal_cannot_drive_it(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, terminal: Terminal) -> None:
    """Text the agent writes on the terminal comes from elsewhere (a certificate's name, the site
    label): a control character in it is shown escaped, never sent to the terminal to act on (here
    ESC [2J, which clears the screen)."""
    with agent_asking_on(terminal, test_pki, tmp_path, fault_module,
                         desktop={"site_label": "Radiology\x1b[2J PACS"}):
        wait_for(lambda: PIN_PROMPT in terminal.screen, timeout=20)
    assert b"use Radiology\\x1b[2J PACS." in terminal.screen, terminal.screen
    assert b"\x1b" not in terminal.screen, terminal.screen


def test_a_terminal_closed_at_the_pin_prompt_ends_the_sign_in_as_a_cancel_and_the_agent_stops(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    """The terminal window closed while the prompt waits: the agent stops (its terminal hung up),
    and the prompt ends as a Cancel would, nothing sent to the card. Before, the sign-in failed
    with `OSError: [Errno 5] Input/output error`, logged as an error and audited as a failed
    sign-in, as the agent stopped."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    window, terminal = os.openpty()  # read here, by no thread: a read under way would keep it from closing
    shown = b""
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", free_port())], token="",
                       module=str(fault_module), env=card.env(), stdin=terminal, prefix=ON_ITS_TERMINAL,
                       identity={"pin": "prompt"}) as agent:
        os.close(terminal)
        deadline = time.monotonic() + 20
        while PIN_PROMPT not in shown:
            assert time.monotonic() < deadline, shown
            shown += os.read(window, 4096)
        os.close(window)  # the window closed: the terminal hangs up
        assert agent.process.wait(30) == 0
        log = agent.log()
    assert "card-agent: INFO: SIGHUP: the terminal the agent was started from was closed: stopping\n" in log, log
    assert "ERROR" not in log and "OSError" not in log and "sign-in-failed" not in log, log
    assert logins(card) == []


@pytest.mark.parametrize("pin", list(ON_THE_TERMINAL))
def test_an_agent_with_many_tunnels_names_a_few_in_its_pin_prompt_and_signs_in(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, terminal: Terminal, pin: str) -> None:
    """With no [desktop] site_label, the PIN dialog says what the PIN is for by the tunnels' names.
    45 of them made a description too long for pinentry's line: the program ended and every sign-in
    failed as `the pinentry program ... exited (no display or terminal?)`."""
    tunnels = [tunnel(f"radiology-hospital-{n:02d}", 9) for n in range(45)]
    with agent_asking_on(terminal, test_pki, tmp_path, fault_module, pin=pin, tunnels=tunnels) as (agent, card):
        wait_for(lambda: PIN_PROMPT in terminal.screen, timeout=20)
        terminal.type(USER_PIN.encode() + b"\r")
        wait_for(lambda: signed_in(agent.log()), timeout=20)
        log = agent.log()
    assert (b"Alice Example, enter the PIN of your card to use the DICOM connections radiology-hospital-00, "
            b"radiology-hospital-01, radiology-hospital-02, radiology-hospital-03 and 41 more.") in terminal.screen
    assert "shortened" not in log and "ERROR" not in log, log
    assert len(logins(card)) == 1 and "rv=0x0" in logins(card)[0], logins(card)


def test_a_pin_dialog_killed_while_it_asks_is_a_dialog_closed_unanswered(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, terminal: Terminal) -> None:
    """`pkill pinentry` (a clinician's way with a dialog she thinks stuck), the OOM killer: the
    sign-in failed as an ERROR, `the pinentry program ... exited (no display or terminal?)`, which
    sent the administrator after a display that was there. It ends as a Cancel does, saying what
    ended it; re-inserting the card asks again."""
    with agent_asking_on(terminal, test_pki, tmp_path, fault_module, pin="pinentry:/usr/bin/pinentry-tty") as (
            agent, card):
        wait_for(lambda: PIN_PROMPT in terminal.screen, timeout=20)
        [dialog_program] = pinentry_processes(parent=agent.process.pid)
        os.kill(dialog_program, signal.SIGTERM)
        wait_for(lambda: state(test_pki, tmp_path, card) == CANCELLED, timeout=10)
        card.remove_card()
        wait_for(lambda: state(test_pki, tmp_path, card) == "no card inserted", timeout=10)
        card.insert_card()
        wait_for(lambda: terminal.screen.count(PIN_PROMPT) == 2, timeout=20)
        terminal.type(USER_PIN.encode() + b"\r")
        wait_for(lambda: signed_in(agent.log()), timeout=20)
        log = agent.log()
    ended = "the PIN dialog (/usr/bin/pinentry-tty) was ended by SIGTERM: nothing was sent to the card"
    assert f"card-agent: WARNING: {ended}\n" in log, log
    assert "ERROR" not in log and "no display" not in log, log
    assert len(logins(card)) == 1 and "rv=0x0" in logins(card)[0], logins(card)



def test_ctrl_z_on_a_signed_in_agent_locks_its_session_before_it_is_suspended(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, terminal: Terminal) -> None:
    """Ctrl-Z on the agent signed in at its terminal suspended the supervisor only: the card-session
    process, in a session of its own, relayed the open association on, and the suspended agent saw
    no card pulled. A clinician who pressed Ctrl-Z by mistake, pulled her card and left, left her
    association to the next person at the workstation. The session is now locked first."""
    with tls_scp(pki_dir=test_pki.pki) as pacs, \
            agent_asking_on(terminal, test_pki, tmp_path, fault_module, prefix=IN_THE_BACKGROUND,
                            tunnels=[tunnel("pacs", pacs.port)]) as (agent, card):
        shell = agent.process.pid
        agent.wait_for_log("bring it to the foreground")
        os.kill(shell, signal.SIGUSR1)  # fg
        wait_for(lambda: PIN_PROMPT in terminal.screen, timeout=20)
        terminal.type(USER_PIN.encode() + b"\r")
        wait_for(lambda: signed_in(agent.log()), timeout=20)
        held = associate(agent.port(), sop_classes=[SECONDARY_CAPTURE])
        assert held.is_established

        terminal.type(b"\x1a")  # Ctrl-Z
        wait_for(lambda: job_stopped(shell), timeout=10)
        card.remove_card()  # and she leaves
        wait_for(lambda: not held.is_established, timeout=10)
        log = agent.log()

        os.kill(shell, signal.SIGUSR1)  # fg: back, locked; her card again signs her in again
        wait_for(lambda: state(test_pki, tmp_path, card) == "no card inserted", timeout=10)
        card.insert_card()
        wait_for(lambda: terminal.screen.count(PIN_PROMPT) == 2, timeout=20)
        terminal.type(USER_PIN.encode() + b"\r")
        wait_for(lambda: signed_in(agent.log(), count=2), timeout=20)
    suspended = ("card-agent: WARNING: SIGTSTP (Ctrl-Z): the session of CN=Alice Example,O=Example Hospital Test "
                 "PKI is locked before the agent is suspended: suspended, it would not see the card pulled. Bring it "
                 "back (fg), then remove and re-insert the card to sign in again\n")
    assert suspended in log, log
    assert 'event=sign-out reason="locked"' in log, log
    assert len(pacs.received) == 0
