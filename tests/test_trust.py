"""Chain and CRL checks against the provisioned test PKI."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509

from agent.trust.anchors import (CrlError, RevokedCertificateError, TrustAnchors, TrustFileError,
                                 UntrustedCertificateError)
from conftest import ProvisionedPki


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
