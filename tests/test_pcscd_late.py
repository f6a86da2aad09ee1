"""The agent started before pcscd (its socket unit disabled at boot, the daemon crashed), with the
real stack: a pcscd of the test's own + vpcd + libcacard (CAC) + OpenSC.

No card reader can be seen then, and `status` said only "no card inserted": nothing told the
administrator that pcscd was the matter. And pcscd's events were asked for at start only: once
pcscd ran, the agent went on polling OpenSC every 50 ms for the rest of its life, which probes each
card twice per sign-in, until it was restarted. It now asks for them again every second, and
watches through pcscd alone from the first moment no card is in a reader.
"""

from __future__ import annotations

from pathlib import Path

from agent_runner import agent_status, running_agent, tunnel
from conftest import ProvisionedPki
from peers.pynetdicom_scp import echo, tls_scp
from test_second_reader import PROBE_SECONDS, PrivateReader
from virtual_card.fixtures import private_two_readers, virtual_cards  # noqa: F401 - a pytest fixture
from virtual_card.nssdb import CardContents
from virtual_card.pcscd import VPCD_READERS

NO_PCSCD = "pcscd does not answer (SCardEstablishContext: 0x8010001D)"


def test_an_agent_started_before_pcscd_says_so_and_takes_its_events_once_it_runs(
        test_pki: ProvisionedPki, tmp_path: Path, virtual_cards: dict[str, CardContents]) -> None:  # noqa: F811
    carol = virtual_cards["carol"]
    pcscd_dir = tmp_path / "pcscd"  # its socket: pcscd_dir/run/pcscd.comm (virtual_card/pcscd.py PrivatePcscd)
    with tls_scp(pki_dir=test_pki.pki) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], token="", module="opensc",
                          env={"PCSCLITE_CSOCK_NAME": str(pcscd_dir / "run" / "pcscd.comm")},
                          agent={"runtime_dir": str(tmp_path / "run")}) as agent:
        without_pcscd = agent_status(tmp_path / "agent", test_pki.env())
        # Started after the agent: the readers' ports are taken after the agent's (free_port hands
        # them out in turn).
        with private_two_readers(pcscd_dir) as (daemon, port):
            agent.wait_for_log("cards are seen through pcscd alone", timeout=10)
            with_pcscd = agent_status(tmp_path / "agent", test_pki.env())
            reader = PrivateReader(tmp_path / "reader0", daemon, 0, port)
            try:
                reader.insert(carol)
                agent.wait_for_log(f'event=sign-in subject="{carol.subject}"', timeout=PROBE_SECONDS)
                assert echo(agent.port())
            finally:
                reader.close()
        log = agent.log()
    assert (without_pcscd["state"], without_pcscd["reader_trouble"]) == (
        "no card inserted", f"{NO_PCSCD}: no card reader is seen; start pcscd: `systemctl enable --now pcscd.socket`")
    assert with_pcscd["reader_trouble"] is None
    assert (f"card-agent: WARNING: card events: polling every 50 ms (no PC/SC events: {NO_PCSCD}): no card reader is "
            "seen until pcscd answers (start pcscd: `systemctl enable --now pcscd.socket`)") in log
    assert "card-agent: INFO: card events: pcscd answers now: PC/SC events from pcscd, and polling every 50 ms" in log
    assert f'event=card-inserted reader="{VPCD_READERS[0]}"' in log  # seen by pcscd, not by polling OpenSC
