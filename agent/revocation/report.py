"""The revocation status of an identity, for `card-agent identities` and `card-agent doctor`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from dicom_card_agent.revocation.checker import RevocationChecker, default_cache_directory
from dicom_card_agent.revocation.decision import Status, decide
from dicom_card_agent.trust.anchors import load_certificates
from dicom_card_agent.trust.crls import CrlStore


@dataclass(frozen=True)
class IdentityRevocation:
    state: str  # "good", "revoked" or "no answer"
    detail: str

    def line(self) -> str:
        return f"{'REVOKED' if self.state == 'revoked' else self.state}: {self.detail}"


def cli_checker(ca: Path, crl_files: Sequence[Path]) -> RevocationChecker:
    """A checker for a command: the agent's cache directory, no refresher (the command ends soon)."""
    return RevocationChecker(certificates=load_certificates(ca), ca_source=str(ca),
                             crls=CrlStore(crl_files) if crl_files else None,
                             cache_directory=default_cache_directory(), refresh=False)


def identity_revocation(checker: RevocationChecker, certificate: x509.Certificate) -> IdentityRevocation:
    """What a PACS checking revocation with "require" would conclude about ``certificate``."""
    answers = checker.gather(certificate)
    verdict = decide("require", answers)
    if verdict.revoked:
        return IdentityRevocation("revoked", verdict.message)
    if verdict.outcome == "allow":
        sources = [a.source for a in answers[0].answers if a.status is Status.GOOD]
        return IdentityRevocation("good", f"not revoked according to {', '.join(sources)}")
    return IdentityRevocation("no answer", verdict.message)
