"""Whose certificate passes for the peer's name: an outbound tunnel's PACS by its subjectAltName
only, an inbound listener's PACS by its names compared in ASCII case only. Certificates issued by
the test PKI's issuing CA (trusted), a hand-made TLS PACS, the real agent on SoftHSM."""

from __future__ import annotations

import ssl
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent_runner import associate_rq, running_agent, send_and_close, tunnel
from conftest import ProvisionedPki
from dicom_card_agent.dicom.pdu import parse_associate_rj
from dicom_card_agent.softhsm import pki as test_ca
from dicom_card_agent.tunnel.relay import ClientVerificationError, _carries_one_of, _check_client_certificate
from peers.pki_files import _write_identity, load_ca
from test_relay_tls_records import OneConnectionServer, read_pdu


def node_certificate(test_pki: ProvisionedPki, out_dir: Path, subject: x509.Name,
                     alternative: list[x509.GeneralName] | None) -> tuple[Path, Path]:
    """A DICOM node's certificate (serverAuth and clientAuth) from the trusted issuing CA, with
    ``alternative`` as its subjectAltName (None: none at all)."""
    authority = load_ca(test_pki.pki)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    start = test_ca.now() - test_ca.DAY
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (test_ca.key_usage(digital_signature=True, key_encipherment=True), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False)]
    if alternative is not None:
        extensions.append((x509.SubjectAlternativeName(alternative), False))
    certificate = authority.issue(subject, key.public_key(), not_before=start, not_after=start + 30 * test_ca.DAY,
                                  extensions=extensions)
    out_dir.mkdir(parents=True, exist_ok=True)
    return _write_identity(out_dir, "node", certificate, authority.certificate, key)


@pytest.mark.parametrize("alternative", [None, [x509.RFC822Name("pacs@hospital.example")]],
                         ids=["no subjectAltName", "an e-mail subjectAltName"])
def test_a_pacs_named_by_its_common_name_alone_is_not_the_pacs(
        test_pki: ProvisionedPki, tmp_path: Path, alternative: list[x509.GeneralName] | None) -> None:
    """OpenSSL's host name check falls back to the subject CN of a certificate without a DNS name:
    any certificate of a trusted CA with CN=localhost (one issued to a person, with an e-mail
    address as its subjectAltName, among them) passed for the PACS "localhost". BCP 195 (RFC 9525)
    takes the subjectAltName only."""
    chain, key = node_certificate(test_pki, tmp_path / "pki", test_ca.name("localhost"), alternative)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain, key)

    def serve(context: ssl.SSLContext, raw) -> bytes:
        with context.wrap_socket(raw, server_side=True) as tls:
            return read_pdu(tls)

    server = OneConnectionServer(context, serve)
    try:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", server.port)]) as agent:
            answer = send_and_close(agent.port(), associate_rq())
            log = agent.wait_for_log("is not valid for 'localhost'")
    finally:
        server.close()
    assert parse_associate_rj(answer).describe().startswith("rejected-permanent"), answer
    assert server.result is None, "the A-ASSOCIATE-RQ reached the impostor"
    assert ("Check server_name of the tunnel; the name must be in the certificate's subjectAltName (a subject CN "
            "alone is not taken, RFC 9525)") in log, log


@pytest.mark.parametrize("common_name", ["localho\u017ft", "LOCALHOST.", "\u212aey.example"])
def test_a_look_alike_name_is_not_the_pacs_s(test_pki: ProvisionedPki, tmp_path: Path, common_name: str) -> None:
    """Unicode case folding made "localho\u017ft" (long s) and "\u212aey.example" (Kelvin sign) equal to
    "localhost" and "key.example": a certificate of the trusted CA with such a CN was admitted on
    the inbound listener as the PACS."""
    chain, _ = node_certificate(test_pki, tmp_path, test_ca.name(common_name), [x509.DNSName("other.example")])
    leaf = x509.load_pem_x509_certificate(chain.read_bytes())
    assert not _carries_one_of(leaf, ("localhost", "key.example"))
    assert _carries_one_of(leaf, ("OTHER.example",))  # ASCII case still does not matter


def test_a_refused_pacs_s_subject_reaches_the_audit_trail_escaped(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The refusal's text quoted the certificate's subject as the peer wrote it: bidi overrides,
    C1 controls and line separators reached the audit file's EventOutcomeDescription raw."""
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Eve \u202eTXT\u2028\x9b2J\x85end")])
    chain, _ = node_certificate(test_pki, tmp_path, subject, [x509.DNSName("other.example")])
    leaf_der = x509.load_pem_x509_certificate(chain.read_bytes()).public_bytes(Encoding.DER)
    config = SimpleNamespace(name="retrieves", client_pins=(), client_names=("pacs.hospital.example",),
                             client_names_by_default=False)
    with pytest.raises(ClientVerificationError) as refused:
        _check_client_certificate(SimpleNamespace(config=config), leaf_der)  # type: ignore[arg-type]
    message = str(refused.value)
    assert message.isprintable(), message
    assert "\\u202e" in message and "\\u2028" in message, message
