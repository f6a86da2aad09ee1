"""Revocation sources that lie, replay, cannot be asked or never answer.

Against a real agent where the behaviour is the agent's (an association refused or allowed, the
log line), else against the card session's own checker in-process. OCSP answers come from the
test PKI's real `openssl ocsp` responder (dicom_card_agent.softhsm.responder) where it can give
them; answers it cannot give (an older, replayed one; a revocation that is later lifted) are
built with `cryptography` and signed by the test PKI's real issuing CA. CRLs likewise."""

from __future__ import annotations

import datetime
import logging
import socket
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent_runner import associate_rq, running_agent, s_server, send_and_close, tunnel, wait_for
from conftest import ProvisionedPki
from dicom_card_agent.revocation.checker import RevocationChecker
from dicom_card_agent.softhsm import pki as test_ca
from dicom_card_agent.softhsm.responder import RevocationServer
from dicom_card_agent.trust.anchors import load_certificates
from peers.pki_files import load_ca
from test_crl_files import issuing_crl
from test_revocation import OCSP_ONLY, PACS, REVOKED_BY, Pacs, attempt, make_pacs
from test_tunnel_verification import assert_accepted, assert_rejected

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def in_process_checker(test_pki: ProvisionedPki, **settings) -> RevocationChecker:
    """The card session's checker, without a refresher and without a cache directory."""
    return RevocationChecker(certificates=load_certificates(test_pki.ca_bundle), ca_source="bundle",
                             cache_directory=None, refresh=False, **settings)


# -- a delegated responder whose certificate is not valid now ------------------------------------------

def delegated_responder(test_pki: ProvisionedPki, directory: Path, valid_from: datetime.datetime,
                        valid_until: datetime.datetime) -> tuple[Path, Path]:
    """A delegated OCSP responder certificate (id-kp-OCSPSigning) of the real issuing CA, valid
    from ``valid_from`` to ``valid_until``; its certificate and key files, for `openssl ocsp -rsigner`."""
    issuing = load_ca(test_pki.pki)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    certificate = issuing.issue(test_ca.name("Retired OCSP responder"), key.public_key(), not_before=valid_from,
                                not_after=valid_until, extensions=[
                                    (x509.BasicConstraints(ca=False, path_length=None), True),
                                    (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), False)])
    directory.mkdir(parents=True, exist_ok=True)
    certificate_path, key_path = directory / "responder.pem", directory / "responder.key"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return certificate_path, key_path


def test_a_response_signed_by_an_expired_delegated_responder_is_refused(test_pki: ProvisionedPki,
                                                                       tmp_path: Path) -> None:
    """The real `openssl ocsp` responder answers "good", signed with the key of a delegated
    responder certificate of the issuing CA that expired a year ago (a retired responder's key).
    RFC 6960: that signature vouches for nothing, so the PACS is unanswered and refused, the log
    naming the responder certificate and its expiry. Before, the response was accepted."""
    pacs = make_pacs(test_pki, tmp_path, cdp=False)
    pacs.files.signer, pacs.files.signer_key = delegated_responder(test_pki, tmp_path / "retired", NOW - 730 * DAY,
                                                                   NOW - 365 * DAY)
    with RevocationServer(pacs.port, pacs.files) as responder:
        answer, log = attempt(test_pki, tmp_path, pacs)
    assert responder.requests["ocsp"] == 1
    assert_rejected(answer, log, f"is not trusted: OCSP responder {pacs.ocsp_url} answered with a response signed by "
                                 "the delegated responder CN=Retired OCSP responder,O=Example Hospital Test PKI, whose "
                                 f"certificate expired on {NOW - 365 * DAY:%Y-%m-%d} ")
    assert "UTC: ignored" in log


@pytest.mark.parametrize("validity, refusal", [
    ((-DAY, 30 * DAY), None),
    ((30 * DAY, 400 * DAY), "whose certificate is valid only from {from_:%Y-%m-%d %H:%M} UTC: ignored (check this "
                            "computer's clock)"),
    ((-400 * DAY, -30 * DAY), "whose certificate expired on {until:%Y-%m-%d %H:%M} UTC: ignored"),
])
def test_a_delegated_responder_counts_only_while_its_certificate_is_valid(
        test_pki: ProvisionedPki, tmp_path: Path, validity: tuple[datetime.timedelta, datetime.timedelta],
        refusal: str | None) -> None:
    """In-process checker, the real `openssl ocsp` answering "good" signed by a delegated responder
    valid now (allowed), from 30 days on (not yet valid) or until 30 days ago (expired)."""
    valid_from, valid_until = NOW + validity[0], NOW + validity[1]
    pacs = make_pacs(test_pki, tmp_path, cdp=False)
    pacs.files.signer, pacs.files.signer_key = delegated_responder(test_pki, tmp_path / "responder", valid_from,
                                                                   valid_until)
    with RevocationServer(pacs.port, pacs.files):
        verdict = in_process_checker(test_pki).check(pacs.certificate, "require")
    if refusal is None:
        assert verdict.outcome == "allow", verdict
        return
    assert verdict.outcome == "refuse" and not verdict.revoked, verdict
    assert verdict.message == (f"OCSP responder {pacs.ocsp_url} answered with a response signed by the delegated "
                               "responder CN=Retired OCSP responder,O=Example Hospital Test PKI, "
                               + refusal.format(from_=valid_from, until=valid_until)), verdict.message


# -- an older answer replayed after a newer one ----------------------------------------------------------

def ocsp_response(pacs: x509.Certificate, test_pki: ProvisionedPki, *, made: datetime.datetime,
                  reason: x509.ReasonFlags | None = None, nonce_of: bytes | None = None) -> bytes:
    """An OCSP response of the real issuing CA about ``pacs``, thisUpdate ``made``, valid for 6
    days: revoked for ``reason`` an hour before ``made``, else good; echoing the nonce of the
    request ``nonce_of`` (None: no nonce, as a pre-produced response)."""
    issuing = load_ca(test_pki.pki)
    status = ocsp.OCSPCertStatus.GOOD if reason is None else ocsp.OCSPCertStatus.REVOKED
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=pacs, issuer=issuing.certificate, algorithm=hashes.SHA1(), cert_status=status, this_update=made,
        next_update=made + 6 * DAY, revocation_time=None if reason is None else made - datetime.timedelta(hours=1),
        revocation_reason=reason).responder_id(ocsp.OCSPResponderEncoding.HASH, issuing.certificate)
    if nonce_of is not None:
        asked = ocsp.load_der_ocsp_request(nonce_of)
        builder = builder.add_extension(asked.extensions.get_extension_for_class(x509.OCSPNonce).value,
                                        critical=False)
    return builder.sign(issuing.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


class ReplayingResponder(RevocationServer):
    """The real responder, until ``replay`` is set: from then on a FAKE man in the middle sends
    those bytes (an older, genuinely signed answer) to every OCSP request."""

    replay: bytes | None = None

    def answer_ocsp(self, request: bytes) -> bytes | None:
        return self.replay if self.replay is not None else super().answer_ocsp(request)


@pytest.mark.parametrize("kind", ["crl", "ocsp"])
def test_an_older_good_answer_replayed_after_a_revoked_one_does_not_replace_it(test_pki: ProvisionedPki,
                                                                               tmp_path: Path, kind: str) -> None:
    """Through the agent (revocation_max_age 4 s: the refresher asks again after 3 s). The source
    says the PACS is revoked (OCSP: the real responder; CRL: the CA's CRL #2, of minutes ago); then
    someone on the path replays an older "good" answer, genuinely signed and not expired (OCSP:
    from yesterday, without nonce; CRL: #1 of yesterday). The next association is still refused
    as revoked, and the log names the source and the replay. Before, the older answer replaced
    the revoked one and the PACS was accepted."""
    pacs = make_pacs(test_pki, tmp_path, ocsp=kind == "ocsp", cdp=kind == "crl", revoked=True)
    assert pacs.files.crl_directory is not None
    crl_file = pacs.files.crl_directory / "issuing-ca.crl"
    der = serialization.Encoding.DER
    crl_file.write_bytes(issuing_crl(test_pki, [pacs.certificate], number=2, encoding=der))
    source = f"OCSP responder {pacs.ocsp_url}" if kind == "ocsp" else f"CRL {pacs.crl_url}"
    with ReplayingResponder(pacs.port, pacs.files) as responder, \
            s_server(test_pki, tmp_path, cert=str(pacs.chain), key=str(pacs.key)) as (pacs_port, _):
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs_port)],
                           trust={**OCSP_ONLY, "revocation_max_age": 4}) as agent:
            first = send_and_close(agent.port(), associate_rq())
            wait_for(lambda: agent.log().count("tunnel pacs: uid") == 1)
            if kind == "ocsp":
                responder.replay = ocsp_response(pacs.certificate, test_pki, made=NOW - DAY)
            else:
                crl_file.write_bytes(issuing_crl(test_pki, [], number=1, age=DAY, encoding=der))
            wait_for(lambda: responder.requests[kind] == 2, timeout=10)  # the refresher asked again
            time.sleep(0.5)  # and judged what came
            second = send_and_close(agent.port(), associate_rq())
            wait_for(lambda: agent.log().count("tunnel pacs: uid") == 2)
            log = agent.log()
    assert_rejected(first, log, "is not trusted: certificate ")
    refusals = REVOKED_BY.findall(log)
    assert refusals == [source, source], log
    assert_rejected(second, log.split("older than the one held")[-1], "is not trusted: certificate ")
    assert f"WARNING: revocation: {source} sent an answer about {PACS} made " in log
    assert "older than the one held (made " in log and "): a replayed answer, ignored; the held answer stays" in log


class SequenceResponder(RevocationServer):
    """A FAKE responder sending ``answers`` in turn (the last one again when they run out), each
    made by ``answer(request)``: what `openssl ocsp` cannot do, a revocation lifted later."""

    answers: list = []

    def answer_ocsp(self, request: bytes) -> bytes | None:
        make = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return make(request)


@pytest.mark.parametrize("reason, second_outcome", [
    (x509.ReasonFlags.key_compromise, "revoked"),
    (x509.ReasonFlags.certificate_hold, "allow"),
])
def test_a_certificate_seen_revoked_stays_revoked_unless_only_on_hold(test_pki: ProvisionedPki, tmp_path: Path,
                                                                      reason: x509.ReasonFlags,
                                                                      second_outcome: str) -> None:
    """In-process checker with its refresher, answers kept 2 s at most (asked again after 1.5 s).
    The responder says revoked, then (a newer, genuine "good") not: a revocation is for good, so
    the PACS stays refused; a certificateHold may be lifted, so it passes then. Before, the later
    "good" replaced the revocation."""
    pacs = make_pacs(test_pki, tmp_path, cdp=False)
    checker = RevocationChecker(certificates=load_certificates(test_pki.ca_bundle), ca_source="bundle",
                                cache_directory=None, max_age=datetime.timedelta(seconds=2))
    with SequenceResponder(pacs.port, pacs.files) as responder:
        responder.answers = [
            lambda request: ocsp_response(pacs.certificate, test_pki, made=NOW - datetime.timedelta(minutes=2),
                                          reason=reason, nonce_of=request),
            lambda request: ocsp_response(pacs.certificate, test_pki, made=datetime.datetime.now(datetime.UTC),
                                          nonce_of=request)]
        first = checker.check(pacs.certificate, "require")
        # The refresher asked again and has learnt the newer answer: its fetch is over.
        wait_for(lambda: responder.requests["ocsp"] == 2 and checker.fetches_pending() == 0, timeout=10)
        second = checker.check(pacs.certificate, "require")
    assert first.revoked, first
    assert ("revoked" if second.revoked else second.outcome) == second_outcome, second
    if second.revoked:
        assert second.message == first.message


# -- a source whose URL cannot be asked ------------------------------------------------------------------

def pacs_naming_ocsp_url(test_pki: ProvisionedPki, directory: Path, url: str) -> Pacs:
    """A PACS certificate of the real issuing CA whose OCSP responder is ``url`` (and no CRL), with its files."""
    issuing = load_ca(test_pki.pki)
    certificate, key = issuing.issue_server(["localhost"], ["127.0.0.1"], test_ca.RevocationSources(url, None))
    directory.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    chain, key_path = directory / "pacs-chain.pem", directory / "pacs.key"
    chain.write_bytes(certificate.public_bytes(pem) + issuing.certificate.public_bytes(pem))
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return Pacs(0, chain, key_path, certificate, None)  # type: ignore[arg-type]  # no revocation server of its own


LONG_HOST = "a" * 300 + ".test"


@pytest.mark.parametrize("url, why", [
    ("http://[::1/ocsp", "Invalid IPv6 URL"),
    (f"http://{LONG_HOST}/ocsp", "its host name cannot be looked up (a label empty or longer than 63 characters)"),
    ("http://127.0.0.1:1/ocsp\n2026-01-01 card-agent: INFO: ready: forged", "it holds a control character or a space"),
])
def test_a_malformed_source_url_is_that_sources_failure_not_an_error_of_the_check(
        test_pki: ProvisionedPki, tmp_path: Path, caplog: pytest.LogCaptureFixture, url: str, why: str) -> None:
    """In-process checker, "require": the PACS's certificate names an OCSP URL that cannot be
    asked. The check refuses, saying so (the URL escaped), and holds that failure like any other:
    the next check does not try again. Before, urllib's ValueError (UnicodeError for the long
    name) escaped the check, which the session reported as "certificate cannot be read"."""
    caplog.set_level(logging.WARNING, logger="agent.revocation")
    pacs = pacs_naming_ocsp_url(test_pki, tmp_path, url)
    checker = in_process_checker(test_pki, timeout=2.0)
    verdicts = [checker.check(pacs.certificate, "require") for _ in range(2)]
    shown = url.replace("\n", "\\x0a")
    expected = f"OCSP responder {shown}: this source cannot be asked: invalid URL {shown} ({why})"
    assert [(v.outcome, v.message) for v in verdicts] == [("refuse", expected)] * 2
    assert caplog.text.count("this source cannot be asked") == 1, caplog.text  # held: asked once


def test_a_malformed_source_url_under_prefer_is_allowed_with_a_warning(test_pki: ProvisionedPki,
                                                                        tmp_path: Path) -> None:
    """Through the agent, "prefer": the PACS names "http://[::1/ocsp" (a malformed IPv6 literal).
    It is a source that cannot be asked, so the association is allowed with the warning. Before,
    it was refused as if its certificate could not be read."""
    pacs = pacs_naming_ocsp_url(test_pki, tmp_path, "http://[::1/ocsp")
    answer, log = attempt(test_pki, tmp_path, pacs, revocation="prefer")
    assert_accepted(answer, log)
    assert ("WARNING: tunnel pacs: revocation not checked: OCSP responder http://[::1/ocsp: this source cannot be "
            "asked: invalid URL http://[::1/ocsp (Invalid IPv6 URL); allowed because revocation = \"prefer\"") in log


# -- sources that never answer do not delay another's fetch --------------------------------------------

class SilentSources:
    """FAKE revocation sources on 127.0.0.1 ``ports`` that accept every connection, read the
    request and never answer (a responder behind a link that drops its answers)."""

    def __init__(self, ports: list[int]) -> None:
        self.accepted = 0
        self._listeners = [socket.create_server(("127.0.0.1", port)) for port in ports]
        self._connections: list[socket.socket] = []
        self._stopped = threading.Event()
        self._threads = [threading.Thread(target=self._accept, args=(listener,), daemon=True)
                         for listener in self._listeners]
        for thread in self._threads:
            thread.start()

    def _accept(self, listener: socket.socket) -> None:
        listener.settimeout(0.1)
        while not self._stopped.is_set():
            try:
                connection, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            self._connections.append(connection)
            self.accepted += 1

    def __enter__(self) -> SilentSources:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        for thread in self._threads:
            thread.join(5)
        for sock in [*self._listeners, *self._connections]:
            sock.close()


def test_sources_that_never_answer_do_not_delay_a_healthy_sources_first_check(test_pki: ProvisionedPki,
                                                                               tmp_path: Path) -> None:
    """In-process checker, revocation_timeout 3 s. Four PACSes whose OCSP responder and CRL
    distribution point never answer (eight sources) are being checked when a fifth PACS, whose
    real `openssl ocsp` responder answers at once, is checked: it passes within a second. Before,
    the eight fetches filled the pool of four threads, the healthy fetch waited behind them, and
    the check was refused after 3 s, blaming the healthy responder."""
    dead = [make_pacs(test_pki, tmp_path / f"dead{n}") for n in range(4)]
    healthy = make_pacs(test_pki, tmp_path / "healthy", cdp=False)
    checker = in_process_checker(test_pki, timeout=3.0)
    with SilentSources([pacs.port for pacs in dead]) as silent, RevocationServer(healthy.port, healthy.files):
        waiting = [threading.Thread(target=checker.check, args=(pacs.certificate, "require")) for pacs in dead]
        for thread in waiting:
            thread.start()
        time.sleep(0.5)  # every dead source's fetch has begun (or, before, the first four)
        started = time.monotonic()
        verdict = checker.check(healthy.certificate, "require")
        seconds = time.monotonic() - started
        accepted = silent.accepted
        for thread in waiting:
            thread.join(10)
    assert verdict.outcome == "allow", verdict
    assert seconds < 1.0, seconds
    assert accepted == 8, accepted  # each dead source was being asked at once, in a thread of its own


def test_beyond_the_most_fetches_at_once_a_source_is_not_asked_and_that_is_logged(
        test_pki: ProvisionedPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The cap on fetches under way (64, cut to 2 here) is reached by a PACS whose two sources
    never answer: the next PACS's source is not asked, its check says why at once (not held as a
    failure: asked again once a fetch ended), and the log says so once."""
    from dicom_card_agent.revocation import checker as checker_module

    monkeypatch.setattr(checker_module, "MAX_FETCHES_AT_ONCE", 2)
    caplog.set_level(logging.WARNING, logger="agent.revocation")
    dead = make_pacs(test_pki, tmp_path / "dead")
    healthy = make_pacs(test_pki, tmp_path / "healthy", cdp=False)
    checker = in_process_checker(test_pki, timeout=2.0)
    with SilentSources([dead.port]), RevocationServer(healthy.port, healthy.files) as responder:
        waiting = threading.Thread(target=checker.check, args=(dead.certificate, "require"))
        waiting.start()
        wait_for(lambda: checker.fetches_pending() == 2, timeout=2)
        started = time.monotonic()
        refused = [checker.check(healthy.certificate, "require") for _ in range(2)]
        seconds = time.monotonic() - started
        waiting.join(10)
        wait_for(lambda: checker.fetches_pending() == 0, timeout=2)
        allowed = checker.check(healthy.certificate, "require")
    why = (f"OCSP responder {healthy.ocsp_url} was not asked: 2 fetches from other sources are under way (the most "
           "at once), none answered yet")
    assert [(v.outcome, v.message) for v in refused] == [("refuse", why)] * 2
    assert seconds < 0.5, seconds
    assert caplog.text.count(f"revocation: {why}; each ends within 2 s ([trust] revocation_timeout)") == 1
    assert allowed.outcome == "allow" and responder.requests["ocsp"] == 1, allowed
