"""Audit messages, events, syslog framing, the spool, the file sink, [audit] and `audit tail`.

Every event kind is rendered and checked against the DICOM Audit Message Schema (PS3.15 A.5.1,
transcribed below as checks: element order, required attributes, enumerated values, coded
values) and against its PS3.15 A.5.3 message definition (event ID and type codes, action code,
active participants with roles and requestor flags, audit source, participant objects). Hypothesis
drives the dict round trip, the octet-counted framing and the spool against a model.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import tempfile
from collections import deque
from datetime import datetime, timedelta, timezone
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dicom_card_agent.audit.config import AuditConfig, load_audit_config, parse_audit_config
from dicom_card_agent.audit.errors import AuditEventError, AuditSpoolError
from dicom_card_agent.audit.events import (
    AlertType,
    AuditEvent,
    Direction,
    EventKind,
    Instance,
    LocalPeer,
    Outcome,
    RemoteNode,
    SessionEnd,
    User,
)
from dicom_card_agent.audit.messages import AuditSource, render, summarize
from dicom_card_agent.audit.sinks import FileSink
from dicom_card_agent.audit.spool import Spool
from dicom_card_agent.audit.syslog import (
    BOM,
    FrameDecoder,
    FramingError,
    format_message,
    frame,
    parse_message,
    split_frames,
)
from dicom_card_agent.audit.trail import AuditTrail
from dicom_card_agent.errors import ConfigError

SOURCE = AuditSource(source_id="ws-radiology-3", hostname="ws3.hospital.example", site_id="Example Hospital")
ALICE = User("CN=Alice Example,OU=Radiology,O=Example Hospital", "CN=Example Issuing CA,O=Example Hospital",
             "alice", "8a3f0c1d")
PACS = RemoteNode("10.1.2.3", 11112)
STORESCU = LocalPeer(uid=1000, pid=4242, process="storescu", listen="unix:/run/user/1000/card-agent/pacs.sock")
CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
STUDY_A, STUDY_B = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
TIME = datetime(2025, 3, 4, 10, 20, 30, 123000, tzinfo=timezone.utc)

# -- the schema (PS3.15 A.5.1) as checks ------------------------------------------------------

ACTION_CODES = {"C", "R", "U", "D", "E"}
OUTCOMES = {"0", "4", "8", "12"}
ACCESS_POINT_TYPES = {"1", "2", "3", "4", "5"}
OBJECT_TYPES = {"1", "2", "3", "4"}
OBJECT_ROLES = {str(n) for n in range(1, 27)}


def check_coded(element: ET.Element) -> tuple[str, str, str]:
    """CodedValueType: csd-code, codeSystemName and originalText are required, nothing else."""
    assert set(element.attrib) <= {"csd-code", "codeSystemName", "originalText", "displayName"}, element.attrib
    for name in ("csd-code", "codeSystemName", "originalText"):
        assert element.get(name), f"{element.tag} lacks {name}"
    assert len(element) == 0 and not (element.text or "").strip()
    return element.get("csd-code"), element.get("codeSystemName"), element.get("originalText")


def check_schema(root: ET.Element) -> None:
    assert root.tag == "AuditMessage" and not root.attrib
    tags = [child.tag for child in root]
    assert tags[0] == "EventIdentification"
    participants = [i for i, t in enumerate(tags) if t == "ActiveParticipant"]
    assert participants and participants == list(range(1, 1 + len(participants))), tags
    assert tags[1 + len(participants)] == "AuditSourceIdentification"
    assert set(tags[2 + len(participants):]) <= {"ParticipantObjectIdentification"}, tags

    event = root[0]
    assert set(event.attrib) <= {"EventActionCode", "EventDateTime", "EventOutcomeIndicator"}
    assert event.get("EventActionCode", "E") in ACTION_CODES
    assert event.get("EventOutcomeIndicator") in OUTCOMES
    assert datetime.fromisoformat(event.get("EventDateTime")).tzinfo is not None  # A.5.2.5: with time zone
    children = [c.tag for c in event]
    assert children[0] == "EventID"
    assert children == ["EventID"] + ["EventTypeCode"] * children.count("EventTypeCode") + (
        ["EventOutcomeDescription"] if "EventOutcomeDescription" in children else []), children
    for coded in event:
        if coded.tag != "EventOutcomeDescription":
            check_coded(coded)

    for participant in root.findall("ActiveParticipant"):
        assert set(participant.attrib) <= {"UserID", "AlternativeUserID", "UserName", "UserIsRequestor",
                                           "NetworkAccessPointID", "NetworkAccessPointTypeCode"}
        assert participant.get("UserID")
        assert participant.get("UserIsRequestor") in ("true", "false")
        if "NetworkAccessPointTypeCode" in participant.attrib:
            assert participant.get("NetworkAccessPointTypeCode") in ACCESS_POINT_TYPES
            assert participant.get("NetworkAccessPointID")
        assert all(child.tag == "RoleIDCode" for child in participant)
        for role in participant:
            check_coded(role)

    source = root.find("AuditSourceIdentification")
    assert set(source.attrib) <= {"AuditSourceID", "AuditEnterpriseSiteID"} and source.get("AuditSourceID")
    for type_code in source:
        assert type_code.tag == "AuditSourceTypeCode"
        assert type_code.get("csd-code") in {str(n) for n in range(1, 10)}

    for obj in root.findall("ParticipantObjectIdentification"):
        assert "ParticipantObjectID" in obj.attrib
        assert set(obj.attrib) <= {"ParticipantObjectID", "ParticipantObjectTypeCode",
                                   "ParticipantObjectTypeCodeRole", "ParticipantObjectDataLifeCycle",
                                   "ParticipantObjectSensitivity"}
        assert obj.get("ParticipantObjectTypeCode", "1") in OBJECT_TYPES
        assert obj.get("ParticipantObjectTypeCodeRole", "1") in OBJECT_ROLES
        tags = [child.tag for child in obj]
        assert tags[0] == "ParticipantObjectIDTypeCode"
        check_coded(obj[0])
        assert tags[1] in ("ParticipantObjectName", "ParticipantObjectQuery")  # one of them, required
        rest = tags[2:]
        assert rest == sorted(rest, key=["ParticipantObjectDetail", "ParticipantObjectDescription"].index), tags
        for detail in obj.findall("ParticipantObjectDetail"):
            assert detail.get("type")
            base64.b64decode(detail.get("value"), validate=True)  # xsd:base64Binary
        for description in obj.findall("ParticipantObjectDescription"):
            for sop in description:
                assert sop.tag in ("MPPS", "Accession", "SOPClass", "ParticipantObjectContainsStudy",
                                   "Encrypted", "Anonymized")
                if sop.tag == "SOPClass":
                    assert int(sop.get("NumberOfInstances")) >= 0
                    assert all(i.tag == "Instance" and i.get("UID") for i in sop)


def parse(event: AuditEvent) -> ET.Element:
    xml = render(event, SOURCE)
    assert b"\n" not in xml and not xml.startswith(b"<?xml")
    root = ET.fromstring(xml)
    check_schema(root)
    return root


def code_of(element: ET.Element | None) -> tuple[str, str, str]:
    assert element is not None
    return check_coded(element)


def participants(root: ET.Element) -> list[dict]:
    result = []
    for p in root.findall("ActiveParticipant"):
        roles = [r.get("csd-code") for r in p.findall("RoleIDCode")]
        result.append(dict(p.attrib, roles=roles))
    return result


def objects(root: ET.Element) -> list[ET.Element]:
    return root.findall("ParticipantObjectIdentification")


def detail(obj: ET.Element, name: str) -> str:
    for element in obj.findall("ParticipantObjectDetail"):
        if element.get("type") == name:
            return base64.b64decode(element.get("value")).decode()
    raise AssertionError(f"no ParticipantObjectDetail {name!r}")


def check_audit_source(root: ET.Element) -> None:
    source = root.find("AuditSourceIdentification")
    assert source.get("AuditSourceID") == "ws-radiology-3"
    assert source.get("AuditEnterpriseSiteID") == "Example Hospital"
    assert [t.get("csd-code") for t in source] == ["4"]  # application server process


def check_agent(participant: dict, requestor: bool) -> None:
    assert participant["UserID"] == "777" and participant["UserName"] == "card-agent"
    assert participant["UserIsRequestor"] == ("true" if requestor else "false")
    assert participant["NetworkAccessPointID"] == "ws3.hospital.example"
    assert participant["NetworkAccessPointTypeCode"] == "1"


def check_alice(participant: dict, requestor: bool) -> None:
    assert participant["UserID"] == ALICE.subject and participant["UserName"] == "Alice Example"
    assert participant["UserIsRequestor"] == ("true" if requestor else "false")
    assert participant["NetworkAccessPointID"] == "ws3.hospital.example"  # M for User Authentication
    assert participant["NetworkAccessPointTypeCode"] == "1"
    assert participant["roles"] == []


def check_token(obj: ET.Element) -> None:
    assert obj.get("ParticipantObjectID") == "pkcs11:token=alice;serial=8a3f0c1d"
    assert obj.get("ParticipantObjectTypeCode") == "2" and obj.get("ParticipantObjectTypeCodeRole") == "13"
    assert code_of(obj.find("ParticipantObjectIDTypeCode")) == ("12", "RFC-3881", "URI")
    assert obj.findtext("ParticipantObjectName") == "alice"
    assert detail(obj, "Certificate Issuer") == ALICE.issuer


# -- each event kind against PS3.15 A.5.3 -----------------------------------------------------

def test_user_login_is_a_user_authentication_message():
    root = parse(AuditEvent.user_login(ALICE, time=TIME, agent_pid=777))
    event = root.find("EventIdentification")
    assert code_of(event.find("EventID")) == ("110114", "DCM", "User Authentication")
    assert [code_of(c) for c in event.findall("EventTypeCode")] == [("110122", "DCM", "Login")]
    assert event.get("EventActionCode") == "E" and event.get("EventOutcomeIndicator") == "0"
    assert event.get("EventDateTime") == "2025-03-04T10:20:30.123+00:00"
    person, node = participants(root)
    check_alice(person, requestor=True)
    check_agent(node, requestor=False)  # the node performing authentication
    check_audit_source(root)
    (token,) = objects(root)
    check_token(token)


def test_refused_pin_is_a_failed_login_with_the_reason():
    root = parse(AuditEvent.user_login(ALICE, outcome=Outcome.MINOR_FAILURE, reason="wrong PIN, 2 tries left",
                                       agent_pid=777))
    event = root.find("EventIdentification")
    assert event.get("EventOutcomeIndicator") == "4"
    assert event.findtext("EventOutcomeDescription") == "wrong PIN, 2 tries left"


@pytest.mark.parametrize("end, person_requestor", [
    (SessionEnd.CARD_REMOVED, True), (SessionEnd.CARD_SWAPPED, True), (SessionEnd.LOCKED, True),
    (SessionEnd.IDLE_TIMEOUT, False), (SessionEnd.AGENT_STOPPED, False),
])
def test_logout_requestor_is_the_user_or_the_node(end, person_requestor):
    """PS3.15 A.5.3.12 note: with a logout timer the node may be the requestor."""
    root = parse(AuditEvent.user_logout(ALICE, end, agent_pid=777))
    event = root.find("EventIdentification")
    assert [code_of(c) for c in event.findall("EventTypeCode")] == [("110123", "DCM", "Logout")]
    assert event.findtext("EventOutcomeDescription") == end.value.replace("-", " ")
    person, node = participants(root)
    check_alice(person, requestor=person_requestor)
    check_agent(node, requestor=not person_requestor)


@pytest.mark.parametrize("alert, type_code", [
    (AlertType.TLS_VERIFICATION_FAILED, ("110126", "DCM", "Node Authentication")),
    (AlertType.LOCAL_PEER_REFUSED, ("110132", "DCM", "Use of Restricted Function")),
    (AlertType.PIN_LOCKED, ("110137", "DCM", "User Security Attributes Changed")),
    (AlertType.PIN_FINAL_TRY, ("110137", "DCM", "User Security Attributes Changed")),
    (AlertType.MALFORMED_PDU, ("MALFORMED-PDU", "99CARDAGENT", "Malformed DICOM PDU")),
])
def test_security_alert_codes(alert, type_code):
    root = parse(AuditEvent.security_alert(alert, "what happened", user=ALICE, remote=PACS, agent_pid=777))
    event = root.find("EventIdentification")
    assert code_of(event.find("EventID")) == ("110113", "DCM", "Security Alert")
    assert [code_of(c) for c in event.findall("EventTypeCode")] == [type_code]
    assert event.get("EventActionCode") == "E"


def test_tls_verification_failure_names_the_remote_node():
    root = parse(AuditEvent.security_alert(AlertType.TLS_VERIFICATION_FAILED,
                                           "certificate verify failed: unable to get local issuer certificate",
                                           remote=RemoteNode("pacs.hospital.example", 2762), tunnel="pacs",
                                           user=ALICE, agent_pid=777))
    assert root.find("EventIdentification").get("EventOutcomeIndicator") == "4"  # refused: mitigation worked
    reporter, performer = participants(root)
    check_agent(reporter, requestor=True)  # reporting process
    check_alice(performer, requestor=False)  # performing persons: UserIsRequestor shall be FALSE
    (subject,) = objects(root)
    assert subject.get("ParticipantObjectTypeCode") == "2"  # Alert Subject: system object
    assert code_of(subject.find("ParticipantObjectIDTypeCode")) == ("110182", "DCM", "Node ID")
    assert subject.get("ParticipantObjectID") == "pacs.hospital.example"
    assert detail(subject, "Alert Description").startswith("certificate verify failed")


def test_refused_local_peer_names_the_process_and_the_listener():
    peer = LocalPeer(uid=1001, pid=555, process="python3", listen="127.0.0.1:11112")
    root = parse(AuditEvent.security_alert(AlertType.LOCAL_PEER_REFUSED, "uid 1001 is not in allowed_uids",
                                           local_peer=peer, tunnel="pacs", agent_pid=777))
    reporter, process = participants(root)
    check_agent(reporter, requestor=True)
    assert process["UserID"] == "555" and process["UserName"] == "python3"
    assert process["UserIsRequestor"] == "false"
    (subject,) = objects(root)
    assert code_of(subject.find("ParticipantObjectIDTypeCode")) == ("12", "RFC-3881", "URI")
    assert subject.get("ParticipantObjectID") == "tcp://127.0.0.1:11112"
    assert subject.get("ParticipantObjectTypeCodeRole") == "13"
    assert subject.findtext("ParticipantObjectName") == "pacs"
    assert detail(subject, "Alert Description") == "uid 1001 is not in allowed_uids"


@pytest.mark.parametrize("alert, outcome", [(AlertType.PIN_LOCKED, "8"), (AlertType.PIN_FINAL_TRY, "0")])
def test_pin_alerts_name_the_token(alert, outcome):
    root = parse(AuditEvent.security_alert(alert, "the user PIN of token alice is locked", user=ALICE,
                                           agent_pid=777))
    assert root.find("EventIdentification").get("EventOutcomeIndicator") == outcome
    (token,) = objects(root)
    check_token(token)
    assert detail(token, "Alert Description") == "the user PIN of token alice is locked"


def test_malformed_pdu_from_a_local_peer_names_its_listener():
    root = parse(AuditEvent.security_alert(AlertType.MALFORMED_PDU, "PDU type 0x41 is not DICOM",
                                           local_peer=STORESCU, tunnel="pacs", agent_pid=777))
    (subject,) = objects(root)
    assert subject.get("ParticipantObjectID") == "unix:/run/user/1000/card-agent/pacs.sock"


@pytest.mark.parametrize("kind, type_code", [
    (EventKind.APPLICATION_START, ("110120", "DCM", "Application Start")),
    (EventKind.APPLICATION_STOP, ("110121", "DCM", "Application Stop")),
])
def test_application_activity(kind, type_code):
    event = (AuditEvent.application_start(agent_pid=777) if kind is EventKind.APPLICATION_START
             else AuditEvent.application_stop(reason="SIGTERM", agent_pid=777))
    root = parse(event)
    identification = root.find("EventIdentification")
    assert code_of(identification.find("EventID")) == ("110100", "DCM", "Application Activity")
    assert [code_of(c) for c in identification.findall("EventTypeCode")] == [type_code]
    assert identification.get("EventActionCode") == "E"
    (application,) = participants(root)
    check_agent(application, requestor=False)
    assert application["roles"] == ["110150"]  # Application
    assert objects(root) == []  # "No Participant Objects are needed"
    check_audit_source(root)


@pytest.mark.parametrize("begin", [True, False])
def test_association_events(begin):
    common = dict(tunnel="pacs", remote=PACS, calling_ae="STORESCU", called_ae="PACS", local_peer=STORESCU,
                  user=ALICE, agent_pid=777)
    event = (AuditEvent.association_begin(**common) if begin
             else AuditEvent.association_end(bytes_up=123456, bytes_down=789, outcome=Outcome.MINOR_FAILURE,
                                             reason="aborted by the remote node (A-ABORT)", **common))
    root = parse(event)
    identification = root.find("EventIdentification")
    assert code_of(identification.find("EventID")) == ("ASSOCIATION", "99CARDAGENT", "DICOM Association")
    expected = ("ASSOCIATION-BEGIN", "99CARDAGENT", "Association Begin") if begin else \
        ("ASSOCIATION-END", "99CARDAGENT", "Association End")
    assert [code_of(c) for c in identification.findall("EventTypeCode")] == [expected]
    local, remote, person, agent = participants(root)
    assert local["UserID"] == "4242" and local["AlternativeUserID"] == "AETITLES=STORESCU"
    assert local["roles"] == ["110153"] and local["UserIsRequestor"] == "true"
    assert remote["UserID"] == "10.1.2.3:11112" and remote["AlternativeUserID"] == "AETITLES=PACS"
    assert remote["roles"] == ["110152"] and remote["UserIsRequestor"] == "false"
    assert remote["NetworkAccessPointID"] == "10.1.2.3" and remote["NetworkAccessPointTypeCode"] == "2"
    check_alice(person, requestor=True)
    check_agent(agent, requestor=False)
    (tunnel,) = objects(root)
    assert code_of(tunnel.find("ParticipantObjectIDTypeCode")) == ("TUNNEL", "99CARDAGENT", "Tunnel Name")
    assert tunnel.get("ParticipantObjectID") == "pacs"
    if not begin:
        assert detail(tunnel, "Bytes Up") == "123456" and detail(tunnel, "Bytes Down") == "789"
        assert identification.findtext("EventOutcomeDescription") == "aborted by the remote node (A-ABORT)"


def test_instances_transferred_groups_by_study_and_sop_class():
    instances = [Instance(CT, "1.2.3.1", STUDY_A), Instance(CT, "1.2.3.2", STUDY_A), Instance(MR, "1.2.3.3", STUDY_A),
                 Instance(CT, "1.2.3.4", STUDY_B), Instance(CT, "1.2.3.1", STUDY_A)]  # a retried C-STORE
    root = parse(AuditEvent.instances_transferred(
        tunnel="pacs", remote=PACS, calling_ae="STORESCU", called_ae="PACS", instances=instances,
        local_peer=STORESCU, user=ALICE, patient_id="PAT-001", patient_name="Doe^Jane", agent_pid=777))
    identification = root.find("EventIdentification")
    assert code_of(identification.find("EventID")) == ("110104", "DCM", "DICOM Instances Transferred")
    assert identification.get("EventActionCode") == "R"  # the agent is not the receiver
    sender, receiver, person, agent = participants(root)
    assert sender["roles"] == ["110153"] and sender["UserID"] == "4242"  # Source Role ID: who sent
    assert receiver["roles"] == ["110152"] and receiver["UserID"] == "10.1.2.3:11112"  # Destination Role ID
    check_alice(person, requestor=True)
    check_agent(agent, requestor=False)
    studies = [o for o in objects(root) if o.get("ParticipantObjectTypeCodeRole") == "3"]
    assert [s.get("ParticipantObjectID") for s in studies] == [STUDY_A, STUDY_B]
    for study in studies:
        assert study.get("ParticipantObjectTypeCode") == "2"
        assert code_of(study.find("ParticipantObjectIDTypeCode")) == ("110180", "DCM", "Study Instance UID")
    sop_a = {s.get("UID"): (s.get("NumberOfInstances"), [i.get("UID") for i in s])
             for s in studies[0].iter("SOPClass")}
    assert sop_a == {CT: ("2", ["1.2.3.1", "1.2.3.2"]), MR: ("1", ["1.2.3.3"])}
    assert [(s.get("UID"), s.get("NumberOfInstances")) for s in studies[1].iter("SOPClass")] == [(CT, "1")]
    (patient,) = [o for o in objects(root) if o.get("ParticipantObjectTypeCodeRole") == "1"]
    assert patient.get("ParticipantObjectTypeCode") == "1" and patient.get("ParticipantObjectID") == "PAT-001"
    assert code_of(patient.find("ParticipantObjectIDTypeCode")) == ("2", "RFC-3881", "Patient Number")
    assert patient.findtext("ParticipantObjectName") == "Doe^Jane"


def test_instances_from_the_remote_node_swap_source_and_destination():
    root = parse(AuditEvent.instances_transferred(
        tunnel="pacs", remote=PACS, calling_ae="VIEWER", called_ae="PACS", direction=Direction.FROM_REMOTE,
        instances=[Instance(CT, "1.2.3.9")], local_peer=STORESCU, agent_pid=777))
    sender, receiver, agent = participants(root)
    assert sender["roles"] == ["110153"] and sender["UserID"] == "10.1.2.3:11112"
    assert receiver["roles"] == ["110152"] and receiver["UserID"] == "4242"
    assert receiver["UserIsRequestor"] == "true"  # the local application asked (C-GET)


def test_instances_with_unknown_study_and_patient_keep_the_structure():
    """Only command sets seen: the Study and Patient objects stay (PS3.15 requires them), with
    empty IDs and a name saying why, never an invented UID."""
    root = parse(AuditEvent.instances_transferred(
        tunnel="pacs", remote=PACS, calling_ae="STORESCU", called_ae="PACS",
        instances=[Instance(CT, "1.2.3.1"), Instance(CT, "1.2.3.2")], agent_pid=777))
    study, patient = objects(root)
    assert study.get("ParticipantObjectID") == "" and "not seen" in study.findtext("ParticipantObjectName")
    assert [s.get("NumberOfInstances") for s in study.iter("SOPClass")] == ["2"]
    assert patient.get("ParticipantObjectID") == "" and patient.get("ParticipantObjectTypeCodeRole") == "1"


STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def test_a_query_carries_the_sop_class_and_the_identifier():
    identifier = b"\x10\x00\x20\x00\x06\x00\x00\x00PAT-01"  # (0010,0020) PatientID, implicit VR LE
    root = parse(AuditEvent.query_event(
        tunnel="pacs", remote=PACS, calling_ae="FINDSCU", called_ae="PACS", sop_class_uid=STUDY_ROOT_FIND,
        query=base64.b64encode(identifier).decode(), transfer_syntax="1.2.840.10008.1.2", local_peer=STORESCU,
        user=ALICE, patient_id="PAT-01", patient_name="Doe^Jane", agent_pid=777))
    identification = root.find("EventIdentification")
    assert code_of(identification.find("EventID")) == ("110112", "DCM", "Query")
    assert identification.get("EventActionCode") == "E" and identification.find("EventTypeCode") is None
    issuer, responder, person, agent = participants(root)
    assert issuer["roles"] == ["110153"] and issuer["UserID"] == "4242" and issuer["UserIsRequestor"] == "true"
    assert issuer["AlternativeUserID"] == "AETITLES=FINDSCU"
    assert responder["roles"] == ["110152"] and responder["UserID"] == "10.1.2.3:11112"
    assert responder["AlternativeUserID"] == "AETITLES=PACS"
    check_alice(person, requestor=True)
    check_agent(agent, requestor=False)
    sop, patient = objects(root)
    assert sop.get("ParticipantObjectID") == STUDY_ROOT_FIND
    assert (sop.get("ParticipantObjectTypeCode"), sop.get("ParticipantObjectTypeCodeRole")) == ("2", "3")
    assert code_of(sop.find("ParticipantObjectIDTypeCode")) == ("110181", "DCM", "SOP Class UID")
    assert sop.find("ParticipantObjectName") is None  # the schema allows a name or a query
    assert base64.b64decode(sop.findtext("ParticipantObjectQuery")) == identifier
    assert detail(sop, "TransferSyntax") == "1.2.840.10008.1.2"
    assert patient.get("ParticipantObjectID") == "PAT-01" and patient.findtext("ParticipantObjectName") == "Doe^Jane"
    assert summarize(ET.tostring(root)).detail == f"query {STUDY_ROOT_FIND}, patient PAT-01"


def test_an_inbound_delivery_names_the_pacs_as_requestor_and_source():
    """A C-MOVE delivery: the PACS requested the association (Calling AE) and sent the instances to
    the local storage SCP (Called AE)."""
    root = parse(AuditEvent.instances_transferred(
        tunnel="retrieves", remote=PACS, calling_ae="ORTHANC", called_ae="WORKSTATION",
        direction=Direction.FROM_REMOTE, remote_requestor=True, instances=[Instance(CT, "1.2.3.9", STUDY_A)],
        local_peer=LocalPeer(listen="127.0.0.1:4006"), user=ALICE, agent_pid=777))
    assert root.find("EventIdentification").get("EventActionCode") == "R"
    sender, receiver, person, agent = participants(root)
    assert sender["roles"] == ["110153"] and sender["UserID"] == "10.1.2.3:11112"
    assert sender["AlternativeUserID"] == "AETITLES=ORTHANC" and sender["UserIsRequestor"] == "true"
    assert receiver["roles"] == ["110152"] and receiver["AlternativeUserID"] == "AETITLES=WORKSTATION"
    assert receiver["UserIsRequestor"] == "false"
    check_alice(person, requestor=False)


def test_text_is_one_line_and_valid_xml():
    reason = "line one\nline two\r\n\ttabbed \x00\x07 control <&> \"quotes\" ünïcödé 🩻"
    root = parse(AuditEvent.security_alert(AlertType.MALFORMED_PDU, reason, remote=PACS,
                                           calling_ae="A\nB", agent_pid=777))
    assert root.find("EventIdentification").findtext("EventOutcomeDescription") == \
        "line one line two tabbed \ufffd\ufffd control <&> \"quotes\" ünïcödé 🩻"
    (subject,) = objects(root)
    assert detail(subject, "Alert Description") == reason  # base64 keeps it exactly


def test_event_validation():
    with pytest.raises(AuditEventError, match="time zone"):
        AuditEvent(EventKind.APPLICATION_START, time=datetime(2025, 1, 1))
    with pytest.raises(AuditEventError, match="alert type"):
        AuditEvent(EventKind.SECURITY_ALERT)
    with pytest.raises(AuditEventError, match="at least one instance"):
        AuditEvent.instances_transferred(tunnel="t", remote=PACS, calling_ae="A", called_ae="B", instances=[])
    with pytest.raises(AuditEventError, match="reason the session ended"):
        AuditEvent(EventKind.USER_LOGOUT, user=ALICE)
    local = AuditEvent.application_start(time=datetime(2025, 1, 1, 12, tzinfo=timezone(timedelta(hours=2))))
    assert local.time == datetime(2025, 1, 1, 10, tzinfo=timezone.utc) and local.time.utcoffset() == timedelta(0)


def test_split_keeps_everything_but_the_instances():
    event = AuditEvent.instances_transferred(tunnel="t", remote=PACS, calling_ae="A", called_ae="B",
                                             instances=[Instance(CT, f"1.2.{n}") for n in range(5)], user=ALICE)
    parts = event.split(2)
    assert [len(p.instances) for p in parts] == [2, 2, 1]
    assert sum((p.instances for p in parts), ()) == event.instances
    assert len({p.id for p in parts}) == 3 and all(p.time == event.time and p.user == ALICE for p in parts)
    assert event.split(5) == [event]


# -- the channel format -------------------------------------------------------------------

def all_kinds() -> list[AuditEvent]:
    common = dict(tunnel="pacs", remote=PACS, calling_ae="STORESCU", called_ae="PACS", local_peer=STORESCU,
                  user=ALICE)
    return [
        AuditEvent.user_login(ALICE),
        AuditEvent.user_logout(ALICE, SessionEnd.IDLE_TIMEOUT),
        AuditEvent.security_alert(AlertType.TLS_VERIFICATION_FAILED, "bad", remote=PACS, tunnel="pacs"),
        AuditEvent.security_alert(AlertType.LOCAL_PEER_REFUSED, "uid", local_peer=LocalPeer(uid=0, listen="x:1")),
        AuditEvent.application_start(),
        AuditEvent.application_stop(reason="stop"),
        AuditEvent.association_begin(**common),
        AuditEvent.association_end(bytes_up=0, bytes_down=5, **common),
        AuditEvent.instances_transferred(instances=[Instance(CT, "1.2.3", STUDY_A), Instance(MR, "1.2.4")],
                                         patient_id="P1", direction=Direction.FROM_REMOTE, **common),
        AuditEvent.query_event(sop_class_uid=STUDY_ROOT_FIND, query="CAgQAA==", transfer_syntax="1.2.840.10008.1.2",
                               patient_id="P1", **common),
        AuditEvent.instances_transferred(instances=[Instance(CT, "1.2.3", STUDY_A)], remote_requestor=True,
                                         direction=Direction.FROM_REMOTE, **common),
    ]


@pytest.mark.parametrize("event", all_kinds(), ids=lambda e: e.kind.value)
def test_dict_round_trip_through_json(event):
    data = json.loads(json.dumps(event.to_dict()))
    assert AuditEvent.from_dict(data) == event
    assert render(AuditEvent.from_dict(data), SOURCE) == render(event, SOURCE)


texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
uids = st.from_regex(r"[12](\.[1-9][0-9]{0,5}){1,6}", fullmatch=True)


@st.composite
def events(draw) -> AuditEvent:
    kind = draw(st.sampled_from(EventKind))
    user = draw(st.none() | st.builds(User, texts.filter(bool), texts, texts, texts))
    if kind in (EventKind.USER_LOGIN, EventKind.USER_LOGOUT) and user is None:
        user = ALICE
    instances = draw(st.lists(st.builds(Instance, uids, uids, st.just("") | uids), max_size=5))
    if kind is EventKind.INSTANCES_TRANSFERRED and not instances:
        instances = [Instance(CT, "1.2.3")]
    return AuditEvent(
        kind=kind, outcome=draw(st.sampled_from(Outcome)), reason=draw(texts), user=user,
        time=draw(st.datetimes(timezones=st.just(timezone.utc))), tunnel=draw(texts),
        local_peer=draw(st.none() | st.builds(LocalPeer, st.none() | st.integers(0, 2**31), st.none()
                                              | st.integers(1, 2**22), texts, texts)),
        remote=draw(st.none() | st.builds(RemoteNode, texts.filter(bool), st.integers(1, 65535))),
        calling_ae=draw(texts), called_ae=draw(texts),
        alert=draw(st.sampled_from(AlertType)) if kind is EventKind.SECURITY_ALERT else None,
        session_end=draw(st.sampled_from(SessionEnd)) if kind is EventKind.USER_LOGOUT else None,
        direction=draw(st.none() | st.sampled_from(Direction)), instances=tuple(instances),
        patient_id=draw(texts), bytes_up=draw(st.none() | st.integers(0, 2**40)),
        remote_requestor=draw(st.booleans()),
        sop_class_uid=draw(uids) if kind is EventKind.QUERY else draw(st.just("") | uids),
        query=draw(st.binary(max_size=40)).hex(), transfer_syntax=draw(st.just("") | uids))


@settings(max_examples=150, deadline=None)
@given(events())
def test_any_event_round_trips_and_renders_valid_xml(event):
    assert AuditEvent.from_dict(json.loads(json.dumps(event.to_dict()))) == event
    root = ET.fromstring(render(event, SOURCE))
    check_schema(root)
    summarize(render(event, SOURCE))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(colour="red"), "unknown key"),
    (lambda d: d.update(kind="user-dance"), "not one of"),
    (lambda d: d.update(v=2), "version 2"),
    (lambda d: d.update(outcome=True), "outcome"),
    (lambda d: d.update(agent_pid="1"), "agent_pid must be int"),
    (lambda d: d.update(time="yesterday"), "ISO 8601"),
    (lambda d: d.pop("id"), "missing 'id'"),
    (lambda d: d["remote"].update(port="104"), "remote: port must be int"),
    (lambda d: d["user"].update(pin="123456"), "user: unknown key"),
    (lambda d: d.update(instances=[["1.2"]]), "instances\\[0\\]"),
])
def test_from_dict_is_strict(change, message):
    data = AuditEvent.association_begin(tunnel="t", remote=PACS, calling_ae="A", called_ae="B", user=ALICE).to_dict()
    change(data)
    with pytest.raises(AuditEventError, match=message):
        AuditEvent.from_dict(data)
    with pytest.raises(AuditEventError):
        AuditEvent.from_dict(["not", "a", "dict"])


# -- syslog -------------------------------------------------------------------------------

def test_rfc5424_message_for_ihe_atna():
    xml = render(AuditEvent.user_login(ALICE, time=TIME, agent_pid=777), SOURCE)
    message = parse_message(format_message(xml, time=TIME, hostname="ws3.hospital.example", procid=777))
    assert (message.pri, message.facility, message.severity, message.version) == (85, 10, 5, 1)  # authpriv.notice
    assert message.timestamp == "2025-03-04T10:20:30.123Z"
    assert (message.hostname, message.app_name, message.procid) == ("ws3.hospital.example", "card-agent", "777")
    assert message.msgid == "IHE+RFC-3881" and message.structured_data == "-"
    assert message.msg.startswith(BOM + b'<?xml version="1.0" encoding="UTF-8"?><AuditMessage>')
    assert ET.fromstring(message.xml).find("EventIdentification/EventID").get("csd-code") == "110114"
    warning = parse_message(format_message(b"<x/>", time=TIME, hostname="h o\u00e9st", procid="", severity=4))
    assert warning.pri == 84 and warning.hostname == "h_o_st" and warning.procid == "-"


@settings(max_examples=200)
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=8), st.data())
def test_octet_counting_round_trips_in_any_chunking(messages, data):
    stream = b"".join(frame(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    decoder, received, start = FrameDecoder(), [], 0
    for cut in cuts + [len(stream)]:
        received += decoder.feed(stream[start:cut])
        start = cut
    assert received == messages and decoder.pending == 0
    assert split_frames(stream) == messages


@pytest.mark.parametrize("garbage", [b"<85>1 no length", b"012 abc", b"99999999999 x", b"12x"])
def test_framing_errors(garbage):
    with pytest.raises(FramingError):
        split_frames(garbage + b" " * 20)


# -- the spool ----------------------------------------------------------------------------
# (Its messages start with a syslog header, <PRI>1: the spool sets aside a file without one.)

def test_spool_keeps_order_across_reopen(tmp_path):
    spool = Spool(tmp_path / "spool")
    assert stat.S_IMODE((tmp_path / "spool").stat().st_mode) == 0o700
    for n in range(3):
        spool.append(b"<85>1 m%d" % n)
    sequence, data = spool.oldest()
    assert data == b"<85>1 m0"
    spool.remove(sequence)
    with pytest.raises(AuditSpoolError, match="in use"):
        Spool(tmp_path / "spool")
    spool.close()
    (tmp_path / "spool" / f"{99:020d}.tmp").write_bytes(b"half")  # a crash during append
    again = Spool(tmp_path / "spool")
    assert not list((tmp_path / "spool").glob("*.tmp"))
    assert len(again) == 2 and again.oldest()[1] == b"<85>1 m1"
    assert again.append(b"<85>1 m3") == 4  # numbering continues after the highest on disk
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (tmp_path / "spool").glob("*.msg"))
    assert again.after(2, 10) == [(3, b"<85>1 m2"), (4, b"<85>1 m3")] and again.after(2, 1) == [(3, b"<85>1 m2")]
    with pytest.raises(AuditSpoolError, match="not waiting"):
        again.remove(1)  # delivered already
    again.remove(3)  # RELP confirms each message on its own, not necessarily the oldest first
    assert [s for s, _ in again.after(0, 10)] == [2, 4]
    again.append(b"<85>1 m2")  # (in the spool again, after m3)
    out = []
    while (item := again.oldest()) is not None:
        out.append(item[1])
        again.remove(item[0])
    assert out == [b"<85>1 m1", b"<85>1 m3", b"<85>1 m2"]
    again.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["append", "deliver", "reopen"]), max_size=30))
def test_spool_behaves_like_a_queue(operations):
    with tempfile.TemporaryDirectory() as directory:
        spool, model, counter = Spool(Path(directory)), deque(), 0
        for operation in operations:
            if operation == "append":
                counter += 1
                spool.append(b"<85>1 %d" % counter)
                model.append(b"<85>1 %d" % counter)
            elif operation == "deliver" and model:
                sequence, data = spool.oldest()
                assert data == model.popleft()
                spool.remove(sequence)
            elif operation == "reopen":
                spool.close()
                spool = Spool(Path(directory))
            assert len(spool) == len(model)
        assert (spool.oldest() or (0, None))[1] == (model[0] if model else None)
        spool.close()


# -- the file sink, the trail without a repository, audit tail -----------------------------

def test_file_sink_is_private_and_append_only(tmp_path):
    path = tmp_path / "log" / "audit.log"
    sink = FileSink(path)
    sink.write(b"<a/>")
    sink.close()
    sink = FileSink(path)
    sink.write(b"<b/>")
    with pytest.raises(ValueError):
        sink.write(b"<c>\n</c>")
    sink.close()
    assert path.read_bytes() == b"<a/>\n<b/>\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_trail_to_file_and_audit_tail(tmp_path):
    import typer

    from dicom_card_agent.cli import audit_commands

    app = typer.Typer()
    app.add_typer(audit_commands.app, name="audit")  # as agent/cli/main.py registers it
    config_path = tmp_path / "agent.toml"
    config_path.write_text('[audit]\nfile = "audit/audit.log"\nsource_id = "ws3"\n')
    config = load_audit_config(config_path)
    assert config == AuditConfig(file=tmp_path / "audit" / "audit.log", source_id="ws3")
    with AuditTrail(config, hostname="ws3.hospital.example") as trail:
        for event in all_kinds():
            assert trail.record(event)
        trail.record_dict(AuditEvent.user_logout(ALICE, SessionEnd.CARD_REMOVED).to_dict())
        assert trail.pending() == 0 and trail.wait_delivered(0)
    lines = config.file.read_bytes().splitlines()
    assert len(lines) == len(all_kinds()) + 1
    for line in lines:
        check_schema(ET.fromstring(line))

    runner = CliRunner()
    result = runner.invoke(app, ["audit", "tail", "--config", str(config_path), "-n", "6"])
    assert result.exit_code == 0, result.output
    shown = result.output.splitlines()
    assert len(shown) == 6
    assert "Association Begin" in shown[0] and "remote=10.1.2.3:11112 (PACS)" in shown[0]
    assert "Association End" in shown[1] and "bytes up 0, bytes down 5" in shown[1]
    assert "DICOM Instances Transferred" in shown[2] and "1 instance of study " + STUDY_A in shown[2]
    assert "user=Alice Example" in shown[2]
    assert "Query" in shown[3] and f"query {STUDY_ROOT_FIND}, patient P1" in shown[3]
    assert "remote=10.1.2.3:11112 (STORESCU)" in shown[4]  # inbound: the PACS is the calling AE
    assert "Logout" in shown[5] and "(card removed)" in shown[5]
    everything = runner.invoke(app, ["audit", "tail", "--file", str(config.file), "-n", "100"]).output
    assert "Alert: Node Authentication" in everything and "minor failure" in everything
    assert "Login" in everything and "Application Start" in everything
    raw = runner.invoke(app, ["audit", "tail", "--file", str(config.file), "-n", "1", "--xml"]).output
    assert raw.startswith("<AuditMessage>")
    missing = runner.invoke(app, ["audit", "tail", "--file", str(tmp_path / "none.log")])
    assert missing.exit_code != 0 and isinstance(missing.exception, ConfigError)


def test_audit_tail_xml_writes_a_peers_control_characters_as_character_references(tmp_path):
    """A patient name is the application's text: C1 and bidirectional controls are valid XML and
    were printed raw by `audit tail --xml`, reaching the admin's terminal (U+009B is CSI there).
    They are character references now: the same XML, nothing a terminal acts on."""
    import typer

    from dicom_card_agent.cli import audit_commands

    app = typer.Typer()
    app.add_typer(audit_commands.app, name="audit")
    config = AuditConfig(file=tmp_path / "audit" / "audit.log", source_id="ws3")
    name = "Doe\x85\u202eenaJ\x9b31m"
    with AuditTrail(config, hostname="ws3.hospital.example") as trail:
        assert trail.record(AuditEvent.instances_transferred(
            tunnel="pacs", remote=PACS, calling_ae="STORESCU", called_ae="PACS",
            instances=[Instance(CT, "1.2.3.1", STUDY_A)], local_peer=STORESCU, user=ALICE, patient_id="PAT-001",
            patient_name=name, agent_pid=777))
    (stored,) = config.file.read_bytes().splitlines()
    shown = CliRunner().invoke(app, ["audit", "tail", "--file", str(config.file), "--xml"]).output
    assert name.encode() in stored  # the file keeps the text as it came
    assert "Doe&#x85;&#x202E;enaJ&#x9B;31m" in shown
    assert not any(character in shown for character in "\u202e\x9b\x85")
    assert ET.tostring(ET.fromstring(shown.strip())) == ET.tostring(ET.fromstring(stored))  # the same document


# -- [audit] ------------------------------------------------------------------------------

def test_audit_config_full(tmp_path):
    (tmp_path / "pki").mkdir()
    for name in ("audit-ca.pem", "agent.pem", "agent.key"):
        (tmp_path / "pki" / name).write_text("x")
    config = parse_audit_config({
        "file": "/var/log/card-agent/audit.log", "spool": "spool", "site_id": "Example Hospital",
        "syslog": {"address": "[::1]:6514", "ca": "pki/audit-ca.pem", "certificate": "pki/agent.pem",
                   "key": "pki/agent.key", "retry_max": 5, "transport": "relp"},
        "on_failure": "refuse",
    }, "agent.toml", tmp_path)
    assert config.syslog.transport == "relp" and config.on_failure == "refuse"
    assert config.file == Path("/var/log/card-agent/audit.log") and config.spool == tmp_path / "spool"
    assert config.syslog.host == "::1" and config.syslog.port == 6514 and config.syslog.address == "[::1]:6514"
    assert config.syslog.server_name == "::1" and config.syslog.ca == tmp_path / "pki" / "audit-ca.pem"
    assert config.syslog.certificate == tmp_path / "pki" / "agent.pem" and config.syslog.retry_max == 5.0
    assert config.audit_source_id() == os.uname().nodename and config.site_id == "Example Hospital"
    assert parse_audit_config(None, "agent.toml", tmp_path) is None
    defaults = parse_audit_config({"spool": "s", "syslog": {"address": "a:1", "ca": "pki/audit-ca.pem"}},
                                  "agent.toml", tmp_path)
    assert defaults.syslog.transport == "tls" and defaults.on_failure == "continue"


@pytest.mark.parametrize("table, message", [
    ({"file": "a.log", "on_failure": "stop"}, r"\[audit\].on_failure: is 'stop'; use \"continue\" .* or \"refuse\""),
    ({"spool": "s", "syslog": {"address": "a:1", "ca": "ca.pem", "transport": "udp"}},
     r"\[audit.syslog\].transport: is 'udp'; use \"tls\" .* or \"relp\""),
    ({"file": "a.log", "colour": "red"}, r"agent.toml \[audit\]: unknown key 'colour' \(the keys here: file, spool, "),
    ({}, "nothing to write to"),
    ({"file": 5}, r"\[audit\].file: must be a string"),
    ({"syslog": {"address": "audit:6514", "ca": "ca.pem"}}, r"\[audit\].spool: is required with \[audit.syslog\]"),
    ({"spool": "s", "syslog": {"ca": "ca.pem"}}, r"\[audit.syslog\]: missing key 'address'"),
    ({"spool": "s", "syslog": {"address": "audit", "ca": "ca.pem"}}, r"\[audit.syslog\].address: 'audit' is not"),
    ({"spool": "s", "syslog": {"address": "a:1", "ca": "missing.pem"}}, r"\[audit.syslog\].ca: file .* does not"),
    ({"spool": "s", "syslog": {"address": "a:1", "ca": "ca.pem", "key": "ca.pem"}},
     r"\.certificate: certificate and key"),
    ({"spool": "s", "syslog": {"address": "a:1", "ca": "ca.pem", "retry_max": 0}}, r"\.retry_max: must be between"),
    ({"spool": "s", "syslog": {"address": "a:1", "ca": "ca.pem", "port": 1}},
     r"\[audit.syslog\]: unknown key 'port' \(the keys here: address, transport, ca,"),
])
def test_audit_config_errors_name_the_key(tmp_path, table, message):
    (tmp_path / "ca.pem").write_text("x")
    with pytest.raises(ConfigError, match=message):
        parse_audit_config(table, "agent.toml", tmp_path)


def test_audit_tail_shows_peer_text_on_one_line_and_escaped(tmp_path):
    import typer

    from dicom_card_agent.cli import audit_commands

    app = typer.Typer()
    app.add_typer(audit_commands.app, name="audit")
    config = AuditConfig(file=tmp_path / "audit.log", source_id="ws3")
    # C1 controls and U+2028 are valid XML, so they survive in the message; the terminal must not get them.
    reason = "calling AE title holds \x9b[2J and a NEL\x85event=forged\u2028too"
    with AuditTrail(config, hostname="ws3.hospital.example") as trail:
        assert trail.record(AuditEvent.security_alert(AlertType.MALFORMED_PDU, reason, remote=PACS, agent_pid=777))
        assert trail.wait_delivered(0)
    shown = CliRunner().invoke(app, ["audit", "tail", "--file", str(config.file)]).output
    assert shown.count("\n") == 1
    assert "calling AE title holds \\x9b[2J and a NEL\\x85event=forged\\u2028too" in shown, shown
