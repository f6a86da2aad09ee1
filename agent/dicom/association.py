"""What the agent knows and decides about one association, from the PDUs the relay sees; no I/O.

The relay hands :class:`Association` the application's A-ASSOCIATE-RQ (whole), the PACS's answer
(A-ASSOCIATE-AC or -RJ), the command sets of both directions and the end (A-RELEASE, A-ABORT).
It answers with a decision for the request (forward these bytes, or refuse with this
A-ASSOCIATE-RJ) and keeps what the log and the audit trail report: calling and called AE titles,
accepted abstract syntaxes, the SOP Instances stored (by either side: C-GET sub-operations come
from the PACS) and how the receiver answered each one, and the Identifier of each C-FIND.

A C-STORE is kept from its request until its response, and no longer: the response hands it to the
caller (the relay batches it into the audit trail, agent/tunnel/transfers.py); what is left at the
end was never answered. Each response finds its request in O(1), and at most
``MAX_UNANSWERED_C_STORES`` requests wait at once, so a long association costs neither memory nor
time per C-STORE that grows with the number it carried.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
import warnings
from dataclasses import dataclass, field

from dicom_card_agent.dicom.pdu import (
    AcseRejectReason,
    AssociateRequest,
    InvalidPduFieldError,
    MalformedPduError,
    PduLimitError,
    PresentationContextResult,
    RejectResult,
    RejectSource,
    ServiceUserRejectReason,
    a_associate_rj,
    ae_title_problem,
    encode_associate_rq,
    parse_associate_ac,
    parse_associate_rj,
    parse_associate_rq,
    read_command_fields,
    with_user_identity,
)
from dicom_card_agent.dicom.rules import AssociationRules, ExistingUserIdentity, UserIdentityMode
from dicom_card_agent.logline import printable

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
STUDY_INSTANCE_UID = 0x0020000D
PATIENT_ID = 0x00100020
DATA_SET_PREFIX = 64 * 1024  # patient and study come early; private groups 0009 can push them back
SHOWN_ABSTRACT_SYNTAXES = 6  # in the log line; storage SCUs often propose a hundred
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_FIND_RQ = 0x0020
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})  # success and the C-STORE warnings (PS3.4 B.2.3)
# C-STORE requests of one association waiting for their responses. Peers wait for each response
# (the asynchronous operations window, PS3.7 D.3.3.3, is 1 unless negotiated, and small when it is);
# thousands waiting is a broken or hostile peer. ~0.5 KB each: at most ~2 MB per association.
MAX_UNANSWERED_C_STORES = 4096


class UnansweredLimitError(PduLimitError):
    """More C-STORE requests wait for their responses than the agent follows for the audit trail."""


@dataclass(frozen=True)
class Forward:
    """Send ``pdu`` to the PACS (the request as received, or with the card's user identity)."""

    pdu: bytes
    user_identity: str | None  # the username the agent put into the request, if it did


@dataclass(frozen=True)
class Refuse:
    """Answer the application with ``reject_pdu``; nothing reaches the PACS."""

    reject_pdu: bytes
    reason: str


@dataclass(slots=True)  # thousands may wait for their responses at once
class StoredInstance:
    """A C-STORE seen on the association; ``status`` is None until the PACS answered."""

    sop_class_uid: str
    sop_instance_uid: str
    message_id: int
    context_id: int = 0
    status: int | None = None
    study_uid: str = ""  # from the start of its data set, when readable
    patient_id: str = ""
    patient_name: str = ""

    from_requestor: bool = True  # the association requestor sent the C-STORE-RQ (else a C-GET sub-operation)
    reported: bool = False  # handed to the audit trail already

    @property
    def stored(self) -> bool:
        return self.status in STORED_STATUSES


@dataclass
class Query:
    """A C-FIND request: its SOP Class and its Identifier (the query keys) as the requestor sent
    them, in the transfer syntax of its presentation context; ``identifier`` is empty until the
    data set has passed."""

    sop_class_uid: str
    message_id: int
    context_id: int
    transfer_syntax: str = ""
    identifier: bytes = b""
    truncated: bool = False  # longer than DATA_SET_PREFIX: only its start was kept (or none of it)
    patient_id: str = ""  # the Patient ID / Patient's Name keys, when given without wildcards
    patient_name: str = ""


@dataclass
class Association:
    """One association as seen by a tunnel; create one per local connection."""

    rules: AssociationRules
    username: str | None = None  # from the card's certificate, when the rules ask for one
    request: AssociateRequest | None = None
    calling_ae_title: str = ""
    called_ae_title: str = ""
    user_identity_sent: str | None = None
    accepted_abstract_syntaxes: dict[int, str] = field(default_factory=dict)
    transfer_syntaxes: dict[int, str] = field(default_factory=dict)  # accepted, per presentation context
    answer: str = "none"  # none | accepted | rejected
    end: str = "open"  # open | released | rejected | aborted by the requestor | aborted by the acceptor
    c_stores_requested: int = 0  # C-STORE requests seen, either way
    c_stores_stored: int = 0  # of them, answered with success or a warning
    # The C-STOREs whose responses are still to come, by (sent by the requestor, Message ID): the
    # oldest request with that ID.
    _unanswered: dict[tuple[bool, int], StoredInstance] = field(default_factory=dict, repr=False)
    # Later unanswered requests with the same key, oldest first. PS3.7 wants a Message ID unique among
    # the outstanding ones; a peer that reuses one still gets each response matched: to the request
    # whose SOP Instance UID the response names, else to the oldest, which a PACS answers first.
    _later: dict[tuple[bool, int], list[StoredInstance]] = field(default_factory=dict, repr=False)
    _waiting: int = field(default=0, repr=False)  # unanswered requests, in both of the above
    # The command whose data set comes next, per (sent by the requestor, presentation context).
    _awaiting: dict[tuple[bool, int], StoredInstance | Query] = field(default_factory=dict, repr=False)

    @property
    def unanswered(self) -> list[StoredInstance]:
        """The C-STOREs not answered (yet): at the association's end, those the audit trail reports
        as never answered. Answered ones are not kept here; :meth:`on_command` hands each out."""
        return [*self._unanswered.values(), *(i for later in self._later.values() for i in later)]

    # -- the application's request ---------------------------------------------------------

    def on_request(self, pdu: bytes) -> Forward | Refuse:
        """Decide about the application's A-ASSOCIATE-RQ; raises MalformedPduError on a broken one."""
        request = parse_associate_rq(pdu)
        self.request = request
        self.calling_ae_title, self.called_ae_title = request.calling_ae_title, request.called_ae_title
        malformed_title = _ae_title_refusal(request)
        if malformed_title is not None:
            return malformed_title
        rules = self.rules
        if not _allowed(request.calling_ae_title.strip(), rules.allowed_calling_ae_titles):
            return Refuse(a_associate_rj(RejectResult.REJECTED_PERMANENT, RejectSource.SERVICE_USER,
                                         ServiceUserRejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED),
                          f"calling AE title {request.calling_ae_title!r} is not in allowed_calling_ae_titles")
        if not _allowed(request.called_ae_title.strip(), rules.allowed_called_ae_titles):
            return Refuse(a_associate_rj(RejectResult.REJECTED_PERMANENT, RejectSource.SERVICE_USER,
                                         ServiceUserRejectReason.CALLED_AE_TITLE_NOT_RECOGNIZED),
                          f"called AE title {request.called_ae_title!r} is not in allowed_called_ae_titles")
        if rules.user_identity is UserIdentityMode.OFF:
            return Forward(pdu, None)
        if request.user_identity is not None:
            if rules.existing_user_identity is ExistingUserIdentity.KEEP:
                return Forward(pdu, None)
            if rules.existing_user_identity is ExistingUserIdentity.REJECT:
                return Refuse(a_associate_rj(RejectResult.REJECTED_PERMANENT, RejectSource.SERVICE_USER,
                                             ServiceUserRejectReason.NO_REASON_GIVEN),
                              "the application sent its own User Identity and the tunnel asserts the card's "
                              "(user_identity_existing = \"reject\")")
        if not self.username:
            raise ValueError("user_identity = \"username\" needs the card's username")
        try:
            pdu = encode_associate_rq(with_user_identity(request, self.username,
                                                         self.rules.positive_response_requested))
        except InvalidPduFieldError as error:
            # A legal request whose User Information item has no room left for the card's User
            # Identity (its Item-length is 2 bytes): it cannot be sent as the tunnel must send it.
            return Refuse(a_associate_rj(RejectResult.REJECTED_PERMANENT, RejectSource.SERVICE_PROVIDER_ACSE,
                                         AcseRejectReason.NO_REASON_GIVEN),
                          f"the card's User Identity does not fit into the A-ASSOCIATE-RQ (user_identity = "
                          f"\"username\"): {error}")
        self.user_identity_sent = self.username
        return Forward(pdu, self.username)

    # -- the PACS's answer and the end -------------------------------------------------------

    def on_accept(self, pdu: bytes) -> None:
        accept = parse_associate_ac(pdu)
        proposed = {pc.context_id: pc.abstract_syntax for pc in self.request.presentation_contexts} \
            if self.request else {}
        unproposed = sorted({pc.context_id for pc in accept.presentation_contexts} - proposed.keys())
        if unproposed:  # PS3.8 9.3.3.2: the answer is for the contexts proposed, no others
            raise MalformedPduError(f"its A-ASSOCIATE-AC answers presentation context "
                                    f"{', '.join(map(str, unproposed))}, which the A-ASSOCIATE-RQ did not propose")
        accepted = [pc for pc in accept.presentation_contexts if pc.result == PresentationContextResult.ACCEPTANCE]
        self.accepted_abstract_syntaxes = {pc.context_id: proposed.get(pc.context_id, "?") for pc in accepted}
        self.transfer_syntaxes = {pc.context_id: pc.transfer_syntax or "" for pc in accepted}
        self.answer = "accepted"

    def on_reject(self, pdu: bytes) -> str:
        self.answer = "rejected"
        self.end = "rejected"
        return parse_associate_rj(pdu).describe()

    # -- DIMSE ---------------------------------------------------------------------------------

    def on_command(self, command_set: bytes, from_requestor: bool, context_id: int = 0) -> StoredInstance | None:
        """Note C-STORE requests (from either side: C-GET sub-operations come from the acceptor),
        their responses, and C-FIND requests. Returns the instance a C-STORE response answered."""
        command = read_command_fields(command_set)
        if command.command_field == C_STORE_RQ:
            instance = StoredInstance(command.affected_sop_class_uid, command.affected_sop_instance_uid,
                                      command.message_id or 0, context_id, from_requestor=from_requestor)
            self._note_request(instance)
            self._await_data_set(command.has_data_set, from_requestor, context_id, instance)
        elif command.command_field == C_STORE_RSP:
            # A response answers a request of the other side (C-GET: the acceptor stores).
            responded_to = command.message_id_being_responded_to
            answered = None if responded_to is None else self._answer((not from_requestor, responded_to),
                                                                       command.affected_sop_instance_uid)
            if answered is not None:
                answered.status = 0xFFFF if command.status is None else command.status
                if answered.stored:
                    self.c_stores_stored += 1
                return answered
        elif command.command_field == C_FIND_RQ and from_requestor:
            query = Query(command.affected_sop_class_uid, command.message_id or 0, context_id,
                          self.transfer_syntaxes.get(context_id, ""))
            self._await_data_set(command.has_data_set, from_requestor, context_id, query)
        return None

    def _note_request(self, instance: StoredInstance) -> None:
        if self._waiting >= MAX_UNANSWERED_C_STORES:
            raise UnansweredLimitError(
                f"{self._waiting + 1} C-STORE requests would wait for their responses at once: the agent follows "
                f"at most {MAX_UNANSWERED_C_STORES} for the audit trail (a peer waits for each response, or for the "
                "few its asynchronous operations window allows)")
        self.c_stores_requested += 1
        self._waiting += 1
        key = (instance.from_requestor, instance.message_id)
        if key in self._unanswered:
            self._later.setdefault(key, []).append(instance)
        else:
            self._unanswered[key] = instance

    def _answer(self, key: tuple[bool, int], sop_instance_uid: str) -> StoredInstance | None:
        """The request a response with ``key`` answers, no longer kept; None if none waits. Only
        when a Message ID was reused does ``sop_instance_uid`` (the response's, if it names one)
        choose among the requests: a scan of those with the reused ID."""
        oldest = self._unanswered.get(key)
        if oldest is None:
            return None
        self._waiting -= 1
        later = self._later.get(key)
        if not later:
            del self._unanswered[key]
            return oldest
        named = None
        if sop_instance_uid and oldest.sop_instance_uid != sop_instance_uid:
            named = next((n for n, i in enumerate(later) if i.sop_instance_uid == sop_instance_uid), None)
        if named is None:
            answered, self._unanswered[key] = oldest, later.pop(0)
        else:
            answered = later.pop(named)
        if not later:
            del self._later[key]
        return answered

    def _await_data_set(self, has_data_set: bool, from_requestor: bool, context_id: int,
                        command: StoredInstance | Query) -> None:
        if has_data_set:
            self._awaiting[(from_requestor, context_id)] = command
        else:
            self._awaiting.pop((from_requestor, context_id), None)

    def on_data_set_prefix(self, prefix: bytes, context_id: int, from_requestor: bool = True) -> Query | None:
        """The start of the data set that follows a command on ``context_id``: the patient and study
        of a C-STORE, the Identifier of a C-FIND (then returned, complete)."""
        command = self._awaiting.pop((from_requestor, context_id), None)
        transfer_syntax = self.transfer_syntaxes.get(context_id, "")
        if isinstance(command, StoredInstance):
            command.study_uid, command.patient_id, command.patient_name = patient_and_study(prefix, transfer_syntax)
        elif isinstance(command, Query):
            command.identifier = prefix
            # Empty: the framer had no room to keep any of it (see DataSetPrefix).
            command.truncated = not prefix or len(prefix) >= DATA_SET_PREFIX
            command.patient_id, command.patient_name = query_patient(prefix, transfer_syntax)
            return command
        return None

    # -- what the log says ---------------------------------------------------------------------

    def describe_request(self) -> str:
        """``CALLING -> CALLED``, escaped: the titles are the peer's text (see :mod:`agent.logline`)."""
        return printable(f"{self.calling_ae_title or '?'} -> {self.called_ae_title or '?'}")

    def describe_accept(self) -> str:
        proposed = len(self.request.presentation_contexts) if self.request else 0
        names = sorted({_uid_name(uid) for uid in self.accepted_abstract_syntaxes.values()})
        shown = ", ".join(names[:SHOWN_ABSTRACT_SYNTAXES]) or "none"
        if len(names) > SHOWN_ABSTRACT_SYNTAXES:
            shown += f" and {len(names) - SHOWN_ABSTRACT_SYNTAXES} more abstract syntaxes"
        identity = f"; user identity {self.user_identity_sent!r}" if self.user_identity_sent else ""
        return (f"association {self.describe_request()} accepted, {len(self.accepted_abstract_syntaxes)} of "
                f"{proposed} presentation contexts: {shown}{identity}")

    def describe_instances(self) -> str:
        if not self.c_stores_requested:
            return ""
        return f"; {self.c_stores_stored} of {self.c_stores_requested} instances stored"


def patient_and_study(prefix: bytes, transfer_syntax: str) -> tuple[str, str, str]:
    """(Study Instance UID, Patient ID, Patient's Name) from the start of a data set; blanks where
    unreadable (a deflated transfer syntax, the attributes beyond the prefix, a broken data set):
    the audit trail then says it did not see them, it never guesses."""
    return _read_start(prefix, transfer_syntax, STUDY_INSTANCE_UID)


def _read_start(prefix: bytes, transfer_syntax: str, last_tag: int) -> tuple[str, str, str]:
    """(Study Instance UID, Patient ID, Patient's Name) of the attributes up to ``last_tag``."""
    from io import BytesIO

    from pydicom.filereader import read_dataset

    if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        return "", "", ""
    tags: list[int] = []

    def stop_when(tag: int, vr: object, length: int) -> bool:
        tags.append(tag)
        return tag > last_tag

    try:
        with warnings.catch_warnings():  # the application's data set quirks are not the agent's to report
            warnings.simplefilter("ignore")
            dataset = read_dataset(BytesIO(prefix), is_implicit_VR=transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN,
                                   is_little_endian=transfer_syntax != EXPLICIT_VR_BIG_ENDIAN, stop_when=stop_when)
            read = (str(dataset.get("StudyInstanceUID", "") or ""), str(dataset.get("PatientID", "") or ""),
                    str(dataset.get("PatientName", "") or ""))
    except Exception:  # any garbage: pydicom fails in many ways, all meaning "not readable"
        return "", "", ""
    # PS3.5 7.1: each tag once, in ascending order. pydicom keeps a repeated tag's last value, DCMTK
    # (and the PACS built on it) the first: which patient the PACS stored is then unknown.
    if any(earlier >= later for earlier, later in itertools.pairwise(tags)):
        return "", "", ""
    return read


def query_patient(identifier: bytes, transfer_syntax: str) -> tuple[str, str]:
    """(Patient ID, Patient's Name) a C-FIND Identifier asks for, each blank unless given as a
    value without wildcards (``*``, ``?``): a pattern names no patient."""
    patient_id, patient_name = _read_start(identifier, transfer_syntax, PATIENT_ID)[1:]
    return tuple("" if "*" in value or "?" in value else value  # type: ignore[return-value]
                 for value in (patient_id, patient_name))


def _ae_title_refusal(request: AssociateRequest) -> Refuse | None:
    """The A-ASSOCIATE-RJ for a request whose Calling or Called AE title breaks PS3.5/PS3.8: such
    a title (a line feed, an escape sequence) is refused before it reaches the PACS or the log."""
    for title, what, reason in (
            (request.calling_ae_title, "calling", ServiceUserRejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED),
            (request.called_ae_title, "called", ServiceUserRejectReason.CALLED_AE_TITLE_NOT_RECOGNIZED)):
        problem = ae_title_problem(title)
        if problem is not None:
            return Refuse(a_associate_rj(RejectResult.REJECTED_PERMANENT, RejectSource.SERVICE_USER, reason),
                          f"{what} AE title '{printable(title)}' {problem}")
    return None


def _allowed(title: str, patterns: tuple[str, ...]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(title, pattern) for pattern in patterns)


def load_pydicom() -> None:
    """Import the parts of pydicom the relays use, which are imported where used so that commands
    that never read a data set start quickly. A card session calls this once, in a thread of its own
    while the PIN is asked for, and waits for it before its first connection: the first association
    no longer waits ~50 ms for the import, and two relays that would import pydicom at the same
    moment (an outbound C-MOVE and its inbound C-STOREs) got a partially initialised module
    ("cannot import name 'dcmread'"): pydicom's modules import each other, and Python's import
    locks do not order two threads' first imports of such modules."""
    import pydicom.dataset  # noqa: F401
    import pydicom.filereader  # noqa: F401
    import pydicom.uid  # noqa: F401


_UID = re.compile(r"[0-9.]{1,64}")  # PS3.5 9.1: what a UID may be
SHOWN_TEXT = 64  # characters of an abstract syntax that is no UID, in the log line


def _uid_name(uid: str) -> str:
    """The standard's name for ``uid``, or ``uid`` itself (cut at SHOWN_TEXT characters when it is
    no UID: a peer's text, which pydicom would also quote whole in a warning of its own, one for
    each of up to 128 abstract syntaxes of 64 KB)."""
    if not _UID.fullmatch(uid):
        return uid if len(uid) <= SHOWN_TEXT else f"{uid[:SHOWN_TEXT]}... ({len(uid) - SHOWN_TEXT} more characters)"
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else uid


__all__ = ["Association", "Forward", "MalformedPduError", "Query", "Refuse", "StoredInstance", "UnansweredLimitError"]
