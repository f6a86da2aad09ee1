"""Which CRL may say what about which certificate: a CRL scoped to a distribution point (a
partitioned CRL, RFC 5280 5.2.5) vouches only for certificates naming that distribution point, and
a delta CRL's removeFromCRL entry (RFC 5280 5.3.1: released from hold) revokes nothing.

The CRLs are made by `openssl ca -gencrl` from the test PKI's issuing CA; the PACS is `openssl
s_server`, the agent real, the application a real A-ASSOCIATE-RQ; CRL distribution points are
served over HTTP on loopback by the test PKI's revocation server."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from conftest import ProvisionedPki
from dicom_card_agent.revocation.checker import RevocationChecker
from dicom_card_agent.softhsm.responder import RevocationServer, index
from dicom_card_agent.trust.anchors import load_certificates
from dicom_card_agent.trust.crls import (
    CERTIFICATE_HOLD,
    REMOVE_FROM_CRL,
    CrlStore,
    Listing,
    listing_in_force,
    same_distribution_point,
)
from test_revocation import PACS, attempt, make_pacs
from test_tunnel_verification import assert_accepted, assert_rejected


def openssl_crl(pki: Path, work: Path, listed: list[x509.Certificate], *, number: int, reason: str = "keyCompromise",
                distribution_point: str | None = None, delta_of: int | None = None, hours: int | None = None) -> bytes:
    """DER of a CRL that `openssl ca -gencrl` makes for the test PKI's issuing CA, listing ``listed``
    with ``reason``, CRLNumber ``number``; scoped by a critical IssuingDistributionPoint to
    ``distribution_point``, or a delta CRL on base CRL ``delta_of``; valid 30 days (or ``hours``)."""
    work.mkdir(parents=True, exist_ok=True)
    entries = index(listed, listed).replace(",keyCompromise", f",{reason}") if listed else ""
    (work / "index.txt").write_text(entries)
    (work / "index.txt.attr").write_text("unique_subject = no\n")
    (work / "crlnumber").write_text(f"{number:02X}\n")
    extensions = ["authorityKeyIdentifier=keyid:always"]
    sections = ""
    if distribution_point is not None:
        extensions.append("issuingDistributionPoint=critical,@idp")
        sections = f"[idp]\nfullname=URI:{distribution_point}\n"
    if delta_of is not None:
        extensions.append(f"2.5.29.27=critical,ASN1:INTEGER:{delta_of}")  # DeltaCRLIndicator
    (work / "ca.cnf").write_text(
        f"[ca]\ndefault_ca=CA_default\n[CA_default]\ndatabase={work}/index.txt\ncrlnumber={work}/crlnumber\n"
        "default_md=sha256\ndefault_crl_days=30\ncrl_extensions=crl_ext\n[crl_ext]\n"
        + "\n".join(extensions) + "\n" + sections)
    out = work / "crl.pem"
    subprocess.run(["openssl", "ca", "-batch", "-config", str(work / "ca.cnf"), "-gencrl",
                    "-keyfile", str(pki / "private" / "issuing-ca.key"), "-cert", str(pki / "issuing-ca.pem"),
                    "-out", str(out), *(["-crlhours", str(hours)] if hours else [])], check=True, capture_output=True)
    return x509.load_pem_x509_crl(out.read_bytes()).public_bytes(serialization.Encoding.DER)


# -- the rules, sans IO ---------------------------------------------------------------------------

URIS = st.sampled_from([f"http://pki.example/{name}.crl" for name in ("a", "b", "c", "d")])
NAME_SETS = st.frozensets(URIS.map(x509.UniformResourceIdentifier), max_size=3)


@given(NAME_SETS, st.lists(NAME_SETS, max_size=3))
def test_a_scoped_crl_covers_a_certificate_only_through_a_shared_distribution_point_name(
        crl_points: frozenset[x509.GeneralName], certificate_points: list[frozenset[x509.GeneralName]]) -> None:
    shared = any(crl_points & names for names in certificate_points)
    assert same_distribution_point(crl_points, certificate_points) == (not crl_points or shared)


@given(st.lists(NAME_SETS, max_size=3))
def test_a_crl_naming_a_distribution_point_never_covers_a_certificate_naming_none_or_others(
        certificate_points: list[frozenset[x509.GeneralName]]) -> None:
    elsewhere = frozenset([x509.UniformResourceIdentifier("http://pki.example/elsewhere.crl")])
    assert not same_distribution_point(elsewhere, certificate_points)
    assert not same_distribution_point(elsewhere, [])  # no CRLDistributionPoints: the scoped CRL cannot vouch


REASONS = st.sampled_from([None, "keyCompromise", "superseded", CERTIFICATE_HOLD, REMOVE_FROM_CRL])
LISTINGS = st.builds(Listing, st.one_of(st.none(), st.integers(1, 9)),
                     st.datetimes(min_value=datetime.datetime(2026, 1, 1), max_value=datetime.datetime(2026, 1, 9),
                                  timezones=st.just(datetime.timezone.utc)), REASONS)


@given(st.lists(LISTINGS, max_size=5))
def test_the_listing_in_force_is_never_a_removal_nor_a_released_hold(listings: list[Listing]) -> None:
    found = listing_in_force(listings)
    releases = [listing for listing in listings if listing.reason == REMOVE_FROM_CRL]
    if found is None:
        # Nothing revokes: each listing is a removal or a hold released by a later removal.
        assert all(listing.reason == REMOVE_FROM_CRL or (listing.reason == CERTIFICATE_HOLD and any(
            release.after(listing) for release in releases)) for listing in listings)
        return
    chosen = listings[found]
    assert chosen.reason != REMOVE_FROM_CRL
    assert not (chosen.reason == CERTIFICATE_HOLD and any(release.after(chosen) for release in releases))


@given(st.lists(LISTINGS, max_size=5), st.sampled_from([None, "keyCompromise", "superseded"]))
def test_a_revocation_other_than_hold_is_never_lifted(listings: list[Listing], reason: str | None) -> None:
    revocation = Listing(1, datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc), reason)
    assert listing_in_force([*listings, revocation]) is not None


# -- a CRL of another distribution point ----------------------------------------------------------

def test_only_the_crl_of_the_pacs_distribution_point_vouches_for_it(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The PACS's CRLDistributionPoints names .../issuing-ca.crl. Served there, the CA's CRL of that
    partition (IssuingDistributionPoint = that URL) vouches for it. The CA's genuine CRL of another
    partition (.../partition-a.crl, which never lists the PACS, even once its own partition's does)
    served there (plain HTTP: a man in the middle, a cache, a mis-set web server) was taken as
    complete too: "says good", and the association was relayed."""
    pacs = make_pacs(test_pki, tmp_path, ocsp=False)
    served = pacs.files.crl_directory / "issuing-ca.crl"
    served.write_bytes(openssl_crl(test_pki.pki, tmp_path / "ca-b", [], number=2, distribution_point=pacs.crl_url))
    with RevocationServer(pacs.port, pacs.files):
        answer, log = attempt(test_pki, tmp_path / "own", pacs)
    assert_accepted(answer, log)
    assert f"revocation: CRL {pacs.crl_url} says good about {PACS}, fresh until " in log

    other_partition = f"http://127.0.0.1:{pacs.port}/partition-a.crl"
    served.write_bytes(openssl_crl(test_pki.pki, tmp_path / "ca-a", [], number=3, distribution_point=other_partition))
    with RevocationServer(pacs.port, pacs.files):
        answer, log = attempt(test_pki, tmp_path / "other", pacs)
    assert_rejected(answer, log, f"is not trusted: the CRL at {pacs.crl_url} is the CRL of another distribution point "
                                 f"({other_partition}) and cannot vouch for CN=localhost,O=Example Hospital Test PKI "
                                 "(a partial CRL: it may omit it)")


def test_a_partition_crl_file_never_vouches_for_a_certificate_without_that_distribution_point(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """[trust] crl: a partition's CRL file, and a PACS (revoked, in another partition) that names no
    distribution point: the file was taken as complete, "CRL file ... says good"."""
    pacs = make_pacs(test_pki, tmp_path, ocsp=False, cdp=False, revoked=True)
    crl_file = tmp_path / "partition-a.crl"
    crl_file.write_bytes(openssl_crl(test_pki.pki, tmp_path / "ca-a", [], number=2,
                                     distribution_point="http://pki.hospital.example/partition-a.crl"))
    answer, log = attempt(test_pki, tmp_path, pacs, trust={"crl": [str(crl_file)]})
    assert_rejected(answer, log, "is not trusted: no CRL from CN=Test Issuing CA,O=Example Hospital Test PKI among "
                                 f"the configured CRLs that could vouch for it (the CRL in {crl_file} is the CRL of "
                                 "another distribution point (http://pki.hospital.example/partition-a.crl)), so "
                                 f"{PACS} cannot be checked for revocation: add that CA's CRL")


# -- removeFromCRL --------------------------------------------------------------------------------

def test_a_delta_crl_releasing_the_pacs_from_hold_does_not_revoke_it(test_pki: ProvisionedPki,
                                                                      tmp_path: Path) -> None:
    """[trust] crl: the CA's complete CRL #5 (not listing the PACS) and its delta CRL #6 listing the
    PACS with removeFromCRL ("released from hold"): the entry was read as a revocation."""
    pacs = make_pacs(test_pki, tmp_path, ocsp=False, cdp=False)
    base, delta = tmp_path / "base.crl", tmp_path / "delta.crl"
    base.write_bytes(openssl_crl(test_pki.pki, tmp_path / "base", [], number=5))
    delta.write_bytes(openssl_crl(test_pki.pki, tmp_path / "delta", [pacs.certificate], number=6, delta_of=4,
                                  reason="removeFromCRL"))
    answer, log = attempt(test_pki, tmp_path, pacs, trust={"crl": [str(base), str(delta)]})
    assert_accepted(answer, log)


def checker_with_crl_files(test_pki: ProvisionedPki, paths: list[Path]) -> RevocationChecker:
    return RevocationChecker(certificates=load_certificates(test_pki.ca_bundle), ca_source="bundle",
                             crls=CrlStore(paths, interval=0), cache_directory=None, refresh=False)


def test_a_hold_is_released_by_a_later_removal_only(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The card session's checker on [trust] crl files: a complete CRL listing the PACS on
    certificateHold, and a delta CRL listing it with removeFromCRL. A later delta releases the hold;
    an earlier one (the CA put it on hold again since) does not."""
    pacs = make_pacs(test_pki, tmp_path, ocsp=False, cdp=False)
    held = tmp_path / "held-5.crl"
    held.write_bytes(openssl_crl(test_pki.pki, tmp_path / "held", [pacs.certificate], number=5,
                                 reason="certificateHold"))
    released_later, released_before = tmp_path / "delta-6.crl", tmp_path / "delta-4.crl"
    released_later.write_bytes(openssl_crl(test_pki.pki, tmp_path / "later", [pacs.certificate], number=6, delta_of=5,
                                           reason="removeFromCRL"))
    released_before.write_bytes(openssl_crl(test_pki.pki, tmp_path / "before", [pacs.certificate], number=4,
                                            delta_of=3, reason="removeFromCRL"))

    verdict = checker_with_crl_files(test_pki, [held, released_later]).check(pacs.certificate, "require")
    assert verdict.outcome == "allow", verdict.message
    verdict = checker_with_crl_files(test_pki, [held, released_before]).check(pacs.certificate, "require")
    assert verdict.revoked and verdict.message.endswith(f"(reason: certificateHold) according to CRL file {held}")


def test_a_removal_at_the_distribution_point_is_no_revocation_and_does_not_stick(test_pki: ProvisionedPki,
                                                                                 tmp_path: Path) -> None:
    """The card session's checker, fetching over HTTP: the distribution point serves the CA's delta
    CRL releasing the PACS from hold (removeFromCRL), then, once that expired, the CA's complete CRL
    without it. The removal was taken for a revocation, and since it is not certificateHold it was
    kept: the PACS stayed refused as revoked for as long as the agent ran."""
    pacs = make_pacs(test_pki, tmp_path, ocsp=False)
    served = pacs.files.crl_directory / "issuing-ca.crl"
    served.write_bytes(openssl_crl(test_pki.pki, tmp_path / "delta", [pacs.certificate], number=6, delta_of=4,
                                   reason="removeFromCRL", hours=1))
    now = [datetime.datetime.now(datetime.timezone.utc)]
    checker = RevocationChecker(certificates=load_certificates(test_pki.ca_bundle), ca_source="bundle",
                                cache_directory=tmp_path / "cache", refresh=False, clock=lambda: now[0])
    with RevocationServer(pacs.port, pacs.files):
        first = checker.check(pacs.certificate, "require")
        served.write_bytes(openssl_crl(test_pki.pki, tmp_path / "complete", [], number=7))
        now[0] += datetime.timedelta(hours=2)  # past the delta's nextUpdate: fetched again
        second = checker.check(pacs.certificate, "require")
    assert not first.revoked, first.message
    assert first.message == (f"the CRL at {pacs.crl_url} is a delta CRL and cannot vouch for CN=localhost,O=Example "
                             "Hospital Test PKI (a partial CRL: it may omit it)")
    assert second.outcome == "allow", second.message
