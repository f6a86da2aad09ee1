"""What the supervisor sees, and what card sessions report, as audit events (agent/audit).

One :class:`AuditRecorder` per agent; it does nothing when the configuration has no ``[audit]``.
Card-session processes report associations, TLS failures and malformed PDUs over their reports
channel (agent/session/supervisor.py); the supervisor is the single writer of the audit sinks.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from dicom_card_agent import logline
from dicom_card_agent.audit.config import AuditConfig
from dicom_card_agent.audit.events import (
    AlertType,
    AuditEvent,
    Direction,
    Instance,
    LocalPeer,
    Outcome,
    RemoteNode,
    SessionEnd,
    User,
)
from dicom_card_agent.audit.trail import AuditTrail
from dicom_card_agent.card.watcher import Card
from dicom_card_agent.dicom.association import STORED_STATUSES
from dicom_card_agent.session.channel import MAX_REPORT, REPORT_DROPPED, REPORTS_NOT_SENT, SHORTENED
from dicom_card_agent.session.identity import SignedIn
from dicom_card_agent.token.discovery import PinState
from dicom_card_agent.token.login import LoginError, PinFinalTryError, PinLockedError, WrongPinError
from dicom_card_agent.tunnel.admission import Throttle, refused_user
from dicom_card_agent.tunnel.peer import Peer

log = logging.getLogger("agent.audit")

_SESSION_ENDS = {
    "card removed": SessionEnd.CARD_REMOVED,
    "card swapped": SessionEnd.CARD_SWAPPED,
    "locked": SessionEnd.LOCKED,
    "idle timeout": SessionEnd.IDLE_TIMEOUT,
    "certificate expired": SessionEnd.CERTIFICATE_EXPIRED,
    "certificate revoked": SessionEnd.CERTIFICATE_REVOKED,
}


def _node(address: str, subject: str = "") -> RemoteNode:
    host, _, port = address.rpartition(":")
    return RemoteNode(host.strip("[]"), int(port) if port.isdigit() else 0, subject)


# agent/tunnel/peer.py Peer.describe(): "uid 1000 pid 4242 (storescu) from 127.0.0.1:53412"
_PEER = re.compile(r"uid (?P<uid>\d+|unknown) pid (?P<pid>\d+|unknown)(?: \((?P<process>.*)\))? from (?P<address>.*)")


def _local_peer(fields: dict[str, Any]) -> LocalPeer:
    """The local side of an association: the application (a tunnel) or the storage SCP it
    forwards to (an inbound listener)."""
    if fields.get("direction") == "inbound":
        return LocalPeer(listen=fields.get("local", ""))
    match = _PEER.fullmatch(fields.get("local", ""))
    if match is None:
        return LocalPeer()
    uid, pid = match["uid"], match["pid"]
    return LocalPeer(uid=int(uid) if uid.isdigit() else None, pid=int(pid) if pid.isdigit() else None,
                     process=match["process"] or "")


def _shortened_note(fields: dict[str, Any]) -> str:
    """What a report made to fit its channel (agent/session/channel.py fitted) left out, for the
    records made from it; ``""`` for a whole one."""
    shortened = fields.get(SHORTENED)
    if not shortened:
        return ""
    left_out = "".join(f", {count} {name.replace('_', ' ')} not reported"
                       for name, count in shortened.get("left_out", {}).items())
    channel = shortened.get("channel", MAX_REPORT)
    return (f"the card session's report was shortened to fit its channel ({channel} bytes): texts cut at "
            f"{shortened['text_limit']} characters{left_out}")


def _with_note(note: str, reason: str) -> str:
    return f"{reason}; {note}" if reason and note else reason or note


class AuditRecorder:
    def __init__(self, config: AuditConfig | None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.trail = AuditTrail(config) if config is not None else None
        self.user: User | None = None
        # One Security Alert a minute per tunnel and refused user, then their count: another user
        # connecting in a loop must not write the audit repository (or, under on_failure =
        # "refuse", the audit disk and with it every association) full.
        self._peer_refusals: Throttle[tuple[str, int | None], LocalPeer] = Throttle(clock=clock)

    def record(self, event: AuditEvent) -> None:
        if self.trail is not None:
            self.trail.record(event)

    def record_all(self, events: list[AuditEvent]) -> None:
        """The records of one report, with one durable write per sink (AuditTrail.record_all)."""
        if self.trail is not None and events:
            self.trail.record_all(events)

    def close(self) -> None:
        if self.trail is not None:
            self.trail.close()

    @property
    def refuses_when_failing(self) -> bool:
        """[audit] on_failure = "refuse": every association is admitted by asking :meth:`refusal`."""
        return self.trail is not None and self.trail.refuses

    def refusal(self) -> str | None:
        """Why new associations are refused ([audit] on_failure = "refuse"), or ``None``."""
        return self.trail.refusal() if self.trail is not None else None

    # -- the agent and the card ---------------------------------------------------------------

    def application_start(self) -> None:
        self.record(AuditEvent.application_start())

    def application_stop(self, reason: str = "", *, failed: bool = False) -> None:
        """``failed``: the agent stops because of an error, not because it was asked to."""
        self.record_refusal_counts(all_counted=True)
        self.record(AuditEvent.application_stop(reason=reason, outcome=Outcome.MAJOR_FAILURE if failed
                                                else Outcome.SUCCESS))

    def signed_in(self, signed_in: SignedIn, card: Card) -> User:
        """The Login; the user its card session's reports are recorded for (:meth:`session_report`)."""
        self.user = User(signed_in.files.subject, signed_in.files.issuer, card.label, card.serial)
        self.record(AuditEvent.user_login(self.user))
        return self.user

    def sign_in_failed(self, card: Card, error: LoginError) -> None:
        user = User("", "", card.label, card.serial)
        locked = isinstance(error, PinLockedError) or (
            isinstance(error, WrongPinError) and error.pin_state is PinState.LOCKED)
        self.record(AuditEvent.user_login(user, outcome=Outcome.SERIOUS_FAILURE if locked else Outcome.MINOR_FAILURE,
                                          reason=str(error)))
        if locked:
            self.record(AuditEvent.security_alert(AlertType.PIN_LOCKED, str(error), user=user))
        elif isinstance(error, PinFinalTryError) or (
                isinstance(error, WrongPinError) and error.pin_state is PinState.FINAL_TRY):
            self.record(AuditEvent.security_alert(AlertType.PIN_FINAL_TRY, str(error), user=user))

    def sign_in_not_made(self, card: Card | None, reason: str, *, cancelled: bool) -> None:
        """A sign-in that ended before any PIN was tried: a Login that failed, ``reason`` why.
        ``cancelled``: the clinician gave it up (Cancel, the dialog's timeout, the card pulled),
        outcome 4, as she may sign in again; else the card could not be used (it could not be read,
        holds no usable identity, the PIN dialog could not be shown), outcome 8. ``card`` is None
        when the card was never read (known by its reader alone: ``reason`` names it)."""
        user = User("", "", card.label, card.serial) if card is not None else User("")
        self.record(AuditEvent.user_login(user, outcome=Outcome.MINOR_FAILURE if cancelled else Outcome.SERIOUS_FAILURE,
                                          reason=reason))

    def signed_out(self, reason: str) -> None:
        if self.user is None:
            return
        self.record(AuditEvent.user_logout(self.user, _SESSION_ENDS.get(reason, SessionEnd.AGENT_STOPPED),
                                           reason=reason))
        self.user = None

    def peer_refused(self, tunnel: str, listen: str, peer: Peer, message: str) -> None:
        self.session_report("peer-refused", {"tunnel": tunnel, "listen": listen, "uid": peer.uid, "pid": peer.pid,
                                             "message": message})

    def record_refusal_counts(self, *, all_counted: bool = False) -> None:
        """The local connections refused since the one recorded, once its minute is over (the card
        loop calls this at each turn; ``all_counted`` when the agent stops)."""
        for (tunnel, uid), count, seconds, local in self._peer_refusals.expired(all_counted=all_counted):
            message = (f"refused {count} more local connection{'s' if count > 1 else ''} from "
                       f"{refused_user(uid)} in the last {seconds:.0f} s")
            self.record(AuditEvent.security_alert(AlertType.LOCAL_PEER_REFUSED, message, tunnel=tunnel,
                                                  local_peer=local))

    def configuration_changed(self, message: str, *, applied: bool) -> None:
        """SIGHUP: a reload put into effect (informative) or refused (the old configuration goes on)."""
        self.record(AuditEvent.security_alert(AlertType.SOFTWARE_CONFIGURATION, message,
                                              outcome=Outcome.SUCCESS if applied else Outcome.MINOR_FAILURE))

    # -- what card sessions report ----------------------------------------------------------------

    def session_report(self, kind: str, fields: dict[str, Any], user: User | None = None) -> None:
        """A report from a card-session process (agent/tunnel/relay.py names the kinds and fields).
        One this code cannot read (a kind or fields of another build: a bug, as a card-session
        process of another build does not start) is an audit failure: what it said is missing from
        the trail (AuditTrail.not_recorded). ``user``: who the reporting card session was signed in
        as, given by the caller: its last reports may be read after its Logout, the next card's
        Login even."""
        if kind == REPORT_DROPPED:  # the supervisor read it and had to drop it
            self._report_dropped(fields)
            return
        if kind == REPORTS_NOT_SENT:  # an ending card session could not send them in the time it had
            associations, others = fields["associations"], fields["others"]
            what = "; ".join(([f"{associations} association(s): the instances each transferred, its end"]
                              if associations else []) + ([f"{others} other report(s)"] if others else []))
            why = (f"the card session ended before it could send all it had to report ({what}): its relays were "
                   "still making them, or the supervisor held as many unrecorded as it keeps")
            if self.trail is not None:
                self.trail.not_sent(associations + others, why)
            else:
                log.error("%s", why)
            return
        try:
            self._session_report(kind, fields, user)
        except Exception as error:  # whatever a report holds, the trail must say it lost one
            if self.trail is None:
                raise  # nothing lost: no [audit]; the report reader logs it
            self.trail.not_recorded(logline.printable(str(kind)), f"{type(error).__name__}: {error}")

    def reports_given_up(self, count: int, waited: float) -> None:
        """The agent stopped with ``count`` reports of an ended card session read and not recorded
        after ``waited`` seconds: counted lost and logged."""
        why = (f"the agent stopped before it had recorded {count} report(s) of an ended card session "
               f"(waited {waited:g} s for them)")
        if self.trail is not None:
            self.trail.not_sent(count, why)
        else:
            log.error("%s", why)

    def _report_dropped(self, fields: dict[str, Any]) -> None:
        """A report the supervisor read and dropped (over MAX_REPORT, or not readable: a card session
        of another build, a bug; this one makes its reports fit and sends one at a time): lost, as
        one the trail cannot record."""
        kind, why = logline.printable(str(fields.get("kind", "unknown"))), logline.printable(str(fields.get("why", "")))
        if self.trail is not None:
            self.trail.not_recorded(kind, why)
        else:  # no [audit]: nothing missing from a trail, but a report (a PACS problem's notice) is lost
            log.error("a report of the card session (%s) was dropped: %s", kind, why)

    def _session_report(self, kind: str, fields: dict[str, Any], user: User | None) -> None:
        # A report the card session shortened to fit its channel: each record made from it says so.
        note = functools.partial(_with_note, _shortened_note(fields))
        if kind == "peer-refused":  # on a listener lent to the card session (agent/tunnel/lent_listeners.py)
            local = LocalPeer(uid=fields["uid"], pid=fields["pid"], listen=fields["listen"])
            self.record_refusal_counts()
            if self._peer_refusals.occurred((fields["tunnel"], local.uid), local):
                self.record(AuditEvent.security_alert(AlertType.LOCAL_PEER_REFUSED, note(fields["message"]),
                                                      tunnel=fields["tunnel"], local_peer=local))
        elif kind == "tls-failure":
            self.record(AuditEvent.security_alert(AlertType.TLS_VERIFICATION_FAILED, note(fields["reason"]),
                                                  tunnel=fields["tunnel"], remote=_node(fields["remote"]),
                                                  user=user))
        elif kind == "revocation-unchecked":  # allowed (revocation = "prefer"): the alert informs, nothing failed
            self.record(AuditEvent.security_alert(AlertType.REVOCATION_UNCHECKED, note(fields["reason"]),
                                                  tunnel=fields["tunnel"], remote=_node(fields["remote"]),
                                                  user=user, outcome=Outcome.SUCCESS))
        elif kind == "security-alert" and fields["what"] == "malformed-pdu":
            self.record(AuditEvent.security_alert(AlertType.MALFORMED_PDU, note(fields["reason"]),
                                                  tunnel=fields["tunnel"], remote=_node(fields["remote"]),
                                                  user=user))
        elif kind == "security-alert":  # an association the tunnel's AE title rules refused
            self.record(AuditEvent.association_begin(**self._association(fields, user), outcome=Outcome.MINOR_FAILURE,
                                                     reason=note(fields["reason"])))
        elif kind == "association-begin":
            self.record(AuditEvent.association_begin(**self._association(fields, user), reason=note("")))
        elif kind == "association-end":
            clean = fields["end"] == "released" and not fields.get("failure")
            self.record(AuditEvent.association_end(
                **self._association(fields, user), outcome=Outcome.SUCCESS if clean else Outcome.MINOR_FAILURE,
                reason=note("" if clean else (fields.get("failure") or fields["end"]))))
        elif kind == "instances-transferred":
            self._instances_transferred(fields, note, user)
        elif kind == "query":
            self.record(AuditEvent.query_event(
                **self._association(fields, user), sop_class_uid=fields["sop_class_uid"], query=fields["identifier"],
                transfer_syntax=fields["transfer_syntax"], patient_id=fields["patient_id"],
                patient_name=fields["patient_name"],
                reason=note("query keys cut short" if fields.get("truncated") else "")))
        else:
            raise ValueError("a kind of report this agent does not know")

    def _instances_transferred(self, fields: dict[str, Any], note: Callable[[str], str], user: User | None) -> None:
        """One batch of answered C-STOREs: one message per direction and patient (PS3.15 A.5.3.7:
        one patient per message), each study a participant object."""
        inbound = fields["direction"] == "inbound"
        groups: dict[tuple[bool, str, str], list[dict[str, Any]]] = {}
        for instance in fields["instances"]:
            from_remote = instance.get("from_remote", inbound)
            groups.setdefault((from_remote, instance["patient_id"], instance["patient_name"]), []).append(instance)
        events: list[AuditEvent] = []
        try:
            for (from_remote, patient_id, patient_name), seen in groups.items():
                failed = sum(1 for i in seen if i["status"] not in STORED_STATUSES)
                events.append(AuditEvent.instances_transferred(
                    **self._association(fields, user), patient_id=patient_id, patient_name=patient_name,
                    instances=[Instance(i["sop_class_uid"], i["sop_instance_uid"], i["study_uid"]) for i in seen],
                    direction=Direction.FROM_REMOTE if from_remote else Direction.TO_REMOTE,
                    outcome=Outcome.MINOR_FAILURE if failed else Outcome.SUCCESS,
                    reason=note(f"{failed} of {len(seen)} not stored" if failed else "")))
        finally:
            # One durable write for all (an ending card session has END_GRACE_SECONDS to send its
            # reports); those made before a field this code cannot read are recorded all the same.
            self.record_all(events)

    def _association(self, fields: dict[str, Any], user: User | None) -> dict[str, Any]:
        return {"tunnel": fields["tunnel"], "remote": _node(fields["remote"], fields.get("remote_subject", "")),
                "calling_ae": fields["calling_ae_title"], "called_ae": fields["called_ae_title"], "user": user,
                "local_peer": _local_peer(fields), "remote_requestor": fields.get("direction") == "inbound"}
