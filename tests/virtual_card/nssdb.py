"""A virtual card's contents: an NSS database holding one RSA key and its certificate from the test PKI.

The key is generated inside the NSS database (``certutil -R`` makes it and a CSR), so like a real
card's key it never exists as a file; the test PKI's issuing CA signs the CSR's public key with
the same client profile as the SoftHSM identities (softhsm.pki ``issue_client``), and the
certificate is imported next to the key (``certutil -A``). The database has an empty password:
libcacard then accepts any PIN (design notes, section 2), which is what the tests need.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from dicom_card_agent.softhsm import pki as test_ca
from peers.pki_files import load_ca

CERTUTIL = "certutil"


@dataclass(frozen=True)
class CardContents:
    """An NSS database for one virtual card."""

    db: Path
    nickname: str
    certificate: x509.Certificate

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()


def _certutil(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([CERTUTIL, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"certutil {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def make_card(pki_dir: Path, directory: Path, nickname: str, common_name: str, *, valid_days: int = 30) -> CardContents:
    """Create ``directory`` as an NSS db with a new RSA-2048 key and a certificate for ``common_name``
    issued by the PKI's issuing CA (clientAuth, digitalSignature, e-mail SAN)."""
    directory.mkdir(parents=True, exist_ok=True)
    db = f"sql:{directory}"
    _certutil("-N", "--empty-password", "-d", db)
    noise = directory / "noise.bin"
    noise.write_bytes(os.urandom(64))  # certutil wants seed bytes; it would otherwise read the keyboard
    csr_path = directory / f"{nickname}.csr.der"
    subject = test_ca.name(common_name)
    _certutil("-R", "-d", db, "-s", subject.rfc4514_string(), "-k", "rsa", "-g", "2048", "-Z", "SHA256",
              "-z", str(noise), "-o", str(csr_path))
    noise.unlink()
    csr = x509.load_der_x509_csr(csr_path.read_bytes())
    if not csr.is_signature_valid:
        raise RuntimeError(f"certutil made a CSR with a bad signature: {csr_path}")
    authority = load_ca(pki_dir)
    now = test_ca.now()
    email = f"{nickname}@hospital.example"
    certificate = authority.issue_client(csr.subject, csr.public_key(), email, not_before=now - test_ca.DAY,
                                         not_after=now + valid_days * test_ca.DAY)
    cert_path = directory / f"{nickname}.der"
    cert_path.write_bytes(certificate.public_bytes(Encoding.DER))
    # ",," : no trust flags: it is the card's own certificate, not a trust anchor.
    _certutil("-A", "-d", db, "-n", nickname, "-t", ",,", "-i", str(cert_path))
    listed = _certutil("-K", "-d", db).stdout
    if nickname not in listed:  # the key must have been matched to the certificate
        raise RuntimeError(f"certutil did not pair the key with {nickname!r}:\n{listed}")
    return CardContents(directory, nickname, certificate)
