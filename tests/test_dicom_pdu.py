"""The sans-IO DICOM Upper Layer module against pynetdicom's own PDU encoder and decoder.

pynetdicom builds the reference PDUs (A-ASSOCIATE-RQ/AC with the optional negotiation sub-items,
A-ASSOCIATE-RJ, A-ABORT, A-RELEASE, P-DATA-TF of real DIMSE messages) and decodes what we
encode. Hypothesis fuzzes the framer and the parsers with random and mutated streams.
"""

from __future__ import annotations

import itertools
import struct
import time
import tracemalloc
from datetime import timedelta
from io import BytesIO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode as encode_dataset
from pynetdicom.pdu import (
    A_ABORT_RQ,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    P_DATA_TF,
)
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext

from dicom_card_agent.dicom import pdu as pdu_module
from dicom_card_agent.dicom.pdu import (
    AbortReason,
    AbortSource,
    AcseRejectReason,
    AssociateAccept,
    AssociateRequest,
    AssociationPdu,
    CommandSet,
    DataSetPrefix,
    ImplementationClassUid,
    ImplementationVersionName,
    InvalidPduFieldError,
    MalformedCommandSetError,
    MalformedPduError,
    MaximumLength,
    PduEnd,
    PduFramer,
    PduHeader,
    PduLimitError,
    PresentationContextItemAC,
    PresentationContextItemRQ,
    PresentationRejectReason,
    RawItem,
    RejectResult,
    RejectSource,
    ServiceUserRejectReason,
    UserIdentityAC,
    UserIdentityRQ,
    a_abort,
    a_associate_rj,
    a_release_rp,
    a_release_rq,
    decode_command_set,
    encode_associate_ac,
    encode_associate_rq,
    parse_a_abort,
    parse_associate_ac,
    parse_associate_rj,
    parse_associate_rq,
    pdu_type_name,
    with_user_identity,
)
from dicom_card_agent.errors import CardAgentError

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
STORAGE_SERVICE_CLASS = "1.2.840.10008.4.2"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
FUZZ = settings(max_examples=150, deadline=timedelta(seconds=2), suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------- pynetdicom reference PDUs


def _context(context_id: int, abstract: str, transfer: list[str], result: int | None = None) -> PresentationContext:
    context = PresentationContext()
    context.context_id = context_id
    context.abstract_syntax = abstract
    context.transfer_syntax = transfer
    if result is not None:
        context.result = result
    return context


def _user_identity(kind: int, primary: bytes, secondary: bytes = b"", response: bool = True) -> UserIdentityNegotiation:
    item = UserIdentityNegotiation()
    item.user_identity_type = kind
    item.primary_field = primary
    if kind == 2:
        item.secondary_field = secondary
    item.positive_response_requested = response
    return item


def _user_items(*, identity: UserIdentityNegotiation | None, extended: bool = True) -> list:
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16382
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.3.0.4"
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = "PYNETDICOM_304"
    items: list = [maximum, class_uid]
    if extended:
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = 5
        window.maximum_number_operations_performed = 3
        items.append(window)
        for uid, scu, scp in ((CT_IMAGE_STORAGE, True, True), (MR_IMAGE_STORAGE, False, True)):
            role = SCP_SCU_RoleSelectionNegotiation()
            role.sop_class_uid = uid
            role.scu_role = scu
            role.scp_role = scp
            items.append(role)
    items.append(version)
    if extended:
        sop_extended = SOPClassExtendedNegotiation()
        sop_extended.sop_class_uid = CT_IMAGE_STORAGE
        sop_extended.service_class_application_information = b"\x02\x00\x01\x00\x01\x00"
        common = SOPClassCommonExtendedNegotiation()
        common.sop_class_uid = CT_IMAGE_STORAGE
        common.service_class_uid = STORAGE_SERVICE_CLASS
        common.related_general_sop_class_identification = ["1.2.840.10008.5.1.4.1.1.2.1"]
        items += [sop_extended, common]
    if identity is not None:
        items.append(identity)
    return items


def pynetdicom_rq(
    *, identity: UserIdentityNegotiation | None = None, extended: bool = True, contexts: int = 4
) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.calling_ae_title = "STORESCU"
    primitive.called_ae_title = "REMOTE PACS"
    primitive.application_context_name = APPLICATION_CONTEXT
    abstracts = [VERIFICATION, CT_IMAGE_STORAGE, MR_IMAGE_STORAGE]
    primitive.presentation_context_definition_list = [
        _context(2 * i + 1, abstracts[i % 3], [ExplicitVRLittleEndian, ImplicitVRLittleEndian][: 1 + i % 2])
        for i in range(contexts)
    ]
    primitive.user_information = _user_items(identity=identity, extended=extended)
    return A_ASSOCIATE_RQ(primitive).encode()


def pynetdicom_ac(*, server_response: bytes | None = b"ticket", extended: bool = True) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.calling_ae_title = "STORESCU"
    primitive.called_ae_title = "REMOTE PACS"
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.result = 0
    primitive.presentation_context_definition_results_list = [
        _context(1, VERIFICATION, [ImplicitVRLittleEndian], result=0),
        _context(3, CT_IMAGE_STORAGE, [ExplicitVRLittleEndian], result=0),
        _context(5, MR_IMAGE_STORAGE, [ImplicitVRLittleEndian], result=3),
        _context(7, MR_IMAGE_STORAGE, [ImplicitVRLittleEndian], result=4),
    ]
    identity = None
    if server_response is not None:
        identity = UserIdentityNegotiation()
        identity.server_response = server_response
    primitive.user_information = _user_items(identity=identity, extended=extended)
    return A_ASSOCIATE_AC(primitive).encode()


def decode_rq(pdu: bytes) -> A_ASSOCIATE_RQ:
    decoded = A_ASSOCIATE_RQ()
    decoded.decode(pdu)
    return decoded


def decode_ac(pdu: bytes) -> A_ASSOCIATE_AC:
    decoded = A_ASSOCIATE_AC()
    decoded.decode(pdu)
    return decoded


def p_data_pdus(message, context_id: int, max_pdu: int) -> list[bytes]:
    return [P_DATA_TF(primitive).encode() for primitive in message.encode_msg(context_id, max_pdu)]


def c_echo_rq(message_id: int = 7) -> C_ECHO_RQ:
    primitive = C_ECHO()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = VERIFICATION
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    return message


def c_store_rq(instance_uid: str, message_id: int = 42, pixel_bytes: int = 40000) -> C_STORE_RQ:
    dataset = Dataset()
    dataset.SOPClassUID = CT_IMAGE_STORAGE
    dataset.SOPInstanceUID = instance_uid
    dataset.PatientName = "Test^Patient"
    dataset.PixelData = bytes(range(256)) * (pixel_bytes // 256)
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = CT_IMAGE_STORAGE
    primitive.AffectedSOPInstanceUID = instance_uid
    primitive.Priority = 2
    primitive.DataSet = BytesIO(encode_dataset(dataset, True, True))  # implicit VR little endian
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return message


def p_data(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A hand-made P-DATA-TF PDU of (context ID, message control header, fragment) PDVs."""
    body = b"".join(
        struct.pack(">IBB", 2 + len(fragment), context, control) + fragment for context, control, fragment in pdvs
    )
    return struct.pack(">BBI", 4, 0, len(body)) + body


def feed_all(framer: PduFramer, chunks) -> list:
    events: list = []
    for chunk in chunks:
        events += framer.feed(chunk)
    return events


# -------------------------------------------------------------------------------------- errors


def test_error_hierarchy_roots_in_card_agent_error():
    assert issubclass(MalformedPduError, CardAgentError)
    assert issubclass(PduLimitError, MalformedPduError)
    assert issubclass(MalformedCommandSetError, MalformedPduError)
    assert issubclass(InvalidPduFieldError, CardAgentError) and issubclass(InvalidPduFieldError, ValueError)


# --------------------------------------------------------------------- A-ASSOCIATE-RQ / AC parsing


def test_parse_rq_gives_the_fields_pynetdicom_encoded():
    pdu = pynetdicom_rq(identity=_user_identity(2, b"bob", b"secret", response=True))
    reference = decode_rq(pdu)
    request = parse_associate_rq(pdu)

    assert request.protocol_version == 1
    assert request.called_ae_title == "REMOTE PACS"
    assert request.calling_ae_title == "STORESCU"
    assert request.application_context_name == APPLICATION_CONTEXT
    assert [(c.context_id, c.abstract_syntax, list(c.transfer_syntaxes)) for c in request.presentation_contexts] == [
        (item.context_id, item.abstract_syntax, list(item.transfer_syntax)) for item in reference.presentation_context
    ]
    info = reference.user_information
    assert request.maximum_length == info.maximum_length == 16382
    assert request.implementation_class_uid == info.implementation_class_uid
    assert request.implementation_version_name == info.implementation_version_name == "PYNETDICOM_304"
    identity = request.user_identity
    assert identity == UserIdentityRQ(2, True, b"bob", b"secret")
    assert "secret" not in repr(identity)  # a passcode must not reach a log through repr
    # The sub-items this module keeps raw are byte-identical to pynetdicom's own sub-items, in order.
    modelled = (0x51, 0x52, 0x55, 0x58)
    expected_raw = [(item.item_type, item.encode()[4:]) for item in info.user_data if item.item_type not in modelled]
    assert [(raw.item_type, raw.value) for raw in request.raw_user_items] == expected_raw
    assert [item.item_type for item in request.user_information] == [item.item_type for item in info.user_data]
    assert request.other_items == ()


@pytest.mark.parametrize(
    "pdu",
    [
        pynetdicom_rq(identity=_user_identity(2, b"bob", b"secret")),
        pynetdicom_rq(identity=_user_identity(1, "J\u00fcrgen".encode(), response=False)),
        pynetdicom_rq(identity=_user_identity(5, b"eyJhbGciOi.jwt.sig")),
        pynetdicom_rq(identity=None, extended=False, contexts=1),
        pynetdicom_rq(identity=None, contexts=128),
    ],
    ids=["passcode", "username", "jwt", "minimal", "128-contexts"],
)
def test_encode_of_parse_is_identity_on_pynetdicom_rq(pdu: bytes):
    assert encode_associate_rq(parse_associate_rq(pdu)) == pdu


def test_pynetdicom_decodes_a_request_we_built():
    request = AssociateRequest(
        protocol_version=1,
        called_ae_title="ARCHIVE",
        calling_ae_title="MODALITY1",
        application_context_name=APPLICATION_CONTEXT,
        presentation_contexts=(
            PresentationContextItemRQ(1, VERIFICATION, (ImplicitVRLittleEndian,)),
            PresentationContextItemRQ(3, CT_IMAGE_STORAGE, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
        ),
        user_information=(
            MaximumLength(65536),
            ImplementationClassUid("1.2.3.4.5"),
            ImplementationVersionName("CARDAGENT_01"),
            UserIdentityRQ(1, False, b"alice"),
        ),
    )
    decoded = decode_rq(encode_associate_rq(request))
    assert decoded.called_ae_title == "ARCHIVE"
    assert decoded.calling_ae_title == "MODALITY1"
    assert decoded.application_context_name == APPLICATION_CONTEXT
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntax) for c in decoded.presentation_context] == [
        (1, VERIFICATION, [ImplicitVRLittleEndian]),
        (3, CT_IMAGE_STORAGE, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
    ]
    info = decoded.user_information
    assert info.maximum_length == 65536
    assert info.implementation_class_uid == "1.2.3.4.5"
    assert info.implementation_version_name == "CARDAGENT_01"
    assert info.user_identity.user_identity_type == 1
    assert info.user_identity.primary_field == b"alice"
    assert info.user_identity.positive_response_requested == 0


def test_parse_ac_gives_the_fields_pynetdicom_encoded_and_round_trips():
    pdu = pynetdicom_ac(server_response=b"ticket")
    reference = decode_ac(pdu)
    accept = parse_associate_ac(pdu)
    assert accept.called_ae_title == reference.reserved_aet == "REMOTE PACS"
    assert accept.calling_ae_title == reference.reserved_aec == "STORESCU"
    assert accept.application_context_name == APPLICATION_CONTEXT
    assert [(c.context_id, c.result, c.transfer_syntax) for c in accept.presentation_contexts] == [
        (item.context_id, item.result, item.transfer_syntax) for item in reference.presentation_context
    ]
    assert [c.result for c in accept.presentation_contexts] == [0, 0, 3, 4]
    assert accept.maximum_length == 16382
    assert accept.user_identity == UserIdentityAC(b"ticket")
    assert encode_associate_ac(accept) == pdu
    assert encode_associate_ac(parse_associate_ac(pynetdicom_ac(server_response=None, extended=False))) == (
        pynetdicom_ac(server_response=None, extended=False)
    )


def test_pynetdicom_decodes_an_accept_we_built():
    accept = AssociateAccept(
        protocol_version=1,
        called_ae_title="ARCHIVE",
        calling_ae_title="MODALITY1",
        application_context_name=APPLICATION_CONTEXT,
        presentation_contexts=(
            PresentationContextItemAC(1, 0, ImplicitVRLittleEndian),
            PresentationContextItemAC(3, 3, ImplicitVRLittleEndian),
        ),
        user_information=(MaximumLength(0), ImplementationClassUid("1.2.3"), UserIdentityAC(b"srv")),
    )
    decoded = decode_ac(encode_associate_ac(accept))
    assert decoded.reserved_aet == "ARCHIVE"
    assert [(c.context_id, c.result, c.transfer_syntax) for c in decoded.presentation_context] == [
        (1, 0, ImplicitVRLittleEndian),
        (3, 3, ImplicitVRLittleEndian),
    ]
    assert decoded.user_information.maximum_length == 0
    assert decoded.user_information.user_identity.server_response == b"srv"


def test_ac_context_without_transfer_syntax_sub_item_round_trips():
    accept = parse_associate_ac(pynetdicom_ac(server_response=None, extended=False))
    stripped = AssociateAccept(**{**accept.__dict__, "presentation_contexts": (PresentationContextItemAC(5, 3, None),)})
    pdu = encode_associate_ac(stripped)
    assert b"\x21\x00\x00\x04\x05\x00\x03\x00" in pdu
    assert parse_associate_ac(pdu).presentation_contexts == (PresentationContextItemAC(5, 3, None),)


def test_uid_padding_is_dropped_and_ae_titles_lose_only_trailing_spaces():
    pdu = bytearray(pynetdicom_rq(extended=False, contexts=1))
    called = pdu.index(b"REMOTE PACS")
    pdu[called:called + 16] = b" REMOTE PACS    "
    request = parse_associate_rq(bytes(pdu))
    assert request.called_ae_title == " REMOTE PACS"
    assert encode_associate_rq(request) == bytes(pdu)
    padded_context = _item(
        0x20, b"\x01\x00\x00\x00" + _item(0x30, VERIFICATION.encode() + b"\x00")
        + _item(0x40, ImplicitVRLittleEndian.encode() + b"\x00")
    )
    request = parse_associate_rq(_with_length(_rq_body(APP + padded_context + USER)))
    assert request.presentation_contexts == (PresentationContextItemRQ(1, VERIFICATION, (ImplicitVRLittleEndian,)),)
    assert encode_associate_rq(request) == _with_length(_rq_body(APP + CONTEXT + USER))


# ------------------------------------------------------------------------------ with_user_identity


def test_with_user_identity_replaces_a_passcode_item_in_place():
    pdu = pynetdicom_rq(identity=_user_identity(2, b"bob", b"secret"))
    request = parse_associate_rq(pdu)
    changed = with_user_identity(request, "alice", positive_response_requested=True)
    out = encode_associate_rq(changed)
    assert b"secret" not in out and b"bob" not in out
    identity = decode_rq(out).user_information.user_identity
    assert identity.user_identity_type == 1
    assert identity.primary_field == b"alice"
    assert identity.positive_response_requested == 1
    assert identity.secondary_field in (b"", None)
    assert [type(item) for item in changed.user_information] == [type(item) for item in request.user_information]
    assert changed.presentation_contexts == request.presentation_contexts
    assert request.user_identity.primary_field == b"bob"  # the original is left alone


def test_with_user_identity_inserts_after_the_lower_sub_item_types():
    request = parse_associate_rq(pynetdicom_rq(identity=None))
    extra = RawItem(0x5A, b"future")
    request = AssociateRequest(**{**request.__dict__, "user_information": request.user_information + (extra,)})
    changed = with_user_identity(request, "J\u00fcrgen", positive_response_requested=False)
    types = [item.item_type for item in changed.user_information]
    assert types == [0x51, 0x52, 0x53, 0x54, 0x54, 0x55, 0x56, 0x57, 0x58, 0x5A]
    readable = AssociateRequest(**{**changed.__dict__, "user_information": changed.user_information[:-1]})
    identity = decode_rq(encode_associate_rq(readable)).user_information.user_identity  # pynetdicom can't read 5AH
    assert identity.primary_field == "J\u00fcrgen".encode("utf-8")
    assert identity.positive_response_requested == 0


def test_with_user_identity_keeps_one_item_when_several_were_sent():
    request = parse_associate_rq(pynetdicom_rq(identity=None, extended=False))
    twice = (UserIdentityRQ(2, True, b"x", b"pw1"), MaximumLength(5), UserIdentityRQ(2, True, b"y", b"pw2"))
    request = AssociateRequest(**{**request.__dict__, "user_information": twice})
    changed = with_user_identity(request, "alice", True)
    assert changed.user_information == (UserIdentityRQ(1, True, b"alice", b""), MaximumLength(5))
    assert b"pw" not in encode_associate_rq(changed)


def test_with_user_identity_refuses_an_empty_username():
    request = parse_associate_rq(pynetdicom_rq())
    with pytest.raises(InvalidPduFieldError, match="empty"):
        with_user_identity(request, "", True)


# --------------------------------------------------------------------- RJ / ABORT / RELEASE builders

VALID_REJECTS = [
    (result, source, reason)
    for result in (1, 2)
    for source, reasons in ((1, (1, 2, 3, 7)), (2, (1, 2)), (3, (1, 2)))
    for reason in reasons
]


@pytest.mark.parametrize("result,source,reason", VALID_REJECTS)
def test_a_associate_rj_matches_pynetdicom(result: int, source: int, reason: int):
    ours = a_associate_rj(result, source, reason)
    decoded = A_ASSOCIATE_RJ()
    decoded.decode(ours)
    assert (decoded.result, decoded.source, decoded.reason_diagnostic) == (result, source, reason)
    reference = A_ASSOCIATE_RJ()
    reference.result, reference.source, reference.reason_diagnostic = result, source, reason
    assert ours == reference.encode()
    assert parse_associate_rj(ours) == parse_associate_rj(reference.encode())
    assert (parse_associate_rj(ours).result, parse_associate_rj(ours).source) == (result, source)


@pytest.mark.parametrize(
    "result,source,reason",
    [(0, 1, 1), (3, 1, 1), (1, 0, 1), (1, 4, 1), (1, 1, 4), (1, 1, 0), (2, 2, 3), (1, 3, 0), (1, 3, 3)],
)
def test_a_associate_rj_refuses_undefined_combinations(result: int, source: int, reason: int):
    with pytest.raises(InvalidPduFieldError):
        a_associate_rj(result, source, reason)
    with pytest.raises(ValueError):
        a_associate_rj(result, source, reason)


def test_reject_constants_carry_ps38_values():
    assert a_associate_rj(
        RejectResult.REJECTED_TRANSIENT,
        RejectSource.SERVICE_PROVIDER_PRESENTATION,
        PresentationRejectReason.TEMPORARY_CONGESTION,
    ) == bytes.fromhex("03000000000400020301")
    assert ServiceUserRejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED == 3
    assert ServiceUserRejectReason.CALLED_AE_TITLE_NOT_RECOGNIZED == 7
    assert (PresentationRejectReason.LOCAL_LIMIT_EXCEEDED, AcseRejectReason.PROTOCOL_VERSION_NOT_SUPPORTED) == (2, 2)
    text = parse_associate_rj(a_associate_rj(1, 1, 3)).describe()
    assert text == "rejected-permanent by DICOM UL service-user: calling-AE-title-not-recognized"


@pytest.mark.parametrize("source,reason", [(0, 0)] + [(2, r) for r in (0, 1, 2, 4, 5, 6)])
def test_a_abort_matches_pynetdicom(source: int, reason: int):
    ours = a_abort(source, reason)
    decoded = A_ABORT_RQ()
    decoded.decode(ours)
    assert (decoded.source, decoded.reason_diagnostic) == (source, reason)
    reference = A_ABORT_RQ()
    reference.source, reference.reason_diagnostic = source, reason
    assert ours == reference.encode()
    assert parse_a_abort(ours).source == source and parse_a_abort(ours).reason == reason


@pytest.mark.parametrize("source,reason", [(1, 0), (3, 0), (0, 1), (2, 3), (2, 7), (2, -1)])
def test_a_abort_refuses_undefined_values(source: int, reason: int):
    with pytest.raises(InvalidPduFieldError):
        a_abort(source, reason)


def test_a_abort_defaults_and_describe():
    expected = bytes.fromhex("07000000000400000200")
    assert a_abort() == a_abort(AbortSource.SERVICE_PROVIDER, AbortReason.REASON_NOT_SPECIFIED) == expected
    assert parse_a_abort(a_abort(2, 2)).describe() == "A-ABORT from DICOM UL service-provider: unexpected-PDU"
    assert parse_a_abort(a_abort(0, 0)).describe() == "A-ABORT from DICOM UL service-user"


def test_pdu_type_names_and_aliases():
    names = ("A_ASSOCIATE_RQ", "A_ASSOCIATE_AC", "A_ASSOCIATE_RJ", "P_DATA_TF", "A_RELEASE_RQ", "A_RELEASE_RP",
             "A_ABORT")
    assert [getattr(pdu_module, name) for name in names] == [1, 2, 3, 4, 5, 6, 7]
    assert [pdu_type_name(t) for t in (1, 4, 7, 9)] == ["A-ASSOCIATE-RQ", "P-DATA-TF", "A-ABORT", "0x09"]


def test_release_pdus_match_pynetdicom():
    assert a_release_rp() == A_RELEASE_RP().encode()
    assert a_release_rq() == A_RELEASE_RQ().encode()


# ------------------------------------------------------------------------------------------ framer


def small_stream() -> tuple[bytes, list]:
    """RQ + C-ECHO-RQ P-DATA + AC + RELEASE-RQ/RP + ABORT, and the events it must give."""
    rq = pynetdicom_rq(identity=_user_identity(1, b"bob"), contexts=2)
    echo = p_data_pdus(c_echo_rq(), 1, 16382)
    assert len(echo) == 1
    ac = pynetdicom_ac()
    parts = [rq, echo[0], ac, a_release_rq(), a_release_rp(), a_abort(2, 1)]
    command = echo[0][12:]
    expected: list = []
    for part in parts:
        expected.append(PduHeader(part[0], len(part) - 6))
        if part[0] == 4:
            expected.append(CommandSet(1, command))
        else:
            expected.append(AssociationPdu(part[0], part))
        expected.append(PduEnd(part[0]))
    return b"".join(parts), expected


def test_framer_events_are_the_same_at_every_split_offset():
    stream, expected = small_stream()
    assert feed_all(PduFramer(inspect_commands=True), [stream]) == expected
    without_commands = [event for event in expected if not isinstance(event, CommandSet)]
    for offset in range(len(stream) + 1):
        assert feed_all(PduFramer(inspect_commands=True), [stream[:offset], stream[offset:]]) == expected, offset
        assert feed_all(PduFramer(), [stream[:offset], stream[offset:]]) == without_commands, offset
    framer = PduFramer(inspect_commands=True)
    assert feed_all(framer, [stream[i:i + 1] for i in range(len(stream))]) == expected
    assert framer.at_boundary and framer.position == len(stream) and framer.buffered_bytes == 0


def test_framer_reports_its_position_inside_a_pdu():
    rq = pynetdicom_rq(extended=False, contexts=1)
    framer = PduFramer()
    assert framer.at_boundary and framer.current_type is None and framer.remaining_in_pdu is None
    assert framer.feed(rq[:1]) == []
    assert (framer.at_boundary, framer.current_type) == (False, 1)
    assert (framer.bytes_into_pdu, framer.remaining_in_pdu) == (1, None)
    assert framer.feed(rq[1:10]) == [PduHeader(1, len(rq) - 6)]
    assert (framer.bytes_into_pdu, framer.remaining_in_pdu) == (10, len(rq) - 10)
    events = framer.feed(memoryview(rq)[10:])
    assert events == [AssociationPdu(1, rq), PduEnd(1)]
    assert (framer.at_boundary, framer.bytes_into_pdu, framer.current_type) == (True, 0, None)
    assert "bytes" in repr(events[0]) and "REMOTE" not in repr(events[0])


def test_framer_can_stop_exactly_at_a_boundary():
    stream, _ = small_stream()
    framer = PduFramer()
    framer.feed(stream[:6])
    cut = 6 + framer.remaining_in_pdu
    events = framer.feed(stream[6:cut])
    assert events[-1] == PduEnd(1) and framer.at_boundary


def test_a_50_mib_p_data_tf_is_counted_not_buffered():
    total = 50 * 1024 * 1024
    header = struct.pack(">BBI", 4, 0, total) + struct.pack(">IBB", total - 4, 1, 0x02)
    chunk = bytes(256 * 1024)
    payload_left = total - 6
    for inspect in (False, True):
        framer = PduFramer(inspect_commands=inspect)
        assert framer.feed(header) == [PduHeader(4, total)]
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            started = time.perf_counter()
            left = payload_left
            events: list = []
            while left:
                piece = memoryview(chunk)[: min(len(chunk), left)]
                events += framer.feed(piece)
                left -= len(piece)
                assert framer.buffered_bytes <= 6
            elapsed = time.perf_counter() - started
            peak = tracemalloc.get_traced_memory()[1] - baseline
        finally:
            tracemalloc.stop()
        assert events == [PduEnd(4)]
        assert framer.at_boundary
        assert peak < 64 * 1024, f"framer allocated {peak} bytes while counting a P-DATA-TF payload"
        assert elapsed < 2.0, f"{elapsed:.2f} s for 200 chunks: feeding is not O(1) per chunk"


def test_command_sets_of_real_c_echo_and_c_store_are_recovered():
    instance_uid = generate_uid()
    pdus = p_data_pdus(c_echo_rq(message_id=7), 1, 16382)
    pdus += p_data_pdus(c_store_rq(instance_uid, message_id=42, pixel_bytes=200_000), 3, 16382)
    framer = PduFramer(inspect_commands=True)
    commands = []
    max_buffered = 0
    for pdu in pdus:
        for offset in range(0, len(pdu), 1000):
            commands += [e for e in framer.feed(pdu[offset:offset + 1000]) if isinstance(e, CommandSet)]
            max_buffered = max(max_buffered, framer.buffered_bytes)
    assert [c.context_id for c in commands] == [1, 3]
    echo, store = (decode_command_set(c.data) for c in commands)
    assert echo.MessageID == 7 and echo.CommandField == 0x0030
    assert store.MessageID == 42 and store.CommandField == 0x0001
    assert store.AffectedSOPInstanceUID == instance_uid
    assert store.AffectedSOPClassUID == CT_IMAGE_STORAGE
    assert max_buffered < 1000  # data-set fragments (200 kB) were never collected


def test_a_command_fragmented_over_pdus_and_contexts_is_reassembled():
    command = p_data_pdus(c_store_rq("1.2.3.4", pixel_bytes=512), 1, 16382)[0][12:]
    halves = command[:40], command[40:]
    stream = (
        p_data((1, 0x01, halves[0]), (3, 0x01, b"\x08\x00"))  # command starts on 1, and on 3
        + p_data((3, 0x00, b"data that is not a command"), (1, 0x03, halves[1]))
        + p_data((3, 0x03, b"\x00\x00"), (5, 0x02, b""))
    )
    events = [e for e in feed_all(PduFramer(inspect_commands=True), [stream]) if isinstance(e, CommandSet)]
    assert events == [CommandSet(1, command), CommandSet(3, b"\x08\x00\x00\x00")]
    assert decode_command_set(events[0].data).AffectedSOPInstanceUID == "1.2.3.4"


def test_command_set_limit():
    framer = PduFramer(inspect_commands=True, max_command_set_length=16)
    framer.feed(p_data((1, 0x01, bytes(10))))
    with pytest.raises(PduLimitError, match="16-byte limit"):
        framer.feed(p_data((1, 0x03, bytes(10))))


def _rq_header(length: int) -> bytes:
    return struct.pack(">BBI", 1, 0, length)


@pytest.mark.parametrize(
    "data,message,inspect",
    [
        (b"\x09", "unknown PDU type 0x09", False),
        (b"\x16\x03\x01\x02\x00", "unknown PDU type 0x16 (a TLS handshake", False),
        (b"\x00", "unknown PDU type 0x00", False),
        (bytes.fromhex("070000000005"), "A-ABORT PDU with length 5 (must be 4)", False),
        (bytes.fromhex("060000000003"), "A-RELEASE-RP PDU with length 3 (must be 4)", False),
        (bytes.fromhex("030000000000"), "A-ASSOCIATE-RJ PDU with length 0 (must be 4)", False),
        (_rq_header(5_000_000), "A-ASSOCIATE-RQ PDU of 5000000 bytes exceeds the 1048576-byte limit", False),
        (_rq_header(10), "A-ASSOCIATE-RQ PDU with length 10 (must be at least 68)", False),
        (bytes.fromhex("040000000000"), "P-DATA-TF PDU length 0", False),
        (bytes.fromhex("040000000005"), "P-DATA-TF PDU length 5", False),
        (struct.pack(">BBIIBB", 4, 0, 8, 1, 1, 3) + b"ab", "PDV item length 1 in a P-DATA-TF PDU", True),
        (struct.pack(">BBIIBB", 4, 0, 8, 7, 1, 3) + b"ab", "runs past the end of its P-DATA-TF PDU", True),
        (struct.pack(">BBIIBB", 4, 0, 9, 2, 1, 3) + b"\x00\x00\x00", "ends inside a PDV item header", True),
    ],
)
def test_malformed_streams_raise_precise_messages(data: bytes, message: str, inspect: bool):
    framer = PduFramer(inspect_commands=inspect)
    with pytest.raises(MalformedPduError) as caught:
        framer.feed(data)
    assert message in str(caught.value)
    assert framer.failed
    with pytest.raises(MalformedPduError, match="already failed"):
        framer.feed(a_release_rq())
    with pytest.raises(MalformedPduError, match="already failed"):
        framer.end_of_stream()


def test_pdv_structure_is_only_checked_when_inspecting():
    broken = struct.pack(">BBIIBB", 4, 0, 9, 2, 1, 3) + b"\x00\x00\x00"
    assert feed_all(PduFramer(), [broken]) == [PduHeader(4, 9), PduEnd(4)]


def test_oversized_association_pdu_is_a_limit_error_and_the_limit_is_configurable():
    with pytest.raises(PduLimitError):
        PduFramer().feed(_rq_header(5_000_000))
    rq = pynetdicom_rq()
    with pytest.raises(PduLimitError, match="exceeds the 100-byte limit"):
        PduFramer(max_association_pdu_length=100).feed(rq)
    assert PduFramer(max_association_pdu_length=len(rq) - 6).feed(rq)[-1] == PduEnd(1)


def test_end_of_stream_inside_a_pdu_is_reported():
    framer = PduFramer()
    framer.end_of_stream()  # at a boundary: fine
    framer.feed(a_release_rq()[:3])
    with pytest.raises(MalformedPduError, match="stream ended inside a A-RELEASE-RQ PDU after 3 bytes"):
        framer.end_of_stream()
    framer = PduFramer()
    framer.feed(a_release_rq()[:8])
    with pytest.raises(MalformedPduError, match="after 8 of 10 bytes"):
        framer.end_of_stream()


@pytest.mark.parametrize(
    "data,message",
    [
        (b"\x00\x00\x00\x00\xff\xff\xff\x7f", "runs past the end"),
        (b"\x00\x00\x00\x00\x04\x00\x00\x00\x01", "runs past the end"),
        (b"\x00\x00\x00\x00", "4 stray bytes"),
        (b"\x00\x00\x20\x01\xff\xff\xff\xff", "undefined length"),
        (b"\x00\x00\x00\x00\x01\x00\x00\x00\x01", "cannot be decoded"),  # UL value of 1 byte
    ],
)
def test_decode_command_set_rejects_garbage(data: bytes, message: str):
    with pytest.raises(MalformedCommandSetError, match=message):
        decode_command_set(data)


def test_decode_command_set_rejects_foreign_groups():
    foreign = struct.pack("<HHI", 0x0008, 0x0016, 4) + b"1.2\x00"
    with pytest.raises(MalformedCommandSetError, match="outside group 0000"):
        decode_command_set(foreign)


# -------------------------------------------------------------------------------- parser errors


def _with_length(body: bytes, pdu_type: int = 1) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _rq_body(items: bytes, called: bytes = b"REMOTE".ljust(16)) -> bytes:
    return struct.pack(">HH", 1, 0) + called + b"LOCAL".ljust(16) + bytes(32) + items


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


APP = _item(0x10, APPLICATION_CONTEXT.encode())
def _pc(*sub_items: bytes) -> bytes:
    return _item(0x20, b"\x01\x00\x00\x00" + b"".join(sub_items))


CONTEXT = _pc(_item(0x30, VERIFICATION.encode()), _item(0x40, ImplicitVRLittleEndian.encode()))
USER = _item(0x50, _item(0x51, struct.pack(">I", 16384)))


def _with_user(*sub_items: bytes) -> bytes:
    """An A-ASSOCIATE-RQ (or -AC for 59H) whose User Information Item holds ``sub_items``."""
    pdu_type = 2 if sub_items[0][0] == 0x59 else 1
    context = _item(0x21, b"\x01\x00\x00\x00") if pdu_type == 2 else CONTEXT
    return _with_length(_rq_body(APP + context + _item(0x50, b"".join(sub_items))), pdu_type)


@pytest.mark.parametrize(
    "pdu,message",
    [
        (_with_length(_rq_body(APP + CONTEXT + USER), 2), "expected an A-ASSOCIATE-RQ PDU, got PDU type A-ASSOC"),
        (_with_length(_rq_body(APP + CONTEXT + USER))[:-1], "does not match"),
        (b"\x01\x00", "shorter than a PDU header"),
        (_with_length(_rq_body(b"")[:60]), "must be at least 68"),
        (_with_length(_rq_body(APP + CONTEXT + USER + b"\x60\x00")), "2 stray bytes"),
        (_with_length(_rq_body(APP + CONTEXT + b"\x50\x00\x00\x09" + _item(0x51, bytes(4)))), "runs past the end"),
        (_with_length(_rq_body(CONTEXT + USER)), "without an Application Context Item"),
        (_with_length(_rq_body(APP + APP + CONTEXT + USER)), "more than one Application Context Item"),
        (_with_length(_rq_body(APP + USER)), "without a Presentation Context Item"),
        (_with_length(_rq_body(APP + CONTEXT + USER + USER)), "more than one User Information Item"),
        (_with_length(_rq_body(APP + _pc(_item(0x40, b"1.2")) + USER)), "no Abstract Syntax"),
        (_with_length(_rq_body(APP + _pc(_item(0x30, b"1.2")) + USER)), "no Transfer Syntax"),
        (_with_length(_rq_body(APP + _pc(_item(0x31, b"1.2")) + USER)), "unexpected sub-item 0x31"),
        (_with_length(_rq_body(APP + _item(0x20, b"\x01\x00") + USER)), "must be at least 4"),
        (_with_user(_item(0x51, bytes(3))), "Maximum Length Sub-Item with length 3"),
        (_with_user(_item(0x58, b"\x01\x00\x00\x09bob\x00\x00")), "Primary-field-length 9"),
        (_with_user(_item(0x58, b"\x01\x00\x00\x03bob\x00\x05pw")), "Secondary-field-length 5"),
        (_with_length(_rq_body(APP + CONTEXT + USER, called=b"R\xc9MOTE".ljust(16))), "Called-AE-title is not ASCII"),
        (_with_length(_rq_body(_item(0x10, b"1.2.\xff") + CONTEXT + USER)), "Application-context-name is not ASCII"),
    ],
)
def test_malformed_associate_rq_raises_precise_messages(pdu: bytes, message: str):
    with pytest.raises(MalformedPduError) as caught:
        parse_associate_rq(pdu)
    assert message in str(caught.value)


def test_well_formed_hand_made_rq_parses_and_keeps_unknown_items():
    pdu = _with_length(_rq_body(APP + CONTEXT + USER + _item(0x60, b"future")))
    request = parse_associate_rq(pdu)
    assert request.other_items == (RawItem(0x60, b"future"),)
    assert request.maximum_length == 16384 and request.user_identity is None
    assert encode_associate_rq(request) == pdu
    no_user = _with_length(_rq_body(APP + CONTEXT))
    assert parse_associate_rq(no_user).user_information is None
    assert encode_associate_rq(parse_associate_rq(no_user)) == no_user


def test_malformed_ac_and_fixed_pdus():
    ac = _with_length(_rq_body(APP + _item(0x21, b"\x01\x00\x00\x00" + _item(0x40, b"1.2") * 2) + USER), 2)
    with pytest.raises(MalformedPduError, match="more than one Transfer Syntax"):
        parse_associate_ac(ac)
    with pytest.raises(MalformedPduError, match="Server-response-length 5 does not match the 2 bytes"):
        parse_associate_ac(_with_user(_item(0x59, b"\x00\x05pw")))
    assert parse_associate_ac(_with_user(_item(0x59, b"\x00\x02pw"))).user_identity == UserIdentityAC(b"pw")
    with pytest.raises(MalformedPduError, match="A-ASSOCIATE-RJ PDU with length 5"):
        parse_associate_rj(_with_length(bytes(5), 3))
    with pytest.raises(MalformedPduError, match="expected an A-ABORT PDU"):
        parse_a_abort(a_release_rp())


@pytest.mark.parametrize(
    "change,message",
    [
        ({"called_ae_title": "A" * 17}, "longer than 16"),
        ({"calling_ae_title": "CAF\u00c9"}, "must be ASCII"),
        ({"application_context_name": "1.2.\u00e9"}, "must be ASCII"),
        ({"presentation_contexts": (PresentationContextItemRQ(256, VERIFICATION, ("1.2",)),)}, "does not fit"),
        ({"presentation_contexts": (PresentationContextItemRQ(1, VERIFICATION, ()),)}, "needs a transfer syntax"),
        ({"user_information": (RawItem(0x53, bytes(70000)),)}, "2-byte Item-length"),
        ({"user_information": (MaximumLength(1 << 32),)}, "does not fit in 4 bytes"),
        ({"protocol_version": 70000}, "two bytes"),
    ],
)
def test_encoder_refuses_values_it_cannot_encode(change: dict, message: str):
    request = parse_associate_rq(pynetdicom_rq(extended=False))
    with pytest.raises(InvalidPduFieldError, match=message):
        encode_associate_rq(AssociateRequest(**{**request.__dict__, **change}))


# ------------------------------------------------------------------------------------------ fuzzing

_CLEAN_ERRORS = (MalformedPduError,)
PARSERS = {1: parse_associate_rq, 2: parse_associate_ac, 3: parse_associate_rj, 7: parse_a_abort}
ROUND_TRIPS = {1: (parse_associate_rq, encode_associate_rq), 2: (parse_associate_ac, encode_associate_ac)}


VALID_STREAM, EXPECTED_EVENTS = small_stream()
VALID_RQ = pynetdicom_rq(identity=_user_identity(2, b"bob", b"pw"))
VALID_AC = pynetdicom_ac()


def _framer_run(data: bytes, cuts: list[int], inspect: bool) -> list:
    framer = PduFramer(inspect_commands=inspect)
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    events: list = []
    try:
        for start, end in itertools.pairwise(points):
            events += framer.feed(data[start:end])
    except _CLEAN_ERRORS:
        assert framer.failed
        return events
    assert framer.position == len(data)
    return events


def _check_association_pdus(events: list) -> None:
    """Every association PDU the framer delivers parses cleanly or raises MalformedPduError."""
    for event in events:
        if not isinstance(event, AssociationPdu):
            continue
        parser = PARSERS.get(event.pdu_type)
        if parser is None:
            continue
        try:
            parsed = parser(event.pdu)
        except _CLEAN_ERRORS:
            continue
        if event.pdu_type in (1, 2):
            encode = encode_associate_rq if event.pdu_type == 1 else encode_associate_ac
            assert parser(encode(parsed)) == parsed


@FUZZ
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=6), inspect=st.booleans())
def test_fuzz_framer_random_bytes(data: bytes, cuts: list[int], inspect: bool):
    _check_association_pdus(_framer_run(data, cuts, inspect))


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, len(VALID_STREAM) - 1), st.integers(0, 255)), min_size=1, max_size=4),
    truncate=st.integers(0, len(VALID_STREAM)),
    cuts=st.lists(st.integers(0, len(VALID_STREAM)), max_size=5),
    inspect=st.booleans(),
)
def test_fuzz_framer_mutated_streams(edits, truncate: int, cuts: list[int], inspect: bool):
    data = bytearray(VALID_STREAM)
    for position, value in edits:
        data[position] = value
    data = bytes(data[:truncate]) if truncate else bytes(data)
    _check_association_pdus(_framer_run(data, cuts, inspect))


@FUZZ
@given(cuts=st.lists(st.integers(0, len(VALID_STREAM)), max_size=12))
def test_fuzz_framer_chunking_does_not_change_events(cuts: list[int]):
    assert _framer_run(VALID_STREAM, cuts, True) == EXPECTED_EVENTS


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_parsers_random_bytes(data: bytes):
    for pdu_type, parser in PARSERS.items():
        for candidate in (data, struct.pack(">BBI", pdu_type, 0, len(data)) + data):
            try:
                parser(candidate)
            except _CLEAN_ERRORS:
                pass
    try:
        decode_command_set(data)
    except _CLEAN_ERRORS:
        pass


STORE_COMMAND = p_data_pdus(c_store_rq("1.2.3.4", pixel_bytes=256), 1, 16382)[0][12:]


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, len(STORE_COMMAND) - 1), st.integers(0, 255)), max_size=4),
       cut=st.integers(0, len(STORE_COMMAND)))
def test_fuzz_decode_command_set_mutations(edits, cut: int):
    data = bytearray(STORE_COMMAND)
    for position, value in edits:
        data[position] = value
    try:
        dataset = decode_command_set(bytes(data[:cut]))
    except _CLEAN_ERRORS:
        return
    assert all(tag.group == 0x0000 for tag in dataset.keys())


def _mutate(pdu: bytes, edits, cut: int, fix_length: bool) -> bytes:
    data = bytearray(pdu)
    for position, value in edits:
        data[position % len(data)] = value
    data = data[: max(cut, 1)]
    if fix_length and len(data) >= 6:
        data[2:6] = struct.pack(">I", len(data) - 6)
    return bytes(data)


@FUZZ
@given(
    which=st.sampled_from(["rq", "ac"]),
    edits=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 2000),
    fix_length=st.booleans(),
)
def test_fuzz_parsers_mutated_pdus(which: str, edits, cut: int, fix_length: bool):
    pdu = VALID_RQ if which == "rq" else VALID_AC
    parse, encode = ROUND_TRIPS[1 if which == "rq" else 2]
    data = _mutate(pdu, edits, cut or len(pdu), fix_length)
    try:
        parsed = parse(data)
    except _CLEAN_ERRORS:
        return
    assert parse(encode(parsed)) == parsed


def _tlv(item_types, values) -> st.SearchStrategy[bytes]:
    """An item (type, reserved, 2-byte length, value) whose length field is usually right."""
    def pack(parts: tuple[int, bytes, int]) -> bytes:
        item_type, value, skew = parts
        return struct.pack(">BBH", item_type, 0, max(0, min(0xFFFF, len(value) + skew))) + value
    return st.tuples(item_types, values, st.sampled_from([0, 0, 0, 0, 0, 1, -1, 4])).map(pack)


def _identity_value(parts: tuple[int, int, bytes, bytes, int]) -> bytes:
    kind, flag, primary, secondary, skew = parts
    primary_length = max(0, len(primary) + skew)
    return struct.pack(">BBH", kind, flag, primary_length) + primary + struct.pack(">H", len(secondary)) + secondary


_some_uid = st.one_of(st.sampled_from([VERIFICATION, ImplicitVRLittleEndian]).map(str.encode), st.binary(max_size=8))
_context_value = st.tuples(
    st.binary(max_size=4), st.lists(_tlv(st.sampled_from([0x30, 0x40, 0x41]), _some_uid), max_size=3)
).map(lambda parts: parts[0] + b"".join(parts[1]))
_user_value = st.lists(
    st.one_of(
        _tlv(st.sampled_from([0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A]), st.binary(max_size=12)),
        _tlv(st.just(0x58), st.tuples(st.integers(0, 6), st.integers(0, 2), st.binary(max_size=6),
                                      st.binary(max_size=6), st.sampled_from([0, 0, 1, -1])).map(_identity_value)),
        _tlv(st.just(0x59), st.binary(max_size=6).map(lambda b: struct.pack(">H", len(b)) + b)),
    ),
    max_size=4,
).map(b"".join)
_top_items = st.one_of(
    _tlv(st.just(0x10), _some_uid),
    _tlv(st.sampled_from([0x20, 0x21]), _context_value),
    _tlv(st.just(0x50), _user_value),
    _tlv(st.integers(0, 255), st.binary(max_size=6)),
)
_associate_pdus = st.tuples(
    st.sampled_from([1, 2]),
    st.one_of(st.just(VALID_RQ[6:74]), st.binary(min_size=68, max_size=68)),
    st.lists(_top_items, max_size=6),
    st.sampled_from([0, 0, 0, 1, -1]),
).map(lambda parts: struct.pack(">BBI", parts[0], 0, max(0, 68 + sum(map(len, parts[2])) + parts[3]))
      + parts[1] + b"".join(parts[2]))


@FUZZ
@given(pdu=_associate_pdus, cuts=st.lists(st.integers(0, 300), max_size=3))
def test_fuzz_structured_garbage_associate_pdus(pdu: bytes, cuts: list[int]):
    """Item trees with wrong lengths, empty and unknown items: clean errors or a stable parse."""
    parse, encode = ROUND_TRIPS[pdu[0]]
    try:
        parsed = parse(pdu)
    except _CLEAN_ERRORS:
        parsed = None
    if parsed is not None:
        assert parse(encode(parsed)) == parsed
    _check_association_pdus(_framer_run(pdu, cuts, False))


_uids = st.from_regex(r"[0-9]{1,3}(\.[0-9]{1,3}){0,8}", fullmatch=True)
_ae_titles = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=16)
_raw_user_items = st.builds(RawItem, st.sampled_from([0x53, 0x54, 0x56, 0x57, 0x5A, 0xFF]), st.binary(max_size=40))
_user_items_rq = st.one_of(
    st.builds(MaximumLength, st.integers(0, 0xFFFFFFFF)),
    st.builds(ImplementationClassUid, _uids),
    st.builds(ImplementationVersionName, st.text(st.characters(max_codepoint=0x7F), max_size=16)),
    st.builds(UserIdentityRQ, st.integers(0, 255), st.booleans(), st.binary(max_size=30), st.binary(max_size=30)),
    _raw_user_items,
)
_requests = st.builds(
    AssociateRequest,
    protocol_version=st.integers(0, 0xFFFF),
    called_ae_title=_ae_titles,
    calling_ae_title=_ae_titles,
    application_context_name=_uids,
    presentation_contexts=st.lists(
        st.builds(
            PresentationContextItemRQ, st.integers(0, 255), _uids, st.lists(_uids, min_size=1, max_size=3).map(tuple)
        ),
        min_size=1, max_size=4,
    ).map(tuple),
    user_information=st.one_of(st.none(), st.lists(_user_items_rq, max_size=6).map(tuple)),
    other_items=st.lists(
        st.builds(RawItem, st.sampled_from([0x21, 0x30, 0x60]), st.binary(max_size=20)), max_size=2
    ).map(tuple),
)
_accepts = st.builds(
    AssociateAccept,
    protocol_version=st.integers(0, 0xFFFF),
    called_ae_title=_ae_titles,
    calling_ae_title=_ae_titles,
    application_context_name=_uids,
    presentation_contexts=st.lists(
        st.builds(PresentationContextItemAC, st.integers(0, 255), st.integers(0, 255), st.none() | _uids), max_size=4
    ).map(tuple),
    user_information=st.one_of(
        st.none(),
        st.lists(
            st.one_of(
                st.builds(MaximumLength, st.integers(0, 0xFFFFFFFF)),
                st.builds(UserIdentityAC, st.binary(max_size=30)),
                _raw_user_items,
            ),
            max_size=4,
        ).map(tuple),
    ),
)


@FUZZ
@given(request=_requests, username=st.text(min_size=1, max_size=20))
def test_fuzz_structured_rq_round_trip(request: AssociateRequest, username: str):
    pdu = encode_associate_rq(request)
    assert parse_associate_rq(pdu) == request
    framed = feed_all(PduFramer(), [pdu])
    assert framed == [PduHeader(1, len(pdu) - 6), AssociationPdu(1, pdu), PduEnd(1)]
    changed = parse_associate_rq(encode_associate_rq(with_user_identity(request, username, True)))
    assert changed.user_identity == UserIdentityRQ(1, True, username.encode("utf-8"), b"")
    assert [item for item in changed.user_information if not isinstance(item, UserIdentityRQ)] == [
        item for item in request.user_information or () if not isinstance(item, UserIdentityRQ)
    ]


@FUZZ
@given(accept=_accepts)
def test_fuzz_structured_ac_round_trip(accept: AssociateAccept):
    pdu = encode_associate_ac(accept)
    assert parse_associate_ac(pdu) == accept
    assert encode_associate_ac(parse_associate_ac(pdu)) == pdu


# ------------------------------------------------------- bulk P-DATA-TF: the one-step path for data PDUs

def _p_data_pdu(*pdvs: tuple[int, int, bytes]) -> bytes:
    items = b"".join(struct.pack(">IBB", len(data) + 2, context, control) + data for context, control, data in pdvs)
    return struct.pack(">BxI", 4, len(items)) + items


@st.composite
def _bulk_streams(draw) -> bytes:
    """C-STORE-like traffic: per message a command, then a data set in fragments, sometimes two
    PDVs in one PDU, on interleaved contexts; small sizes so that data-set prefixes end mid-way."""
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        context = draw(st.sampled_from([1, 3, 5]))
        parts.append(_p_data_pdu((context, 0x03, bytes([context]) * draw(st.integers(0, 12)))))
        data_set = bytes((index * 7 + context) % 256 for index in range(draw(st.integers(0, 400))))
        fragment = draw(st.integers(1, 80))
        pieces = [data_set[i:i + fragment] for i in range(0, len(data_set), fragment)] or [b""]
        pdvs = [(context, 0x02 if i == len(pieces) - 1 else 0x00, piece) for i, piece in enumerate(pieces)]
        while pdvs:
            take = 2 if len(pdvs) > 1 and draw(st.booleans()) else 1
            parts.append(_p_data_pdu(*pdvs[:take]))
            pdvs = pdvs[take:]
    return b"".join(parts)


def _events_or_error(data: bytes, chunks: list[bytes], prefix: int, *,
                     quiet_data: bool = False) -> tuple[list, str | None]:
    framer = PduFramer(inspect_commands=True, data_set_prefix=prefix, quiet_data=quiet_data)
    events: list = []
    try:
        for chunk in chunks:
            events += framer.feed(chunk)
    except MalformedPduError as error:
        return events, str(error)
    return events, None


def _is_p_data_frame(event: object) -> bool:
    return isinstance(event, (PduHeader, PduEnd)) and event.pdu_type == 4


@FUZZ
@given(stream=_bulk_streams(), prefix=st.sampled_from([0, 1, 20, 64]),
       edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=2),
       cuts=st.lists(st.integers(0, 10_000), max_size=4))
def test_fuzz_whole_data_pdus_give_the_events_of_byte_by_byte_feeding(stream: bytes, prefix: int, edits, cuts):
    """Fed in chunks, whole data PDUs take the one-step path; fed a byte at a time, none can.
    Both must see the same stream: the same events, or the same error."""
    data = bytearray(stream)
    for position, value in edits:
        data[position % len(data)] = value
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    chunked = [bytes(data[a:b]) for a, b in itertools.pairwise(points)]
    one_by_one = [bytes(data[i:i + 1]) for i in range(len(data))]
    chunked_events, chunked_error = _events_or_error(bytes(data), chunked, prefix)
    single_events, single_error = _events_or_error(bytes(data), one_by_one, prefix)
    assert chunked_error == single_error
    if chunked_error is None:
        assert chunked_events == single_events


@FUZZ
@given(stream=_bulk_streams(), prefix=st.sampled_from([0, 1, 20, 64]),
       edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=2),
       cuts=st.lists(st.integers(0, 10_000), max_size=6))
def test_fuzz_quiet_data_leaves_out_only_data_pdu_headers_and_ends(stream: bytes, prefix: int, edits, cuts):
    """What a relay inspects (commands, data-set prefixes, association PDUs, errors) is the same
    with quiet_data; only some P-DATA-TF PduHeader/PduEnd events are left out, none added."""
    data = bytearray(stream)
    for position, value in edits:
        data[position % len(data)] = value
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    chunks = [bytes(data[a:b]) for a, b in itertools.pairwise(points)]
    events, error = _events_or_error(bytes(data), chunks, prefix)
    quiet_events, quiet_error = _events_or_error(bytes(data), chunks, prefix, quiet_data=True)
    assert quiet_error == error
    assert [e for e in quiet_events if not _is_p_data_frame(e)] == [e for e in events if not _is_p_data_frame(e)]
    kept = iter(events)
    assert all(any(e == other for other in kept) for e in quiet_events), "quiet events are not a subsequence"


def test_quiet_data_gives_no_events_for_a_bulk_transfers_data_pdus_however_read():
    """A command, then a data set in 17 PDUs of 64 bytes: with a 100-byte prefix, the first two are
    inspected (the prefix ends in the second) and the last ends the data set; the 14 between give
    no event, whether a read holds them whole or ends inside one (a relay's reads rarely end on a
    PDU boundary), unless it ends inside their first 12 bytes (their headers)."""
    data_set = bytes(range(256)) * 4 + bytes(64)
    command = _p_data_pdu((1, 0x03, b"cmd"))
    stream = command + b"".join(
        _p_data_pdu((1, 0x02 if i == 1024 else 0x00, data_set[i:i + 64])) for i in range(0, 1088, 64))
    passed_starts = [len(command) + 76 * n for n in range(2, 16)]  # 6 + 6 + 64 bytes each
    for read in (len(stream), 1000, 97, 70):
        framer = PduFramer(inspect_commands=True, data_set_prefix=100, quiet_data=True)
        events = [e for i in range(0, len(stream), read) for e in framer.feed(stream[i:i + read])]
        assert [e for e in events if not _is_p_data_frame(e)] == [CommandSet(1, b"cmd"),
                                                                   DataSetPrefix(1, data_set[:100])]
        headers_cut = sum(1 for start in passed_starts if read - start % read < 12)
        assert headers_cut < 14
        assert sum(isinstance(e, PduEnd) for e in events) == 4 + headers_cut, f"reads of {read} bytes"
        assert framer.at_boundary and framer.position == len(stream)


def test_quiet_data_still_reports_a_data_pdu_cut_short():
    """A data PDU taken in one step while a read ended inside it still counts as begun: the end of
    the stream there is an error that says how far it got."""
    stream = _p_data_pdu((1, 0x03, b"cmd")) + _p_data_pdu((1, 0x00, bytes(64))) + _p_data_pdu((1, 0x00, bytes(64)))
    framer = PduFramer(inspect_commands=True, quiet_data=True)
    framer.feed(stream[:-10])
    assert not framer.at_boundary and framer.remaining_in_pdu == 10
    with pytest.raises(MalformedPduError, match="stream ended inside a P-DATA-TF PDU after 66 of 76 bytes"):
        framer.end_of_stream()


def test_data_set_prefixes_are_taken_before_whole_pdus_pass_in_one_step():
    data_set = bytes(range(256)) * 4
    stream = _p_data_pdu((1, 0x03, b"cmd")) + b"".join(
        _p_data_pdu((1, 0x02 if i == 960 else 0x00, data_set[i:i + 64])) for i in range(0, 1024, 64))
    events = PduFramer(inspect_commands=True, data_set_prefix=100).feed(stream)
    assert [e for e in events if isinstance(e, DataSetPrefix)] == [DataSetPrefix(1, data_set[:100])]
    assert sum(isinstance(e, PduEnd) for e in events) == 17


# ------------------------------------- data-set prefixes: only of announced data sets, a few at once

ALL_CONTEXT_IDS = range(1, 256)


def c_store_command(message_id: int = 1, *, data_set: bool = True) -> bytes:
    """A C-STORE-RQ command set as pynetdicom encodes it; Command Data Set Type 0000H, or 0101H
    (no data set follows) with ``data_set=False``."""
    command = Dataset()
    command.CommandGroupLength = 0
    command.AffectedSOPClassUID = CT_IMAGE_STORAGE
    command.CommandField = 0x0001
    command.MessageID = message_id
    command.Priority = 0
    command.CommandDataSetType = 0x0000 if data_set else 0x0101
    command.AffectedSOPInstanceUID = f"1.2.3.{message_id}"
    return encode_dataset(command, True, True)


def relay_framer(**limits) -> PduFramer:
    """A framer as the relay makes one for each direction."""
    from dicom_card_agent.dicom.association import DATA_SET_PREFIX

    return PduFramer(inspect_commands=True, data_set_prefix=DATA_SET_PREFIX, quiet_data=True, **limits)


def test_data_no_command_announced_is_passed_without_being_kept():
    """A peer sends, on every presentation context ID, 65535 bytes of a data set that no command
    announced, and holds the connection: the agent kept 64 KiB of each, 16.7 MB per direction."""
    framer = relay_framer()
    fragment = b"\x08\x00\x10\x00" + bytes(65531)
    events = [e for context_id in ALL_CONTEXT_IDS for e in framer.feed(p_data((context_id, 0x00, fragment)))]
    assert framer.buffered_bytes == 0
    assert events == []  # passed in one step each, as the bulk of a transfer


def test_data_set_prefixes_are_kept_for_a_few_contexts_at_once():
    """Every context ID announces a data set and sends 65535 bytes of it, not its last fragment:
    the first DEFAULT_DATA_SET_PREFIXES_AT_ONCE keep their start; the others give an empty prefix at
    once (none of it kept) and pass. When kept ones end, their room is free for the next."""
    from dicom_card_agent.dicom.association import DATA_SET_PREFIX

    at_once = pdu_module.DEFAULT_DATA_SET_PREFIXES_AT_ONCE
    framer = relay_framer()

    def start(context_id: int) -> bytes:
        return bytes([context_id]) * 65535

    events = []
    for context_id in ALL_CONTEXT_IDS:
        events += framer.feed(p_data((context_id, 0x03, c_store_command(context_id)))
                              + p_data((context_id, 0x00, start(context_id))))
        assert framer.buffered_bytes <= at_once * DATA_SET_PREFIX
    assert framer.buffered_bytes == at_once * 65535
    assert [e for e in events if isinstance(e, DataSetPrefix)] == [
        DataSetPrefix(context_id, b"") for context_id in range(at_once + 1, 256)]
    assert [e for e in events if isinstance(e, CommandSet)] == [
        CommandSet(context_id, c_store_command(context_id)) for context_id in ALL_CONTEXT_IDS]
    ends = framer.feed(b"".join(p_data((context_id, 0x02, b"end")) for context_id in ALL_CONTEXT_IDS))
    assert [e for e in ends if isinstance(e, DataSetPrefix)] == [
        DataSetPrefix(context_id, (start(context_id) + b"end")[:DATA_SET_PREFIX])
        for context_id in range(1, at_once + 1)]
    assert framer.buffered_bytes == 0
    again = framer.feed(p_data((200, 0x03, c_store_command(200))) + p_data((200, 0x02, b"short data set")))
    assert [e for e in again if isinstance(e, DataSetPrefix)] == [DataSetPrefix(200, b"short data set")]


def test_a_command_without_a_data_set_announces_none():
    """Command Data Set Type 0101H: data on its context after it (a peer's error) is not kept."""
    framer = relay_framer()
    events = framer.feed(p_data((1, 0x03, c_store_command(data_set=False))) + p_data((1, 0x00, bytes(1000)))
                         + p_data((1, 0x02, bytes(10))))
    assert [e for e in events if isinstance(e, DataSetPrefix)] == []
    assert framer.buffered_bytes == 0


def test_a_data_set_cut_short_by_the_next_command_is_dropped():
    """PS3.7 sends a message's data set whole before the next message: a command in the middle of
    a data set starts afresh, and the next data set's prefix holds only its own bytes."""
    framer = relay_framer()
    events = framer.feed(p_data((1, 0x03, c_store_command(1))) + p_data((1, 0x00, b"first, cut short"))
                         + p_data((1, 0x03, c_store_command(2))) + p_data((1, 0x02, b"second")))
    assert [e for e in events if isinstance(e, DataSetPrefix)] == [DataSetPrefix(1, b"second")]
    assert framer.buffered_bytes == 0


@st.composite
def _messages_on_contexts(draw) -> tuple[list[tuple[int, int, bytes]], dict[int, list[bytes]]]:
    """PDVs of C-STORE-like messages on a few contexts, interleaved across contexts (each context's
    in order), and per context the data sets its commands announced. Some commands say no data set
    follows and are followed by data anyway (a peer's error); some data sets are empty."""
    queues: dict[int, list[tuple[int, int, bytes]]] = {}
    announced: dict[int, list[bytes]] = {}
    for context_id in draw(st.lists(st.sampled_from([1, 3, 5, 7, 9]), min_size=1, max_size=5, unique=True)):
        queue = queues[context_id] = []
        announced[context_id] = []
        for message_id in range(1, draw(st.integers(1, 3)) + 1):
            announcing = draw(st.booleans())
            queue.append((context_id, 0x03, c_store_command(message_id, data_set=announcing)))
            data_set = bytes((message_id * 31 + context_id + i) % 256 for i in range(draw(st.integers(0, 90))))
            if announcing:
                announced[context_id].append(data_set)
            elif not data_set:
                continue
            size = draw(st.integers(1, 40))
            pieces = [data_set[i:i + size] for i in range(0, len(data_set), size)] or [b""]
            queue += [(context_id, 0x02 if i == len(pieces) - 1 else 0x00, piece) for i, piece in enumerate(pieces)]
    pdvs = []
    while queues:
        context_id = draw(st.sampled_from(sorted(queues)))
        pdvs.append(queues[context_id].pop(0))
        if not queues[context_id]:
            del queues[context_id]
    return pdvs, announced


@FUZZ
@given(messages=_messages_on_contexts(), prefix=st.sampled_from([1, 20, 64]), at_once=st.integers(1, 3),
       cuts=st.lists(st.integers(0, 5_000), max_size=6))
def test_fuzz_only_announced_data_sets_are_kept_and_never_more_than_the_room(messages, prefix: int, at_once: int,
                                                                            cuts: list[int]):
    """Each data set a command announced gives one prefix, its true start or, when other contexts
    held all the room as it began, an empty one; data no command announced gives none; and the
    prefixes held never pass ``at_once`` times ``prefix`` bytes, however the stream is read."""
    pdvs, announced = messages
    stream = b"".join(p_data(pdv) for pdv in pdvs)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    framer = PduFramer(inspect_commands=True, data_set_prefix=prefix, prefixes_at_once=at_once, quiet_data=True)
    # Besides the prefixes: a PDV item header and a command set, each partly read.
    other_bytes = 6 + max(len(fragment) for _, control, fragment in pdvs if control & 0x01)
    events = []
    for a, b in itertools.pairwise(points):
        events += framer.feed(stream[a:b])
        assert framer.buffered_bytes <= at_once * prefix + other_bytes
    assert framer.at_boundary and framer.buffered_bytes == 0
    for context_id, data_sets in announced.items():
        got = [e.data for e in events if isinstance(e, DataSetPrefix) and e.context_id == context_id]
        expected = [data_set[:prefix] for data_set in data_sets]
        assert len(got) == len(expected)
        assert all(data in (start, b"") for data, start in zip(got, expected, strict=True))
        if len(announced) <= at_once:  # room for every context at once: every start is kept
            assert got == expected


def _command_element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


@FUZZ
@given(elements=st.lists(st.tuples(st.sampled_from([0x0000, 0x0002, 0x0100, 0x0110, 0x0800, 0x0900, 0x1000]),
                                   st.sampled_from([b"\x01\x01", b"\x00\x00", b"\xfe\xfe", b"\x01", b"\x01\x01\x00",
                                                    b"1.2.3\x00", b""])), max_size=8),
       edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=2),
       cut=st.integers(0, 200), stray=st.binary(max_size=9))
def test_fuzz_the_framer_reads_the_data_set_type_as_the_association_does(elements, edits, cut: int, stray: bytes):
    """The framer's walk over a command set's element headers says whether a data set follows, as
    read_command_fields does (a broken structure counts as announcing one); it never raises."""
    from dicom_card_agent.dicom.pdu import announces_data_set, read_command_fields

    data = bytearray(b"".join(_command_element(element, value) for element, value in elements))
    for position, value in edits:
        if data:
            data[position % len(data)] = value
    for command_set in (bytes(data), bytes(data[:cut]), bytes(data) + stray):
        try:
            expected = read_command_fields(command_set).has_data_set
        except MalformedCommandSetError:
            try:
                pdu_module._check_command_structure(command_set)
            except MalformedCommandSetError:
                assert announces_data_set(command_set) is True  # a broken structure
            continue  # a broken value: the relay aborts the association, what is kept meanwhile is bounded
        assert announces_data_set(command_set) is expected


@pytest.mark.parametrize("command_set, announced", [
    (b"", True),  # no Command Data Set Type: as the requests that always carry one
    (_command_element(0x0800, b"\x01\x01"), False),
    (_command_element(0x0800, b"\x00\x00"), True),
    (_command_element(0x0800, b"\x01\x01") + _command_element(0x0800, b"\x02\x02"), True),  # the last counts
    (_command_element(0x0800, b"\x01\x01") + b"\x00", True),  # a stray byte: no command set
    (struct.pack("<HHI", 0x0008, 0x0800, 2) + b"\x01\x01", True),  # outside group 0000
    (struct.pack("<HHI", 0x0000, 0x0800, 0xFFFFFFFF) + b"\x01\x01", True),  # undefined length
])
def test_the_data_set_type_the_framer_reads(command_set: bytes, announced: bool):
    from dicom_card_agent.dicom.pdu import announces_data_set

    assert announces_data_set(command_set) is announced


@FUZZ
@given(pdvs=st.lists(st.tuples(st.sampled_from([1, 3, 5, 7]), st.sampled_from([0x00, 0x01, 0x02, 0x03]),
                               st.binary(max_size=40)), min_size=1, max_size=12),
       accepted=st.frozensets(st.sampled_from([1, 3, 5, 7])), cuts=st.lists(st.integers(0, 1_000), max_size=6),
       one_pdv_per_pdu=st.booleans(), acceptor=st.booleans())
def test_fuzz_a_pdv_on_a_context_not_accepted_is_malformed_however_the_stream_is_read(
        pdvs: list[tuple[int, int, bytes]], accepted: frozenset[int], cuts: list[int], one_pdv_per_pdu: bool,
        acceptor: bool):
    """PS3.8 9.3.5: a PDV belongs to an accepted presentation context; the agent passed a PDV on any
    other context on, to a peer that never agreed to it. The acceptor's framer reads the accepted
    contexts from the A-ASSOCIATE-AC in its stream (which may come in one read with what follows);
    the requestor's is told them. One PDV per PDU is the shape the framer's fast path takes whole;
    several per PDU, its general path."""
    stream = b"".join(p_data(pdv) for pdv in pdvs) if one_pdv_per_pdu else p_data(*pdvs)
    framer = PduFramer(inspect_commands=True, data_set_prefix=20, accepted_contexts=frozenset(), quiet_data=True)
    if acceptor:  # every context of 1-7 answered, those not in ``accepted`` with "transfer-syntaxes-not-supported"
        stream = encode_associate_ac(AssociateAccept(1, "PACS", "VIEWER", "1.2.840.10008.3.1.1.1", tuple(
            PresentationContextItemAC(context_id, 0 if context_id in accepted else 4, "1.2.840.10008.1.2")
            for context_id in (1, 3, 5, 7)))) + stream
    else:
        framer.accept_contexts(accepted)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    stranger = next((context_id for context_id, _, _ in pdvs if context_id not in accepted), None)
    try:
        for a, b in itertools.pairwise(points):
            framer.feed(stream[a:b])
    except MalformedPduError as error:
        assert stranger is not None
        assert f"a PDV item on presentation context {stranger}, which the association did not accept" in str(error)
        assert framer.failed
    else:
        assert stranger is None and framer.at_boundary


def test_before_the_answer_no_context_is_accepted_and_the_error_says_which_are() -> None:
    framer = PduFramer(inspect_commands=True, accepted_contexts=frozenset())
    with pytest.raises(MalformedPduError, match=r"context 1, which the association did not accept \(accepted: none\)"):
        framer.feed(p_data((1, 0x03, b"")))
    framer = PduFramer(inspect_commands=True)
    framer.accept_contexts(range(1, 40, 2))
    with pytest.raises(MalformedPduError, match=r"context 2, .* \(accepted: 1, 3, 5, 7, 9, 11, 13, 15 and 12 more\)"):
        framer.feed(p_data((2, 0x00, b"x" * 100)))
