"""`card-agent status` counts since the agent started next to those of the card session, and SIGHUP.

Real agent, real pynetdicom PACS over TLS, the fault module around SoftHSM for the card's comings,
goings and swaps (tests/test_card_sessions.py tells how)."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

from agent_runner import (
    ANY_SOFTHSM_TOKEN,
    associate_rq,
    card_session_pid,
    inbound_listener,
    port_of,
    running_agent,
    send_and_close,
    tunnel,
    wait_for,
)
from conftest import ProvisionedPki, run_card_agent
from dicom_card_agent.dicom.pdu import parse_associate_rj
from fault_pkcs11 import FaultControl
from peers.pki_files import TlsClientFiles
from peers.ports import free_port
from peers.pynetdicom_scp import associate, echo, plain_scp, tls_scp

VERIFICATION = "1.2.840.10008.1.1"
SCU = "PYNETDICOM-SCU"  # the calling AE title of peers.pynetdicom_scp.associate


def status(config: Path) -> dict:
    return json.loads(run_card_agent("status", "--config", config, "--json", env=dict(os.environ),
                                     check=True).stdout)


def relayed(log: str) -> list[tuple[str, int, int]]:
    """(handshake, bytes up, bytes down) of each association the tunnel relayed, from its log lines."""
    return [(kind, int(up), int(down)) for kind, up, down in re.findall(
        r"tunnel pacs: .* (full handshake|resumed) to .* (\d+) bytes up, (\d+) down", log)]


def counts(accepted: int, rejected: int, refused: int, full: int, resumed: int, up: int, down: int,
           failed: dict[str, int] | None = None, broken: dict[str, int] | None = None,
           **turned_away: dict[str, int]) -> dict:
    associations = {"accepted": accepted, "rejected": rejected, "aborted": 0, "refused": refused,
                    "failed": failed or {}, "broken": broken or {}}
    return {"associations": {**associations, **turned_away}, "handshakes": {"full": full, "resumed": resumed},
            "bytes_up": up, "bytes_down": down}


def test_status_counts_since_start_and_for_the_card_session(test_pki: ProvisionedPki, tmp_path: Path,
                                                            fault_module: Path) -> None:
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    card.remove_card()  # the agent starts with an empty reader
    # The PACS rejects any called AE title but its own; the tunnel refuses any calling AE title
    # but the SCU's; a second tunnel leads to a port where nobody listens.
    with tls_scp(pki_dir=test_pki.pki, ae_title="ANY-SCP", require_called_aet=True) as pacs:
        tunnels = [tunnel("pacs", pacs.port, allowed_calling_ae_titles=[SCU]), tunnel("down", free_port())]
        with running_agent(test_pki, tmp_path / "agent", tunnels, token=ANY_SOFTHSM_TOKEN, module=str(fault_module),
                           env=card.env()) as agent:
            config = tmp_path / "agent" / "agent.toml"
            assert parse_associate_rj(send_and_close(agent.port(), associate_rq())).describe().startswith(
                "rejected-transient")
            agent.wait_for_log("rejected: no card inserted")

            card.insert_card()  # alice's card session
            agent.wait_for_log('event=sign-in subject="CN=Alice Example')
            assert echo(agent.port()) and echo(agent.port())
            assert not echo(agent.port(), called_ae="NOT-THE-PACS")  # A-ASSOCIATE-RJ from the PACS
            refused = parse_associate_rj(send_and_close(agent.port(), associate_rq()))  # calling AE TESTSCU
            assert refused.describe().startswith("rejected-permanent")
            assert parse_associate_rj(send_and_close(agent.port("down"), associate_rq())).describe().startswith(
                "rejected-transient")
            wait_for(lambda: len(relayed(agent.log())) == 3)
            first = relayed(agent.log())
            assert [kind for kind, _, _ in first] == ["full handshake", "resumed", "resumed"]
            alice_up, alice_down = sum(up for _, up, _ in first), sum(down for _, _, down in first)
            wait_for(lambda: not any(t["open_connections"] for t in status(config)["tunnels"]))
            during = status(config)
            pacs_status, down_status = during["tunnels"]
            assert pacs_status["this_session"] == counts(2, 1, 1, 1, 2, alice_up, alice_down)
            assert pacs_status["since_start"] == counts(2, 1, 1, 1, 2, alice_up, alice_down,
                                                        turned_away={"no_card": 1})
            assert down_status["this_session"] == counts(0, 0, 0, 0, 0, 0, 0, failed={"connect": 1})
            # One more after that `status`: only the session's final counts can bring it into the totals.
            assert echo(agent.port())
            wait_for(lambda: len(relayed(agent.log())) == 4)
            kind, up, down = relayed(agent.log())[3]
            assert kind == "resumed"
            alice_up, alice_down = alice_up + up, alice_down + down

            card.show("bob")  # swapped: alice's card session ends, bob's starts
            agent.wait_for_log('event=sign-out reason="card swapped"')
            agent.wait_for_log('event=sign-in subject="CN=Bob Example')
            assert echo(agent.port())
            wait_for(lambda: len(relayed(agent.log())) == 5)
            (kind, bob_up, bob_down), = relayed(agent.log())[4:]
            assert kind == "full handshake"  # a new card session resumes nothing of the last
            wait_for(lambda: status(config)["tunnels"][0]["open_connections"] == 0)
            after = status(config)
            readable = run_card_agent("status", "--config", config, env=dict(os.environ), check=True).stdout
    pacs_status, down_status = after["tunnels"]
    assert pacs_status["this_session"] == counts(1, 0, 0, 1, 0, bob_up, bob_down)
    assert pacs_status["since_start"] == counts(4, 1, 1, 2, 3, alice_up + bob_up, alice_down + bob_down,
                                                turned_away={"no_card": 1})
    assert (pacs_status["bytes_up"], pacs_status["bytes_down"]) == (bob_up, bob_down)  # as before: this session
    assert down_status["this_session"] == counts(0, 0, 0, 0, 0, 0, 0)
    assert down_status["since_start"] == counts(0, 0, 0, 0, 0, 0, 0, failed={"connect": 1}, turned_away={})
    assert (f"  since start: 4 associations accepted, 1 rejected by the PACS, 1 refused by the association rules, "
            f"0 failed, 1 turned away (no_card 1); 2 full TLS handshakes, 3 resumed; "
            f"{alice_up + bob_up} bytes up, {alice_down + bob_down} down\n"
            f"  this card session: 1 associations accepted, 0 rejected by the PACS, 0 refused by the association "
            f"rules, 0 failed; 1 full TLS handshakes, 0 resumed; {bob_up} bytes up, {bob_down} down\n") in readable
    assert "  since start: 0 associations accepted, 0 rejected by the PACS, 0 refused by the association rules, " \
           "1 failed (connect 1), 0 turned away; 0 full TLS handshakes, 0 resumed; 0 bytes up, 0 down\n" in readable


RELOADED = "SIGHUP: configuration "


def test_sighup_keeps_the_agent_and_its_card_session(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)]) as agent:
            session = card_session_pid(agent.process.pid)
            assert session is not None
            agent.process.send_signal(signal.SIGHUP)
            wait_for(lambda: RELOADED in agent.log() or agent.process.poll() is not None)
            assert agent.process.poll() is None, f"SIGHUP ended the agent:\n{agent.log()}"
            assert card_session_pid(agent.process.pid) == session  # the same card session, still signed in
            assert echo(agent.port())
            log = agent.log()
    config = tmp_path / "agent" / "agent.toml"
    assert (f"card-agent: INFO: SIGHUP: configuration {config} reloaded: nothing changed; "
            "the card session goes on\n") in log
    assert log.count(RELOADED) == 1 and "event=sign-out" not in log.split(RELOADED)[1].split("stopping")[0]


def test_status_counts_of_an_inbound_listener(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    node = {"server_certificate": str(test_pki.pki / "server-chain.pem"),
            "server_key": str(test_pki.pki / "server.key")}
    pacs = TlsClientFiles(test_pki.ca_bundle, test_pki.pki / "server-chain.pem", test_pki.pki / "server.key")
    stranger = TlsClientFiles(test_pki.ca_bundle, test_pki.pki / "untrusted-server-chain.pem",
                              test_pki.pki / "untrusted-server.key")
    with plain_scp() as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", client_names=["localhost"], **node)
        with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]) as agent:
            association = associate(port_of(listener), tls=pacs, sop_classes=[VERIFICATION])
            assert association.is_established and association.send_c_echo().Status == 0
            association.release()
            assert not associate(port_of(listener), tls=stranger, sop_classes=[VERIFICATION]).is_established
            agent.wait_for_log("refused the PACS at")
            agent.wait_for_log(" bytes in, ")  # the accepted one ended
            config = tmp_path / "agent" / "agent.toml"
            wait_for(lambda: status(config)["inbound"][0]["open_connections"] == 0)
            inbound = status(config)["inbound"][0]
    up, down = inbound["bytes_up"], inbound["bytes_down"]
    assert up > 0 and down > 0
    assert inbound["this_session"] == counts(1, 0, 0, 1, 0, up, down, failed={"tls": 1})
    assert inbound["since_start"] == counts(1, 0, 0, 1, 0, up, down, failed={"tls": 1}, turned_away={})


def test_status_counts_a_local_peer_refused(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        # Only uid 65534 may use the tunnel: this test's process (another uid) is refused.
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port, allowed_uids=[65534])]) as agent:
            assert os.getuid() != 65534
            assert parse_associate_rj(send_and_close(agent.port(), associate_rq())).describe().startswith(
                "rejected-permanent")
            agent.wait_for_log("refused local connection from uid")
            pacs_status = status(tmp_path / "agent" / "agent.toml")["tunnels"][0]
    assert pacs_status["this_session"] == counts(0, 0, 0, 0, 0, 0, 0)
    assert pacs_status["since_start"] == counts(0, 0, 0, 0, 0, 0, 0, turned_away={"local_peer_refused": 1})
    assert pacs.associations == []
