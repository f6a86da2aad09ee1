"""No peer can make an audit record larger than an audit repository takes (docs/audit.md, "Size
limits").

A local application's A-ASSOCIATE-RQ, or a PACS's A-ASSOCIATE-AC, whose Implementation Version Name
is 65,000 bytes of ``&`` and one byte 0x80 used to be quoted whole in the PDU error, and so in the
record's EventOutcomeDescription (each ``&`` five bytes) and again, base64, in its Alert
Description: a record of over 400 KB. rsyslog, configured as docs/audit.md says (``maxMessageSize``
256k), cut it and stored the records after it glued onto it as one line, while the agent's spool
counted them delivered. 100 instances with 1,000-character UIDs did the same. Here a real agent on
SoftHSM (and the trail alone, for the instances) sends such records to a real rsyslog; the
repository must store, byte for byte, the records of the local file: as many, each one well-formed
XML on its own line, none merged.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent_runner import associate_rq, running_agent, send_and_close, tunnel
from conftest import ProvisionedPki
from dicom_card_agent.audit.config import AuditConfig, SyslogConfig
from dicom_card_agent.audit.events import (
    AlertType,
    AuditEvent,
    Instance,
    LocalPeer,
    RemoteNode,
    SessionEnd,
    User,
)
from dicom_card_agent.audit.messages import AuditSource, render
from dicom_card_agent.audit.syslog import BOM, XML_DECLARATION, parse_message
from dicom_card_agent.audit.trail import AuditTrail
from dicom_card_agent.dicom.pdu import MalformedPduError, parse_associate_rq
from peers.dcmtk import storescp, storescu
from peers.pki_files import TlsServerFiles
from peers.ports import LOOPBACK
from peers.rsyslog import Rsyslog, rsyslog_tls
from peers.study import make_study

# The bounds docs/audit.md states: a message to the repository, and its XML (the local file's line).
MAX_SYSLOG_MESSAGE = 64 * 1024
MAX_XML = 63 * 1024
HOSTILE_VERSION_NAME = b"&" * 65000 + b"\x80"
ALICE = User("CN=Alice Example,O=Example Hospital", "CN=Example Issuing CA", "alice", "8a3f0c1d")


def item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def user_information(version_name: bytes) -> bytes:
    """Maximum Length and an Implementation Version Name (PS3.7 D.3.3.2)."""
    return item(0x50, item(0x51, struct.pack(">L", 16384)) + item(0x55, version_name))


def hostile_rq() -> bytes:
    body = struct.pack(">HH", 1, 0) + b"PACS".ljust(16) + b"EVIL".ljust(16) + bytes(32)
    body += item(0x10, b"1.2.840.10008.3.1.1.1")
    body += item(0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2"))
    body += user_information(HOSTILE_VERSION_NAME)
    return struct.pack(">BBL", 1, 0, len(body)) + body


def hostile_ac() -> bytes:
    body = struct.pack(">HH", 1, 0) + b"PACS".ljust(16) + b"TESTSCU".ljust(16) + bytes(32)
    body += item(0x10, b"1.2.840.10008.3.1.1.1")
    body += item(0x21, bytes([1, 0, 0, 0]) + item(0x40, b"1.2.840.10008.1.2"))
    body += user_information(HOSTILE_VERSION_NAME)
    return struct.pack(">BBL", 2, 0, len(body)) + body


def audit_table(repository: Rsyslog, test_pki: ProvisionedPki, tmp_path: Path, transport: str) -> dict:
    return {"file": str(tmp_path / "audit" / "audit.log"), "spool": str(tmp_path / "spool"),
            "syslog": {"address": repository.address, "ca": str(test_pki.ca_bundle), "server_name": "localhost",
                       "transport": transport}}


def stored_as_in_the_local_file(repository: Rsyslog, audit_file: Path, timeout: float = 20.0) -> list[bytes]:
    """The local file's records, once the repository holds as many lines (or after ``timeout``);
    asserts that the repository stored exactly them: each line one syslog message whose MSG is the
    BOM, the XML declaration and the file's line, byte for byte."""
    local = audit_file.read_bytes().splitlines()
    deadline = time.monotonic() + timeout
    while len(repository.raw_lines()) < len(local) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # anything more (a record merged or split) would show now
    stored = repository.raw_lines()
    assert len(stored) == len(local), (f"{len(local)} records in the local file (sizes {[len(x) for x in local]}), "
                                       f"{len(stored)} lines at the repository (sizes {[len(x) for x in stored]})")
    for line, record in zip(stored, local, strict=True):
        assert len(line) <= MAX_SYSLOG_MESSAGE and len(record) <= MAX_XML
        assert parse_message(line).msg == BOM + XML_DECLARATION + record
        ET.fromstring(record)  # well-formed
    return local


def descriptions(records: list[bytes]) -> list[str]:
    return [ET.fromstring(r).findtext("EventIdentification/EventOutcomeDescription") or "" for r in records]


# -- through a real agent -------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["tls", "relp"])
def test_an_applications_malformed_pdu_makes_one_short_record_and_those_after_it_arrive(
        test_pki: ProvisionedPki, tmp_path: Path, transport: str) -> None:
    study = make_study(tmp_path / "study", files=1)
    with rsyslog_tls(tmp_path / "rsyslog", TlsServerFiles.from_pki(test_pki.pki), protocol=transport) as repository, \
            storescp(tmp_path / "received", tls=TlsServerFiles.from_pki(test_pki.pki)) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)],
                           audit=audit_table(repository, test_pki, tmp_path, transport)) as agent:
            agent.wait_for_log("event=sign-in ")
            send_and_close(agent.port("pacs"), hostile_rq())
            assert storescu(agent.port("pacs"), study).returncode == 0
        records = stored_as_in_the_local_file(repository, tmp_path / "audit" / "audit.log")
    alerts = [d for d in descriptions(records) if "Implementation-version-name" in d]
    assert alerts and all("is not ASCII (byte 0x80 at offset 65000): b'&&&" in d and d.endswith("... (65001 bytes)")
                          and len(d) < 200 for d in alerts), alerts
    assert any(b'csd-code="110104"' in r for r in records)  # the study stored after it is recorded


@contextlib.contextmanager
def hostile_pacs(test_pki: ProvisionedPki) -> Iterator[int]:
    """A TLS "PACS" that answers every A-ASSOCIATE-RQ with :func:`hostile_ac`; yields its port."""
    context = TlsServerFiles.from_pki(test_pki.pki).ssl_context()
    stop = threading.Event()
    listener = socket.create_server((LOOPBACK, 0))
    listener.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except OSError:
                continue
            try:
                with context.wrap_socket(raw, server_side=True) as connection:
                    connection.settimeout(10)
                    header = connection.recv(6)
                    missing = struct.unpack(">L", header[2:6])[0]
                    while missing > 0:
                        missing -= len(connection.recv(65536) or b"x" * missing)
                    connection.sendall(hostile_ac())
                    time.sleep(1)
            except (OSError, struct.error):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_a_pacs_malformed_answer_makes_short_records_and_those_after_it_arrive(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    with hostile_pacs(test_pki) as port, \
            rsyslog_tls(tmp_path / "rsyslog", TlsServerFiles.from_pki(test_pki.pki)) as repository:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", port)],
                           audit=audit_table(repository, test_pki, tmp_path, "tls")) as agent:
            agent.wait_for_log("event=sign-in ")
            send_and_close(agent.port("pacs"), associate_rq())
            agent.wait_for_log("Implementation-version-name", timeout=15)
        records = stored_as_in_the_local_file(repository, tmp_path / "audit" / "audit.log")
    quoting = [d for d in descriptions(records) if "Implementation-version-name" in d]
    assert quoting and all(d.count("&") < 100 for d in quoting), quoting
    assert b'csd-code="110121"' in records[-1]  # Application Stop, after them


# -- the trail alone: a batch of instances with long UIDs -----------------------------------------

@pytest.mark.parametrize("transport", ["tls", "relp"])
def test_instances_with_long_uids_make_a_bounded_record_that_says_what_it_left_out(
        test_pki: ProvisionedPki, tmp_path: Path, transport: str) -> None:
    """100 instances whose UIDs have 1,000 characters full of XML metacharacters (what C-STORE
    command sets can carry through the relay), between ordinary records."""
    instances = [Instance('"' * 1000 + f"{i:04d}", "&" * 1000 + f"{i:04d}", "1.2.3") for i in range(100)]
    transfer = AuditEvent.instances_transferred(tunnel="pacs", remote=RemoteNode("127.0.0.1", 11112),
                                                calling_ae="APP", called_ae="PACS", instances=instances,
                                                user=ALICE, patient_id="P1")
    with rsyslog_tls(tmp_path / "rsyslog", TlsServerFiles.from_pki(test_pki.pki), protocol=transport) as repository:
        config = AuditConfig(file=tmp_path / "audit.log", spool=tmp_path / "spool", source_id="ws3",
                             syslog=SyslogConfig(host=LOOPBACK, port=repository.port, ca=test_pki.ca_bundle,
                                                 server_name="localhost", retry_max=0.5, transport=transport))
        with AuditTrail(config) as trail:
            trail.record(AuditEvent.user_login(ALICE, reason="before"))
            trail.record(transfer)
            for n in range(3):
                trail.record(AuditEvent.user_login(ALICE, reason=f"after {n}"))
            assert trail.wait_delivered(20)
        records = stored_as_in_the_local_file(repository, tmp_path / "audit.log")
    assert len(records) == 5
    message = ET.fromstring(records[1])
    listed = len(message.findall(".//Instance"))
    assert 0 < listed < 100
    assert [s.get("NumberOfInstances") for s in message.iter("SOPClass")] == ["1"] * listed  # one class each
    description = message.findtext("EventIdentification/EventOutcomeDescription")
    assert description == f"{100 - listed} more instances not listed (an audit message is limited to {MAX_XML} bytes)"
    assert message.find(".//Instance").get("UID") == "&" * 1000 + "0000"  # whole: under the name limit


# -- the renderer: every field of every kind filled by a peer -------------------------------------

HUGE = '"' * 100_000 + "\U0001f600" * 1000  # six bytes a character escaped, four in UTF-8


def every_kind_of_event_with_every_text_huge() -> list[AuditEvent]:
    user = User("CN=" + HUGE, HUGE, HUGE, HUGE)
    peer = LocalPeer(uid=1, pid=2, process=HUGE, listen=HUGE)
    remote = RemoteNode(HUGE, 104, HUGE)
    common = dict(tunnel=HUGE, remote=remote, calling_ae=HUGE, called_ae=HUGE, local_peer=peer, user=user,
                  reason=HUGE)
    alerts = [AuditEvent.security_alert(alert, HUGE, tunnel=HUGE, remote=remote, user=user, local_peer=peer)
              for alert in AlertType]
    return [
        AuditEvent.user_login(ALICE, reason=HUGE), AuditEvent.user_logout(user, SessionEnd.LOCKED, reason=HUGE),
        *alerts, replace(alerts[0], remote=None, alert=AlertType.LOCAL_PEER_REFUSED),
        AuditEvent.application_start(), AuditEvent.application_stop(reason=HUGE),
        AuditEvent.association_begin(**common), AuditEvent.association_end(**common, bytes_up=1, bytes_down=2),
        AuditEvent.instances_transferred(**common, patient_id=HUGE, patient_name=HUGE, instances=[
            Instance(HUGE, f"{HUGE}{i}", f"{HUGE}{i % 7}") for i in range(100)]),
        AuditEvent.instances_transferred(**common, patient_id=HUGE, patient_name=HUGE,
                                         instances=[Instance("1.2", f"1.2.{i}", "1.3") for i in range(5000)]),
        AuditEvent.query_event(**common, sop_class_uid=HUGE, query="QUFB" * 50_000, transfer_syntax=HUGE,
                               patient_id=HUGE, patient_name=HUGE),
    ]


@pytest.mark.parametrize("event", every_kind_of_event_with_every_text_huge(), ids=lambda e: e.kind.value)
def test_no_event_renders_over_the_documented_maximum(event: AuditEvent) -> None:
    source = AuditSource(source_id=HUGE, hostname=HUGE, site_id=HUGE)
    xml = render(event, source)
    assert len(xml) <= MAX_XML, len(xml)
    message = ET.fromstring(xml)
    assert "more characters not recorded" in ET.tostring(message, encoding="unicode")


def test_a_pdu_error_quotes_a_short_escaped_part_of_the_value_and_its_length() -> None:
    request = hostile_rq()
    with pytest.raises(MalformedPduError) as raised:
        parse_associate_rq(request)
    assert str(raised.value) == ("Implementation-version-name is not ASCII (byte 0x80 at offset 65000): "
                                 f"{b'&' * 64!r}... (65001 bytes)")
