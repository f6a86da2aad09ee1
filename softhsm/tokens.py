"""SoftHSM test tokens: initialise, generate a key pair ON the token, have the token sign a CSR,
and store the issued certificate next to the key.
"""

from __future__ import annotations

import hashlib
import os
import pty
import select
import shutil
import time
from pathlib import Path

from asn1crypto import core as asn1_core
from asn1crypto import csr as asn1_csr
from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from pkcs11 import Attribute, CertificateType, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.types import PrivateKey, Session
from pkcs11.util.ec import encode_ecdsa_signature, encode_named_curve_parameters

from dicom_card_agent.errors import CardAgentError

SOFTHSM_UTIL = "softhsm2-util"
PROMPT_TIMEOUT_SECONDS = 30


class ProvisioningError(CardAgentError):
    """Creating a test token failed."""


def write_softhsm_conf(directory: Path) -> Path:
    tokens = directory / "tokens"
    tokens.mkdir(mode=0o700, parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        "# SoftHSM configuration of dicom-card-agent test tokens; use with\n"
        f"# export SOFTHSM2_CONF={conf}\n"
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n",
        encoding="utf-8",
    )
    return conf


def init_token(conf: Path, label: str, *, so_pin: str, user_pin: str) -> None:
    """``softhsm2-util --init-token`` with the PINs typed at its prompts, never on its command line."""
    if shutil.which(SOFTHSM_UTIL) is None:
        raise ProvisioningError(f"{SOFTHSM_UTIL} is not installed: run scripts/setup (Debian package softhsm2)")
    argv = [SOFTHSM_UTIL, "--init-token", "--free", "--label", label]
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    answers = {b"SO PIN:": so_pin, b"user PIN:": user_pin}
    pid, fd = pty.fork()
    if pid == 0:  # child: softhsm2-util reads PINs from its terminal
        try:
            os.execvpe(argv[0], argv, env)
        finally:
            os._exit(127)
    transcript = b""
    answered = 0
    deadline = time.monotonic() + PROMPT_TIMEOUT_SECONDS
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            transcript += chunk
            pending = transcript[answered:]
            for prompt, pin in answers.items():
                if prompt in pending:
                    os.write(fd, pin.encode() + b"\n")
                    answered = len(transcript)
                    break
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        text = transcript.decode("utf-8", "replace").replace(so_pin, "***").replace(user_pin, "***")
        raise ProvisioningError(f"{SOFTHSM_UTIL} could not initialise token {label!r}: {text.strip()[-300:]}")


def generate_key_pair(session: Session, key_type: str, key_id: bytes, label: str, *, extractable: bool = False):
    """A key pair generated inside the token; the private half is sensitive and not extractable."""
    private_template = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: not extractable,
        Attribute.EXTRACTABLE: extractable,
        Attribute.SIGN: True,
    }
    public_template = {Attribute.TOKEN: True, Attribute.VERIFY: True}
    signing_only = MechanismFlag.SIGN | MechanismFlag.VERIFY
    if key_type == "rsa":
        return session.generate_keypair(KeyType.RSA, 2048, id=key_id, label=label, store=True,
                                        capabilities=signing_only,
                                        public_template=public_template, private_template=private_template)
    if key_type == "ec":
        parameters = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
        )
        return parameters.generate_keypair(id=key_id, label=label, store=True, capabilities=signing_only,
                                           public_template=public_template, private_template=private_template)
    raise ProvisioningError(f"unsupported key type {key_type!r}")


def public_key_of(public_object) -> CertificatePublicKeyTypes:
    """The token public key object as a ``cryptography`` key."""
    if public_object.key_type == KeyType.RSA:
        n = int.from_bytes(public_object[Attribute.MODULUS], "big")
        e = int.from_bytes(public_object[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    point = asn1_core.OctetString.load(public_object[Attribute.EC_POINT]).native
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)


def sign_on_token(private_key: PrivateKey, data: bytes) -> tuple[bytes, str]:
    """A SHA-256 signature made by the token, DER-encoded as X.509 wants it, and its algorithm."""
    if private_key.key_type == KeyType.RSA:
        return private_key.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS), "sha256_rsa"
    # SoftHSM offers plain CKM_ECDSA only: hash here, sign the digest there.
    raw = private_key.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA)
    return encode_ecdsa_signature(raw), "sha256_ecdsa"


def token_signed_csr(private_key: PrivateKey, public_key: CertificatePublicKeyTypes,
                     subject: x509.Name) -> x509.CertificateSigningRequest:
    """A PKCS#10 request whose signature the token computed; raises if it does not verify."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    info = asn1_csr.CertificationRequestInfo({
        "version": "v1",
        "subject": asn1_x509.Name.load(subject.public_bytes()),
        "subject_pk_info": asn1_keys.PublicKeyInfo.load(spki),
        "attributes": [],
    })
    signature, algorithm = sign_on_token(private_key, info.dump())
    request = asn1_csr.CertificationRequest({
        "certification_request_info": info,
        "signature_algorithm": {"algorithm": algorithm},
        "signature": signature,
    })
    csr = x509.load_der_x509_csr(request.dump())
    if not csr.is_signature_valid:
        raise ProvisioningError(f"the token's CSR signature for {subject.rfc4514_string()} does not verify")
    return csr


def store_certificate(session: Session, cert: x509.Certificate, key_id: bytes, label: str) -> None:
    session.create_object({
        Attribute.CLASS: ObjectClass.CERTIFICATE,
        Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.ID: key_id,
        Attribute.LABEL: label,
        Attribute.SUBJECT: cert.subject.public_bytes(),
        Attribute.ISSUER: cert.issuer.public_bytes(),
        Attribute.SERIAL_NUMBER: asn1_core.Integer(cert.serial_number).dump(),
        Attribute.VALUE: cert.public_bytes(serialization.Encoding.DER),
    })


def ca_certificate_id(cert: x509.Certificate) -> bytes:
    """CA certificates on a token carry their subject key identifier as CKA_ID."""
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


