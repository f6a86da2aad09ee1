"""What an ending card session says it could not send (worker.ReportsDue).

An association's relay makes its last reports one after the other at its end (a batch of
instances, the next batch, the Association End). The count it replaced saw only reports waiting in
a send: a relay between two batches as the process ended was counted as having nothing to send, and
a whole association's reports went missing with `status` counting no loss (seen in
test_concurrent_reports's swap with 8,000 reports due, 7,100 recorded and no loss counted).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dicom_card_agent.audit.config import AuditConfig
from dicom_card_agent.session.audit import AuditRecorder
from dicom_card_agent.session.channel import REPORTS_NOT_SENT
from dicom_card_agent.session.worker import ReportsDue


def _sent(due: ReportsDue, *kinds: str) -> None:
    for kind in kinds:
        due.sending(kind)
        due.done(kind, sent=True)


def test_an_association_between_two_of_its_reports_is_still_due() -> None:
    due = ReportsDue()
    _sent(due, "association-begin", "instances-transferred")
    assert due.unsent() == {"unsent_associations": 1, "unsent_reports": 0}


def test_an_association_whose_end_was_sent_is_not_due() -> None:
    due = ReportsDue()
    _sent(due, "association-begin", "query", "instances-transferred", "association-end")
    assert due.unsent() == {"unsent_associations": 0, "unsent_reports": 0}


def test_an_end_that_could_not_be_sent_leaves_its_association_due() -> None:
    due = ReportsDue()
    _sent(due, "association-begin")
    due.sending("association-end")
    due.done("association-end", sent=False)
    assert due.unsent() == {"unsent_associations": 1, "unsent_reports": 0}


def test_an_alert_counts_while_it_waits_in_its_send() -> None:
    due = ReportsDue()
    due.sending("tls-failure")
    assert due.unsent() == {"unsent_associations": 0, "unsent_reports": 1}
    due.done("tls-failure", sent=True)
    _sent(due, "security-alert")
    assert due.unsent() == {"unsent_associations": 0, "unsent_reports": 0}


def test_two_associations_and_an_alert_waiting() -> None:
    due = ReportsDue()
    _sent(due, "association-begin", "association-begin", "instances-transferred", "query")
    due.sending("security-alert")
    assert due.unsent() == {"unsent_associations": 2, "unsent_reports": 1}


def test_what_an_ending_session_could_not_send_is_counted_lost_and_said(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recorder = AuditRecorder(AuditConfig(file=tmp_path / "audit.log"))
    with caplog.at_level(logging.ERROR):
        recorder.session_report(REPORTS_NOT_SENT, {"associations": 2, "others": 1})
        recorder.session_report(REPORTS_NOT_SENT, {"associations": 0, "others": 1})
    recorder.close()
    assert recorder.trail is not None and (recorder.trail.lost, recorder.trail.failures) == (4, 2)
    assert [record.getMessage() for record in caplog.records] == [
        "audit: the card session ended before it could send all it had to report (2 association(s): the instances "
        "each transferred, its end; 1 other report(s)): its relays were still making them, or the supervisor held "
        "as many unrecorded as it keeps; what they said is missing from the audit trail",
        "audit: the card session ended before it could send all it had to report (1 other report(s)): its relays "
        "were still making them, or the supervisor held as many unrecorded as it keeps; what they said is missing "
        "from the audit trail"]
