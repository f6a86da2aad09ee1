"""How long a revocation answer counts, and what it costs to keep asking: an OCSP response without
nextUpdate is used for `revocation_max_age` after it was made, never after, and is then not
fetched again every second; a [trust] crl file's signature is verified once per content, not once
per association.

OCSP responses are made by `openssl ocsp` (under faketime for one made in the past), CRLs by
`openssl ca -gencrl`; the PACS is `openssl s_server`, the agent real, the application a real
A-ASSOCIATE-RQ."""

from __future__ import annotations

import datetime
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from agent_runner import associate_rq, running_agent, s_server, send_and_close, tunnel, wait_for
from conftest import ProvisionedPki
from dicom_card_agent.revocation.checker import RevocationChecker
from dicom_card_agent.softhsm.responder import ResponderFiles, RevocationServer, index
from dicom_card_agent.trust import crls as crl_files
from dicom_card_agent.trust.anchors import load_certificates
from dicom_card_agent.trust.crls import CrlStore
from peers.pki_files import load_ca
from test_revocation import OCSP_ONLY, Pacs, make_pacs
from test_revocation_scope import openssl_crl
from test_tunnel_verification import assert_rejected


def ocsp_good_made_ago(test_pki: ProvisionedPki, pacs: Pacs, work: Path, ago: datetime.timedelta,
                       validity: list[str]) -> bytes:
    """A genuine "good" about the PACS, signed by the test PKI's OCSP signer, made by `openssl ocsp`
    ``ago`` (faketime) from an index in which it was still good; ``validity``: -nmin/-ndays (none:
    no nextUpdate, as many responders send)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "then.idx").write_text(index([pacs.certificate], []))
    request = ocsp.OCSPRequestBuilder().add_certificate(pacs.certificate, load_ca(test_pki.pki).certificate,
                                                        hashes.SHA1()).build()
    (work / "request.der").write_bytes(request.public_bytes(serialization.Encoding.DER))
    then = datetime.datetime.now(datetime.timezone.utc) - ago
    subprocess.run(["faketime", f"{then:%Y-%m-%d %H:%M:%S}", "openssl", "ocsp", "-index", str(work / "then.idx"),
                    "-rsigner", str(test_pki.pki / "ocsp-signer.pem"),
                    "-rkey", str(test_pki.pki / "private" / "ocsp-signer.key"),
                    "-CA", str(test_pki.pki / "issuing-ca.pem"),
                    "-reqin", str(work / "request.der"), "-respout", str(work / "response.der"), *validity],
                   check=True, capture_output=True, env={**os.environ, "TZ": "UTC"})
    return (work / "response.der").read_bytes()


class ReplayingResponder(RevocationServer):
    """A FAKE responder, for what an attacker on the plain-HTTP path (or a stale cache) does and
    `openssl ocsp` does not: it answers every request with the same recorded response."""

    def __init__(self, port: int, files: ResponderFiles, recorded: bytes) -> None:
        super().__init__(port, files)
        self.recorded = recorded

    def answer_ocsp(self, request: bytes) -> bytes | None:
        return self.recorded


def associations(test_pki: ProvisionedPki, workdir: Path, pacs: Pacs, recorded: bytes, count: int, idle: float
                 ) -> tuple[list[bytes], str, int]:
    """``count`` associations through a real agent, its OCSP responder replaying ``recorded``, then
    ``idle`` seconds without one: the application's answers, the agent's log, and the OCSP requests
    made while idle."""
    with ReplayingResponder(pacs.port, pacs.files, recorded) as responder, \
            s_server(test_pki, workdir, cert=str(pacs.chain), key=str(pacs.key)) as (port, _), \
            running_agent(test_pki, workdir / "agent", [tunnel("pacs", port)], trust=OCSP_ONLY) as agent:
        answers = []
        for number in range(1, count + 1):
            answers.append(send_and_close(agent.port(), associate_rq()))
            wait_for(lambda number=number: agent.log().count("tunnel pacs: uid") == number)
        before = responder.requests["ocsp"]
        time.sleep(idle)
        return answers, agent.log(), responder.requests["ocsp"] - before


def test_a_month_old_good_without_next_update_is_stale_and_not_asked_again_at_once(test_pki: ProvisionedPki,
                                                                                  tmp_path: Path) -> None:
    """The PACS is revoked now; a "good" about it made 30 days ago, without nextUpdate, is replayed.
    It was given thisUpdate + revocation_max_age (7 days: long past) as its validity and accepted
    ("says good ... fresh until" a date in the past), and, never fresh, fetched again every second."""
    pacs = make_pacs(test_pki, tmp_path, cdp=False, revoked=True)
    recorded = ocsp_good_made_ago(test_pki, pacs, tmp_path / "old", datetime.timedelta(days=30), [])
    made = ocsp.load_der_ocsp_response(recorded).this_update_utc
    answers, log, asked_while_idle = associations(test_pki, tmp_path, pacs, recorded, 3, idle=3.0)
    for answer in answers:
        assert_rejected(answer, log, f"is not trusted: OCSP responder {pacs.ocsp_url} answered with a stale response "
                                     f"(made {made:%Y-%m-%d %H:%M} UTC, without nextUpdate, more than 7 days ago: "
                                     "[trust] revocation_max_age)")
    assert "says good" not in log
    assert asked_while_idle == 0  # held as a failure for 30 s, as any unusable answer


# -- a big [trust] crl file -----------------------------------------------------------------------

class CountingCrl:
    """A CRL that counts its signature verifications and is otherwise the CRL it wraps. A wrapper,
    because nothing observable tells one verification from many but the time it takes, and a test
    does not time: a CRL of 400,000 entries took 0.36 s to verify, every association."""

    verified = 0

    def __init__(self, crl: x509.CertificateRevocationList) -> None:
        self._crl = crl

    def is_signature_valid(self, public_key: Any) -> bool:
        CountingCrl.verified += 1
        return self._crl.is_signature_valid(public_key)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._crl, attribute)


def test_a_crl_file_signature_is_verified_once_per_content(test_pki: ProvisionedPki, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The card session's checker, with the test PKI's PACS and a [trust] crl file listing other
    certificates (`openssl ca -gencrl`): 20 associations 2 s apart (past the 1 s an
    "allow" is reused), then the file replaced by the CA's next CRL, then 20 more."""
    CountingCrl.verified = 0
    real_load = crl_files.x509.load_der_x509_crl
    monkeypatch.setattr(crl_files.x509, "load_der_x509_crl", lambda data: CountingCrl(real_load(data)))
    pacs = x509.load_pem_x509_certificate((test_pki.pki / "server-chain.pem").read_bytes())
    others = [load_ca(test_pki.pki).issue_server([f"host{i}"], [], None)[0] for i in range(3)]
    crl_file = tmp_path / "issuing.crl"
    crl_file.write_bytes(openssl_crl(test_pki.pki, tmp_path / "crl-1", others, number=1))
    now = [datetime.datetime.now(datetime.timezone.utc)]
    checker = RevocationChecker(certificates=load_certificates(test_pki.ca_bundle), ca_source="bundle",
                                crls=CrlStore([crl_file], interval=0), cache_directory=None, refresh=False,
                                clock=lambda: now[0])

    def associate(times: int) -> list[str]:
        outcomes = []
        for _ in range(times):
            outcomes.append(checker.check(pacs, "require").outcome)
            now[0] += datetime.timedelta(seconds=2)
        return outcomes

    assert associate(20) == ["allow"] * 20
    assert CountingCrl.verified == 1
    replacement = tmp_path / "issuing.crl.new"
    replacement.write_bytes(openssl_crl(test_pki.pki, tmp_path / "crl-2", others[:2], number=2))
    os.replace(replacement, crl_file)
    assert associate(20) == ["allow"] * 20
    assert CountingCrl.verified == 2  # the new content verified once


def test_an_answer_the_full_disk_cuts_short_leaves_no_part_of_it_in_the_cache(tmp_path: Path, caplog) -> None:
    """The cache's file system full (a real tmpfs): the answer is not stored, said once, and the part
    written is removed, not left to hold the space a later answer needs."""
    from dicom_card_agent.revocation.checker import _DiskCache
    from test_audit_failure import small_tmpfs

    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        cache = _DiskCache(disk / "revocation-cache")
        free = os.statvfs(disk)
        (disk / "other").write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 16384))  # 16 KiB left
        cache.store("crl http://ca.example/ca.crl", b"\x30" * 65536)
        left = sorted(p.name for p in (disk / "revocation-cache").iterdir())
    assert left == [], left
    assert "revocation cache: cannot write" in caplog.text and "No space left on device" in caplog.text, caplog.text
