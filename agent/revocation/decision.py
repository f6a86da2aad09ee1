"""The one place that decides what revocation answers mean: answers + policy -> allow, warn or refuse.

Sans-IO: the answers were gathered elsewhere (agent/revocation/checker.py); this module only judges
them, so every combination can be tested without a network (tests/test_revocation_decision.py).

The rules (docs/tls-policy.md, "Revocation"):
- ``off``: nothing is asked, everything passes.
- A verified "revoked" answer from any source, for any certificate of the chain, refuses.
- A certificate passes when at least one source gave a fresh, verified "good" answer.
- A certificate without such an answer is *unanswered*: a source it names (or a CRL file of its
  issuer) was unreachable, stale, wrongly signed or said "unknown", or the leaf names no source
  at all. ``require`` refuses, ``prefer`` allows and warns.
- An intermediate CA certificate (from [trust] ca) that names no source and whose issuer has no
  CRL file passes: the operator vouched for it by listing it in [trust] ca, and removes it there.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Policy = Literal["require", "prefer", "off"]
POLICIES: tuple[Policy, ...] = ("require", "prefer", "off")


class Status(enum.Enum):
    GOOD = "good"
    REVOKED = "revoked"
    NO_ANSWER = "no answer"  # unreachable, stale, badly signed, "unknown", unreadable


@dataclass(frozen=True)
class Answer:
    """What one source said about one certificate."""

    source: str  # "OCSP responder http://...", "CRL http://...", "CRL file /path"
    status: Status
    detail: str = ""  # for NO_ANSWER: why, in a sentence naming the source
    revoked_at: datetime.datetime | None = None
    reason: str | None = None  # CRLReason, e.g. "keyCompromise"


@dataclass(frozen=True)
class CertificateAnswers:
    """The answers about one certificate of the chain (leaf first)."""

    certificate: str  # subject and issuer, as messages name it
    answers: tuple[Answer, ...]
    is_leaf: bool


Outcome = Literal["allow", "warn", "refuse"]


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    message: str = ""  # for warn and refuse: what the log line and the refusal say
    revoked: bool = False


def revoked_message(certificate: str, answer: Answer) -> str:
    when = f"{answer.revoked_at:%Y-%m-%d %H:%M} UTC" if answer.revoked_at else "an unknown date"
    because = f" (reason: {answer.reason})" if answer.reason else ""
    return f"certificate {certificate} was revoked on {when}{because} according to {answer.source}"


def unanswered_message(certificate: CertificateAnswers) -> str:
    if not certificate.answers:
        return (f"{certificate.certificate} names no OCSP responder nor CRL distribution point and [trust] crl holds "
                "no CRL of its issuer, so it cannot be checked for revocation")
    return "; ".join(answer.detail for answer in certificate.answers if answer.status is Status.NO_ANSWER)


def decide(policy: Policy, chain: Sequence[CertificateAnswers]) -> Verdict:
    if policy == "off":
        return Verdict("allow")
    for certificate in chain:
        for answer in certificate.answers:
            if answer.status is Status.REVOKED:
                return Verdict("refuse", revoked_message(certificate.certificate, answer), revoked=True)
    unanswered = [c for c in chain if not any(a.status is Status.GOOD for a in c.answers)
                  and (c.is_leaf or c.answers)]
    if not unanswered:
        return Verdict("allow")
    message = "; ".join(unanswered_message(c) for c in unanswered)
    if policy == "require":
        return Verdict("refuse", message)
    return Verdict("warn", f"{message}; allowed because revocation = \"prefer\"")
