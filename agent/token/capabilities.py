"""What TLS can do with a token key, worked out from the token's mechanism list.

TLS 1.3 signs CertificateVerify with RSA-PSS or ECDSA only (RFC 8446 4.2.3); PKCS#1 v1.5 is left
for TLS 1.2. A token without an RSA-PSS mechanism therefore caps an RSA identity at TLS 1.2.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Mechanism

_RSA_PSS = {Mechanism.RSA_PKCS_PSS, Mechanism.SHA256_RSA_PKCS_PSS, Mechanism.SHA384_RSA_PKCS_PSS}
_RSA_PKCS1 = {Mechanism.RSA_PKCS, Mechanism.SHA256_RSA_PKCS, Mechanism.SHA384_RSA_PKCS}
_ECDSA = {Mechanism.ECDSA, Mechanism.ECDSA_SHA256, Mechanism.ECDSA_SHA384}
# TLS 1.3 binds each ECDSA scheme to its curve.
_ECDSA_SCHEMES = {"secp256r1": "ecdsa_secp256r1_sha256", "secp384r1": "ecdsa_secp384r1_sha384",
                  "secp521r1": "ecdsa_secp521r1_sha512"}


@dataclass(frozen=True)
class TlsCapability:
    """The TLS versions and CertificateVerify schemes a key on this token can serve."""

    tls13: bool
    tls12: bool
    signature_schemes: tuple[str, ...]
    note: str

    @property
    def versions(self) -> tuple[str, ...]:
        return tuple(v for v, ok in (("TLSv1.3", self.tls13), ("TLSv1.2", self.tls12)) if ok)

    def as_dict(self) -> dict[str, object]:
        return {"versions": list(self.versions), "signature_schemes": list(self.signature_schemes), "note": self.note}


def tls_capability(mechanisms: set, key_type: str, curve: str | None = None) -> TlsCapability:
    """``key_type`` is ``"rsa"`` or ``"ec"``; ``curve`` the named curve of an EC key."""
    if key_type == "rsa":
        pss = bool(mechanisms & _RSA_PSS)
        pkcs1 = bool(mechanisms & _RSA_PKCS1)
        raw = Mechanism.RSA_X_509 in mechanisms
        schemes = (("rsa_pss_rsae_sha256", "rsa_pss_rsae_sha384") if pss else ()) + (
            ("rsa_pkcs1_sha256", "rsa_pkcs1_sha384") if pkcs1 else ()
        )
        if pss:
            note = "RSA-PSS on the token: TLS 1.3 and 1.2"
        elif pkcs1:
            note = "no RSA-PSS on the token: TLS 1.2 only (PKCS#1 v1.5)" + (
                "; raw RSA (CKM_RSA_X_509) is present but not used for PSS" if raw else ""
            )
        else:
            note = "the token offers no RSA signature mechanism TLS can use"
        return TlsCapability(tls13=pss, tls12=pss or pkcs1, signature_schemes=schemes, note=note)
    if key_type == "ec":
        if not mechanisms & _ECDSA:
            return TlsCapability(False, False, (), "the token offers no ECDSA mechanism")
        scheme = _ECDSA_SCHEMES.get(curve or "")
        if scheme is None:
            return TlsCapability(False, False, (), f"curve {curve} is not allowed in TLS (BCP 195: P-256, P-384)")
        return TlsCapability(True, True, (scheme,), f"ECDSA on {curve}: TLS 1.3 and 1.2")
    return TlsCapability(False, False, (), f"{key_type} keys are not supported for TLS client authentication")


def key_kind(certificate: x509.Certificate) -> tuple[str, int, str | None]:
    """The key type (``"rsa"``, ``"ec"``, else the key class's name), size and EC curve of the
    certificate's key, as :func:`tls_capability` takes them."""
    public_key = certificate.public_key()
    if isinstance(public_key, rsa.RSAPublicKey):
        return "rsa", public_key.key_size, None
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "ec", public_key.curve.key_size, public_key.curve.name
    return type(public_key).__name__.lower(), 0, None
