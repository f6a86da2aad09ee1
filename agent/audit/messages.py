"""DICOM audit messages (PS3.15 A.5) from :class:`~agent.audit.events.AuditEvent`: no I/O.

The XML follows the DICOM Audit Message Schema (PS3.15 A.5.1, RELAX NG): ``AuditMessage`` with
``EventIdentification`` (``EventID``, ``EventTypeCode``, ``EventOutcomeDescription``),
``ActiveParticipant`` (``RoleIDCode``), one ``AuditSourceIdentification`` and
``ParticipantObjectIdentification`` (``ParticipantObjectIDTypeCode``, ``ParticipantObjectName``,
``ParticipantObjectDetail``, ``ParticipantObjectDescription``). Coded values carry ``csd-code``,
``codeSystemName`` and ``originalText``, as the schema requires. The mapping of each event kind
(codes, participants, objects, and where the agent extends or cannot fill the standard) is in
docs/audit.md; the codes are below, spelled as in PS3.15 A.5.3 and PS3.16.

:func:`render` gives one line of UTF-8 (no XML declaration, no line breaks: the local file holds one
message per line); :func:`summarize` reads a message back for ``card-agent audit tail``.

A message is at most ``MAX_AUDIT_MESSAGE_BYTES``: much of it is text a peer chose (a malformed PDU's
error, certificate subjects, AE titles, UIDs from C-STORE command sets), and an audit repository
cuts or refuses a message over its own limit (rsyslog's ``maxMessageSize``). Every text is cut to
the ``TEXT_LIMITS`` of its kind with a note of what was left out, and an Instances Transferred
message lists only the instances that fit, saying how many more there were (docs/audit.md,
"Size limits").
"""

from __future__ import annotations

import base64
import ipaddress
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from dicom_card_agent import logline
from dicom_card_agent.audit.events import (
    AlertType,
    AuditEvent,
    Direction,
    EventKind,
    Instance,
    LocalPeer,
    Outcome,
    RemoteNode,
    User,
)
from dicom_card_agent.token.uri import Pkcs11Uri

DCM = "DCM"
RFC_3881 = "RFC-3881"
# A private coding scheme (PS3.3 8.2: designators beginning with "99") for what PS3.15 has no
# code for: the association events and the malformed-PDU alert.
PRIVATE = "99CARDAGENT"
APPLICATION_NAME = "card-agent"


@dataclass(frozen=True)
class Code:
    value: str
    scheme: str
    meaning: str


# EventID (PS3.15 A.5.3, PS3.16 CID 400)
APPLICATION_ACTIVITY = Code("110100", DCM, "Application Activity")
INSTANCES_TRANSFERRED = Code("110104", DCM, "DICOM Instances Transferred")
QUERY = Code("110112", DCM, "Query")
SECURITY_ALERT = Code("110113", DCM, "Security Alert")
USER_AUTHENTICATION = Code("110114", DCM, "User Authentication")
ASSOCIATION = Code("ASSOCIATION", PRIVATE, "DICOM Association")
# EventTypeCode (PS3.16 CID 401 Audit Event Type Code, CID 403 Security Alert Type Code)
APPLICATION_START = Code("110120", DCM, "Application Start")
APPLICATION_STOP = Code("110121", DCM, "Application Stop")
LOGIN = Code("110122", DCM, "Login")
LOGOUT = Code("110123", DCM, "Logout")
NODE_AUTHENTICATION = Code("110126", DCM, "Node Authentication")
SOFTWARE_CONFIGURATION = Code("110131", DCM, "Software Configuration")
USE_OF_RESTRICTED_FUNCTION = Code("110132", DCM, "Use of Restricted Function")
USER_SECURITY_ATTRIBUTES_CHANGED = Code("110137", DCM, "User Security Attributes Changed")
MALFORMED_PDU = Code("MALFORMED-PDU", PRIVATE, "Malformed DICOM PDU")
ASSOCIATION_BEGIN = Code("ASSOCIATION-BEGIN", PRIVATE, "Association Begin")
ASSOCIATION_END = Code("ASSOCIATION-END", PRIVATE, "Association End")
# RoleIDCode (PS3.16 CID 402 Audit Active Participant Role ID Code)
ROLE_APPLICATION = Code("110150", DCM, "Application")
ROLE_DESTINATION = Code("110152", DCM, "Destination Role ID")
ROLE_SOURCE = Code("110153", DCM, "Source Role ID")
# ParticipantObjectIDTypeCode (PS3.15 A.5.1.2.4, PS3.16 CID 404)
ID_PATIENT_NUMBER = Code("2", RFC_3881, "Patient Number")
ID_URI = Code("12", RFC_3881, "URI")
ID_STUDY_INSTANCE_UID = Code("110180", DCM, "Study Instance UID")
ID_SOP_CLASS_UID = Code("110181", DCM, "SOP Class UID")
ID_NODE = Code("110182", DCM, "Node ID")
ID_TUNNEL = Code("TUNNEL", PRIVATE, "Tunnel Name")

ALERT_TYPES: dict[AlertType, Code] = {
    AlertType.TLS_VERIFICATION_FAILED: NODE_AUTHENTICATION,
    AlertType.LOCAL_PEER_REFUSED: USE_OF_RESTRICTED_FUNCTION,
    AlertType.PIN_LOCKED: USER_SECURITY_ATTRIBUTES_CHANGED,
    AlertType.PIN_FINAL_TRY: USER_SECURITY_ATTRIBUTES_CHANGED,
    AlertType.MALFORMED_PDU: MALFORMED_PDU,
    AlertType.SOFTWARE_CONFIGURATION: SOFTWARE_CONFIGURATION,
    AlertType.REVOCATION_UNCHECKED: NODE_AUTHENTICATION,
}

ALERT_DESCRIPTION = "Alert Description"  # the ParticipantObjectDetail type of a Security Alert's subject

# ParticipantObjectTypeCode / ParticipantObjectTypeCodeRole values (PS3.15 A.5.1.2.2)
PERSON, SYSTEM_OBJECT = "1", "2"
ROLE_PATIENT, ROLE_REPORT, ROLE_SECURITY_RESOURCE = "1", "3", "13"
# NetworkAccessPointTypeCode
MACHINE_NAME, IP_ADDRESS = "1", "2"
# AuditSourceTypeCode 4: "Application Server process or thread"
AUDIT_SOURCE_TYPE = "4"

# The XML of one message, at most: with the syslog header (under 1 KiB, agent/audit/syslog.py) a
# message to the repository stays within 64 KiB, a quarter of the 256 KiB docs/audit.md has the
# repository take.
MAX_AUDIT_MESSAGE_BYTES = 63 * 1024


@dataclass(frozen=True)
class TextLimits:
    """How many characters of a text a message carries; the rest is replaced by a note saying how
    many characters were left out."""

    name: int  # names and identifiers: UserID, UserName, AE titles, ParticipantObjectID and Name, UIDs
    description: int  # free text: EventOutcomeDescription, the Alert Description detail


# Tried in order until the message fits in MAX_AUDIT_MESSAGE_BYTES (with as many instances listed as fit).
# The first keeps any value a legitimate peer sends whole (a UID has 64 characters at most, a
# certificate subject a few hundred); the second is for a message a peer filled on purpose:
# every field of any event at that limit fits.
TEXT_LIMITS = (TextLimits(name=1024, description=2048), TextLimits(name=64, description=256))
# ParticipantObjectQuery: the C-FIND Identifier in base64, of the 16 KiB the relay keeps at most.
QUERY_LIMIT = 4 * -(-16 * 1024 // 3)

_XML_INVALID = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_LINE_BREAKS = re.compile(r"[\t\r\n]+")


@dataclass(frozen=True)
class AuditSource:
    """Who reports: AuditSourceIdentification, and the host name used as NetworkAccessPointID of
    local participants (the workstation)."""

    source_id: str
    hostname: str
    site_id: str = ""


def render(event: AuditEvent, source: AuditSource) -> bytes:
    """The audit message as one line of UTF-8 XML (no declaration), at most ``MAX_AUDIT_MESSAGE_BYTES``."""
    for limits in TEXT_LIMITS:
        xml = _render_within_limit(event, source, limits)
        if xml is not None:
            return xml
    # Not reached: at the last limits every field fits (tests/test_audit_oversize.py fills them all).
    raise AssertionError(f"audit message for {event.kind.value} over {MAX_AUDIT_MESSAGE_BYTES} bytes")


def _render_within_limit(event: AuditEvent, source: AuditSource, limits: TextLimits) -> bytes | None:
    """The message with texts cut at ``limits`` and as many instances listed as fit in
    ``MAX_AUDIT_MESSAGE_BYTES``; ``None`` if it does not fit even with none listed."""
    xml = _serialize(event, source, limits, len(event.instances))
    if len(xml) <= MAX_AUDIT_MESSAGE_BYTES:
        return xml
    fitting: bytes | None = None
    low, high = 0, len(event.instances) - 1  # binary search for the most instances that fit
    while low <= high:
        listed = (low + high) // 2
        candidate = _serialize(event, source, limits, listed)
        if len(candidate) <= MAX_AUDIT_MESSAGE_BYTES:
            fitting, low = candidate, listed + 1
        else:
            high = listed - 1
    return fitting


def _serialize(event: AuditEvent, source: AuditSource, limits: TextLimits, listed: int) -> bytes:
    return ET.tostring(_MessageBuilder(event, source, limits, listed).message(), encoding="utf-8")


def build(event: AuditEvent, source: AuditSource) -> ET.Element:
    """The ``AuditMessage`` element for ``event`` (as :func:`render` writes it)."""
    return ET.fromstring(render(event, source))


class _MessageBuilder:
    def __init__(self, event: AuditEvent, source: AuditSource, limits: TextLimits = TEXT_LIMITS[0],
                 listed: int | None = None) -> None:
        self.event = event
        self.source = source
        self.limits = limits
        # Instances Transferred lists the first ``listed`` instances; the others are counted only.
        self.studies = _group_instances(event.instances, len(event.instances) if listed is None else listed)
        self.root = ET.Element("AuditMessage")

    def message(self) -> ET.Element:
        handler = {
            EventKind.USER_LOGIN: self._user_authentication,
            EventKind.USER_LOGOUT: self._user_authentication,
            EventKind.SECURITY_ALERT: self._security_alert,
            EventKind.APPLICATION_START: self._application_activity,
            EventKind.APPLICATION_STOP: self._application_activity,
            EventKind.ASSOCIATION_BEGIN: self._association,
            EventKind.ASSOCIATION_END: self._association,
            EventKind.INSTANCES_TRANSFERRED: self._instances_transferred,
            EventKind.QUERY: self._query,
        }[self.event.kind]
        handler()
        return self.root

    # -- event kinds ---------------------------------------------------------------------

    def _user_authentication(self) -> None:
        """PS3.15 A.5.3.12: the person (requestor unless the agent ended the session: idle
        timeout, agent stop) and the agent as the node performing authentication; the token as a
        participant object (the standard needs none; it identifies the card)."""
        event = self.event
        login = event.kind is EventKind.USER_LOGIN
        self._event_identification(USER_AUTHENTICATION, "E", LOGIN if login else LOGOUT)
        assert event.user is not None
        person_requestor = login or (event.session_end is not None and event.session_end.by_user)
        self._person(event.user, requestor=person_requestor)
        self._agent(requestor=not person_requestor)
        self._audit_source()
        self._token_object(event.user)

    def _security_alert(self) -> None:
        """PS3.15 A.5.3.11: the agent reports; the user and the local process involved perform
        (UserIsRequestor false); the alert subject is the remote node, the listener, or the token."""
        event = self.event
        assert event.alert is not None
        self._event_identification(SECURITY_ALERT, "E", ALERT_TYPES[event.alert])
        self._agent(requestor=True)
        if event.user is not None and event.user.subject:
            self._person(event.user, requestor=False)
        if event.local_peer is not None:
            self._local_application(event.local_peer, requestor=False)
        self._audit_source()
        description = event.reason or event.alert.value  # an Alert Description detail: cut as one
        if event.alert in (AlertType.PIN_LOCKED, AlertType.PIN_FINAL_TRY):
            if event.user is not None:
                self._token_object(event.user, alert=description)
        elif event.alert is AlertType.LOCAL_PEER_REFUSED or (event.remote is None and event.local_peer is not None):
            listen = event.local_peer.listen if event.local_peer is not None else ""
            if listen:
                self._object(_listener_uri(listen), ID_URI, event.tunnel or listen, type_code=SYSTEM_OBJECT,
                             role=ROLE_SECURITY_RESOURCE, details={ALERT_DESCRIPTION: description})
        elif event.remote is not None:
            self._object(event.remote.host, ID_NODE, str(event.remote), type_code=SYSTEM_OBJECT,
                         details={ALERT_DESCRIPTION: description})

    def _application_activity(self) -> None:
        """PS3.15 A.5.3.1: the agent process started or stopped (RoleIDCode Application)."""
        start = self.event.kind is EventKind.APPLICATION_START
        self._event_identification(APPLICATION_ACTIVITY, "E", APPLICATION_START if start else APPLICATION_STOP)
        self._agent(requestor=False, role=ROLE_APPLICATION)
        self._audit_source()

    def _association(self) -> None:
        """An extension (PS3.15 has no association event): EventID (ASSOCIATION, 99CARDAGENT),
        the local application as Source, the remote node as Destination (roles as for DICOM
        Instances Transferred), the user, the agent; the tunnel as a participant object with the
        byte counts."""
        begin = self.event.kind is EventKind.ASSOCIATION_BEGIN
        self._event_identification(ASSOCIATION, "E", ASSOCIATION_BEGIN if begin else ASSOCIATION_END)
        self._transfer_participants(Direction.FROM_REMOTE if self.event.remote_requestor else Direction.TO_REMOTE)
        self._audit_source()
        details = {}
        if self.event.local_peer is not None and self.event.local_peer.listen:
            details["Listen"] = self.event.local_peer.listen
        if self.event.remote is not None:
            details["Remote"] = str(self.event.remote)
        if self.event.bytes_up is not None:
            details["Bytes Up"] = str(self.event.bytes_up)
        if self.event.bytes_down is not None:
            details["Bytes Down"] = str(self.event.bytes_down)
        if self.event.tunnel:
            self._object(self.event.tunnel, ID_TUNNEL, self.event.tunnel, type_code=SYSTEM_OBJECT, details=details)

    def _instances_transferred(self) -> None:
        """PS3.15 A.5.3.7: sender (Source Role ID) and receiver (Destination Role ID) by direction,
        the user and the agent as other participants; one Study object per study (SOP classes with
        their instances) and the Patient. EventActionCode R: the agent is not the receiver."""
        event = self.event
        self._event_identification(INSTANCES_TRANSFERRED, "R")
        self._transfer_participants(event.direction or Direction.TO_REMOTE)
        self._audit_source()
        # Only studies and SOP classes with a listed instance appear; NumberOfInstances counts all
        # of the class's instances, listed or not.
        for study_uid, classes in self.studies.items():
            if not any(any(uids.values()) for uids in classes.values()):
                continue
            description = ET.Element("ParticipantObjectDescription")
            for sop_class in sorted(c for c, uids in classes.items() if any(uids.values())):
                uids = classes[sop_class]
                sop = ET.SubElement(description, "SOPClass", UID=self._name(sop_class),
                                    NumberOfInstances=str(len(uids)))
                for uid in (uid for uid, listed in uids.items() if listed):
                    ET.SubElement(sop, "Instance", UID=self._name(uid))
            name = study_uid or "Study Instance UID not seen by the agent"
            element = self._object(study_uid, ID_STUDY_INSTANCE_UID, name, type_code=SYSTEM_OBJECT, role=ROLE_REPORT)
            element.append(description)
        name = event.patient_name or event.patient_id or "Patient ID not seen by the agent"
        self._object(event.patient_id, ID_PATIENT_NUMBER, name, type_code=PERSON, role=ROLE_PATIENT)

    def _query(self) -> None:
        """PS3.15 A.5.3.10: the process issuing the query (Source Role ID) and the one answering it
        (Destination Role ID), the user and the agent; the SOP Class queried with the Identifier as
        ParticipantObjectQuery (base64) and its transfer syntax; the patient if the keys name one."""
        event = self.event
        self._event_identification(QUERY, "E")
        self._transfer_participants(Direction.FROM_REMOTE if event.remote_requestor else Direction.TO_REMOTE)
        self._audit_source()
        element = ET.SubElement(self.root, "ParticipantObjectIdentification",
                                ParticipantObjectID=self._name(event.sop_class_uid),
                                ParticipantObjectTypeCode=SYSTEM_OBJECT, ParticipantObjectTypeCodeRole=ROLE_REPORT)
        _coded(element, "ParticipantObjectIDTypeCode", ID_SOP_CLASS_UID)
        # The schema: a Name or a Query. Cut, it is still base64 (whole groups of 4 characters).
        ET.SubElement(element, "ParticipantObjectQuery").text = _clean(event.query[:QUERY_LIMIT])
        if event.transfer_syntax:
            transfer_syntax = self._name(event.transfer_syntax)
            ET.SubElement(element, "ParticipantObjectDetail", type="TransferSyntax",
                          value=base64.b64encode(transfer_syntax.encode("ascii", "replace")).decode("ascii"))
        if event.patient_id or event.patient_name:
            self._object(event.patient_id, ID_PATIENT_NUMBER, event.patient_name or event.patient_id,
                         type_code=PERSON, role=ROLE_PATIENT)

    # -- parts ----------------------------------------------------------------------------

    def _event_identification(self, event_id: Code, action: str, type_code: Code | None = None) -> None:
        event = self.event
        element = ET.SubElement(self.root, "EventIdentification", EventActionCode=action,
                                EventDateTime=_datetime(event.time), EventOutcomeIndicator=str(int(event.outcome)))
        _coded(element, "EventID", event_id)
        if type_code is not None:
            _coded(element, "EventTypeCode", type_code)
        description = "; ".join(filter(None, [_text(self._description(event.reason)), self._omissions()]))
        if description:
            ET.SubElement(element, "EventOutcomeDescription").text = description

    def _omissions(self) -> str:
        """What the message leaves out for its size, said where a reader sees it first."""
        notes = []
        unlisted = sum(not listed for classes in self.studies.values() for uids in classes.values()
                       for listed in uids.values())
        if unlisted:
            notes.append(f"{unlisted} more instance{'' if unlisted == 1 else 's'} not listed "
                         f"(an audit message is limited to {MAX_AUDIT_MESSAGE_BYTES} bytes)")
        if len(self.event.query) > QUERY_LIMIT:
            notes.append(f"query keys cut short to the first {QUERY_LIMIT} base64 characters")
        return "; ".join(notes)

    def _name(self, text: str) -> str:
        """A name or identifier for an attribute, cut at the name limit."""
        return _clean(_clip(text, self.limits.name))

    def _description(self, text: str) -> str:
        return _clip(text, self.limits.description)

    def _participant(self, user_id: str, *, requestor: bool, alternative: str = "", name: str = "",
                     access_point: str = "", role: Code | None = None) -> ET.Element:
        element = ET.SubElement(self.root, "ActiveParticipant", UserID=self._name(user_id) or "unknown")
        if alternative:
            element.set("AlternativeUserID", self._name(alternative))
        if name:
            element.set("UserName", self._name(name))
        element.set("UserIsRequestor", "true" if requestor else "false")
        if access_point:
            element.set("NetworkAccessPointID", self._name(access_point))
            element.set("NetworkAccessPointTypeCode", IP_ADDRESS if _is_ip(access_point) else MACHINE_NAME)
        if role is not None:
            _coded(element, "RoleIDCode", role)
        return element

    def _agent(self, *, requestor: bool, role: Code | None = None) -> None:
        """The agent process: UserID its process id (as in the system log), UserName card-agent."""
        self._participant(str(self.event.agent_pid), requestor=requestor, name=APPLICATION_NAME,
                          access_point=self.source.hostname, role=role)

    def _person(self, user: User, *, requestor: bool) -> None:
        """The clinician: UserID the certificate subject, UserName its common name, at the
        workstation (NetworkAccessPointID, mandatory for User Authentication)."""
        user_id = user.subject or f"token {user.token_label or user.token_serial}"
        self._participant(user_id, requestor=requestor, name=user.common_name if user.subject else "",
                          access_point=self.source.hostname)

    def _local_application(self, peer: LocalPeer, *, requestor: bool, ae_title: str = "",
                           role: Code | None = None) -> None:
        """A local process: UserID its process id (or "uid=N" without one), UserName its process
        name, AlternativeUserID its AE title (PS3.15 A.5.2.2 AETITLES=)."""
        if peer.pid is not None:
            user_id = str(peer.pid)
        elif peer.uid is not None:
            user_id = f"uid={peer.uid}"
        else:
            user_id = "local process"
        name = peer.process or (f"uid={peer.uid}" if peer.uid is not None and peer.pid is not None else "")
        self._participant(user_id, requestor=requestor, alternative=_ae_titles(ae_title), name=name,
                          access_point=self.source.hostname, role=role)

    def _remote_node(self, remote: RemoteNode, *, requestor: bool, ae_title: str = "",
                     role: Code | None = None) -> None:
        """The remote node: UserID host:port, AlternativeUserID its AE title, at its host; UserName
        the subject of the TLS client certificate it authenticated with, when it connected to an
        inbound listener (which PACS sent, whatever AE title it claimed)."""
        self._participant(str(remote), requestor=requestor, alternative=_ae_titles(ae_title), name=remote.subject,
                          access_point=remote.host, role=role)

    def _transfer_participants(self, direction: Direction) -> None:
        """Sender and receiver by direction (the local application requested the association),
        then the user (requestor: the association ran on their identity) and the agent (relay)."""
        event = self.event
        local = event.local_peer or LocalPeer()
        local_role, remote_role = ((ROLE_SOURCE, ROLE_DESTINATION) if direction is Direction.TO_REMOTE
                                   else (ROLE_DESTINATION, ROLE_SOURCE))
        # The requestor's AE title is the Calling AE title: the PACS's for an inbound listener.
        remote_asked = event.remote_requestor
        local_ae, remote_ae = (event.called_ae, event.calling_ae) if remote_asked else (event.calling_ae,
                                                                                         event.called_ae)
        parts = [
            lambda: self._local_application(local, requestor=not remote_asked, ae_title=local_ae, role=local_role),
            lambda: self._remote_node(event.remote, requestor=remote_asked, ae_title=remote_ae, role=remote_role)
            if event.remote is not None else None,
        ]
        if direction is Direction.FROM_REMOTE:
            parts.reverse()  # the sender first
        for part in parts:
            part()
        if event.user is not None and event.user.subject:
            # Outbound, the association ran on the user's identity at their request; an inbound
            # association the PACS requested (a C-MOVE delivery) the agent cannot tie to a request.
            self._person(event.user, requestor=not remote_asked)
        self._agent(requestor=False)

    def _audit_source(self) -> None:
        element = ET.SubElement(self.root, "AuditSourceIdentification")
        if self.source.site_id:
            element.set("AuditEnterpriseSiteID", self._name(self.source.site_id))
        element.set("AuditSourceID", self._name(self.source.source_id))
        ET.SubElement(element, "AuditSourceTypeCode").set("csd-code", AUDIT_SOURCE_TYPE)

    def _object(self, object_id: str, id_type: Code, name: str, *, type_code: str, role: str | None = None,
                details: dict[str, str] | None = None) -> ET.Element:
        element = ET.SubElement(self.root, "ParticipantObjectIdentification", ParticipantObjectID=self._name(object_id))
        element.set("ParticipantObjectTypeCode", type_code)
        if role is not None:
            element.set("ParticipantObjectTypeCodeRole", role)
        _coded(element, "ParticipantObjectIDTypeCode", id_type)
        ET.SubElement(element, "ParticipantObjectName").text = _text(_clip(name, self.limits.name))
        for detail_type, value in (details or {}).items():
            value = self._description(value) if detail_type == ALERT_DESCRIPTION else _clip(value, self.limits.name)
            ET.SubElement(element, "ParticipantObjectDetail", type=detail_type,
                          value=base64.b64encode(value.encode("utf-8")).decode("ascii"))
        return element

    def _token_object(self, user: User, *, alert: str = "") -> None:
        """The token, identified by its RFC 7512 URI (token label and serial)."""
        if not (user.token_label or user.token_serial):
            return
        uri = str(Pkcs11Uri(token=user.token_label or None, serial=user.token_serial or None))
        details = {}
        if alert:
            details[ALERT_DESCRIPTION] = alert
        if user.issuer:
            details["Certificate Issuer"] = user.issuer
        self._object(uri, ID_URI, user.token_label or uri, type_code=SYSTEM_OBJECT, role=ROLE_SECURITY_RESOURCE,
                     details=details)


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code.value, "codeSystemName": code.scheme,
                                       "originalText": code.meaning})


def _datetime(value: datetime) -> str:
    return value.isoformat(timespec="milliseconds")


def _clip(text: str, limit: int) -> str:
    """``text`` cut after ``limit`` characters, with a note saying how many were left out (counting
    those a card session's report left out already)."""
    return logline.cut(text, limit, "more characters not recorded")


# Study Instance UID -> SOP Class UID -> SOP Instance UID -> whether the message lists it.
InstanceListing = dict[str, dict[str, dict[str, bool]]]


def _group_instances(instances: Iterable[Instance], listed: int) -> InstanceListing:
    """``instances`` by study and SOP class (each once, in the order first seen), the first
    ``listed`` of them marked as listed. One pass: a peer's UIDs may be long and many."""
    studies: InstanceListing = {}
    for index, instance in enumerate(instances):
        uids = studies.setdefault(instance.study_uid, {}).setdefault(instance.sop_class_uid, {})
        uids.setdefault(instance.sop_instance_uid, index < listed)
    return studies


def _clean(text: str) -> str:
    """Attribute text: characters XML 1.0 cannot carry become U+FFFD (ElementTree escapes the rest)."""
    return _XML_INVALID.sub("\ufffd", text)


def _text(text: str) -> str:
    """Element text on one line: tabs and line breaks become a space."""
    return _LINE_BREAKS.sub(" ", _clean(text)).strip()


def _ae_titles(*titles: str) -> str:
    present = [t.strip() for t in titles if t and t.strip()]
    return "AETITLES=" + ";".join(present) if present else ""


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _listener_uri(listen: str) -> str:
    """A tunnel listener as a URI: ``unix:/path`` stays, ``host:port`` becomes ``tcp://host:port``."""
    return listen if listen.startswith("unix:") else f"tcp://{listen}"


# -- reading messages back (card-agent audit tail) ---------------------------------------------

@dataclass(frozen=True)
class Summary:
    """The gist of one audit message, for people."""

    time: str
    event: str  # EventID meaning, or EventTypeCode meaning when there is one
    outcome: str
    action: str
    user: str
    remote: str
    detail: str

    def line(self) -> str:
        parts = [self.time, f"{self.event:<27}", f"{self.outcome:<15}"]
        for label, value in (("user", self.user), ("remote", self.remote)):
            if value:
                parts.append(f"{label}={value}")
        if self.detail:
            parts.append(self.detail)
        return "  ".join(parts)


OUTCOMES = {str(int(o)): o.name.lower().replace("_", " ") for o in Outcome}


def summarize(xml: bytes | str) -> Summary:
    """A :class:`Summary` of one audit message; ``ValueError`` if it is not one."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as error:
        raise ValueError(f"not XML: {error}") from None
    if root.tag != "AuditMessage":
        raise ValueError(f"not a DICOM audit message (root element {root.tag!r})")
    identification = root.find("EventIdentification")
    if identification is None:
        raise ValueError("no EventIdentification")
    event_id = identification.find("EventID")
    type_code = identification.find("EventTypeCode")
    event_name = event_id.get("originalText", "?") if event_id is not None else "?"
    if type_code is not None:
        event_name = type_code.get("originalText", event_name)
        if event_id is not None and event_id.get("csd-code") == SECURITY_ALERT.value:
            event_name = f"Alert: {event_name}"
    outcome = OUTCOMES.get(identification.get("EventOutcomeIndicator", ""), "?")
    time = identification.get("EventDateTime", "?")
    participants = root.findall("ActiveParticipant")
    user = ""
    remote = ""
    for participant in participants:
        user_id = participant.get("UserID", "")
        role = participant.find("RoleIDCode")
        if role is None and not user and participant.get("UserName") != APPLICATION_NAME \
                and not user_id.isdigit() and not user_id.startswith(("uid=", "local process")):
            user = participant.get("UserName") or user_id
        elif (role is not None and role.get("csd-code") in (ROLE_SOURCE.value, ROLE_DESTINATION.value)
              and re.fullmatch(r".+:\d+", user_id)):
            remote = user_id
            alternative = participant.get("AlternativeUserID", "")
            if alternative.startswith("AETITLES="):
                remote += f" ({alternative[len('AETITLES='):]})"
    details = []
    for obj in root.findall("ParticipantObjectIdentification"):
        id_type = obj.find("ParticipantObjectIDTypeCode")
        code = id_type.get("csd-code") if id_type is not None else ""
        if code == ID_STUDY_INSTANCE_UID.value:
            count = sum(int(sop.get("NumberOfInstances", "0")) for sop in obj.iter("SOPClass"))
            study = obj.get("ParticipantObjectID") or "?"
            details.append(f"{count} instance{'s' if count != 1 else ''} of study {study}")
        elif code == ID_SOP_CLASS_UID.value:
            details.append(f"query {obj.get('ParticipantObjectID') or '?'}")
        elif code == ID_PATIENT_NUMBER.value and obj.get("ParticipantObjectID"):
            details.append(f"patient {obj.get('ParticipantObjectID')}")
        elif code == ID_NODE.value and not remote:
            remote = (obj.findtext("ParticipantObjectName") or obj.get("ParticipantObjectID") or "")
        elif code == ID_URI.value:
            name = obj.findtext("ParticipantObjectName") or obj.get("ParticipantObjectID") or ""
            details.append(f"token {name}" if obj.get("ParticipantObjectID", "").startswith("pkcs11:") else name)
        for detail in obj.findall("ParticipantObjectDetail"):
            if detail.get("type") in ("Bytes Up", "Bytes Down"):
                try:
                    bytes_text = base64.b64decode(detail.get("value", "")).decode()
                    details.append(f"{detail.get('type', '').lower()} {bytes_text}")
                except (ValueError, UnicodeDecodeError):
                    pass
    description = identification.findtext("EventOutcomeDescription") or ""
    # "token alice (locked)": the description qualifies what precedes it, it is not one more item.
    summary = " ".join(filter(None, [", ".join(d for d in details if d), f"({description})" if description else ""]))
    return Summary(time=time, event=event_name, outcome=outcome, action=identification.get("EventActionCode", ""),
                   user=user, remote=remote, detail=summary)
