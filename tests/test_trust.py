"""Chain and CRL checks against the provisioned test PKI."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from conftest import ProvisionedPki
from dicom_card_agent.trust.anchors import (
    CrlError,
    RevokedCertificateError,
    TrustAnchors,
    TrustFileError,
    UntrustedCertificateError,
)
from dicom_card_agent.trust.crls import LOOK_INTERVAL, CrlFileError, CrlStore
from peers.pki_files import write_crl


def client(test_pki: ProvisionedPki, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((test_pki.pki / "clients" / f"{name}.pem").read_bytes())


def test_chain_from_leaf_to_root(test_pki: ProvisionedPki) -> None:
    chain = TrustAnchors.load(test_pki.ca_bundle, [test_pki.crl]).verify_client(client(test_pki, "alice"))
    assert [c.subject.rfc4514_string().split(",")[0] for c in chain] == [
        "CN=Alice Example", "CN=Test Issuing CA", "CN=Test Root CA"]


def test_root_only_bundle_uses_intermediates_given_by_the_token(test_pki: ProvisionedPki) -> None:
    anchors = TrustAnchors.load(test_pki.pki / "root-ca.pem")
    with pytest.raises(UntrustedCertificateError):
        anchors.verify_client(client(test_pki, "bob"))
    issuing = x509.load_pem_x509_certificate((test_pki.pki / "issuing-ca.pem").read_bytes())
    assert len(anchors.verify_client(client(test_pki, "bob"), [issuing])) == 3


def test_revoked_certificate(test_pki: ProvisionedPki) -> None:
    with pytest.raises(RevokedCertificateError, match="CN=Mallory Example.*was revoked on"):
        TrustAnchors.load(test_pki.ca_bundle, [test_pki.crl]).verify_client(client(test_pki, "mallory"))


def test_missing_crl_for_the_issuer_fails_closed(test_pki: ProvisionedPki) -> None:
    anchors = TrustAnchors.load(test_pki.ca_bundle, [test_pki.pki / "root-ca.crl.pem"])
    with pytest.raises(CrlError, match="no CRL from CN=Test Issuing CA"):
        anchors.verify_client(client(test_pki, "alice"))


def test_expired_crl_is_refused(test_pki: ProvisionedPki) -> None:
    anchors = TrustAnchors.load(test_pki.ca_bundle, [test_pki.crl])
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=40)
    with pytest.raises(CrlError, match="expired on .*fetch a current CRL"):
        anchors.check_revocation(anchors.verify_client(client(test_pki, "alice")), later)


def test_untrusted_issuer_is_named(test_pki: ProvisionedPki) -> None:
    with pytest.raises(UntrustedCertificateError, match="issuer CN=Untrusted Test CA"):
        TrustAnchors.load(test_pki.ca_bundle).verify_client(client(test_pki, "stranger"))


def test_bundle_without_root_or_unreadable(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    with pytest.raises(TrustFileError, match="no self-signed root CA"):
        TrustAnchors.load(test_pki.pki / "issuing-ca.pem")
    with pytest.raises(TrustFileError, match="cannot read certificate file"):
        TrustAnchors.load(tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(TrustFileError, match="no readable certificate"):
        TrustAnchors.load(tmp_path / "junk.pem")


def test_a_crl_file_holding_a_certificate_is_refused_by_name(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    pem = tmp_path / "crl-and-ca.pem"
    pem.write_bytes(test_pki.crl.read_bytes() + (test_pki.pki / "untrusted-ca.pem").read_bytes())
    der = tmp_path / "ca.der"
    der.write_bytes(x509.load_pem_x509_certificate((test_pki.pki / "untrusted-ca.pem").read_bytes())
                    .public_bytes(Encoding.DER))
    with pytest.raises(CrlFileError, match=f"CRL file {pem} holds CERTIFICATE besides CRLs"):
        TrustAnchors.load(test_pki.ca_bundle, [pem])
    with pytest.raises(CrlFileError, match=f"CRL file {der} holds a certificate, not a CRL"):
        TrustAnchors.load(test_pki.ca_bundle, [der])


def test_der_crl(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    der = tmp_path / "issuing.crl"
    der.write_bytes(x509.load_pem_x509_crl(test_pki.crl.read_bytes()).public_bytes(Encoding.DER))
    with pytest.raises(RevokedCertificateError, match=f"CN=Mallory Example.*according to CRL file {der}"):
        TrustAnchors.load(test_pki.ca_bundle, [der]).verify_client(client(test_pki, "mallory"))


def test_crl_store_rereads_a_changed_file_and_keeps_the_last_good_crls(test_pki: ProvisionedPki,
                                                                       tmp_path: Path) -> None:
    crl = write_crl(test_pki.pki, tmp_path / "issuing.crl.pem", [])
    clock = [0.0]
    store = CrlStore([crl], clock=lambda: clock[0])
    chain = TrustAnchors.load(test_pki.ca_bundle).verify_client(client(test_pki, "bob"))
    store.check(chain)
    write_crl(test_pki.pki, crl, [chain[0]])
    store.check(chain)  # not looked at again yet
    clock[0] += LOOK_INTERVAL
    with pytest.raises(RevokedCertificateError, match="CN=Bob Example"):
        store.check(chain)
    crl.write_text("-----BEGIN X509 CRL-----\nhalf written")
    clock[0] += LOOK_INTERVAL
    with pytest.raises(RevokedCertificateError, match="CN=Bob Example"):
        store.check(chain)
    [row] = store.status()
    assert row["state"] == "unusable" and f"CRL file {crl} holds an incomplete PEM block" in str(row["error"])
    assert row["crls"] == [{"issuer": "CN=Test Issuing CA,O=Example Hospital Test PKI",
                            "next_update": row["crls"][0]["next_update"], "expired": False}]


def test_a_crl_only_for_ca_certificates_does_not_cover_a_leaf(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """Such a CRL never lists a leaf, so taking it as the leaf's CRL would pass revoked leaves."""
    from cryptography.hazmat.primitives import hashes

    from peers.pki_files import load_ca

    issuing = load_ca(test_pki.pki)
    scope = x509.IssuingDistributionPoint(full_name=None, relative_name=None, only_contains_user_certs=False,
                                          only_contains_ca_certs=True, only_some_reasons=None, indirect_crl=False,
                                          only_contains_attribute_certs=False)
    base = x509.load_pem_x509_crl(write_crl(test_pki.pki, tmp_path / "plain.pem", []).read_bytes())
    builder = (x509.CertificateRevocationListBuilder().issuer_name(base.issuer)
               .last_update(base.last_update_utc).next_update(base.next_update_utc)  # type: ignore[arg-type]
               .add_extension(scope, critical=True))
    (tmp_path / "ca-only.pem").write_bytes(builder.sign(issuing.key, hashes.SHA256()).public_bytes(Encoding.PEM))
    anchors = TrustAnchors.load(test_pki.ca_bundle, [tmp_path / "ca-only.pem"])
    with pytest.raises(CrlError, match="no CRL from CN=Test Issuing CA"):
        anchors.verify_client(client(test_pki, "alice"))
