"""The audit trail of one agent: events in, DICOM audit messages out to every configured sink.

Only the supervisor holds an :class:`AuditTrail` (the single writer of the file and the spool);
events raised in a card-session process travel as :meth:`AuditEvent.to_dict` over the channel and
come in through :meth:`AuditTrail.record_dict`.

``record`` renders the message once, appends it to the local file (fsynced) and to the spool of
the repository sender (fsynced), and returns: it does disk I/O but never waits for the network.
``record_all`` does the same for the several events of one card session's report with one fsync
of the file and one of the spool's directory for all of them: an fsync each made an ending card
session's last reports take longer than it has to send them (agent/session/worker.py END_GRACE_SECONDS).

When a sink cannot take a message (disk full), ``[audit] on_failure`` decides:

- ``continue`` (the default): the error is logged and that sink never gets the message; the other
  sinks still do. Associations go on.
- ``refuse``: the message is kept in memory, in order, for that sink and written as soon as the
  sink takes messages again (tried on every record and every association admitted); meanwhile
  :meth:`AuditTrail.refusal` gives the reason new associations are refused. It also refuses while
  the file system of a sink has less than ``FREE_SPACE_RESERVE`` left, so that an association is
  refused before its events would fail, not after.

An event that cannot even be made from what a card session reported (:meth:`AuditTrail.not_recorded`)
is counted as a failure and lost whatever ``on_failure`` says; under ``refuse``, new associations
are refused from then on until the agent is restarted: the same code would lose the next one's too.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from dicom_card_agent import logline
from dicom_card_agent.audit.config import AuditConfig
from dicom_card_agent.audit.errors import AuditError
from dicom_card_agent.audit.events import AuditEvent, EventKind
from dicom_card_agent.audit.messages import AuditSource, render
from dicom_card_agent.audit.refusal import RESTART_REMEDY
from dicom_card_agent.audit.sinks import FileSink, RepositorySink, repository_sink
from dicom_card_agent.audit.spool import Spool
from dicom_card_agent.audit.syslog import MAX_SEQUENCE_ID, SEVERITY_NOTICE, SEVERITY_WARNING, format_message

log = logging.getLogger("agent.audit")

FREE_SPACE_RESERVE = 1024 * 1024  # bytes a sink's file system must keep free under on_failure = "refuse"
FREE_INODES_RESERVE = 16  # the spool needs one file per waiting message
SinkOutcome = Literal["written", "kept", "lost"]  # what became of one message at one sink
BACKLOG_LIMIT = 100_000  # messages kept in memory per sink while it fails (refuse): ~ days of refusals
WHY_LIMIT = 200  # characters of an error in not_recorded's messages (it may quote a peer's value)


class _Backlog:
    """Messages one sink could not take yet, oldest first, and why (``on_failure = "refuse"``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.messages: deque[bytes] = deque()
        self.reason = ""
        self.dropped = 0


class AuditTrail:
    """Open the sinks of ``config``; ``close()`` when done (or use it as a context manager)."""

    def __init__(self, config: AuditConfig, *, hostname: str | None = None) -> None:
        self.config = config
        self.hostname = hostname or socket.gethostname()
        self.source = AuditSource(source_id=config.source_id or self.hostname, hostname=self.hostname,
                                  site_id=config.site_id)
        self.file: FileSink | None = None
        self.repository: RepositorySink | None = None
        self.failures = 0  # events a sink could not take at once (logged): lost, or kept in memory (refuse)
        self.lost = 0  # events a sink never got (logged): on_failure = "continue", or more than BACKLOG_LIMIT kept
        self._closed = False
        self._lock = threading.RLock()  # one record at a time: the backlogs keep each sink's order
        self._sequence = 0  # meta sequenceId of the last syslog message
        self._file_backlog = _Backlog("file")
        self._spool_backlog = _Backlog("spool")
        self._refusing = False  # the last refusal() refused
        self._unrecordable = ""  # why a report could not be recorded (refuse): associations are refused for good
        try:
            if config.file is not None:
                self.file = FileSink(config.file)
            if config.syslog is not None:
                if config.spool is None:
                    raise AuditError("[audit.syslog] needs [audit] spool")
                spool = Spool(config.spool)
                try:
                    self.repository = repository_sink(config.syslog, spool)
                except BaseException:
                    spool.close()
                    raise
        except BaseException:
            if self.file is not None:
                self.file.close()
            raise

    @property
    def refuses(self) -> bool:
        return self.config.on_failure == "refuse"

    def record(self, event: AuditEvent) -> bool:
        """Write ``event`` to every sink; ``True`` if all took it (failures are logged)."""
        return self.record_all([event])

    def record_all(self, events: Sequence[AuditEvent]) -> bool:
        """Write ``events`` to every sink, in order, with one durable write per sink for all of
        them (one card session's report: up to ~100 records); ``True`` if all sinks took all of
        them. When it returns, each is in the file and the spool as :meth:`record` leaves it. A
        sink that refuses the batch gets the events one at a time, as :meth:`record` would: each
        is counted (``failures``, ``lost``) and logged as if recorded on its own."""
        if self._closed:
            raise AuditError("the audit trail is closed")
        rendered: list[bytes] = []
        try:
            for event in events:
                rendered.append(render(event, self.source))
        except Exception:  # those before the one that cannot be rendered are recorded, as by one record() each
            self._record_rendered(events[:len(rendered)], rendered)
            raise
        return self._record_rendered(events, rendered)

    def _record_rendered(self, events: Sequence[AuditEvent], rendered: list[bytes]) -> bool:
        if not events:
            return True
        with self._lock:
            by_sink: list[list[SinkOutcome]] = []  # for each sink, what became of each event
            if self.file is not None:
                by_sink.append(self._write_all(self._file_backlog, rendered, events))
            if self.repository is not None:
                messages = [self._syslog_message(xml, event) for xml, event in zip(rendered, events, strict=True)]
                by_sink.append(self._write_all(self._spool_backlog, messages, events))
            outcomes = list(zip(*by_sink, strict=True))  # for each event, what became of it at each sink
            for taken in outcomes:
                if "lost" in taken:  # counted once per event, however many sinks missed it
                    self.lost += 1
                if not all(outcome == "written" for outcome in taken):
                    self.failures += 1
            return all(outcome == "written" for taken in outcomes for outcome in taken)

    def _syslog_message(self, xml: bytes, event: AuditEvent) -> bytes:
        self._sequence = self._sequence % MAX_SEQUENCE_ID + 1
        severity = SEVERITY_WARNING if event.kind is EventKind.SECURITY_ALERT else SEVERITY_NOTICE
        return format_message(xml, time=event.time, hostname=self.hostname, procid=event.agent_pid,
                              severity=severity, sequence=self._sequence)

    def _write_all(self, backlog: _Backlog, messages: list[bytes], events: Sequence[AuditEvent]) -> list[SinkOutcome]:
        """Write ``messages`` (of ``events``) to the sink of ``backlog`` at once; if it refuses
        them, one at a time, as :meth:`_write` writes one."""
        if len(messages) > 1 and not self._waiting(backlog):
            try:
                self._put_all(backlog, messages)
                return ["written"] * len(messages)
            except (OSError, AuditError):
                pass  # none of them was taken (all or none): each is tried, counted and logged on its own below
        return [self._write(backlog, message, event) for message, event in zip(messages, events, strict=True)]

    def _waiting(self, backlog: _Backlog) -> bool:
        """Under ``on_failure = "refuse"``, write what ``backlog`` holds first; whether some of it
        still waits (new messages then wait behind it)."""
        if not self.refuses:
            return False
        self._retry(backlog)
        return bool(backlog.messages)

    def _write(self, backlog: _Backlog, message: bytes, event: AuditEvent) -> SinkOutcome:
        if self._waiting(backlog):  # still failing: keep this one behind the others
            return self._keep(backlog, message)
        try:
            self._put_all(backlog, [message])
            return "written"
        except (OSError, AuditError) as error:
            reason = self._describe(backlog, error)
            if self.refuses:
                if not backlog.reason:
                    log.error("audit: %s; [audit] on_failure = \"refuse\": new associations are refused until "
                              "it can be written again (free space there); events wait in memory meanwhile",
                              reason)
                backlog.reason = reason
                return self._keep(backlog, message)
            if backlog is self._file_backlog:
                log.error("audit: %s; event %s not in the local audit file", reason, event.kind.value)
            else:
                log.error("audit: %s; event %s not queued for the audit repository", reason, event.kind.value)
            return "lost"

    def _put_all(self, backlog: _Backlog, messages: Sequence[bytes]) -> None:
        if backlog is self._file_backlog:
            assert self.file is not None
            self.file.write_all(messages)
        else:
            assert self.repository is not None
            self.repository.submit_all(messages)

    def _describe(self, backlog: _Backlog, error: BaseException) -> str:
        if backlog is self._file_backlog and isinstance(error, OSError):
            assert self.file is not None
            return f"cannot write to the audit file {self.file.path}: {error.strerror or error}"
        return str(error)

    def _keep(self, backlog: _Backlog, message: bytes) -> Literal["kept", "lost"]:
        if len(backlog.messages) >= BACKLOG_LIMIT:
            backlog.dropped += 1
            log.error("audit: %d events for the %s kept in memory already; this one is lost",
                      BACKLOG_LIMIT, backlog.name)
            return "lost"
        backlog.messages.append(message)
        return "kept"

    def _retry(self, backlog: _Backlog) -> None:
        """Write what ``backlog`` holds, oldest first, until the sink refuses again."""
        if not backlog.messages:
            return
        written = 0
        try:
            while backlog.messages:
                self._put_all(backlog, [backlog.messages[0]])
                backlog.messages.popleft()
                written += 1
        except (OSError, AuditError) as error:
            backlog.reason = self._describe(backlog, error)
            return
        log.warning("audit: the %s takes messages again: %d event%s written late",
                    "audit file" if backlog is self._file_backlog else "audit spool", written,
                    "" if written == 1 else "s")
        backlog.reason = ""

    def not_recorded(self, report: str, why: str) -> None:
        """A card session's ``report`` (its kind) could not be made into an event (``why``): counted
        in ``failures`` and ``lost``, logged; under ``on_failure = "refuse"``, new associations are
        refused from now on (until the agent is restarted), as the next association's reports
        would be lost alike."""
        why = logline.printable(why if len(why) <= WHY_LIMIT else f"{why[:WHY_LIMIT]}...")
        with self._lock:
            self.failures += 1
            self.lost += 1
            first = not self._unrecordable
            if self.refuses and first:
                self._unrecordable = (f"the audit trail cannot record what the card session reports ({report}: "
                                      f"{why}): {RESTART_REMEDY}")
        consequence = ('; [audit] on_failure = "refuse": new associations are refused until the agent is '
                       'restarted' if self.refuses and first else "")
        log.error("audit: the card session's report %s could not be recorded (%s); what it said is missing from "
                  "the audit trail%s", report, why, consequence)

    def not_sent(self, reports: int, why: str) -> None:
        """At least ``reports`` reports of a card session never reached the trail (``why``: it
        ended before it could send them, or the agent stopped before it had recorded them):
        counted in ``failures`` and ``lost``, logged. Not a reason to refuse associations
        from now on: the next card session's reports are not at risk for it."""
        with self._lock:
            self.failures += 1
            self.lost += reports
        log.error("audit: %s; what they said is missing from the audit trail", logline.printable(why))

    def refusal(self) -> str | None:
        """Why a new association must be refused now (``on_failure = "refuse"``), or ``None``.
        Retries what waits in memory first, so an association is accepted as soon as writing works."""
        if not self.refuses or self._closed:
            return None
        with self._lock:
            reason = self._refusal()
            if reason is None and self._refusing:
                log.warning("audit: the audit trail can be written again; associations are accepted again")
            self._refusing = reason is not None
            return reason

    def _refusal(self) -> str | None:
        for backlog in (self._file_backlog, self._spool_backlog):
            self._retry(backlog)
        return self._refusal_now()

    def _refusal_now(self) -> str | None:
        """Why a new association would be refused now, without trying to write what waits."""
        if self._unrecordable:
            return self._unrecordable
        for backlog in (self._file_backlog, self._spool_backlog):
            if backlog.messages:
                return f"the audit trail cannot be written ({backlog.reason})"
        for path in self._sink_paths():
            short = short_of_space(path)
            if short:
                return f"the audit trail cannot be written ({short})"
        return None

    def _sink_paths(self) -> list[Path]:
        paths = []
        if self.file is not None:
            paths.append(self.file.path.parent)
        if self.repository is not None:
            paths.append(self.repository.spool.directory)
        return paths

    def record_dict(self, data: Any) -> AuditEvent:
        """Record an event received as :meth:`AuditEvent.to_dict` (:class:`AuditEventError` if it
        is not one); return it."""
        event = AuditEvent.from_dict(data)
        self.record(event)
        return event

    def pending(self) -> int:
        """Messages waiting for the audit repository (0 without one)."""
        waiting = len(self._spool_backlog.messages)
        return waiting + (self.repository.pending() if self.repository is not None else 0)

    def wait_delivered(self, timeout: float) -> bool:
        """Wait until the repository has every message; ``False`` after ``timeout`` seconds."""
        return self.repository.wait_delivered(timeout) if self.repository is not None else True

    def status(self) -> dict[str, Any]:
        """For ``card-agent status``: where the trail writes, how delivery goes, what was lost, and
        whether new associations are refused (``on_failure = "refuse"``) and why."""
        repository = self.repository
        # Without the record lock: a record that waits on a slow disk must not hold up `status` (and
        # `lock` behind it on the control socket); what the backlogs hold is read as it stands.
        refusal = self._refusal_now() if self.refuses and not self._closed else None
        return {
            "file": str(self.file.path) if self.file is not None else None,
            "repository": repository.config.address if repository is not None else None,
            "transport": repository.transport if repository is not None else None,
            "connected": repository.connected if repository is not None else None,
            "pending": self.pending(),
            "delivered": repository.delivered if repository is not None else 0,
            "last_error": repository.last_error if repository is not None else "",
            "failures": self.failures,
            "lost": self.lost,
            "refusing": refusal is not None,
            "refusal": refusal or "",
            "in_memory": len(self._file_backlog.messages) + len(self._spool_backlog.messages),
            "oldest_pending_seconds": repository.spool.oldest_age() if repository is not None else None,
        }

    def close(self, timeout: float = 5.0) -> None:
        """Give the repository up to ``timeout`` seconds for what waits, then close everything;
        undelivered messages stay in the spool and go out after the next start."""
        if self._closed:
            return
        with self._lock:
            for backlog in (self._file_backlog, self._spool_backlog):
                self._retry(backlog)
                if backlog.messages:
                    log.error("audit: %d event%s for the %s could not be written before the agent stopped (%s); "
                              "they are lost", len(backlog.messages), "" if len(backlog.messages) == 1 else "s",
                              backlog.name, backlog.reason)
            self._closed = True
        try:
            if self.repository is not None:
                self.repository.close(timeout)
        finally:
            if self.file is not None:
                self.file.close()

    def __enter__(self) -> AuditTrail:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def short_of_space(directory: Path) -> str:
    """Why the file system of ``directory`` is too full for the trail, or ``""``."""
    try:
        stats = os.statvfs(directory)
    except OSError as error:
        return f"cannot check the free space of {directory}: {error.strerror}"
    free = stats.f_bavail * stats.f_frsize
    if free < FREE_SPACE_RESERVE:
        return (f"{free // 1024} KiB free on the file system of {directory}, less than the "
                f"{FREE_SPACE_RESERVE // 1024} KiB the audit trail keeps in reserve")
    if stats.f_files and stats.f_favail < FREE_INODES_RESERVE:
        return f"{stats.f_favail} free inodes on the file system of {directory}"
    return ""
