"""The audit trail of one agent: events in, DICOM audit messages out to every configured sink.

Only the supervisor holds an :class:`AuditTrail` (the single writer of the file and the spool);
events raised in a card-session process travel as :meth:`AuditEvent.to_dict` over the channel and
come in through :meth:`AuditTrail.record_dict`.

``record`` renders the message once, appends it to the local file (fsynced) and to the spool of
the repository sender (fsynced), and returns: it does disk I/O but never waits for the network.
A sink that fails (disk full) is logged as an error and the other sinks still get the message.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from dicom_card_agent.audit.config import AuditConfig
from dicom_card_agent.audit.errors import AuditError
from dicom_card_agent.audit.events import AuditEvent, EventKind
from dicom_card_agent.audit.messages import AuditSource, render
from dicom_card_agent.audit.sinks import FileSink, SyslogTlsSink
from dicom_card_agent.audit.spool import Spool
from dicom_card_agent.audit.syslog import SEVERITY_NOTICE, SEVERITY_WARNING, format_message

log = logging.getLogger("agent.audit")


class AuditTrail:
    """Open the sinks of ``config``; ``close()`` when done (or use it as a context manager)."""

    def __init__(self, config: AuditConfig, *, hostname: str | None = None) -> None:
        self.config = config
        self.hostname = hostname or socket.gethostname()
        self.source = AuditSource(source_id=config.source_id or self.hostname, hostname=self.hostname,
                                  site_id=config.site_id)
        self.file: FileSink | None = None
        self.repository: SyslogTlsSink | None = None
        self.failures = 0  # messages a sink could not take (logged)
        self._closed = False
        try:
            if config.file is not None:
                self.file = FileSink(config.file)
            if config.syslog is not None:
                if config.spool is None:
                    raise AuditError("[audit.syslog] needs [audit] spool")
                spool = Spool(config.spool)
                try:
                    self.repository = SyslogTlsSink(config.syslog, spool)
                except BaseException:
                    spool.close()
                    raise
        except BaseException:
            if self.file is not None:
                self.file.close()
            raise

    def record(self, event: AuditEvent) -> bool:
        """Write ``event`` to every sink; ``True`` if all took it (failures are logged)."""
        if self._closed:
            raise AuditError("the audit trail is closed")
        xml = render(event, self.source)
        ok = True
        if self.file is not None:
            try:
                self.file.write(xml)
            except (OSError, AuditError) as error:
                ok = False
                log.error("audit: cannot write to %s: %s; event %s not in the local audit file",
                          self.file.path, getattr(error, "strerror", None) or error, event.kind.value)
        if self.repository is not None:
            severity = SEVERITY_WARNING if event.kind is EventKind.SECURITY_ALERT else SEVERITY_NOTICE
            message = format_message(xml, time=event.time, hostname=self.hostname, procid=event.agent_pid,
                                     severity=severity)
            try:
                self.repository.submit(message)
            except AuditError as error:
                ok = False
                log.error("audit: %s; event %s not queued for the audit repository", error, event.kind.value)
        if not ok:
            self.failures += 1
        return ok

    def record_dict(self, data: Any) -> AuditEvent:
        """Record an event received as :meth:`AuditEvent.to_dict` (:class:`AuditEventError` if it
        is not one); return it."""
        event = AuditEvent.from_dict(data)
        self.record(event)
        return event

    def pending(self) -> int:
        """Messages waiting for the audit repository (0 without one)."""
        return self.repository.pending() if self.repository is not None else 0

    def wait_delivered(self, timeout: float) -> bool:
        """Wait until the repository has every message; ``False`` after ``timeout`` seconds."""
        return self.repository.wait_delivered(timeout) if self.repository is not None else True

    def status(self) -> dict[str, Any]:
        """For ``card-agent status``: where the trail writes and how delivery goes."""
        repository = self.repository
        return {
            "file": str(self.file.path) if self.file is not None else None,
            "repository": repository.config.address if repository is not None else None,
            "connected": repository.connected if repository is not None else None,
            "pending": self.pending(),
            "delivered": repository.delivered if repository is not None else 0,
            "last_error": repository.last_error if repository is not None else "",
            "failures": self.failures,
        }

    def close(self, timeout: float = 5.0) -> None:
        """Give the repository up to ``timeout`` seconds for what waits, then close everything;
        undelivered messages stay in the spool and go out after the next start."""
        if self._closed:
            return
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
