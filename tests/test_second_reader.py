"""A card in a second reader, with the real stack: a pcscd of the test's own with vpcd's two readers,
libcacard (CAC) cards, OpenSC, and a TLS PACS (pynetdicom) that records which certificate each
association came with (session resumption off: every association is a full handshake the card signs).

Cards are seen through pcscd alone here (OpenSC's profile: ``presence = "pcsc"``), which tells no
token's label. With ``[identity] token`` set, a card that arrives in another reader while the
clinician's card is in use is probed by a card-session process of its own; a card holding another
token is skipped and her session goes on. Before, any such card ended her session ("card swapped")
and, once pulled, left the agent saying ``no card inserted`` with her card in its reader.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_runner import RunningAgent, agent_status, running_agent, tunnel, wait_for
from conftest import ProvisionedPki
from peers.pynetdicom_scp import RecordingScp, echo, tls_scp
from virtual_card.bridge import PIN_PRESENTED
from virtual_card.fixtures import private_two_readers, virtual_cards  # noqa: F401 - a pytest fixture
from virtual_card.nssdb import CardContents
from virtual_card.pcscd import (
    VPCD_READERS,
    PrivatePcscd,
    readers_with_a_card_in,
)
from virtual_card.reader import VirtualReader

PROBE_SECONDS = 30  # OpenSC probes an inserted card in ~2.3 s; a loaded 2-core machine takes longer


class PrivateReader(VirtualReader):
    """One of vpcd's two readers, behind the test's own pcscd (asked in a process of its own:
    libpcsclite reads PCSCLITE_CSOCK_NAME once per process, and this one may know the machine's)."""

    def __init__(self, workdir: Path, daemon: PrivatePcscd, index: int, port: int) -> None:
        super().__init__(workdir, port=port + index)
        self.daemon, self.name = daemon, VPCD_READERS[index]

    def present(self) -> bool:
        return self.name in readers_with_a_card_in(self.daemon)

    def pins_presented(self) -> int:
        return sum(log.read_text(errors="replace").count(PIN_PRESENTED) for log in self.workdir.glob("bridge-*.log"))


@pytest.fixture
def readers(tmp_path: Path) -> Iterator[tuple[PrivateReader, PrivateReader]]:
    """A pcscd of this test's own (a mount namespace) with vpcd's two readers on ports of its own:
    the machine's pcscd and other tests' readers are untouched."""
    with private_two_readers(tmp_path / "pcscd") as (daemon, port):
        pair = (PrivateReader(tmp_path / "reader0", daemon, 0, port),
                PrivateReader(tmp_path / "reader1", daemon, 1, port))
        try:
            yield pair
        finally:
            for reader in pair:
                reader.close()


@contextlib.contextmanager
def agent_and_pacs(test_pki: ProvisionedPki, tmp_path: Path, daemon: PrivatePcscd,
                   token: str) -> Iterator[tuple[RunningAgent, RecordingScp]]:
    with tls_scp(pki_dir=test_pki.pki) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port, session_resumption=False)],
                          token=token, module="opensc", env={"PCSCLITE_CSOCK_NAME": str(daemon.socket_path)},
                          agent={"runtime_dir": str(tmp_path / "run")}) as agent:
        agent.wait_for_log("card events: PC/SC events from pcscd")
        yield agent, pacs


def state(tmp_path: Path, test_pki: ProvisionedPki) -> str:
    return str(agent_status(tmp_path / "agent", test_pki.env())["state"])


def test_a_card_holding_another_token_in_a_second_reader_leaves_the_session_alone(
        test_pki: ProvisionedPki, tmp_path: Path, readers: tuple[PrivateReader, PrivateReader],
        virtual_cards: dict[str, CardContents]) -> None:  # noqa: F811 - the fixture
    carol, dave = virtual_cards["carol"], virtual_cards["dave"]
    carol_slot, other_slot = readers
    with agent_and_pacs(test_pki, tmp_path, carol_slot.daemon, token="Carol Example") as (agent, pacs):
        carol_slot.insert(carol)
        agent.wait_for_log(f'event=sign-in subject="{carol.subject}"', timeout=PROBE_SECONDS)
        assert echo(agent.port())

        other_slot.insert(dave)
        agent.wait_for_log("the card in reader 'Virtual PCD 00 01' holds 'Dave Example'", timeout=PROBE_SECONDS)
        assert "event=sign-out" not in agent.log(), agent.log()[-3000:]
        assert ("the card in reader 'Virtual PCD 00 01' skipped: the card in reader 'Virtual PCD 00 01' holds 'Dave "
                "Example' (serial ") in agent.log()
        assert state(tmp_path, test_pki) == "signed in"
        assert echo(agent.port())  # a full handshake: her card still signs after the other card's probe

        other_slot.pull()
        wait_for(lambda: VPCD_READERS[1] not in str(agent_status(tmp_path / "agent", test_pki.env())), timeout=10)
        assert state(tmp_path, test_pki) == "signed in"
        assert echo(agent.port())
        log = agent.log()
    assert "event=sign-out" not in log, log[-3000:]
    assert "holds 'Dave Example' (serial " in log and "not [identity] token 'Carol Example'" in log
    assert "rejected:" not in log
    assert [association.peer_subject for association in pacs.associations] == [carol.subject] * 3
    assert other_slot.pins_presented() == 0


def test_a_card_passed_over_for_a_newer_one_says_so_in_status(
        test_pki: ProvisionedPki, tmp_path: Path, readers: tuple[PrivateReader, PrivateReader],
        virtual_cards: dict[str, CardContents]) -> None:  # noqa: F811 - the fixture
    """No token named: the newer card is the one to sign in with. Pulled, it leaves Carol's card
    waiting for re-insertion in its reader, which ``status`` and the refusal's log line say instead of
    ``no card inserted``."""
    carol, dave = virtual_cards["carol"], virtual_cards["dave"]
    carol_slot, other_slot = readers
    with agent_and_pacs(test_pki, tmp_path, carol_slot.daemon, token="") as (agent, _):
        carol_slot.insert(carol)
        agent.wait_for_log(f'event=sign-in subject="{carol.subject}"', timeout=PROBE_SECONDS)
        other_slot.insert(dave)
        wait_for(lambda: any("Dave Example" in line for line in agent.log().splitlines()
                             if "event=sign-in" in line), timeout=PROBE_SECONDS)  # signed in or not
        other_slot.pull()
        agent.wait_for_log("not signed in again: a card inserted after it was used", timeout=10)
        waiting = state(tmp_path, test_pki)
        assert not echo(agent.port())
        log = agent.wait_for_log("rejected: ")
    expected = ("the card in reader 'Virtual PCD 00 00' passed over for a newer card: remove and re-insert it to "
                "sign in")
    assert waiting == expected
    assert f"rejected: {expected}" in log
