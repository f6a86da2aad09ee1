"""How the relay ends an association with A-ABORT (PS3.8 9.3.8) where it used to end it with a bare
close: a PACS's TLS close_notify in the middle of an association, a malformed PDU from either side
(the side that sent it is told too), and how a PACS's A-ABORT in place of an answer is counted and
audited. Also: a peer sending garbage on many connections makes one malformed-PDU alert a minute,
then its count, in the audit trail and in the log.

The PACSes that close, abort or send garbage here are hand-made TLS servers holding the PACS
certificate: no real PACS can be made to misbehave on cue. The far side is a real DICOM peer
(DCMTK's echoscu, pynetdicom) wherever what it reports is the point."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import struct
import time
import urllib.request
from pathlib import Path

import pytest

from agent_runner import accept_for, associate_rq, running_agent, tunnel
from conftest import ProvisionedPki, run_card_agent
from dicom_card_agent.dicom.pdu import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    AssociateAccept,
    AssociateRequest,
    MaximumLength,
    PresentationContextItemAC,
    PresentationContextItemRQ,
    a_release_rq,
    encode_associate_ac,
    encode_associate_rq,
    parse_a_abort,
    parse_associate_rq,
)
from peers.dcmtk import echoscu, storescp
from peers.pki_files import TlsServerFiles
from peers.ports import free_port
from peers.pynetdicom_scp import associate, tls_scp
from test_association_end_audit import audit_events
from test_relay_release import pdus_until_closed
from test_relay_tls_records import OneConnectionServer, read_pdu, server_context
from test_tunnel_association import receive_pdu

VERIFICATION = "1.2.840.10008.1.1"
# A-ABORT, DICOM UL service-provider (source 2), reason-not-specified (0): PS3.8 Table 9-26
PROVIDER_ABORT = bytes([A_ABORT, 0, 0, 0, 0, 4, 0, 0, 2, 0])
# ... invalid-PDU-parameter value (6)
INVALID_PARAMETER_ABORT = bytes([A_ABORT, 0, 0, 0, 0, 4, 0, 0, 2, 6])


def accept(request: bytes) -> bytes:
    """The A-ASSOCIATE-AC a PACS sends for ``request`` (an A-ASSOCIATE-RQ): every presentation
    context accepted with its first transfer syntax, and a Maximum Length (pynetdicom needs one)."""
    rq = parse_associate_rq(request)
    return encode_associate_ac(AssociateAccept(
        1, rq.called_ae_title, rq.calling_ae_title, rq.application_context_name,
        tuple(PresentationContextItemAC(pc.context_id, 0, pc.transfer_syntaxes[0]) for pc in rq.presentation_contexts),
        (MaximumLength(16384),)))


def read_until_closed(tls: ssl.SSLSocket) -> bytes:
    """What the agent sends the hand-made PACS until it closes (close_notify, or the TCP close)."""
    received = b""
    tls.settimeout(15)
    with contextlib.suppress(OSError):
        while chunk := tls.recv(65536):
            received += chunk
    return received


def test_a_pacs_close_notify_mid_association_gives_a_dcmtk_application_an_a_abort(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The PACS accepts echoscu's association and sends close_notify instead of the C-ECHO-RSP.
    echoscu used to see a bare end of stream and report a network error; an A-ABORT from the
    service-provider is what PS3.8 gives it for a transport that closes (AA-4)."""
    def serve(context: ssl.SSLContext, raw: socket.socket) -> None:
        with context.wrap_socket(raw, server_side=True) as tls:
            tls.sendall(accept(read_pdu(tls)))
            read_pdu(tls)  # the C-ECHO-RQ (one PDU: command set, last fragment), never answered
            with contextlib.suppress(OSError):
                tls.unwrap()

    server = OneConnectionServer(server_context(test_pki), serve)
    try:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", server.port)]) as agent:
            echo = echoscu(agent.port(), called_ae="PACS", timeout=30, log_level="trace")
            log = agent.wait_for_log(", 0.", timeout=5)
    finally:
        server.close()
    assert server.error is None, repr(server.error)
    # DCMTK's state machine (PS3.8 Table 9-10): an A-ABORT PDU in Sta6 is event 15, action AA-3. A bare
    # end of stream was "Transport connection closed indication" (event 17, AA-4); both end in
    # "Peer aborted Association", which is why its trace is what tells them apart.
    assert "DUL  Event:  A-ABORT PDU (on transport)\nT: DUL  Action: AA 3 Indicate Peer Aborted\n" in echo.stdout, \
        echo.stdout
    assert "E: Echo Failed: 0006:0317 Peer aborted Association (or never connected)" in echo.stdout
    closed = "closed the connection (TLS close_notify) in the middle of the association, without A-RELEASE or A-ABORT"
    assert f"server 127.0.0.1:{server.port} {closed}" in log, log



def test_a_pacs_close_notify_right_after_its_release_response_stays_a_plain_close(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The PACS answers the A-RELEASE-RQ and sends close_notify in the same TCP segment: the normal
    end. The relay read the close_notify before the A-RELEASE-RP it came with, and so took it for a
    close in the middle of the association."""
    def serve(context: ssl.SSLContext, raw: socket.socket) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_side=True)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                incoming.write(raw.recv(65536))
        raw.sendall(outgoing.read())
        received, accepted = b"", False
        while len(received) < len(associate_rq()) + len(a_release_rq()):
            try:
                received += tls.read(65536)
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())  # TLS 1.3 session tickets
                incoming.write(raw.recv(65536))
            if len(received) >= len(associate_rq()) and not accepted:
                tls.write(accept(received[:len(associate_rq())]))
                raw.sendall(outgoing.read())
                accepted = True
        tls.write(bytes([A_RELEASE_RP, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.unwrap()
        raw.sendall(outgoing.read())  # the A-RELEASE-RP and the close_notify: one segment on loopback
        raw.settimeout(15)
        with contextlib.suppress(OSError):
            while raw.recv(65536):  # until the agent closes
                pass

    server = OneConnectionServer(server_context(test_pki), serve)
    try:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", server.port)]) as agent:
            with socket.create_connection(("127.0.0.1", agent.port()), timeout=15) as application:
                application.sendall(associate_rq())
                assert receive_pdu(application)[0] == A_ASSOCIATE_AC
                application.sendall(a_release_rq())
                pdus = pdus_until_closed(application)
            log = agent.wait_for_log(", 0.", timeout=5)
    finally:
        server.close()
    assert server.error is None, repr(server.error)
    assert pdus == [bytes([A_RELEASE_RP, 0, 0, 0, 0, 4, 0, 0, 0, 0]), b""], log
    assert "WARNING" not in log, log


def test_a_pacs_abort_in_place_of_an_answer_is_counted_and_audited_as_such(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """PS3.8 9.2 lets an acceptor answer an A-ASSOCIATE-RQ with an A-ABORT (dcm4chee and others do for
    a calling AE title they do not know). It was counted as a rejection and left no audit record."""
    def serve(context: ssl.SSLContext, raw: socket.socket) -> bytes:
        with context.wrap_socket(raw, server_side=True) as tls:
            read_pdu(tls)
            tls.sendall(bytes([A_ABORT, 0, 0, 0, 0, 4, 0, 0, 0, 0]))  # DICOM UL service-user
            return read_until_closed(tls)

    audit_file = tmp_path / "audit" / "audit.log"
    server = OneConnectionServer(server_context(test_pki), serve)
    metrics = free_port()
    try:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", server.port)],
                           audit={"file": str(audit_file)}, metrics={"listen": f"127.0.0.1:{metrics}"}) as agent:
            association = associate(agent.port(), called_ae="PACS")
            log = agent.wait_for_log("instead of an answer", timeout=5)
            server.thread.join(10)
            config = tmp_path / "agent" / "agent.toml"
            status = json.loads(run_card_agent("status", "--json", "--config", config, env=test_pki.env(),
                                               check=True).stdout)
            text = run_card_agent("status", "--config", config, env=test_pki.env(), check=True).stdout
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as response:
                scraped = response.read().decode()
    finally:
        server.close()
    assert server.error is None, repr(server.error)
    assert association.is_aborted and not association.is_established
    counts = status["tunnels"][0]["this_session"]["associations"]
    assert (counts["aborted"], counts["rejected"], counts["failed"]) == (1, 0, {}), counts
    assert "0 associations accepted, 0 rejected by the PACS, 1 aborted instead of an answer, 0 refused" in text, text
    assert ('card_agent_associations_total{kind="tunnel",listener="pacs",outcome="aborted",reason=""} 1.0'
            in scraped), scraped
    reason = ("association PYNETDICOM-SCU -> PACS aborted by the PACS instead of an answer: A-ABORT from DICOM UL "
              "service-user")
    assert reason in log, log
    (begin,) = [line for line in audit_file.read_bytes().splitlines() if b"ASSOCIATION-BEGIN" in line]
    assert audit_events(audit_file).count(("Association Begin", reason)) == 1, audit_events(audit_file)
    assert b'EventOutcomeIndicator="4"' in begin, begin


def handshake_and_accept(context: ssl.SSLContext, raw: socket.socket) -> ssl.SSLSocket:
    """The hand-made PACS's TLS connection, once it has accepted the A-ASSOCIATE-RQ."""
    tls = context.wrap_socket(raw, server_side=True)
    tls.sendall(accept(read_pdu(tls)))
    return tls


def echoscu_trace(port: int) -> str:
    return echoscu(port, called_ae="PACS", timeout=30, log_level="trace").stdout


# DCMTK's state machine (PS3.8 Table 9-10) as its trace shows it reading our A-ABORT.
DCMTK_READ_AN_ABORT = "DUL  Event:  A-ABORT PDU (on transport)\n"


def test_a_malformed_pdu_from_the_pacs_is_answered_with_an_abort_to_both(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The PACS answers the C-ECHO-RQ with a P-DATA-TF whose PDV item overruns the PDU's length. The
    application got an A-ABORT; the PACS, which can still read one, got only the close."""
    def serve(context: ssl.SSLContext, raw: socket.socket) -> bytes:
        with handshake_and_accept(context, raw) as tls:
            read_pdu(tls)  # the C-ECHO-RQ
            tls.sendall(struct.pack(">BBLLBB", 4, 0, 8, 100, 1, 3) + b"xx")  # PDV item of 100 in a PDU of 8
            return read_until_closed(tls)

    server = OneConnectionServer(server_context(test_pki), serve)
    try:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", server.port)]) as agent:
            echo = echoscu_trace(agent.port())
            log = agent.wait_for_log("malformed PDU from the server", timeout=5)
            server.thread.join(10)
    finally:
        server.close()
    assert server.error is None, repr(server.error)
    assert server.result == INVALID_PARAMETER_ABORT, server.result
    assert DCMTK_READ_AN_ABORT in echo, echo
    assert f"malformed PDU from the server 127.0.0.1:{server.port}: " in log


def test_a_malformed_answer_split_over_two_reads_still_gives_the_application_an_abort(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The PACS's A-ASSOCIATE-AC comes in two TCP segments and its Application Context item overruns
    the PDU. The relay passed the first segment on as it came: the application had half a PDU,
    after which no A-ABORT can be read, and got a bare close. An association PDU is now passed on
    once it is whole."""
    def serve(context: ssl.SSLContext, raw: socket.socket) -> bytes:
        tls = context.wrap_socket(raw, server_side=True)
        with tls:
            bad = bytearray(accept(read_pdu(tls)))
            bad[76:78] = b"\xff\xff"  # the Application Context item's length, far beyond the PDU
            tls.sendall(bad[:20])
            time.sleep(0.5)
            tls.sendall(bad[20:])
            return read_until_closed(tls)

    server = OneConnectionServer(server_context(test_pki), serve)
    try:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", server.port)]) as agent:
            echo = echoscu_trace(agent.port())
            log = agent.wait_for_log("malformed PDU from the server", timeout=5)
            server.thread.join(10)
    finally:
        server.close()
    assert server.error is None, repr(server.error)
    assert DCMTK_READ_AN_ABORT in echo, echo
    assert server.result == INVALID_PARAMETER_ABORT, server.result
    # With the bare close: "F: Association Request Failed: 0006:0310 DUL network closed".
    assert "F: Association Request Failed: 0006:0317 Peer aborted Association (or never connected)" in echo, echo
    assert f"malformed PDU from the server 127.0.0.1:{server.port}: " in log


def test_a_malformed_pdu_from_the_application_split_over_two_reads_still_gives_the_pacs_an_abort(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The application's A-RELEASE-RQ header comes in two pieces and says 5 bytes (PS3.8: 4). The
    relay passed the first piece on to the PACS (DCMTK's storescp here), which then could not read an
    A-ABORT any more and saw the connection close."""
    request = encode_associate_rq(AssociateRequest(
        1, "STORESCP", "APP", "1.2.840.10008.3.1.1.1",
        (PresentationContextItemRQ(1, VERIFICATION, ("1.2.840.10008.1.2",)),), (MaximumLength(16384),)))
    with storescp(tmp_path / "received", tls=TlsServerFiles.from_pki(test_pki.pki), log_level="trace") as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)]) as agent:
        with socket.create_connection(("127.0.0.1", agent.port()), timeout=15) as application:
            application.sendall(request)
            assert receive_pdu(application)[0] == A_ASSOCIATE_AC
            application.sendall(bytes([A_RELEASE_RQ, 0, 0]))
            time.sleep(0.5)
            application.sendall(bytes([0, 0, 5, 0, 0, 0, 0, 0]))
            pdus = pdus_until_closed(application)
        log = agent.wait_for_log("malformed PDU from the application", timeout=5)
        time.sleep(0.5)
        pacs_log = pacs.log_text()
    assert pdus == [INVALID_PARAMETER_ABORT, b""], pdus
    assert DCMTK_READ_AN_ABORT in pacs_log, pacs_log
    assert "malformed PDU from the application: A-RELEASE-RQ PDU" in log, log


@pytest.mark.parametrize("rules", [{}, {"allowed_calling_ae_titles": ["APP*"]}], ids=["relayed", "read-first"])
def test_garbage_on_many_connections_makes_one_alert_and_one_line_then_their_count(
        test_pki: ProvisionedPki, tmp_path: Path, rules: dict) -> None:
    """A local program sends garbage on connection after connection: each made a WARNING line and an
    audit Security Alert of ~1.5 KB. Now the first is told in full, the rest counted and told once
    a minute, and when the listeners end (here as the agent stops), as refusals are. With
    association rules the request is read before the PACS is contacted ("read-first"); without,
    the relay reads it."""
    audit_file = tmp_path / "audit" / "audit.log"
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port, **rules)],
                           audit={"file": str(audit_file)}) as agent:
            answers = []
            for _ in range(20):
                with socket.create_connection(("127.0.0.1", agent.port()), timeout=15) as application:
                    application.sendall(b"\x09\x00\x00\x00\x00\x04garbage")  # no such PDU type
                    answers.append(pdus_until_closed(application))
            agent.wait_for_log("malformed PDU from the application", timeout=5)
            time.sleep(0.5)  # the last connections' ends
            running_log = agent.log()
    log = agent.log()
    unrecognized = bytes([A_ABORT, 0, 0, 0, 0, 4, 0, 0, 2, 1])  # service-provider, unrecognized-PDU
    assert answers == [[unrecognized, b""]] * 20
    warnings = [line for line in running_log.splitlines() if "WARNING" in line and "malformed PDU" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        "malformed PDU from the application: unknown PDU type 0x09"), warnings
    counted = re.compile(r"closed 19 more connections from uid \d+ on a malformed PDU in the last \d+ s: sent by "
                         r"the application")
    assert any("WARNING: tunnel pacs: " in line and counted.search(line) for line in log.splitlines()), log
    alerts = [reason for what, reason in audit_events(audit_file) if what == "Malformed DICOM PDU"]
    assert len(alerts) == 2, alerts
    assert alerts[0] == "malformed PDU from the application: unknown PDU type 0x09"
    assert counted.fullmatch(alerts[1]), alerts
