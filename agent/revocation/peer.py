"""The revocation check of one tunnel or listener, made after each handshake (full or resumed).

Python 3.11's ``getpeercert`` gives the peer's leaf certificate only, not the chain OpenSSL built.
The chain is therefore found again in [trust] ca: the intermediates listed there are checked as
well as the leaf; an intermediate that only the peer sent (not in [trust] ca) cannot be found,
so no OCSP or CRL answer about the leaf can be verified either (its issuer's key is needed), and
the leaf is unanswered: refused under "require", allowed with a warning under "prefer".
"""

from __future__ import annotations

import concurrent.futures
import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from dicom_card_agent.config.model import TrustConfig
from dicom_card_agent.revocation.checker import RevocationChecker, default_cache_directory
from dicom_card_agent.revocation.decision import Policy
from dicom_card_agent.trust.anchors import load_certificates
from dicom_card_agent.trust.crls import CrlStore
from dicom_card_agent.trust.errors import RevokedCertificateError, TrustError

log = logging.getLogger("agent.revocation")


class RevocationUnknownError(TrustError):
    """No fresh revocation answer, and the policy is "require"."""


class CardRevokedError(TrustError):
    """The signed-in card's own certificate is revoked: the sign-in stops, in words the clinician reads."""


def checker_for(trust: TrustConfig, *, refresh: bool = True) -> RevocationChecker:
    """The process's one checker for [trust]: CRL files re-read when they change, cache, fetchers."""
    settings = trust.revocation
    crls = CrlStore(trust.crl, allow_expired=trust.crl_expired == "warn") if trust.crl else None
    return RevocationChecker(certificates=load_certificates(trust.ca), ca_source=str(trust.ca), crls=crls,
                             cache_directory=settings.cache or default_cache_directory(),
                             max_age=datetime.timedelta(seconds=settings.max_age), timeout=settings.timeout,
                             ocsp_responder=settings.ocsp_responder, refresh=refresh)


@dataclass(frozen=True)
class PeerRevocation:
    """A checker and the policy of one tunnel or listener."""

    checker: RevocationChecker
    policy: Policy
    where: str  # "tunnel pacs", "inbound retrieves": for the warning's log line
    alert: Callable[[str], None] = lambda _: None  # a Security Alert for the audit trail, under "prefer"

    def check(self, leaf: x509.Certificate, given_up: concurrent.futures.Future[str] | None = None) -> None:
        """Raise :class:`RevokedCertificateError` or :class:`RevocationUnknownError` when the policy
        refuses, :class:`CheckGivenUpError` when ``given_up`` is done first (see RevocationChecker.check)."""
        verdict = self.checker.check(leaf, self.policy, given_up)
        if verdict.outcome == "refuse":
            raise (RevokedCertificateError if verdict.revoked else RevocationUnknownError)(verdict.message)
        if verdict.outcome == "warn":
            log.warning("%s: revocation not checked: %s", self.where, verdict.message)
            self.alert(verdict.message)


def cache_directory(trust: TrustConfig) -> Path:
    return trust.revocation.cache or default_cache_directory()
