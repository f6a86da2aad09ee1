"""Several readers with `token = ""`: the agent signs in with the most recently inserted card that
holds a usable identity, skips the others without spending a PIN try on them, and says why.

The readers are the fault module's (`show_token = ca-only,expired,bob`: token `ca-only` in reader 0,
and so on) around the real SoftHSM tokens of the test PKI (plus a CA-only token made here); its log names
the token of every C_Login, so "no PIN try on the unusable card" is read from what the module saw."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from cryptography import x509

from agent_runner import ANY_SOFTHSM_TOKEN, log_lines, running_agent, tunnel, wait_for
from conftest import ProvisionedPki, run_card_agent
from fault_pkcs11 import FaultControl
from peers.pynetdicom_scp import echo, tls_scp


def certificate(test_pki: ProvisionedPki, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((test_pki.pki / "clients" / f"{name}.pem").read_bytes())


def serials(test_pki: ProvisionedPki) -> dict[str, str]:
    listed = json.loads(run_card_agent("tokens", "--module", "softhsm2", "--json", env=test_pki.env(),
                                       check=True).stdout)
    return {token["label"]: token["serial"] for token in listed}


def status(agent_dir: Path, env: dict[str, str]) -> dict:
    return json.loads(run_card_agent("status", "--json", "--config", agent_dir / "agent.toml", env=env,
                                     check=True).stdout)


def logins(card: FaultControl) -> list[str]:
    """The C_Login lines of the module's log, without the pid (which process does not matter here)."""
    return [line.rsplit(" pid=", 1)[0] for line in card.log_lines() if line.startswith("C_Login")]


CA_ONLY_TOKEN = """
import os, sys
from pathlib import Path
import pkcs11
from cryptography import x509
from dicom_card_agent.softhsm.provision import SO_PIN, USER_PIN
from dicom_card_agent.softhsm.tokens import ca_certificate_id, init_token, store_certificate
conf, ca = Path(sys.argv[1]), x509.load_pem_x509_certificate(Path(sys.argv[2]).read_bytes())
init_token(conf, "ca-only", so_pin=SO_PIN, user_pin=USER_PIN)
os.environ["SOFTHSM2_CONF"] = str(conf)
with pkcs11.lib("/usr/lib/softhsm/libsofthsm2.so").get_token(token_label="ca-only").open(
        rw=True, user_pin=USER_PIN) as session:
    store_certificate(session, ca, ca_certificate_id(ca), "issuing CA")
"""


def pki_with_a_ca_only_token(test_pki: ProvisionedPki, directory: Path) -> ProvisionedPki:
    """A copy of the test PKI and its tokens, plus a token "ca-only" holding the issuing CA's
    certificate and nothing else (as a card handed out before personalisation would)."""
    shutil.copytree(test_pki.directory, directory, symlinks=True)
    conf = directory / test_pki.softhsm_conf.name
    conf.write_text(conf.read_text().replace(str(test_pki.directory), str(directory)))
    subprocess.run([sys.executable, "-c", CA_ONLY_TOKEN, str(conf), str(directory / "pki" / "issuing-ca.pem")],
                   check=True, capture_output=True, timeout=60, cwd=Path(__file__).parent.parent)
    return ProvisionedPki(directory, conf)


def test_unusable_cards_in_the_first_readers_are_skipped_for_a_usable_one(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    test_pki = pki_with_a_ca_only_token(test_pki, tmp_path / "pki")
    card = FaultControl(tmp_path / "readers.ctl")
    card.readers("ca-only", "expired", "bob")
    serial = serials(test_pki)
    expired = certificate(test_pki, "expired")
    issuing_ca = x509.load_pem_x509_certificate((test_pki.pki / "issuing-ca.pem").read_bytes())
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], token="",
                           module=str(fault_module), env=card.env()) as agent:
            assert echo(agent.port())
            answer = status(tmp_path / "agent", test_pki.env(**card.env()))
            log = agent.log()
        seen = [x509.load_der_x509_certificate(a.peer_certificate_der) for a in pacs.associations]
    assert seen == [certificate(test_pki, "bob")]
    assert (answer["state"], answer["token"], answer["token_serial"]) == ("signed in", "bob", serial["bob"])
    # Cards present at start count as inserted in reader order, the first reader last.
    assert (f"card-agent: INFO: card 'bob' (serial {serial['bob']}) chosen: 'ca-only' (serial {serial['ca-only']}) "
            f"holds no usable identity (only CA certificates ({issuing_ca.subject.rfc4514_string()}), no personal "
            f"certificate); 'expired' (serial {serial['expired']}) holds no usable identity "
            f"({expired.subject.rfc4514_string()}: expired on {expired.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: "
            "ask for a new certificate)") in log_lines(log)
    # One PIN try, on bob's card; none on the others, before or after.
    assert logins(card) == ["C_Login rv=0x0 user=1 token=bob"]


def test_the_most_recently_inserted_usable_card_wins_and_the_older_one_waits_for_re_insertion(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    card = FaultControl(tmp_path / "readers.ctl")
    card.readers("alice", None)  # reader 0 holds alice, reader 1 is empty
    serial = serials(test_pki)
    env = test_pki.env(**card.env())
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], token=ANY_SOFTHSM_TOKEN,
                           module=str(fault_module), env=card.env()) as agent:
            assert status(tmp_path / "agent", env)["token"] == "alice"
            assert echo(agent.port())

            card.readers("alice", "bob")  # bob's card goes into the second reader
            agent.wait_for_log('event=sign-in subject="CN=Bob Example')
            assert status(tmp_path / "agent", env)["token"] == "bob"
            assert echo(agent.port())

            # Bob takes his card. Alice's, passed over while in its reader, does not sign in by
            # itself (it may have been locked, or left behind): it waits to be re-inserted.
            card.readers("alice", None)
            agent.wait_for_log(f"card 'alice' (serial {serial['alice']}) not signed in again: a card inserted "
                               "after it was used; remove and re-insert it to sign in")
            answer = status(tmp_path / "agent", env)
            assert (answer["state"], answer["present_tokens"]) == (
                f"card 'alice' (serial {serial['alice']}) passed over for a newer card: remove and re-insert it to "
                "sign in", [{"label": "alice", "serial": serial["alice"]}])
            assert not echo(agent.port())

            card.readers(None, None)  # alice re-inserts her card
            wait_for(lambda: status(tmp_path / "agent", env)["present_tokens"] == [])
            card.readers("alice", None)
            wait_for(lambda: agent.log().count('event=sign-in subject="CN=Alice Example') == 2)
            assert echo(agent.port())
            log = agent.log()
        seen = [x509.load_der_x509_certificate(a.peer_certificate_der) for a in pacs.associations]
    alice, bob = certificate(test_pki, "alice"), certificate(test_pki, "bob")
    assert seen == [alice, bob, alice]
    assert (f"card-agent: INFO: card 'bob' (serial {serial['bob']}) chosen: 'alice' (serial {serial['alice']}) "
            "was inserted earlier") in log_lines(log)
    assert logins(card) == ["C_Login rv=0x0 user=1 token=alice", "C_Login rv=0x0 user=1 token=bob",
                            "C_Login rv=0x0 user=1 token=alice"]
