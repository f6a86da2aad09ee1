"""`card-agent status` of an agent with a hundred tunnels (a workstation reaching one PACS per
department through its own listener, or a card session that has served many tunnels a reload
removed): the card session's answer, ~700 bytes a tunnel, outgrew the 64 KiB the supervisor read of
an answer; it was dropped as if the process were gone, and `status` and the metrics showed every
tunnel at 0, this session's counts lost from `since_start` too (a fixer, measuring). The real
agent on SoftHSM, a pynetdicom TLS PACS."""

from __future__ import annotations

from pathlib import Path

from agent_runner import agent_status, running_agent, tunnel
from conftest import ProvisionedPki
from peers.pynetdicom_scp import echo, tls_scp

TUNNELS = 100


def test_status_of_a_hundred_tunnels_counts_what_the_card_session_carried(test_pki: ProvisionedPki,
                                                                          tmp_path: Path) -> None:
    with tls_scp(pki_dir=test_pki.pki) as pacs, \
            running_agent(test_pki, tmp_path / "agent",
                          [tunnel(f"department{number:03d}", pacs.port) for number in range(TUNNELS)]) as agent:
        agent.wait_for_log("event=sign-in ")
        assert echo(agent.port("department000"))
        assert echo(agent.port("department099"))
        status = agent_status(tmp_path / "agent", test_pki.env())
    assert status["card_session_answering"] is True
    tunnels = {entry["name"]: entry for entry in status["tunnels"]}
    assert len(tunnels) == TUNNELS
    for name in ("department000", "department099"):
        assert tunnels[name]["this_session"]["associations"]["accepted"] == 1, tunnels[name]
        assert tunnels[name]["since_start"]["associations"]["accepted"] == 1, tunnels[name]
