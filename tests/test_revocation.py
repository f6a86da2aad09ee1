"""Revocation against a real agent: OCSP answered by `openssl ocsp` over an index of the test CA,
CRL distribution points served over HTTP on loopback, the PACS `openssl s_server` (outbound) or
DCMTK storescu (inbound), the application a real A-ASSOCIATE-RQ.

The responder is the test PKI's own (dicom_card_agent.softhsm.responder): each OCSP request is
answered by a one-shot `openssl ocsp -index ... -reqin ... -respout ...`, each CRL is a file sent
by an HTTP GET, and it counts the requests. Each test issues its PACS a certificate naming that
test's responder port; the configuration has no [trust] crl, so OCSP and CRL distribution points
are the only sources."""

from __future__ import annotations

import datetime
import logging
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from agent_runner import (
    associate_rq,
    lock_while_the_application_reads,
    running_agent,
    s_server,
    send_and_close,
    tunnel,
    wait_for,
)
from conftest import ProvisionedPki
from dicom_card_agent.softhsm import pki as test_ca
from dicom_card_agent.softhsm.responder import ResponderFiles, RevocationServer, index, sources_at
from peers.pki_files import load_ca
from peers.ports import free_port
from test_tunnel_verification import assert_accepted, assert_rejected

PACS = "CN=localhost,O=Example Hospital Test PKI (issuer CN=Test Issuing CA,O=Example Hospital Test PKI)"
OCSP_ONLY = {"crl": []}  # [trust]: no CRL files, so OCSP and the distribution points are the sources


@dataclass
class Pacs:
    """A PACS certificate naming this test's revocation server, and that server's files."""

    port: int  # where its OCSP responder and CRL distribution point are
    chain: Path
    key: Path
    certificate: x509.Certificate
    files: ResponderFiles
    host: str = "127.0.0.1"  # of the revocation server in the certificate's URLs: an address, or a name

    @property
    def ocsp_url(self) -> str:
        return f"http://{self.host}:{self.port}/ocsp"

    @property
    def crl_url(self) -> str:
        return f"http://{self.host}:{self.port}/issuing-ca.crl"


def make_pacs(test_pki: ProvisionedPki, directory: Path, *, ocsp: bool = True, cdp: bool = True,
              revoked: bool = False, in_index: bool = True, crl: str = "fresh", host: str = "127.0.0.1") -> Pacs:
    """Issue the PACS's certificate and the responder's index and CRL: ``crl`` is "fresh" (lists it
    if ``revoked``), "expired" or "forged" (the issuing CA's name, the untrusted CA's signature);
    ``host`` is the responder's host in the certificate's URLs."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    issuing = load_ca(test_pki.pki)
    urls = sources_at(port)  # the test PKI's URLs on 127.0.0.1, the host swapped for ``host``
    ocsp_url, crl_url = (url.replace("//127.0.0.1:", f"//{host}:", 1) for url in (urls.ocsp_url, urls.crl_url))
    sources = test_ca.RevocationSources(ocsp_url if ocsp else None, crl_url if cdp else None)
    certificate, key = issuing.issue_server(["localhost"], ["127.0.0.1"], sources)
    chain, key_path = directory / "pacs-chain.pem", directory / "pacs.key"
    chain.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (certificate, issuing.certificate)))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    listed = [certificate] if revoked else []
    (directory / "index.txt").write_text(index([certificate] if in_index else [], listed) if in_index else "")
    crl_directory = directory / "crl-http"
    crl_directory.mkdir()
    (crl_directory / "issuing-ca.crl").write_bytes(_crl(issuing, listed, crl, test_pki))
    files = ResponderFiles(directory / "index.txt", test_pki.pki / "issuing-ca.pem", test_pki.pki / "ocsp-signer.pem",
                           test_pki.pki / "private" / "ocsp-signer.key", crl_directory)
    return Pacs(port, chain, key_path, certificate, files, host)


def _crl(issuing: test_ca.CertificateAuthority, listed: list[x509.Certificate], kind: str,
         test_pki: ProvisionedPki) -> bytes:
    if kind == "forged":
        untrusted = load_ca(test_pki.pki, "untrusted")
        issuing = test_ca.CertificateAuthority(issuing.certificate, untrusted.key)
    return issuing.crl(listed, days=0 if kind == "expired" else 30).public_bytes(serialization.Encoding.DER)


@contextmanager
def association_through_agent(test_pki: ProvisionedPki, workdir: Path, pacs: Pacs, *, revocation: str = "require",
                              trust: dict | None = None, **config) -> Iterator[tuple[bytes, str]]:
    with s_server(test_pki, workdir, cert=str(pacs.chain), key=str(pacs.key)) as (port, _):
        settings = {} if revocation == "require" else {"revocation": revocation}  # require: the default
        with running_agent(test_pki, workdir / "agent", [tunnel("pacs", port, **settings)],
                           trust=trust if trust is not None else OCSP_ONLY, **config) as agent:
            answer = send_and_close(agent.port(), associate_rq())
            wait_for(lambda: "tunnel pacs: uid" in agent.log())
            yield answer, agent.log()


def attempt(test_pki: ProvisionedPki, workdir: Path, pacs: Pacs, **settings) -> tuple[bytes, str]:
    with association_through_agent(test_pki, workdir, pacs, **settings) as result:
        return result


REVOKED_BY = re.compile(r"is not trusted: certificate CN=localhost,O=Example Hospital Test PKI \(issuer CN=Test "
                        r"Issuing CA,O=Example Hospital Test PKI\) was revoked on \d{4}-\d\d-\d\d \d\d:\d\d UTC "
                        r"\(reason: keyCompromise\) according to (.*)$", re.MULTILINE)


# -- OCSP ---------------------------------------------------------------------------------------

def test_ocsp_good_is_accepted_and_a_cached_answer_costs_no_request(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    pacs = make_pacs(test_pki, tmp_path, cdp=False)
    with RevocationServer(pacs.port, pacs.files) as responder:
        with s_server(test_pki, tmp_path, cert=str(pacs.chain), key=str(pacs.key)) as (port, _):
            tunnels = [tunnel("pacs", port)]
            with running_agent(test_pki, tmp_path / "agent", tunnels, trust=OCSP_ONLY) as agent:
                first = send_and_close(agent.port(), associate_rq())
                wait_for(lambda: agent.log().count("tunnel pacs: uid") == 1)
                after_first = responder.requests["ocsp"]
                second = send_and_close(agent.port(), associate_rq())
                wait_for(lambda: agent.log().count("tunnel pacs: uid") == 2)
                after_second = responder.requests["ocsp"]
                log = agent.log()
            # The answer survives a restart: the new agent reads it from its cache directory.
            with running_agent(test_pki, tmp_path / "agent", tunnels, trust=OCSP_ONLY) as agent:
                third = send_and_close(agent.port(), associate_rq())
                wait_for(lambda: "tunnel pacs: uid" in agent.log())
                after_restart = responder.requests["ocsp"]
                restarted_log = agent.log()
    for answer, text in ((first, log), (second, log), (third, restarted_log)):
        assert_accepted(answer, text)
    assert f"revocation: OCSP responder {pacs.ocsp_url} says good about {PACS}, fresh until " in log
    # One request for the first association, none for the second, none after the restart.
    assert (after_first, after_second, after_restart) == (1, 1, 1)


def test_ocsp_revoked_is_refused_naming_certificate_responder_time_and_reason(test_pki: ProvisionedPki,
                                                                               tmp_path: Path) -> None:
    pacs = make_pacs(test_pki, tmp_path, cdp=False, revoked=True)
    with RevocationServer(pacs.port, pacs.files):
        answer, log = attempt(test_pki, tmp_path, pacs, revocation="prefer")
    assert_rejected(answer, log, "is not trusted: certificate ")
    match = REVOKED_BY.search(log)
    assert match and match.group(1) == f"OCSP responder {pacs.ocsp_url}", log


def test_a_responder_that_is_down_refuses_under_require(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    pacs = make_pacs(test_pki, tmp_path, cdp=False)
    answer, log = attempt(test_pki, tmp_path, pacs)
    assert_rejected(answer, log, f"is not trusted: OCSP responder {pacs.ocsp_url}: cannot reach {pacs.ocsp_url}: "
                                 "Connection refused")


def test_a_responder_that_is_down_is_allowed_with_a_warning_under_prefer(test_pki: ProvisionedPki,
                                                                         tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    pacs = make_pacs(test_pki, tmp_path, cdp=False)
    audit_file = tmp_path / "audit.log"
    answer, log = attempt(test_pki, tmp_path, pacs, revocation="prefer", audit={"file": str(audit_file)})
    assert_accepted(answer, log)
    reason = (f"OCSP responder {pacs.ocsp_url}: cannot reach {pacs.ocsp_url}: Connection refused; allowed because "
              "revocation = \"prefer\"")
    assert f"card-agent[session]: WARNING: tunnel pacs: revocation not checked: {reason}" in log
    # A Security Alert (110113, node authentication 110126) that informs: the association went on.
    wait_for(lambda: b"110113" in audit_file.read_bytes())
    alerts = [m for m in map(ET.fromstring, audit_file.read_bytes().splitlines())
              if m.find("EventIdentification/EventID").get("csd-code") == "110113"]
    assert len(alerts) == 1
    identification = alerts[0].find("EventIdentification")
    assert identification.find("EventTypeCode").get("csd-code") == "110126"
    assert identification.get("EventOutcomeIndicator") == "0"
    assert identification.find("EventOutcomeDescription").text == reason


def test_a_response_signed_by_an_unrelated_key_is_no_answer(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    pacs = make_pacs(test_pki, tmp_path, cdp=False, revoked=False)
    pacs.files.signer = test_pki.pki / "untrusted-ca.pem"
    pacs.files.signer_key = test_pki.pki / "private" / "untrusted-ca.key"
    with RevocationServer(pacs.port, pacs.files) as responder:
        answer, log = attempt(test_pki, tmp_path, pacs)
    assert responder.requests["ocsp"] == 1
    assert_rejected(answer, log, f"is not trusted: OCSP responder {pacs.ocsp_url} answered with a response signed "
                                 "by CN=Untrusted Test CA,O=Example Hospital Test PKI, neither the issuer CN=Test "
                                 "Issuing CA,O=Example Hospital Test PKI nor a responder it certified for OCSP "
                                 "signing: ignored")


def test_an_unknown_status_is_no_answer(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    pacs = make_pacs(test_pki, tmp_path, cdp=False, in_index=False)
    with RevocationServer(pacs.port, pacs.files):
        answer, log = attempt(test_pki, tmp_path, pacs)
    assert_rejected(answer, log, f"is not trusted: OCSP responder {pacs.ocsp_url} does not know "
                                 "CN=localhost,O=Example Hospital Test PKI (status unknown)")


class StaleResponder(RevocationServer):
    """A FAKE responder for the one fault `openssl ocsp` cannot produce: a response whose nextUpdate
    has passed (it always answers for now). Signed by the real issuing CA, built with cryptography."""

    def answer_ocsp(self, request: bytes) -> bytes | None:
        asked = ocsp.load_der_ocsp_request(request)
        pki_dir = self.files.ca.parent
        issuing = load_ca(pki_dir)
        pacs = x509.load_pem_x509_certificate(self.files.index.with_name("pacs-chain.pem").read_bytes())  # type: ignore[union-attr]
        now = datetime.datetime.now(datetime.timezone.utc)
        assert asked.serial_number == pacs.serial_number
        response = (ocsp.OCSPResponseBuilder()
                    .add_response(cert=pacs, issuer=issuing.certificate, algorithm=hashes.SHA1(),
                                  cert_status=ocsp.OCSPCertStatus.GOOD, this_update=now - datetime.timedelta(days=2),
                                  next_update=now - datetime.timedelta(days=1), revocation_time=None,
                                  revocation_reason=None)
                    .responder_id(ocsp.OCSPResponderEncoding.HASH, issuing.certificate)
                    .sign(issuing.key, hashes.SHA256()))
        return response.public_bytes(serialization.Encoding.DER)


def test_a_stale_response_past_next_update_is_no_answer(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    pacs = make_pacs(test_pki, tmp_path, cdp=False)
    with StaleResponder(pacs.port, pacs.files):
        answer, log = attempt(test_pki, tmp_path, pacs)
    assert_rejected(answer, log, f"is not trusted: OCSP responder {pacs.ocsp_url} answered with a stale response "
                                 "(nextUpdate ")
    assert " UTC has passed)" in log


# -- CRL distribution points ---------------------------------------------------------------------

def test_a_fresh_crl_from_the_distribution_point_is_used_and_cached(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    pacs = make_pacs(test_pki, tmp_path, ocsp=False)
    with RevocationServer(pacs.port, pacs.files) as server:
        with s_server(test_pki, tmp_path, cert=str(pacs.chain), key=str(pacs.key)) as (port, _):
            with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", port)], trust=OCSP_ONLY) as agent:
                for count in (1, 2):
                    answer = send_and_close(agent.port(), associate_rq())
                    wait_for(lambda count=count: agent.log().count("tunnel pacs: uid") == count)
                    assert_accepted(answer, agent.log())
                    assert server.requests["crl"] == 1
                log = agent.log()
    assert f"revocation: CRL {pacs.crl_url} says good about {PACS}, fresh until " in log


def test_a_crl_listing_the_pacs_refuses_it(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    pacs = make_pacs(test_pki, tmp_path, ocsp=False, revoked=True)
    with RevocationServer(pacs.port, pacs.files):
        answer, log = attempt(test_pki, tmp_path, pacs, revocation="prefer")
    assert_rejected(answer, log, "is not trusted: certificate ")
    match = REVOKED_BY.search(log)
    assert match and match.group(1) == f"CRL {pacs.crl_url}", log


@pytest.mark.parametrize("crl, message", [
    ("expired", "the CRL at {url} expired on "),
    ("forged", "the CRL at {url} is not signed by the issuer CN=Test Issuing CA,O=Example Hospital Test PKI: ignored"),
])
def test_an_unusable_crl_is_no_answer(test_pki: ProvisionedPki, tmp_path: Path, crl: str, message: str) -> None:
    pacs = make_pacs(test_pki, tmp_path, ocsp=False, revoked=True, crl=crl)
    with RevocationServer(pacs.port, pacs.files):
        answer, log = attempt(test_pki, tmp_path, pacs)
        prefer_answer, prefer_log = attempt(test_pki, tmp_path / "prefer", pacs, revocation="prefer")
    assert_rejected(answer, log, "is not trusted: " + message.format(url=pacs.crl_url))
    assert "was revoked" not in log  # the listing of an unusable CRL counts for nothing
    assert_accepted(prefer_answer, prefer_log)
    assert "WARNING: tunnel pacs: revocation not checked: " + message.format(url=pacs.crl_url) in prefer_log


def test_an_unreachable_distribution_point_refuses_under_require(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    pacs = make_pacs(test_pki, tmp_path, ocsp=False)
    answer, log = attempt(test_pki, tmp_path, pacs)
    assert_rejected(answer, log, f"is not trusted: CRL {pacs.crl_url}: cannot reach {pacs.crl_url}: Connection refused")


def test_off_asks_nobody(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    pacs = make_pacs(test_pki, tmp_path, revoked=True)
    with RevocationServer(pacs.port, pacs.files) as server:
        answer, log = attempt(test_pki, tmp_path, pacs, revocation="off")
    assert_accepted(answer, log)
    assert sum(server.requests.values()) == 0


# -- inbound and the card's own certificate ----------------------------------------------------------

def test_inbound_a_pacs_with_a_revoked_client_certificate_is_refused(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    from agent_runner import inbound_listener, port_of
    from peers.dcmtk import storescp, storescu
    from peers.pki_files import TlsClientFiles
    from peers.study import make_study

    pacs = make_pacs(test_pki, tmp_path / "pacs", cdp=False, revoked=True)
    study = make_study(tmp_path / "study", files=1)
    with RevocationServer(pacs.port, pacs.files), storescp(tmp_path / "viewer", tls=None) as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", client_names=["localhost"],
                                    server_certificate=str(test_pki.pki / "server-chain.pem"),
                                    server_key=str(test_pki.pki / "server.key"))
        with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener], trust=OCSP_ONLY) as agent:
            result = storescu(port_of(listener), study, tls=TlsClientFiles(test_pki.ca_bundle, pacs.chain, pacs.key))
            log = agent.wait_for_log("refused the PACS")
        assert viewer.stored_files() == []
    assert result.returncode != 0
    assert (": certificate CN=localhost,O=Example Hospital Test PKI (issuer CN=Test Issuing CA,O=Example Hospital "
            "Test PKI) was revoked on ") in log
    assert f"(reason: keyCompromise) according to OCSP responder {pacs.ocsp_url}" in log


def test_sign_in_with_a_revoked_card_tells_the_clinician_at_once(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """mallory, OCSP only (no CRL files, the test PKI's responder without its CRLs): the sign-in fails
    with the reason, before any PACS is asked."""
    port = int((test_pki.pki / "ocsp" / "port").read_text())
    files = ResponderFiles.for_pki(test_pki.pki)
    files.crl_directory = None
    with RevocationServer(port, files) as responder:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", free_port())], token="mallory",
                           trust=OCSP_ONLY) as agent:
            log = agent.wait_for_log("sign-in to ")
    assert responder.requests["ocsp"] == 1  # its CRL distribution point is asked too, and answers 404
    assert ("this card's certificate is revoked, so no PACS would accept it: certificate CN=Mallory Example,O=Example "
            "Hospital Test PKI (issuer CN=Test Issuing CA,O=Example Hospital Test PKI) was revoked on ") in log
    assert (f"(reason: keyCompromise) according to OCSP responder http://127.0.0.1:{port}/ocsp. The card was not "
            "used: ask for a new card") in log
    assert "card session started" not in log
    assert "(card present, not signed in: this card's certificate is revoked" in log


# -- identities and doctor ---------------------------------------------------------------------------

def test_identities_show_each_identitys_revocation_status(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    import json

    from conftest import run_card_agent

    port = int((test_pki.pki / "ocsp" / "port").read_text())
    files = ResponderFiles.for_pki(test_pki.pki)
    files.crl_directory = None  # OCSP only: every answer below comes from `openssl ocsp`
    env = test_pki.env(XDG_CACHE_HOME=str(tmp_path / "cache"))
    with RevocationServer(port, files):
        result = run_card_agent("identities", "--module", "softhsm2", "--ca", test_pki.ca_bundle, "--json", env=env,
                                check=True)
        doctor = run_card_agent("doctor", "--module", "softhsm2", "--ca", test_pki.ca_bundle, "--token", "mallory",
                                env=env)
    found = {e["token"]: e for e in json.loads(result.stdout) if " CA," not in e["subject"]}  # no CA certificates
    responder = f"OCSP responder http://127.0.0.1:{port}/ocsp"
    assert found["alice"]["revocation"] == {"state": "good", "detail": f"not revoked according to {responder}"}
    assert found["alice"]["usable"]
    mallory = found["mallory"]
    assert mallory["revocation"]["state"] == "revoked" and not mallory["usable"]
    assert mallory["reason"].startswith("certificate CN=Mallory Example,O=Example Hospital Test PKI (issuer CN=Test "
                                        "Issuing CA,O=Example Hospital Test PKI) was revoked on ")
    assert mallory["reason"].endswith(f"(reason: keyCompromise) according to {responder}")
    assert found["stranger"]["revocation"] is None  # not trusted at all: nothing to ask
    assert found["stranger"]["reason"].endswith(
        "does not chain to a CA in {0}: not issued by any CA there: its issuer CN=Untrusted Test CA,O=Example "
        "Hospital Test PKI is not among the CA certificates of {0}; add that CA (and its root) to the bundle if it is "
        "to be trusted".format(test_pki.ca_bundle))
    assert "candidates exhausted" not in result.stdout
    assert doctor.returncode == 1
    assert "fail revocation mallory: certificate CN=Mallory Example" in doctor.stdout
    assert "     fix: this card cannot be used any more: ask for a new card" in doctor.stdout


# -- off the relay's path -----------------------------------------------------------------------------

class SlowResponder(RevocationServer):
    """A FAKE delay in front of the real `openssl ocsp` answer: a slow responder is a fault that a
    loopback responder does not produce by itself."""

    delay = 6.0

    def answer_ocsp(self, request: bytes) -> bytes | None:
        import time

        time.sleep(self.delay)
        return super().answer_ocsp(request)


def test_a_slow_first_check_waits_at_most_the_timeout_and_blocks_no_other_association(test_pki: ProvisionedPki,
                                                                                    tmp_path: Path) -> None:
    import threading
    import time

    pacs = make_pacs(test_pki, tmp_path, cdp=False)
    other_pacs = make_pacs(test_pki, tmp_path / "other", cdp=False)  # its own, quick responder
    with SlowResponder(pacs.port, pacs.files), RevocationServer(other_pacs.port, other_pacs.files), \
            s_server(test_pki, tmp_path, cert=str(pacs.chain), key=str(pacs.key)) as (slow_port, _), \
            s_server(test_pki, tmp_path / "other", cert=str(other_pacs.chain),
                     key=str(other_pacs.key)) as (other_port, _):
        tunnels = [tunnel("slow", slow_port), tunnel("other", other_port)]
        with running_agent(test_pki, tmp_path / "agent", tunnels,
                           trust={**OCSP_ONLY, "revocation_timeout": 3}) as agent:
            slow: dict[str, object] = {}

            def associate_slow() -> None:
                started = time.monotonic()
                slow["answer"] = send_and_close(agent.port("slow"), associate_rq())
                slow["seconds"] = time.monotonic() - started

            thread = threading.Thread(target=associate_slow)
            thread.start()
            time.sleep(0.5)  # the slow association is waiting for its first answer now
            started = time.monotonic()
            other = send_and_close(agent.port("other"), associate_rq())
            other_seconds = time.monotonic() - started
            still_waiting = thread.is_alive()
            thread.join(30)
            wait_for(lambda: agent.log().count(": uid") >= 2)
            log = agent.log()
    assert still_waiting, (other_seconds, slow)
    assert other_seconds < 2.0, other_seconds  # its own first check included
    assert_accepted(other, log)
    assert_rejected(slow["answer"], log, "tunnel slow: uid ")  # type: ignore[arg-type]
    assert (f"is not trusted: OCSP responder {pacs.ocsp_url} did not answer within 3 s (it is still being asked; a "
            "later association uses its answer)") in log
    assert 2.5 < slow["seconds"] < 5.5, slow["seconds"]  # type: ignore[operator]


def test_a_first_check_waiting_for_its_responder_ends_with_the_card_session_at_once(test_pki: ProvisionedPki,
                                                                                     tmp_path: Path) -> None:
    """Locking the session while an association waits for its first OCSP answer (a responder that
    takes 6 s; revocation_timeout 10 s) answers that application at once with A-ASSOCIATE-RJ, and
    the session ends at once. Before, the check went on waiting, and the session's end waited its
    whole grace (2 s) for it, and the card loop ending it with it."""
    import socket
    import time

    from dicom_card_agent.dicom.pdu import A_ASSOCIATE_RJ

    pacs = make_pacs(test_pki, tmp_path, cdp=False)
    with SlowResponder(pacs.port, pacs.files), \
            s_server(test_pki, tmp_path, cert=str(pacs.chain), key=str(pacs.key)) as (pacs_port, _):
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs_port)],
                           trust={**OCSP_ONLY, "revocation_timeout": 10}) as agent:
            application = socket.create_connection(("127.0.0.1", agent.port()), timeout=15)
            application.sendall(associate_rq())
            time.sleep(1.0)  # handshake done: the check waits for the responder now
            ended = lock_while_the_application_reads(test_pki, agent, tmp_path / "agent", application)
    assert ended.closed_in_ms < 500, ended.log
    assert ended.answered_after < 1.5, f"answered {ended.answered_after:.1f} s after the lock"
    assert ended.answer[:1] == bytes([A_ASSOCIATE_RJ]), ended.answer
    assert re.search(r"tunnel pacs: uid \d+ .*: card session ended: locked", ended.log), ended.log


def test_answers_are_fetched_again_before_they_go_stale_without_an_association(test_pki: ProvisionedPki,
                                                                               tmp_path: Path) -> None:
    """In-process checker (the card session's), real responder: an answer kept 4 s at most is
    fetched again by the refresher thread after 3/4 of that, with no check asking."""
    from dicom_card_agent.revocation.checker import RevocationChecker
    from dicom_card_agent.trust.anchors import load_certificates

    pacs = make_pacs(test_pki, tmp_path, cdp=False)
    with RevocationServer(pacs.port, pacs.files) as responder:
        checker = RevocationChecker(certificates=load_certificates(test_pki.ca_bundle), ca_source="bundle",
                                    cache_directory=tmp_path / "cache", max_age=datetime.timedelta(seconds=4))
        assert checker.check(pacs.certificate, "require").outcome == "allow"
        assert responder.requests["ocsp"] == 1
        wait_for(lambda: responder.requests["ocsp"] == 2, timeout=10)
        assert checker.check(pacs.certificate, "require").outcome == "allow"
        assert responder.requests["ocsp"] == 2  # the check used the refreshed answer
    assert list((tmp_path / "cache").iterdir()) and oct((tmp_path / "cache").stat().st_mode & 0o777) == "0o700"


def test_an_answer_is_used_at_most_revocation_max_age_after_it_was_fetched(test_pki: ProvisionedPki,
                                                                          tmp_path: Path) -> None:
    """The responder's answers are valid a day (nextUpdate); revocation_max_age (3 s here) bounds
    their use from when they were fetched. Once the responder stops answering (an attacker blocking
    it after the PACS was revoked), the kept "good" answer expires: from memory, and from the disk
    cache after a restart (the file's age counts)."""
    from dicom_card_agent.revocation.checker import RevocationChecker
    from dicom_card_agent.trust.anchors import load_certificates

    def checker() -> RevocationChecker:
        return RevocationChecker(certificates=load_certificates(test_pki.ca_bundle), ca_source="bundle",
                                 cache_directory=tmp_path / "cache", max_age=datetime.timedelta(seconds=3),
                                 timeout=1.0)

    pacs = make_pacs(test_pki, tmp_path, cdp=False)
    with RevocationServer(pacs.port, pacs.files) as responder:
        running = checker()
        assert running.check(pacs.certificate, "require").outcome == "allow"
    assert responder.requests["ocsp"] == 1
    time.sleep(3.5)
    from_memory = running.check(pacs.certificate, "require")
    from_disk = checker().check(pacs.certificate, "require")
    assert from_memory.outcome == "refuse", from_memory
    assert from_disk.outcome == "refuse", from_disk


def test_an_intermediate_of_trust_ca_revoked_at_its_distribution_point_refuses_the_pacs(test_pki: ProvisionedPki,
                                                                                      tmp_path: Path) -> None:
    """A department CA below the root, in [trust] ca, naming the root's CRL at a distribution point
    that lists it: its PACS is refused although the PACS's own certificate is good (CRL file)."""
    root = test_ca.CertificateAuthority(
        x509.load_pem_x509_certificate((test_pki.pki / "root-ca.pem").read_bytes()),
        serialization.load_pem_private_key((test_pki.pki / "private" / "root-ca.key").read_bytes(), None))
    port = free_port()
    root_crl_url = f"http://127.0.0.1:{port}/root-ca.crl"
    key = rsa_key()
    start = test_ca.now() - test_ca.DAY
    department_certificate = root.issue(
        test_ca.name("Test Department CA"), key.public_key(), not_before=start, not_after=start + 365 * test_ca.DAY,
        extensions=[*test_ca.ca_extensions(0), *test_ca.RevocationSources(crl_url=root_crl_url).extensions()])
    department = test_ca.CertificateAuthority(department_certificate, key)
    server, server_key = department.issue_server(["localhost"], ["127.0.0.1"])
    pem = serialization.Encoding.PEM
    (tmp_path / "pacs-chain.pem").write_bytes(server.public_bytes(pem) + department_certificate.public_bytes(pem))
    (tmp_path / "pacs.key").write_bytes(server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                                 serialization.NoEncryption()))
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(test_pki.ca_bundle.read_bytes() + department_certificate.public_bytes(pem))
    department_crl = tmp_path / "department.crl.pem"
    department_crl.write_bytes(department.crl([]).public_bytes(pem))
    crl_directory = tmp_path / "crl-http"
    crl_directory.mkdir()
    (crl_directory / "root-ca.crl").write_bytes(root.crl([department_certificate]).public_bytes(
        serialization.Encoding.DER))
    files = ResponderFiles(None, test_pki.pki / "issuing-ca.pem", test_pki.pki / "ocsp-signer.pem",
                           test_pki.pki / "private" / "ocsp-signer.key", crl_directory)
    trust = {"ca": str(bundle), "crl": [str(test_pki.crl), str(department_crl)]}
    with RevocationServer(port, files) as server_of_crls, \
            s_server(test_pki, tmp_path, cert=str(tmp_path / "pacs-chain.pem"), key=str(tmp_path / "pacs.key")) \
            as (pacs_port, _):
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs_port)], trust=trust) as agent:
            answer = send_and_close(agent.port(), associate_rq())
            wait_for(lambda: "tunnel pacs: uid" in agent.log())
            log = agent.log()
    assert server_of_crls.requests["crl"] == 1
    assert_rejected(answer, log, "is not trusted: certificate CN=Test Department CA,O=Example Hospital Test PKI "
                                 "(issuer CN=Test Root CA,O=Example Hospital Test PKI) was revoked on ")
    assert f"(reason: keyCompromise) according to CRL {root_crl_url}" in log


def rsa_key():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_bad_revocation_settings_are_named_with_the_fix(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    from agent_runner import write_config
    from conftest import USER_PIN, run_card_agent

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    bad_policy = write_config(tmp_path / "a" / "agent.toml", test_pki, [tunnel("pacs", 104, revocation="maybe")])
    bad_responder = write_config(tmp_path / "b" / "agent.toml", test_pki, [tunnel("pacs", 104)],
                                 trust={"ocsp_responder": "https://ocsp.example"})
    policy = run_card_agent("run", "--config", bad_policy, env=test_pki.env(CARD_PIN=USER_PIN))
    responder = run_card_agent("run", "--config", bad_responder, env=test_pki.env(CARD_PIN=USER_PIN))
    assert policy.returncode == responder.returncode == 2
    assert (f"{bad_policy} [[tunnel]] 'pacs'.revocation: 'maybe' is not one of 'require', 'prefer', 'off': "
            "\"require\" (the default) refuses a peer without a fresh answer, \"prefer\" allows it with a warning, "
            "\"off\" asks nothing") in policy.stderr
    assert (f"{bad_responder} [trust].ocsp_responder: 'https://ocsp.example' is not an http:// URL (OCSP answers are "
            "signed; responders speak plain HTTP)") in responder.stderr


def test_a_responder_that_does_not_answer_is_waited_for_once_not_by_every_association(test_pki: ProvisionedPki,
                                                                                     tmp_path: Path) -> None:
    """prefer: the first association waits for the silent responder (revocation_timeout); the fetch then
    fails on its own timeout, and for 30 s the next associations take that failure as the answer."""
    import time

    class SilentResponder(SlowResponder):
        delay = 10.0

    pacs = make_pacs(test_pki, tmp_path, cdp=False)
    with SilentResponder(pacs.port, pacs.files), \
            s_server(test_pki, tmp_path, cert=str(pacs.chain), key=str(pacs.key)) as (port, _):
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", port, revocation="prefer")],
                           trust={**OCSP_ONLY, "revocation_timeout": 2}) as agent:
            seconds = []
            for count in (1, 2, 3):
                started = time.monotonic()
                send_and_close(agent.port(), associate_rq())
                wait_for(lambda count=count: agent.log().count("tunnel pacs: uid") == count)
                seconds.append(time.monotonic() - started)
                if count == 1:
                    time.sleep(0.5)  # the fetch's own HTTP timeout (2 s) has passed: a failure now
            log = agent.log()
    assert 1.5 < seconds[0] < 4.0 and seconds[1] < 1.0 and seconds[2] < 1.0, seconds
    assert log.count(f"revocation: OCSP responder {pacs.ocsp_url} about {PACS}: cannot reach {pacs.ocsp_url}: no "
                     "answer within 2 s") == 1
    assert log.count("WARNING: tunnel pacs: revocation not checked: ") == 3


def test_a_reused_allow_never_hides_a_crl_file_or_an_answer_that_changed(test_pki: ProvisionedPki, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process checker (the card session's), real CRL file and real responder. An "allow" is
    reused for a while (agent/revocation/checker.py VERDICT_REUSE, stretched to a minute here); a
    CRL file rewritten to list the PACS, or an OCSP answer the refresher learnt since, must be seen
    by the very next check all the same. (Passes without the reuse; fails when the reuse ignores
    CRL-file or answer changes: checked by hand.)"""
    from dicom_card_agent.revocation import checker as checker_module
    from dicom_card_agent.revocation.checker import RevocationChecker
    from dicom_card_agent.trust.anchors import load_certificates
    from dicom_card_agent.trust.crls import CrlStore

    monkeypatch.setattr(checker_module, "VERDICT_REUSE", datetime.timedelta(minutes=1))
    issuing = load_ca(test_pki.pki)
    crl_file = tmp_path / "issuing.crl.pem"
    crl_file.write_bytes(issuing.crl([]).public_bytes(serialization.Encoding.PEM))
    files_only = RevocationChecker(certificates=load_certificates(test_pki.ca_bundle), ca_source="bundle",
                                   crls=CrlStore([crl_file], interval=0), cache_directory=None, refresh=False)
    file_pacs = make_pacs(test_pki, tmp_path / "file", ocsp=False, cdp=False)
    assert files_only.check(file_pacs.certificate, "require").outcome == "allow"
    crl_file.write_bytes(issuing.crl([file_pacs.certificate]).public_bytes(serialization.Encoding.PEM))
    verdict = files_only.check(file_pacs.certificate, "require")
    assert (verdict.outcome, verdict.revoked) == ("refuse", True), verdict

    pacs = make_pacs(test_pki, tmp_path / "ocsp", cdp=False)
    assert pacs.files.index is not None
    with RevocationServer(pacs.port, pacs.files) as responder:
        checker = RevocationChecker(certificates=load_certificates(test_pki.ca_bundle), ca_source="bundle",
                                    cache_directory=None, max_age=datetime.timedelta(seconds=4))
        assert checker.check(pacs.certificate, "require").outcome == "allow"
        pacs.files.index.write_text(index([pacs.certificate], [pacs.certificate]))
        # The refresher asked again (after 3/4 of 4 s) and has learnt the answer: its fetch is over.
        wait_for(lambda: responder.requests["ocsp"] == 2 and checker.fetches_pending() == 0, timeout=10)
        verdict = checker.check(pacs.certificate, "require")
    assert (verdict.outcome, verdict.revoked) == ("refuse", True), verdict


# -- a source that trickles, a name DNS does not answer ----------------------------------------------

class TricklingSource:
    """A FAKE revocation source on 127.0.0.1:``port`` that reads each request and sends its answer
    one byte per ``interval`` seconds, as a responder behind a broken link does (loopback never
    trickles by itself). ``phase`` "head": from the status line on; "body": the status line and
    headers at once (Content-Length of a big answer), then the body byte by byte.
    :meth:`stop_accepting` frees the port for the real responder (the source recovered) while the
    connections already trickling go on trickling. ``kept_open``: for each trickled connection that
    the client closed, how many seconds it had kept it open."""

    HEAD = b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n"

    def __init__(self, port: int, *, phase: str, interval: float = 0.5) -> None:
        self.phase = phase
        self.interval = interval
        self.requests = 0
        self.kept_open: list[float] = []
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.1)
        self._accepting = True
        self._stopped = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name="trickling-source", daemon=True)
        self._acceptor.start()
        self._connections: list[threading.Thread] = []

    def _accept(self) -> None:
        with self._listener:
            while self._accepting:
                try:
                    connection, _ = self._listener.accept()
                except TimeoutError:
                    continue
                thread = threading.Thread(target=self._trickle, args=(connection,), daemon=True)
                self._connections.append(thread)
                thread.start()

    def _trickle(self, connection: socket.socket) -> None:
        opened = time.monotonic()
        with connection:
            connection.settimeout(5)
            connection.recv(65536)  # the request, one small segment
            self.requests += 1
            answer = self.HEAD + bytes(1_000_000)
            sent = len(self.HEAD) if self.phase == "body" else 0
            connection.sendall(answer[:sent])
            while not self._stopped.is_set():
                try:
                    connection.sendall(answer[sent:sent + 1])
                except OSError:
                    break
                sent += 1
                readable, _, _ = select.select([connection], [], [], self.interval)
                if readable and self._closed_by_client(connection):
                    self.kept_open.append(time.monotonic() - opened)
                    return

    @staticmethod
    def _closed_by_client(connection: socket.socket) -> bool:
        try:
            return connection.recv(65536) == b""
        except OSError:  # reset: it closed with bytes of ours unread
            return True

    def stop_accepting(self) -> None:
        self._accepting = False
        self._acceptor.join(5)

    def __enter__(self) -> TricklingSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_accepting()
        self._stopped.set()
        for thread in self._connections:
            thread.join(5)


def seconds_until(condition, timeout: float) -> float:
    """Seconds until ``condition()`` held (polled every 50 ms), or infinity if not within ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            return float("inf")
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.parametrize("kind, phase", [("ocsp", "head"), ("ocsp", "body"), ("crl", "head"), ("crl", "body")])
def test_a_fetch_from_a_source_that_trickles_ends_at_the_timeout_and_frees_its_thread(
        test_pki: ProvisionedPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        kind: str, phase: str) -> None:
    """In-process checker (the card session's), revocation_timeout 1 s, the failure hold cut to 1 s;
    the PACS's only source (OCSP responder or CRL distribution point) sends one byte per 0.5 s. The
    fetch ends 1 s after it began: the check is refused, the pool's thread is free again, the
    source's connection is closed, and the source's failure, logged naming it and its slowness,
    answers the next check at once. Once the real responder answers on that port, the first check
    after the hold fetches afresh and passes. Before, the fetch read on as long as bytes came
    (urllib's timeout is per read): it held its thread and connection for good, and every later
    check waited for it, after the source recovered too."""
    from dicom_card_agent.revocation import checker as checker_module
    from dicom_card_agent.revocation.checker import RevocationChecker
    from dicom_card_agent.trust.anchors import load_certificates

    monkeypatch.setattr(checker_module, "FAILURE_HOLD", 1.0)
    caplog.set_level(logging.WARNING, logger="agent.revocation")
    pacs = make_pacs(test_pki, tmp_path, ocsp=kind == "ocsp", cdp=kind == "crl")
    url, source = (pacs.ocsp_url, f"OCSP responder {pacs.ocsp_url}") if kind == "ocsp" else \
        (pacs.crl_url, f"CRL {pacs.crl_url}")
    checker = RevocationChecker(certificates=load_certificates(test_pki.ca_bundle), ca_source="bundle",
                                cache_directory=None, timeout=1.0, refresh=False)
    with TricklingSource(pacs.port, phase=phase) as trickle:
        started = time.monotonic()
        first = checker.check(pacs.certificate, "require")
        first_seconds = time.monotonic() - started
        thread_free = first_seconds + seconds_until(lambda: checker.fetches_pending() == 0, timeout=3)
        assert thread_free < 1.6, f"the fetch still held its thread {time.monotonic() - started:.1f} s after it began"
        wait_for(lambda: trickle.kept_open, timeout=1)
        started = time.monotonic()
        second = checker.check(pacs.certificate, "require")
        second_seconds = time.monotonic() - started
        trickle.stop_accepting()
        time.sleep(1.2)  # the failure hold
        with RevocationServer(pacs.port, pacs.files) as responder:
            third = checker.check(pacs.certificate, "require")
    assert first.outcome == "refuse" and first_seconds < 1.5, (first, first_seconds)
    assert trickle.kept_open[0] < 1.6, trickle.kept_open  # the fetch closed its connection at its deadline
    slow = f"{url} sent too slowly: its answer did not finish within 1 s ("
    assert f"revocation: {source} about {PACS}: {slow}" in caplog.text
    assert second.outcome == "refuse" and second_seconds < 0.5, (second, second_seconds)
    assert f"{source}: {slow}" in second.message, second.message
    assert third.outcome == "allow", third
    assert (trickle.requests, responder.requests[kind]) == (1, 1)


def test_a_responder_that_trickles_refuses_within_the_timeout_and_passes_once_it_recovers(test_pki: ProvisionedPki,
                                                                                          tmp_path: Path) -> None:
    """The reviewer's case through the agent (revocation = "require", revocation_timeout 2 s): the
    PACS's responder sends its answer one byte per 0.5 s. The first association is refused after
    the timeout, the fetch ends at its own deadline (the agent closes the connection) and is
    logged as the responder's failure, naming it; the next association gets that failure at once.
    The responder recovers (the real one on its port) while the trickling connection goes on: the
    first association after the failure hold (30 s) is fetched afresh and accepted. Before, the
    fetch never ended, nothing was logged about the responder, and every association (after the
    recovery too) waited 2 s for that fetch and was refused, until the agent restarted."""
    from dicom_card_agent.revocation.checker import FAILURE_HOLD

    pacs = make_pacs(test_pki, tmp_path, cdp=False)
    slow = f"{pacs.ocsp_url} sent too slowly: its answer did not finish within 2 s ("
    answers: list[bytes] = []
    seconds: list[float] = []
    with TricklingSource(pacs.port, phase="head") as trickle, \
            s_server(test_pki, tmp_path, cert=str(pacs.chain), key=str(pacs.key)) as (pacs_port, _):
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs_port)],
                           trust={**OCSP_ONLY, "revocation_timeout": 2}) as agent:

            def associate() -> None:
                started = time.monotonic()
                answers.append(send_and_close(agent.port(), associate_rq()))
                seconds.append(time.monotonic() - started)
                wait_for(lambda: agent.log().count("tunnel pacs: uid") == len(answers))

            associate()
            agent.wait_for_log(f"revocation: OCSP responder {pacs.ocsp_url} about {PACS}: {slow}", timeout=3)
            failed_at = time.monotonic()
            associate()
            trickle.stop_accepting()
            with RevocationServer(pacs.port, pacs.files) as responder:
                time.sleep(max(0.0, failed_at + FAILURE_HOLD + 0.5 - time.monotonic()))
                associate()
                log = agent.log()
    assert_rejected(answers[0], log, f"is not trusted: OCSP responder {pacs.ocsp_url} ")
    assert seconds[0] < 3.5, seconds  # the timeout, the handshake and the agent's start of the check
    assert len(trickle.kept_open) == 1 and trickle.kept_open[0] < 2.8, trickle.kept_open
    assert_rejected(answers[1], log, f"is not trusted: OCSP responder {pacs.ocsp_url}: {slow}")
    assert seconds[1] < 1.0, seconds
    assert_accepted(answers[2], log)
    assert f"revocation: OCSP responder {pacs.ocsp_url} says good about {PACS}, fresh until " in log
    assert log.count(slow) == 2, log  # the warning, and the second association's refusal
    assert (trickle.requests, responder.requests["ocsp"]) == (1, 1)


RESPONDER_NAME = "ocsp.card-agent.test"  # .test: a name no real DNS answers (RFC 6761)


def test_a_responder_whose_name_dns_does_not_answer_costs_the_timeout_not_the_resolvers(test_pki: ProvisionedPki,
                                                                                         tmp_path: Path) -> None:
    """The PACS's certificate names its OCSP responder by a host name, and the agent's only DNS
    server drops every query (tests/peers/dns.py; the agent resolves through it). The fetch gives
    up at revocation_timeout (2 s), saying so. Before, it waited for glibc's resolver to give up
    (5 s x 2 attempts), its thread held meanwhile, and then said "Temporary failure in name
    resolution"."""
    from peers.dns import DnsServer, resolving_through

    pacs = make_pacs(test_pki, tmp_path, cdp=False, host=RESPONDER_NAME)
    failed = (f"revocation: OCSP responder {pacs.ocsp_url} about {PACS}: cannot reach {pacs.ocsp_url}: no DNS answer "
              f"for {RESPONDER_NAME} within 2 s")
    with DnsServer({RESPONDER_NAME: ["127.0.0.1"]}) as dns, \
            s_server(test_pki, tmp_path, cert=str(pacs.chain), key=str(pacs.key)) as (pacs_port, _):
        dns.silent = True
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs_port)],
                           trust={**OCSP_ONLY, "revocation_timeout": 2},
                           prefix=resolving_through(dns, tmp_path)) as agent:
            started = time.monotonic()
            answer = send_and_close(agent.port(), associate_rq())
            log = agent.wait_for_log(failed, timeout=3)
            failed_after = time.monotonic() - started
    assert_rejected(answer, log, f"is not trusted: OCSP responder {pacs.ocsp_url} ")
    assert failed_after < 3.5, failed_after
    assert (RESPONDER_NAME, "A") in dns.questions


def test_a_source_that_does_not_answer_in_http_is_no_answer(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """In-process checker: what answers on the PACS's OCSP responder port is no HTTP server (a FAKE
    one-line SSH banner). The check is refused naming the source and what it sent. Before,
    http.client's BadStatusLine escaped the fetch, and the check itself raised it."""
    from dicom_card_agent.revocation.checker import RevocationChecker
    from dicom_card_agent.trust.anchors import load_certificates

    pacs = make_pacs(test_pki, tmp_path, cdp=False)
    checker = RevocationChecker(certificates=load_certificates(test_pki.ca_bundle), ca_source="bundle",
                                cache_directory=None, timeout=2.0, refresh=False)
    with socket.create_server(("127.0.0.1", pacs.port)) as server:

        def banner() -> None:
            connection, _ = server.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

        thread = threading.Thread(target=banner, daemon=True)
        thread.start()
        verdict = checker.check(pacs.certificate, "require")
        thread.join(5)
    assert verdict.outcome == "refuse", verdict
    assert (f"OCSP responder {pacs.ocsp_url}: {pacs.ocsp_url} did not answer in HTTP (BadStatusLine "
            "'SSH-2.0-OpenSSH_9.2')") in verdict.message, verdict.message
