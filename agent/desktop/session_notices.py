"""The card loop's events as desktop notifications: the few calls agent/session/manager.py makes."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

from cryptography import x509

from dicom_card_agent.config.model import AgentConfig
from dicom_card_agent.desktop.notifications import DesktopNotices
from dicom_card_agent.desktop.words import person_name, purpose, tries_left
from dicom_card_agent.revocation.peer import CardRevokedError
from dicom_card_agent.session.identity import CertificateExpiredError, CertificateNotYetValidError
from dicom_card_agent.tls.failures import CERTIFICATE_REFUSED, UNREACHABLE
from dicom_card_agent.token.discovery import PinState
from dicom_card_agent.token.login import LoginError, PinExpiredError, PinFinalTryError, PinLockedError, WrongPinError
from dicom_card_agent.token.pin import PinUnavailableError
from dicom_card_agent.token.pinentry import NoPinEnteredError, PinentryError, PinEntryTimedOutError
from dicom_card_agent.tunnel.relay import PACS_PROBLEM

OnReport = Callable[[str, dict[str, Any]], None]


class SessionNotices:
    def __init__(self, config: AgentConfig, notices: DesktopNotices | None = None) -> None:
        self.config = config
        self.notices = notices or DesktopNotices(config.desktop)
        self.what_for = purpose(config.desktop.site_label,
                                [t.name for t in config.tunnels] + [i.name for i in config.inbound])

    def signed_in(self, certificate: x509.Certificate) -> None:
        self.notices.signed_in(person_name(certificate), self.what_for)

    def session_ended(self, reason: str) -> None:
        """A session ended by the card loop; ``reason`` as the life-cycle table words it."""
        if reason == "card removed":
            self.notices.card_removed()
        elif reason == "card swapped":
            self.notices.card_swapped()
        elif reason == "idle timeout":
            self.notices.idle_locked(self.config.idle_timeout)
        elif reason == "certificate expired":
            self.notices.card_expired(session_ended=True)
        elif reason == "certificate revoked":
            self.notices.card_revoked(session_ended=True)

    def locked(self) -> None:
        self.notices.locked()

    def card_expires_soon(self, expiry: datetime.datetime, left: str) -> None:
        """At sign-in: the certificate expires at ``expiry``, in ``left`` (words: time_left)."""
        self.notices.card_expires_soon(left, f"{expiry.astimezone():%d %B %Y, %H:%M}")

    def card_changed(self) -> None:
        """The card was pulled or another inserted: what was said about the card is not for the next person."""
        self.notices.withdraw_all()

    def session_lost(self, *, signed_in: bool, signs_in_again: bool) -> None:
        """The card-session process ended on its own (signed in, or while signing in); ``signs_in_again``:
        the machine started a new sign-in, which asks first where the PIN source shows a dialog."""
        self.notices.session_lost(signed_in=signed_in, signs_in_again=signs_in_again,
                                  asks_first=signs_in_again and self.config.identity.pin.confirms_in_dialog)

    def sign_in_cancelled_by_another_card(self, pin_asked: bool) -> None:
        self.notices.sign_in_cancelled_by_another_card(pin_asked)

    def sign_in_cancelled(self, error: Exception | None = None) -> None:
        """The clinician cancelled the PIN dialog, or nobody answered it (``error`` None: the agent's timeout)."""
        self.notices.sign_in_cancelled(timed_out=error is None or isinstance(error, PinEntryTimedOutError))

    def sign_in_refused(self, error: LoginError) -> None:
        """The card refused the login, or no login was tried for what the card says of its PIN."""
        if isinstance(error, PinLockedError) or (isinstance(error, WrongPinError)
                                                 and error.pin_state is PinState.LOCKED):
            self.notices.pin_blocked()
        elif isinstance(error, WrongPinError):
            self.notices.pin_wrong(tries_left(error.pin_state))
        elif isinstance(error, PinExpiredError):
            self.notices.pin_expired()
        elif isinstance(error, PinFinalTryError):
            self.notices.final_try_not_used()
        elif type(error) is LoginError:  # the card refused the PIN's length or characters
            self.notices.pin_not_accepted()
        else:
            self.notices.card_not_usable()

    def sign_in_failed(self, error: Exception) -> None:
        """The sign-in failed before the card was asked: an empty PIN, the PIN dialog itself, or the
        card for anything but its PIN (its certificate, its module, the card itself)."""
        if isinstance(error, NoPinEnteredError):
            self.notices.no_pin_entered()
        elif self._pin_dialog_failed(error):
            self.notices.pin_window_failed()
        elif isinstance(error, CertificateExpiredError):
            self.notices.card_expired()
        elif isinstance(error, CertificateNotYetValidError):
            self.notices.card_not_yet_valid()
        elif isinstance(error, CardRevokedError):
            self.notices.card_revoked()
        else:
            self.notices.card_not_usable()

    def _pin_dialog_failed(self, error: Exception) -> bool:
        """The PIN window could not be shown or failed (no pinentry, no display, a crash), not the card."""
        if isinstance(error, PinentryError):
            return True
        return isinstance(error, PinUnavailableError) and self.config.identity.pin.kind == "pinentry"

    def with_reports(self, on_report: OnReport) -> OnReport:
        """``on_report`` (the audit trail's), and the PACS problems a card-session process reports."""
        def both(kind: str, fields: dict[str, Any]) -> None:
            if kind == PACS_PROBLEM:
                self.session_report(fields)
            else:
                on_report(kind, fields)
        return both

    def session_report(self, fields: dict[str, Any]) -> None:
        what = self.config.desktop.site_label or f"the PACS of {fields.get('tunnel', 'a tunnel')}"
        if fields.get("cause") == UNREACHABLE:
            self.notices.pacs_unreachable(what)
        elif fields.get("cause") == CERTIFICATE_REFUSED:
            self.notices.certificate_refused(what)
