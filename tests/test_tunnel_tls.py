"""The tunnel's TLS as the server sees it, with `openssl s_server` and a Python TLS peer as servers:
BCP 195 offer, TLS versions and CertificateVerify schemes per key type, resumption without token
signatures, byte-exact full-duplex relay with half-close, and refusals."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from agent_runner import (
    FramedEchoServer,
    associate_rq,
    dicom_stream,
    echoed,
    running_agent,
    s_server,
    send_and_close,
    tunnel,
    wait_for,
)
from conftest import ProvisionedPki
from dicom_card_agent.dicom.pdu import A_ASSOCIATE_RJ, parse_associate_rj


@pytest.mark.parametrize("token, version_args, sigalgs, expected_version, expected_signature", [
    ("alice", ["-tls1_3"], None, "TLSv1.3", "RSA-PSS"),
    ("alice", ["-tls1_2"], "RSA-PSS+SHA256", "TLSv1.2", "RSA-PSS"),
    ("alice", ["-tls1_2"], "RSA+SHA256", "TLSv1.2", "RSA"),
    ("bob", ["-tls1_3"], None, "TLSv1.3", "ECDSA"),
    ("bob", ["-tls1_2"], None, "TLSv1.2", "ECDSA"),
])
def test_token_signs_certificate_verify_for_each_key_type_and_version(
        test_pki: ProvisionedPki, tmp_path: Path, token: str, version_args: list[str], sigalgs: str | None,
        expected_version: str, expected_signature: str) -> None:
    extra = ["-client_sigalgs", sigalgs] if sigalgs else []
    with s_server(test_pki, tmp_path, "-naccept", "1", *version_args, *extra) as (port, log_path):
        with running_agent(test_pki, tmp_path / "agent", [tunnel("raw", port)], token=token) as agent:
            send_and_close(agent.port())
            wait_for(lambda: "CONNECTION CLOSED" in log_path.read_text(errors="replace")
                     or "DONE" in log_path.read_text(errors="replace"))
            agent.wait_for_log(expected_version)
    log = log_path.read_text(errors="replace")
    common_name = {"alice": "Alice Example", "bob": "Bob Example"}[token]
    assert f"subject=O = Example Hospital Test PKI, CN = {common_name}" in log
    assert f"Peer signature type: {expected_signature}\n" in log, log
    assert "TESTSCU" in log  # the A-ASSOCIATE-RQ crossed the tunnel (s_server prints what it reads)


def test_offer_follows_bcp_195(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    with s_server(test_pki, tmp_path, "-naccept", "1", "-tls1_2") as (port, log_path):
        with running_agent(test_pki, tmp_path / "agent", [tunnel("raw", port)]):
            pass  # nothing connects yet: the agent must not contact the PACS on its own
        assert "Shared ciphers" not in log_path.read_text(errors="replace")
        with running_agent(test_pki, tmp_path / "agent2", [tunnel("raw", port)]) as agent:
            send_and_close(agent.port())
            wait_for(lambda: "Shared ciphers" in log_path.read_text(errors="replace"))
    log = log_path.read_text(errors="replace")
    assert "Supported groups: secp256r1:x25519\n" in log
    offered = next(line for line in log.splitlines() if line.startswith("Shared ciphers:")).split(":", 1)[1]
    tls12 = [c for c in offered.split(":") if not c.startswith("TLS_")]
    assert tls12 and all(c.startswith("ECDHE-") and ("GCM" in c or "CHACHA20" in c) for c in tls12), tls12


def test_tls11_only_server_is_refused_with_a_dicom_reject(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    with s_server(test_pki, tmp_path, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0") as (port, _):
        with running_agent(test_pki, tmp_path / "agent", [tunnel("old", port)]) as agent:
            answer = send_and_close(agent.port(), associate_rq())
            log = agent.wait_for_log("offers no TLS version")
    assert answer[0] == A_ASSOCIATE_RJ
    assert parse_associate_rj(answer[:10]).describe().startswith("rejected-permanent")
    assert "the agent never falls back to older TLS" in log


def test_relay_is_byte_exact_and_forwards_half_close(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    server = FramedEchoServer(test_pki)
    payload = dicom_stream(os.urandom(8 * 1024 * 1024))
    try:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("echo", server.port)]) as agent:
            answer = send_and_close(agent.port(), payload)
    finally:
        server.close()
    assert hashlib.sha256(server.received[0]).digest() == hashlib.sha256(payload).digest()
    assert echoed(answer) == payload
    alice = (test_pki.pki / "clients" / "alice.pem").read_bytes()
    from cryptography import x509

    assert x509.load_der_x509_certificate(server.peer_certificates[0]) == x509.load_pem_x509_certificate(alice)


@pytest.mark.parametrize("server_args, signature", [
    (("-tls1_2",), "RSA"),  # TLS 1.2, the server allows both: PKCS#1 v1.5 comes first
    (("-tls1_2", "-client_sigalgs", "rsa_pss_rsae_sha256"), "RSA-PSS"),  # a server that allows only PSS
    ((), "RSA-PSS"),  # TLS 1.3 allows only PSS
])
def test_an_rsa_card_with_pss_signs_as_the_one_list_of_client_signature_algorithms_says(
        test_pki: ProvisionedPki, tmp_path: Path, server_args: tuple[str, ...], signature: str) -> None:
    """docs/tls-policy.md, "Client signatures": one list for every card, written before the card
    is probed; alice's SoftHSM token can do RSA-PSS."""
    with s_server(test_pki, tmp_path, "-naccept", "1", *server_args) as (port, log_path):
        with running_agent(test_pki, tmp_path / "agent", [tunnel("raw", port)]) as agent:
            send_and_close(agent.port())
            agent.wait_for_log("full handshake")
        wait_for(lambda: "Peer signature type" in log_path.read_text(errors="replace"))
    assert f"Peer signature type: {signature}\n" in log_path.read_text(errors="replace")


def test_rsa_card_without_pss_gets_tls12_with_pkcs1(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """Many PIV/CAC cards lack RSA-PSS; the fault module makes alice's SoftHSM token lack it too."""
    from fault_pkcs11 import RSA_PSS_MECHANISMS, FaultControl, build

    card = FaultControl(tmp_path / "card.ctl")
    card.hide_mechanisms(RSA_PSS_MECHANISMS)
    module = str(build(tmp_path / "build"))
    with s_server(test_pki, tmp_path, "-naccept", "1") as (port, log_path):  # offers TLS 1.3 and 1.2
        with running_agent(test_pki, tmp_path / "agent", [tunnel("raw", port)], module=module,
                           env=card.env()) as agent:
            send_and_close(agent.port())
            log = agent.wait_for_log("TLSv1.2 full handshake")
        wait_for(lambda: "Peer signature type" in log_path.read_text(errors="replace"))
    assert "no RSA-PSS on the token: TLS 1.2 only (PKCS#1 v1.5)" in log and "its sessions use TLS 1.2" in log
    assert "Peer signature type: RSA\n" in log_path.read_text(errors="replace")
    assert not any("hidden_mechanism" in line for line in card.log_lines())  # PSS was never even tried

    with running_agent(test_pki, tmp_path / "agent13", [tunnel("raw", port, tls="tls13")], module=module,
                       env=card.env()) as agent:
        log = agent.log()
    assert "requires TLS 1.3 (tls = \"tls13\") but the token cannot sign with RSA-PSS" in log
