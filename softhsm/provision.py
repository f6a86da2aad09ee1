"""``card-agent softhsm init DIR``: test PKI files and SoftHSM tokens, all inside DIR."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dicom_card_agent.softhsm import pki, responder
from dicom_card_agent.softhsm.tokens import (
    ca_certificate_id,
    generate_key_pair,
    init_token,
    public_key_of,
    store_certificate,
    token_signed_csr,
    write_softhsm_conf,
)
from dicom_card_agent.token.profiles import get_profile

USER_PIN = "123456"
SO_PIN = "12345678"
KEY_ID = b"\x01"  # like PIV slot 9A, the authentication key
MARKER = ".provisioned"
DEFAULT_REVOCATION_PORT = 8960


@dataclass(frozen=True)
class TestIdentity:
    label: str
    key_type: str
    common_name: str
    issuer: str  # "issuing" or "untrusted"
    expired: bool = False
    revoked: bool = False
    server_auth: bool = False  # the certificate may also identify a TLS server (inbound listeners)
    purpose: str = ""

    @property
    def email(self) -> str:
        return f"{self.label}@hospital.example"


IDENTITIES = (
    TestIdentity("alice", "rsa", "Alice Example", "issuing", purpose="RSA-2048 clinician, usable"),
    TestIdentity("bob", "ec", "Bob Example", "issuing", server_auth=True,
                 purpose="EC P-256 clinician, usable; also serverAuth"),
    TestIdentity("mallory", "rsa", "Mallory Example", "issuing", revoked=True,
                 purpose="valid certificate listed in the issuing CA's CRL"),
    TestIdentity("expired", "rsa", "Expired Example", "issuing", expired=True,
                 purpose="certificate no longer valid"),
    TestIdentity("stranger", "rsa", "Stranger Example", "untrusted",
                 purpose="certificate from the unrelated (untrusted) CA"),
)


@dataclass(frozen=True)
class ProvisionResult:
    directory: Path
    softhsm_conf: Path
    created: bool

    @property
    def export_line(self) -> str:
        return f"export SOFTHSM2_CONF={self.softhsm_conf}"


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _written_files() -> tuple[str, ...]:
    """Every file this command writes in DIR, by relative path (and the SoftHSM token store, tokens/)."""
    # The test responder (`softhsm ocsp-responder`) writes its pid and log file next to its index.
    pki_files = (*PKI_FILES, *SECRET_PKI_FILES, *(f"clients/{i.label}.pem" for i in IDENTITIES),
                 responder.PID_FILE, responder.LOG_FILE)
    return ("softhsm2.conf", "README.txt", MARKER, *(f"pki/{name}" for name in pki_files))


PKI_FILES = ("root-ca.pem", "issuing-ca.pem", "ca-bundle.pem", "issuing-ca.crl.pem", "root-ca.crl.pem",
             "server-chain.pem", "untrusted-ca.pem", "untrusted-server-chain.pem", "ocsp-signer.pem",
             "ocsp/index.txt", "ocsp/port", "crl-http/issuing-ca.crl", "crl-http/root-ca.crl")
SECRET_PKI_FILES = ("server.key", "untrusted-server.key", "private/root-ca.key", "private/issuing-ca.key",
                    "private/untrusted-ca.key", "private/ocsp-signer.key")


def _remove_earlier_run(directory: Path) -> None:
    """What an earlier run wrote, and nothing else: a file of the user's in DIR or pki/ stays."""
    tokens = directory / "tokens"
    if tokens.is_dir():  # SoftHSM's token store for these tokens: recreated whole
        shutil.rmtree(tokens)
    for name in _written_files():
        (directory / name).unlink(missing_ok=True)
    for folder in ("pki/private", "pki/clients", "pki/ocsp", "pki/crl-http", "pki"):
        try:
            (directory / folder).rmdir()
        except OSError:  # missing, or it holds files of the user's
            pass


def provision(directory: Path, *, force: bool = False, revocation_port: int = DEFAULT_REVOCATION_PORT
              ) -> ProvisionResult:
    """Create the test PKI and tokens in ``directory``; a complete earlier run is kept unless ``force``.

    The issuing CA's certificates name an OCSP responder at http://127.0.0.1:PORT/ocsp and a CRL at
    http://127.0.0.1:PORT/issuing-ca.crl: `card-agent softhsm ocsp-responder start` answers there."""
    directory = directory.resolve()
    conf = directory / "softhsm2.conf"
    if (directory / MARKER).exists() and not force:
        return ProvisionResult(directory, conf, created=False)
    _remove_earlier_run(directory)
    directory.mkdir(parents=True, exist_ok=True)
    conf = write_softhsm_conf(directory)

    root = pki.root_ca("Test Root CA")
    issuing = root.issue_ca("Test Issuing CA", years=10)
    untrusted = pki.root_ca("Untrusted Test CA")
    cas = {"issuing": issuing, "untrusted": untrusted}
    sources = responder.sources_at(revocation_port)
    certificates = _provision_tokens(conf, cas, sources)

    pki_dir = directory / "pki"
    server, server_key = issuing.issue_server(["localhost"], ["127.0.0.1", "::1"], sources)
    signer, signer_key = issuing.issue_ocsp_signer("Test Issuing CA OCSP Responder")
    untrusted_server, untrusted_server_key = untrusted.issue_server(["localhost"], ["127.0.0.1", "::1"])
    revoked = [certificates[i.label] for i in IDENTITIES if i.revoked]
    files = {
        "root-ca.pem": _pem(root.certificate),
        "issuing-ca.pem": _pem(issuing.certificate),
        "ca-bundle.pem": _pem(root.certificate, issuing.certificate),
        "issuing-ca.crl.pem": issuing.crl(revoked).public_bytes(serialization.Encoding.PEM),
        "root-ca.crl.pem": root.crl([]).public_bytes(serialization.Encoding.PEM),
        "server-chain.pem": _pem(server, issuing.certificate),
        "untrusted-ca.pem": _pem(untrusted.certificate),
        "untrusted-server-chain.pem": _pem(untrusted_server, untrusted.certificate),
        "ocsp-signer.pem": _pem(signer),
        "ocsp/index.txt": responder.index([server, *(c for c in certificates.values() if c.issuer == issuing.subject)],
                                          revoked).encode(),
        "ocsp/port": f"{revocation_port}\n".encode(),
        "crl-http/issuing-ca.crl": issuing.crl(revoked).public_bytes(serialization.Encoding.DER),
        "crl-http/root-ca.crl": root.crl([]).public_bytes(serialization.Encoding.DER),
    }
    assert tuple(files) == PKI_FILES
    for name, data in files.items():
        _write(pki_dir / name, data)
    secret_files = {
        "server.key": _key_pem(server_key),
        "untrusted-server.key": _key_pem(untrusted_server_key),
        "private/root-ca.key": _key_pem(root.key),
        "private/issuing-ca.key": _key_pem(issuing.key),
        "private/untrusted-ca.key": _key_pem(untrusted.key),
        "private/ocsp-signer.key": _key_pem(signer_key),
    }
    assert tuple(secret_files) == SECRET_PKI_FILES
    (pki_dir / "private").mkdir(mode=0o700, exist_ok=True)
    for name, data in secret_files.items():
        _write(pki_dir / name, data, 0o600)
    for label, cert in certificates.items():
        _write(pki_dir / "clients" / f"{label}.pem", _pem(cert))
    _write(directory / "README.txt", readme(directory, conf).encode())
    _write(directory / MARKER, b"")
    return ProvisionResult(directory, conf, created=True)


def _provision_tokens(conf: Path, cas: dict[str, pki.CertificateAuthority],
                      sources: pki.RevocationSources) -> dict[str, x509.Certificate]:
    for identity in IDENTITIES:
        init_token(conf, identity.label, so_pin=SO_PIN, user_pin=USER_PIN)
    os.environ["SOFTHSM2_CONF"] = str(conf)
    module_path = get_profile("softhsm2").installed_module()
    lib = pkcs11.lib(module_path)
    lib.reinitialize()  # SoftHSM only sees tokens made by another process after C_Initialize
    now = pki.now()
    certificates = {}
    for identity in IDENTITIES:
        ca = cas[identity.issuer]
        token = lib.get_token(token_label=identity.label)
        with token.open(rw=True, user_pin=USER_PIN) as session:
            public, private = generate_key_pair(session, identity.key_type, KEY_ID, identity.label)
            public_key = public_key_of(public)
            subject = pki.name(identity.common_name)
            csr = token_signed_csr(private, public_key, subject)
            if identity.expired:
                not_before, not_after = now - 400 * pki.DAY, now - 30 * pki.DAY
            else:
                not_before, not_after = now - pki.DAY, now + 365 * pki.DAY
            cert = ca.issue_client(csr.subject, csr.public_key(), identity.email,
                                   not_before=not_before, not_after=not_after, server_auth=identity.server_auth,
                                   sources=sources if identity.issuer == "issuing" else None)
            store_certificate(session, cert, KEY_ID, identity.label)
            store_certificate(session, ca.certificate, ca_certificate_id(ca.certificate),
                              ca.subject.rfc4514_string())
        certificates[identity.label] = cert
    return certificates


def readme(directory: Path, conf: Path) -> str:
    rows = "\n".join(f"  {i.label:<9} {i.key_type.upper():<4} CN={i.common_name:<17} {i.purpose}" for i in IDENTITIES)
    return f"""dicom-card-agent test tokens and PKI (made by `card-agent softhsm init`)
FOR TESTS AND DEMOS ONLY: the PINs below are public and the CA keys lie in pki/private/.

Use them with:
  export SOFTHSM2_CONF={conf}

Tokens (SoftHSM, one per identity; key generated on the token, CKA_ID 01, not extractable):
{rows}
  User PIN: {USER_PIN}    SO PIN: {SO_PIN}

PKI (pki/):
  root-ca.pem             Test Root CA (offline root)
  issuing-ca.pem          Test Issuing CA (issues servers and clinicians)
  ca-bundle.pem           root + issuing: the trust bundle for servers and the agent
  issuing-ca.crl.pem      CRL of the issuing CA (revokes mallory)
  root-ca.crl.pem         CRL of the root (revokes nothing)
  server-chain.pem        PACS server certificate for localhost, 127.0.0.1, ::1 + issuing CA
  server.key              its key
  untrusted-ca.pem        an unrelated CA, for negative tests
  untrusted-server-chain.pem, untrusted-server.key   a server certificate from it
  clients/NAME.pem        each token's certificate, as a file
  private/*.key           CA keys, to issue more test certificates
  ocsp-signer.pem         delegated OCSP responder of the issuing CA (id-kp-OCSPSigning)
  ocsp/index.txt          the issuing CA's certificates and their status, for `openssl ocsp -index`
  crl-http/               the CRLs the CRL distribution points name (DER)

Revocation: the issuing CA's certificates name an OCSP responder (http://127.0.0.1:PORT/ocsp) and
a CRL distribution point (http://127.0.0.1:PORT/issuing-ca.crl); PORT is in ocsp/port. Start the
responder (`openssl ocsp` over ocsp/index.txt, signing as ocsp-signer.pem, and the CRLs of
crl-http/, on 127.0.0.1 only) with
  card-agent softhsm ocsp-responder start {directory}
and stop it with `card-agent softhsm ocsp-responder stop {directory}`. mallory is revoked there
too. The issuing CA's own certificate names no source (it is in the trust bundle: remove it
there to stop trusting it).

Directory: {directory}
"""
