"""Which TLS versions a token key can serve, from the token's mechanism list."""

from __future__ import annotations

from pkcs11 import Mechanism

from dicom_card_agent.token.capabilities import tls_capability


def test_rsa_with_pss_serves_tls13_and_tls12() -> None:
    capability = tls_capability({Mechanism.RSA_PKCS, Mechanism.RSA_PKCS_PSS}, "rsa")
    assert capability.versions == ("TLSv1.3", "TLSv1.2")


def test_rsa_without_pss_is_capped_at_tls12() -> None:
    # Many PIV/CAC cards: PKCS#1 v1.5 only. TLS 1.3 forbids it in CertificateVerify.
    capability = tls_capability({Mechanism.RSA_PKCS, Mechanism.RSA_X_509}, "rsa")
    assert capability.versions == ("TLSv1.2",)
    assert "TLS 1.2 only" in capability.note and "raw RSA" in capability.note
    assert capability.signature_schemes == ("rsa_pkcs1_sha256", "rsa_pkcs1_sha384")


def test_rsa_without_signature_mechanisms_is_unusable() -> None:
    assert tls_capability({Mechanism.AES_CBC}, "rsa").versions == ()


def test_ecdsa_scheme_follows_the_curve() -> None:
    assert tls_capability({Mechanism.ECDSA}, "ec", "secp384r1").signature_schemes == ("ecdsa_secp384r1_sha384",)
    assert tls_capability({Mechanism.ECDSA}, "ec", "secp256k1").versions == ()
    assert tls_capability(set(), "ec", "secp256r1").versions == ()
