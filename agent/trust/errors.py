"""Why a certificate, a CA bundle or a CRL file is not accepted."""

from __future__ import annotations

from dicom_card_agent.errors import CardAgentError


class TrustError(CardAgentError):
    """A certificate is not trusted under the configured anchors and CRLs."""


class UntrustedCertificateError(TrustError):
    pass


class RevokedCertificateError(TrustError):
    pass


class CrlError(TrustError):
    pass


class TrustFileError(CardAgentError):
    """A CA bundle or CRL file cannot be read."""
