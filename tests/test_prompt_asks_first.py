"""The ``prompt`` PIN source (the PIN typed on the terminal the agent runs in) asks first where the
PIN dialog does: a sign-in the clinician did not start by inserting her card.

Before, after a lost card session the terminal showed the PIN prompt at once, and what she was
typing there went to the card as a PIN try. The agent runs with a real pseudo-terminal as its
controlling terminal (where the PIN prompt and the question read and write); the card is SoftHSM through
the fault module, which counts C_Login calls.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from agent_runner import agent_status, card_session_pid, running_agent, tunnel, wait_for
from conftest import USER_PIN, ProvisionedPki
from fault_pkcs11 import FaultControl
from peers.ports import free_port
from pin_dialog import Terminal, terminal  # noqa: F401 - a pytest fixture

QUESTION = ("Your DICOM session ended unexpectedly. Sign in again as Alice Example?\r\n\r\nCancel uses no try.\r\n"
            "Sign in again? [y/N] ")
PIN_PROMPT = b"PIN: "
PIN_PENDING, SIGNING_IN = "card present, PIN not yet entered", "card present, signing in"
CANCELLED = "card present, PIN entry cancelled: remove and re-insert the card to sign in again"
# The agent's stdin (the pseudo-terminal) becomes its controlling terminal, as in a login shell:
# running_agent starts it as a session leader; this execs the agent in the same process.
ON_ITS_TERMINAL = [sys.executable, "-c", "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                   "os.execvp(sys.argv[1], sys.argv[1:])"]


def logins(card: FaultControl) -> list[str]:
    return [line for line in card.log_lines() if line.startswith("C_Login")]


def test_the_prompt_asks_before_a_pin_nobody_asked_for_and_typing_spends_no_try(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, terminal: Terminal) -> None:
    card = FaultControl(tmp_path / "reader.ctl")
    card.pin_retries(3)
    card.show("alice")
    env = test_pki.env(**card.env())

    def signed_in(count: int) -> bool:
        return agent.log().count('event=sign-in subject="CN=Alice Example') == count

    def lose_the_card_session() -> None:  # a crash, the OOM killer
        worker = card_session_pid(agent.process.pid)
        assert worker is not None
        os.kill(worker, signal.SIGKILL)

    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", free_port())], token="",
                       module=str(fault_module), env=card.env(), stdin=terminal.slave, prefix=ON_ITS_TERMINAL,
                       identity={"pin": "prompt"}) as agent:
        # Inserted (present at start): the PIN prompt at once.
        wait_for(lambda: PIN_PROMPT in terminal.screen, timeout=20)
        terminal.type(USER_PIN.encode() + b"\r")
        wait_for(lambda: signed_in(1), timeout=20)
        inserted = terminal.screen

        # Lost: the question, default no; her report's words and Enter are no PIN.
        shown = len(terminal.screen)
        lose_the_card_session()
        wait_for(lambda: any(asked in terminal.screen[shown:] for asked in (b"[y/N] ", PIN_PROMPT)), timeout=20)
        terminal.type(b"1234\r")
        wait_for(lambda: agent_status(tmp_path / "agent", env)["state"] not in (PIN_PENDING, SIGNING_IN), timeout=10)
        declined = terminal.screen[shown:]
        assert len(logins(card)) == 1, f"what she typed went to the card as a PIN: {declined!r}"
        assert agent_status(tmp_path / "agent", env)["state"] == CANCELLED

        # As the status says: re-inserted, the PIN prompt at once.
        shown = len(terminal.screen)
        card.remove_card()
        agent.wait_for_log("event=card-removed")
        card.insert_card()
        wait_for(lambda: PIN_PROMPT in terminal.screen[shown:], timeout=20)
        terminal.type(USER_PIN.encode() + b"\r")
        wait_for(lambda: signed_in(2), timeout=20)
        re_inserted = terminal.screen[shown:]

        # Lost again: "y" goes on to the PIN.
        shown = len(terminal.screen)
        lose_the_card_session()
        wait_for(lambda: b"[y/N] " in terminal.screen[shown:], timeout=20)
        terminal.type(b"y\r")
        wait_for(lambda: PIN_PROMPT in terminal.screen[shown:], timeout=10)
        terminal.type(USER_PIN.encode() + b"\r")
        wait_for(lambda: signed_in(3), timeout=20)
        log = agent.log()
    assert b"[y/N]" not in inserted and b"[y/N]" not in re_inserted
    assert QUESTION.encode() in declined, declined
    assert PIN_PROMPT not in declined, f"a PIN was asked for: {declined!r}"
    assert "not confirmed: nothing was sent to the card" in log
    assert len(logins(card)) == 3 and all("rv=0x0" in login for login in logins(card)), logins(card)
    assert "event=pin-failure" not in log and USER_PIN not in log


NOTHING_TYPED = {
    # Ctrl-D: the terminal's Cancel. It ended the sign-in as a failure: `ERROR: sign-in to 'alice'
    # ... failed: EOFError: `, audited with that reason.
    b"\x04": (CANCELLED, "card-agent: WARNING: PIN entry cancelled (Ctrl-D): nothing was sent to the card\n"),
    # Enter alone: an empty PIN, as the dialog's. It said "no PIN entered" without the rest, and the
    # desktop notice was the one for a card that cannot be used.
    b"\r": ("card present, not signed in: no PIN entered: nothing was sent to the card",
             "failed: no PIN entered: nothing was sent to the card\n"),
}


@pytest.mark.parametrize("keys", list(NOTHING_TYPED), ids=["ctrl-d", "enter"])
def test_nothing_typed_at_the_pin_prompt_ends_the_sign_in_as_in_the_dialog(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, terminal: Terminal, keys: bytes) -> None:
    """How a person at a terminal says "not now" or types nothing: as the PIN dialog's Cancel and
    empty PIN. Nothing goes to the card; the card waits for re-insertion."""
    state, line = NOTHING_TYPED[keys]
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    env = test_pki.env(**card.env())
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", free_port())], token="",
                       module=str(fault_module), env=card.env(), stdin=terminal.slave, prefix=ON_ITS_TERMINAL,
                       identity={"pin": "prompt"}) as agent:
        wait_for(lambda: PIN_PROMPT in terminal.screen, timeout=20)
        terminal.type(keys)
        wait_for(lambda: agent_status(tmp_path / "agent", env)["state"] == state, timeout=10)
        log = agent.log()
    assert line in log, log
    assert "EOFError" not in log, log
    assert logins(card) == []
