"""What happened, as typed values free of I/O: one :class:`AuditEvent` per audit message.

Events are raised where things happen (the supervisor, and the card-session process that relays
associations) and written by the supervisor alone, so every event round-trips through a plain
JSON-able dict (:meth:`AuditEvent.to_dict` / :meth:`AuditEvent.from_dict`) to cross the
supervisor channel. ``from_dict`` is strict: an unknown key or a wrong type is an
:class:`~agent.audit.errors.AuditEventError`, never a silently different event.

Build events with the class methods (``AuditEvent.user_login(...)`` etc.); each documents what it
needs. How each kind becomes a DICOM audit message is in :mod:`agent.audit.messages` and
docs/audit.md.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from enum import Enum, IntEnum
from typing import Any

from dicom_card_agent.audit.errors import AuditEventError

FORMAT_VERSION = 1


class EventKind(str, Enum):
    USER_LOGIN = "user-login"
    USER_LOGOUT = "user-logout"
    SECURITY_ALERT = "security-alert"
    APPLICATION_START = "application-start"
    APPLICATION_STOP = "application-stop"
    ASSOCIATION_BEGIN = "association-begin"
    ASSOCIATION_END = "association-end"
    INSTANCES_TRANSFERRED = "instances-transferred"
    QUERY = "query"


class Outcome(IntEnum):
    """DICOM EventOutcomeIndicator (PS3.15 A.5.1)."""

    SUCCESS = 0
    MINOR_FAILURE = 4  # action restarted, e.g. a wrong PIN with tries left
    SERIOUS_FAILURE = 8  # action terminated
    MAJOR_FAILURE = 12  # reporting application now unavailable


class AlertType(str, Enum):
    """What a security alert is about; the DCM EventTypeCode of each is in messages.py."""

    TLS_VERIFICATION_FAILED = "tls-verification-failed"  # the remote node's certificate was refused
    LOCAL_PEER_REFUSED = "local-peer-refused"  # a local process not allowed to use the tunnel
    PIN_LOCKED = "pin-locked"  # the token's user PIN is now locked
    PIN_FINAL_TRY = "pin-final-try"  # one PIN try left
    MALFORMED_PDU = "malformed-pdu"  # a peer sent something that is not DICOM upper layer
    SOFTWARE_CONFIGURATION = "software-configuration"  # the configuration was reloaded (SIGHUP), or refused
    REVOCATION_UNCHECKED = "revocation-unchecked"  # a peer let in without a revocation answer ("prefer")


class SessionEnd(str, Enum):
    """Why a card session ended (USER_LOGOUT)."""

    CARD_REMOVED = "card-removed"
    CARD_SWAPPED = "card-swapped"
    LOCKED = "locked"  # `card-agent lock`
    IDLE_TIMEOUT = "idle-timeout"
    CERTIFICATE_EXPIRED = "certificate-expired"  # the signed-in certificate's notAfter passed
    CERTIFICATE_REVOKED = "certificate-revoked"  # a CRL or OCSP answer learnt during the session revokes it
    AGENT_STOPPED = "agent-stopped"

    @property
    def by_user(self) -> bool:
        """Whether the person ended the session (else the agent did: PS3.15 A.5.3.12 note)."""
        return self in (SessionEnd.CARD_REMOVED, SessionEnd.CARD_SWAPPED, SessionEnd.LOCKED)


class Direction(str, Enum):
    """Which way DICOM instances travelled over a tunnel."""

    TO_REMOTE = "to-remote"  # C-STORE-RQ sent by the local application (storescu -> PACS)
    FROM_REMOTE = "from-remote"  # C-STORE-RQ sent by the remote node (C-GET sub-operations, C-MOVE deliveries)


@dataclass(frozen=True)
class User:
    """The clinician of the card session: the certificate on the token."""

    subject: str  # RFC 4514, e.g. "CN=Alice Example,O=Example Hospital"; "" if not known yet
    issuer: str = ""
    token_label: str = ""
    token_serial: str = ""

    @property
    def common_name(self) -> str:
        for part in self.subject.split(","):
            name, _, value = part.strip().partition("=")
            if name.upper() == "CN" and value:
                return value
        return self.subject


@dataclass(frozen=True)
class LocalPeer:
    """The local process on the other end of a tunnel listener (from SO_PEERCRED or /proc)."""

    uid: int | None = None
    pid: int | None = None
    process: str = ""  # process name, e.g. "storescu"
    listen: str = ""  # the listener it connected to: "unix:/path" or "127.0.0.1:11112"


@dataclass(frozen=True)
class RemoteNode:
    host: str
    port: int
    subject: str = ""  # its TLS client certificate's subject (RFC 4514), when it connected to the agent

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Instance:
    """One SOP Instance seen in a C-STORE command set (Affected SOP Class/Instance UID); the study
    is known only if the caller looked into the data set."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str = ""


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class AuditEvent:
    """One audited event. Fields a kind does not use stay at their defaults."""

    kind: EventKind
    outcome: Outcome = Outcome.SUCCESS
    time: datetime = field(default_factory=_now)  # aware; converted to UTC
    reason: str = ""  # EventOutcomeDescription, or the alert description
    user: User | None = None
    tunnel: str = ""
    local_peer: LocalPeer | None = None
    remote: RemoteNode | None = None
    calling_ae: str = ""
    called_ae: str = ""
    alert: AlertType | None = None
    session_end: SessionEnd | None = None
    direction: Direction | None = None
    instances: tuple[Instance, ...] = ()
    patient_id: str = ""
    patient_name: str = ""
    bytes_up: int | None = None
    bytes_down: int | None = None
    remote_requestor: bool = False  # the remote node requested the association (an inbound listener)
    sop_class_uid: str = ""  # QUERY: the SOP Class queried
    query: str = ""  # QUERY: the C-FIND Identifier, base64 (PS3.15 ParticipantObjectQuery)
    transfer_syntax: str = ""  # QUERY: the Identifier's transfer syntax
    agent_pid: int = field(default_factory=os.getpid)  # the agent process that saw it
    id: str = field(default_factory=lambda: uuid.uuid4().hex)  # unique; not part of the XML

    def __post_init__(self) -> None:
        if self.time.tzinfo is None:
            raise AuditEventError("an audit event time must carry a time zone (use datetime.now(timezone.utc))")
        if self.time.utcoffset():
            object.__setattr__(self, "time", self.time.astimezone(timezone.utc))
        if self.kind is EventKind.SECURITY_ALERT and self.alert is None:
            raise AuditEventError("a security alert needs its alert type")
        if self.kind is EventKind.USER_LOGOUT and self.session_end is None:
            raise AuditEventError("a logout event needs the reason the session ended (SessionEnd)")
        if self.kind in (EventKind.USER_LOGIN, EventKind.USER_LOGOUT) and self.user is None:
            raise AuditEventError(f"a {self.kind.value} event needs the user")
        if self.kind is EventKind.INSTANCES_TRANSFERRED and not self.instances:
            raise AuditEventError("an instances-transferred event needs at least one instance")
        if self.kind is EventKind.QUERY and not self.sop_class_uid:
            raise AuditEventError("a query event needs the SOP Class queried")

    # -- constructors, one per kind ---------------------------------------------------------

    @classmethod
    def user_login(cls, user: User, *, outcome: Outcome = Outcome.SUCCESS, reason: str = "",
                   **extra: Any) -> AuditEvent:
        """Card sign-in; a refused PIN is a login with ``outcome=MINOR_FAILURE`` (tries left) or
        ``SERIOUS_FAILURE``, ``reason`` the message shown to the user."""
        return cls(EventKind.USER_LOGIN, outcome=outcome, reason=reason, user=user, **extra)

    @classmethod
    def user_logout(cls, user: User, session_end: SessionEnd, *, reason: str = "", **extra: Any) -> AuditEvent:
        """The card session ended: card pulled or swapped, ``lock``, idle timeout, the certificate
        expired or was revoked, agent stop."""
        return cls(EventKind.USER_LOGOUT, user=user, session_end=session_end,
                   reason=reason or session_end.value.replace("-", " "), **extra)

    @classmethod
    def security_alert(cls, alert: AlertType, reason: str, *, outcome: Outcome | None = None,
                       **extra: Any) -> AuditEvent:
        """A security alert. By alert type it uses: TLS_VERIFICATION_FAILED ``remote``
        (+ ``tunnel``, ``user``); LOCAL_PEER_REFUSED ``local_peer`` (its ``listen``) + ``tunnel``;
        PIN_LOCKED / PIN_FINAL_TRY ``user`` (token label and serial at least); MALFORMED_PDU
        ``remote`` or ``local_peer`` (whoever sent it) + ``tunnel``. The default outcome is
        SUCCESS (informative) for a final PIN try, SERIOUS_FAILURE for a locked PIN, else
        MINOR_FAILURE (the agent refused: mitigation worked)."""
        if outcome is None:
            outcome = {AlertType.PIN_FINAL_TRY: Outcome.SUCCESS,
                       AlertType.PIN_LOCKED: Outcome.SERIOUS_FAILURE}.get(alert, Outcome.MINOR_FAILURE)
        return cls(EventKind.SECURITY_ALERT, outcome=outcome, reason=reason, alert=alert, **extra)

    @classmethod
    def application_start(cls, **extra: Any) -> AuditEvent:
        """The agent started (``card-agent run``), after the audit trail opened."""
        return cls(EventKind.APPLICATION_START, **extra)

    @classmethod
    def application_stop(cls, *, reason: str = "", outcome: Outcome = Outcome.SUCCESS, **extra: Any) -> AuditEvent:
        """The agent stops (``outcome=MAJOR_FAILURE`` if it stops because of an error)."""
        return cls(EventKind.APPLICATION_STOP, reason=reason, outcome=outcome, **extra)

    @classmethod
    def association_begin(cls, *, tunnel: str, remote: RemoteNode, calling_ae: str, called_ae: str,
                          local_peer: LocalPeer | None = None, user: User | None = None,
                          outcome: Outcome = Outcome.SUCCESS, reason: str = "", **extra: Any) -> AuditEvent:
        """An A-ASSOCIATE-RQ went through the tunnel (``outcome`` a failure if it was rejected)."""
        return cls(EventKind.ASSOCIATION_BEGIN, tunnel=tunnel, remote=remote, calling_ae=calling_ae,
                   called_ae=called_ae, local_peer=local_peer, user=user, outcome=outcome, reason=reason, **extra)

    @classmethod
    def association_end(cls, *, tunnel: str, remote: RemoteNode, calling_ae: str, called_ae: str,
                        local_peer: LocalPeer | None = None, user: User | None = None,
                        bytes_up: int | None = None, bytes_down: int | None = None,
                        outcome: Outcome = Outcome.SUCCESS, reason: str = "", **extra: Any) -> AuditEvent:
        """The association ended: released (SUCCESS) or aborted / connection lost (a failure,
        ``reason`` says which)."""
        return cls(EventKind.ASSOCIATION_END, tunnel=tunnel, remote=remote, calling_ae=calling_ae,
                   called_ae=called_ae, local_peer=local_peer, user=user, bytes_up=bytes_up,
                   bytes_down=bytes_down, outcome=outcome, reason=reason, **extra)

    @classmethod
    def instances_transferred(cls, *, tunnel: str, remote: RemoteNode, calling_ae: str, called_ae: str,
                              instances: tuple[Instance, ...] | list[Instance],
                              direction: Direction = Direction.TO_REMOTE, local_peer: LocalPeer | None = None,
                              user: User | None = None, patient_id: str = "", patient_name: str = "",
                              outcome: Outcome = Outcome.SUCCESS, reason: str = "", **extra: Any) -> AuditEvent:
        """Answered C-STOREs of one association and patient, as a relay reports them (in batches as
        the responses pass, agent/tunnel/transfers.py); ``outcome`` a failure if some were not stored."""
        return cls(EventKind.INSTANCES_TRANSFERRED, tunnel=tunnel, remote=remote, calling_ae=calling_ae,
                   called_ae=called_ae, instances=tuple(instances), direction=direction,
                   local_peer=local_peer, user=user, patient_id=patient_id, patient_name=patient_name,
                   outcome=outcome, reason=reason, **extra)

    @classmethod
    def query_event(cls, *, tunnel: str, remote: RemoteNode, calling_ae: str, called_ae: str, sop_class_uid: str,
                    query: str, transfer_syntax: str = "", local_peer: LocalPeer | None = None,
                    user: User | None = None, patient_id: str = "", patient_name: str = "",
                    outcome: Outcome = Outcome.SUCCESS, reason: str = "", **extra: Any) -> AuditEvent:
        """A C-FIND request went through a tunnel (PS3.15 A.5.3.10): ``query`` its Identifier,
        base64; the patient if the query keys name one."""
        return cls(EventKind.QUERY, tunnel=tunnel, remote=remote, calling_ae=calling_ae, called_ae=called_ae,
                   sop_class_uid=sop_class_uid, query=query, transfer_syntax=transfer_syntax,
                   local_peer=local_peer, user=user, patient_id=patient_id, patient_name=patient_name,
                   outcome=outcome, reason=reason, **extra)

    # -- helpers --------------------------------------------------------------------------

    def split(self, max_instances: int) -> list[AuditEvent]:
        """This event as several with at most ``max_instances`` instances each (same time and
        participants, new ids), e.g. to stay under the channel's message size."""
        if max_instances < 1:
            raise ValueError("max_instances must be at least 1")
        if len(self.instances) <= max_instances:
            return [self]
        return [replace(self, instances=self.instances[i:i + max_instances], id=uuid.uuid4().hex)
                for i in range(0, len(self.instances), max_instances)]

    @property
    def study_uids(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for instance in self.instances:
            seen.setdefault(instance.study_uid, None)
        return tuple(seen)

    # -- the channel format -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; fields at their defaults are left out (small channel messages)."""
        data: dict[str, Any] = {"v": FORMAT_VERSION, "id": self.id, "kind": self.kind.value,
                                "time": self.time.isoformat(), "agent_pid": self.agent_pid}
        if self.outcome is not Outcome.SUCCESS:
            data["outcome"] = int(self.outcome)
        for name in _TEXT_FIELDS:
            if getattr(self, name):
                data[name] = getattr(self, name)
        if self.remote_requestor:
            data["remote_requestor"] = True
        for name in ("alert", "session_end", "direction"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name).value
        for name in ("bytes_up", "bytes_down"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        if self.user is not None:
            data["user"] = {k: v for k, v in vars(self.user).items() if v or k == "subject"}
        if self.local_peer is not None:
            data["local_peer"] = {k: v for k, v in vars(self.local_peer).items() if v not in (None, "")}
        if self.remote is not None:
            data["remote"] = {"host": self.remote.host, "port": self.remote.port}
            if self.remote.subject:
                data["remote"]["subject"] = self.remote.subject
        if self.instances:
            data["instances"] = [[i.sop_class_uid, i.sop_instance_uid] + ([i.study_uid] if i.study_uid else [])
                                 for i in self.instances]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> AuditEvent:
        """The event :meth:`to_dict` described; :class:`AuditEventError` if ``data`` is not one."""
        reader = _Reader(data, "audit event")
        version = reader.take("v", int)
        if version != FORMAT_VERSION:
            raise AuditEventError(f"audit event format version {version} is not supported (expected {FORMAT_VERSION})")
        kind = reader.enum("kind", EventKind, required=True)
        time_text = reader.take("time", str)
        try:
            time = datetime.fromisoformat(time_text)
        except ValueError:
            raise AuditEventError(f"audit event: time {time_text!r} is not an ISO 8601 date and time") from None
        user = reader.table("user")
        peer = reader.table("local_peer")
        remote = reader.table("remote")
        instances = []
        for index, item in enumerate(reader.take("instances", list, [])):
            if (not isinstance(item, list) or len(item) not in (2, 3)
                    or not all(isinstance(part, str) and part for part in item)):
                raise AuditEventError(f"audit event: instances[{index}] must be [sop_class_uid, sop_instance_uid"
                                      f"(, study_uid)], not {item!r}")
            instances.append(Instance(*item))
        values: dict[str, Any] = dict(
            kind=kind,
            id=reader.take("id", str),
            time=time,
            agent_pid=reader.take("agent_pid", int),
            outcome=reader.enum("outcome", Outcome, Outcome.SUCCESS),
            alert=reader.enum("alert", AlertType),
            session_end=reader.enum("session_end", SessionEnd),
            direction=reader.enum("direction", Direction),
            instances=tuple(instances),
            bytes_up=reader.take("bytes_up", int, None),
            bytes_down=reader.take("bytes_down", int, None),
        )
        for name in _TEXT_FIELDS:
            values[name] = reader.take(name, str, "")
        values["remote_requestor"] = reader.take("remote_requestor", bool, False)
        if user is not None:
            values["user"] = User(subject=user.take("subject", str, ""), issuer=user.take("issuer", str, ""),
                                  token_label=user.take("token_label", str, ""),
                                  token_serial=user.take("token_serial", str, ""))
            user.done()
        if peer is not None:
            values["local_peer"] = LocalPeer(uid=peer.take("uid", int, None), pid=peer.take("pid", int, None),
                                             process=peer.take("process", str, ""),
                                             listen=peer.take("listen", str, ""))
            peer.done()
        if remote is not None:
            values["remote"] = RemoteNode(host=remote.take("host", str), port=remote.take("port", int),
                                          subject=remote.take("subject", str, ""))
            remote.done()
        reader.done()
        return cls(**values)


_TEXT_FIELDS = ("reason", "tunnel", "calling_ae", "called_ae", "patient_id", "patient_name", "sop_class_uid", "query",
                "transfer_syntax")


class _Reader:
    """Typed, strict access to one dict of :meth:`AuditEvent.from_dict` input."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise AuditEventError(f"{where} must be a JSON object, not {type(data).__name__}")
        self.data = dict(data)
        self.where = where

    def take(self, key: str, kind: type, default: Any = ...) -> Any:
        if key not in self.data:
            if default is ...:
                raise AuditEventError(f"{self.where}: missing {key!r}")
            return default
        value = self.data.pop(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise AuditEventError(f"{self.where}: {key} must be {kind.__name__}, not {value!r}")
        return value

    def enum(self, key: str, kind: type[Enum], default: Any = None, *, required: bool = False) -> Any:
        if key not in self.data:
            if required:
                raise AuditEventError(f"{self.where}: missing {key!r}")
            return default
        value = self.data.pop(key)
        try:
            return kind(value)
        except ValueError:
            choices = ", ".join(repr(member.value) for member in kind)
            raise AuditEventError(f"{self.where}: {key} {value!r} is not one of {choices}") from None

    def table(self, key: str) -> _Reader | None:
        if key not in self.data:
            return None
        return _Reader(self.data.pop(key), f"{self.where}.{key}")

    def done(self) -> None:
        if self.data:
            raise AuditEventError(f"{self.where}: unknown key(s) {', '.join(sorted(self.data))}")
