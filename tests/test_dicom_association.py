"""Association awareness without I/O: AE title rules, User Identity Negotiation (checked against
pynetdicom's own PDU decoder and encoder), C-STORE bookkeeping, and fuzzed requests."""

from __future__ import annotations

import datetime
import struct
import sys
import tracemalloc
from collections.abc import Callable
from functools import cache, partial
from types import FrameType

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pynetdicom.pdu import A_ASSOCIATE_RQ as PynetdicomAssociateRQ
from pynetdicom.pdu_primitives import UserIdentityNegotiation

from agent_runner import associate_rq
from dicom_card_agent.dicom.association import (
    MAX_UNANSWERED_C_STORES,
    Association,
    Forward,
    Refuse,
    UnansweredLimitError,
)
from dicom_card_agent.dicom.pdu import MalformedPduError, parse_associate_rj
from dicom_card_agent.dicom.rules import AssociationRules, ExistingUserIdentity, UserIdentityMode
from dicom_card_agent.dicom.user_identity import UPN_OID, UsernameError, check_template, username_for

USERNAME_RULES = AssociationRules(user_identity=UserIdentityMode.USERNAME)


def decode_with_pynetdicom(pdu: bytes) -> PynetdicomAssociateRQ:
    request = PynetdicomAssociateRQ()
    request.decode(pdu)
    return request


def pynetdicom_user_identity(request: PynetdicomAssociateRQ) -> UserIdentityNegotiation | None:
    primitive = request.to_primitive()
    return next((item for item in primitive.user_information if isinstance(item, UserIdentityNegotiation)), None)


def request_with_user_identity(username: bytes, passcode: bytes = b"") -> bytes:
    """An A-ASSOCIATE-RQ encoded by pynetdicom, carrying the application's own User Identity."""
    request = decode_with_pynetdicom(associate_rq())
    primitive = request.to_primitive()
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 2 if passcode else 1
    identity.primary_field = username
    if passcode:
        identity.secondary_field = passcode
    primitive.user_information.append(identity)
    encoder = PynetdicomAssociateRQ()
    encoder.from_primitive(primitive)
    return encoder.encode()


@pytest.mark.parametrize("rules, reason", [
    (AssociationRules(allowed_calling_ae_titles=("MODALITY*",)), "calling-AE-title-not-recognized"),
    (AssociationRules(allowed_called_ae_titles=("ARCHIVE",)), "called-AE-title-not-recognized"),
])
def test_ae_titles_outside_the_rules_are_rejected_by_the_service_user(rules: AssociationRules, reason: str) -> None:
    decision = Association(rules).on_request(associate_rq())  # TESTSCU -> PACS
    assert isinstance(decision, Refuse)
    assert parse_associate_rj(decision.reject_pdu).describe() == (
        f"rejected-permanent by DICOM UL service-user: {reason}")
    assert "TESTSCU" in decision.reason or "PACS" in decision.reason


def test_allowed_ae_titles_forward_the_request_unchanged() -> None:
    rules = AssociationRules(allowed_calling_ae_titles=("TEST*",), allowed_called_ae_titles=("PACS", "ARCHIVE"))
    association = Association(rules)
    decision = association.on_request(associate_rq())
    assert decision == Forward(associate_rq(), None)
    assert association.describe_request() == "TESTSCU -> PACS"


@pytest.mark.parametrize("positive", [False, True])
def test_the_card_username_goes_into_the_request_as_pynetdicom_reads_it(positive: bool) -> None:
    rules = AssociationRules(user_identity=UserIdentityMode.USERNAME, positive_response_requested=positive)
    decision = Association(rules, username="Alice Example").on_request(associate_rq())
    assert isinstance(decision, Forward) and decision.user_identity == "Alice Example"
    original, rewritten = decode_with_pynetdicom(associate_rq()), decode_with_pynetdicom(decision.pdu)
    identity = pynetdicom_user_identity(rewritten)
    assert identity is not None
    assert (identity.user_identity_type, identity.primary_field, identity.positive_response_requested) == (
        1, b"Alice Example", positive)
    assert not identity.secondary_field  # never a passcode from the agent
    # Everything else is what the application sent; lengths are right, since pynetdicom re-encodes
    # the decoded request to the same bytes.
    assert rewritten.encode() == decision.pdu
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntax) for c in rewritten.presentation_context] == [
        (c.context_id, c.abstract_syntax, c.transfer_syntax) for c in original.presentation_context]
    assert (rewritten.calling_ae_title, rewritten.called_ae_title) == (original.calling_ae_title,
                                                                       original.called_ae_title)
    assert struct.unpack(">L", decision.pdu[2:6])[0] == len(decision.pdu) - 6


@pytest.mark.parametrize("existing, expected", [
    (ExistingUserIdentity.KEEP, b"app-user"),
    (ExistingUserIdentity.REPLACE, b"Alice Example"),
    (ExistingUserIdentity.REJECT, None),
])
def test_an_application_user_identity_is_kept_replaced_or_rejected(existing: ExistingUserIdentity,
                                                                   expected: bytes | None) -> None:
    request = request_with_user_identity(b"app-user", passcode=b"secret")
    rules = AssociationRules(user_identity=UserIdentityMode.USERNAME, existing_user_identity=existing)
    decision = Association(rules, username="Alice Example").on_request(request)
    if expected is None:
        assert isinstance(decision, Refuse) and "its own User Identity" in decision.reason
        return
    assert isinstance(decision, Forward)
    identity = pynetdicom_user_identity(decode_with_pynetdicom(decision.pdu))
    assert identity is not None and identity.primary_field == expected
    if existing is ExistingUserIdentity.REPLACE:
        assert identity.user_identity_type == 1 and not identity.secondary_field  # the passcode is gone
    else:
        assert decision.pdu == request


def command_set(**elements: object) -> bytes:
    from pynetdicom.dsutils import encode

    dataset = Dataset()
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    return encode(dataset, True, True)  # Implicit VR Little Endian, as every command set


def test_c_store_requests_and_their_responses_are_recorded() -> None:
    association = Association(AssociationRules())
    association.on_request(associate_rq())
    ct = "1.2.840.10008.5.1.4.1.1.2"
    for message_id, instance in ((1, "1.2.3.1"), (2, "1.2.3.2")):
        association.on_command(command_set(CommandGroupLength=0, AffectedSOPClassUID=ct, CommandField=0x0001,
                                           MessageID=message_id, Priority=0, CommandDataSetType=0x0000,
                                           AffectedSOPInstanceUID=instance), from_requestor=True)
    assert [i.sop_instance_uid for i in association.unanswered] == ["1.2.3.1", "1.2.3.2"]  # both unanswered
    answered = [association.on_command(command_set(AffectedSOPClassUID=ct, CommandField=0x8001,
                                                   MessageIDBeingRespondedTo=message_id, CommandDataSetType=0x0101,
                                                   Status=status), from_requestor=False)
                for message_id, status in ((2, 0xA700), (1, 0x0000))]
    assert [(i.sop_instance_uid, i.status, i.stored) for i in answered if i is not None] == [
        ("1.2.3.2", 0xA700, False), ("1.2.3.1", 0x0000, True)]
    assert association.unanswered == []  # answered ones went to the caller (the audit trail's batch)
    assert association.describe_instances() == "; 1 of 2 instances stored"


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_broken_request_is_only_ever_a_malformed_pdu(data: st.DataObject) -> None:
    pdu = bytearray(associate_rq())
    for _ in range(data.draw(st.integers(1, 6))):
        position = data.draw(st.integers(0, len(pdu) - 1))
        pdu[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(6, len(pdu)))
    association = Association(USERNAME_RULES, username="Alice Example")
    try:
        decision = association.on_request(bytes(pdu[:cut]))
    except MalformedPduError:
        return
    assert isinstance(decision, (Forward, Refuse))


# An AE title as 16 bytes on the wire: ASCII, so that the PDU parses, but any of it (PS3.8 9.3.2).
_wire_ae_titles = st.binary(min_size=16, max_size=16).map(lambda raw: bytes(b & 0x7F for b in raw)) | st.sampled_from(
    [b"", b"\nevent=sign-in", b"MODALITY\\CT", b"\x1b[2JPACS", b"TESTSCU\x7f", b"SCU\r", b" LEADING"]).map(
    lambda title: title.ljust(16))


def _breaks_ps3_5(title: bytes) -> bool:
    significant = title.rstrip(b" ")
    return not significant.strip(b" ") or any(b < 0x20 or b in (0x5C, 0x7F) for b in significant)


@settings(max_examples=400)
@given(_wire_ae_titles, _wire_ae_titles)
def test_ae_titles_outside_ps3_5_are_refused_with_the_matching_reason(called: bytes, calling: bytes) -> None:
    pdu = bytearray(associate_rq())
    pdu[10:26], pdu[26:42] = called, calling  # after the PDU header, Protocol-version and reserved bytes
    decision = Association(AssociationRules()).on_request(bytes(pdu))
    if _breaks_ps3_5(calling):
        assert isinstance(decision, Refuse)
        assert parse_associate_rj(decision.reject_pdu).describe() == (
            "rejected-permanent by DICOM UL service-user: calling-AE-title-not-recognized")
    elif _breaks_ps3_5(called):
        assert isinstance(decision, Refuse)
        assert parse_associate_rj(decision.reject_pdu).describe() == (
            "rejected-permanent by DICOM UL service-user: called-AE-title-not-recognized")
    else:
        assert decision == Forward(bytes(pdu), None)
    if isinstance(decision, Refuse):  # the reason goes to the log and the audit trail as one line
        assert decision.reason.isprintable()


def test_a_refused_ae_title_is_named_escaped() -> None:
    pdu = bytearray(associate_rq())
    pdu[26:42] = b"\nevent=sign-in  "
    association = Association(AssociationRules())
    decision = association.on_request(bytes(pdu))
    assert isinstance(decision, Refuse)
    assert decision.reason == ("calling AE title '\\x0aevent=sign-in' holds the control character 0x0A, "
                               "which an AE title must not contain")
    assert association.describe_request() == "\\x0aevent=sign-in -> PACS"


def certificate(subject: list[x509.NameAttribute], san: list[x509.GeneralName] | None = None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(subject)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(key, hashes.SHA256())


def test_usernames_come_from_the_certificate() -> None:
    from asn1crypto.core import UTF8String

    card = certificate([x509.NameAttribute(NameOID.COMMON_NAME, "Dr. Carol Radiologist"),
                        x509.NameAttribute(NameOID.USER_ID, "carol")],
                       [x509.RFC822Name("carol@hospital.example"),
                        x509.OtherName(x509.ObjectIdentifier(UPN_OID), UTF8String("carol@HOSPITAL.EXAMPLE").dump())])
    assert username_for(card, "{cn}") == "Dr. Carol Radiologist"
    assert username_for(card, "{upn}") == "carol@HOSPITAL.EXAMPLE"
    assert username_for(card, "{email}") == "carol@hospital.example"
    assert username_for(card, "{uid}@radiology") == "carol@radiology"
    plain = certificate([x509.NameAttribute(NameOID.COMMON_NAME, "Alice Example")])
    with pytest.raises(UsernameError, match=r"has no upn for the user identity template '\{upn\}'; it has cn"):
        username_for(plain, "{upn}")


@pytest.mark.parametrize("template", ["", "plain text", "{name}", "{cn"])
def test_bad_username_templates_are_refused(template: str) -> None:
    with pytest.raises(UsernameError):
        check_template(template)


@settings(max_examples=200)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.sampled_from(["1.2.840.10008.5.1.4.1.1.2", "1.2.3"]),
       st.integers(0, 0xFFFF))
def test_command_fields_read_as_pydicom_reads_them(command_field: int, message_id: int, uid: str, status: int) -> None:
    from dicom_card_agent.dicom.pdu import decode_command_set, read_command_fields

    data = command_set(CommandGroupLength=0, AffectedSOPClassUID=uid, CommandField=command_field,
                       MessageID=message_id, MessageIDBeingRespondedTo=message_id, Status=status,
                       AffectedSOPInstanceUID=uid + ".9")
    ours, reference = read_command_fields(data), decode_command_set(data)
    assert (ours.command_field, ours.message_id, ours.message_id_being_responded_to, ours.status) == (
        reference.CommandField, reference.MessageID, reference.MessageIDBeingRespondedTo, reference.Status)
    assert (ours.affected_sop_class_uid, ours.affected_sop_instance_uid) == (
        reference.AffectedSOPClassUID, reference.AffectedSOPInstanceUID)


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def p_data_tf(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


def encoded_data_set(implicit: bool) -> bytes:
    from pynetdicom.dsutils import encode

    dataset = Dataset()
    dataset.PatientName, dataset.PatientID = "Doe^Jane", "PID-42"
    dataset.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    dataset.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    dataset.Modality = "OT"
    dataset.PixelData = bytes(300_000)  # long after the study: never needed
    dataset["PixelData"].VR = "OB"
    return encode(dataset, implicit, True)


@pytest.mark.parametrize("implicit, transfer_syntax", [(True, "1.2.840.10008.1.2"), (False, "1.2.840.10008.1.2.1")])
def test_the_patient_and_study_of_each_stored_instance_are_read_from_its_first_bytes(
        implicit: bool, transfer_syntax: str) -> None:
    from dicom_card_agent.dicom.association import DATA_SET_PREFIX, patient_and_study
    from dicom_card_agent.dicom.pdu import DataSetPrefix, PduFramer

    data_set = encoded_data_set(implicit)
    command = command_set(CommandGroupLength=0, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.7", CommandField=1,
                          MessageID=7, Priority=0, CommandDataSetType=0, AffectedSOPInstanceUID="1.2.3")
    fragments = [data_set[i:i + 16000] for i in range(0, len(data_set), 16000)]
    stream = p_data_tf(pdv(3, 0x03, command)) + b"".join(
        p_data_tf(pdv(3, 0x02 if i == len(fragments) - 1 else 0x00, f)) for i, f in enumerate(fragments))
    framer = PduFramer(inspect_commands=True, data_set_prefix=DATA_SET_PREFIX)
    events = [e for i in range(0, len(stream), 7001) for e in framer.feed(stream[i:i + 7001])]
    prefixes = [e for e in events if isinstance(e, DataSetPrefix)]
    assert len(prefixes) == 1 and prefixes[0].context_id == 3
    assert prefixes[0].data == data_set[:DATA_SET_PREFIX]
    assert framer.buffered_bytes == 0  # nothing of the data set is held after its prefix went out
    assert patient_and_study(prefixes[0].data, transfer_syntax) == ("1.2.826.0.1.3680043.8.498.1", "PID-42", "Doe^Jane")
    assert patient_and_study(b"\x08\x00garbage", transfer_syntax) == ("", "", "")
    assert patient_and_study(prefixes[0].data, "1.2.840.10008.1.2.1.99") == ("", "", "")  # deflated: not read


@pytest.mark.parametrize("rules, can_refuse", [
    (AssociationRules(), False),
    (AssociationRules(allowed_calling_ae_titles=("MODALITY*",)), True),
    (AssociationRules(allowed_called_ae_titles=("PACS",)), True),
    (AssociationRules(user_identity=UserIdentityMode.USERNAME), False),
    (AssociationRules(user_identity=UserIdentityMode.USERNAME,
                      existing_user_identity=ExistingUserIdentity.REPLACE), False),
    (AssociationRules(user_identity=UserIdentityMode.USERNAME,
                      existing_user_identity=ExistingUserIdentity.REJECT), True),
])
def test_rules_say_whether_they_can_refuse_a_request(rules: AssociationRules, can_refuse: bool) -> None:
    """The tunnel reads the request before contacting the PACS exactly when this is True."""
    assert rules.can_refuse is can_refuse


def test_a_c_get_sub_operation_is_matched_to_the_response_of_the_other_side() -> None:
    """C-GET: the PACS (acceptor) sends the C-STORE-RQ, the application answers it; a response from
    the same side as a request never answers it."""
    association = Association(AssociationRules())
    association.on_request(associate_rq())
    ct = "1.2.840.10008.5.1.4.1.1.2"
    association.on_command(command_set(AffectedSOPClassUID=ct, CommandField=0x0001, MessageID=7, Priority=0,
                                       CommandDataSetType=0x0000, AffectedSOPInstanceUID="1.2.3.7"),
                           from_requestor=False)
    response = command_set(AffectedSOPClassUID=ct, CommandField=0x8001, MessageIDBeingRespondedTo=7,
                           CommandDataSetType=0x0101, Status=0x0000)
    assert association.on_command(response, from_requestor=False) is None
    request = association.unanswered[0]
    answered = association.on_command(response, from_requestor=True)
    assert answered is request and answered.stored and not answered.from_requestor


def test_the_identifier_of_a_c_find_is_its_query() -> None:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    association = Association(AssociationRules())
    association.on_request(associate_rq())
    association.transfer_syntaxes[1] = "1.2.840.10008.1.2"
    association.on_command(command_set(AffectedSOPClassUID="1.2.840.10008.5.1.4.1.2.2.1", CommandField=0x0020,
                                       MessageID=3, Priority=0, CommandDataSetType=0x0000), True, 1)
    keys = Dataset()
    keys.QueryRetrieveLevel, keys.PatientName, keys.PatientID = "STUDY", "DOE^*", "P-7"
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, keys)
    assert association.on_data_set_prefix(buffer.getvalue(), 1, from_requestor=False) is None  # a response's
    association.on_command(command_set(AffectedSOPClassUID="1.2.840.10008.5.1.4.1.2.2.1", CommandField=0x0020,
                                       MessageID=4, Priority=0, CommandDataSetType=0x0000), True, 1)
    query = association.on_data_set_prefix(buffer.getvalue(), 1, from_requestor=True)
    assert query is not None and query.message_id == 4 and query.identifier == buffer.getvalue()
    assert (query.patient_id, query.patient_name) == ("P-7", "")  # a wildcard names no patient


# ------------------------------------- C-STOREs: each response finds its request at once, none kept after

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@cache
def store_rq(message_id: int, instance_uid: str = "", *, data_set: bool = False) -> bytes:
    """A C-STORE-RQ command set (by default with no data set, as a hostile peer sends them)."""
    return command_set(CommandGroupLength=0, AffectedSOPClassUID=CT_IMAGE_STORAGE, CommandField=0x0001,
                       MessageID=message_id, Priority=0, CommandDataSetType=0x0000 if data_set else 0x0101,
                       AffectedSOPInstanceUID=instance_uid or f"1.2.3.{message_id}")


@cache
def store_rsp(message_id: int, status: int = 0x0000, instance_uid: str = "") -> bytes:
    named = {"AffectedSOPInstanceUID": instance_uid} if instance_uid else {}
    return command_set(AffectedSOPClassUID=CT_IMAGE_STORAGE, CommandField=0x8001, MessageIDBeingRespondedTo=message_id,
                       CommandDataSetType=0x0101, Status=status, **named)


def python_lines_run(call: Callable[[], object]) -> int:
    """How many lines of Python ``call`` runs: its work, counted the same on any machine and load."""
    lines = 0

    def tracer(frame: FrameType, event: str, arg: object) -> Callable[..., object]:
        nonlocal lines
        if event == "line":
            lines += 1
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        call()
    finally:
        sys.settrace(previous)
    return lines


def test_a_long_association_keeps_no_answered_c_store() -> None:
    """Each C-STORE answered goes to the caller (the relay batches it into the audit trail) and is
    not kept: 10000 of them leave nothing behind. They were all kept to the association's end."""
    association = Association(AssociationRules())
    association.on_request(associate_rq())
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(10_000):
            association.on_command(store_rq(1), from_requestor=True)
            answered = association.on_command(store_rsp(1), from_requestor=False)
            assert answered is not None and answered.stored
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert association.unanswered == []
    assert held < 16 * 1024, f"{held} bytes held after 10000 answered C-STOREs"
    assert association.describe_instances() == "; 10000 of 10000 instances stored"


def test_the_work_for_a_response_does_not_grow_with_the_requests_waiting() -> None:
    """The work for one C-STORE-RSP, counted in lines of Python run (never timed), is the same with
    10 and with 4000 requests waiting, whether it answers one or none: a scan of every request the
    association had seen made a long association's responses quadratic."""
    work: dict[int, tuple[int, int]] = {}
    to_none, to_the_first = store_rsp(0xFFFF), store_rsp(1)  # encoded before: pydicom's lines are not counted
    for waiting in (10, 4000):
        association = Association(AssociationRules())
        for message_id in range(1, waiting + 1):
            association.on_command(store_rq(message_id), from_requestor=True)
        answers_none = python_lines_run(partial(association.on_command, to_none, from_requestor=False))
        answers_the_first = python_lines_run(partial(association.on_command, to_the_first, from_requestor=False))
        work[waiting] = (answers_none, answers_the_first)
    assert work[10] == work[4000]


def test_at_most_max_unanswered_c_stores_wait_and_the_next_ends_the_association() -> None:
    """A peer that sends C-STORE requests and never lets them be answered (the reviewer's PACS at an
    inbound listener) is stopped at MAX_UNANSWERED_C_STORES: the next request is a PDU error, and
    the relay aborts the association. Those waiting are still reported, as never answered."""
    association = Association(AssociationRules())
    association.on_request(associate_rq())
    for message_id in range(1, MAX_UNANSWERED_C_STORES + 1):
        association.on_command(store_rq(message_id), from_requestor=True)
    assert len(association.unanswered) == MAX_UNANSWERED_C_STORES
    with pytest.raises(UnansweredLimitError, match=f"^{MAX_UNANSWERED_C_STORES + 1} C-STORE requests would wait "
                                                   f"for their responses at once: the agent follows at most "
                                                   f"{MAX_UNANSWERED_C_STORES} for the audit trail"):
        association.on_command(store_rq(MAX_UNANSWERED_C_STORES + 1), from_requestor=True)
    assert isinstance(UnansweredLimitError("x"), MalformedPduError)  # what the relay aborts for
    assert association.on_command(store_rsp(7), from_requestor=False) is not None  # an answer makes room
    association.on_command(store_rq(MAX_UNANSWERED_C_STORES + 1), from_requestor=True)
    assert len(association.unanswered) == MAX_UNANSWERED_C_STORES
    assert association.describe_instances() == f"; 1 of {MAX_UNANSWERED_C_STORES + 1} instances stored"


@settings(max_examples=300)
@given(st.lists(st.tuples(st.booleans(), st.booleans(), st.integers(1, 3), st.sampled_from([0x0000, 0xA700, 0xB000]),
                          st.none() | st.integers(0, 30)), max_size=30))
def test_responses_answer_the_requests_a_scan_of_them_all_would_find(
        steps: list[tuple[bool, bool, int, int, int | None]]) -> None:
    """Against a list of every request as the model: a response answers the unanswered request of
    the other side with its Message ID (IDs reused, both sides storing, as with C-GET) whose SOP
    Instance UID it names, else the oldest, which a PACS answers first. Newest first, as the agent
    matched them, swapped a refused and a stored instance in the audit trail of a peer that reused a
    Message ID. What stays is exactly the unanswered; the counts are the same."""
    association = Association(AssociationRules())
    model: list[list] = []  # [sent by the requestor, Message ID, SOP Instance UID, status]
    for number, (is_request, from_requestor, message_id, status, named) in enumerate(steps):
        if is_request:
            uid = f"1.2.3.{number}"
            assert association.on_command(store_rq(message_id, uid), from_requestor) is None
            model.append([from_requestor, message_id, uid, None])
            continue
        named_uid = "" if named is None else f"1.2.3.{named}"  # a request's UID, or one no request has
        waiting = [request for request in model if request[1] == message_id and request[3] is None
                   and request[0] != from_requestor]
        expected = next((request for request in waiting if request[2] == named_uid), waiting[0] if waiting else None)
        answered = association.on_command(store_rsp(message_id, status, named_uid), from_requestor)
        if expected is None:
            assert answered is None
        else:
            expected[3] = status
            assert answered is not None and (answered.sop_instance_uid, answered.status) == (expected[2], status)
    assert sorted(i.sop_instance_uid for i in association.unanswered) == sorted(
        uid for _, _, uid, status in model if status is None)
    stored = sum(1 for *_, status in model if status in (0x0000, 0xB000))
    assert association.describe_instances() == (f"; {stored} of {len(model)} instances stored" if model else "")


def test_a_c_find_whose_identifier_could_not_be_kept_is_reported_as_truncated() -> None:
    """An empty prefix: the framer had no room for any of the data set (see DataSetPrefix). The query
    is still reported, flagged, without keys; a C-STORE's patient and study stay blank."""
    association = Association(AssociationRules())
    association.on_request(associate_rq())
    association.on_command(command_set(AffectedSOPClassUID="1.2.840.10008.5.1.4.1.2.2.1", CommandField=0x0020,
                                       MessageID=3, Priority=0, CommandDataSetType=0x0000), True, 1)
    query = association.on_data_set_prefix(b"", 1, from_requestor=True)
    assert query is not None and query.truncated and query.identifier == b""
    association.on_command(store_rq(4, data_set=True), True, 3)
    assert association.on_data_set_prefix(b"", 3, from_requestor=True) is None
    assert (association.unanswered[0].study_uid, association.unanswered[0].patient_id) == ("", "")


def implicit_element(group: int, element: int, value: bytes) -> bytes:
    value += b"\0" if len(value) % 2 else b""
    return struct.pack("<HHI", group, element, len(value)) + value


@given(order=st.permutations(range(4)), repeat=st.none() | st.integers(0, 3))
def test_a_data_set_that_repeats_or_disorders_its_attributes_names_no_patient(order: list[int],
                                                                              repeat: int | None) -> None:
    """PS3.5 7.1: each tag once, in ascending order. pydicom keeps the last of a repeated tag, DCMTK
    (the PACS) the first: the audit trail named a decoy patient or study the PACS never stored. A
    data set broken that way names no patient or study now; an ordered one, its own."""
    from dicom_card_agent.dicom.association import patient_and_study

    elements = [implicit_element(0x0008, 0x0018, b"1.2.3.4"), implicit_element(0x0010, 0x0010, b"Doe^Jane"),
                implicit_element(0x0010, 0x0020, b"REAL-PATIENT"), implicit_element(0x0020, 0x000D, b"1.2.3.5")]
    chosen = [elements[index] for index in order]
    if repeat is not None:  # a decoy right after the real one
        decoy = implicit_element(*struct.unpack_from("<HH", elements[repeat]), b"DECOY")
        chosen.insert(chosen.index(elements[repeat]) + 1, decoy)
    read = patient_and_study(b"".join(chosen), "1.2.840.10008.1.2")
    if order == sorted(order) and repeat is None:
        assert read == ("1.2.3.5", "REAL-PATIENT", "Doe^Jane")
    else:
        assert read == ("", "", "")
