"""Identity follows the card: no card, insertion, removal mid-association, swap, re-insertion.

The card's comings and goings are made by the fault-injecting PKCS#11 module around the real
SoftHSM tokens (SoftHSM itself cannot simulate a removal): `show_token` puts one token in the
reader, `present = 0` pulls it. Both the agent's card watcher (python-pkcs11) and its TLS (OpenSSL's
pkcs11-provider) load that module, as they would load a card's.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from cryptography import x509

from agent.dicom.pdu import parse_associate_rj
from agent_runner import associate_rq, running_agent, send_and_close, tunnel, wait_for
from conftest import ProvisionedPki, run_card_agent
from fault_pkcs11 import FaultControl
from peers.pynetdicom_scp import associate, tls_scp

VERIFICATION = "1.2.840.10008.1.1"




def certificate(test_pki: ProvisionedPki, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((test_pki.pki / "clients" / f"{name}.pem").read_bytes())


def echo(port: int) -> bool:
    association = associate(port, sop_classes=[VERIFICATION])
    if not association.is_established:
        return False
    ok = association.send_c_echo().Status == 0
    association.release()
    return ok


def test_card_lifecycle_on_a_shared_workstation(test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    card.remove_card()  # the agent starts with an empty reader
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], token="",
                           module=str(fault_module), env=card.env()) as agent:
            assert "ready: 1 tunnel(s) for nobody yet (no card inserted)" in agent.log()
            answer = send_and_close(agent.port(), associate_rq())
            assert parse_associate_rj(answer).describe().startswith("rejected-transient")
            agent.wait_for_log("rejected: no card inserted")

            card.insert_card()  # alice signs in
            agent.wait_for_log('event=sign-in subject="CN=Alice Example')
            assert echo(agent.port())

            held = associate(agent.port(), sop_classes=[VERIFICATION])  # an association in progress
            assert held.is_established
            card.remove_card()
            pulled = time.monotonic()
            wait_for(lambda: held.is_aborted, timeout=5)
            aborted_after = time.monotonic() - pulled
            log = agent.wait_for_log('event=sign-out reason="card removed"')
            assert not echo(agent.port())

            card.show("bob")  # the next clinician's card
            card.insert_card()
            agent.wait_for_log('event=sign-in subject="CN=Bob Example')
            assert echo(agent.port())

            card.show("alice")  # swapped back: alice again, without restarting the agent
            agent.wait_for_log('event=sign-out reason="card swapped"')
            wait_for(lambda: agent.log().count('event=sign-in subject="CN=Alice Example') == 2)
            assert echo(agent.port())
            log = agent.log()
        seen = [x509.load_der_x509_certificate(a.peer_certificate_der) for a in pacs.associations]
    # A functional bound (the removal is polled every 50 ms), not a performance claim: see benchmarks/.
    assert aborted_after < 2.0
    alice, bob = certificate(test_pki, "alice"), certificate(test_pki, "bob")
    assert seen == [alice, alice, bob, alice]
    # Alice's second session could not resume the first one: it is a new card session.
    handshakes = [line for line in log.splitlines() if " to 127.0.0.1:" in line]
    assert "full handshake" in handshakes[-1]
    # Three sign-ins, each one PIN attempt in the supervisor and one login of its card-session
    # process; nothing ever prompted for a PIN on its own (OpenSSL's UI fallback).
    logins = [line for line in card.log_lines() if line.startswith("C_Login")]
    assert len(logins) == 6 and all("rv=0x0" in line for line in logins), logins
    assert "Enter PIN" not in log


def test_status_and_lock(test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("bob")
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], token="",
                           module=str(fault_module), env=card.env(),
                           agent={"runtime_dir": str(tmp_path / "run")}) as agent:
            config = tmp_path / "agent" / "agent.toml"
            env = dict(os.environ)
            held = associate(agent.port(), sop_classes=[VERIFICATION])
            assert held.is_established and held.send_c_echo().Status == 0
            status = json.loads(run_card_agent("status", "--config", config, "--json", env=env, check=True).stdout)
            assert status["state"] == "signed in" and status["identity"].startswith("CN=Bob Example")
            assert status["token"] == "bob" and status["since"]
            assert status["tunnels"][0]["open_connections"] == 1 and status["tunnels"][0]["bytes_up"] > 0
            readable = run_card_agent("status", "--config", config, env=env, check=True).stdout
            assert "identity: CN=Bob Example" in readable and "1 open" in readable

            locked = run_card_agent("lock", "--config", config, env=env, check=True).stdout
            assert "locked: every connection of the card session was closed" in locked
            wait_for(lambda: held.is_aborted, timeout=5)
            log = agent.wait_for_log('event=sign-out reason="locked"')
            status = json.loads(run_card_agent("status", "--config", config, "--json", env=env, check=True).stdout)
            assert status["state"].startswith("locked: remove and re-insert the card") and status["identity"] is None
            assert not echo(agent.port())  # still locked: the card stays in the reader but is not used

            card.remove_card()
            agent.wait_for_log('event=card-removed token="bob"')
            card.insert_card()
            wait_for(lambda: agent.log().count("event=sign-in ") == 2)
            assert echo(agent.port())
    assert "Enter PIN" not in log


def test_idle_timeout_ends_the_session_but_not_while_an_association_is_open(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)],
                           agent={"idle_timeout": 1.5}) as agent:
            held = associate(agent.port(), sop_classes=[VERIFICATION])
            assert held.is_established
            time.sleep(3)  # longer than idle_timeout, with an association open
            assert "event=sign-out" not in agent.log() and held.send_c_echo().Status == 0
            held.release()
            log = agent.wait_for_log('event=sign-out reason="idle timeout"', timeout=10)
            assert not echo(agent.port())
            agent.wait_for_log("rejected: locked after 1.5 s without activity: remove and re-insert the card")
    assert log.count("event=sign-in ") == 1
