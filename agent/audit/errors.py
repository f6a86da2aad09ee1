"""Exceptions of the audit trail (all :class:`agent.errors.CardAgentError`)."""

from __future__ import annotations

from dicom_card_agent.errors import CardAgentError


class AuditError(CardAgentError):
    """The audit trail cannot do what was asked."""


class AuditEventError(AuditError, ValueError):
    """A dictionary does not describe a valid audit event (e.g. one received from a card-session
    process over the channel)."""


class AuditSpoolError(AuditError):
    """The on-disk spool of undelivered audit messages cannot be used."""
