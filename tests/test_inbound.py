"""Inbound TLS for C-MOVE destinations: the PACS connects to the agent over mutual TLS, the agent
forwards plain DICOM to the workstation's storage SCP. Real peers: DCMTK as the sending PACS,
Orthanc answering a C-MOVE with UseDicomTls, storescp as the viewer's storage SCP."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent_runner import (
    ANY_SOFTHSM_TOKEN,
    RunningAgent,
    associate_rq,
    inbound_listener,
    keepalive_timers,
    lock_while_the_application_reads,
    log_lines,
    port_of,
    running_agent,
    start_agent,
    stop_agent,
    tunnel,
    wait_for,
    write_config,
)
from conftest import USER_PIN, ProvisionedPki, make_token, run_card_agent
from dicom_card_agent.dicom.pdu import A_ASSOCIATE_RJ, parse_associate_rj
from dicom_card_agent.softhsm.pki import CertificateAuthority, name
from dicom_card_agent.tunnel.admission import AllowFromError, RefusalLog, is_allowed, parse_network
from fault_pkcs11 import RSA_PSS_MECHANISMS, FaultControl
from peers.dcmtk import storescp, storescu
from peers.dns import DEBIAN_HOSTS, with_hosts_file
from peers.netns import late_address
from peers.orthanc import orthanc
from peers.pki_files import TlsClientFiles, TlsServerFiles
from peers.ports import free_port, peer_env
from peers.pynetdicom_scp import plain_scp
from peers.study import assert_delivered, make_study
from test_local_attacker import SQUATTER, as_nobody, end
from test_tunnel_association import receive_pdu

# Who the PACS is: the names its certificate (the test PKI's localhost node certificate) carries. Needed
# where no [[tunnel]] names the PACS: the listener's client_names default to the tunnels' server_name.
THE_PACS = {"client_names": ["localhost"]}


def node_identity(test_pki: ProvisionedPki) -> dict[str, str]:
    """The workstation's node certificate (the test PKI's localhost certificate, serverAuth + clientAuth)."""
    return {"server_certificate": str(test_pki.pki / "server-chain.pem"),
            "server_key": str(test_pki.pki / "server.key")}


def pacs_identity(test_pki: ProvisionedPki, chain: str = "server-chain.pem", key: str = "server.key") -> TlsClientFiles:
    """How the sending PACS presents itself: a node certificate of the test PKI."""
    return TlsClientFiles(test_pki.ca_bundle, test_pki.pki / chain, test_pki.pki / key)


@contextlib.contextmanager
def connected_as_the_pacs(test_pki: ProvisionedPki, listener: dict) -> Iterator[ssl.SSLSocket]:
    """A TLS connection to the inbound ``listener``, presenting the PACS's node certificate."""
    context = pacs_identity(test_pki).ssl_context()
    with socket.create_connection(("127.0.0.1", port_of(listener)), timeout=15) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as pacs:
        yield pacs


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_study(tmp_path_factory.mktemp("study"), files=4)


def test_a_pacs_sends_over_mutual_tls_to_the_local_storage_scp(test_pki: ProvisionedPki, tmp_path: Path,
                                                               study: list[Path]) -> None:
    with storescp(tmp_path / "viewer", tls=None) as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", **THE_PACS, **node_identity(test_pki))
        with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener],
                           agent={"runtime_dir": str(tmp_path / "run")}) as agent:
            result = storescu(port_of(listener), study, tls=pacs_identity(test_pki), calling_ae="PACS")
            log = agent.wait_for_log("instances stored", timeout=40)
            status = run_card_agent("status", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env())
        received = viewer.stored_files()
    assert result.returncode == 0, result.stdout
    assert_delivered(study, received)
    # The version as negotiated (read after the relay's TLS shutdown, it said None).
    assert re.search(r": TLSv1\.[23] from CN=localhost,O=Example Hospital Test PKI as node certificate", log), log
    assert "PACS -> STORESCP" in log and f"; {len(study)} of {len(study)} instances stored" in log
    sent = sum(p.stat().st_size for p in study)
    line = next(line for line in status.stdout.splitlines() if line.startswith("inbound retrieves:"))
    assert f"-> 127.0.0.1:{viewer.port}, 0 open, " in line
    assert int(line.split(", ")[2].split()[0]) > sent  # bytes in: the study and its PDU framing


def test_a_listener_on_an_address_the_network_brings_up_later_starts_and_receives_once_it_is_up(
        test_pki: ProvisionedPki, tmp_path: Path, study: list[Path]) -> None:
    """The listener's address is the workstation's on the hospital network, which Wi-Fi or DHCP may
    bring up after the agent started. Before, the agent ended at start-up ("cannot listen on
    ...: Cannot assign requested address"), outbound tunnels and all; now it listens anyway (as
    systemd's FreeBind= does), says so, and the PACS's study arrives once the address is up."""
    with ExitStack() as stack:
        late = stack.enter_context(late_address())
        viewer = stack.enter_context(storescp(tmp_path / "viewer", tls=None))
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", **THE_PACS, **node_identity(test_pki),
                                    listen=f"{late.address}:{free_port()}", allow_from=[late.address])
        agent = stack.enter_context(running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]))
        started_log = agent.log()
        late.bring_up()
        result = storescu(port_of(listener), study, tls=pacs_identity(test_pki), calling_ae="PACS", host=late.address)
        agent.wait_for_log("instances stored", timeout=40)
        received = viewer.stored_files()
    assert (f"card-agent: WARNING: inbound retrieves: {late.address} is not an address of this workstation yet: "
            "listening on it anyway, connections arrive once the network brings it up") in started_log
    assert result.returncode == 0, result.stdout + agent.log()
    assert_delivered(study, received)


@pytest.mark.parametrize("client, message", [
    (("untrusted-server-chain.pem", "untrusted-server.key"),
     "its client certificate does not verify against [trust] ca"),
    (None, "it sent no client certificate"),
])
def test_a_pacs_the_agent_does_not_trust_is_refused(test_pki: ProvisionedPki, tmp_path: Path, study: list[Path],
                                                    client: tuple[str, str] | None, message: str) -> None:
    identity = pacs_identity(test_pki, *client) if client else TlsClientFiles.anonymous(test_pki.pki)
    with storescp(tmp_path / "viewer", tls=None) as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", **THE_PACS, **node_identity(test_pki))
        with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]) as agent:
            result = storescu(port_of(listener), study[:1], tls=identity)
            log = agent.wait_for_log("refused the PACS")
        received = viewer.stored_files()
    assert result.returncode != 0
    assert received == []
    assert message in log, log


def test_a_pacs_whose_certificate_is_not_among_client_pins_is_refused_with_its_fingerprint(
        test_pki: ProvisionedPki, tmp_path: Path, study: list[Path]) -> None:
    """The PACS chains to [trust] ca but is not pinned: refused, and the log names its fingerprint
    (before, formatting that fingerprint raised TypeError: the connection ended as an internal error)."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    leaf = x509.load_pem_x509_certificates((test_pki.pki / "server-chain.pem").read_bytes())[0]
    fingerprint = hashlib.sha256(leaf.public_bytes(Encoding.DER)).digest().hex(":")
    other = hashlib.sha256(b"another PACS").hexdigest()
    with storescp(tmp_path / "viewer", tls=None) as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", client_pins=[other],
                                    **node_identity(test_pki))
        with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]) as agent:
            result = storescu(port_of(listener), study[:1], tls=pacs_identity(test_pki))
            log = agent.wait_for_log("refused the PACS")
        received = viewer.stored_files()
    assert result.returncode != 0
    assert received == []
    assert (f"client certificate CN=localhost,O=Example Hospital Test PKI has SHA-256 fingerprint {fingerprint}, "
            "which is not among client_pins of inbound 'retrieves'") in log, log
    assert "internal error" not in log


def test_a_pacs_revoked_by_a_new_crl_is_refused_without_a_new_sign_in(test_pki: ProvisionedPki, tmp_path: Path,
                                                                      study: list[Path]) -> None:
    """The CRL file is replaced while the card session runs; the PACS's next connection is judged by the new one."""
    import os
    import time

    from peers.pki_files import write_crl

    crl = write_crl(test_pki.pki, tmp_path / "issuing.crl.pem", [])
    with storescp(tmp_path / "viewer", tls=None) as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", **THE_PACS, **node_identity(test_pki))
        with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener], trust={"crl": [str(crl)]}) as agent:
            assert storescu(port_of(listener), study[:1], tls=pacs_identity(test_pki)).returncode == 0
            os.replace(write_crl(test_pki.pki, tmp_path / "new.crl.pem", [test_pki.pki / "server-chain.pem"]), crl)
            time.sleep(3)  # the agent looks at its CRL files every 2 s
            result = storescu(port_of(listener), study[1:2], tls=pacs_identity(test_pki))
            log = agent.wait_for_log("refused the PACS")
        received = viewer.stored_files()
    assert result.returncode != 0
    assert len(received) == 1
    assert ("refused the PACS at 127.0.0.1:" in log and ": certificate CN=localhost,O=Example Hospital Test PKI "
            "(issuer CN=Test Issuing CA,O=Example Hospital Test PKI) was revoked on ") in log
    assert f"(reason: keyCompromise) according to CRL file {crl}" in log
    assert log.count("signed in:") == 1


def test_a_missing_local_scp_is_an_association_reject_for_the_pacs(test_pki: ProvisionedPki, tmp_path: Path,
                                                                   study: list[Path]) -> None:
    listener = inbound_listener("retrieves", f"127.0.0.1:{free_port()}", **THE_PACS, **node_identity(test_pki))
    with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]) as agent:
        result = storescu(port_of(listener), study[:1], tls=pacs_identity(test_pki))
        log = agent.wait_for_log("cannot reach the local storage SCP")
    assert result.returncode != 0
    assert "Association Rejected" in result.stdout and "Transient" in result.stdout, result.stdout
    assert "(is the viewer's storage SCP running?)" in log


def test_a_called_ae_title_with_an_escape_sequence_is_refused_before_the_local_scp(test_pki: ProvisionedPki,
                                                                                  tmp_path: Path) -> None:
    request = bytearray(associate_rq())
    request[10:26] = b"\x1b[2JVIEWER".ljust(16)  # the Called-AE-title: clear the screen of whoever reads the log
    with plain_scp() as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", **THE_PACS, **node_identity(test_pki))
        with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]) as agent:
            with connected_as_the_pacs(test_pki, listener) as pacs:
                pacs.sendall(request)
                pdu_type, pdu = receive_pdu(pacs)
            log = agent.wait_for_log("refused")
        requests_at_the_viewer = [record.calling_ae for record in viewer.associations if record.calling_ae]
    assert pdu_type == A_ASSOCIATE_RJ and parse_associate_rj(pdu).describe() == (
        "rejected-permanent by DICOM UL service-user: called-AE-title-not-recognized")
    assert requests_at_the_viewer == []
    assert ("association TESTSCU -> \\x1b[2JVIEWER refused: called AE title '\\x1b[2JVIEWER' holds the control "
            "character 0x1B, which an AE title must not contain") in log
    assert "\x1b" not in log


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
        listener = inbound_listener("retrieves", f"127.0.0.1:{port}", **THE_PACS, **node_identity(test_pki))
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


def test_another_user_on_the_other_localhost_address_does_not_keep_retrieves_from_the_viewer(
        test_pki: ProvisionedPki, tmp_path: Path, study: list[Path]) -> None:
    """forward = "localhost:PORT" with Debian's /etc/hosts (::1 first) and uid 65534 listening on
    [::1]:PORT: the agent refused that listener (as it must) and with it every delivery, though the
    viewer's storage SCP listened on 127.0.0.1; it now goes on to the address whose listener is the
    viewer's, and the retrieved instances arrive."""
    with storescp(tmp_path / "viewer", tls=None) as viewer:
        squatter = as_nobody(SQUATTER, "::1", str(viewer.port))
        try:
            assert squatter.stdout is not None and squatter.stdout.readline() == "listening\n"
            listener = inbound_listener("retrieves", f"localhost:{viewer.port}", **THE_PACS, **node_identity(test_pki))
            with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener],
                               prefix=with_hosts_file(DEBIAN_HOSTS, tmp_path)) as agent:
                result = storescu(port_of(listener), study[:2], tls=pacs_identity(test_pki), calling_ae="PACS")
                log = agent.wait_for_log("instances stored", timeout=40)
        finally:
            end(squatter)
        received = viewer.stored_files()
    assert result.returncode == 0, result.stdout + log
    assert_delivered(study[:2], received)
    assert "belongs to uid 65534" not in log


def test_the_card_certificate_must_allow_server_authentication(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    listener = inbound_listener("retrieves", f"127.0.0.1:{free_port()}", **THE_PACS)  # server_certificate = "card"
    with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]) as agent:
        log = agent.wait_for_log("sign-in-failed")
    assert ("token 'alice' cannot serve [[inbound]] 'retrieves' (server_certificate = \"card\"): the card's "
            "certificate (CN=Alice Example,O=Example Hospital Test PKI) cannot identify a TLS server (its extended "
            "key usage lacks serverAuth); not signed in, no PIN asked") in log


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
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", **THE_PACS)  # server_certificate = "card"
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
    chain.write_bytes((test_pki.pki / "clients" / "bob.pem").read_bytes()
                      + (test_pki.pki / "issuing-ca.pem").read_bytes())
    with storescp(tmp_path / "viewer", tls=None) as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", **THE_PACS, server_certificate=str(chain),
                                    server_key="pkcs11:token=bob;id=%01;type=private", server_key_pin="env:NODE_PIN")
        with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener], env={"NODE_PIN": "123456"}) as agent:
            result = storescu(port_of(listener), study, tls=pacs_identity(test_pki), log_level="debug")
            log = agent.wait_for_log("instances stored")
            # this agent's card-session process only: other xdist workers run agents of their own
            worker = subprocess.run(["pgrep", "-P", str(agent.process.pid), "-f", "agent.session.worker"],
                                    capture_output=True, text=True).stdout.split()
            environments = [Path(f"/proc/{pid}/environ").read_bytes() for pid in worker]
    assert result.returncode == 0, result.stdout
    assert "Bob Example" in result.stdout
    assert f"as node certificate {chain} to 127.0.0.1:" in log and "event=sign-in subject=\"CN=Alice Example" in log
    assert environments and all(b"NODE_PIN" not in environ for environ in environments)


def handshake_as_the_pacs(test_pki: ProvisionedPki, listener: dict) -> str:
    """What ``openssl s_client``, presenting the PACS's node certificate, says of its handshake with
    the inbound ``listener`` (the protocol, the listener's signature type)."""
    s_client = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port_of(listener)}", "-CAfile", str(test_pki.ca_bundle),
         "-cert", str(test_pki.pki / "server-chain.pem"), "-key", str(test_pki.pki / "server.key")],
        input=b"", capture_output=True, env=peer_env(), timeout=30)
    return s_client.stdout.decode(errors="replace")


def test_an_rsa_card_without_rsa_pss_serves_an_inbound_listener_with_tls12_and_pkcs1(
        test_pki: ProvisionedPki, tmp_path: Path, study: list[Path], fault_module: Path) -> None:
    """A PIV card whose certificate also allows serverAuth, and whose module lacks RSA-PSS (the fault
    module hides it), as the listener's TLS server identity. Before, its ServerKeyExchange was signed
    in OpenSSL's default order, RSA-PSS first, and every handshake failed with "[SSL] EVP lib"."""
    carol = make_token(tmp_path / "card", test_pki, "carol", "rsa", "Carol Example", server_auth=True)
    card = FaultControl(tmp_path / "card.ctl")
    card.hide_mechanisms(RSA_PSS_MECHANISMS)
    with storescp(tmp_path / "viewer", tls=None) as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", **THE_PACS)  # server_certificate = "card"
        with running_agent(carol, tmp_path / "agent", [], token="carol", inbound=[listener],
                           module=str(fault_module), env=card.env()) as agent:
            result = storescu(port_of(listener), study, tls=pacs_identity(test_pki), log_level="debug")
            handshake = handshake_as_the_pacs(test_pki, listener)
            log = agent.wait_for_log("instances stored")
        received = viewer.stored_files()
    assert result.returncode == 0, result.stdout
    assert_delivered(study, received)
    assert "Carol Example" in result.stdout  # the PACS saw the card's certificate (storescu's TLS details)
    assert "Protocol  : TLSv1.2" in handshake and "Peer signature type: RSA\n" in handshake, handshake
    assert "no RSA-PSS on the token: TLS 1.2 only (PKCS#1 v1.5)" in log and "its sessions use TLS 1.2" in log
    assert not any("hidden_mechanism" in line for line in card.log_lines())  # RSA-PSS was never even tried


def node_certificate_for_alices_key(test_pki: ProvisionedPki) -> bytes:
    """A serverAuth certificate for the key on alice's token, from the test PKI's issuing CA (PEM)."""
    issuing = CertificateAuthority(
        x509.load_pem_x509_certificate((test_pki.pki / "issuing-ca.pem").read_bytes()),
        serialization.load_pem_private_key((test_pki.pki / "private" / "issuing-ca.key").read_bytes(), None))
    alice = x509.load_pem_x509_certificate((test_pki.pki / "clients" / "alice.pem").read_bytes())
    node = issuing.issue_client(name("workstation 7"), alice.public_key(), "ws7@hospital.example",
                                not_before=alice.not_valid_before_utc, not_after=alice.not_valid_after_utc,
                                server_auth=True)
    return node.public_bytes(serialization.Encoding.PEM)


def test_a_node_key_on_a_token_without_rsa_pss_serves_tls12_with_pkcs1(
        test_pki: ProvisionedPki, tmp_path: Path, study: list[Path], fault_module: Path) -> None:
    """Many tokens lack RSA-PSS (the fault module makes alice's lack it). Before, the server's own
    signature followed OpenSSL's default order, RSA-PSS first, and a TLS 1.3 client was offered TLS
    1.3, which needs RSA-PSS: every handshake failed with "[SSL] EVP lib". bob (EC) is the card;
    alice's RSA key is the listener's node key, in a certificate issued here that allows serverAuth
    (storescu requires it of a server)."""
    card = FaultControl(tmp_path / "card.ctl")
    card.hide_mechanisms(RSA_PSS_MECHANISMS)
    chain = tmp_path / "node-chain.pem"
    chain.write_bytes(node_certificate_for_alices_key(test_pki) + (test_pki.pki / "issuing-ca.pem").read_bytes())
    node = {"server_certificate": str(chain), "server_key": "pkcs11:token=alice;id=%01;type=private",
            "server_key_pin": "env:NODE_PIN"}
    env = {**card.env(), "NODE_PIN": USER_PIN}
    with storescp(tmp_path / "viewer", tls=None) as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", **THE_PACS, **node)
        with running_agent(test_pki, tmp_path / "agent", [], token="bob", inbound=[listener],
                           module=str(fault_module), env=env) as agent:
            result = storescu(port_of(listener), study, tls=pacs_identity(test_pki), log_level="debug")
            handshake = handshake_as_the_pacs(test_pki, listener)
            tls13_only = pacs_identity(test_pki).ssl_context()
            tls13_only.minimum_version = ssl.TLSVersion.TLSv1_3
            tls13_only.check_hostname = False  # the node certificate names no host; its chain is verified
            with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
                with socket.create_connection(("127.0.0.1", port_of(listener)), timeout=15) as raw:
                    tls13_only.wrap_socket(raw, server_hostname="localhost")
            log = agent.wait_for_log("instances stored")
        received = viewer.stored_files()
    assert result.returncode == 0, result.stdout
    assert_delivered(study, received)
    assert "workstation 7" in result.stdout  # the PACS saw the node certificate (storescu's TLS details)
    assert "Protocol  : TLSv1.2" in handshake and "Peer signature type: RSA\n" in handshake, handshake
    assert ("card-agent[session]: WARNING: inbound retrieves: the node key on token 'alice': no RSA-PSS on the "
            "token: TLS 1.2 only (PKCS#1 v1.5); raw RSA (CKM_RSA_X_509) is present but not used for PSS; its "
            "connections use TLS 1.2") in log_lines(log), log
    assert not any("hidden_mechanism" in line for line in card.log_lines())  # RSA-PSS was never even tried

    listener = inbound_listener("retrieves", f"127.0.0.1:{free_port()}", **THE_PACS, tls="tls13", **node)
    with running_agent(test_pki, tmp_path / "agent13", [], token="bob", inbound=[listener],
                       module=str(fault_module), env=env) as agent:
        log = agent.wait_for_log("requires TLS 1.3")
    assert ("inbound 'retrieves' requires TLS 1.3 but the token holding its node key cannot sign with RSA-PSS, "
            "which TLS 1.3 needs for an RSA key: use tls = \"bcp195\" (TLS 1.2 then) or a PSS-capable token") in log


@pytest.mark.parametrize("change, message", [
    ({"listen": "unix:/tmp/x.sock"}, "listen: the PACS connects over the network: give HOST:PORT"),
    ({"forward": "10.1.2.3:104"}, "forward: 10.1.2.3:104 is not a loopback address"),
    ({"server_certificate": "card", "server_key": "k.pem"}, "server_key: file"),
    ({"server_key": "pkcs11:token=bob;type=private"}, "server_key_pin: give the PIN of the token holding server_key"),
    ({"server_key": "pkcs11:token=bob;type=private", "server_key_pin": "prompt"},
     "server_key_pin: must be env:VARIABLE or file:PATH"),
    ({"allowed_calling_ae_titles": ["A_TITLE_LONGER_THAN_16"]}, "is not an AE title"),
    ({"user_identity": "username"}, "unknown key 'user_identity' (the keys here: name, listen, forward"),
    ({"listen": "0.0.0.0:11114"}, "allow_from: required when listen (0.0.0.0:11114) is not a loopback address: "
                                  "list the PACS's addresses or networks"),
    ({"allow_from": ["10.1.2.3/16"]}, "allow_from: '10.1.2.3/16' has host bits set: write the network as "
                                      "10.1.0.0/16, or the single address as 10.1.2.3"),
    ({"allow_from": ["pacs.example"]}, "allow_from: 'pacs.example' is not an IP address or network"),
    ({"allow_from": []}, "allow_from: is empty: no PACS could connect"),
    ({"max_pending_handshakes": 0}, "max_pending_handshakes: must be a whole number of handshakes, at least 1"),
])
def test_bad_inbound_configuration_is_named_and_exits_2(test_pki: ProvisionedPki, tmp_path: Path,
                                                        change: dict, message: str) -> None:
    from agent_runner import write_config
    from conftest import run_card_agent

    listener = {**inbound_listener("retrieves", "127.0.0.1:11114", **THE_PACS, **node_identity(test_pki)), **change}
    config = write_config(tmp_path / "agent.toml", test_pki, [], inbound=[listener])
    result = run_card_agent("run", "--config", config, env=test_pki.env(CARD_PIN="123456"))
    assert result.returncode == 2
    assert "[[inbound]] 'retrieves'" in result.stderr and message in result.stderr, result.stderr


def test_a_node_key_pin_that_is_not_there_is_refused_at_start_up(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    # env: PINs are taken out of the environment at start-up (docs/pin-handling.md): a missing one
    # can never appear later, so the agent says so before it is ready, not at each sign-in.
    chain = tmp_path / "node-chain.pem"
    chain.write_bytes((test_pki.pki / "clients" / "bob.pem").read_bytes())
    listener = inbound_listener("retrieves", f"127.0.0.1:{free_port()}", **THE_PACS, server_certificate=str(chain),
                                server_key="pkcs11:token=bob;id=%01;type=private", server_key_pin="env:NODE_PIN")
    config = write_config(tmp_path / "agent.toml", test_pki, [], inbound=[listener])
    process = start_agent(config, tmp_path / "agent.log", test_pki.env(CARD_PIN=USER_PIN))
    try:
        process.wait(30)
    finally:
        stop_agent(process)
    assert process.returncode == 2
    assert (tmp_path / "agent.log").read_text().splitlines()[-1] == (
        f"card-agent: error: {config} [[inbound]] 'retrieves'.server_key_pin: the PIN variable NODE_PIN is not set "
        "or empty")


def test_allow_from_matches_addresses_networks_and_ipv4_mapped_peers() -> None:
    allow_from = tuple(map(parse_network, ["10.1.2.3", "10.1.0.0/16", "::1", "::ffff:192.0.2.7"]))
    assert [is_allowed(host, allow_from) for host in
            ["10.1.2.3", "10.1.200.9", "::ffff:10.1.4.4", "::1", "192.0.2.7", "10.2.0.1", "::2", "fe80::1%lo"]] == \
           [True, True, True, True, True, False, False, False]
    with pytest.raises(AllowFromError):
        parse_network("10.1.0.0/33")


def client_hello() -> bytes:
    """The first flight of a TLS client: its ClientHello."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    with pytest.raises(ssl.SSLWantReadError):
        context.wrap_bio(ssl.MemoryBIO(), outgoing).do_handshake()
    return outgoing.read()


def answer_to_client_hello(port: int, source: str) -> bytes:
    """What the listener sends back to a ClientHello from ``source``, until it closes."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        try:
            sock.sendall(client_hello())
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass  # closed while the ClientHello was unread: a reset
    return received


def bob_card_agent(test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, card: FaultControl,
                   listener: dict, tunnels: list[dict] | None = None
                   ) -> contextlib.AbstractContextManager[RunningAgent]:
    """An agent whose inbound listener's TLS server identity is bob's card (its certificate allows
    serverAuth), through the fault module so that the card's signatures can be counted and slowed."""
    card.show("bob")
    return running_agent(test_pki, tmp_path / "agent", tunnels or [], token="bob", module=str(fault_module),
                         env=card.env(), inbound=[listener])


def test_a_source_not_in_allow_from_is_closed_before_tls_at_no_card_signature(
        test_pki: ProvisionedPki, tmp_path: Path, study: list[Path], fault_module: Path) -> None:
    card = FaultControl(tmp_path / "reader.ctl")
    with storescp(tmp_path / "viewer", tls=None) as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", **THE_PACS, allow_from=["127.0.0.1"])
        with bob_card_agent(test_pki, tmp_path, fault_module, card, listener) as agent:
            agent.wait_for_log('event=sign-in subject="CN=Bob Example')
            before = card.signatures()
            answers = [answer_to_client_hello(port_of(listener), source="127.0.0.2") for _ in range(5)]
            stranger_signatures = card.signatures() - before
            result = storescu(port_of(listener), study, tls=pacs_identity(test_pki), calling_ae="PACS")
            log = agent.wait_for_log("instances stored", timeout=40)
            pacs_signatures = card.signatures() - before
        received = viewer.stored_files()
    assert answers == [b""] * 5  # not even a ServerHello
    assert stranger_signatures == 0
    assert pacs_signatures == 1  # the count does see the card: the PACS's handshake cost one signature
    assert result.returncode == 0, result.stdout
    assert_delivered(study, received)
    # Five refusals, one line: the next comes a minute later, with the count.
    assert log.count("inbound retrieves: closed a connection from 127.0.0.2 before TLS: its address is not in "
                     "allow_from") == 1, log
    assert ("inbound retrieves: the card is this listener's TLS server identity: every handshake, even with a peer "
            "then refused, waits for a card signature; prefer the workstation's node key") in log


def handshake_without_certificate(connection: socket.socket) -> bool:
    """A TLS handshake without a client certificate, then a read of the agent's answer (its alert: a
    certificate is required); whether the handshake got that far (False: closed before TLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        tls = context.wrap_socket(connection)
    except OSError:  # ssl.SSLError included
        return False
    with tls, contextlib.suppress(OSError):
        tls.recv(1)
    return True


def test_cert_less_clients_in_parallel_cost_at_most_the_cap_in_card_signatures(
        test_pki: ProvisionedPki, tmp_path: Path, study: list[Path], fault_module: Path) -> None:
    """The finding: strangers without a certificate each got a card signature before being refused,
    queued on the card ahead of the clinician's own associations. With the default
    max_pending_handshakes (4), a burst of them gets at most 4 handshakes, the others are closed
    before TLS, and the clinician waits for at most those 4 signatures. (A connection takes a
    handshake place once its ClientHello came: the burst is of ClientHellos.)"""
    cap, strangers, sign_seconds = 4, 24, 0.3
    card = FaultControl(tmp_path / "reader.ctl")
    with storescp(tmp_path / "viewer", tls=None) as viewer, \
            storescp(tmp_path / "pacs", tls=TlsServerFiles.from_pki(test_pki.pki)) as pacs:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}")  # allow_from: loopback, the default
        outbound = tunnel("pacs", pacs.port)
        with bob_card_agent(test_pki, tmp_path, fault_module, card, listener, [outbound]) as agent:
            agent.wait_for_log('event=sign-in subject="CN=Bob Example')
            card.sign_delay(int(sign_seconds * 1000))
            before = card.signatures()
            # All connect first, then all send their ClientHello at once: no handshake can end (and
            # free its place, after a card signature) before the agent has seen every ClientHello.
            connections = [socket.create_connection(("127.0.0.1", port_of(listener)), timeout=30)
                           for _ in range(strangers)]
            handshook: list[bool] = []

            def stranger(connection: socket.socket) -> None:
                handshook.append(handshake_without_certificate(connection))

            handshakes = [threading.Thread(target=stranger, args=(c,)) for c in connections]
            try:
                for thread in handshakes:
                    thread.start()
                wait_for(lambda: card.signatures() > before, timeout=10)  # strangers' signatures are under way
                started = time.monotonic()
                clinician = storescu(port_of(outbound), study[:1], calling_ae="VIEWER")
                clinician_seconds = time.monotonic() - started
                for thread in handshakes:  # each ends once refused
                    thread.join(60)
                started = time.monotonic()
                result = storescu(port_of(listener), study, tls=pacs_identity(test_pki), calling_ae="PACS")
                pacs_seconds = time.monotonic() - started
                signatures = card.signatures() - before
            finally:
                for connection in connections:
                    connection.close()
            log = agent.log()
        received = viewer.stored_files()
    assert signatures == cap + 2  # the admitted strangers' handshakes, the clinician's and the PACS's
    assert handshook.count(False) == strangers - cap  # closed before TLS
    assert clinician.returncode == 0, clinician.stdout
    # At most the cap of strangers' signatures stood before the clinician's own, plus the association.
    assert clinician_seconds < (cap + 1) * sign_seconds + 1.5, clinician_seconds
    assert result.returncode == 0, result.stdout
    assert_delivered(study, received)
    assert pacs_seconds < 3.0, pacs_seconds
    assert log.count("inbound retrieves: closed a connection from 127.0.0.1 before TLS: too many TLS handshakes in "
                     "flight (max_pending_handshakes = 4)") == 1, log


def test_refusals_are_logged_once_a_minute_per_source_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    """The minute's count, and a scan of many addresses, cannot be seen in the real agent's tests
    above without waiting a minute: the same class with its clock stepped by hand."""
    now = [1000.0]
    refusals = RefusalLog(logging.getLogger("test.refusals"), interval=60, max_sources=2, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.refusals"):
        for _ in range(5):
            refusals.refused("retrieves", "10.9.9.9", "its address is not in allow_from")
        refusals.refused("retrieves", "10.9.9.8", "its address is not in allow_from")
        refusals.refused("retrieves", "10.9.9.7", "its address is not in allow_from")  # the third source
        refusals.refused("retrieves", "10.9.9.6", "its address is not in allow_from")
        now[0] += 61
        refusals.flush()
        refusals.flush()
    assert caplog.messages == [
        "inbound retrieves: closed a connection from 10.9.9.9 before TLS: its address is not in allow_from",
        "inbound retrieves: closed a connection from 10.9.9.8 before TLS: its address is not in allow_from",
        "inbound retrieves: closed a connection from other addresses before TLS: its address is not in allow_from",
        "inbound retrieves: closed 4 more connections from 10.9.9.9 before TLS in the last 61 s: its address is "
        "not in allow_from",
        "inbound retrieves: closed 1 more connection from other addresses before TLS in the last 61 s: its "
        "address is not in allow_from",
    ]


def test_a_silent_peer_takes_no_handshake_place_and_is_closed_after_a_shorter_handshake_timeout(
        test_pki: ProvisionedPki, tmp_path: Path, study: list[Path]) -> None:
    """A connection that sends nothing takes no place of max_pending_handshakes (here 1): the PACS
    is served beside it. Before, it held that place for handshake_timeout and the PACS was closed
    out meanwhile. It is closed after 5 s of silence, or handshake_timeout (here 2 s) if shorter."""
    with storescp(tmp_path / "viewer", tls=None) as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", **THE_PACS, max_pending_handshakes=1,
                                    handshake_timeout=2, **node_identity(test_pki))
        with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]) as agent:
            with socket.create_connection(("127.0.0.1", port_of(listener)), timeout=10) as silent:
                opened = time.monotonic()
                result = storescu(port_of(listener), study, tls=pacs_identity(test_pki))
                assert result.returncode == 0, result.stdout  # the silent peer holds no handshake place
                assert silent.recv(1) == b""  # the agent gave up on it
                closed_after = time.monotonic() - opened
                log = agent.wait_for_log("it sent nothing within 2 s", timeout=10)
        received = viewer.stored_files()
    assert_delivered(study, received)
    assert 1.5 < closed_after < 4.0, closed_after
    assert ("inbound retrieves: closed a connection from 127.0.0.1 before TLS: it sent nothing within 2 s (no TLS "
            "ClientHello)") in log
    assert "max_pending_handshakes" not in log


def test_a_peer_dribbling_its_client_hello_holds_its_handshake_place_only_until_handshake_timeout(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """A byte every ~0.3 ms of a ClientHello too long to ever finish: the agent gives up at
    handshake_timeout (1 s). The old handshake loop, once past its deadline, still read with a
    1 ms timeout: a peer sending faster than that held its place (and the listener's one pending
    handshake here) for as long as it kept sending."""
    listener = inbound_listener("retrieves", f"127.0.0.1:{free_port()}", **THE_PACS, max_pending_handshakes=1,
                                handshake_timeout=1, **node_identity(test_pki))
    # A TLS handshake record announcing a ClientHello of 100,000 bytes, then its bytes one by one.
    client_hello_start = bytes([0x16, 0x03, 0x01, 0x40, 0x00, 0x01]) + (100_000).to_bytes(3, "big")
    with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]) as agent:
        with socket.create_connection(("127.0.0.1", port_of(listener)), timeout=10) as dribbler:
            started = time.monotonic()
            dribbler.sendall(client_hello_start)
            closed_after = None
            with contextlib.suppress(OSError):  # the agent's close shows as a reset or a broken pipe
                while time.monotonic() - started < 6:
                    dribbler.send(b"\x00")
                    pause = time.monotonic() + 0.0003
                    while time.monotonic() < pause:
                        pass
            closed_after = time.monotonic() - started
            log = agent.wait_for_log("did not finish in time", timeout=10)
    assert closed_after < 3.0, f"the dribbling peer was held {closed_after:.1f} s (handshake_timeout = 1 s)"
    assert re.search(r"inbound retrieves: 127\.0\.0\.1:\d+: TLS handshake with the PACS at 127\.0\.0\.1:\d+ did not "
                     r"finish in time", log), log


def test_a_connection_to_a_local_scp_that_does_not_accept_ends_with_the_card_session_at_once(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """After the handshake the agent connects to the local storage SCP; one whose accept queue is
    full holds that connect for connect_timeout (30 s here). Locking the session answers the PACS at
    once with A-ASSOCIATE-RJ (transient). Before, the connect did not see the session's end, which
    waited its whole grace (2 s) for it."""
    with ExitStack() as stack:
        viewer = stack.enter_context(socket.socket())  # never accepts
        viewer.bind(("127.0.0.1", 0))
        viewer.listen(0)
        stack.enter_context(socket.create_connection(viewer.getsockname()))  # fills its accept queue
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.getsockname()[1]}", **THE_PACS, connect_timeout=30,
                                    **node_identity(test_pki))
        agent = stack.enter_context(running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]))
        agent.wait_for_log("event=sign-in ")
        pacs = stack.enter_context(connected_as_the_pacs(test_pki, listener))
        pacs.sendall(associate_rq())
        time.sleep(0.5)  # the card session is connecting to the viewer's SCP
        ended = lock_while_the_application_reads(test_pki, agent, tmp_path / "agent", pacs)
    assert ended.closed_in_ms < 500, ended.log
    assert ended.answered_after < 1.5, f"answered {ended.answered_after:.1f} s after the lock"
    assert ended.answer[:1] == bytes([A_ASSOCIATE_RJ]), ended.answer
    assert re.search(r"inbound retrieves: 127\.0\.0\.1:\d+: card session ended: locked", ended.log), ended.log


def test_the_pacs_connection_of_an_idle_inbound_association_is_kept_alive(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """As outbound: the connection the PACS opened runs TCP keepalive after 60 s of silence once
    its association idles (read from the kernel with ss)."""
    with plain_scp() as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", **THE_PACS, **node_identity(test_pki))
        with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]) as agent:
            with connected_as_the_pacs(test_pki, listener) as pacs:
                pacs.sendall(associate_rq())
                pdu_type, _ = receive_pdu(pacs)
                assert pdu_type == 0x02, agent.log()  # A-ASSOCIATE-AC: the association idles now
                timers = keepalive_timers(f"( sport = :{port_of(listener)} )")  # the agent's end
    assert len(timers) == 1 and timers[0].endswith("sec") and 30 < int(timers[0][:-3]) <= 60, timers


def test_a_handshake_waiting_for_its_pacs_ends_with_the_card_session_at_once(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """A PACS connected to an inbound listener that stops in the middle of its ClientHello: locking
    the session closes that connection at once, as it does an outbound handshake waiting for its
    PACS. Before, the inbound handshake went on waiting, the session's end waited its whole grace
    (2 s) for it, and the card loop that was ending the session did nothing else meanwhile."""
    listener = inbound_listener("retrieves", f"127.0.0.1:{free_port()}", **THE_PACS, handshake_timeout=30,
                                **node_identity(test_pki))
    client_hello_start = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01]) + (508).to_bytes(3, "big")
    with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]) as agent:
        agent.wait_for_log("event=sign-in ")
        stalled = socket.create_connection(("127.0.0.1", port_of(listener)), timeout=10)
        stalled.sendall(client_hello_start)
        time.sleep(0.5)  # the card session is waiting for the rest of the ClientHello
        ended = lock_while_the_application_reads(test_pki, agent, tmp_path / "agent", stalled)
    assert ended.closed_in_ms < 500, ended.log
    assert ended.answer == b"" and ended.answered_after < 1.5, f"closed {ended.answered_after:.1f} s after the lock"
    assert re.search(r"inbound retrieves: 127\.0\.0\.1:\d+: TLS handshake with the PACS at 127\.0\.0\.1:\d+ "
                     r"ended with the card session: locked", ended.log), ended.log


def test_a_card_swap_ends_the_inbound_association_in_progress_and_the_next_card_serves_the_next(
        test_pki: ProvisionedPki, tmp_path: Path, study: list[Path], fault_module: Path) -> None:
    """An inbound listener works within the card session of whoever is signed in (docs/dicom.md):
    the PACS's association in progress when alice's card is swapped for bob's ends with her session,
    and the PACS's next association is served in bob's."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    with storescp(tmp_path / "viewer", tls=None) as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", **THE_PACS, **node_identity(test_pki))
        with running_agent(test_pki, tmp_path / "agent", [], token=ANY_SOFTHSM_TOKEN, module=str(fault_module),
                           env=card.env(), inbound=[listener]) as agent:
            agent.wait_for_log('event=sign-in subject="CN=Alice Example')
            agent.wait_for_log("card-agent: INFO: ready: 0 tunnel(s), 1 inbound listener(s) for ")
            with connected_as_the_pacs(test_pki, listener) as pacs:
                pacs.sendall(associate_rq())
                assert receive_pdu(pacs)[0] == 0x02, agent.log()  # A-ASSOCIATE-AC from the viewer's SCP
                card.show("bob")
                swapped = time.monotonic()
                rest = b""
                with contextlib.suppress(ConnectionResetError, ssl.SSLError):
                    while chunk := pacs.recv(65536):
                        rest += chunk
                ended_after = time.monotonic() - swapped
            agent.wait_for_log('event=sign-in subject="CN=Bob Example')
            result = storescu(port_of(listener), study, tls=pacs_identity(test_pki), calling_ae="PACS")
            log = agent.wait_for_log("instances stored", timeout=40)
        received = viewer.stored_files()
    # A functional bound (the card is looked at every 50 ms), not a performance claim.
    assert ended_after < 2.0, log
    assert rest == b""  # nothing more goes out when a session ends, not even an A-ABORT: the connection closes
    assert re.search(r"inbound retrieves: 127\.0\.0\.1:\d+: card session ended: card swapped", log), log
    assert result.returncode == 0, result.stdout
    assert_delivered(study, received)
