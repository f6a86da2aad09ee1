"""What an ending card session says it could not send (worker.ReportsDue).

An association's relay makes its last reports one after the other at its end (a batch of
instances, the next batch, the Association End). The count it replaced saw only reports waiting in
a send: a relay between two batches as the process ended was counted as having nothing to send, and
a whole association's reports went missing with `status` counting no loss (seen in
test_concurrent_reports's swap with 8,000 reports due, 7,100 recorded and no loss counted).
"""

from __future__ import annotations

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
