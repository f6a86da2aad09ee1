"""Audit reports of the instances an association transfers, made as their C-STORE responses pass.

A relay used to report its C-STOREs when the association ended, so a process killed mid-transfer
left instances at the PACS and none in the audit trail. Now each answered C-STORE joins a batch
that is reported (over the reports channel, to the supervisor that writes the trail) once its
oldest instance waited ``FLUSH_AFTER`` seconds, once it holds ``INSTANCES_PER_REPORT`` instances,
and at the end of the association. The relay's poll wakes in time for the deadline (see
:meth:`TransferBatch.poll_timeout_ms`). No I/O here but the ``report`` callback.
"""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Callable
from typing import Any

from dicom_card_agent.dicom.association import Query, StoredInstance
from dicom_card_agent.session.channel import clipped

FLUSH_AFTER = 0.5  # seconds; with the poll and the channel, an answered instance is on disk within a second
INSTANCES_PER_REPORT = 100  # one report must fit the reports channel (agent/session/channel.py MAX_REPORT)
INSTANCE_TEXT_LIMIT = 1024  # characters of each text of an instance in a report
QUERY_KEYS_LIMIT = 16 * 1024  # bytes of a C-FIND Identifier in a report (base64 in a 64 KiB channel message)

Report = Callable[[str, dict[str, Any]], None]
Fields = Callable[[], dict[str, Any]]  # the association's fields, as of the report


def instance_fields(instance: StoredInstance, *, requestor_is_local: bool) -> dict[str, Any]:
    """One instance as a report carries it; ``from_remote``: the PACS sent it (a retrieve). Its texts
    are clipped well above what their VRs allow (UI, LO: 64 characters; PN: three groups of 64), so
    that a full batch stays far below the reports channel's limit whatever a peer writes there."""
    return clipped({"sop_class_uid": instance.sop_class_uid, "sop_instance_uid": instance.sop_instance_uid,
                    "status": instance.status, "study_uid": instance.study_uid, "patient_id": instance.patient_id,
                    "patient_name": instance.patient_name,
                    "from_remote": instance.from_requestor != requestor_is_local}, INSTANCE_TEXT_LIMIT)


def query_fields(query: Query) -> dict[str, Any]:
    """A C-FIND request as a report carries it: the Identifier base64-encoded, as PS3.15
    ParticipantObjectQuery holds it."""
    identifier = query.identifier[:QUERY_KEYS_LIMIT]
    return {"sop_class_uid": query.sop_class_uid, "transfer_syntax": query.transfer_syntax,
            "identifier": base64.b64encode(identifier).decode("ascii"),
            "truncated": query.truncated or len(query.identifier) > QUERY_KEYS_LIMIT,
            "patient_id": query.patient_id, "patient_name": query.patient_name}


class TransferBatch:
    """The answered C-STOREs of one association not yet reported.

    The association's fields come with each call that may report, rather than being kept: a batch
    holding its relay's bound method would make a reference cycle, and every ended relay (with its
    256 KiB read buffer) would wait for the garbage collector."""

    def __init__(self, report: Report, *, requestor_is_local: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._report = report
        self._requestor_is_local = requestor_is_local
        self._clock = clock
        self._pending: list[StoredInstance] = []
        self._since: float | None = None  # when the oldest pending instance was answered

    def answered(self, instance: StoredInstance, fields: Fields) -> None:
        """The peer answered ``instance``'s C-STORE: report it within FLUSH_AFTER."""
        if instance.reported:
            return
        instance.reported = True
        if not self._pending:
            self._since = self._clock()
        self._pending.append(instance)
        if len(self._pending) >= INSTANCES_PER_REPORT:
            self.flush(fields)

    def poll_timeout_ms(self, longest: int) -> int:
        """How long the relay may wait for its sockets before the batch is due (at most ``longest``)."""
        if self._since is None:
            return longest
        left = self._since + FLUSH_AFTER - self._clock()
        return max(0, min(longest, math.ceil(left * 1000)))

    def flush_if_due(self, fields: Fields) -> None:
        if self._since is not None and self._clock() - self._since >= FLUSH_AFTER:
            self.flush(fields)

    def flush(self, fields: Fields, extra: list[StoredInstance] | None = None) -> None:
        """Report what is pending (and ``extra``: at the end, the instances never answered)."""
        instances = self._pending + [i for i in (extra or []) if not i.reported]
        self._pending, self._since = [], None
        for instance in instances:
            instance.reported = True
        if not instances:
            return
        common = fields()
        for start in range(0, len(instances), INSTANCES_PER_REPORT):
            self._report("instances-transferred", {**common, "instances": [
                instance_fields(i, requestor_is_local=self._requestor_is_local)
                for i in instances[start:start + INSTANCES_PER_REPORT]]})
