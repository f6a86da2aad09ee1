"""File-based TLS identities for the test peers, issued from the provisioned test PKI.

The PKI directory is the ``pki/`` of ``card-agent softhsm init`` (``test_pki.pki`` in tests): it holds
``ca-bundle.pem``, ``server-chain.pem``/``server.key`` and the CA keys in ``private/``. Client
identities whose key is on a token exist there only as certificates, so tests that need a client
with a FILE key issue one here, with the same extensions as the token identities (softhsm.pki).
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from dicom_card_agent.softhsm import pki as test_ca

CaName = Literal["issuing", "untrusted"]
KeyType = Literal["rsa", "ec"]

_CA_FILES: dict[str, tuple[str, str]] = {
    "issuing": ("issuing-ca.pem", "private/issuing-ca.key"),
    "untrusted": ("untrusted-ca.pem", "private/untrusted-ca.key"),
}


@dataclass(frozen=True)
class TlsServerFiles:
    """What a TLS server peer needs: its key, its chain (leaf first), the CAs it trusts for clients
    and optionally a CRL it checks client certificates against."""

    key: Path
    chain: Path
    ca_bundle: Path
    crl: Path | None = None

    @classmethod
    def from_pki(cls, pki_dir: Path, *, crl: bool | Path = False) -> TlsServerFiles:
        """The PKI's localhost server identity; ``crl=True`` adds ``issuing-ca.crl.pem``
        (revokes the token identity "mallory"), a path adds that CRL instead."""
        crl_path = pki_dir / "issuing-ca.crl.pem" if crl is True else (Path(crl) if crl else None)
        return cls(pki_dir / "server.key", pki_dir / "server-chain.pem", pki_dir / "ca-bundle.pem", crl_path)

    def ssl_context(self, *, require_client_cert: bool = True,
                    minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2) -> ssl.SSLContext:
        """A server context: TLS 1.2+, client certificates verified against ``ca_bundle`` (required
        unless ``require_client_cert`` is false), leaf CRL check when ``crl`` is set."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = minimum_version
        context.load_cert_chain(self.chain, self.key)
        context.load_verify_locations(cafile=self.ca_bundle)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        if self.crl is not None:
            context.load_verify_locations(cafile=self.crl)
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        return context


@dataclass(frozen=True)
class TlsClientFiles:
    """What a TLS client peer needs: the CAs it trusts for the server and optionally its own
    identity (chain leaf first, and a FILE key). Without ``chain``/``key`` the client sends no
    certificate (DCMTK ``+tla``)."""

    ca_bundle: Path
    chain: Path | None = None
    key: Path | None = None

    @classmethod
    def issue(cls, pki_dir: Path, out_dir: Path, common_name: str, **options) -> TlsClientFiles:
        """Issue a new client identity (see :func:`issue_client_file_identity`) trusting the PKI."""
        chain, key = issue_client_file_identity(pki_dir, out_dir, common_name, **options)
        return cls(pki_dir / "ca-bundle.pem", chain, key)

    @classmethod
    def anonymous(cls, pki_dir: Path) -> TlsClientFiles:
        """A client that verifies the server but has no certificate of its own."""
        return cls(pki_dir / "ca-bundle.pem")

    def ssl_context(self, *, minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
                    maximum_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        """A client context: TLS 1.2+, server verified against ``ca_bundle`` with host name check,
        our certificate presented when we have one."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = minimum_version
        if maximum_version is not None:
            context.maximum_version = maximum_version
        context.load_verify_locations(cafile=self.ca_bundle)
        if self.chain is not None:
            context.load_cert_chain(self.chain, self.key)
        return context

    @property
    def certificate(self) -> x509.Certificate | None:
        return leaf_certificate(self.chain) if self.chain is not None else None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "identity"


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def _new_key(key_type: KeyType) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def load_ca(pki_dir: Path, ca: CaName = "issuing") -> test_ca.CertificateAuthority:
    """The issuing CA (or the unrelated "untrusted" CA) of the PKI, with its private key."""
    cert_name, key_name = _CA_FILES[ca]
    certificate = x509.load_pem_x509_certificate((pki_dir / cert_name).read_bytes())
    key = serialization.load_pem_private_key((pki_dir / key_name).read_bytes(), password=None)
    return test_ca.CertificateAuthority(certificate, key)


def issue_client_file_identity(pki_dir: Path, out_dir: Path, common_name: str, *,
                               ca: CaName = "issuing", key_type: KeyType = "rsa", email: str | None = None,
                               valid_days: int = 30, expired: bool = False) -> tuple[Path, Path]:
    """Issue a clinician-like client certificate (clientAuth, digitalSignature, e-mail SAN) with a
    new FILE key; return ``(chain_path, key_path)``: ``out_dir/<cn>.chain.pem`` (leaf + CA) and
    ``out_dir/<cn>.key`` (unencrypted PKCS#8, mode 0600). ``expired=True`` makes it expire 1 day ago."""
    authority = load_ca(pki_dir, ca)
    key = _new_key(key_type)
    now = test_ca.now()
    if expired:
        not_before, not_after = now - 60 * test_ca.DAY, now - test_ca.DAY
    else:
        not_before, not_after = now - test_ca.DAY, now + valid_days * test_ca.DAY
    email = email or f"{_slug(common_name)}@hospital.example"
    certificate = authority.issue_client(test_ca.name(common_name), key.public_key(), email,
                                         not_before=not_before, not_after=not_after)
    return _write_identity(out_dir, _slug(common_name), certificate, authority.certificate, key)


def issue_server_file_identity(pki_dir: Path, out_dir: Path, host_names: Sequence[str],
                               ip_addresses: Sequence[str] = (), *, ca: CaName = "issuing") -> tuple[Path, Path]:
    """Issue a server certificate (serverAuth, SAN = ``host_names`` + ``ip_addresses``) with a new
    RSA file key, e.g. for a wrong-host-name server; return ``(chain_path, key_path)``."""
    authority = load_ca(pki_dir, ca)
    certificate, key = authority.issue_server(list(host_names), list(ip_addresses))
    stem = f"server-{_slug(host_names[0] if host_names else 'ip')}-{ca}"
    return _write_identity(out_dir, stem, certificate, authority.certificate, key)


def _write_identity(out_dir: Path, stem: str, certificate: x509.Certificate, ca_certificate: x509.Certificate,
                    key) -> tuple[Path, Path]:
    chain_path, key_path = out_dir / f"{stem}.chain.pem", out_dir / f"{stem}.key"
    _write(chain_path, _pem(certificate, ca_certificate), 0o644)
    _write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()), 0o600)
    return chain_path, key_path


def write_crl(pki_dir: Path, out_path: Path, revoked: Iterable[Path | x509.Certificate], *,
              ca: CaName = "issuing", days: int = 30, der: bool = False) -> Path:
    """A CRL of ``ca`` listing ``revoked`` (certificates or PEM files whose first certificate is
    the one to revoke), valid from yesterday for ``days`` days (0: expired since yesterday);
    written as PEM (or ``der``) to ``out_path``."""
    authority = load_ca(pki_dir, ca)
    certificates = [c if isinstance(c, x509.Certificate) else leaf_certificate(c) for c in revoked]
    crl = authority.crl(certificates, days=days)
    _write(out_path, crl.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM), 0o644)
    return out_path


def leaf_certificate(pem_path: Path) -> x509.Certificate:
    """The first certificate of a PEM file (the leaf of a chain file)."""
    return x509.load_pem_x509_certificates(Path(pem_path).read_bytes())[0]


def subject_string(certificate: x509.Certificate | bytes) -> str:
    """RFC 4514 subject of a certificate (object or DER), e.g. ``CN=Alice Example,O=Example ...``."""
    if isinstance(certificate, bytes):
        certificate = x509.load_der_x509_certificate(certificate)
    return certificate.subject.rfc4514_string()
