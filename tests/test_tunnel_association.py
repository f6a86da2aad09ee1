"""The agent as a DICOM-aware tunnel, against real peers: the card's username in User Identity
Negotiation, AE title rules, malformed PDUs from the application, and what the log says."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from pynetdicom.dimse_messages import C_ECHO_RQ
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.pdu import P_DATA_TF as P_DATA_TF_PDU

from agent_runner import LOG_TIMESTAMP, FramedEchoServer, associate_rq, log_lines, running_agent, tunnel
from conftest import ProvisionedPki
from dicom_card_agent.dicom.pdu import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    DEFAULT_MAX_COMMAND_SET_LENGTH,
    P_DATA_TF,
    AssociateAccept,
    PresentationContextItemAC,
    encode_associate_ac,
    parse_a_abort,
    parse_associate_rj,
    parse_associate_rq,
)
from peers.dcmtk import TLS_DETAILS_BEGIN, echoscu, storescp, storescu
from peers.pki_files import TlsServerFiles
from peers.ports import free_port
from peers.pynetdicom_scp import associate, tls_scp
from peers.study import make_study

VERIFICATION = "1.2.840.10008.1.1"


def test_the_pacs_sees_the_card_username(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port, user_identity="username",
                                                                 user_identity_username="{cn}")]) as agent:
            association = associate(agent.port(), sop_classes=[VERIFICATION], calling_ae="VIEWER",
                                    called_ae="ARCHIVE")
            assert association.is_established and association.send_c_echo().Status == 0
            association.release()
            log = agent.wait_for_log(" bytes up")
        records = pacs.wait_for_ended()
    assert records[0].usernames == ["Alice Example"]
    assert (records[0].calling_ae, records[0].called_ae) == ("VIEWER", "ARCHIVE")
    assert ("association VIEWER -> ARCHIVE accepted, 4 of 4 presentation contexts: Verification SOP Class; "
            "user identity 'Alice Example'") in log
    assert "as CN=Alice Example, issuer CN=Test Issuing CA, VIEWER -> ARCHIVE," in log


def test_storescp_accepts_a_study_with_the_user_identity(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", files=3)
    with storescp(tmp_path / "received", tls=TlsServerFiles.from_pki(test_pki.pki)) as scp:
        with running_agent(test_pki, tmp_path / "agent",
                           [tunnel("pacs", scp.port, user_identity="username",
                                   user_identity_positive_response=True)]) as agent:
            result = storescu(agent.port(), study)
            log = agent.wait_for_log("instances stored")
        stored = scp.stored_files()
        server_log = scp.log_text()
    assert result.returncode == 0, result.stdout
    assert len(stored) == 3
    assert "; 3 of 3 instances stored" in log
    assert "Username: [Alice Example]" in server_log and "Positive Response requested: Yes" in server_log


def test_a_calling_ae_title_outside_the_rules_is_rejected_before_the_pacs(test_pki: ProvisionedPki,
                                                                          tmp_path: Path) -> None:
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent",
                           [tunnel("pacs", pacs.port, allowed_calling_ae_titles=["MODALITY*"])]) as agent:
            refused = associate(agent.port(), calling_ae="VIEWER")
            allowed = associate(agent.port(), calling_ae="MODALITY_CT1")
            assert allowed.is_established
            allowed.release()
            log = agent.wait_for_log("refused")
        # One record per TLS connection the PACS accepted: with AE title rules, the request is
        # decided before the PACS is contacted, so VIEWER cost no connection under the card's
        # identity (and no card signature).
        calling_titles = [record.calling_ae for record in pacs.associations]
    assert refused.is_rejected
    assert (refused.acceptor.primitive.result, refused.acceptor.primitive.result_source,
            refused.acceptor.primitive.diagnostic) == (1, 1, 3)  # permanent, service-user, calling AE not recognized
    assert calling_titles == ["MODALITY_CT1"]  # the PACS never heard of VIEWER
    assert "association VIEWER -> ANY-SCP refused: calling AE title 'VIEWER' is not in allowed_calling_ae_titles" \
        in log


@pytest.mark.parametrize("rules", [{}, {"allowed_calling_ae_titles": ["*"]}], ids=["connect-early", "decide-first"])
def test_an_ae_title_with_a_line_feed_is_refused_and_forges_no_log_line(test_pki: ProvisionedPki, tmp_path: Path,
                                                                        rules: dict) -> None:
    request = bytearray(associate_rq())
    request[26:42] = b"\nevent=sign-in".ljust(16)  # the Calling-AE-title; pynetdicom would not send it
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port, **rules)]) as agent:
            with socket.create_connection(("127.0.0.1", agent.port()), timeout=15) as application:
                application.sendall(request)
                pdu_type, pdu = receive_pdu(application)
            log = agent.wait_for_log("refused")
        requests_at_the_pacs = [record.calling_ae for record in pacs.associations if record.calling_ae]
    assert pdu_type == A_ASSOCIATE_RJ and parse_associate_rj(pdu).describe() == (
        "rejected-permanent by DICOM UL service-user: calling-AE-title-not-recognized")
    assert requests_at_the_pacs == []
    assert ("association \\x0aevent=sign-in -> PACS refused: calling AE title '\\x0aevent=sign-in' holds the "
            "control character 0x0A, which an AE title must not contain") in log
    prefixes = ("card-agent: ", "card-agent[session]: ")
    assert [line for line in log_lines(log) if not line.startswith(prefixes)] == []  # no forged line
    assert all(LOG_TIMESTAMP.match(line) for line in log.splitlines())


def receive_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            raise AssertionError(f"connection closed after {header!r}")
        header += chunk
    length = struct.unpack(">L", header[2:])[0]
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return header[0], header + body


def test_a_malformed_pdu_from_the_application_aborts_its_association_only(test_pki: ProvisionedPki,
                                                                         tmp_path: Path) -> None:
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)]) as agent:
            with socket.create_connection(("127.0.0.1", agent.port()), timeout=15) as application:
                application.sendall(associate_rq())
                assert receive_pdu(application)[0] == A_ASSOCIATE_AC
                application.sendall(b"\x09\x00\x00\x00\x00\x04garbage")  # no such PDU type
                pdu_type, pdu = receive_pdu(application)
            log = agent.wait_for_log("malformed PDU from the application")
            records = pacs.wait_for_ended()
            association = associate(agent.port(), sop_classes=[VERIFICATION])  # the agent carries on
            assert association.is_established and association.send_c_echo().Status == 0
            association.release()
    assert pdu_type == A_ABORT
    assert parse_a_abort(pdu).describe() == "A-ABORT from DICOM UL service-provider: unrecognized-PDU"
    assert "malformed PDU from the application: unknown PDU type 0x09" in log
    assert records[0].ended == "aborted"  # the PACS got an A-ABORT too, not a silent drop


def c_echo_rq_on(context_id: int) -> bytes:
    """A C-ECHO-RQ as pynetdicom sends it, in P-DATA-TF PDUs for presentation context ``context_id``."""
    primitive = C_ECHO()
    primitive.MessageID, primitive.AffectedSOPClassUID = 1, VERIFICATION
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    return b"".join(P_DATA_TF_PDU(pdv).encode() for pdv in message.encode_msg(context_id, 16384))


def test_a_command_on_a_context_the_pacs_did_not_accept_is_aborted_before_the_pacs_sees_it(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """PS3.8 9.3.5: a PDV belongs to an accepted presentation context. The agent passed a C-ECHO on
    context 3 (never proposed) to the PACS, whose audit trail then disagreed with the agent's."""
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)]) as agent:
            with socket.create_connection(("127.0.0.1", agent.port()), timeout=15) as application:
                application.sendall(associate_rq())
                assert receive_pdu(application)[0] == A_ASSOCIATE_AC
                application.sendall(c_echo_rq_on(3))
                pdu_type, pdu = receive_pdu(application)
            log = agent.wait_for_log("malformed PDU from the application")
            records = pacs.wait_for_ended()
    assert pdu_type == A_ABORT
    assert parse_a_abort(pdu).describe() == "A-ABORT from DICOM UL service-provider: invalid-PDU-parameter value"
    assert ("malformed PDU from the application: a PDV item on presentation context 3, which the association did "
            "not accept (accepted: 1)") in log
    assert (records[0].ended, records[0].echoes) == ("aborted", 0)


@pytest.mark.parametrize("first_bytes, expected_log", [
    (b"\x09\x00\x00\x00\x00\x04garbage", "malformed PDU from the application: unknown PDU type 0x09"),
    (b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00",
     "malformed PDU from the application: A-RELEASE-RQ PDU before any A-ASSOCIATE-RQ"),
])
def test_with_ae_title_rules_a_malformed_start_is_aborted_without_contacting_the_pacs(
        test_pki: ProvisionedPki, tmp_path: Path, first_bytes: bytes, expected_log: str) -> None:
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent",
                           [tunnel("pacs", pacs.port, allowed_calling_ae_titles=["MODALITY*"])]) as agent:
            with socket.create_connection(("127.0.0.1", agent.port()), timeout=15) as application:
                application.sendall(first_bytes)
                pdu_type, pdu = receive_pdu(application)
            log = agent.wait_for_log("malformed PDU from the application")
            allowed = associate(agent.port(), calling_ae="MODALITY_CT1")  # the tunnel carries on
            assert allowed.is_established
            allowed.release()
        connections = [record.calling_ae for record in pacs.associations]
    assert pdu_type == A_ABORT and parse_a_abort(pdu).describe().startswith("A-ABORT from DICOM UL service-provider")
    assert expected_log in log
    assert connections == ["MODALITY_CT1"]


def test_with_ae_title_rules_an_unreachable_pacs_is_answered_at_once(test_pki: ProvisionedPki,
                                                                     tmp_path: Path) -> None:
    """The request was read before connecting: the A-ASSOCIATE-RJ must not wait for another one."""
    with running_agent(test_pki, tmp_path / "agent",
                       [tunnel("pacs", free_port(), allowed_calling_ae_titles=["MODALITY*"])]) as agent:
        started = time.monotonic()
        refused = associate(agent.port(), calling_ae="MODALITY_CT1")
        elapsed = time.monotonic() - started
        log = agent.wait_for_log("cannot reach the PACS")
    assert refused.is_rejected
    assert (refused.acceptor.primitive.result, refused.acceptor.primitive.result_source) == (2, 3)  # transient
    assert elapsed < 2.0, elapsed
    assert "connection refused (is the PACS running and listening on that port?)" in log


def test_a_username_the_certificate_cannot_give_is_a_clear_sign_in_error(test_pki: ProvisionedPki,
                                                                        tmp_path: Path) -> None:
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 104, user_identity="username",
                                                              user_identity_username="{upn}")]) as agent:
        log = agent.wait_for_log("sign-in-failed")
    assert ("tunnel pacs: the card's certificate (CN=Alice Example,O=Example Hospital Test PKI) has no upn for the "
            "user identity template '{upn}'") in log


class GarbageServer(FramedEchoServer):
    """A TLS server with the PACS certificate that answers any request with a PDU of unknown type;
    a PACS that misbehaves this way is not at hand, hence this fake."""

    def _answer(self, raw: socket.socket) -> None:
        try:
            with self.context.wrap_socket(raw, server_side=True) as tls:
                tls.recv(65536)
                tls.sendall(b"\x0a\x00\x00\x00\x00\x00")
                tls.recv(65536)
        except OSError:
            pass


def test_a_malformed_pdu_from_the_pacs_aborts_the_association(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    server = GarbageServer(test_pki)
    try:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", server.port)]) as agent:
            with socket.create_connection(("127.0.0.1", agent.port()), timeout=15) as application:
                application.sendall(associate_rq())
                pdu_type, pdu = receive_pdu(application)
            log = agent.wait_for_log("malformed PDU from the server")
            assert agent.process.poll() is None
    finally:
        server.close()
    assert pdu_type == A_ABORT
    assert parse_a_abort(pdu).describe() == "A-ABORT from DICOM UL service-provider: unrecognized-PDU"
    assert f"malformed PDU from the server 127.0.0.1:{server.port}: unknown PDU type 0x0A" in log


def command_fragment_pdu(fragment: bytes) -> bytes:
    """A P-DATA-TF PDU of one command fragment on context 1, not its command's last."""
    return struct.pack(">BBLLBB", P_DATA_TF, 0, len(fragment) + 6, len(fragment) + 2, 1, 0x01) + fragment


class OversizedCommandPacs(FramedEchoServer):
    """A TLS server with the PACS certificate that accepts the association, sends a command set of
    exactly the agent's limit (1 MiB) in one PDU without its last fragment and, once the application
    has all of it, one byte more in a PDU of its own. No PACS at hand sends a command set that long,
    hence this fake."""

    def __init__(self, test_pki: ProvisionedPki) -> None:
        self.application_has_the_first_pdu = threading.Event()
        super().__init__(test_pki)

    def _answer(self, raw: socket.socket) -> None:
        try:
            with self.context.wrap_socket(raw, server_side=True) as tls:
                request = parse_associate_rq(receive_pdu(tls)[1])
                tls.sendall(encode_associate_ac(AssociateAccept(
                    1, request.called_ae_title, request.calling_ae_title, request.application_context_name,
                    tuple(PresentationContextItemAC(pc.context_id, 0, pc.transfer_syntaxes[0])
                          for pc in request.presentation_contexts))))
                tls.sendall(command_fragment_pdu(bytes(DEFAULT_MAX_COMMAND_SET_LENGTH)))
                self.application_has_the_first_pdu.wait(30)
                tls.sendall(command_fragment_pdu(b"\x00"))
                tls.recv(65536)  # until the agent ends the connection
        except OSError:
            pass


def test_a_command_set_over_the_limit_from_the_pacs_aborts_the_application_after_whole_pdus(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """docs/security.md: an oversized PDU ends the association with A-ABORT. The PDU that passes the
    limit arrives on a PDU boundary, after whole PDUs went to the application, and fails mid-PDU;
    the agent dropped it whole but looked at where its framer stopped, and closed without A-ABORT."""
    pacs = OversizedCommandPacs(test_pki)
    try:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)]) as agent:
            with socket.create_connection(("127.0.0.1", agent.port()), timeout=15) as application:
                application.sendall(associate_rq())
                assert receive_pdu(application)[0] == A_ASSOCIATE_AC
                pdu_type, pdu = receive_pdu(application)
                assert (pdu_type, len(pdu)) == (P_DATA_TF, DEFAULT_MAX_COMMAND_SET_LENGTH + 12)
                pacs.application_has_the_first_pdu.set()
                pdu_type, pdu = receive_pdu(application)
            log = agent.wait_for_log("malformed PDU from the server")
    finally:
        pacs.close()
    assert pdu_type == A_ABORT
    assert parse_a_abort(pdu).describe() == "A-ABORT from DICOM UL service-provider: invalid-PDU-parameter value"
    assert (f"malformed PDU from the server 127.0.0.1:{pacs.port}: command set on presentation context 1 exceeds "
            f"the {DEFAULT_MAX_COMMAND_SET_LENGTH}-byte limit for command sets") in log


class OutOfOrderPacs(FramedEchoServer):
    """A TLS server with the PACS certificate that breaks PS3.8's order: a command fragment before
    its A-ASSOCIATE-AC, a second A-ASSOCIATE-AC, or an AC answering a context never proposed (7),
    followed by a command fragment on it. No PACS at hand does, hence this fake."""

    def __init__(self, test_pki: ProvisionedPki, fault: str) -> None:
        self.fault = fault
        super().__init__(test_pki)

    def _answer(self, raw: socket.socket) -> None:
        try:
            with self.context.wrap_socket(raw, server_side=True) as tls:
                request = parse_associate_rq(receive_pdu(tls)[1])
                contexts = [PresentationContextItemAC(pc.context_id, 0, pc.transfer_syntaxes[0])
                            for pc in request.presentation_contexts]
                if self.fault == "unproposed-context":
                    contexts.append(PresentationContextItemAC(7, 0, "1.2.840.10008.1.2"))
                if self.fault == "unaccepted-context":  # abstract-syntax-not-supported, then used anyway
                    contexts = [PresentationContextItemAC(pc.context_id, 3, None) for pc in contexts]
                accept = encode_associate_ac(AssociateAccept(1, request.called_ae_title, request.calling_ae_title,
                                                             request.application_context_name, tuple(contexts)))
                command = struct.pack(">BBLLBB", P_DATA_TF, 0, 6, 2, 7, 0x03)  # an (empty) last command fragment
                pdus = {"data-before-the-answer": [command, accept], "second-answer": [accept, accept],
                        "unproposed-context": [accept, command],
                        "unaccepted-context": [accept, struct.pack(">BBLLBB", P_DATA_TF, 0, 6, 2, 1, 0x03)]}[self.fault]
                for pdu in pdus:
                    tls.sendall(pdu)
                tls.recv(65536)  # until the agent ends the connection
        except OSError:
            pass


@pytest.mark.parametrize("fault, message", [
    ("data-before-the-answer", "a P-DATA-TF PDU came before the A-ASSOCIATE-AC or -RJ"),
    ("second-answer", "a second answer (A-ASSOCIATE-AC) to the A-ASSOCIATE-RQ"),
    ("unproposed-context", "its A-ASSOCIATE-AC answers presentation context 7, which the A-ASSOCIATE-RQ did not "
                           "propose"),
    ("unaccepted-context", "a PDV item on presentation context 1, which the association did not accept "
                           "(accepted: none)"),
])
def test_a_pacs_breaking_the_order_of_the_association_is_aborted(test_pki: ProvisionedPki, tmp_path: Path,
                                                                 fault: str, message: str) -> None:
    """The acceptor's PDUs passed unchecked: the application got P-DATA before any AC, two ACs, or an
    association with a context it never proposed (the audit trail took in what came on it). Now it
    gets an A-ABORT, after at most the first AC (which goes with the second when both come in one read)."""
    pacs = OutOfOrderPacs(test_pki, fault)
    try:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)]) as agent:
            with socket.create_connection(("127.0.0.1", agent.port()), timeout=15) as application:
                application.sendall(associate_rq())
                got = [receive_pdu(application)[0]]
                if got[0] == A_ASSOCIATE_AC and fault in ("second-answer", "unaccepted-context"):
                    got.append(receive_pdu(application)[0])
                rest = application.recv(65536)
            log = agent.wait_for_log("malformed PDU from the server")
    finally:
        pacs.close()
    before_the_abort = [[], [A_ASSOCIATE_AC]] if fault in ("second-answer", "unaccepted-context") else [[]]
    assert got[-1] == A_ABORT and got[:-1] in before_the_abort and rest == b"", (got, rest)
    assert f"malformed PDU from the server 127.0.0.1:{pacs.port}: {message}" in log


@pytest.mark.parametrize("probe", [b"", associate_rq()[:10]], ids=["connect-and-close", "half-a-request"])
def test_a_probe_that_leaves_before_its_request_does_not_hold_a_single_association_pacs(
        test_pki: ProvisionedPki, tmp_path: Path, probe: bytes) -> None:
    # storescp serves one association at a time: a PACS connection kept open for the probe made
    # the next real association wait for it (30 s), then fail.
    with storescp(tmp_path / "received", tls=TlsServerFiles.from_pki(test_pki.pki)) as scp:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", scp.port)]) as agent:
            with socket.create_connection(("127.0.0.1", agent.port())) as client:
                client.sendall(probe)
                # Held a moment, as a port check does: a client gone before the agent looked it up is
                # refused as unidentified, and would not exercise the paths under test.
                time.sleep(0.5)
            started = time.monotonic()
            echo = echoscu(agent.port(), extra_args=["-to", "10", "-ta", "10", "-td", "10"])
            elapsed = time.monotonic() - started
            log = agent.wait_for_log(" full handshake ")
        pacs_log = scp.log_text()
    assert echo.returncode == 0, echo.stdout
    assert elapsed < 2.0, f"C-ECHO after the probe took {elapsed:.1f} s"
    assert "rejecting our certificate" not in log and "does not accept" not in log, log
    assert pacs_log.count("I: Association Acknowledged") == 1, pacs_log  # the C-ECHO's
    # Connect-and-close never reaches the PACS; half a request costs one TLS connection, ended at once.
    assert pacs_log.count(TLS_DETAILS_BEGIN) == (2 if probe else 1), pacs_log
