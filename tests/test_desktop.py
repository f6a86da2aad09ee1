"""What the clinician sees, in a real desktop (tests/desktop.py: Xvfb, a session D-Bus, dunst,
pinentry-gtk-2, xdotool typing): the PIN dialog names the person, typing the PIN signs in, the final
try is confirmed in the dialog, Cancel spends no try, and each event of the day arrives at the
notification server in plain words. The card is SoftHSM through the fault module, which counts
C_Login calls and emulates the card's retry counter; the PACS is the pynetdicom TLS peer.

Screenshots of the dialog and of notifications are taken here; with CARD_AGENT_SCREENSHOTS=DIR
(scripts/screenshots) they are written there, for docs/images and docs/clinician-guide.md.
"""

from __future__ import annotations

import configparser
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent_runner import RunningAgent, agent_status, associate_rq, running_agent, send_and_close, tunnel, wait_for
from conftest import CARD_AGENT, USER_PIN, ProvisionedPki, run_card_agent
from desktop import PINENTRY_GTK, Desktop, desktop  # noqa: F401 - a pytest fixture
from fault_pkcs11 import FaultControl
from peers.pki_files import TlsServerFiles
from peers.ports import free_port
from peers.pynetdicom_scp import echo, tls_scp
from pin_dialog import Terminal, terminal  # noqa: F401 - a pytest fixture

REPOSITORY = Path(__file__).resolve().parent.parent
LOCK_ENTRY = REPOSITORY / "desktop" / "dicom-card-agent-lock.desktop"
SITE = "Radiology PACS"
HELPDESK = "the IT service desk (extension 4444)"
DIALOG = "Sign in: Alice Example"  # the PIN dialog's title names the clinician, never a DN
WRONG_PIN = "999999"


def screenshots(tmp_path: Path) -> Path:
    chosen = os.environ.get("CARD_AGENT_SCREENSHOTS")
    return Path(chosen) if chosen else tmp_path / "screenshots"


def logins(card: FaultControl) -> list[str]:
    return [line for line in card.log_lines() if line.startswith("C_Login")]


@contextmanager
def clinician_agent(test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, card: FaultControl,
                    desktop: Desktop, pacs_port: int, *, identity: dict[str, Any] | None = None,
                    settings: dict[str, Any] | None = None, **config: Any) -> Iterator[RunningAgent]:
    """The agent as a clinician's desktop session runs it: PIN through the graphical pinentry."""
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs_port)], token="",
                       module=str(fault_module), env={**card.env(), **desktop.env()},
                       identity={"pin": "pinentry", **(identity or {})},
                       desktop={"site_label": SITE, "helpdesk": HELPDESK, "pinentry": [PINENTRY_GTK],
                                **(settings or {})}, **config) as agent:
        yield agent


def inserted(tmp_path: Path, retries: int | None = 3) -> FaultControl:
    card = FaultControl(tmp_path / "reader.ctl")
    card.pin_retries(retries)
    card.show("alice")
    return card


def sign_in(desktop: Desktop, agent: RunningAgent, pin: str = USER_PIN) -> None:
    desktop.wait_for_window(DIALOG)
    desktop.type(pin)
    desktop.key("Return")
    agent.wait_for_log('event=sign-in subject="CN=Alice Example', timeout=20)


def test_the_dialog_names_the_clinician_typing_signs_in_and_a_pull_is_told(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, desktop: Desktop) -> None:
    card = inserted(tmp_path)
    shots = screenshots(tmp_path)
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with clinician_agent(test_pki, tmp_path, fault_module, card, desktop, pacs.port) as agent:
            desktop.wait_for_window(DIALOG)
            desktop.screenshot(shots / "pin-dialog.png")
            desktop.type(USER_PIN)
            desktop.key("Return")
            assert desktop.wait_for_notification("Signed in as Alice Example") == (
                "Signed in as Alice Example", f"Your card is ready for {SITE}.")
            assert echo(agent.port())
            card.remove_card()
            desktop.wait_until_displayed()
            desktop.screenshot(shots / "notification-card-removed.png")
            assert desktop.wait_for_notification("Card removed: DICOM connections ended") == (
                "Card removed: DICOM connections ended", "Insert your card again to continue working.")
            log = agent.log()
    assert len(logins(card)) == 1 and "rv=0x0" in logins(card)[0]
    assert USER_PIN not in log


def test_the_final_try_is_confirmed_in_the_dialog_for_this_card(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, desktop: Desktop) -> None:
    card = inserted(tmp_path, retries=1)  # the card reports CKF_USER_PIN_FINAL_TRY
    shots = screenshots(tmp_path)
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with clinician_agent(test_pki, tmp_path, fault_module, card, desktop, pacs.port) as agent:
            desktop.wait_for_window(DIALOG)
            desktop.screenshot(shots / "pin-dialog-last-try.png")
            assert logins(card) == []
            desktop.key("alt+u")  # "Use my last try"
            time.sleep(0.5)
            desktop.type(USER_PIN)
            desktop.key("Return")
            desktop.wait_for_notification("Signed in as Alice Example")
            assert echo(agent.port())
    assert len(logins(card)) == 1 and "rv=0x0" in logins(card)[0]


def test_declining_the_final_try_spends_nothing(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, desktop: Desktop) -> None:
    card = inserted(tmp_path, retries=1)
    with clinician_agent(test_pki, tmp_path, fault_module, card, desktop, free_port()):
        desktop.wait_for_window(DIALOG)
        desktop.key("Return")  # the safe button has the focus: Cancel
        assert desktop.wait_for_notification("Sign-in cancelled") == (
            "Sign-in cancelled", "No PIN try was used. To sign in, remove your card and insert it again.")
        desktop.wait_for_no_window(DIALOG)
        status = agent_status(tmp_path / "agent", card.env())
    assert status["state"] == "card present, PIN entry cancelled: remove and re-insert the card to sign in again"
    assert logins(card) == []


def test_cancel_spends_no_try_and_says_how_to_try_again(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, desktop: Desktop) -> None:
    card = inserted(tmp_path)
    shots = screenshots(tmp_path)
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with clinician_agent(test_pki, tmp_path, fault_module, card, desktop, pacs.port) as agent:
            desktop.wait_for_window(DIALOG)
            desktop.key("Escape")
            desktop.wait_until_displayed()
            desktop.screenshot(shots / "notification-cancelled.png")
            desktop.wait_for_notification("Sign-in cancelled")
            assert logins(card) == []
            card.remove_card()
            time.sleep(0.3)
            card.insert_card()  # as the notification says: a new dialog
            sign_in(desktop, agent)
    assert len(logins(card)) == 1


def test_a_wrong_pin_says_what_tries_are_left_and_a_blocked_card_who_to_call(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, desktop: Desktop) -> None:
    card = inserted(tmp_path, retries=2)
    with clinician_agent(test_pki, tmp_path, fault_module, card, desktop, free_port()) as agent:
        desktop.wait_for_window(DIALOG)
        desktop.type(WRONG_PIN)
        desktop.key("Return")
        assert desktop.wait_for_notification("Wrong PIN", timeout=20) == (
            "Wrong PIN", "One try is left: the next wrong PIN blocks the card. "
                         "Remove your card and insert it again to try again.")
        card.remove_card()
        time.sleep(0.3)
        card.insert_card()
        desktop.wait_for_window(DIALOG)
        desktop.key("alt+u")
        time.sleep(0.5)
        desktop.type(WRONG_PIN)
        desktop.key("Return")
        assert desktop.wait_for_notification("Card blocked: too many wrong PINs", timeout=20) == (
            "Card blocked: too many wrong PINs", f"Call {HELPDESK} to unblock your card.")
        log = agent.log()
    assert len(logins(card)) == 2
    assert WRONG_PIN not in log


def test_a_card_that_cannot_sign_in_says_why_and_whom_to_call(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, desktop: Desktop) -> None:
    """An expired card, a revoked one and a card whose PIN has expired used to leave the screen
    silent (the clinician guide promises that no terminal or log is ever needed): each now says
    what is wrong and whom to call. The expired card asks for no PIN at all."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("expired")
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with clinician_agent(test_pki, tmp_path, fault_module, card, desktop, pacs.port):
            assert desktop.wait_for_notification("Your card has expired", timeout=20) == (
                "Your card has expired", f"No PACS accepts it any more. Call {HELPDESK} for a new card.")
            assert logins(card) == []
            card.show("mallory")  # revoked: known only after the PIN, from the card session's check
            desktop.wait_for_window("Sign in: Mallory Example")
            desktop.type(USER_PIN)
            desktop.key("Return")
            assert desktop.wait_for_notification("Your card has been revoked", timeout=20) == (
                "Your card has been revoked", f"No PACS accepts it any more. Call {HELPDESK} for a new card.")
            card.fail("C_Login", "CKR_PIN_EXPIRED")
            card.show("alice")
            desktop.wait_for_window(DIALOG)
            desktop.type(USER_PIN)
            desktop.key("Return")
            assert desktop.wait_for_notification("Your PIN must be changed", timeout=20) == (
                "Your PIN must be changed", f"The card accepts no sign-in until its PIN is changed. Call {HELPDESK}.")
            status = agent_status(tmp_path / "agent", card.env())
    assert status["state"] == ("card present, the card's PIN has expired: it must be changed before the card can "
                               "sign in")


def test_another_card_inserted_ends_the_session_in_its_own_words(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, desktop: Desktop) -> None:
    """Alice is signed in from one reader; Bob inserts his card in the other. Alice's card never
    left, so she is not told it was removed, and the sign-out names her card, not Bob's."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.readers("alice", None)
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with clinician_agent(test_pki, tmp_path, fault_module, card, desktop, pacs.port) as agent:
            sign_in(desktop, agent)
            desktop.notifications()
            card.readers("alice", "bob")
            assert desktop.wait_for_notification("Another card was inserted: DICOM connections ended") == (
                "Another card was inserted: DICOM connections ended",
                "The previous card's session ended; the new card signs in next.")
            desktop.wait_for_window("Sign in: Bob Example")
            locked = run_card_agent("lock", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env(),
                                    check=True).stdout
            log = agent.log()
    assert locked == "locked: the sign-in under way was cancelled; re-insert the card to sign in\n"
    sign_out = next(line for line in log.splitlines() if "event=sign-out" in line)
    assert 'reason="card swapped" subject="CN=Alice Example' in sign_out and 'token="alice"' in sign_out
    assert "Card removed: DICOM connections ended" not in [summary for summary, _ in desktop.notifications()]


def test_lock_from_the_desktop_entry_is_confirmed(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, desktop: Desktop) -> None:
    entry = configparser.ConfigParser(interpolation=None)
    entry.optionxform = str  # type: ignore[assignment,method-assign]
    entry.read(LOCK_ENTRY)
    fields = entry["Desktop Entry"]
    assert (fields["Type"], fields["Name"], fields["Exec"]) == ("Application", "Lock DICOM session", "card-agent lock")
    card = inserted(tmp_path)
    shots = screenshots(tmp_path)
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with clinician_agent(test_pki, tmp_path, fault_module, card, desktop, pacs.port) as agent:
            sign_in(desktop, agent)
            desktop.notifications()  # read: the screen is clear for the next one
            # As the desktop runs the entry: no flags; the agent is found through $CARD_AGENT_CONFIG.
            command = shlex.split(fields["Exec"])
            env = {**os.environ, **desktop.env(), "CARD_AGENT_CONFIG": str(tmp_path / "agent" / "agent.toml"),
                   "PATH": f"{Path(CARD_AGENT).parent}:{os.environ['PATH']}"}
            locked = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
            assert locked.returncode == 0, locked.stderr
            desktop.wait_until_displayed()
            desktop.screenshot(shots / "notification-locked.png")
            assert desktop.wait_for_notification("DICOM session locked") == (
                "DICOM session locked", "Remove your card and insert it again to continue.")
            assert send_and_close(agent.port(), associate_rq())[:1] == b"\x03"  # A-ASSOCIATE-RJ: locked


def test_idle_lock_is_told(test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, desktop: Desktop) -> None:
    card = inserted(tmp_path)
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with clinician_agent(test_pki, tmp_path, fault_module, card, desktop, pacs.port,
                             agent={"idle_timeout": 2}) as agent:
            sign_in(desktop, agent)
            assert desktop.wait_for_notification("DICOM session locked after inactivity") == (
                "DICOM session locked after inactivity",
                "Nothing was sent for 2 seconds. Remove your card and insert it again to continue.")


def test_a_pacs_down_is_told_once_per_few_minutes(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, desktop: Desktop) -> None:
    card = inserted(tmp_path)
    with clinician_agent(test_pki, tmp_path, fault_module, card, desktop, free_port()) as agent:
        sign_in(desktop, agent)
        for _ in range(3):  # nobody listens on the PACS port: connection refused, three times
            send_and_close(agent.port(), associate_rq())
        shown = desktop.wait_for_notification(f"Cannot reach {SITE}")
        assert shown[1] == ("Images cannot be sent or fetched now. Try again in a few minutes; if it goes on, "
                            f"call {HELPDESK}.")
        time.sleep(0.5)
        told = [n for n in desktop.notifications() if n[0] == f"Cannot reach {SITE}"]
    assert len(told) == 1


def test_a_pacs_refusing_the_card_is_told(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, desktop: Desktop) -> None:
    card = inserted(tmp_path)
    shots = screenshots(tmp_path)
    pki = test_pki.pki
    distrustful = TlsServerFiles(pki / "server.key", pki / "server-chain.pem", pki / "untrusted-ca.pem", None)
    with tls_scp(tls=distrustful) as pacs:
        with clinician_agent(test_pki, tmp_path, fault_module, card, desktop, pacs.port) as agent:
            sign_in(desktop, agent)
            desktop.notifications()
            send_and_close(agent.port(), associate_rq())
            desktop.wait_until_displayed()
            desktop.screenshot(shots / "notification-certificate-refused.png")
            assert desktop.wait_for_notification(f"{SITE} does not accept your card") == (
                f"{SITE} does not accept your card",
                f"Call {HELPDESK}: the server refuses your card's certificate.")


def test_the_dialog_closes_after_its_timeout_without_a_try(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, desktop: Desktop) -> None:
    card = inserted(tmp_path)
    with clinician_agent(test_pki, tmp_path, fault_module, card, desktop, free_port(),
                         identity={"pin_dialog_timeout": 6}):
        # 6 s, not 2: the window shows about 0.5 s after "ready" on a quiet host, and a CI run on a
        # loaded one never saw it: the 2-s timeout had closed the dialog before it was drawn.
        desktop.wait_for_window(DIALOG)
        desktop.wait_for_no_window(DIALOG, timeout=12)
        assert desktop.wait_for_notification("PIN dialog closed: nobody answered")[1] == (
            "No PIN try was used. To sign in, remove your card and insert it again.")
        wait_for(lambda: "no PIN entered within 6 s" in agent_status(tmp_path / "agent", card.env())["state"])
    assert logins(card) == []


def test_notifications_off_and_no_session_bus_are_silent(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, desktop: Desktop) -> None:
    card = inserted(tmp_path)
    with clinician_agent(test_pki, tmp_path / "off", fault_module, card, desktop, free_port(),
                         settings={"notifications": False}) as agent:
        sign_in(desktop, agent)
    # No session bus at all (a service, a rig): the agent signs in and says once why nobody is told.
    env = {**card.env(), "DBUS_SESSION_BUS_ADDRESS": "", "DISPLAY": desktop.display}
    with running_agent(test_pki, tmp_path / "nobus", [tunnel("pacs", free_port())], token="",
                       module=str(fault_module), env=env, identity={"pin": "pinentry"},
                       desktop={"pinentry": [PINENTRY_GTK]}) as agent:
        sign_in(desktop, agent)
        agent.wait_for_log("desktop notifications are not shown: no session bus")
    assert desktop.notifications() == []


def test_a_terminal_session_gets_pinentry_tty_with_the_same_words(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, terminal: Terminal) -> None:
    card = inserted(tmp_path)
    env = {**card.env(), "DISPLAY": "", "WAYLAND_DISPLAY": ""}  # no graphical session: the agent's terminal
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], token="",
                           module=str(fault_module), env=env, stdin=terminal.slave,
                           identity={"pin": "pinentry"}, desktop={"site_label": SITE}) as agent:
            terminal.wait_for_prompt()
            assert f"Alice Example, enter the PIN of your card to use {SITE}.".encode() in terminal.screen
            assert b"CN=" not in terminal.screen
            terminal.type(USER_PIN.encode() + b"\r")
            agent.wait_for_log('event=sign-in subject="CN=Alice Example')
            assert echo(agent.port())
    assert len(logins(card)) == 1
