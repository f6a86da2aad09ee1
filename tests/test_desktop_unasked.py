"""What the clinician reads when something happens that she did not do, in a real desktop
(tests/desktop.py: Xvfb, a session D-Bus, dunst, pinentry-gtk-2, xdotool typing): a card session
that dies, a PIN dialog she did not open (it asks first, Cancel the default, so typing meant for
another window spends no try), a second card inserted while she types her PIN, notices left for
the next clinician, an empty PIN or a broken PIN window, and a card that says nothing of its tries.
The card is SoftHSM through the fault module, which counts C_Login calls.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from agent_runner import agent_status, card_session_pid, wait_for
from conftest import USER_PIN, ProvisionedPki, run_card_agent
from desktop import Desktop, TranscribedPinentry, desktop  # noqa: F401 - a pytest fixture
from fault_pkcs11 import FaultControl
from peers.ports import free_port
from peers.pynetdicom_scp import tls_scp
from test_desktop import DIALOG, HELPDESK, WRONG_PIN, clinician_agent, inserted, logins, screenshots, sign_in

BOB_DIALOG = "Sign in: Bob Example"
COUNT_LOW, FINAL_TRY = 0x10000, 0x20000  # CKF_USER_PIN_COUNT_LOW, CKF_USER_PIN_FINAL_TRY
CANCELLED = ("Sign-in cancelled", "No PIN try was used. To sign in, remove your card and insert it again.")
LOST = ("DICOM session ended unexpectedly",
        "Your DICOM connections were ended. To continue, choose Sign in again in the window that opens.")


def kill_card_session(agent_pid: int) -> None:
    """A crash, the OOM killer: the card-session process ends without being asked to."""
    worker = card_session_pid(agent_pid)
    assert worker is not None
    os.kill(worker, signal.SIGKILL)


def test_a_lost_session_is_told(test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path,
                                desktop: Desktop) -> None:
    card = inserted(tmp_path)
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with clinician_agent(test_pki, tmp_path, fault_module, card, desktop, pacs.port) as agent:
            sign_in(desktop, agent)
            desktop.wait_for_notification("Signed in as Alice Example")
            kill_card_session(agent.process.pid)
            assert desktop.wait_for_notification(LOST[0]) == LOST


def test_the_dialog_after_a_lost_session_asks_first_and_typing_spends_no_try(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, desktop: Desktop) -> None:
    """Alice types in her report when her card session dies: the window that opens grabs the
    keyboard, but asks first, and her words and Enter choose Cancel, not a PIN try."""
    card = inserted(tmp_path)
    pinentry = TranscribedPinentry(tmp_path)
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with clinician_agent(test_pki, tmp_path, fault_module, card, desktop, pacs.port,
                             settings={"pinentry": [str(pinentry.program)]}) as agent:
            sign_in(desktop, agent)
            kill_card_session(agent.process.pid)
            desktop.wait_for_window(DIALOG)
            desktop.screenshot(screenshots(tmp_path) / "pin-dialog-asks-first.png")
            desktop.type("normal findings")
            desktop.key("Return")
            desktop.wait_for_no_window(DIALOG)
            wait_for(lambda: any(outcome in agent.log() for outcome in (
                "not confirmed: nothing was sent to the card", "event=pin-failure", "event=sign-in-failed")), 20)
            assert len(logins(card)) == 1, "a PIN try was spent on words typed for another window"
            assert desktop.wait_for_notification(CANCELLED[0]) == CANCELLED
            status = agent_status(tmp_path / "agent", card.env())
            # As the notice says: re-inserting the card signs in, with a PIN dialog that asks nothing first.
            card.remove_card()
            time.sleep(0.3)
            card.insert_card()
            desktop.wait_for_window(DIALOG)
            desktop.type(USER_PIN)
            desktop.key("Return")
            wait_for(lambda: agent.log().count("event=sign-in ") == 2, timeout=20)
            # Lost again: "Sign in again" (Alt+S) goes on to the PIN.
            kill_card_session(agent.process.pid)
            desktop.wait_for_window(DIALOG)
            desktop.key("alt+s")
            time.sleep(0.5)
            desktop.type(USER_PIN)
            desktop.key("Return")
            desktop.wait_for_notification("Signed in as Alice Example", timeout=20)
    assert status["state"] == "card present, PIN entry cancelled: remove and re-insert the card to sign in again"
    question = "Your DICOM session ended unexpectedly. Sign in again as Alice Example?\n\nCancel uses no try."
    pin_dialog = "Alice Example, enter the PIN of your card to use Radiology PACS."
    # Inserted: the PIN dialog; lost: the question (cancelled); re-inserted; lost: the question, the PIN dialog.
    assert pinentry.said("SETDESC") == [pin_dialog, question, pin_dialog, question, pin_dialog]
    assert "_Sign in again" in pinentry.said("SETOK")
    assert len(logins(card)) == 3 and all("rv=0x0" in login for login in logins(card))


def test_a_session_lost_while_the_pin_is_typed_takes_no_keystroke(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, desktop: Desktop) -> None:
    """Alice is typing her PIN when the card-session process that reads her card dies. Her dialog
    closes and the next one asks first, so the rest of her PIN and her Enter choose Cancel."""
    card = inserted(tmp_path)
    pinentry = TranscribedPinentry(tmp_path)
    with clinician_agent(test_pki, tmp_path, fault_module, card, desktop, free_port(),
                         settings={"pinentry": [str(pinentry.program)]}) as agent:
        desktop.wait_for_window(DIALOG)
        desktop.type(USER_PIN[:2])
        kill_card_session(agent.process.pid)
        wait_for(lambda: len(pinentry.said("SETDESC")) == 2, timeout=15)
        desktop.wait_for_window(DIALOG)
        time.sleep(0.5)  # the new window takes the keyboard once drawn
        desktop.type(USER_PIN[2:])
        desktop.key("Return")
        desktop.wait_for_no_window(DIALOG)
        assert desktop.wait_for_notification(CANCELLED[0]) == CANCELLED
        status = agent_status(tmp_path / "agent", card.env())
    assert logins(card) == [], "the rest of Alice's PIN was tried on her card"
    assert status["state"] == "card present, PIN entry cancelled: remove and re-insert the card to sign in again"
    assert pinentry.said("SETDESC")[-1] == (
        "Your sign-in was interrupted: the DICOM session ended unexpectedly. Sign in as Alice Example?\n\n"
        "Cancel uses no try.")


def test_a_second_card_inserted_while_a_pin_is_typed_takes_no_keystroke_and_is_told(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, desktop: Desktop) -> None:
    """Alice is typing her PIN; Bob inserts his card in the other reader. Her dialog closes and she
    is told why; Bob's dialog asks first, so the rest of her PIN and her Enter choose Cancel."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.pin_retries(3)
    card.readers("alice", None)
    pinentry = TranscribedPinentry(tmp_path)
    with clinician_agent(test_pki, tmp_path, fault_module, card, desktop, free_port(),
                         settings={"pinentry": [str(pinentry.program)]}) as agent:
        desktop.wait_for_window(DIALOG)
        desktop.type(USER_PIN[:2])
        card.readers("alice", "bob")
        assert desktop.wait_for_notification("Sign-in cancelled: another card was inserted") == (
            "Sign-in cancelled: another card was inserted",
            "No PIN try was used. To sign in, remove your card and insert it again.")
        desktop.wait_for_window(BOB_DIALOG)
        desktop.type(USER_PIN[2:])
        desktop.key("Return")
        desktop.wait_for_no_window(BOB_DIALOG)
        assert desktop.wait_for_notification(CANCELLED[0]) == CANCELLED
        log = agent.log()
    assert logins(card) == [], "Alice's keystrokes were tried on a card"
    assert 'event=card-removed token="alice"' not in log, "Alice's card never left its reader"
    assert 'event=card-inserted token="bob"' in log and 'previous_token="alice"' in log
    assert pinentry.said("SETDESC")[-1] == (
        "This card was inserted while another card's PIN window was open. Sign in as Bob Example?\n\n"
        "Cancel uses no try.")


def test_a_cards_notices_leave_the_screen_with_it(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, desktop: Desktop) -> None:
    """Alice blocks her card and leaves; Bob sits down: nothing of hers is on his screen (dunst is
    set here to keep every notice until it is closed, as it keeps critical ones by default). A newer
    notice about the same card replaces the one on screen."""
    card = inserted(tmp_path, retries=2)
    with clinician_agent(test_pki, tmp_path, fault_module, card, desktop, free_port()) as agent:
        desktop.wait_for_window(DIALOG)
        desktop.type(WRONG_PIN)
        desktop.key("Return")
        agent.wait_for_log("event=pin-failure", timeout=20)
        card.remove_card()
        time.sleep(0.5)
        card.insert_card()
        desktop.wait_for_window(DIALOG)
        desktop.key("alt+u")
        time.sleep(0.5)
        desktop.type(WRONG_PIN)
        desktop.key("Return")
        agent.wait_for_log("the PIN is now locked", timeout=20)
        desktop.wait_until_displayed()  # "Card blocked: too many wrong PINs", critical
        card.remove_card()  # Alice leaves
        agent.wait_for_log('event=card-removed token="alice"')
        card.pin_retries(None)
        card.show("bob")
        card.insert_card()  # Bob sits down
        desktop.wait_for_window(BOB_DIALOG)
        assert desktop.on_screen() == [], "a previous clinician's notice is on the next one's screen"
        desktop.type(USER_PIN)
        desktop.key("Return")
        agent.wait_for_log('event=sign-in subject="CN=Bob Example', timeout=20)
        desktop.wait_until_displayed()
        run_card_agent("lock", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env(), check=True)
        agent.wait_for_log('event=sign-out reason="locked"')
        time.sleep(0.5)
        assert desktop.on_screen() == [("DICOM session locked", "Remove your card and insert it again to continue.")]


def test_an_empty_pin_is_not_blamed_on_the_card(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, desktop: Desktop) -> None:
    card = inserted(tmp_path)
    with clinician_agent(test_pki, tmp_path, fault_module, card, desktop, free_port()):
        desktop.wait_for_window(DIALOG)
        desktop.key("Return")  # Enter before any PIN is typed
        assert desktop.wait_for_notification("No PIN entered: no try was used") == (
            "No PIN entered: no try was used", "Remove your card and insert it again to sign in.")
        status = agent_status(tmp_path / "agent", card.env())
    assert status["state"] == "card present, not signed in: no PIN entered: nothing was sent to the card"
    assert logins(card) == []


def test_a_pin_window_that_fails_is_named_not_the_card(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, desktop: Desktop) -> None:
    card = inserted(tmp_path)
    with clinician_agent(test_pki, tmp_path, fault_module, card, desktop, free_port()) as agent:
        desktop.wait_for_window(DIALOG)
        found = subprocess.run(["pgrep", "-s", str(agent.process.pid), "-f", "pinentry-gtk-2"],
                               capture_output=True, text=True, check=True)
        os.kill(int(found.stdout.split()[0]), signal.SIGSEGV)  # the dialog program crashes
        assert desktop.wait_for_notification("Not signed in: the PIN window could not be used") == (
            "Not signed in: the PIN window could not be used",
            "No PIN try was used; nothing is wrong with your card. Remove your card and insert it again to "
            f"sign in. If it happens again, call {HELPDESK}.")
    assert logins(card) == []


def test_a_wrong_pin_on_a_card_that_tells_no_tries_promises_none(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, desktop: Desktop) -> None:
    """Many modules never set CKF_USER_PIN_COUNT_LOW or _FINAL_TRY: this card had one try left."""
    card = inserted(tmp_path, retries=2)
    card.token_flags(clear=COUNT_LOW | FINAL_TRY)
    with clinician_agent(test_pki, tmp_path, fault_module, card, desktop, free_port()):
        desktop.wait_for_window(DIALOG)
        desktop.type(WRONG_PIN)
        desktop.key("Return")
        assert desktop.wait_for_notification("Wrong PIN", timeout=20) == (
            "Wrong PIN", "The card did not say how many tries are left: type carefully. "
                         "Remove your card and insert it again to try again.")
