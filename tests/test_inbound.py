"""Inbound TLS for C-MOVE destinations: the PACS connects to the agent over mutual TLS, the agent
forwards plain DICOM to the workstation's storage SCP. Real peers: DCMTK as the sending PACS,
Orthanc answering a C-MOVE with UseDicomTls, storescp as the viewer's storage SCP."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from agent_runner import inbound_listener, port_of, running_agent, start_agent, stop_agent, tunnel, write_config
from conftest import USER_PIN, ProvisionedPki, run_card_agent
from peers.dcmtk import storescp, storescu
from peers.orthanc import orthanc
from peers.pki_files import TlsClientFiles, TlsServerFiles
from peers.ports import free_port, peer_env
from peers.study import assert_delivered, make_study

def node_identity(test_pki: ProvisionedPki) -> dict[str, str]:
    """The workstation's node certificate (the test PKI's localhost certificate, serverAuth + clientAuth)."""
    return {"server_certificate": str(test_pki.pki / "server-chain.pem"), "server_key": str(test_pki.pki / "server.key")}


def pacs_identity(test_pki: ProvisionedPki, chain: str = "server-chain.pem", key: str = "server.key") -> TlsClientFiles:
    """How the sending PACS presents itself: a node certificate of the test PKI."""
    return TlsClientFiles(test_pki.ca_bundle, test_pki.pki / chain, test_pki.pki / key)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_study(tmp_path_factory.mktemp("study"), files=4)


def test_a_pacs_sends_over_mutual_tls_to_the_local_storage_scp(test_pki: ProvisionedPki, tmp_path: Path,
                                                               study: list[Path]) -> None:
    with storescp(tmp_path / "viewer", tls=None) as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", **node_identity(test_pki))
        with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener],
                           agent={"runtime_dir": str(tmp_path / "run")}) as agent:
            result = storescu(port_of(listener), study, tls=pacs_identity(test_pki), calling_ae="PACS")
            log = agent.wait_for_log("instances stored", timeout=40)
            status = run_card_agent("status", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env())
        received = viewer.stored_files()
    assert result.returncode == 0, result.stdout
    assert_delivered(study, received)
    assert "from CN=localhost,O=Example Hospital Test PKI as node certificate" in log
    assert "PACS -> STORESCP" in log and f"; {len(study)} of {len(study)} instances stored" in log
    sent = sum(p.stat().st_size for p in study)
    line = next(line for line in status.stdout.splitlines() if line.startswith("inbound retrieves:"))
    assert f"-> 127.0.0.1:{viewer.port}, 0 open, " in line
    assert int(line.split(", ")[2].split()[0]) > sent  # bytes in: the study and its PDU framing


@pytest.mark.parametrize("client, message", [
    (("untrusted-server-chain.pem", "untrusted-server.key"), "its client certificate does not verify against [trust] ca"),
    (None, "it sent no client certificate"),
])
def test_a_pacs_the_agent_does_not_trust_is_refused(test_pki: ProvisionedPki, tmp_path: Path, study: list[Path],
                                                    client: tuple[str, str] | None, message: str) -> None:
    identity = pacs_identity(test_pki, *client) if client else TlsClientFiles.anonymous(test_pki.pki)
    with storescp(tmp_path / "viewer", tls=None) as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", **node_identity(test_pki))
        with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]) as agent:
            result = storescu(port_of(listener), study[:1], tls=identity)
            log = agent.wait_for_log("refused the PACS")
        received = viewer.stored_files()
    assert result.returncode != 0
    assert received == []
    assert message in log, log


def test_a_missing_local_scp_is_an_association_reject_for_the_pacs(test_pki: ProvisionedPki, tmp_path: Path,
                                                                   study: list[Path]) -> None:
    listener = inbound_listener("retrieves", f"127.0.0.1:{free_port()}", **node_identity(test_pki))
    with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]) as agent:
        result = storescu(port_of(listener), study[:1], tls=pacs_identity(test_pki))
        log = agent.wait_for_log("cannot reach the local storage SCP")
    assert result.returncode != 0
    assert "Association Rejected" in result.stdout and "Transient" in result.stdout, result.stdout
    assert "(is the viewer's storage SCP running?)" in log


def test_a_storage_scp_of_another_user_gets_nothing(test_pki: ProvisionedPki, tmp_path: Path,
                                                    study: list[Path]) -> None:
    import shutil
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="nobody-scp-", dir="/tmp"))  # pytest's tmp_path is closed to other users
    out.chmod(0o777)
    port = free_port()
    nobody_scp = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "storescp",
                                   "-od", str(out), str(port)], env=peer_env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.STDOUT)
    try:
        from peers.ports import wait_for_port

        wait_for_port(port, 10)
        listener = inbound_listener("retrieves", f"127.0.0.1:{port}", **node_identity(test_pki))
        with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]) as agent:
            result = storescu(port_of(listener), study[:1], tls=pacs_identity(test_pki))
            log = agent.wait_for_log("belongs to uid 65534")
    finally:
        nobody_scp.kill()
        nobody_scp.wait()
        stored = list(out.iterdir())
        shutil.rmtree(out, ignore_errors=True)
    assert result.returncode != 0
    assert stored == []
    assert "retrieved images go only to the signed-in user's own software" in log


def test_the_card_certificate_must_allow_server_authentication(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    listener = inbound_listener("retrieves", f"127.0.0.1:{free_port()}")  # server_certificate = "card"
    with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]) as agent:
        log = agent.wait_for_log("sign-in-failed")
    assert ("inbound 'retrieves': the card's certificate (CN=Alice Example,O=Example Hospital Test PKI) cannot "
            "identify a TLS server (its extended key usage lacks serverAuth)") in log


def test_a_c_move_from_orthanc_arrives_through_both_directions(test_pki: ProvisionedPki, tmp_path: Path,
                                                               study: list[Path]) -> None:
    """The viewer asks Orthanc (through the outbound tunnel, with the card) to move a study to
    WORKSTATION; Orthanc connects with UseDicomTls to the agent's inbound port, which forwards to
    the viewer's storescp."""
    inbound_port = free_port()
    modalities = {"WORKSTATION": {"AET": "WORKSTATION", "Host": "127.0.0.1", "Port": inbound_port,
                                  "UseDicomTls": True}}
    with storescp(tmp_path / "viewer", tls=None, aet="WORKSTATION") as viewer, \
            orthanc(tmp_path / "orthanc", tls=TlsServerFiles.from_pki(test_pki.pki),
                    extra_config={"DicomModalities": modalities, "DicomAlwaysAllowMove": True}) as pacs:
        for path in study:  # the PACS has the study already
            pacs.post_instance(path.read_bytes())
        listener = {"name": "retrieves", "listen": f"127.0.0.1:{inbound_port}", "forward": f"127.0.0.1:{viewer.port}",
                    **node_identity(test_pki)}
        outbound = tunnel("pacs", pacs.dicom_port)
        with running_agent(test_pki, tmp_path / "agent", [outbound], inbound=[listener]) as agent:
            study_uid = subprocess.run(["dcmdump", "+P", "StudyInstanceUID", str(study[0])], capture_output=True,
                                       text=True).stdout.split("[")[1].split("]")[0]
            move = subprocess.run(["movescu", "-S", "-aet", "VIEWER", "-aec", "ORTHANC", "-aem", "WORKSTATION",
                                   "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                                   "127.0.0.1", str(port_of(outbound))], capture_output=True, text=True,
                                  env=peer_env(), timeout=120)
            log = agent.wait_for_log("VIEWER -> ORTHANC, ")  # the C-MOVE association ended
        received = viewer.stored_files()
    assert move.returncode == 0, move.stdout + move.stderr
    assert_delivered(study, received)
    assert "inbound retrieves: 127.0.0.1:" in log and "ORTHANC -> WORKSTATION" in log
    assert "from CN=localhost,O=Example Hospital Test PKI" in log  # Orthanc's node certificate, verified
    # Orthanc opens one association per series; together they carried the whole study.
    assert sum(int(n) for n in re.findall(r"; (\d+) of \d+ instances stored", log)) == len(study)


def test_the_card_is_the_server_identity_when_its_certificate_allows_it(test_pki: ProvisionedPki, tmp_path: Path,
                                                                        study: list[Path]) -> None:
    """bob's certificate carries serverAuth besides clientAuth, as some PIV cards' do."""
    with storescp(tmp_path / "viewer", tls=None) as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}")  # server_certificate = "card"
        with running_agent(test_pki, tmp_path / "agent", [], token="bob", inbound=[listener]) as agent:
            result = storescu(port_of(listener), study, tls=pacs_identity(test_pki), log_level="debug")
            log = agent.wait_for_log("instances stored")
        received = viewer.stored_files()
    assert result.returncode == 0, result.stdout
    assert len(received) == len(study)
    assert "as CN=Bob Example, issuer CN=Test Issuing CA to 127.0.0.1:" in log
    assert "Bob Example" in result.stdout  # the PACS saw the card's certificate (storescu's TLS details)


def test_a_node_key_on_a_token(test_pki: ProvisionedPki, tmp_path: Path, study: list[Path]) -> None:
    """The workstation's node certificate with its key on a token (here bob's SoftHSM token, while
    alice's card is the outbound identity); the token's PIN comes from server_key_pin."""
    chain = tmp_path / "node-chain.pem"
    chain.write_bytes((test_pki.pki / "clients" / "bob.pem").read_bytes() + (test_pki.pki / "issuing-ca.pem").read_bytes())
    with storescp(tmp_path / "viewer", tls=None) as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", server_certificate=str(chain),
                                    server_key="pkcs11:token=bob;id=%01;type=private", server_key_pin="env:NODE_PIN")
        with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener], env={"NODE_PIN": "123456"}) as agent:
            result = storescu(port_of(listener), study, tls=pacs_identity(test_pki), log_level="debug")
            log = agent.wait_for_log("instances stored")
            worker = subprocess.run(["pgrep", "-f", "agent.session.worker"], capture_output=True, text=True).stdout.split()
            environments = [Path(f"/proc/{pid}/environ").read_bytes() for pid in worker]
    assert result.returncode == 0, result.stdout
    assert "Bob Example" in result.stdout
    assert f"as node certificate {chain} to 127.0.0.1:" in log and "event=sign-in subject=\"CN=Alice Example" in log
    assert environments and all(b"NODE_PIN" not in environ for environ in environments)


@pytest.mark.parametrize("change, message", [
    ({"listen": "unix:/tmp/x.sock"}, "listen: the PACS connects over the network: give HOST:PORT"),
    ({"forward": "10.1.2.3:104"}, "forward: 10.1.2.3:104 is not a loopback address"),
    ({"server_certificate": "card", "server_key": "k.pem"}, "server_key: file"),
    ({"server_key": "pkcs11:token=bob;type=private"}, "server_key_pin: give the PIN of the token holding server_key"),
    ({"server_key": "pkcs11:token=bob;type=private", "server_key_pin": "prompt"},
     "server_key_pin: must be env:VARIABLE or file:PATH"),
    ({"allowed_calling_ae_titles": ["A_TITLE_LONGER_THAN_16"]}, "is not an AE title"),
    ({"user_identity": "username"}, "unknown key(s) user_identity"),
])
def test_bad_inbound_configuration_is_named_and_exits_2(test_pki: ProvisionedPki, tmp_path: Path,
                                                        change: dict, message: str) -> None:
    from agent_runner import write_config
    from conftest import run_card_agent

    listener = {**inbound_listener("retrieves", "127.0.0.1:11114", **node_identity(test_pki)), **change}
    config = write_config(tmp_path / "agent.toml", test_pki, [], inbound=[listener])
    result = run_card_agent("run", "--config", config, env=test_pki.env(CARD_PIN="123456"))
    assert result.returncode == 2
    assert "[[inbound]] 'retrieves'" in result.stderr and message in result.stderr, result.stderr


def test_a_node_key_pin_that_is_not_there_is_refused_at_start_up(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    # env: PINs are taken out of the environment at start-up (docs/pin-handling.md): a missing one
    # can never appear later, so the agent says so before it is ready, not at each sign-in.
    chain = tmp_path / "node-chain.pem"
    chain.write_bytes((test_pki.pki / "clients" / "bob.pem").read_bytes())
    listener = inbound_listener("retrieves", f"127.0.0.1:{free_port()}", server_certificate=str(chain),
                                server_key="pkcs11:token=bob;id=%01;type=private", server_key_pin="env:NODE_PIN")
    config = write_config(tmp_path / "agent.toml", test_pki, [], inbound=[listener])
    process = start_agent(config, tmp_path / "agent.log", test_pki.env(CARD_PIN=USER_PIN))
    try:
        process.wait(30)
    finally:
        stop_agent(process)
    assert process.returncode == 2
    assert (tmp_path / "agent.log").read_text().splitlines()[-1] == (
        "card-agent: error: the PIN variable NODE_PIN is not set or empty")
