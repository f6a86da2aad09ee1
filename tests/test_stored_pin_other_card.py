"""A PIN that asks nobody (``pin = "env:CARD_PIN"``) goes to one card only, with the real stack:
pcscd (a private one, two vpcd readers) + libcacard (CAC) + OpenSC.

The cards check their PIN and count wrong tries as real cards do (tests/peers/pin_counting_card.py,
a fault injector: libcacard accepts any PIN). Carol's PIN is the stored one; Dave's is another.
Before, the agent gave the stored PIN to any card inserted: each insertion of Dave's card (a second
reader, a VPN token) spent one of its tries, 3 -> 2 -> 1, and the third stopped at the final-try
guard; a stored PIN the card refused was tried again at each re-insertion; with two cards at
start-up the agent picked one and gave it the PIN.

Whether Carol's session survives another card's insertion is not looked at here (that is the card
watcher's choice of card, agent/card/watcher.py): only the PIN tries and what the agent says.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent_runner import RunningAgent, agent_status, running_agent, tunnel, wait_for
from conftest import USER_PIN, ProvisionedPki
from dicom_card_agent.tunnel.peer import parse_proc_net_tcp
from peers.pin_counting_card import START_TRIES, WRONG_PIN_PREFIX, tries_left
from virtual_card.bridge import PIN_PRESENTED
from virtual_card.fixtures import CARDS, private_two_readers, virtual_cards  # noqa: F401 - a pytest fixture
from virtual_card.nssdb import CardContents
from virtual_card.pcscd import (
    VPCD_READERS,
    PrivatePcscd,
    readers_with_a_card_in,
)

TESTS_DIR = Path(__file__).resolve().parent
PROBE_SECONDS = 30  # OpenSC probes an inserted card in ~2.3 s; a loaded 2-core machine takes longer
DAVES_PIN = "654321"
TCP_LISTEN = 0x0A
NOT_TRIED = ("another card is not tried with it (a wrong PIN would spend one of the card's few tries): not signed "
             "in, no PIN tried. To sign in with this card, set [identity] token to its label and restart the agent, "
             "or use pin = \\\"pinentry\\\"")  # as the event line escapes it


@dataclass
class Slot:
    """One of vpcd's readers (port ``port``: "Virtual PCD 00 00", port + 1: "... 00 01"), holding
    at most one card that checks its PIN; a card is pulled by killing its process."""

    name: str
    port: int
    workdir: Path
    process: subprocess.Popen | None = None
    insertions: int = 0

    def insert(self, card: CardContents, pin: str, tries: Path) -> None:
        self.insertions += 1
        pin_file = self.workdir / f"{card.nickname}.pin"
        pin_file.write_text(pin + "\n")
        with open(self.workdir / f"card-{self.insertions}.log", "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "peers.pin_counting_card", "--db", str(card.db), "--cert", card.nickname,
                 "--port", str(self.port), "--pin-file", str(pin_file), "--tries-file", str(tries)],
                cwd=TESTS_DIR, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: "inserted into vpcd" in self.log(), timeout=10)

    def pull(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def log(self) -> str:
        return "".join(path.read_text(errors="replace") for path in sorted(self.workdir.glob("card-*.log")))

    def pins_presented(self) -> int:
        """PIN tries (VERIFY with a PIN) the cards in this reader were given, over every insertion."""
        return self.log().count(PIN_PRESENTED)


@dataclass
class Readers:
    daemon: PrivatePcscd
    slots: tuple[Slot, Slot]

    def env(self) -> dict[str, str]:
        return {"PCSCLITE_CSOCK_NAME": str(self.daemon.socket_path)}

    def with_a_card(self) -> list[str]:
        return readers_with_a_card_in(self.daemon)


def _listening(port: int) -> bool:
    rows = parse_proc_net_tcp(Path("/proc/net/tcp").read_text(), False)
    return any(row.local[1] == port and row.state == TCP_LISTEN for row in rows)


@pytest.fixture
def readers(tmp_path: Path) -> Iterator[Readers]:
    """A pcscd of this test's own (a mount namespace) with vpcd's two readers on ports of its own:
    the machine's pcscd and other tests' readers are untouched."""
    with private_two_readers(tmp_path / "pcscd") as (daemon, port):
        slots = (Slot(VPCD_READERS[0], port, tmp_path / "reader0"), Slot(VPCD_READERS[1], port + 1,
                                                                         tmp_path / "reader1"))
        try:
            wait_for(lambda: _listening(port) and _listening(port + 1), timeout=15)
            for slot in slots:
                slot.workdir.mkdir()
            yield Readers(daemon, slots)
        finally:
            for slot in slots:
                slot.pull()


def start_agent(test_pki: ProvisionedPki, tmp_path: Path, readers: Readers, *, pin: str = USER_PIN,
                token: str = "") -> contextlib.AbstractContextManager[RunningAgent]:
    # No PACS is needed: only sign-ins are looked at.
    return running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 9)], token=token, module="opensc", pin=pin,
                         env=readers.env(), agent={"runtime_dir": str(tmp_path / "run")})


def outcomes(agent: RunningAgent, card: CardContents) -> list[str]:
    """The agent's event lines that end a sign-in to ``card`` without a session."""
    label = CARDS[card.nickname]  # OpenSC names a CAC's token after its certificate's common name
    return [line for line in agent.log().splitlines()
            if f'token="{label}"' in line and ("event=pin-failure" in line or "event=sign-in-failed" in line)]


def test_the_stored_pin_never_goes_to_another_card(
        test_pki: ProvisionedPki, tmp_path: Path, readers: Readers,
        virtual_cards: dict[str, CardContents]) -> None:
    carol, dave = virtual_cards["carol"], virtual_cards["dave"]
    carol_slot, other_slot = readers.slots
    carols_tries, daves_tries = tmp_path / "carol.tries", tmp_path / "dave.tries"
    with start_agent(test_pki, tmp_path, readers) as agent:
        agent.wait_for_log("card events: PC/SC events from pcscd")
        carol_slot.insert(carol, USER_PIN, carols_tries)
        log = agent.wait_for_log(f'event=sign-in subject="{carol.subject}"', timeout=PROBE_SECONDS)
        serial = log.split(f'event=sign-in subject="{carol.subject}"')[1].split('serial="')[1].split('"')[0]
        for insertion in (1, 2):  # a second reader's card (a VPN token), plugged in, pulled, plugged in again
            other_slot.insert(dave, DAVES_PIN, daves_tries)
            wait_for(lambda n=insertion: len(outcomes(agent, dave)) == n, timeout=PROBE_SECONDS)
            assert tries_left(daves_tries) == START_TRIES, other_slot.log()
            other_slot.pull()
            agent.wait_for_log('event=card-removed token="Dave Example"')
        log = agent.log()
    assert other_slot.pins_presented() == 0 and WRONG_PIN_PREFIX not in other_slot.log()
    assert "event=pin-failure" not in log
    refused = outcomes(agent, dave)
    expected = (f'event=sign-in-failed token="Dave Example" serial="{serial}" reason="the stored PIN (env:CARD_PIN) '
                f"belongs to token 'Carol Example' serial {serial}, the card this agent signed in with; {NOT_TRIED}\"")
    assert all(line.endswith(expected) for line in refused), refused
    assert carol_slot.pins_presented() == 1 and tries_left(carols_tries) == START_TRIES


def test_a_stored_pin_the_card_refused_is_not_tried_again(
        test_pki: ProvisionedPki, tmp_path: Path, readers: Readers,
        virtual_cards: dict[str, CardContents]) -> None:
    carol = virtual_cards["carol"]
    slot = readers.slots[0]
    tries = tmp_path / "carol.tries"
    with start_agent(test_pki, tmp_path, readers, pin="111111") as agent:  # a stale PIN in the agent's unit
        agent.wait_for_log("card events: PC/SC events from pcscd")
        slot.insert(carol, USER_PIN, tries)
        agent.wait_for_log('event=pin-failure token="Carol Example"', timeout=PROBE_SECONDS)
        assert tries_left(tries) == START_TRIES - 1
        slot.pull()
        agent.wait_for_log('event=card-removed token="Carol Example"')
        slot.insert(carol, USER_PIN, tries)  # as the status said: remove and re-insert the card
        wait_for(lambda: len(outcomes(agent, carol)) == 2, timeout=PROBE_SECONDS)
        state = agent_status(tmp_path / "agent", test_pki.env())["state"]
    assert tries_left(tries) == START_TRIES - 1, slot.log()
    assert slot.pins_presented() == 1
    assert state.startswith("card present, not signed in: the stored PIN (env:CARD_PIN) went to token 'Carol Example' "
                            "serial "), state
    assert state.endswith(" and that sign-in did not end signed in (a wrong PIN, or the card left or its process "
                          "ended before the card answered); it is not tried again, on that card or another, until the "
                          "agent restarts (a wrong PIN would spend one of the card's few tries): not signed in, no PIN "
                          "tried. Check the PIN, then restart the agent"), state


def test_two_cards_at_start_up_and_no_token_named_get_no_pin(
        test_pki: ProvisionedPki, tmp_path: Path, readers: Readers,
        virtual_cards: dict[str, CardContents]) -> None:
    carol, dave = virtual_cards["carol"], virtual_cards["dave"]
    carol_slot, other_slot = readers.slots
    carol_slot.insert(carol, USER_PIN, tmp_path / "carol.tries")
    other_slot.insert(dave, DAVES_PIN, tmp_path / "dave.tries")
    wait_for(lambda: len(readers.with_a_card()) == 2, timeout=10)
    with start_agent(test_pki, tmp_path, readers) as agent:
        wait_for(lambda: "event=sign-in" in agent.log(), timeout=PROBE_SECONDS)  # -failed, or a sign-in
        first = agent.log()
        assert carol_slot.pins_presented() + other_slot.pins_presented() == 0, first
        other_slot.pull()  # as the line said: only the card the PIN belongs to in its reader, inserted again
        carol_slot.pull()
        wait_for(lambda: agent_status(tmp_path / "agent", test_pki.env())["state"].startswith("no card"), timeout=10)
        carol_slot.insert(carol, USER_PIN, tmp_path / "carol.tries")
        agent.wait_for_log(f'event=sign-in subject="{carol.subject}"', timeout=PROBE_SECONDS)
    assert ("2 cards are in readers ('Virtual PCD 00 00', 'Virtual PCD 00 01') and the stored PIN (env:CARD_PIN) goes "
            "to one card only; the agent does not guess which (a wrong PIN would spend one of the card's few tries): "
            "not signed in, no PIN tried. Set [identity] token to the label of the card the PIN belongs to, or leave "
            "only that card in its reader and insert it again") in first
    assert carol_slot.pins_presented() == 1 and other_slot.pins_presented() == 0


def test_a_token_named_in_the_configuration_signs_in_with_two_cards_present(
        test_pki: ProvisionedPki, tmp_path: Path, readers: Readers,
        virtual_cards: dict[str, CardContents]) -> None:
    carol, dave = virtual_cards["carol"], virtual_cards["dave"]
    carol_slot, other_slot = readers.slots
    carol_slot.insert(carol, USER_PIN, tmp_path / "carol.tries")
    other_slot.insert(dave, DAVES_PIN, tmp_path / "dave.tries")
    wait_for(lambda: len(readers.with_a_card()) == 2, timeout=10)
    with start_agent(test_pki, tmp_path, readers, token="Carol Example") as agent:
        agent.wait_for_log(f'event=sign-in subject="{carol.subject}"', timeout=PROBE_SECONDS)
    assert carol_slot.pins_presented() == 1 and other_slot.pins_presented() == 0
