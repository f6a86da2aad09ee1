"""Reports a card session sent, read ahead of the audit trail that records them.

The supervisor records a report with an fsync (of the audit file, and of a spool file per message
with a repository). Read one at a time as they were recorded, the reports of an ending card session
(a card swapped while applications had thousands of C-STOREs unanswered: 8,000 audit records)
waited in the session's channel, and the session, which has a few seconds to end, could not send
them all: the supervisor recorded 1,300 to 4,800 of 8,000 with an fsync a record, 3,100 to 5,200
with one a report, and counted the rest lost. Read into
memory as they come, up to :data:`BACKLOG_BYTES`, they leave the session in its time; the trail
records them after. Beyond that bound the reader waits, and the session's reports wait in its
channel again, as before.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

# ~80,000 instances' reports (100 instances, ~40 KiB a report): memory a workstation has, and no
# limit on what one report may carry (channel.MAX_REPORT is 16 MiB: a report larger than what is
# left is let in alone).
BACKLOG_BYTES = 64 * 1024 * 1024


class ReportBacklog:
    """Reports read and not yet recorded, in order: one thread puts, another takes."""

    def __init__(self, limit: int = BACKLOG_BYTES) -> None:
        self._limit = limit
        self._reports: deque[tuple[dict[str, Any], int]] = deque()
        self._bytes = 0
        self._closed = False
        self._changed = threading.Condition()

    def put(self, report: dict[str, Any], size: int) -> None:
        """Add ``report`` (``size`` bytes as read); waits while the backlog is full."""
        with self._changed:
            while self._reports and self._bytes + size > self._limit:
                self._changed.wait()
            self._reports.append((report, size))
            self._bytes += size
            self._changed.notify_all()

    def close(self) -> None:
        """Nothing more comes: :meth:`take` returns None once the backlog is empty."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def take(self) -> dict[str, Any] | None:
        """The oldest report; waits for one; None once closed and empty."""
        with self._changed:
            while not self._reports and not self._closed:
                self._changed.wait()
            if not self._reports:
                return None
            report, size = self._reports.popleft()
            self._bytes -= size
            self._changed.notify_all()
            return report

    def abandon(self) -> int:
        """Drop what waits (the agent stops and cannot wait longer) and close; how many were dropped."""
        with self._changed:
            dropped = len(self._reports)
            self._reports.clear()
            self._bytes = 0
            self._closed = True
            self._changed.notify_all()
            return dropped
