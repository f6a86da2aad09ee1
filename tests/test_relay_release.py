"""How an outbound association ends when the application half-closes or the PACS does not finish it:
the A-RELEASE-RP reaches an application that half-closed after its A-RELEASE-RQ, a PACS that never
answers the A-RELEASE-RQ gives its connection (and its place among max_connections) back after the
ARTIM timer, and a PACS that closes mid-association leaves the application an A-ABORT, not a bare end
of stream. Also: an A-ASSOCIATE-RQ that has no room for the card's User Identity is rejected."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from agent_runner import accept_for, associate_rq, running_agent, tunnel
from conftest import ProvisionedPki, run_card_agent
from dicom_card_agent.dicom.pdu import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_RELEASE_RP,
    P_DATA_TF,
    AssociateRequest,
    MaximumLength,
    PresentationContextItemRQ,
    RawItem,
    a_release_rq,
    encode_associate_rq,
)
from peers.dcmtk import storescp
from peers.orthanc import orthanc
from peers.pki_files import TlsServerFiles
from peers.pynetdicom_scp import associate, tls_scp
from test_association_end_audit import audit_events, c_echo_rq
from test_relay_tls_records import OneConnectionServer, read_pdu, server_context
from test_tunnel_association import receive_pdu

PACS_FINISH_TIMEOUT = 30  # seconds: agent/tunnel/relay.py, the ARTIM timer's value


def pdus_until_closed(sock: socket.socket) -> list[bytes]:
    """The PDUs ``sock`` receives until the agent closes it, and b"" for that close."""
    received, pdus = b"", []
    while chunk := sock.recv(65536):
        received += chunk
    while received:
        end = 6 + struct.unpack(">L", received[2:6])[0]
        pdus.append(received[:end])
        received = received[end:]
    return [*pdus, b""]


def association_ends(audit_file: Path) -> list[str]:
    """The EventOutcomeDescription of each Association End in ``audit_file``."""
    return [reason for what, reason in audit_events(audit_file) if what == "Association End"]


@contextlib.contextmanager
def tls_pacs(kind: str, test_pki: ProvisionedPki, work_dir: Path) -> Iterator[tuple[int, str]]:
    """A real TLS PACS of ``kind``: its port and its AE title."""
    tls = TlsServerFiles.from_pki(test_pki.pki)
    if kind == "dcmtk":
        with storescp(work_dir / "received", tls=tls) as scp:
            yield scp.port, "STORESCP"
    elif kind == "pynetdicom":
        with tls_scp(pki_dir=test_pki.pki) as scp:
            yield scp.port, "PYNETDICOM"
    else:
        with orthanc(work_dir / "orthanc", tls=tls) as pacs:
            yield pacs.dicom_port, "ORTHANC"


@pytest.mark.parametrize("kind", ["dcmtk", "pynetdicom", "orthanc"])
def test_an_application_that_half_closes_after_its_release_request_gets_the_release_response(
        test_pki: ProvisionedPki, tmp_path: Path, kind: str) -> None:
    """The application sends a C-ECHO and its A-RELEASE-RQ, shuts down its sending side and reads on.
    The agent used to send close_notify at once; a PACS that closed its socket with that record
    unread reset the connection, which destroyed the A-RELEASE-RP on its way: the application got
    a bare end of stream, the log blamed the PACS ("broke the connection: Connection reset by peer")
    and the audit trail had an Association End with a failure."""
    audit_file = tmp_path / "audit" / "audit.log"
    with tls_pacs(kind, test_pki, tmp_path) as (port, ae_title), \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", port)],
                          audit={"file": str(audit_file)}) as agent:
        with socket.create_connection(("127.0.0.1", agent.port()), timeout=15) as application:
            application.sendall(encode_associate_rq(AssociateRequest(
                1, ae_title, "APP", "1.2.840.10008.3.1.1.1",
                (PresentationContextItemRQ(1, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",)),),
                (MaximumLength(16384),))))
            assert receive_pdu(application)[0] == A_ASSOCIATE_AC
            application.sendall(c_echo_rq() + a_release_rq())
            application.shutdown(socket.SHUT_WR)
            pdus = pdus_until_closed(application)
        log = agent.wait_for_log(", 0.", timeout=5)  # the association's summary line
    assert [pdu[:1] for pdu in pdus] == [bytes([P_DATA_TF]), bytes([A_RELEASE_RP]), b""], log
    assert "WARNING" not in log, log
    assert association_ends(audit_file) == [""]  # released: no failure


def test_a_pacs_that_never_answers_the_release_request_is_given_up_after_the_artim_timer(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """A hostile PACS (no real one does this on purpose): it accepts, then never answers the
    A-RELEASE-RQ nor closes. The agent used to keep that connection, its thread and its place
    among max_connections for good: with max_connections of them, every new association was
    turned away (A-ASSOCIATE-RJ, temporary congestion)."""
    def serve(context: ssl.SSLContext, raw: socket.socket) -> bytes:
        with context.wrap_socket(raw, server_side=True) as tls:
            tls.sendall(accept_for(read_pdu(tls)))
            read_pdu(tls)  # the A-RELEASE-RQ, never answered
            tls.settimeout(PACS_FINISH_TIMEOUT + 20)
            try:
                answer = tls.recv(65536)  # b"": the agent's close_notify
            except OSError as error:
                answer = repr(error).encode()
            return answer

    server = OneConnectionServer(server_context(test_pki), serve)
    try:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", server.port, max_connections=1)]) as agent:
            with socket.create_connection(("127.0.0.1", agent.port()), timeout=PACS_FINISH_TIMEOUT + 10) as app:
                app.sendall(associate_rq())
                assert receive_pdu(app)[0] == A_ASSOCIATE_AC
                app.sendall(a_release_rq())
                released = time.monotonic()
                pdus = pdus_until_closed(app)
                answered_after = time.monotonic() - released
            server.thread.join(10)
            log = agent.wait_for_log(", 30.", timeout=5)
            status = json.loads(run_card_agent("status", "--json", "--config", tmp_path / "agent" / "agent.toml",
                                               env=test_pki.env(), check=True).stdout)
    finally:
        server.close()
    assert server.error is None, repr(server.error)
    assert [pdu[:1] for pdu in pdus] == [bytes([A_ABORT]), b""]
    assert PACS_FINISH_TIMEOUT - 1 < answered_after < PACS_FINISH_TIMEOUT + 3, answered_after
    assert server.result == b"", server.result  # the agent closed the PACS's connection, with close_notify
    assert (f"server 127.0.0.1:{server.port} did not answer the A-RELEASE-RQ within 30 s (the ARTIM timer of "
            "PS3.8 9.1.5); connection closed") in log, log
    (pacs,) = status["tunnels"]
    assert pacs["open_connections"] == 0
    assert pacs["this_session"]["associations"]["broken"] == {"pacs_stopped_answering": 1}, pacs


def test_a_pacs_close_notify_mid_association_is_a_warning_and_the_association_end(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """A hostile PACS (a real one ends an association with A-RELEASE or A-ABORT): it accepts and then
    sends TLS close_notify. The application gets an A-ABORT and the end of stream (it used to get the
    end of stream alone); the log used to say nothing and the audit trail's Association End "open"."""
    def serve(context: ssl.SSLContext, raw: socket.socket) -> None:
        with context.wrap_socket(raw, server_side=True) as tls:
            tls.sendall(accept_for(read_pdu(tls)))
            with contextlib.suppress(OSError):  # the agent need not answer with a close_notify of its own
                tls.unwrap()

    audit_file = tmp_path / "audit" / "audit.log"
    server = OneConnectionServer(server_context(test_pki), serve)
    try:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", server.port)],
                           audit={"file": str(audit_file)}) as agent:
            with socket.create_connection(("127.0.0.1", agent.port()), timeout=15) as application:
                application.sendall(associate_rq())
                pdus = pdus_until_closed(application)
            agent.wait_for_log(", 0.", timeout=5)
            log = agent.log()
    finally:
        server.close()
    assert server.error is None, repr(server.error)
    assert [pdu[:1] for pdu in pdus] == [bytes([A_ASSOCIATE_AC]), bytes([A_ABORT]), b""]
    assert pdus[1] == bytes([A_ABORT, 0, 0, 0, 0, 4, 0, 0, 2, 0])  # DICOM UL service-provider, reason-not-specified
    closed = "closed the connection (TLS close_notify) in the middle of the association, without A-RELEASE or A-ABORT"
    assert any(line.endswith(f"server 127.0.0.1:{server.port} {closed}") and "WARNING: tunnel pacs: " in line
               for line in log.splitlines()), log
    assert association_ends(audit_file) == [closed]


def test_a_request_with_no_room_for_the_cards_user_identity_is_rejected(test_pki: ProvisionedPki,
                                                                        tmp_path: Path) -> None:
    """A legal A-ASSOCIATE-RQ whose User Information item is nearly 64 KiB (a large private sub-item),
    on a tunnel that asserts the card's User Identity: adding it overflows the item's 2-byte
    length. That raised inside the relay ("internal error") and the application got a bare end
    of stream; now it gets A-ASSOCIATE-RJ and the log says why."""
    request = encode_associate_rq(AssociateRequest(
        1, "STORESCP", "APP", "1.2.840.10008.3.1.1.1",
        (PresentationContextItemRQ(1, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",)),),
        (MaximumLength(16384), RawItem(0x5F, b"A" * 65515))))
    with storescp(tmp_path / "received", tls=TlsServerFiles.from_pki(test_pki.pki)) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port, user_identity="username")]) as agent:
        with socket.create_connection(("127.0.0.1", agent.port()), timeout=15) as application:
            application.sendall(request)
            pdus = pdus_until_closed(application)
        log = agent.wait_for_log("refused: the card's User Identity does not fit")
    # rejected-permanent, DICOM UL service-provider (ACSE related function), no-reason-given
    assert pdus == [bytes([3, 0, 0, 0, 0, 4, 0, 1, 2, 1]), b""]
    assert ("association APP -> STORESCP refused: the card's User Identity does not fit into the A-ASSOCIATE-RQ "
            "(user_identity = \"username\"): item 0x50 of 65550 bytes does not fit a 2-byte Item-length") in log
    assert "internal error" not in log, log


@contextlib.contextmanager
def pacs_that_releases_after_echo(test_pki: ProvisionedPki) -> Iterator[int]:
    """A pynetdicom TLS PACS that, 0.2 s after answering a C-ECHO, releases the association itself
    (its own A-RELEASE-RQ, which PS3.8 allows the acceptor), then closes the transport (AR-3); its port."""
    pacs = AE("RELEASING")
    pacs.add_supported_context(Verification)

    def released_after_echo(event: evt.Event) -> int:
        association = event.assoc
        threading.Thread(target=lambda: (time.sleep(0.2), association.release()), daemon=True).start()
        return 0x0000

    server = pacs.start_server(("127.0.0.1", 0), block=False,
                               ssl_context=TlsServerFiles.from_pki(test_pki.pki).ssl_context(),
                               evt_handlers=[(evt.EVT_C_ECHO, released_after_echo)])
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def test_a_pacs_that_releases_the_association_itself_ends_it_as_released(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The application answers the PACS's A-RELEASE-RQ with its A-RELEASE-RP, and the PACS closes,
    as PS3.8 has it. The agent noted only the acceptor's A-RELEASE-RP as a release: the PACS's close
    was logged as a warning (`server ... broke the connection: UNEXPECTED_EOF_WHILE_READING`), set
    `last_error`, counted as broken and audited as an Association End with a failure (a reviewer)."""
    audit_file = tmp_path / "audit" / "audit.log"
    with pacs_that_releases_after_echo(test_pki) as port, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", port)],
                          audit={"file": str(audit_file)}) as agent:
        application = associate(agent.port(), called_ae="RELEASING")
        assert application.is_established
        assert application.send_c_echo().Status == 0
        deadline = time.monotonic() + 10
        while application.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        released = application.is_released
        log = agent.wait_for_log(", 0.", timeout=5)  # the association's summary line
        status = json.loads(run_card_agent("status", "--json", "--config", tmp_path / "agent" / "agent.toml",
                                           env=test_pki.env(), check=True).stdout)
    assert released
    assert "WARNING" not in log and "broke the connection" not in log, log
    assert status["last_error"] is None
    counts = status["tunnels"][0]["since_start"]["associations"]
    assert counts["accepted"] == 1 and not counts.get("broken"), counts
    assert association_ends(audit_file) == [""]  # released: no failure
