"""How the tunnel judges the server, and how it tells the application and the log when it says no.

The server is `openssl s_server` with certificates from the test PKI; the application sends a real
A-ASSOCIATE-RQ and must get a well-formed A-ASSOCIATE-RJ back, never a bare reset."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID

from agent_runner import associate_rq, free_port, running_agent, s_server, send_and_close, tunnel, wait_for
from conftest import ProvisionedPki
from dicom_card_agent.dicom.pdu import A_ASSOCIATE_RJ, parse_associate_rj


def server_fingerprint(test_pki: ProvisionedPki, chain: str) -> str:
    leaf = x509.load_pem_x509_certificates((test_pki.pki / chain).read_bytes())[0]
    return hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()


def attempt(test_pki: ProvisionedPki, tmp_path: Path, *, server: dict | None = None, server_args: tuple = (),
            token: str = "alice", **tunnel_settings) -> tuple[bytes, str]:
    """One association attempt through the agent; returns what the application got and the agent's log."""
    with s_server(test_pki, tmp_path, *server_args, **(server or {})) as (port, server_log):
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", port, **tunnel_settings)],
                           token=token) as agent:
            answer = send_and_close(agent.port(), associate_rq())
            wait_for(lambda: "tunnel pacs: uid" in agent.log())
            return answer, agent.log()


def assert_rejected(answer: bytes, log: str, message: str) -> None:
    assert answer[:1] == bytes([A_ASSOCIATE_RJ]) and len(answer) == 10, answer[:20]
    parse_associate_rj(answer)
    assert message in log, log


def assert_accepted(answer: bytes, log: str) -> None:
    assert "associate_rq" not in log
    assert " to 127.0.0.1:" in log and (" full handshake " in log or " resumed " in log), log
    assert b"" == answer or answer[:1] != bytes([A_ASSOCIATE_RJ])


def test_untrusted_server_is_rejected(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    answer, log = attempt(test_pki, tmp_path, server={"cert": "untrusted-server-chain.pem",
                                                       "key": "untrusted-server.key"})
    assert_rejected(answer, log, "is not trusted: unable to get local issuer certificate; its certificate must "
                                 "chain to a CA in [trust] ca")
    assert parse_associate_rj(answer).describe().startswith("rejected-permanent")


def test_wrong_host_name_is_rejected(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    answer, log = attempt(test_pki, tmp_path, server_name="pacs.other.example")
    assert_rejected(answer, log, "presented a certificate that is not valid for 'pacs.other.example'")


def test_pin_mismatch_is_rejected(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    answer, log = attempt(test_pki, tmp_path, server_pins=["ab" * 32])
    assert_rejected(answer, log, "which is not among server_pins of tunnel 'pacs'")


def test_chain_and_matching_pin_are_accepted(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    answer, log = attempt(test_pki, tmp_path, server_pins=[server_fingerprint(test_pki, "server-chain.pem")])
    assert_accepted(answer, log)


def test_pin_only_trusts_a_server_outside_the_pki_when_chosen_explicitly(test_pki: ProvisionedPki,
                                                                          tmp_path: Path) -> None:
    untrusted = {"cert": "untrusted-server-chain.pem", "key": "untrusted-server.key"}
    pin = server_fingerprint(test_pki, "untrusted-server-chain.pem")
    answer, log = attempt(test_pki, tmp_path / "a", server=untrusted, server_pins=[pin], verify="pin")
    assert_accepted(answer, log)
    answer, log = attempt(test_pki, tmp_path / "b", server=untrusted, server_pins=[pin], verify="pin",
                          server_name="pacs.other.example")
    assert_rejected(answer, log, "is not valid for 'pacs.other.example' (hostname verification is always on")


def test_require_issuer(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    answer, log = attempt(test_pki, tmp_path / "a", require_issuer=str(test_pki.pki / "issuing-ca.pem"))
    assert_accepted(answer, log)
    answer, log = attempt(test_pki, tmp_path / "b", require_issuer=str(test_pki.pki / "untrusted-ca.pem"))
    assert_rejected(answer, log, "does not pass through the required issuer CN=Untrusted Test CA")


@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
def test_server_not_trusting_our_issuer(test_pki: ProvisionedPki, tmp_path: Path, version: str) -> None:
    answer, log = attempt(test_pki, tmp_path, server={"ca": "untrusted-ca.pem"}, server_args=(version,))
    assert_rejected(answer, log, "server rejected our certificate (CN=Alice Example, issuer CN=Test Issuing CA)")
    assert "check that the PACS trusts this issuer" in log


def test_revoked_client_is_rejected_by_a_server_checking_the_crl(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    # revocation = "off": the agent's own check would stop mallory at sign-in; this is about the server's answer.
    answer, log = attempt(test_pki, tmp_path, token="mallory", revocation="off",
                          server_args=("-CRL", str(test_pki.crl), "-crl_check", "-tls1_2"))
    assert_rejected(answer, log, "server rejected our certificate (CN=Mallory Example, issuer CN=Test Issuing CA): "
                                 "the server reports our certificate revoked")


def test_unreachable_pacs_is_a_transient_reject(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    with running_agent(test_pki, tmp_path, [tunnel("pacs", free_port())]) as agent:
        answer = send_and_close(agent.port(), associate_rq())
        log = agent.wait_for_log("cannot reach the PACS")
    assert_rejected(answer, log, "connection refused (is the PACS running and listening on that port?)")
    assert parse_associate_rj(answer).describe().startswith("rejected-transient")


def test_server_knowing_only_the_root_accepts_the_card(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The agent sends the card's certificate with the issuing CA, so the root is all a PACS needs.

    The server's own certificate comes from the unrelated CA (trusted here by pin), so that the
    issuing CA can reach the server only in the chain the agent sends."""
    answer, log = attempt(test_pki, tmp_path, server={"cert": "untrusted-server-chain.pem",
                                                       "key": "untrusted-server.key", "ca": "root-ca.pem"},
                          verify="pin", server_pins=[server_fingerprint(test_pki, "untrusted-server-chain.pem")])
    assert_accepted(answer, log)


def test_a_server_certificate_with_a_malformed_extension_is_refused_not_a_crash(test_pki: ProvisionedPki,
                                                                                 tmp_path: Path) -> None:
    """A non-critical Authority Information Access whose content is no list of access descriptions:
    OpenSSL's strict chain check accepts it, cryptography cannot parse it. The revocation check
    raised ValueError out of the tunnel: a traceback, and a reset for the application instead of
    an A-ASSOCIATE-RJ. It now counts as naming no source, which revocation = "require" refuses."""
    issuing = x509.load_pem_x509_certificate((test_pki.pki / "issuing-ca.pem").read_bytes())
    issuing_key = serialization.load_pem_private_key((test_pki.pki / "private" / "issuing-ca.key").read_bytes(), None)
    server = x509.load_pem_x509_certificates((test_pki.pki / "server-chain.pem").read_bytes())[0]
    server_key = serialization.load_pem_private_key((test_pki.pki / "server.key").read_bytes(), None)
    builder = (x509.CertificateBuilder().subject_name(server.subject).issuer_name(issuing.subject)
               .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(server.not_valid_before_utc).not_valid_after(server.not_valid_after_utc))
    for extension in server.extensions:
        if extension.oid not in (ExtensionOID.AUTHORITY_INFORMATION_ACCESS, ExtensionOID.CRL_DISTRIBUTION_POINTS):
            builder = builder.add_extension(extension.value, extension.critical)
    builder = builder.add_extension(
        x509.UnrecognizedExtension(ExtensionOID.AUTHORITY_INFORMATION_ACCESS, b"\x30\x03\x02\x01\x05"), False)
    odd = builder.sign(issuing_key, hashes.SHA256())  # type: ignore[arg-type]
    chain = tmp_path / "odd-server-chain.pem"
    chain.write_bytes(odd.public_bytes(Encoding.PEM) + issuing.public_bytes(Encoding.PEM))
    with s_server(test_pki, tmp_path, cert=str(chain)) as (port, _), \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", port, revocation="require")],
                          trust={"crl": []}) as agent:  # no CRL file: the certificate's sources decide
        answer = send_and_close(agent.port(), associate_rq())
        log = agent.wait_for_log("tunnel pacs: uid")
    assert_rejected(answer, log, "revocation: the Authority Information Access extension of CN=localhost")
    assert "names no OCSP responder nor CRL distribution point" in log
    assert "internal error" not in log and "Traceback" not in log, log
