"""The username the agent asserts in User Identity Negotiation (PS3.7 D.3.3.7), from the card's certificate.

A template picks it: ``{cn}`` (subject common name, the default), ``{upn}`` (the Microsoft User
Principal Name in the subjectAltName, as on many hospital and CAC/PIV cards), ``{email}`` (the
rfc822Name in the subjectAltName, else the subject's emailAddress), ``{uid}`` (the subject's UID
attribute) and ``{serial}`` (the subject's serialNumber), with literal text around them, e.g.
``"{uid}@radiology"``.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

from dicom_card_agent.errors import CardAgentError

if TYPE_CHECKING:
    from cryptography import x509

UPN_OID = "1.3.6.1.4.1.311.20.2.3"  # Microsoft's User Principal Name, an otherName of the subjectAltName
FIELDS = ("cn", "upn", "email", "uid", "serial")


class UsernameError(CardAgentError):
    """The template names a field the certificate lacks, or is not a valid template."""


def check_template(template: str) -> None:
    """Raise UsernameError unless ``template`` uses only known ``{fields}``."""
    try:
        names = [name for _, name, spec, conversion in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise UsernameError(f"username template {template!r} is not valid: {error}") from None
    unknown = [name for name in names if name not in FIELDS]
    if unknown or not names:
        raise UsernameError(f"username template {template!r} must use one or more of "
                            f"{', '.join('{' + f + '}' for f in FIELDS)}")


def certificate_fields(certificate: x509.Certificate) -> dict[str, str]:
    # Imported here: the configuration checks a template (check_template), and `card-agent status`,
    # which reads the configuration and no certificate, would otherwise import them for nothing.
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    fields: dict[str, str] = {}
    subject = certificate.subject
    for name, oid in (("cn", NameOID.COMMON_NAME), ("uid", NameOID.USER_ID), ("serial", NameOID.SERIAL_NUMBER),
                      ("email", NameOID.EMAIL_ADDRESS)):
        values = subject.get_attributes_for_oid(oid)
        if values:
            fields[name] = str(values[0].value)
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return fields
    emails = san.get_values_for_type(x509.RFC822Name)
    if emails:
        fields["email"] = emails[0]
    for other in san.get_values_for_type(x509.OtherName):
        if other.type_id.dotted_string == UPN_OID:
            upn = _utf8_string(other.value)
            if upn:
                fields["upn"] = upn
                break
    return fields


def username_for(certificate: x509.Certificate, template: str) -> str:
    """The username ``template`` gives for ``certificate``; UsernameError names what is missing."""
    check_template(template)
    fields = certificate_fields(certificate)
    needed = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    missing = [name for name in needed if name not in fields]
    if missing:
        raise UsernameError(f"the card's certificate ({certificate.subject.rfc4514_string()}) has no "
                            f"{', '.join(missing)} for the user identity template {template!r}; "
                            f"it has {', '.join(sorted(fields)) or 'none of the fields'}")
    return template.format(**fields)


def _utf8_string(der: bytes) -> str | None:
    """The text of a DER UTF8String (the UPN's encoding), None if it is something else."""
    from asn1crypto.core import Asn1Value, UTF8String

    try:
        value = Asn1Value.load(der)
    except ValueError:
        return None
    return value.native if isinstance(value, UTF8String) else None
