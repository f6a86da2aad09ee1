"""The one function that decides what revocation answers mean (agent/revocation/decision.py),
against every combination Hypothesis finds: chains of 1-3 certificates, each with 0-4 answers
from the three kinds of source, under each policy."""

from __future__ import annotations

import datetime

from hypothesis import given
from hypothesis import strategies as st

from dicom_card_agent.revocation.decision import POLICIES, Answer, CertificateAnswers, Status, decide, revoked_message

SOURCES = ("OCSP responder http://127.0.0.1:1/ocsp", "CRL http://127.0.0.1:1/issuing-ca.crl", "CRL file /etc/ca.crl")
REASONS = (None, "keyCompromise", "cessationOfOperation")


@st.composite
def answers(draw: st.DrawFn) -> Answer:
    source = draw(st.sampled_from(SOURCES))
    status = draw(st.sampled_from(list(Status)))
    if status is Status.REVOKED:
        when = draw(st.datetimes(min_value=datetime.datetime(2020, 1, 1), max_value=datetime.datetime(2030, 1, 1),
                                 timezones=st.just(datetime.timezone.utc)))
        return Answer(source, status, revoked_at=when, reason=draw(st.sampled_from(REASONS)))
    detail = f"{source} could not be used ({draw(st.integers(0, 99))})" if status is Status.NO_ANSWER else ""
    return Answer(source, status, detail)


@st.composite
def chains(draw: st.DrawFn) -> list[CertificateAnswers]:
    length = draw(st.integers(1, 3))
    return [CertificateAnswers(f"CN=cert{i}", tuple(draw(st.lists(answers(), max_size=4))), is_leaf=i == 0)
            for i in range(length)]


def counts(certificate: CertificateAnswers) -> bool:
    """Whether the certificate must be answered: the leaf always, an intermediate when it names a source."""
    return certificate.is_leaf or bool(certificate.answers)


def good(certificate: CertificateAnswers) -> bool:
    return any(a.status is Status.GOOD for a in certificate.answers)


@given(chains(), st.sampled_from(POLICIES))
def test_the_decision_follows_the_documented_rules(chain: list[CertificateAnswers], policy: str) -> None:
    verdict = decide(policy, chain)  # type: ignore[arg-type]
    revocations = [(c, a) for c in chain for a in c.answers if a.status is Status.REVOKED]
    unanswered = [c for c in chain if counts(c) and not good(c)]
    if policy == "off":
        assert verdict.outcome == "allow" and verdict.message == ""
    elif revocations:
        certificate, answer = revocations[0]
        assert (verdict.outcome, verdict.revoked) == ("refuse", True)
        assert verdict.message == revoked_message(certificate.certificate, answer)
        assert verdict.message.startswith(f"certificate {certificate.certificate} was revoked on ")
        assert verdict.message.endswith(f"according to {answer.source}")
        assert (answer.reason is None) == ("(reason: " not in verdict.message)
    elif not unanswered:
        assert verdict.outcome == "allow" and verdict.message == ""
    else:
        assert verdict.outcome == ("refuse" if policy == "require" else "warn") and not verdict.revoked
        for certificate in unanswered:
            for answer in certificate.answers:
                if answer.status is Status.NO_ANSWER:
                    assert answer.detail in verdict.message
            if not certificate.answers:
                assert (f"{certificate.certificate} names no OCSP responder nor CRL distribution point and [trust] "
                        "crl holds no CRL of its issuer") in verdict.message
        assert verdict.message.endswith("allowed because revocation = \"prefer\"") == (policy == "prefer")


@given(chains())
def test_prefer_refuses_only_what_is_revoked_and_require_never_allows_less(chain: list[CertificateAnswers]) -> None:
    prefer, require = decide("prefer", chain), decide("require", chain)
    assert (prefer.outcome == "refuse") == prefer.revoked
    assert require.outcome != "warn"
    if require.outcome == "allow":
        assert prefer.outcome == "allow"
    if prefer.outcome == "refuse":
        assert require.outcome == "refuse" and require.message == prefer.message


def test_an_intermediate_naming_no_source_passes_but_a_leaf_naming_none_does_not() -> None:
    ocsp_good = Answer(SOURCES[0], Status.GOOD)
    leaf_good = CertificateAnswers("CN=leaf", (ocsp_good,), True)
    assert decide("require", [leaf_good, CertificateAnswers("CN=issuing", (), False)]).outcome == "allow"
    verdict = decide("require", [CertificateAnswers("CN=leaf", (), True)])
    assert verdict.outcome == "refuse"
    assert verdict.message == ("CN=leaf names no OCSP responder nor CRL distribution point and [trust] crl holds no "
                               "CRL of its issuer, so it cannot be checked for revocation")
