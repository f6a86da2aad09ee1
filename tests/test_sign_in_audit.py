"""A sign-in that did not happen is in the audit trail, once per insertion of the card.

Before, only a sign-in that tried a PIN (and succeeded, or was refused) left a Login record: a
clinician who cancelled the PIN dialog, pulled her card before typing the PIN, or a card the agent
could not use left nothing for the hospital's audit to show. The card is SoftHSM through the fault
module (which counts C_Login calls), the PIN dialog pinentry-tty on a pseudo-terminal, the audit
trail the agent's own file.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from pathlib import Path

from agent_runner import agent_status, running_agent, tunnel, wait_for
from conftest import ProvisionedPki
from fault_pkcs11 import FaultControl
from peers.ports import free_port
from pin_dialog import PINENTRY_TTY, Terminal, terminal  # noqa: F401 - a pytest fixture

LOGIN = "110122"  # (110122, DCM, "Login")
CANCELLED = "card present, PIN entry cancelled: remove and re-insert the card to sign in again"
NO_IDENTITY = "card present, not signed in: "


def logins(card: FaultControl) -> list[str]:
    return [line for line in card.log_lines() if line.startswith("C_Login")]


def login_records(audit_file: Path) -> list[tuple[str, str, str]]:
    """(EventOutcomeIndicator, EventOutcomeDescription, the token object's name) of each Login."""
    records = []
    for line in audit_file.read_bytes().splitlines() if audit_file.exists() else []:
        message = ET.fromstring(line)
        identification = message.find("EventIdentification")
        assert identification is not None
        event_type = identification.find("EventTypeCode")
        if event_type is None or event_type.get("csd-code") != LOGIN:
            continue
        token = message.find("ParticipantObjectIdentification")
        records.append((identification.get("EventOutcomeIndicator", ""),
                        identification.findtext("EventOutcomeDescription") or "",
                        token.findtext("ParticipantObjectName") or "" if token is not None else ""))
    return records


def test_a_cancelled_pin_entry_and_a_pulled_card_are_each_one_failed_login(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, terminal: Terminal) -> None:
    card = FaultControl(tmp_path / "reader.ctl")
    card.pin_retries(3)
    card.show("alice")
    audit_file = tmp_path / "audit.log"
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", free_port())], token="",
                       module=str(fault_module), env=card.env(), stdin=terminal.slave,
                       identity={"pin": f"pinentry:{PINENTRY_TTY}"}, audit={"file": str(audit_file)}) as agent:
        terminal.wait_for_prompt(timeout=20)
        terminal.type(b"\x04")  # Ctrl-D: Cancel
        wait_for(lambda: agent_status(tmp_path / "agent", card.env())["state"] == CANCELLED, timeout=10)
        time.sleep(1.0)  # the card stays: nothing more is recorded while it waits
        after_cancel = login_records(audit_file)

        card.remove_card()  # as she is told: remove the card and insert it again ...
        agent.wait_for_log("event=card-removed")
        card.insert_card()
        terminal.wait_for_prompt(2, timeout=20)
        card.remove_card()  # ... and she walks away before typing her PIN
        agent.wait_for_log("event=card-removed", timeout=10)
        wait_for(lambda: agent.log().count("event=card-removed") == 2, timeout=10)
        time.sleep(1.0)
    records = login_records(audit_file)
    assert after_cancel == [("4", "PIN entry cancelled: nothing was sent to the card", "alice")]
    assert records == [after_cancel[0], ("4", "the card was removed before the PIN was entered", "alice")]
    assert logins(card) == []


def test_a_card_that_cannot_be_used_is_one_failed_login_per_insertion(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    """A card whose only certificate has expired: its sign-in fails before any PIN is asked."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("expired")
    audit_file = tmp_path / "audit.log"
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", free_port())], token="",
                       module=str(fault_module), env=card.env(), audit={"file": str(audit_file)}) as agent:
        agent.wait_for_log("event=sign-in-failed", timeout=20)
        status = agent_status(tmp_path / "agent", card.env())["state"]
        time.sleep(1.5)  # it stays in the reader: no record more
        in_the_reader = login_records(audit_file)
        card.remove_card()
        agent.wait_for_log("event=card-removed")
        card.insert_card()
        wait_for(lambda: agent.log().count("event=sign-in-failed") == 2, timeout=20)
        time.sleep(1.0)
    records = login_records(audit_file)
    assert status.startswith(NO_IDENTITY) and "holds no usable identity" in status, status
    assert len(in_the_reader) == 1, in_the_reader
    outcome, reason, token = in_the_reader[0]
    assert (outcome, token) == ("8", "expired") and "expired on" in reason, in_the_reader
    assert records == [in_the_reader[0], in_the_reader[0]]
    assert logins(card) == []
