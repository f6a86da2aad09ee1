"""DICOM Upper Layer PDUs (PS3.8 section 9.3), sans-IO: framing, inspection, parsing, building.

Nothing here touches a socket, a thread or a clock. The relay feeds the bytes it read from one
direction of a connection to a :class:`PduFramer` and gets back events: where a PDU starts and
ends, every association PDU as a whole (A-ASSOCIATE-RQ/AC/RJ, A-RELEASE-RQ/RP, A-ABORT), and,
when asked, the command sets inside P-DATA-TF PDUs. P-DATA-TF payloads are never buffered: a
chunk that lies inside a data-set fragment costs a few additions, whatever its size.

The parsers turn A-ASSOCIATE-RQ/AC PDUs into frozen dataclasses and back, so the relay can put
its own User Identity sub-item (58H) into a request (:func:`with_user_identity`). The builders
make the PDUs the relay sends on its own: A-ASSOCIATE-RJ, A-ABORT, A-RELEASE-RQ/RP.

Errors: bytes that break PS3.8 raise :class:`MalformedPduError` (message for a log reader);
values that cannot be encoded raise :class:`InvalidPduFieldError`, which is also a ValueError.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Container, Iterable
from dataclasses import dataclass, field, replace
from enum import IntEnum
from io import BytesIO
from typing import TYPE_CHECKING, ClassVar, Union

from dicom_card_agent.errors import CardAgentError

if TYPE_CHECKING:  # pydicom is imported only when a command set is decoded
    from pydicom.dataset import Dataset

# --------------------------------------------------------------------------------------- errors


class PduError(CardAgentError):
    """Something about a DICOM Upper Layer PDU is wrong."""


class MalformedPduError(PduError):
    """Received bytes do not form a PDU as PS3.8 defines it (or exceed a configured limit)."""


class PduLimitError(MalformedPduError):
    """A PDU or command set is larger than the limit the agent is configured to hold in memory."""


class MalformedCommandSetError(MalformedPduError):
    """A reassembled command set is not an Implicit VR Little Endian group 0000 data set."""


class InvalidPduFieldError(PduError, ValueError):
    """A value handed to a builder or encoder cannot be encoded into a valid PDU."""


# ------------------------------------------------------------------------------------ constants


class PduType(IntEnum):
    """PDU-type values (PS3.8 table 9-1)."""

    A_ASSOCIATE_RQ = 0x01
    A_ASSOCIATE_AC = 0x02
    A_ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    A_RELEASE_RQ = 0x05
    A_RELEASE_RP = 0x06
    A_ABORT = 0x07


# Module-level aliases, spelled as PS3.8 names the PDUs.
A_ASSOCIATE_RQ = PduType.A_ASSOCIATE_RQ
A_ASSOCIATE_AC = PduType.A_ASSOCIATE_AC
A_ASSOCIATE_RJ = PduType.A_ASSOCIATE_RJ
P_DATA_TF = PduType.P_DATA_TF
A_RELEASE_RQ = PduType.A_RELEASE_RQ
A_RELEASE_RP = PduType.A_RELEASE_RP
A_ABORT = PduType.A_ABORT

_PDU_NAMES = {
    PduType.A_ASSOCIATE_RQ: "A-ASSOCIATE-RQ",
    PduType.A_ASSOCIATE_AC: "A-ASSOCIATE-AC",
    PduType.A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
    PduType.P_DATA_TF: "P-DATA-TF",
    PduType.A_RELEASE_RQ: "A-RELEASE-RQ",
    PduType.A_RELEASE_RP: "A-RELEASE-RP",
    PduType.A_ABORT: "A-ABORT",
}


def pdu_type_name(pdu_type: int) -> str:
    """The PS3.8 name of a PDU type (``A-ASSOCIATE-RQ``), or its hex value if unknown."""
    name = _PDU_NAMES.get(pdu_type)  # type: ignore[call-overload]
    return name if name is not None else f"0x{pdu_type:02X}"


PDU_HEADER_LENGTH = 6
"""PDU-type, reserved byte, 4-byte PDU-length."""

DEFAULT_MAX_ASSOCIATION_PDU_LENGTH = 1 << 20
"""Largest A-ASSOCIATE-RQ/AC PDU-length the framer holds in memory by default (1 MiB)."""

DEFAULT_MAX_COMMAND_SET_LENGTH = 1 << 20
"""Largest total of not yet complete command-set bytes the inspector holds by default (1 MiB)."""

DEFAULT_DATA_SET_PREFIXES_AT_ONCE = 4
# Every presentation context ID a PDV item can carry: what an inspector takes until it is told which
# contexts the association accepted (a range, so that the per-PDU check stays one ``in``).
ANY_CONTEXT_ID = range(256)
"""Data sets whose first bytes the inspector keeps at the same time, by default; with 64 KiB
prefixes at most 256 KiB per direction. A peer sends one message at a time (or a few, with an
asynchronous operations window, PS3.7 D.3.3.3); data sets beyond these pass without being kept."""

_FIXED_PDU_LENGTHS = {
    PduType.A_ASSOCIATE_RJ: 4,
    PduType.A_RELEASE_RQ: 4,
    PduType.A_RELEASE_RP: 4,
    PduType.A_ABORT: 4,
}
_ASSOCIATE_FIXED_LENGTH = 68  # bytes 7-74 of an A-ASSOCIATE-RQ/AC: version .. reserved
_PDV_HEADER_LENGTH = 6  # Item-length (4), Presentation-context-ID (1), message control header (1)
_MIN_P_DATA_LENGTH = _PDV_HEADER_LENGTH  # at least one PDV item
_DATA_PDU_HEAD = PDU_HEADER_LENGTH + _PDV_HEADER_LENGTH
_DATA_PDU_HEAD_FORMAT = struct.Struct(">BxIIBB")  # PDU-type, PDU-length, then the first PDV item's header


class RejectResult(IntEnum):
    """A-ASSOCIATE-RJ Result (PS3.8 table 9-21)."""

    REJECTED_PERMANENT = 1
    REJECTED_TRANSIENT = 2


class RejectSource(IntEnum):
    """A-ASSOCIATE-RJ Source (PS3.8 table 9-21)."""

    SERVICE_USER = 1
    """DICOM UL service-user."""
    SERVICE_PROVIDER_ACSE = 2
    """DICOM UL service-provider (ACSE related function)."""
    SERVICE_PROVIDER_PRESENTATION = 3
    """DICOM UL service-provider (Presentation related function)."""


class ServiceUserRejectReason(IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag. when the Source is the DICOM UL service-user."""

    NO_REASON_GIVEN = 1
    APPLICATION_CONTEXT_NAME_NOT_SUPPORTED = 2
    CALLING_AE_TITLE_NOT_RECOGNIZED = 3
    CALLED_AE_TITLE_NOT_RECOGNIZED = 7


class AcseRejectReason(IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag. when the Source is the service-provider (ACSE)."""

    NO_REASON_GIVEN = 1
    PROTOCOL_VERSION_NOT_SUPPORTED = 2


class PresentationRejectReason(IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag. when the Source is the service-provider (Presentation)."""

    TEMPORARY_CONGESTION = 1
    LOCAL_LIMIT_EXCEEDED = 2


_REJECT_REASONS: dict[int, type[IntEnum]] = {
    RejectSource.SERVICE_USER: ServiceUserRejectReason,
    RejectSource.SERVICE_PROVIDER_ACSE: AcseRejectReason,
    RejectSource.SERVICE_PROVIDER_PRESENTATION: PresentationRejectReason,
}
_REJECT_RESULT_NAMES = {1: "rejected-permanent", 2: "rejected-transient"}
_REJECT_SOURCE_NAMES = {
    1: "DICOM UL service-user",
    2: "DICOM UL service-provider (ACSE related function)",
    3: "DICOM UL service-provider (Presentation related function)",
}
_REJECT_REASON_NAMES = {
    1: {1: "no-reason-given", 2: "application-context-name-not-supported",
        3: "calling-AE-title-not-recognized", 7: "called-AE-title-not-recognized"},
    2: {1: "no-reason-given", 2: "protocol-version-not-supported"},
    3: {1: "temporary-congestion", 2: "local-limit-exceeded"},
}


class AbortSource(IntEnum):
    """A-ABORT Source (PS3.8 table 9-26); 1 is reserved."""

    SERVICE_USER = 0
    """DICOM UL service-user (initiated abort)."""
    SERVICE_PROVIDER = 2
    """DICOM UL service-provider (initiated abort)."""


class AbortReason(IntEnum):
    """A-ABORT Reason/Diag., significant only when the Source is the service-provider; 3 is reserved."""

    REASON_NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    UNRECOGNIZED_PDU_PARAMETER = 4
    UNEXPECTED_PDU_PARAMETER = 5
    INVALID_PDU_PARAMETER_VALUE = 6


_ABORT_SOURCE_NAMES = {0: "DICOM UL service-user", 2: "DICOM UL service-provider"}
_ABORT_REASON_NAMES = {
    0: "reason-not-specified", 1: "unrecognized-PDU", 2: "unexpected-PDU",
    4: "unrecognized-PDU parameter", 5: "unexpected-PDU parameter", 6: "invalid-PDU-parameter value",
}


class PresentationContextResult(IntEnum):
    """Result/Reason of a Presentation Context Item in an A-ASSOCIATE-AC (PS3.8 table 9-18)."""

    ACCEPTANCE = 0
    USER_REJECTION = 1
    NO_REASON = 2
    """no-reason (provider rejection)"""
    ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
    TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


class UserIdentityType(IntEnum):
    """User-Identity-Type of the User Identity sub-item 58H (PS3.7 D.3.3.7)."""

    USERNAME = 1
    USERNAME_AND_PASSCODE = 2
    KERBEROS = 3
    SAML = 4
    JWT = 5


class ItemType(IntEnum):
    """Item-type values of the A-ASSOCIATE variable items and user information sub-items."""

    APPLICATION_CONTEXT = 0x10
    PRESENTATION_CONTEXT_RQ = 0x20
    PRESENTATION_CONTEXT_AC = 0x21
    ABSTRACT_SYNTAX = 0x30
    TRANSFER_SYNTAX = 0x40
    USER_INFORMATION = 0x50
    MAXIMUM_LENGTH = 0x51
    IMPLEMENTATION_CLASS_UID = 0x52
    ASYNCHRONOUS_OPERATIONS_WINDOW = 0x53
    SCP_SCU_ROLE_SELECTION = 0x54
    IMPLEMENTATION_VERSION_NAME = 0x55
    SOP_CLASS_EXTENDED_NEGOTIATION = 0x56
    SOP_CLASS_COMMON_EXTENDED_NEGOTIATION = 0x57
    USER_IDENTITY_RQ = 0x58
    USER_IDENTITY_AC = 0x59


# -------------------------------------------------------------------------------- framer events


@dataclass(frozen=True, slots=True)
class PduHeader:
    """The 6-byte header of a PDU has been fed; ``length`` is its PDU-length field."""

    pdu_type: int
    length: int


@dataclass(frozen=True, slots=True)
class AssociationPdu:
    """A complete A-ASSOCIATE-RQ/AC/RJ, A-RELEASE-RQ/RP or A-ABORT PDU, header included."""

    pdu_type: int
    pdu: bytes = field(repr=False)  # may hold a User Identity passcode: keep it out of logs

    def __repr__(self) -> str:
        return f"AssociationPdu({pdu_type_name(self.pdu_type)}, {len(self.pdu)} bytes)"


@dataclass(frozen=True, slots=True)
class PduEnd:
    """The last byte of a PDU has been fed; the stream is at a PDU boundary again."""

    pdu_type: int


_P_DATA_END = PduEnd(P_DATA_TF)


@dataclass(frozen=True, slots=True)
class CommandSet:
    """The complete command set of a DIMSE message on presentation context ``context_id``."""

    context_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class DataSetPrefix:
    """The first bytes of a data set on presentation context ``context_id`` (all of it if short):
    enough for the attributes at its start, such as the patient and the study. Empty: none of it
    was kept, because other contexts' data sets held all the room for prefixes (an empty data set
    gives no event)."""

    context_id: int
    data: bytes = field(repr=False)  # patient data: keep it out of logs


FramerEvent = Union[PduHeader, AssociationPdu, PduEnd, CommandSet, DataSetPrefix]


# ------------------------------------------------------------------------------ P-DATA inspector


class PDataInspector:
    """Finds the PDV items inside P-DATA-TF PDUs and reassembles command sets (PS3.8 9.3.5, E.2).

    Command fragments (message control header bit 0 set) are collected per presentation context
    until the fragment with bit 1 ("last") set; data-set fragments are only counted, never
    copied, but for the first ``data_set_prefix`` bytes of a data set that a command set
    announced (its Command Data Set Type is not 0101H), on at most ``prefixes_at_once`` contexts
    at a time. Use :meth:`begin_pdu` with the PDU-length, :meth:`feed` with the PDU's variable
    field in any number of pieces, then :meth:`end_pdu`. A command may span several PDUs.
    """

    def __init__(self, *, max_command_set_length: int = DEFAULT_MAX_COMMAND_SET_LENGTH,
                 data_set_prefix: int = 0, prefixes_at_once: int = DEFAULT_DATA_SET_PREFIXES_AT_ONCE,
                 accepted_contexts: Container[int] = ANY_CONTEXT_ID) -> None:
        self._limit = max_command_set_length
        # PS3.8 9.3.5: a PDV's presentation context is one the association accepted. A relay's
        # acceptor direction starts with none (no P-DATA before the A-ASSOCIATE-AC) and takes them
        # from the AC; its requestor direction takes any until the AC has passed.
        self._accepted = accepted_contexts
        self._prefix_limit = data_set_prefix  # 0: data sets are only counted
        self._prefixes_at_once = prefixes_at_once
        # Contexts whose last command set announced a data set that has not begun yet. Data-set
        # fragments anywhere else are not kept: a peer could otherwise make the agent hold 64 KiB on
        # each of 255 context IDs, per direction and connection, by sending data without commands.
        self._announced: set[int] = set()
        self._prefixes: dict[int, bytearray] = {}  # per context: the start of its current data set, while kept
        self._pending: dict[int, bytearray] = {}
        self._pending_total = 0
        self._in_pdu = False
        self._pdu_left = 0  # bytes of the current PDU's variable field not fed yet
        self._item_header = bytearray()
        self._in_fragment = False
        self._fragment_left = 0
        self._context_id = 0
        self._is_command = False
        self._is_last = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes held in memory: a partial PDV header, incomplete command sets, data-set prefixes
        (at most ``prefixes_at_once`` times ``data_set_prefix``)."""
        return len(self._item_header) + self._pending_total + sum(len(p) for p in self._prefixes.values())

    def passes_data_through(self, context_id: int) -> bool:
        """True if a data-set fragment (not the last) on ``context_id`` would give no event: no
        command announced a data set there, or its prefix was taken already (or none is wanted,
        then nothing is ever announced), and it was accepted. Only meaningful between PDUs."""
        return context_id not in self._announced and context_id not in self._prefixes and context_id in self._accepted

    def accept_contexts(self, context_ids: Iterable[int]) -> None:
        """The presentation contexts the A-ASSOCIATE-AC accepted: a PDV on any other is malformed."""
        self._accepted = frozenset(context_ids)

    def begin_pdu(self, length: int) -> None:
        """Start a P-DATA-TF PDU whose PDU-length is ``length``."""
        if self._in_pdu:
            raise RuntimeError("PDataInspector.begin_pdu called inside a PDU")
        if length < _MIN_P_DATA_LENGTH:
            raise MalformedPduError(_p_data_length_message(length))
        self._in_pdu = True
        self._pdu_left = length

    def feed(self, data: bytes | bytearray | memoryview) -> list[CommandSet | DataSetPrefix]:
        """Feed the next bytes of the current PDU's variable field; return completed command sets."""
        view = _byte_view(data)
        total = len(view)
        if not self._in_pdu or total > self._pdu_left:
            raise RuntimeError("PDataInspector.feed called with bytes outside a P-DATA-TF PDU")
        events: list[CommandSet | DataSetPrefix] = []
        pos = 0
        while pos < total:
            if self._in_fragment:
                take = min(self._fragment_left, total - pos)
                if self._is_command:
                    self._collect(view[pos:pos + take])
                elif self._context_id in self._prefixes:
                    self._capture(view[pos:pos + take], events)
                pos += take
                self._fragment_left -= take
                self._pdu_left -= take
            else:
                take = min(_PDV_HEADER_LENGTH - len(self._item_header), total - pos)
                self._item_header += view[pos:pos + take]
                pos += take
                self._pdu_left -= take
                if len(self._item_header) == _PDV_HEADER_LENGTH:
                    self._start_fragment(events)
            if self._in_fragment and self._fragment_left == 0:
                self._finish_fragment(events)
        return events

    def end_pdu(self) -> None:
        """The current PDU is complete: it must have ended on a PDV item boundary."""
        if not self._in_pdu or self._pdu_left:
            raise RuntimeError("PDataInspector.end_pdu called before the PDU was complete")
        self._in_pdu = False
        if self._item_header:
            got = len(self._item_header)
            self._item_header.clear()
            raise MalformedPduError(
                f"P-DATA-TF PDU ends inside a PDV item header ({got} of {_PDV_HEADER_LENGTH} bytes)"
            )

    def _start_fragment(self, events: list[CommandSet | DataSetPrefix]) -> None:
        item_length = int.from_bytes(self._item_header[0:4], "big")
        context_id = self._item_header[4]
        control = self._item_header[5]
        self._item_header.clear()
        if item_length < 2:
            raise MalformedPduError(
                f"PDV item length {item_length} in a P-DATA-TF PDU (must be at least 2: "
                "presentation context ID and message control header)"
            )
        if context_id not in self._accepted:
            raise MalformedPduError(
                f"a PDV item on presentation context {context_id}, which the association did not accept "
                f"(accepted: {_context_list(self._accepted)})"
            )
        fragment_length = item_length - 2
        if fragment_length > self._pdu_left:
            raise MalformedPduError(
                f"PDV item length {item_length} on presentation context {context_id} runs past "
                f"the end of its P-DATA-TF PDU (only {self._pdu_left + 2} bytes left)"
            )
        self._in_fragment = True
        self._fragment_left = fragment_length
        self._context_id = context_id
        self._is_command = bool(control & 0x01)
        self._is_last = bool(control & 0x02)
        if not self._is_command and context_id in self._announced:
            self._begin_data_set(context_id, events)

    def _begin_data_set(self, context_id: int, events: list[CommandSet | DataSetPrefix]) -> None:
        """The data set a command announced begins: keep its start, if there is room."""
        self._announced.discard(context_id)
        if len(self._prefixes) < self._prefixes_at_once:
            self._prefixes[context_id] = bytearray()
        else:  # the association learns at once that this data set's attributes will not be seen
            events.append(DataSetPrefix(context_id, b""))

    def _collect(self, piece: memoryview) -> None:
        if self._pending_total + len(piece) > self._limit:
            raise PduLimitError(
                f"command set on presentation context {self._context_id} exceeds the "
                f"{self._limit}-byte limit for command sets"
            )
        self._pending.setdefault(self._context_id, bytearray()).extend(piece)
        self._pending_total += len(piece)

    def _capture(self, piece: memoryview, events: list[CommandSet | DataSetPrefix]) -> None:
        prefix = self._prefixes[self._context_id]
        prefix += piece[:self._prefix_limit - len(prefix)]
        if len(prefix) >= self._prefix_limit:  # taken: the rest of the data set only passes
            del self._prefixes[self._context_id]
            events.append(DataSetPrefix(self._context_id, bytes(prefix)))

    def _finish_fragment(self, events: list[CommandSet | DataSetPrefix]) -> None:
        self._in_fragment = False
        context_id = self._context_id
        if self._is_command and self._is_last:
            command = bytes(self._pending.pop(context_id, b""))
            self._pending_total -= len(command)
            events.append(CommandSet(context_id, command))
            if self._prefix_limit:
                # A data set still being kept here was cut short by this command (PS3.7 sends a
                # message's data set before the next message): it is no data set, its start is dropped.
                self._prefixes.pop(context_id, None)
                if announces_data_set(command):
                    self._announced.add(context_id)
                else:
                    self._announced.discard(context_id)
        elif self._is_last:  # a data set ended: its start goes out if still kept (shorter than a prefix, or empty)
            prefix = self._prefixes.pop(context_id, None)
            if prefix is not None:
                events.append(DataSetPrefix(context_id, bytes(prefix)))


def _context_list(context_ids: Container[int]) -> str:
    listed = [context_id for context_id in ANY_CONTEXT_ID if context_id in context_ids]
    shown = ", ".join(map(str, listed[:8])) + (f" and {len(listed) - 8} more" if len(listed) > 8 else "")
    return shown or "none"


# ---------------------------------------------------------------------------------------- framer


class PduFramer:
    """Splits one direction of a DICOM Upper Layer byte stream into PDU events.

    One framer per direction. :meth:`feed` takes bytes as they arrive, in chunks of any size,
    and returns, in stream order: :class:`PduHeader` when a header is complete,
    :class:`AssociationPdu` with the whole PDU for every PDU type but P-DATA-TF,
    :class:`CommandSet` for complete command sets (only with ``inspect_commands=True``),
    :class:`DataSetPrefix` with the first ``data_set_prefix`` bytes of each data set a command set
    announced (if > 0; see :class:`PDataInspector` for ``prefixes_at_once``) and
    :class:`PduEnd` after the last byte of every PDU. P-DATA-TF payloads are not copied.

    ``quiet_data=True`` leaves out the PduHeader and PduEnd of the P-DATA-TF PDUs that need no
    inspection, when their first 12 bytes (PDU and PDV item headers) come in one :meth:`feed`: one
    data-set fragment, not its data set's last, on a context whose data-set prefix was taken (or
    none is wanted or announced). That is the bulk of a transfer, which a relay only passes on: two
    events for each of them, made and then looked at, were a tenth of the agent relay's CPU per byte.

    With ``inspect_commands=True``, a PDV item on a presentation context outside
    ``accepted_contexts`` (any, unless given) is malformed. The framer of the acceptor's direction
    takes the accepted contexts from the A-ASSOCIATE-AC it frames, before it reads what follows the
    AC; the requestor's framer is told them with :meth:`accept_contexts`.

    Malformed input raises :class:`MalformedPduError`; the framer then stays failed and every
    further :meth:`feed` raises again. Events of the failing call that preceded the error are
    dropped: the stream is unusable from then on anyway.
    """

    def __init__(
        self,
        *,
        inspect_commands: bool = False,
        max_association_pdu_length: int = DEFAULT_MAX_ASSOCIATION_PDU_LENGTH,
        max_command_set_length: int = DEFAULT_MAX_COMMAND_SET_LENGTH,
        data_set_prefix: int = 0,
        prefixes_at_once: int = DEFAULT_DATA_SET_PREFIXES_AT_ONCE,
        accepted_contexts: Container[int] = ANY_CONTEXT_ID,
        quiet_data: bool = False,
    ) -> None:
        self._max_association = max_association_pdu_length
        self._inspector = (
            PDataInspector(max_command_set_length=max_command_set_length, data_set_prefix=data_set_prefix,
                           prefixes_at_once=prefixes_at_once, accepted_contexts=accepted_contexts)
            if inspect_commands else None
        )
        self._header = bytearray()
        self._type: int | None = None
        self._length = 0
        self._left = 0  # bytes of the current PDU's variable field not fed yet
        self._body: bytearray | None = None  # whole association PDU being collected
        self._failure: str | None = None
        self._position = 0
        self._data_header: PduHeader | None = None  # reused while P-DATA-TF PDUs keep one length
        self._quiet_data = quiet_data
        self._passing = False  # the current PDU is one _pass_data_pdu took: its rest is only counted

    @property
    def at_boundary(self) -> bool:
        """True when no PDU is partially fed."""
        return self._type is None

    @property
    def current_type(self) -> int | None:
        """PDU-type of the partially fed PDU (known from its first byte), or None at a boundary."""
        return self._type

    @property
    def bytes_into_pdu(self) -> int:
        """Bytes of the current PDU fed so far, header included; 0 at a boundary."""
        if len(self._header) < PDU_HEADER_LENGTH:
            return len(self._header)
        return PDU_HEADER_LENGTH + self._length - self._left

    @property
    def remaining_in_pdu(self) -> int | None:
        """Bytes still missing from the current PDU, or None while its header is incomplete.

        A caller that must stop exactly at a boundary (to inject a PDU of its own) feeds at most
        this many bytes.
        """
        if len(self._header) < PDU_HEADER_LENGTH:
            return None
        return self._left

    @property
    def position(self) -> int:
        """Total number of bytes accepted since the framer was made."""
        return self._position

    @property
    def buffered_bytes(self) -> int:
        """Bytes the framer holds: a partial header, an association PDU, partial command sets."""
        held = len(self._header) + (len(self._body) if self._body is not None else 0)
        return held + (self._inspector.buffered_bytes if self._inspector is not None else 0)

    @property
    def failed(self) -> bool:
        """True once malformed input was seen."""
        return self._failure is not None

    def accept_contexts(self, context_ids: Iterable[int]) -> None:
        """The presentation contexts the association accepted, for the requestor's direction: from
        now on a PDV on any other is malformed (only with ``inspect_commands=True``)."""
        if self._inspector is not None:
            self._inspector.accept_contexts(context_ids)

    def feed(self, data: bytes | bytearray | memoryview) -> list[FramerEvent]:
        """Consume ``data`` (any length, any split) and return the events it completed."""
        if self._failure is not None:
            raise MalformedPduError(f"the DICOM stream already failed: {self._failure}")
        try:
            return self._feed(_byte_view(data))
        except MalformedPduError as exc:
            self._failure = str(exc)
            raise

    def end_of_stream(self) -> None:
        """The peer closed its side: raise MalformedPduError if that cut a PDU short."""
        if self._failure is not None:
            raise MalformedPduError(f"the DICOM stream already failed: {self._failure}")
        if self._type is not None:
            expected = f" of {PDU_HEADER_LENGTH + self._length}" if len(self._header) == PDU_HEADER_LENGTH else ""
            self._failure = (
                f"stream ended inside a {pdu_type_name(self._type)} PDU "
                f"after {self.bytes_into_pdu}{expected} bytes"
            )
            raise MalformedPduError(self._failure)

    def _feed(self, view: memoryview) -> list[FramerEvent]:
        events: list[FramerEvent] = []
        total = len(view)
        pos = 0
        while pos < total:
            if not self._header and total - pos >= _DATA_PDU_HEAD:
                passed = self._pass_data_pdu(view, pos, events)
                if passed:
                    pos += passed
                    self._position += passed
                    continue
            if len(self._header) < PDU_HEADER_LENGTH:
                if not self._header:
                    self._type = _check_pdu_type(view[pos])
                take = min(PDU_HEADER_LENGTH - len(self._header), total - pos)
                self._header += view[pos:pos + take]
                pos += take
                self._position += take
                if len(self._header) == PDU_HEADER_LENGTH:
                    self._start_pdu(events)
            else:
                take = min(self._left, total - pos)
                piece = view[pos:pos + take]
                if self._body is not None:
                    self._body += piece
                elif self._inspector is not None and not self._passing:
                    events.extend(self._inspector.feed(piece))
                pos += take
                self._position += take
                self._left -= take
            if len(self._header) == PDU_HEADER_LENGTH and self._left == 0:
                self._finish_pdu(events)
        return events

    def _pass_data_pdu(self, view: memoryview, pos: int, events: list[FramerEvent]) -> int:
        """How much of ``view`` from ``pos`` (a PDU's start) is taken in one step, if it is a
        P-DATA-TF PDU that needs no inspection: all of the PDU if it is whole here, else what there
        is of it (its rest is then only counted as it comes). 0: the general path takes the PDU.

        Bulk transfers are almost only such PDUs: one data-set fragment, not the last, on a context
        whose data-set prefix was already taken. Taking them in one step keeps the relay's CPU per
        byte low; the events are the same as the general path's (none with ``quiet_data``)."""
        pdu_type, pdu_length, item_length, context_id, control = _DATA_PDU_HEAD_FORMAT.unpack_from(view, pos)
        if pdu_type != P_DATA_TF or pdu_length < _MIN_P_DATA_LENGTH or item_length != pdu_length - 4:
            return 0  # not exactly one PDV item (a malformed length included)
        if control & 0x03 or (self._inspector is not None and not self._inspector.passes_data_through(context_id)):
            return 0  # a command fragment, a data set's last fragment, or a prefix still to take
        end = pos + PDU_HEADER_LENGTH + pdu_length
        whole = end <= len(view)
        if not self._quiet_data:
            header = self._data_header
            if header is None or header.length != pdu_length:
                header = self._data_header = PduHeader(P_DATA_TF, pdu_length)
            events.append(header)
            if whole:
                events.append(_P_DATA_END)
        if whole:
            return end - pos
        # A read ended inside it (a relay's reads rarely end on a PDU boundary): the rest is counted.
        self._type = P_DATA_TF
        self._header += view[pos:pos + PDU_HEADER_LENGTH]
        self._length = pdu_length
        self._left = end - len(view)
        self._passing = True
        return len(view) - pos

    def _start_pdu(self, events: list[FramerEvent]) -> None:
        pdu_type = self._type
        assert pdu_type is not None
        length = int.from_bytes(self._header[2:6], "big")
        _check_pdu_length(pdu_type, length, self._max_association)
        self._length = length
        self._left = length
        events.append(PduHeader(pdu_type, length))
        if pdu_type == PduType.P_DATA_TF:
            if self._inspector is not None:
                self._inspector.begin_pdu(length)
        else:
            self._body = bytearray(self._header)

    def _finish_pdu(self, events: list[FramerEvent]) -> None:
        pdu_type = self._type
        assert pdu_type is not None
        if self._body is not None:
            pdu = bytes(self._body)
            if pdu_type == A_ASSOCIATE_AC and self._inspector is not None:
                self._inspector.accept_contexts(pc.context_id for pc in parse_associate_ac(pdu).presentation_contexts
                                                if pc.result == PresentationContextResult.ACCEPTANCE)
            events.append(AssociationPdu(pdu_type, pdu))
        elif self._inspector is not None and not self._passing:
            self._inspector.end_pdu()
        if not (self._passing and self._quiet_data):
            events.append(PduEnd(pdu_type))
        self._passing = False
        self._header.clear()
        self._body = None
        self._type = None
        self._length = 0


def _byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _check_pdu_type(pdu_type: int) -> int:
    if pdu_type not in _PDU_NAMES:
        hint = ""
        if pdu_type == 0x16:
            hint = " (a TLS handshake record starts with 0x16: is the application talking TLS to the plain DICOM port?)"
        raise MalformedPduError(f"unknown PDU type 0x{pdu_type:02X}{hint}")
    return pdu_type


def _p_data_length_message(length: int) -> str:
    return (
        f"P-DATA-TF PDU length {length} (must be at least {_MIN_P_DATA_LENGTH}: "
        "a P-DATA-TF PDU holds one or more PDV items)"
    )


def _check_pdu_length(pdu_type: int, length: int, max_association: int) -> None:
    name = pdu_type_name(pdu_type)
    fixed = _FIXED_PDU_LENGTHS.get(pdu_type)  # type: ignore[call-overload]
    if fixed is not None:
        if length != fixed:
            raise MalformedPduError(f"{name} PDU with length {length} (must be {fixed})")
    elif pdu_type == PduType.P_DATA_TF:
        if length < _MIN_P_DATA_LENGTH:
            raise MalformedPduError(_p_data_length_message(length))
    else:
        if length > max_association:
            raise PduLimitError(f"{name} PDU of {length} bytes exceeds the {max_association}-byte limit")
        if length < _ASSOCIATE_FIXED_LENGTH:
            raise MalformedPduError(
                f"{name} PDU with length {length} (must be at least {_ASSOCIATE_FIXED_LENGTH})"
            )


# ----------------------------------------------------------------------------- builders: RJ, ABORT


def a_associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4); the reason must be one defined for the source."""
    if result not in RejectResult._value2member_map_:
        raise InvalidPduFieldError(
            f"A-ASSOCIATE-RJ result {result} (must be 1 rejected-permanent or 2 rejected-transient)"
        )
    reasons = _REJECT_REASON_NAMES.get(source)
    if reasons is None:
        raise InvalidPduFieldError(f"A-ASSOCIATE-RJ source {source} (must be 1, 2 or 3)")
    if reason not in reasons:
        allowed = ", ".join(f"{value} {name}" for value, name in reasons.items())
        raise InvalidPduFieldError(
            f"A-ASSOCIATE-RJ reason {reason} is not defined for source {source} "
            f"({_REJECT_SOURCE_NAMES[source]}); one of: {allowed}"
        )
    return struct.pack(">BBIBBBB", PduType.A_ASSOCIATE_RJ, 0, 4, 0, result, source, reason)


def a_abort(source: int = AbortSource.SERVICE_PROVIDER, reason: int = AbortReason.REASON_NOT_SPECIFIED) -> bytes:
    """An A-ABORT PDU (PS3.8 9.3.8); a service-user abort carries reason 0."""
    if source not in _ABORT_SOURCE_NAMES:
        raise InvalidPduFieldError(f"A-ABORT source {source} (must be 0 service-user or 2 service-provider)")
    if source == AbortSource.SERVICE_USER and reason != 0:
        raise InvalidPduFieldError(f"A-ABORT reason {reason} with source 0 (service-user): must be 0")
    if reason not in _ABORT_REASON_NAMES:
        raise InvalidPduFieldError(f"A-ABORT reason {reason} (must be 0, 1, 2, 4, 5 or 6)")
    return struct.pack(">BBIBBBB", PduType.A_ABORT, 0, 4, 0, 0, source, reason)


def a_release_rq() -> bytes:
    """An A-RELEASE-RQ PDU (PS3.8 9.3.6)."""
    return struct.pack(">BBII", PduType.A_RELEASE_RQ, 0, 4, 0)


def a_release_rp() -> bytes:
    """An A-RELEASE-RP PDU (PS3.8 9.3.7)."""
    return struct.pack(">BBII", PduType.A_RELEASE_RP, 0, 4, 0)


@dataclass(frozen=True)
class AssociateReject:
    """A parsed A-ASSOCIATE-RJ; values are kept even when PS3.8 calls them reserved."""

    result: int
    source: int
    reason: int

    def describe(self) -> str:
        """E.g. ``rejected-permanent by DICOM UL service-user: calling-AE-title-not-recognized``."""
        result = _REJECT_RESULT_NAMES.get(self.result, f"result {self.result} (reserved)")
        source = _REJECT_SOURCE_NAMES.get(self.source, f"source {self.source} (reserved)")
        reason = _REJECT_REASON_NAMES.get(self.source, {}).get(self.reason, f"reason {self.reason} (reserved)")
        return f"{result} by {source}: {reason}"


@dataclass(frozen=True)
class Abort:
    """A parsed A-ABORT; values are kept even when PS3.8 calls them reserved."""

    source: int
    reason: int

    def describe(self) -> str:
        """E.g. ``A-ABORT from DICOM UL service-provider: unexpected-PDU``."""
        source = _ABORT_SOURCE_NAMES.get(self.source, f"source {self.source} (reserved)")
        if self.source != AbortSource.SERVICE_PROVIDER:
            return f"A-ABORT from {source}"
        reason = _ABORT_REASON_NAMES.get(self.reason, f"reason {self.reason} (reserved)")
        return f"A-ABORT from {source}: {reason}"


def parse_associate_rj(pdu: bytes) -> AssociateReject:
    """Parse a whole A-ASSOCIATE-RJ PDU."""
    body = _pdu_body(pdu, PduType.A_ASSOCIATE_RJ)
    if len(body) != 4:
        raise MalformedPduError(f"A-ASSOCIATE-RJ PDU with length {len(body)} (must be 4)")
    return AssociateReject(result=body[1], source=body[2], reason=body[3])


def parse_a_abort(pdu: bytes) -> Abort:
    """Parse a whole A-ABORT PDU."""
    body = _pdu_body(pdu, PduType.A_ABORT)
    if len(body) != 4:
        raise MalformedPduError(f"A-ABORT PDU with length {len(body)} (must be 4)")
    return Abort(source=body[2], reason=body[3])


# --------------------------------------------------------------------- A-ASSOCIATE-RQ/AC: model


@dataclass(frozen=True)
class RawItem:
    """An item or sub-item kept as it was received: Item-type and the bytes after Item-length."""

    item_type: int
    value: bytes


@dataclass(frozen=True)
class MaximumLength:
    """Maximum Length sub-item (51H, PS3.8 D.1): Maximum-length-received, 0 = unlimited."""

    item_type: ClassVar[int] = ItemType.MAXIMUM_LENGTH
    maximum_length_received: int


@dataclass(frozen=True)
class ImplementationClassUid:
    """Implementation Class UID sub-item (52H, PS3.7 D.3.3.2)."""

    item_type: ClassVar[int] = ItemType.IMPLEMENTATION_CLASS_UID
    implementation_class_uid: str


@dataclass(frozen=True)
class ImplementationVersionName:
    """Implementation Version Name sub-item (55H, PS3.7 D.3.3.2)."""

    item_type: ClassVar[int] = ItemType.IMPLEMENTATION_VERSION_NAME
    implementation_version_name: str


@dataclass(frozen=True)
class UserIdentityRQ:
    """User Identity sub-item of an A-ASSOCIATE-RQ (58H, PS3.7 D.3.3.7.1)."""

    item_type: ClassVar[int] = ItemType.USER_IDENTITY_RQ
    user_identity_type: int
    positive_response_requested: bool
    primary_field: bytes
    secondary_field: bytes = field(default=b"", repr=False)  # a passcode for type 2


@dataclass(frozen=True)
class UserIdentityAC:
    """User Identity sub-item of an A-ASSOCIATE-AC (59H, PS3.7 D.3.3.7.2)."""

    item_type: ClassVar[int] = ItemType.USER_IDENTITY_AC
    server_response: bytes = field(repr=False)


UserInformationSubItem = Union[
    MaximumLength, ImplementationClassUid, ImplementationVersionName, UserIdentityRQ, UserIdentityAC, RawItem
]


@dataclass(frozen=True)
class PresentationContextItemRQ:
    """Presentation Context Item of an A-ASSOCIATE-RQ (20H, PS3.8 9.3.2.2)."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class PresentationContextItemAC:
    """Presentation Context Item of an A-ASSOCIATE-AC (21H, PS3.8 9.3.3.2).

    ``transfer_syntax`` is None when the item carried no Transfer Syntax sub-item (PS3.8 says
    it is not significant unless the result is acceptance).
    """

    context_id: int
    result: int
    transfer_syntax: str | None


class _UserInformationMixin:
    """Accessors for the User Information Item's sub-items, kept in received order."""

    user_information: tuple[UserInformationSubItem, ...] | None

    def _first(self, kind: type) -> object | None:
        for item in self.user_information or ():
            if isinstance(item, kind):
                return item
        return None

    @property
    def maximum_length(self) -> int | None:
        """Maximum-length-received (0 = no limit), or None without a 51H sub-item."""
        item = self._first(MaximumLength)
        return item.maximum_length_received if isinstance(item, MaximumLength) else None

    @property
    def implementation_class_uid(self) -> str | None:
        """The 52H sub-item's UID, or None."""
        item = self._first(ImplementationClassUid)
        return item.implementation_class_uid if isinstance(item, ImplementationClassUid) else None

    @property
    def implementation_version_name(self) -> str | None:
        """The 55H sub-item's name, or None."""
        item = self._first(ImplementationVersionName)
        return item.implementation_version_name if isinstance(item, ImplementationVersionName) else None

    @property
    def raw_user_items(self) -> tuple[RawItem, ...]:
        """Sub-items this module does not model (53H, 54H, 56H, 57H, ...), in received order."""
        return tuple(item for item in self.user_information or () if isinstance(item, RawItem))


@dataclass(frozen=True)
class AssociateRequest(_UserInformationMixin):
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2).

    ``user_information`` is None when the PDU had no User Information Item; ``other_items``
    holds variable items of unknown type, re-encoded after the User Information Item.
    """

    protocol_version: int
    called_ae_title: str
    calling_ae_title: str
    application_context_name: str
    presentation_contexts: tuple[PresentationContextItemRQ, ...]
    user_information: tuple[UserInformationSubItem, ...] | None = ()
    other_items: tuple[RawItem, ...] = ()

    @property
    def user_identity(self) -> UserIdentityRQ | None:
        """The 58H sub-item, or None."""
        item = self._first(UserIdentityRQ)
        return item if isinstance(item, UserIdentityRQ) else None


@dataclass(frozen=True)
class AssociateAccept(_UserInformationMixin):
    """An A-ASSOCIATE-AC PDU (PS3.8 9.3.3).

    The AE titles echo the request and are "not tested" by PS3.8: they are decoded as Latin-1 so
    any bytes survive a round trip.
    """

    protocol_version: int
    called_ae_title: str
    calling_ae_title: str
    application_context_name: str
    presentation_contexts: tuple[PresentationContextItemAC, ...]
    user_information: tuple[UserInformationSubItem, ...] | None = ()
    other_items: tuple[RawItem, ...] = ()

    @property
    def user_identity(self) -> UserIdentityAC | None:
        """The 59H sub-item, or None."""
        item = self._first(UserIdentityAC)
        return item if isinstance(item, UserIdentityAC) else None


# ------------------------------------------------------------------- A-ASSOCIATE-RQ/AC: parsing


def parse_associate_rq(pdu: bytes) -> AssociateRequest:
    """Parse a whole A-ASSOCIATE-RQ PDU (header included)."""
    fields = _parse_associate(pdu, PduType.A_ASSOCIATE_RQ)
    if not fields["presentation_contexts"]:
        raise MalformedPduError("A-ASSOCIATE-RQ PDU without a Presentation Context Item")
    return AssociateRequest(**fields)


def parse_associate_ac(pdu: bytes) -> AssociateAccept:
    """Parse a whole A-ASSOCIATE-AC PDU (header included)."""
    return AssociateAccept(**_parse_associate(pdu, PduType.A_ASSOCIATE_AC))


def _pdu_body(pdu: bytes, pdu_type: int) -> memoryview:
    view = memoryview(bytes(pdu))
    name = pdu_type_name(pdu_type)
    if len(view) < PDU_HEADER_LENGTH:
        raise MalformedPduError(f"{name} PDU of {len(view)} bytes is shorter than a PDU header")
    if view[0] != pdu_type:
        raise MalformedPduError(f"expected an {name} PDU, got PDU type {pdu_type_name(view[0])}")
    length = int.from_bytes(view[2:6], "big")
    if length != len(view) - PDU_HEADER_LENGTH:
        raise MalformedPduError(
            f"{name} PDU-length {length} does not match the {len(view) - PDU_HEADER_LENGTH} bytes after the header"
        )
    return view[PDU_HEADER_LENGTH:]


def _split_items(data: memoryview, where: str) -> list[tuple[int, memoryview]]:
    """Split ``data`` into (Item-type, value) pairs: 1-byte type, reserved byte, 2-byte length."""
    items = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 4:
            raise MalformedPduError(f"{len(data) - pos} stray bytes at the end of {where} (an item header has 4)")
        item_type = data[pos]
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        end = pos + 4 + length
        if end > len(data):
            raise MalformedPduError(
                f"item 0x{item_type:02X} with length {length} runs past the end of {where} "
                f"({len(data) - pos - 4} bytes left)"
            )
        items.append((item_type, data[pos + 4:end]))
        pos = end
    return items


# Bytes of a peer's value that a decoding error quotes: enough to recognise the value, while the
# error (logged, and the reason of an audit record) stays short whatever the peer sent.
PEER_VALUE_QUOTE_LIMIT = 64


def _decode_ascii(value: memoryview, what: str) -> str:
    data = bytes(value)
    try:
        return data.decode("ascii")
    except UnicodeDecodeError as error:
        raise MalformedPduError(f"{what} is not ASCII (byte 0x{data[error.start]:02X} at offset {error.start}): "
                                f"{_quote_peer_value(data)}") from None


def _quote_peer_value(data: bytes) -> str:
    """``data`` escaped as a bytes literal, cut after ``PEER_VALUE_QUOTE_LIMIT`` bytes (then with its length)."""
    if len(data) <= PEER_VALUE_QUOTE_LIMIT:
        return repr(data)
    return f"{data[:PEER_VALUE_QUOTE_LIMIT]!r}... ({len(data)} bytes)"


def _decode_uid(value: memoryview, what: str) -> str:
    """A UID as PS3.8 Annex F encodes it; a PS3.5 trailing NUL pad is dropped."""
    return _decode_ascii(value, what).rstrip("\x00")


def _parse_associate(pdu: bytes, pdu_type: int) -> dict:
    name = pdu_type_name(pdu_type)
    body = _pdu_body(pdu, pdu_type)
    if len(body) < _ASSOCIATE_FIXED_LENGTH:
        raise MalformedPduError(f"{name} PDU with length {len(body)} (must be at least {_ASSOCIATE_FIXED_LENGTH})")
    protocol_version = int.from_bytes(body[0:2], "big")
    if pdu_type == PduType.A_ASSOCIATE_RQ:
        called = _decode_ascii(body[4:20], "Called-AE-title").rstrip(" ")
        calling = _decode_ascii(body[20:36], "Calling-AE-title").rstrip(" ")
    else:
        called = bytes(body[4:20]).decode("latin-1").rstrip(" ")
        calling = bytes(body[20:36]).decode("latin-1").rstrip(" ")
    application_context: str | None = None
    contexts: list[PresentationContextItemRQ | PresentationContextItemAC] = []
    user_information: tuple[UserInformationSubItem, ...] | None = None
    others: list[RawItem] = []
    is_request = pdu_type == PduType.A_ASSOCIATE_RQ
    expected_context = ItemType.PRESENTATION_CONTEXT_RQ if is_request else ItemType.PRESENTATION_CONTEXT_AC
    for item_type, value in _split_items(body[_ASSOCIATE_FIXED_LENGTH:], f"the {name} variable items"):
        if item_type == ItemType.APPLICATION_CONTEXT:
            if application_context is not None:
                raise MalformedPduError(f"{name} PDU with more than one Application Context Item")
            application_context = _decode_uid(value, "Application-context-name")
        elif item_type == expected_context:
            if is_request:
                contexts.append(_parse_context_rq(value))
            else:
                contexts.append(_parse_context_ac(value))
        elif item_type == ItemType.USER_INFORMATION:
            if user_information is not None:
                raise MalformedPduError(f"{name} PDU with more than one User Information Item")
            user_information = _parse_user_information(value, pdu_type)
        else:
            others.append(RawItem(item_type, bytes(value)))
    if application_context is None:
        raise MalformedPduError(f"{name} PDU without an Application Context Item")
    return {
        "protocol_version": protocol_version,
        "called_ae_title": called,
        "calling_ae_title": calling,
        "application_context_name": application_context,
        "presentation_contexts": tuple(contexts),
        "user_information": user_information,
        "other_items": tuple(others),
    }


def _parse_context_rq(value: memoryview) -> PresentationContextItemRQ:
    if len(value) < 4:
        raise MalformedPduError(f"Presentation Context Item (20H) of {len(value)} bytes (must be at least 4)")
    context_id = value[0]
    where = f"Presentation Context Item {context_id}"
    abstract: str | None = None
    transfer: list[str] = []
    for item_type, sub in _split_items(value[4:], where):
        if item_type == ItemType.ABSTRACT_SYNTAX:
            if abstract is not None:
                raise MalformedPduError(f"{where} has more than one Abstract Syntax Sub-Item")
            abstract = _decode_uid(sub, f"Abstract-syntax-name in {where}")
        elif item_type == ItemType.TRANSFER_SYNTAX:
            transfer.append(_decode_uid(sub, f"Transfer-syntax-name in {where}"))
        else:
            raise MalformedPduError(f"unexpected sub-item 0x{item_type:02X} in {where}")
    if abstract is None:
        raise MalformedPduError(f"{where} has no Abstract Syntax Sub-Item")
    if not transfer:
        raise MalformedPduError(f"{where} has no Transfer Syntax Sub-Item")
    return PresentationContextItemRQ(context_id, abstract, tuple(transfer))


def _parse_context_ac(value: memoryview) -> PresentationContextItemAC:
    if len(value) < 4:
        raise MalformedPduError(f"Presentation Context Item (21H) of {len(value)} bytes (must be at least 4)")
    context_id = value[0]
    where = f"Presentation Context Item {context_id}"
    transfer: str | None = None
    for item_type, sub in _split_items(value[4:], where):
        if item_type != ItemType.TRANSFER_SYNTAX:
            raise MalformedPduError(f"unexpected sub-item 0x{item_type:02X} in {where}")
        if transfer is not None:
            raise MalformedPduError(f"{where} of an A-ASSOCIATE-AC has more than one Transfer Syntax Sub-Item")
        transfer = _decode_uid(sub, f"Transfer-syntax-name in {where}")
    return PresentationContextItemAC(context_id, value[2], transfer)


def _parse_user_information(value: memoryview, pdu_type: int) -> tuple[UserInformationSubItem, ...]:
    sub_items: list[UserInformationSubItem] = []
    for item_type, sub in _split_items(value, "the User Information Item"):
        if item_type == ItemType.MAXIMUM_LENGTH:
            if len(sub) != 4:
                raise MalformedPduError(f"Maximum Length Sub-Item with length {len(sub)} (must be 4)")
            sub_items.append(MaximumLength(int.from_bytes(sub, "big")))
        elif item_type == ItemType.IMPLEMENTATION_CLASS_UID:
            sub_items.append(ImplementationClassUid(_decode_uid(sub, "Implementation-class-uid")))
        elif item_type == ItemType.IMPLEMENTATION_VERSION_NAME:
            sub_items.append(ImplementationVersionName(_decode_ascii(sub, "Implementation-version-name")))
        elif item_type == ItemType.USER_IDENTITY_RQ and pdu_type == PduType.A_ASSOCIATE_RQ:
            sub_items.append(_parse_user_identity_rq(sub))
        elif item_type == ItemType.USER_IDENTITY_AC and pdu_type == PduType.A_ASSOCIATE_AC:
            sub_items.append(_parse_user_identity_ac(sub))
        else:
            sub_items.append(RawItem(item_type, bytes(sub)))
    return tuple(sub_items)


def _parse_user_identity_rq(value: memoryview) -> UserIdentityRQ:
    where = "User Identity Sub-Item (58H)"
    if len(value) < 4:
        raise MalformedPduError(f"{where} of {len(value)} bytes (must be at least 6)")
    primary_length = int.from_bytes(value[2:4], "big")
    primary_end = 4 + primary_length
    if primary_end + 2 > len(value):
        raise MalformedPduError(f"{where}: Primary-field-length {primary_length} runs past the end of the item")
    secondary_length = int.from_bytes(value[primary_end:primary_end + 2], "big")
    if primary_end + 2 + secondary_length != len(value):
        raise MalformedPduError(
            f"{where}: Secondary-field-length {secondary_length} does not match the "
            f"{len(value) - primary_end - 2} bytes left in the item"
        )
    return UserIdentityRQ(
        user_identity_type=value[0],
        positive_response_requested=bool(value[1]),
        primary_field=bytes(value[4:primary_end]),
        secondary_field=bytes(value[primary_end + 2:]),
    )


def _parse_user_identity_ac(value: memoryview) -> UserIdentityAC:
    where = "User Identity Sub-Item (59H)"
    if len(value) < 2:
        raise MalformedPduError(f"{where} of {len(value)} bytes (must be at least 2)")
    length = int.from_bytes(value[0:2], "big")
    if 2 + length != len(value):
        raise MalformedPduError(
            f"{where}: Server-response-length {length} does not match the {len(value) - 2} bytes left in the item"
        )
    return UserIdentityAC(server_response=bytes(value[2:]))


# ------------------------------------------------------------------ A-ASSOCIATE-RQ/AC: encoding


def encode_associate_rq(request: AssociateRequest) -> bytes:
    """Encode an A-ASSOCIATE-RQ PDU; reserved fields are written as zeros."""
    items = [_item(ItemType.PRESENTATION_CONTEXT_RQ, _encode_context_rq(pc)) for pc in request.presentation_contexts]
    return _encode_associate(PduType.A_ASSOCIATE_RQ, request, items)


def encode_associate_ac(accept: AssociateAccept) -> bytes:
    """Encode an A-ASSOCIATE-AC PDU; reserved fields are written as zeros."""
    items = [_item(ItemType.PRESENTATION_CONTEXT_AC, _encode_context_ac(pc)) for pc in accept.presentation_contexts]
    return _encode_associate(PduType.A_ASSOCIATE_AC, accept, items)


def with_user_identity(request: AssociateRequest, username: str, positive_response_requested: bool) -> AssociateRequest:
    """A copy of ``request`` whose User Identity sub-item is a type 1 (username) item.

    An existing 58H sub-item is replaced where it stood (further ones are dropped, with any
    passcode they carried); otherwise the new one goes before the first sub-item with a higher
    Item-type, i.e. after 51H-57H, as PS3.7 D.3.3 numbers them. The username is UTF-8 (PS3.7
    D.3.3.7.1).
    """
    primary = username.encode("utf-8")
    if not primary:
        raise InvalidPduFieldError("a User Identity username must not be empty")
    if len(primary) > 0xFFFF:
        raise InvalidPduFieldError(f"a User Identity username of {len(primary)} bytes is longer than 65535")
    identity = UserIdentityRQ(UserIdentityType.USERNAME, positive_response_requested, primary, b"")
    kept: list[UserInformationSubItem] = []
    placed = False
    for item in request.user_information or ():
        if _sub_item_type(item) == ItemType.USER_IDENTITY_RQ:
            if not placed:
                kept.append(identity)
                placed = True
            continue
        kept.append(item)
    if not placed:
        index = next(
            (i for i, item in enumerate(kept) if _sub_item_type(item) > ItemType.USER_IDENTITY_RQ), len(kept)
        )
        kept.insert(index, identity)
    return replace(request, user_information=tuple(kept))


def _sub_item_type(item: UserInformationSubItem) -> int:
    return item.item_type


def _item(item_type: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise InvalidPduFieldError(
            f"item 0x{item_type:02X} of {len(value)} bytes does not fit a 2-byte Item-length"
        )
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _encode_ascii(value: str, what: str) -> bytes:
    try:
        return value.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidPduFieldError(f"{what} must be ASCII: {value!r}") from None


def _byte_value(value: int, what: str) -> int:
    if not 0 <= value <= 0xFF:
        raise InvalidPduFieldError(f"{what} {value} does not fit in one byte")
    return value


def ae_title_problem(title: str) -> str | None:
    """Why ``title`` is not an AE title PS3.5 allows, or None if it is one.

    PS3.5 6.2 (VR AE): characters of the Default Character Repertoire except the backslash and
    every control character (LF, FF, CR and ESC included), not only spaces; PS3.8 9.3.2: 16
    spaces mean "no Application Name specified" and shall not be used. Titles that are not ASCII
    at all never get here: :func:`parse_associate_rq` finds the PDU malformed.
    """
    if not title.strip(" "):
        return "is empty (only spaces)"
    bad = next((c for c in title if not " " <= c <= "~" or c == "\\"), None)
    if bad is not None:
        return f"holds {_character_name(bad)}, which an AE title must not contain"
    return None


def _character_name(character: str) -> str:
    return "a backslash" if character == "\\" else f"the control character 0x{ord(character):02X}"


def _encode_ae_title(value: str, what: str, codec: str) -> bytes:
    try:
        encoded = value.encode(codec)
    except UnicodeEncodeError:
        raise InvalidPduFieldError(f"{what} must be ASCII: {value!r}") from None
    if len(encoded) > 16:
        raise InvalidPduFieldError(f"{what} {value!r} is longer than 16 characters")
    return encoded.ljust(16, b" ")


def _encode_associate(pdu_type: int, value: AssociateRequest | AssociateAccept, contexts: list[bytes]) -> bytes:
    if not 0 <= value.protocol_version <= 0xFFFF:
        raise InvalidPduFieldError(f"Protocol-version {value.protocol_version} does not fit in two bytes")
    codec = "ascii" if pdu_type == PduType.A_ASSOCIATE_RQ else "latin-1"
    parts = [
        struct.pack(">HH", value.protocol_version, 0),
        _encode_ae_title(value.called_ae_title, "Called-AE-title", codec),
        _encode_ae_title(value.calling_ae_title, "Calling-AE-title", codec),
        bytes(32),
        _item(ItemType.APPLICATION_CONTEXT, _encode_ascii(value.application_context_name, "Application-context-name")),
        *contexts,
    ]
    if value.user_information is not None:
        parts.append(_item(ItemType.USER_INFORMATION, b"".join(map(_encode_sub_item, value.user_information))))
    parts.extend(_item(_byte_value(raw.item_type, "Item-type"), raw.value) for raw in value.other_items)
    body = b"".join(parts)
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _encode_context_rq(context: PresentationContextItemRQ) -> bytes:
    if not context.transfer_syntaxes:
        raise InvalidPduFieldError(f"Presentation Context Item {context.context_id} needs a transfer syntax")
    parts = [
        struct.pack(">BBBB", _byte_value(context.context_id, "Presentation-context-ID"), 0, 0, 0),
        _item(ItemType.ABSTRACT_SYNTAX, _encode_ascii(context.abstract_syntax, "Abstract-syntax-name")),
    ]
    parts.extend(
        _item(ItemType.TRANSFER_SYNTAX, _encode_ascii(uid, "Transfer-syntax-name")) for uid in context.transfer_syntaxes
    )
    return b"".join(parts)


def _encode_context_ac(context: PresentationContextItemAC) -> bytes:
    header = struct.pack(
        ">BBBB",
        _byte_value(context.context_id, "Presentation-context-ID"), 0, _byte_value(context.result, "Result/Reason"), 0,
    )
    if context.transfer_syntax is None:
        return header
    return header + _item(ItemType.TRANSFER_SYNTAX, _encode_ascii(context.transfer_syntax, "Transfer-syntax-name"))


def _encode_sub_item(item: UserInformationSubItem) -> bytes:
    if isinstance(item, MaximumLength):
        if not 0 <= item.maximum_length_received <= 0xFFFFFFFF:
            raise InvalidPduFieldError(
                f"Maximum-length-received {item.maximum_length_received} does not fit in 4 bytes"
            )
        return _item(item.item_type, item.maximum_length_received.to_bytes(4, "big"))
    if isinstance(item, ImplementationClassUid):
        return _item(item.item_type, _encode_ascii(item.implementation_class_uid, "Implementation-class-uid"))
    if isinstance(item, ImplementationVersionName):
        return _item(item.item_type, _encode_ascii(item.implementation_version_name, "Implementation-version-name"))
    if isinstance(item, UserIdentityRQ):
        for name, blob in (("Primary-field", item.primary_field), ("Secondary-field", item.secondary_field)):
            if len(blob) > 0xFFFF:
                raise InvalidPduFieldError(f"User Identity {name} of {len(blob)} bytes is longer than 65535")
        return _item(item.item_type, b"".join((
            struct.pack(">BBH", _byte_value(item.user_identity_type, "User-Identity-Type"),
                        1 if item.positive_response_requested else 0, len(item.primary_field)),
            item.primary_field,
            struct.pack(">H", len(item.secondary_field)),
            item.secondary_field,
        )))
    if isinstance(item, UserIdentityAC):
        if len(item.server_response) > 0xFFFF - 2:
            raise InvalidPduFieldError(
                f"User Identity Server-response of {len(item.server_response)} bytes is too long"
            )
        return _item(item.item_type, struct.pack(">H", len(item.server_response)) + item.server_response)
    return _item(_byte_value(item.item_type, "Item-type"), item.value)


# ---------------------------------------------------------------------------------- command sets


def decode_command_set(data: bytes) -> Dataset:
    """Decode a reassembled command set (Implicit VR Little Endian, group 0000 only; PS3.7 6.3.1).

    The element structure is checked first (pydicom silently accepts a truncated last value),
    then every element is decoded eagerly so that a broken value raises here, as
    :class:`MalformedCommandSetError`, rather than later when the caller reads it.
    """
    from pydicom.filereader import read_dataset

    data = bytes(data)
    _check_command_structure(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = read_dataset(BytesIO(data), is_implicit_VR=True, is_little_endian=True)
            for tag in dataset.keys():
                _ = dataset[tag].value
    except Exception as exc:  # pydicom fails in many ways on garbage; all mean the same here
        raise MalformedCommandSetError(f"command set of {len(data)} bytes cannot be decoded: {exc}") from None
    return dataset


@dataclass(frozen=True)
class CommandFields:
    """The command-set elements the agent acts on (PS3.7 E.1), read without pydicom: one walk over
    the elements, cheap enough for every DIMSE message of a bulk transfer."""

    command_field: int | None = None
    message_id: int | None = None
    message_id_being_responded_to: int | None = None
    status: int | None = None
    affected_sop_class_uid: str = ""
    affected_sop_instance_uid: str = ""
    data_set_type: int | None = None  # 0x0101: no data set follows the command (PS3.7 E.1)

    @property
    def has_data_set(self) -> bool:
        return self.data_set_type != NO_DATA_SET  # absent: as the requests that always carry one


NO_DATA_SET = 0x0101
_US_FIELDS = {0x0100: "command_field", 0x0110: "message_id", 0x0120: "message_id_being_responded_to",
              0x0800: "data_set_type", 0x0900: "status"}
_UI_FIELDS = {0x0002: "affected_sop_class_uid", 0x1000: "affected_sop_instance_uid"}


def announces_data_set(data: bytes) -> bool:
    """What :attr:`CommandFields.has_data_set` says of ``data``, read with a walk over its element
    headers only, cheap enough for the framer to run on every command set: False only for a Command
    Data Set Type (0000,0800) of 0101H. A command set whose element structure is broken counts as
    announcing one (:func:`read_command_fields` refuses it: the relay aborts the association)."""
    pos, end = 0, len(data) - 8
    announced = True
    while pos <= end:
        group, element, length = _ELEMENT_HEADER.unpack_from(data, pos)
        if group != 0x0000 or length > end - pos:  # outside group 0000, past the end, undefined length
            return True
        if element == 0x0800:  # the last one counts, as in read_command_fields
            announced = length != 2 or data[pos + 8:pos + 10] != _NO_DATA_SET_BYTES
        pos += 8 + length
    return announced if pos == len(data) else True  # stray bytes at the end: not a command set


_ELEMENT_HEADER = struct.Struct("<HHI")
_NO_DATA_SET_BYTES = b"\x01\x01"  # 0101H, little endian


def read_command_fields(data: bytes) -> CommandFields:
    """The fields of :class:`CommandFields` from a reassembled command set (Implicit VR Little
    Endian, group 0000); MalformedCommandSetError when its structure or one of them is broken."""
    _check_command_structure(data)
    values: dict[str, object] = {}
    pos = 0
    while pos < len(data):
        _, element, length = struct.unpack_from("<HHI", data, pos)
        value = data[pos + 8:pos + 8 + length]
        pos += 8 + length
        if element in _US_FIELDS:
            if length != 2:
                raise MalformedCommandSetError(f"command set element (0000,{element:04X}) has length {length} (US: 2)")
            values[_US_FIELDS[element]] = struct.unpack("<H", value)[0]
        elif element in _UI_FIELDS:
            try:
                values[_UI_FIELDS[element]] = value.decode("ascii").rstrip("\0 ")
            except UnicodeDecodeError:
                raise MalformedCommandSetError(f"command set element (0000,{element:04X}) is not a UID") from None
    return CommandFields(**values)  # type: ignore[arg-type]


def _check_command_structure(data: bytes) -> None:
    """Walk the (tag, 4-byte length, value) elements: group 0000, defined lengths, no stray bytes."""
    pos = 0
    while pos < len(data):
        if len(data) - pos < 8:
            raise MalformedCommandSetError(
                f"command set ends with {len(data) - pos} stray bytes (an element header has 8)"
            )
        group, element, length = struct.unpack_from("<HHI", data, pos)
        if group != 0x0000:
            raise MalformedCommandSetError(
                f"command set holds element ({group:04X},{element:04X}) outside group 0000 (PS3.7 6.3.1)"
            )
        if length == 0xFFFFFFFF:
            raise MalformedCommandSetError(f"command set element (0000,{element:04X}) has an undefined length")
        pos += 8 + length
        if pos > len(data):
            raise MalformedCommandSetError(
                f"command set element (0000,{element:04X}) with length {length} runs past the end of the command set"
            )
