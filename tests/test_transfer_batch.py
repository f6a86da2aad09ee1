"""The batch of answered C-STOREs a relay reports (agent/tunnel/transfers.py), on a hand-driven clock."""

from __future__ import annotations

from typing import Any

from dicom_card_agent.dicom.association import StoredInstance
from dicom_card_agent.tunnel.transfers import (
    FLUSH_AFTER,
    INSTANCES_PER_REPORT,
    TransferBatch,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def batch() -> tuple[TransferBatch, Clock, list[list[str]]]:
    clock = Clock()
    reports: list[list[str]] = []

    def report(kind: str, fields: dict[str, Any]) -> None:
        assert kind == "instances-transferred" and fields["tunnel"] == "pacs"
        reports.append([i["sop_instance_uid"] for i in fields["instances"]])

    return TransferBatch(report, requestor_is_local=True, clock=clock), clock, reports


def fields() -> dict[str, Any]:
    return {"tunnel": "pacs"}


def answered(uid: str) -> StoredInstance:
    return StoredInstance("1.2.840.10008.5.1.4.1.1.2", uid, 1, status=0)


def test_answered_instances_are_reported_once_the_oldest_waited_flush_after() -> None:
    transfers, clock, reports = batch()
    assert transfers.poll_timeout_ms(1000) == 1000  # nothing pending: the relay's usual wait
    transfers.answered(answered("1.1"), fields)
    clock.now += FLUSH_AFTER / 2
    transfers.answered(answered("1.2"), fields)
    assert transfers.poll_timeout_ms(1000) == round(FLUSH_AFTER / 2 * 1000)  # wakes for the oldest
    transfers.flush_if_due(fields)
    assert reports == []
    clock.now += FLUSH_AFTER / 2
    transfers.flush_if_due(fields)
    assert reports == [["1.1", "1.2"]]
    transfers.flush_if_due(fields)
    assert reports == [["1.1", "1.2"]] and transfers.poll_timeout_ms(1000) == 1000


def test_a_full_batch_goes_at_once_and_the_end_adds_the_unanswered() -> None:
    transfers, _, reports = batch()
    instances = [answered(f"1.{n}") for n in range(INSTANCES_PER_REPORT)]
    for instance in instances:
        transfers.answered(instance, fields)
    assert len(reports) == 1 and len(reports[0]) == INSTANCES_PER_REPORT
    transfers.answered(instances[0], fields)  # reported already: never twice
    unanswered = StoredInstance("1.2.840.10008.5.1.4.1.1.2", "9.9", 2)
    transfers.flush(fields, [*instances, unanswered])
    assert reports[1:] == [["9.9"]]
