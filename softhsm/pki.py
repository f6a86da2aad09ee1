"""A small PKI shaped like the seed thesis: an offline root CA, an issuing CA below it, server and
client certificates from the issuing CA, a CRL, and an unrelated CA for negative tests.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ORGANIZATION = "Example Hospital Test PKI"
DAY = datetime.timedelta(days=1)


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def name(common_name: str, organization: str = ORGANIZATION) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


@dataclass(frozen=True)
class CertificateAuthority:
    certificate: x509.Certificate
    key: rsa.RSAPrivateKey

    @property
    def subject(self) -> x509.Name:
        return self.certificate.subject

    def issue(
        self,
        subject: x509.Name,
        public_key: CertificatePublicKeyTypes,
        *,
        not_before: datetime.datetime,
        not_after: datetime.datetime,
        extensions: list[tuple[x509.ExtensionType, bool]],
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(self.key, hashes.SHA256())

    def issue_ca(self, common_name: str, *, years: int, path_length: int | None = 0) -> CertificateAuthority:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        start = now() - DAY
        cert = self.issue(name(common_name), key.public_key(), not_before=start,
                          not_after=start + years * 365 * DAY, extensions=ca_extensions(path_length))
        return CertificateAuthority(cert, key)

    def issue_client(self, subject: x509.Name, public_key: CertificatePublicKeyTypes, email: str, *,
                     not_before: datetime.datetime, not_after: datetime.datetime,
                     server_auth: bool = False, sources: RevocationSources | None = None) -> x509.Certificate:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server_auth else [])
        return self.issue(subject, public_key, not_before=not_before, not_after=not_after, extensions=[
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (key_usage(digital_signature=True), True),
            (x509.ExtendedKeyUsage(usages), False),
            (x509.SubjectAlternativeName([x509.RFC822Name(email)]), False),
            *(sources.extensions() if sources else []),
        ])

    def issue_ocsp_signer(self, common_name: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
        """A delegated OCSP responder (RFC 6960 4.2.2.2): id-kp-OCSPSigning, issued by this CA."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        start = now() - DAY
        cert = self.issue(name(common_name), key.public_key(), not_before=start, not_after=start + 365 * DAY,
                          extensions=[
                              (x509.BasicConstraints(ca=False, path_length=None), True),
                              (key_usage(digital_signature=True), True),
                              (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), False),
                              (x509.OCSPNoCheck(), False),
                          ])
        return cert, key

    def issue_server(self, host_names: list[str], ip_addresses: list[str],
                     sources: RevocationSources | None = None) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
        import ipaddress

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        start = now() - DAY
        names: list[x509.GeneralName] = [x509.DNSName(h) for h in host_names]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        cert = self.issue(name(host_names[0]), key.public_key(), not_before=start, not_after=start + 365 * DAY,
                          extensions=[
                              (x509.BasicConstraints(ca=False, path_length=None), True),
                              (key_usage(digital_signature=True, key_encipherment=True), True),
                              # A DICOM node is a TLS server and, when it sends retrieved images
                              # (C-MOVE) or audit messages, a TLS client: both purposes.
                              (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), False),
                              (x509.SubjectAlternativeName(names), False),
                              *(sources.extensions() if sources else []),
                          ])
        return cert, key

    def crl(self, revoked: list[x509.Certificate], *, days: int = 30) -> x509.CertificateRevocationList:
        start = now() - DAY
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.subject)
            .last_update(start)
            .next_update(start + days * DAY)
            .add_extension(x509.CRLNumber(1), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        for cert in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(cert.serial_number)
                .revocation_date(start)
                .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
                .build()
            )
        return builder.sign(self.key, hashes.SHA256())


@dataclass(frozen=True)
class RevocationSources:
    """Where a certificate says its status is published: an OCSP responder (Authority Information
    Access) and a CRL distribution point, as a hospital PKI's issuing CA writes them."""

    ocsp_url: str | None = None
    crl_url: str | None = None

    def extensions(self) -> list[tuple[x509.ExtensionType, bool]]:
        extensions: list[tuple[x509.ExtensionType, bool]] = []
        if self.ocsp_url:
            extensions.append((x509.AuthorityInformationAccess([x509.AccessDescription(
                x509.AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(self.ocsp_url))]), False))
        if self.crl_url:
            extensions.append((x509.CRLDistributionPoints([x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(self.crl_url)], relative_name=None, reasons=None,
                crl_issuer=None)]), False))
        return extensions


def key_usage(*, digital_signature: bool = False, key_encipherment: bool = False, ca: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=key_encipherment,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )


def ca_extensions(path_length: int | None) -> list[tuple[x509.ExtensionType, bool]]:
    return [
        (x509.BasicConstraints(ca=True, path_length=path_length), True),
        (key_usage(digital_signature=True, ca=True), True),
    ]


def root_ca(common_name: str, *, years: int = 20) -> CertificateAuthority:
    """A self-signed root; in the thesis it is taken offline once the issuing CA exists."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = name(common_name)
    start = now() - DAY
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + years * 365 * DAY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    for extension, critical in ca_extensions(None):
        builder = builder.add_extension(extension, critical=critical)
    return CertificateAuthority(builder.sign(key, hashes.SHA256()), key)
