"""What the card loop tells the service manager on each turn: who is signed in, and that it turns."""

from __future__ import annotations

from dicom_card_agent.service.notify import Notifier
from dicom_card_agent.session.manager import SessionManager


def service_status(manager: SessionManager) -> str:
    """One line for `systemctl --user status card-agent`: the signed-in clinician, or the card state."""
    session = manager.current_session()
    if session is not None:
        card = manager.card
        token = f" (token {card.label!r})" if card is not None else ""
        return f"signed in: {session.signed_in.files.subject}{token}"
    return f"nobody signed in: {manager.state}"


class Heartbeat:
    """Called by the card loop after each step (SessionManager.heartbeat)."""

    def __init__(self, notifier: Notifier, manager: SessionManager) -> None:
        self.notifier = notifier
        self.manager = manager

    def __call__(self) -> None:
        self.notifier.status(service_status(self.manager))
        self.notifier.watchdog()
