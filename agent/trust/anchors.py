"""Trust anchors, intermediates and CRLs from files, and the checks a TLS peer will make.

The CA bundle may hold roots and intermediates: self-signed certificates become trust anchors,
the others help build chains. CRLs are checked fail-closed, as OpenSSL does with CRL checking on:
when CRLs are configured, a certificate whose issuer published none among them is not accepted.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from dicom_card_agent.file_trust import check_trusted_file
from dicom_card_agent.trust.crls import FileCrl, check_chain, describe, name, read_crl_file
from dicom_card_agent.trust.errors import (  # noqa: F401
    CrlError,
    RevokedCertificateError,
    TrustError,
    TrustFileError,
    UntrustedCertificateError,
)


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, Exception):  # signature or algorithm mismatch
        return False
    return True


CA_BUNDLE = "the CA bundle"
CA_BUNDLE_RISK = "add a CA of their own, and the agent would trust the servers and clients it certifies"
CERTIFICATE_FILE = "the certificate file"
CERTIFICATE_FILE_RISK = "change the certificates the agent trusts or presents"


def load_certificates(path: Path, what: str = CERTIFICATE_FILE,
                      risk: str = CERTIFICATE_FILE_RISK) -> list[x509.Certificate]:
    """The certificates of a PEM or DER file, refused (:class:`~agent.file_trust.UnsafeFileError`)
    when another user could have changed it: whoever writes a CA bundle chooses whom the agent
    trusts, as whoever writes the configuration does. ``what`` and ``risk`` name it in that refusal."""
    check_trusted_file(path, what, risk)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TrustFileError(f"cannot read certificate file {path}: {error.strerror}") from None
    try:
        certs = (x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data
                 else [x509.load_der_x509_certificate(data)])
    except ValueError as error:
        raise TrustFileError(f"{path} holds no readable certificate (PEM or DER): {error}") from None
    return certs


def explain_chain_failure(leaf: x509.Certificate, known: Sequence[x509.Certificate], source: str,
                          error: VerificationError) -> str:
    """The reason a chain could not be built, in words: cryptography says only "candidates exhausted"
    when no CA certificate it was given issued ``leaf``."""
    text = str(error)
    if "candidates exhausted" not in text:
        return text
    named = [c for c in known if c.subject == leaf.issuer]
    if not named:
        return (f"not issued by any CA there: its issuer {name(leaf.issuer)} is not among the CA certificates of "
                f"{source}; add that CA (and its root) to the bundle if it is to be trusted")
    if not any(_issued(leaf, c) for c in named):
        return (f"its issuer {name(leaf.issuer)} is in {source}, but that CA's key did not sign it (another CA with "
                "the same name, or a forged certificate)")
    return (f"the chain through {name(leaf.issuer)} does not reach a root of {source} as a valid path (a CA "
            "certificate on the way is expired, not a CA, or not allowed to issue this certificate)")


def _issued(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


@dataclass(frozen=True)
class TrustAnchors:
    source: str
    roots: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...]
    crls: tuple[FileCrl, ...] = ()

    @classmethod
    def load(cls, ca_bundle: Path, crl_files: Sequence[Path] = ()) -> TrustAnchors:
        certs = load_certificates(ca_bundle, CA_BUNDLE, CA_BUNDLE_RISK)
        roots = tuple(c for c in certs if _is_self_signed(c))
        if not roots:
            raise TrustFileError(
                f"{ca_bundle} holds no self-signed root CA certificate: add the root of the PKI to the bundle"
            )
        return cls(
            source=str(ca_bundle),
            roots=roots,
            intermediates=tuple(c for c in certs if not _is_self_signed(c)),
            crls=tuple(crl for path in crl_files for crl in read_crl_file(path)),
        )

    def verify_client(
        self,
        leaf: x509.Certificate,
        intermediates: Iterable[x509.Certificate] = (),
        now: datetime.datetime | None = None,
    ) -> list[x509.Certificate]:
        """The chain from ``leaf`` to a root, checked as a TLS server checks a client certificate."""
        now = now or datetime.datetime.now(datetime.timezone.utc)
        verifier = PolicyBuilder().store(Store(list(self.roots))).time(now).build_client_verifier()
        try:
            # Self-signed certificates that are not anchors cannot help a chain, only confuse its search.
            helpers = [c for c in intermediates if not _is_self_signed(c)]
            verified = verifier.verify(leaf, [*helpers, *self.intermediates])
        except VerificationError as error:
            why = explain_chain_failure(leaf, [*self.roots, *self.intermediates], self.source, error)
            raise UntrustedCertificateError(f"certificate {describe(leaf)} does not chain to a CA in {self.source}: "
                                            f"{why}") from None
        chain = list(verified.chain)
        self.check_revocation(chain, now)
        return chain

    def check_revocation(self, chain: Sequence[x509.Certificate], now: datetime.datetime) -> None:
        if self.crls:
            check_chain(chain, self.crls, now)
