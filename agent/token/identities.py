"""Identities on a token: a certificate plus the private key with the same ``CKA_ID``.

Each certificate is judged as TLS client authentication will judge it, and the result says why an
identity cannot be used: validity, key usage, CA certificate, missing or exportable key, what the
token's mechanisms allow, and (given trust anchors) chain and revocation.
"""

from __future__ import annotations

import base64
import datetime
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from pkcs11 import Attribute, CertificateType, KeyType, ObjectClass
from pkcs11.exceptions import AttributeSensitive, AttributeTypeInvalid, PKCS11Error
from pkcs11.types import Session, Token

from dicom_card_agent.token.capabilities import TlsCapability, key_kind, tls_capability
from dicom_card_agent.token.discovery import token_serial
from dicom_card_agent.token.profiles import ModuleProfile
from dicom_card_agent.token.uri import Pkcs11Uri
from dicom_card_agent.trust.anchors import TrustAnchors, TrustError

CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
KEY_HIDDEN_BEFORE_LOGIN = "no matching key visible before login"
ANY_EKU = x509.ObjectIdentifier("2.5.29.37.0")


@dataclass(frozen=True)
class TokenKey:
    """What the token shows of a key object, read once."""

    id: bytes
    label: str
    key_type: KeyType
    sensitive: bool | None = None
    extractable: bool | None = None
    always_authenticate: bool | None = None
    modulus: bytes | None = None
    ec_point: bytes | None = None


@dataclass
class Identity:
    token_label: str
    token_serial: str
    certificate: x509.Certificate
    certificate_label: str
    key_id: bytes
    key_type: str
    key_size: int
    curve: str | None
    uri: Pkcs11Uri
    tls: TlsCapability
    key_checked: bool = False
    problems: list[str] = field(default_factory=list)
    chain: list[x509.Certificate] = field(default_factory=list)
    revocation: dict[str, str] | None = None  # {"state": good | revoked | no answer, "detail": ...}, when checked

    @property
    def usable(self) -> bool:
        return not self.problems

    @property
    def reason(self) -> str | None:
        return "; ".join(self.problems) or None

    @property
    def is_ca(self) -> bool:
        return is_ca_certificate(self.certificate)

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()

    def as_dict(self) -> dict[str, object]:
        cert = self.certificate
        return {
            "token": self.token_label,
            "token_serial": self.token_serial,
            "subject": self.subject,
            "issuer": cert.issuer.rfc4514_string(),
            "serial": f"{cert.serial_number:x}",
            "key_type": self.key_type,
            "key_size": self.key_size,
            "curve": self.curve,
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "certificate_label": self.certificate_label,
            "key_id": self.key_id.hex(),
            "uri": str(self.uri),
            "usable": self.usable,
            "reason": self.reason,
            "key_checked": self.key_checked,
            "tls": self.tls.as_dict(),
            "revocation": self.revocation,
        }


    def to_message(self) -> dict[str, object]:
        """The identity as the card-session process sends it after its probe (all public)."""
        return {
            "token_label": self.token_label, "token_serial": self.token_serial,
            "certificate": base64.b64encode(self.certificate.public_bytes(Encoding.DER)).decode(),
            "certificate_label": self.certificate_label, "key_id": self.key_id.hex(), "key_type": self.key_type,
            "key_size": self.key_size, "curve": self.curve, "uri": str(self.uri),
            "tls": {"tls13": self.tls.tls13, "tls12": self.tls.tls12,
                    "signature_schemes": list(self.tls.signature_schemes), "note": self.tls.note},
            "key_checked": self.key_checked, "problems": list(self.problems),
        }

    @classmethod
    def from_message(cls, message: dict) -> Identity:
        tls = message["tls"]
        return cls(
            token_label=message["token_label"], token_serial=message["token_serial"],
            certificate=x509.load_der_x509_certificate(base64.b64decode(message["certificate"])),
            certificate_label=message["certificate_label"], key_id=bytes.fromhex(message["key_id"]),
            key_type=message["key_type"], key_size=message["key_size"], curve=message["curve"],
            uri=Pkcs11Uri.parse(message["uri"]),
            tls=TlsCapability(tls["tls13"], tls["tls12"], tuple(tls["signature_schemes"]), tls["note"]),
            key_checked=message["key_checked"], problems=list(message["problems"]),
        )


def _attr(obj, attribute: Attribute):
    try:
        return obj[attribute]
    except (AttributeTypeInvalid, AttributeSensitive, PKCS11Error):
        return None


def _read_keys(session: Session, object_class: ObjectClass) -> dict[bytes, TokenKey]:
    keys = {}
    for obj in session.get_objects({Attribute.CLASS: object_class}):
        key_id = _attr(obj, Attribute.ID) or b""
        keys[key_id] = TokenKey(
            id=key_id,
            label=_attr(obj, Attribute.LABEL) or "",
            key_type=_attr(obj, Attribute.KEY_TYPE),
            sensitive=_attr(obj, Attribute.SENSITIVE) if object_class == ObjectClass.PRIVATE_KEY else None,
            extractable=_attr(obj, Attribute.EXTRACTABLE) if object_class == ObjectClass.PRIVATE_KEY else None,
            always_authenticate=(
                _attr(obj, Attribute.ALWAYS_AUTHENTICATE) if object_class == ObjectClass.PRIVATE_KEY else None
            ),
            modulus=_attr(obj, Attribute.MODULUS),
            ec_point=_attr(obj, Attribute.EC_POINT),
        )
    return keys


def _ec_point_bytes(value: bytes) -> bytes:
    """CKA_EC_POINT is usually a DER OCTET STRING around the point; some tokens give it bare."""
    if len(value) > 2 and value[0] == 0x04 and value[1] in (len(value) - 2, 0x81):
        return value[3:] if value[1] == 0x81 else value[2:]
    return value


def _key_matches_certificate(key: TokenKey, public_key) -> bool | None:
    """True/False when the token shows enough of the key to compare, else None."""
    if isinstance(public_key, rsa.RSAPublicKey) and key.modulus:
        return int.from_bytes(key.modulus, "big") == public_key.public_numbers().n
    if isinstance(public_key, ec.EllipticCurvePublicKey) and key.ec_point:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return _ec_point_bytes(key.ec_point) == public_key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return None


def _usage_problems(cert: x509.Certificate) -> list[str]:
    problems = []
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.digital_signature:
            problems.append("wrong key usage: digitalSignature is not allowed by the certificate")
    except x509.ExtensionNotFound:
        pass
    try:
        ekus = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        if CLIENT_AUTH not in ekus and ANY_EKU not in ekus:
            problems.append("wrong key usage: the certificate's extended key usage has no TLS clientAuth")
    except x509.ExtensionNotFound:
        pass
    return problems


def is_ca_certificate(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def list_identities(
    session: Session,
    token: Token,
    profile: ModuleProfile,
    *,
    logged_in: bool,
    trust: TrustAnchors | None = None,
    allow_exportable_keys: bool = False,
    now: datetime.datetime | None = None,
) -> list[Identity]:
    """Every certificate on the token as a candidate identity, usable ones first.

    Without a login most tokens hide private keys; the key is then matched through its public key
    and ``key_checked`` stays False until the key's own attributes have been read after login.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    private_keys = _read_keys(session, ObjectClass.PRIVATE_KEY)
    public_keys = _read_keys(session, ObjectClass.PUBLIC_KEY)
    mechanisms = token.slot.get_mechanisms()
    certificates = []
    for obj in session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE,
                                    Attribute.CERTIFICATE_TYPE: CertificateType.X_509}):
        try:
            cert = x509.load_der_x509_certificate(obj[Attribute.VALUE])
        except ValueError:
            continue
        certificates.append((cert, _attr(obj, Attribute.ID) or b"", _attr(obj, Attribute.LABEL) or ""))
    token_cas = [cert for cert, _, _ in certificates if is_ca_certificate(cert)]

    identities = []
    for cert, key_id, label in certificates:
        extension_oids = {ext.oid.dotted_string for ext in cert.extensions}
        if profile.is_attestation_certificate(label, extension_oids):
            continue
        identity = _judge(cert, key_id, label, token, mechanisms, private_keys, public_keys,
                          logged_in=logged_in, allow_exportable_keys=allow_exportable_keys, now=now)
        if trust is not None and identity.usable:
            try:
                identity.chain = trust.verify_client(cert, token_cas, now)
            except TrustError as error:
                identity.problems.append(str(error))
        identities.append(identity)

    def order(identity: Identity) -> tuple:
        preferred = identity.key_id in profile.preferred_key_ids
        return (not identity.usable, not preferred)

    return sorted(identities, key=order)


def _judge(cert, key_id, label, token, mechanisms, private_keys, public_keys, *, logged_in,
           allow_exportable_keys, now) -> Identity:
    public_key = cert.public_key()
    key_type, key_size, curve = key_kind(cert)
    identity = Identity(
        token_label=token.label,
        token_serial=token_serial(token),
        certificate=cert,
        certificate_label=label,
        key_id=key_id,
        key_type=key_type,
        key_size=key_size,
        curve=curve,
        uri=Pkcs11Uri(token=token.label, serial=token_serial(token), id=key_id or None,
                      type="cert" if is_ca_certificate(cert) else "private"),
        tls=tls_capability(mechanisms, key_type, curve),
    )
    problems = identity.problems
    if is_ca_certificate(cert):
        problems.append("CA certificate, not a personal identity")
        return identity
    if now < cert.not_valid_before_utc:
        # A workstation whose clock was reset (before NTP) sees every card so: say which clock.
        problems.append(f"not yet valid: valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC, and this "
                        f"computer's clock says {now:%Y-%m-%d %H:%M} UTC: if that is wrong, correct the clock")
    if now > cert.not_valid_after_utc:
        problems.append(f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: ask for a new certificate")
    problems.extend(_usage_problems(cert))

    key = private_keys.get(key_id) if key_id else None
    if key is not None:
        identity.key_checked = True
        if _key_matches_certificate(key, public_key) is False:
            problems.append(f"the private key with CKA_ID {key_id.hex()} does not belong to this certificate")
        if (key.extractable or key.sensitive is False) and not allow_exportable_keys:
            problems.append(
                "extractable key: the private key can leave the token (CKA_EXTRACTABLE true or CKA_SENSITIVE "
                "false); refused unless allow_exportable_keys is set for a lab token"
            )
        if key.always_authenticate:
            problems.append(
                "the key wants the PIN before every signature (CKA_ALWAYS_AUTHENTICATE): use the card's "
                "authentication key (PIV slot 9A) for TLS"
            )
    else:
        public = public_keys.get(key_id) if key_id else None
        if logged_in or (public is not None and _key_matches_certificate(public, public_key) is False):
            problems.append(f"no matching private key (no key with CKA_ID {key_id.hex() or 'empty'} on the token)")
        elif public is None:
            problems.append(
                f"{KEY_HIDDEN_BEFORE_LOGIN} (CKA_ID {key_id.hex() or 'empty'}): give a PIN to check"
            )
    if not (identity.tls.tls12 or identity.tls.tls13):
        problems.append(f"TLS cannot use this key: {identity.tls.note}")
    return identity
