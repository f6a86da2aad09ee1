"""Who an inbound listener admits, how long it holds peers that say nothing, and how its refusals
are told: real agent, real peers (DCMTK storescu as the PACS, raw TLS and TCP clients as the
strangers), as in test_inbound.py. Also the outbound diagnosis of a PACS that closes the
connection right after a TLS 1.2 handshake."""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent_runner import (
    associate_rq,
    card_session_pid,
    inbound_listener,
    p_data,
    port_of,
    running_agent,
    tunnel,
    wait_for,
    write_config,
)
from conftest import ProvisionedPki, run_card_agent
from dicom_card_agent.dicom.pdu import A_ABORT, A_ASSOCIATE_RJ, parse_associate_rj
from dicom_card_agent.tunnel.admission import RefusalLog
from peers.dcmtk import storescp, storescu
from peers.pki_files import TlsClientFiles, TlsServerFiles, issue_client_file_identity
from peers.ports import free_port
from peers.study import assert_delivered, make_study
from test_inbound import THE_PACS, connected_as_the_pacs, handshake_without_certificate, node_identity, pacs_identity
from test_tunnel_association import receive_pdu

PACS_SUBJECT = "CN=localhost,O=Example Hospital Test PKI"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_study(tmp_path_factory.mktemp("study"), files=2)


def audit_messages(path: Path) -> list[ET.Element]:
    return [ET.fromstring(line) for line in path.read_text().splitlines() if line.startswith("<AuditMessage")]


def event_type(message: ET.Element) -> str:
    code = message.find("EventIdentification/EventTypeCode")
    event = message.find("EventIdentification/EventID")
    chosen = code if code is not None else event
    return chosen.get("originalText", "") if chosen is not None else ""


# -- 1. only the PACS is the PACS -------------------------------------------------------------------

def test_a_colleagues_certificate_from_the_same_ca_is_not_taken_for_the_pacs(
        test_pki: ProvisionedPki, tmp_path: Path, study: list[Path]) -> None:
    """A clinician's certificate chains to [trust] ca and allows clientAuth, as the PACS's does.
    Before, it was accepted as "the PACS" and its images went to the viewer; now only a certificate
    carrying the name the outbound tunnel verifies the PACS by (by default) is admitted, and the
    audit trail records which certificate sent (the source participant's UserName)."""
    eve = TlsClientFiles(test_pki.ca_bundle, *issue_client_file_identity(test_pki.pki, tmp_path, "Eve Clinician"))
    audit = tmp_path / "audit.log"
    with storescp(tmp_path / "viewer", tls=None) as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", **node_identity(test_pki))
        # The PACS the workstation reaches outbound, as server_name "localhost": the default client_names.
        outbound = tunnel("pacs", free_port())
        with running_agent(test_pki, tmp_path / "agent", [outbound], inbound=[listener],
                           audit={"file": str(audit)}) as agent:
            colleague = storescu(port_of(listener), study[:1], tls=eve, calling_ae="PACS")
            assert colleague.returncode != 0 and viewer.stored_files() == [], colleague.stdout
            log = agent.wait_for_log("is not one of this listener's accepted peers")
            pacs = storescu(port_of(listener), study, tls=pacs_identity(test_pki), calling_ae="PACS")
            agent.wait_for_log("instances stored", timeout=40)
        received = viewer.stored_files()
    assert ("client certificate CN=Eve Clinician,O=Example Hospital Test PKI is not one of this listener's accepted "
            "peers: it names none of localhost (client_names, by default the server_name of each [[tunnel]]); set "
            "[[inbound]] 'retrieves' client_names (or client_pins) to admit it") in log, log
    assert pacs.returncode == 0, pacs.stdout
    assert_delivered(study, received)
    messages = audit_messages(audit)
    transfers = [m for m in messages if event_type(m) == "DICOM Instances Transferred"]
    assert transfers, [event_type(m) for m in messages]
    for message in transfers + [m for m in messages if event_type(m) in ("Association Begin", "Association End")]:
        source = next(p for p in message.iter("ActiveParticipant")
                      if p.find("RoleIDCode") is not None and p.find("RoleIDCode").get("csd-code") == "110153")
        assert source.get("UserName") == PACS_SUBJECT, ET.tostring(message)
        assert source.get("AlternativeUserID") == "AETITLES=PACS"  # PS3.15 A.5.2: the AE title stays there
    alerts = [m for m in messages if event_type(m) == "Node Authentication"]
    assert len(alerts) == 1 and "CN=Eve Clinician" in ET.tostring(alerts[0], encoding="unicode")


def test_client_names_admit_the_pacs_they_name(test_pki: ProvisionedPki, tmp_path: Path, study: list[Path]) -> None:
    """Without a tunnel the agent cannot know the PACS: client_names (or client_pins) name it."""
    eve_chain, eve_key = issue_client_file_identity(test_pki.pki, tmp_path, "Eve Clinician")
    with storescp(tmp_path / "viewer", tls=None) as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", client_names=["Eve Clinician"],
                                    **node_identity(test_pki))
        with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]) as agent:
            pacs = storescu(port_of(listener), study[:1], tls=pacs_identity(test_pki), calling_ae="PACS")
            assert pacs.returncode != 0, pacs.stdout  # it is not named
            log = agent.wait_for_log("is not one of this listener's accepted peers")
            eve = storescu(port_of(listener), study, tls=TlsClientFiles(test_pki.ca_bundle, eve_chain, eve_key))
            agent.wait_for_log("instances stored", timeout=40)
        received = viewer.stored_files()
    assert (f"client certificate {PACS_SUBJECT} is not one of this listener's accepted peers: it names none of "
            "Eve Clinician (client_names); set [[inbound]] 'retrieves' client_names (or client_pins) to admit "
            "it") in log
    assert eve.returncode == 0, eve.stdout
    assert_delivered(study, received)


def test_an_inbound_listener_that_cannot_know_the_pacs_refuses_to_start(test_pki: ProvisionedPki,
                                                                         tmp_path: Path) -> None:
    listener = inbound_listener("retrieves", "127.0.0.1:11114", **node_identity(test_pki))
    config = write_config(tmp_path / "agent.toml", test_pki, [], inbound=[listener])
    result = run_card_agent("run", "--config", config, env=test_pki.env(CARD_PIN="123456"))
    assert result.returncode == 2
    assert ("[[inbound]] 'retrieves'.client_names: required when no [[tunnel]] names the PACS (and no client_pins "
            "are given)") in result.stderr, result.stderr


# -- 2. refusals in a loop: one line and one audit record a minute --------------------------------------

def test_refused_handshakes_in_a_loop_cost_one_log_line_and_one_audit_alert(
        test_pki: ProvisionedPki, tmp_path: Path, study: list[Path]) -> None:
    """A local program doing certificate-less handshakes in a loop wrote one WARNING line and one
    audit Security Alert each. Now the first is told in full, the rest counted (told once a minute,
    and when the listeners end: here as the agent stops)."""
    audit = tmp_path / "audit.log"
    with storescp(tmp_path / "viewer", tls=None) as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", **THE_PACS, **node_identity(test_pki))
        with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener],
                           audit={"file": str(audit)}) as agent:
            for _ in range(30):
                handshake_without_certificate(socket.create_connection(("127.0.0.1", port_of(listener)), timeout=10))
            pacs = storescu(port_of(listener), study[:1], tls=pacs_identity(test_pki), calling_ae="PACS")
            agent.wait_for_log("instances stored", timeout=40)
            time.sleep(0.5)  # the supervisor writes what the card session reported
            log = agent.log()
    assert pacs.returncode == 0, pacs.stdout
    assert log.count("it sent no client certificate") == 1, log
    alerts = [m for m in audit_messages(audit) if event_type(m) == "Node Authentication"]
    assert len(alerts) == 2, [ET.tostring(m) for m in alerts]
    counted = alerts[1].findtext("EventIdentification/EventOutcomeDescription") or ""
    assert re.fullmatch(r"refused 29 more TLS handshakes from 127\.0\.0\.1 in the last \d+ s: it sent no client "
                        r"certificate \(this listener requires one\)", counted), counted


def test_connections_turned_away_without_a_card_session_cost_one_log_line(test_pki: ProvisionedPki,
                                                                         tmp_path: Path) -> None:
    listener = inbound_listener("retrieves", f"127.0.0.1:{free_port()}", **THE_PACS, **node_identity(test_pki))
    with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]) as agent:
        run_card_agent("lock", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env(), check=True)
        for _ in range(200):
            socket.create_connection(("127.0.0.1", port_of(listener)), timeout=10).close()
        with socket.create_connection(("127.0.0.1", port_of(listener)), timeout=10) as last:
            assert last.recv(1) == b""  # turned away: closed at once
        log = agent.log()
    assert log.count("turned away") == 1, log
    assert "inbound retrieves: PACS at 127.0.0.1:" in log and " turned away: locked" in log


def test_a_refusal_count_is_told_when_its_minute_is_over_even_if_no_refusal_follows(
        caplog: pytest.LogCaptureFixture) -> None:
    """In a card-session process nothing else flushes the counts: a flood that stops is still told,
    in the log and to whoever counts along (the audit trail)."""
    counted: list[int] = []
    refusals = RefusalLog(logging.getLogger("test.refusal-timer"), interval=0.3)
    with caplog.at_level(logging.WARNING, logger="test.refusal-timer"):
        for _ in range(3):
            refusals.refused("retrieves", "10.9.9.9", "it sent no client certificate", stage="in the TLS handshake",
                             first_line="10.9.9.9:4444: refused the PACS at 10.9.9.9:4444: it sent no client "
                                        "certificate", counted=lambda count, seconds: counted.append(count))
        wait_for(lambda: counted == [2], timeout=5)
    assert caplog.messages[0] == ("inbound retrieves: 10.9.9.9:4444: refused the PACS at 10.9.9.9:4444: it sent no "
                                  "client certificate")
    assert caplog.messages[1].startswith("inbound retrieves: closed 2 more connections from 10.9.9.9 in the TLS "
                                         "handshake in the last ")
    assert caplog.messages[1].endswith(" s: it sent no client certificate")


# -- 3. silent connections take no handshake place --------------------------------------------------------

def test_silent_connections_take_no_handshake_place_nor_a_thread_and_are_closed_after_a_few_seconds(
        test_pki: ProvisionedPki, tmp_path: Path, study: list[Path]) -> None:
    """Four connections that never sent a byte held every handshake place (max_pending_handshakes)
    for handshake_timeout, 30 s, and the PACS was closed out meanwhile. Now a connection takes a
    place once its first bytes come; until then the supervisor's accept loop watches it (no thread
    in the card session) and closes it after 5 s."""
    silent_count = 8
    with storescp(tmp_path / "viewer", tls=None) as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", **THE_PACS, **node_identity(test_pki))
        with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]) as agent:
            agent.wait_for_log("event=sign-in ")
            worker = card_session_pid(agent.process.pid)
            assert worker is not None
            threads_before = len(list(Path(f"/proc/{worker}/task").iterdir()))
            silent = [socket.create_connection(("127.0.0.1", port_of(listener)), timeout=10)
                      for _ in range(silent_count)]
            opened = time.monotonic()
            time.sleep(0.5)
            threads_while_silent = len(list(Path(f"/proc/{worker}/task").iterdir()))
            result = storescu(port_of(listener), study, tls=pacs_identity(test_pki), calling_ae="PACS")
            stored_after = time.monotonic() - opened
            assert result.returncode == 0, result.stdout  # not closed out by the silent ones
            for connection in silent:
                assert connection.recv(1) == b""  # the agent closed it
            closed_after = time.monotonic() - opened
            log = agent.wait_for_log("it sent nothing within 5 s")
        received = viewer.stored_files()
    assert stored_after < 4.0, stored_after
    assert_delivered(study, received)
    assert threads_while_silent - threads_before < silent_count, (threads_before, threads_while_silent)
    assert 4.5 < closed_after < 8.0, closed_after
    assert log.count("inbound retrieves: closed a connection from 127.0.0.1 before TLS: it sent nothing within 5 s "
                     "(no TLS ClientHello)") == 1, log


# -- 4. the ARTIM timer inbound ---------------------------------------------------------------------------

@contextmanager
def counting_listener() -> Iterator[tuple[int, list[socket.socket]]]:
    """A local "storage SCP" that accepts connections and says nothing: (its port, its connections)."""
    accepted: list[socket.socket] = []
    server = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        server.close()
        for connection in accepted:
            connection.close()


def test_an_authenticated_pacs_that_sends_nothing_is_closed_after_the_artim_time_without_reaching_the_scp(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """Before, the agent connected to the local SCP right after the handshake, and a peer that then
    sent nothing held both connections for as long as it liked. Now the local SCP is connected once
    the A-ASSOCIATE-RQ is there, and the PACS gets 30 s for it, as an outbound application does."""
    with counting_listener() as (port, local_connections):
        listener = inbound_listener("retrieves", f"127.0.0.1:{port}", **THE_PACS, **node_identity(test_pki))
        with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]) as agent:
            with connected_as_the_pacs(test_pki, listener) as idle:
                opened = time.monotonic()
                time.sleep(2)
                assert local_connections == []  # authenticated, but no request: the local SCP is not bothered
                with connected_as_the_pacs(test_pki, listener) as asking:
                    asking.sendall(associate_rq())
                    wait_for(lambda: len(local_connections) == 1, timeout=10)
                    idle.settimeout(40)
                    assert idle.recv(1) == b""  # closed by the agent
                    closed_after = time.monotonic() - opened
                    agent.wait_for_log("no A-ASSOCIATE-RQ within 30 s; closed")
    assert 29 < closed_after < 34, closed_after
    assert len(local_connections) == 1


def test_a_pacs_stream_that_is_not_dicom_is_aborted_without_reaching_the_scp(test_pki: ProvisionedPki,
                                                                              tmp_path: Path) -> None:
    """Its first PDU is a P-DATA-TF, before any A-ASSOCIATE-RQ: the agent answers A-ABORT as for any
    malformed stream, and the local SCP, connected only for a request, never hears of it."""
    with counting_listener() as (port, local_connections):
        listener = inbound_listener("retrieves", f"127.0.0.1:{port}", **THE_PACS, **node_identity(test_pki))
        with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]) as agent:
            with connected_as_the_pacs(test_pki, listener) as pacs:
                pacs.sendall(p_data(b"\x00" * 16))
                pdu_type, pdu = receive_pdu(pacs)
            log = agent.wait_for_log("malformed PDU from the PACS at")
    assert pdu_type == A_ABORT, pdu
    assert local_connections == []
    assert "P-DATA-TF PDU before any A-ASSOCIATE-RQ" in log, log


# -- 5. outbound: a TLS 1.2 PACS that closes is not refusing the card --------------------------------------

PERMANENT, TRANSIENT = 1, 2  # A-ASSOCIATE-RJ results (PS3.8 9.3.4)

@contextmanager
def pacs_that_closes_after_the_request(test_pki: ProvisionedPki, version: ssl.TLSVersion) -> Iterator[int]:
    """A TLS server (the PACS's certificate, client certificate required) that completes the
    handshake at ``version``, reads the A-ASSOCIATE-RQ and closes without an answer (a PACS
    restarting, or dropping an AE title it does not know)."""
    context = TlsServerFiles.from_pki(test_pki.pki).ssl_context(minimum_version=version)
    context.maximum_version = version
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        try:
            raw, _ = server.accept()
        except OSError:
            return
        try:
            with context.wrap_socket(raw, server_side=True) as tls:
                tls.recv(65536)
                time.sleep(0.5)
        except OSError:
            raw.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


@pytest.mark.parametrize("version, result, message", [
    (ssl.TLSVersion.TLSv1_2, TRANSIENT,
     "the PACS at 127.0.0.1:{port} closed the connection before answering: UNEXPECTED_EOF_WHILE_READING (after a "
     "completed TLSv1.2 handshake: not a refusal of our certificate); is the PACS restarting, or does it drop this "
     "association's AE titles?"),
    (ssl.TLSVersion.TLSv1_3, PERMANENT,
     "server rejected our certificate (CN=Alice Example, issuer CN=Test Issuing CA): the server closed the "
     "connection right after the TLS handshake, which is how TLS 1.3 servers refuse a client certificate"),
])
def test_a_pacs_closing_after_the_handshake_is_blamed_on_the_card_only_with_tls13(
        test_pki: ProvisionedPki, tmp_path: Path, version: ssl.TLSVersion, result: int, message: str) -> None:
    """A TLS 1.2 server judges the client's certificate before its own Finished: a close after the
    handshake is the PACS's doing, to try again later. Before, it was reported as the PACS refusing
    the card's certificate, with a permanent reject (and a desktop notice saying so)."""
    with pacs_that_closes_after_the_request(test_pki, version) as port:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", port)]) as agent:
            with socket.create_connection(("127.0.0.1", agent.port()), timeout=15) as application:
                application.sendall(associate_rq())
                pdu_type, pdu = receive_pdu(application)
            log = agent.wait_for_log(message.format(port=port))
    assert pdu_type == A_ASSOCIATE_RJ and parse_associate_rj(pdu).result == result
    if version is ssl.TLSVersion.TLSv1_2:
        assert "rejected our certificate" not in log, log
