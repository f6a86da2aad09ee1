"""An ending card session's reports are read ahead of the audit trail (session/report_backlog.py).

The supervisor read a card session's reports one at a time as it recorded them, an fsync or more
each. A card swapped while two applications had 4,000 C-STOREs each unanswered (a patient each)
ended a card session with 8,000 audit records to report in the END_GRACE_SECONDS it has: it could
not send them all, and the supervisor recorded 1,300 to 4,800 of them with an fsync a record,
3,100 to 7,500 with one a report under load, and about 4,000 with a spool (one file and fsync a
message). Read into memory as they come, they all leave the session in its time, and the trail
records them after its end, as alice's.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from conftest import ProvisionedPki
from dicom_card_agent.session.report_backlog import ReportBacklog
from peers.ports import LOOPBACK, free_port
from test_concurrent_reports import alice_swapped_with_reports_due


def test_reports_are_taken_in_the_order_they_were_put_and_none_after_close() -> None:
    backlog = ReportBacklog(limit=1000)
    for number in range(3):
        backlog.put({"kind": "query", "fields": {"n": number}}, 10)
    backlog.close()
    assert [backlog.take(), backlog.take(), backlog.take(), backlog.take()] == [
        {"kind": "query", "fields": {"n": 0}}, {"kind": "query", "fields": {"n": 1}},
        {"kind": "query", "fields": {"n": 2}}, None]


def test_a_full_backlog_holds_the_reader_until_a_report_is_taken() -> None:
    backlog = ReportBacklog(limit=100)
    backlog.put({"n": 1}, 60)
    put = threading.Thread(target=backlog.put, args=({"n": 2}, 60), daemon=True)
    put.start()
    put.join(0.3)
    assert put.is_alive(), "a report beyond the bound went in"
    assert backlog.take() == {"n": 1}
    put.join(5)
    assert not put.is_alive()
    assert backlog.take() == {"n": 2}


def test_a_report_larger_than_the_bound_goes_in_alone() -> None:
    backlog = ReportBacklog(limit=100)
    backlog.put({"n": 1}, 500)  # does not wait: nothing else is in
    assert backlog.take() == {"n": 1}


def test_the_recorder_waits_for_reports_until_the_reader_closes() -> None:
    backlog = ReportBacklog()
    taken: list[object] = []
    recorder = threading.Thread(target=lambda: taken.extend(iter(backlog.take, None)), daemon=True)
    recorder.start()
    time.sleep(0.1)
    backlog.put({"n": 1}, 1)
    backlog.close()
    recorder.join(5)
    assert taken == [{"n": 1}] and not recorder.is_alive()


def test_abandoned_at_a_stop_the_backlog_says_how_many_it_dropped_and_ends_the_recorder() -> None:
    backlog = ReportBacklog()
    for number in range(3):
        backlog.put({"n": number}, 1)
    assert backlog.take() == {"n": 0}
    assert backlog.abandon() == 2
    assert backlog.take() is None


# 8,000 C-STOREs and their audit records each: two at once on two workers starve each other
@pytest.mark.xdist_group("thousands-of-reports")
def test_reports_still_due_when_a_card_is_swapped_are_all_recorded(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    lines, audit, log = alice_swapped_with_reports_due(test_pki, tmp_path, fault_module)
    _all_recorded_as_alice(lines, audit, log)


@pytest.mark.xdist_group("thousands-of-reports")
def test_reports_still_due_at_a_swap_are_all_spooled_for_a_repository_that_is_down(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    spool = tmp_path / "spool"
    lines, audit, log = alice_swapped_with_reports_due(test_pki, tmp_path, fault_module, {
        "spool": str(spool),
        "syslog": {"address": f"{LOOPBACK}:{free_port()}", "ca": str(test_pki.ca_bundle), "server_name": "localhost"}})
    _all_recorded_as_alice(lines, audit, log)
    spooled = [path.read_bytes() for path in spool.glob("*.msg")]
    assert sum(b"ALICEPAT-" in message for message in spooled) == 8000


@pytest.mark.xdist_group("thousands-of-reports")
def test_an_agent_stopped_right_after_the_swap_records_them_all_before_its_application_stop(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    """Read ahead, the reports may still be being recorded when the agent is told to stop: it waits
    for them (manager.RECORDING_AT_STOP_SECONDS), then records its Application Stop, the last."""
    lines, _, log = alice_swapped_with_reports_due(test_pki, tmp_path, fault_module, stop_after_swap=True)
    assert sum(b"ALICEPAT-" in line for line in lines) == 8000, log
    assert b'csd-code="110121"' in lines[-1], lines[-1][:300]  # Application Stop
    assert "before it had recorded" not in log and "could send all" not in log


def _all_recorded_as_alice(lines: list[bytes], audit: dict, log: str) -> None:
    alices = [line for line in lines if b"ALICEPAT-" in line]
    ends = sum(b"ASSOCIATION-END" in line and b"ALICEAPP" in line for line in lines)
    assert (len(alices), ends, audit["lost"], audit["failures"]) == (8000, 2, 0, 0), log
    assert all(b"Alice Example" in line for line in alices)
