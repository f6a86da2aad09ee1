"""SIGHUP after a certificate or key file changed its content at the same path (docs/configuration.md,
"Reloading"): configuration management replaces /etc/dicom-card-agent/ca-bundle.pem, taking out a
retired or compromised CA, and sends SIGHUP. That is a change of the table naming the file, handled as
a change of its path is: a [trust] ca or an [[inbound]] node certificate or key ends the card session
and the card signs in again with the new files; a tunnel's require_issuer changes that tunnel in
place. Before, the configuration held only the paths: "nothing changed", and the removed CA was
trusted for the rest of the card session."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from agent_runner import agent_status, inbound_listener, log_lines, running_agent, tunnel, wait_for, write_config
from conftest import ProvisionedPki, run_card_agent
from dicom_card_agent.config.model import load_config
from peers.pki_files import TlsServerFiles, issue_server_file_identity, leaf_certificate
from peers.pynetdicom_scp import echo, plain_scp, tls_scp
from test_inbound import connected_as_the_pacs

RELOADED = "card-agent: INFO: SIGHUP: configuration {config} reloaded: "
SIGN_IN = "event=sign-in "


def replace_file(path: Path, content: bytes, mode: int = 0o644) -> None:
    """Put ``content`` at ``path`` as configuration management does: a new file renamed over the old."""
    new = path.with_name(path.name + ".new")
    new.write_bytes(content)
    os.chmod(new, mode)
    os.replace(new, path)


def sighup(agent, config: Path) -> str:
    """SIGHUP; the line that says what the reload did."""
    expect = RELOADED.format(config=config)
    before = agent.log().count(expect)
    agent.process.send_signal(signal.SIGHUP)
    wait_for(lambda: agent.log().count(expect) > before or agent.process.poll() is not None)
    assert agent.process.poll() is None, f"SIGHUP ended the agent:\n{agent.log()}"
    return [line for line in log_lines(agent.log()) if line.startswith(expect)][-1]


def signed_in(agent, env: dict[str, str], sign_ins: int = 0) -> None:
    """Wait until the agent signed in more than ``sign_ins`` times and its card session is ready."""
    wait_for(lambda: agent.log().count(SIGN_IN) > sign_ins, 20)
    wait_for(lambda: agent_status(agent.log_path.parent, env)["state"] == "signed in", 20)


def configuration_records(config: Path, env: dict[str, str]) -> str:
    return run_card_agent("audit", "tail", "--config", config, env=env, check=True).stdout


def test_a_ca_taken_out_of_or_put_into_the_bundle_at_the_same_path_is_a_changed_trust(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """Two PACS, one with a server certificate of the test PKI's CA, one of another CA: the other
    PACS is accepted exactly while its CA is in the bundle, from the reload on."""
    bundle = tmp_path / "ca-bundle.pem"
    ours = test_pki.ca_bundle.read_bytes()
    other_ca = (test_pki.pki / "untrusted-ca.pem").read_bytes()
    replace_file(bundle, ours)
    other_files = TlsServerFiles(test_pki.pki / "untrusted-server.key", test_pki.pki / "untrusted-server-chain.pem",
                                 test_pki.ca_bundle)  # it trusts the card's CA for clients
    with tls_scp(pki_dir=test_pki.pki) as our_pacs, tls_scp(tls=other_files) as other_pacs:
        # The other CA publishes no CRL the agent has: its PACS is judged by the bundle alone.
        tunnels = [tunnel("ours", our_pacs.port), tunnel("other", other_pacs.port, revocation="off")]
        with running_agent(test_pki, tmp_path / "agent", tunnels, trust={"ca": str(bundle)},
                           audit={"file": str(tmp_path / "audit.log")}) as agent:
            env = test_pki.env()
            config = tmp_path / "agent" / "agent.toml"
            signed_in(agent, env)
            assert echo(agent.port("ours"))
            assert not echo(agent.port("other"))
            assert f"server 127.0.0.1:{other_pacs.port} is not trusted" in agent.log()

            sign_ins = agent.log().count(SIGN_IN)
            replace_file(bundle, ours + other_ca)
            assert sighup(agent, config) == (RELOADED.format(config=config)
                                             + "trust changed; the card session was ended ([trust] changed)")
            signed_in(agent, env, sign_ins)
            assert echo(agent.port("other")), agent.log()
            assert echo(agent.port("ours"))

            sign_ins = agent.log().count(SIGN_IN)
            refused_before = agent.log().count(f"server 127.0.0.1:{other_pacs.port} is not trusted")
            replace_file(bundle, ours)
            assert sighup(agent, config) == (RELOADED.format(config=config)
                                             + "trust changed; the card session was ended ([trust] changed)")
            signed_in(agent, env, sign_ins)
            assert not echo(agent.port("other"))
            assert agent.log().count(f"server 127.0.0.1:{other_pacs.port} is not trusted") == refused_before + 1
            assert echo(agent.port("ours"))
            log = agent.log()
    assert log.count("cannot take it in place ([trust] changed): it ends, and the card is signed in again") == 2
    assert log.count('event=sign-out reason="configuration reloaded"') == 2
    records = configuration_records(config, test_pki.env())
    assert records.count(f"SIGHUP: configuration {config} reloaded: trust changed; the card session was ended "
                         "([trust] changed)") == 2, records


def test_a_required_issuer_replaced_at_the_same_path_changes_its_tunnel_in_place(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    issuer = tmp_path / "required-issuer.pem"
    replace_file(issuer, (test_pki.pki / "issuing-ca.pem").read_bytes())
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port, require_issuer=str(issuer))]) \
                as agent:
            env = test_pki.env()
            config = tmp_path / "agent" / "agent.toml"
            signed_in(agent, env)
            assert echo(agent.port())
            replace_file(issuer, (test_pki.pki / "untrusted-ca.pem").read_bytes())
            assert sighup(agent, config) == RELOADED.format(config=config) + "changed pacs; the card session goes on"
            assert not echo(agent.port())
            log = agent.log()
    assert "does not pass through the required issuer CN=Untrusted Test CA" in log
    assert log.count(SIGN_IN) == 1  # in place: no new sign-in


def test_a_node_certificate_and_key_replaced_at_the_same_path_are_presented_after_the_reload(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The PACS connecting to the inbound listener gets the new node certificate (renewed by
    configuration management at the same paths), from the reload on."""
    certificate, key = tmp_path / "node" / "node-chain.pem", tmp_path / "node" / "node.key"
    certificate.parent.mkdir()
    replace_file(certificate, (test_pki.pki / "server-chain.pem").read_bytes())
    replace_file(key, (test_pki.pki / "server.key").read_bytes(), 0o600)
    renewed_chain, renewed_key = issue_server_file_identity(test_pki.pki, tmp_path / "renewed", ["localhost"])
    with tls_scp(pki_dir=test_pki.pki) as pacs, plain_scp() as viewer:
        listener = inbound_listener("viewer", f"127.0.0.1:{viewer.port}", server_certificate=str(certificate),
                                    server_key=str(key))
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], inbound=[listener]) as agent:
            env = test_pki.env()
            config = tmp_path / "agent" / "agent.toml"
            signed_in(agent, env)
            with connected_as_the_pacs(test_pki, listener) as connection:
                assert connection.getpeercert(binary_form=True) == _der(test_pki.pki / "server-chain.pem")
            sign_ins = agent.log().count(SIGN_IN)
            replace_file(certificate, renewed_chain.read_bytes())
            replace_file(key, renewed_key.read_bytes(), 0o600)
            assert sighup(agent, config) == (RELOADED.format(config=config)
                                             + "changed viewer; the card session was ended ([[inbound]] changed)")
            signed_in(agent, env, sign_ins)
            with connected_as_the_pacs(test_pki, listener) as connection:
                assert connection.getpeercert(binary_form=True) == _der(renewed_chain)


def _der(chain: Path) -> bytes:
    return leaf_certificate(chain).public_bytes(Encoding.DER)


@pytest.mark.parametrize("replaced", ["ca", "require_issuer", "server_certificate", "server_key"])
def test_each_file_read_again_with_other_content_makes_another_configuration(
        test_pki: ProvisionedPki, tmp_path: Path, replaced: str) -> None:
    """What a reload compares (agent/session/reload.py, retune.py): two readings of one file differ
    when any one of the files it names holds other bytes, and are equal when none does."""
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "require_issuer", "server_certificate", "server_key")}
    for name, source in (("ca", "ca-bundle.pem"), ("require_issuer", "issuing-ca.pem"),
                         ("server_certificate", "server-chain.pem"), ("server_key", "server.key")):
        replace_file(files[name], (test_pki.pki / source).read_bytes(), 0o600)
    config = write_config(
        tmp_path / "agent.toml", test_pki, [tunnel("pacs", 11112, require_issuer=str(files["require_issuer"]))],
        trust={"ca": str(files["ca"])},
        inbound=[inbound_listener("viewer", "127.0.0.1:11113", server_certificate=str(files["server_certificate"]),
                                  server_key=str(files["server_key"]))])
    before = load_config(config)
    assert load_config(config) == before
    replace_file(files[replaced], files[replaced].read_bytes() + b"\n", 0o600)
    after = load_config(config)
    assert after != before
    changed = {"ca": after.trust != before.trust, "require_issuer": after.tunnels != before.tunnels,
               "server_certificate": after.inbound != before.inbound, "server_key": after.inbound != before.inbound}
    assert changed[replaced]
    assert [name for name, differs in changed.items() if differs] == (
        [replaced] if replaced in ("ca", "require_issuer") else ["server_certificate", "server_key"])
