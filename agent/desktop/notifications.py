"""Desktop notifications: what the clinician is told without reading a log.

Sent through the freedesktop Notifications D-Bus interface on the session bus (jeepney; no
program is run), from a thread of their own, so that a slow or absent notification server never
holds up the card loop. Without a session bus the agent is silent (a service, a test rig); with
``[desktop] notifications = false`` it never tries. A cause that repeats (the PACS down for an
hour) is told once per :data:`REPEAT_SECONDS`. The words are plain: no PIN, no distinguished name,
no stack trace; text that comes from elsewhere (a tunnel name, the site label) is markup-escaped.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from jeepney import DBusAddress, new_method_call
from jeepney.io.blocking import DBusConnection, open_dbus_connection
from jeepney.wrappers import DBusErrorResponse

from dicom_card_agent.desktop.config import DesktopConfig

log = logging.getLogger("agent.desktop")

APP_NAME = "DICOM card agent"
ICON = "dialog-password"
REPEAT_SECONDS = 300.0  # one notification per repeating cause (PACS down, certificate refused) in this time
SEND_TIMEOUT_SECONDS = 2.0
_NORMAL, _CRITICAL = 1, 2


@dataclass(frozen=True)
class Notice:
    """One notification: ``cause`` names what it is about, for rate-limiting and for tests."""

    cause: str
    summary: str
    body: str
    critical: bool = False
    repeating: bool = False  # told once per REPEAT_SECONDS


Sender = Callable[[Notice], None]


def escape_markup(text: str) -> str:
    """Notification servers may read the body as markup (the spec's subset of HTML)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class DBusSender:
    """Notify over the session bus; one connection, made when first needed and again after a failure."""

    def __init__(self) -> None:
        self._connection: DBusConnection | None = None
        self._told_no_bus = False

    def __call__(self, notice: Notice) -> None:
        address = DBusAddress("/org/freedesktop/Notifications", bus_name="org.freedesktop.Notifications",
                              interface="org.freedesktop.Notifications")
        hints = {"urgency": ("y", _CRITICAL if notice.critical else _NORMAL),
                 "category": ("s", "device" if notice.cause.startswith("card") else "network")}
        message = new_method_call(address, "Notify", "susssasa{sv}i",
                                  (APP_NAME, 0, ICON, notice.summary, escape_markup(notice.body), [], hints, -1))
        try:
            if self._connection is None:
                if not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
                    raise KeyError("DBUS_SESSION_BUS_ADDRESS")
                self._connection = open_dbus_connection(bus="SESSION")
            self._connection.send_and_get_reply(message, timeout=SEND_TIMEOUT_SECONDS)
        except (OSError, KeyError, ValueError, TimeoutError, DBusErrorResponse) as error:
            # No session bus (a service, a rig), or no notification server on it: nobody to tell.
            if not self._told_no_bus:
                log.info("desktop notifications are not shown: %s", _describe(error))
                self._told_no_bus = True
            self.close()

    def close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except OSError:
                pass
            self._connection = None


def _describe(error: Exception) -> str:
    if isinstance(error, KeyError):
        return "no session bus (DBUS_SESSION_BUS_ADDRESS is not set or empty)"
    return f"{type(error).__name__}: {error}"


class Notifier:
    """Queue notices for the sending thread, dropping repeats of a repeating cause."""

    def __init__(self, enabled: bool, sender: Sender | None = None) -> None:
        self.enabled = enabled
        self._sender = sender or DBusSender()
        self._last: dict[str, float] = {}
        self._queue: queue.SimpleQueue[Notice] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def notify(self, notice: Notice) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        with self._lock:
            if notice.repeating:
                last = self._last.get(notice.cause)
                if last is not None and now - last < REPEAT_SECONDS:
                    return
                self._last[notice.cause] = now
            if self._thread is None:
                self._thread = threading.Thread(target=self._send_all, name="desktop-notifications", daemon=True)
                self._thread.start()
        self._queue.put(notice)

    def _send_all(self) -> None:
        while True:
            notice = self._queue.get()
            try:
                self._sender(notice)
            except Exception:  # a notification must never end the agent
                log.exception("could not show the desktop notification %r", notice.summary)


class DesktopNotices:
    """What happened, in the clinician's words: the card loop calls one method per event."""

    def __init__(self, config: DesktopConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier(config.notifications)

    def _tell(self, cause: str, summary: str, body: str, **kind: bool) -> None:
        self.notifier.notify(Notice(cause, summary, body, **kind))

    def signed_in(self, name: str, what_for: str) -> None:
        self._tell("signed-in", f"Signed in as {name}", f"Your card is ready for {what_for}.")

    def card_removed(self) -> None:
        self._tell("card-removed", "Card removed: DICOM connections ended",
                   "Insert your card again to continue working.")

    def idle_locked(self, seconds: float) -> None:
        self._tell("idle-lock", "DICOM session locked after inactivity",
                   f"Nothing was sent for {_duration(seconds)}. Remove your card and insert it again to continue.")

    def locked(self) -> None:
        self._tell("locked", "DICOM session locked", "Remove your card and insert it again to continue.")

    def sign_in_cancelled(self, timed_out: bool) -> None:
        summary = "PIN dialog closed: nobody answered" if timed_out else "Sign-in cancelled"
        self._tell("sign-in-cancelled", summary,
                   "No PIN try was used. To sign in, remove your card and insert it again.")

    def pin_wrong(self, tries: str) -> None:
        self._tell("pin-wrong", "Wrong PIN", f"{tries} Remove your card and insert it again to try again.")

    def pin_blocked(self) -> None:
        self._tell("pin-blocked", "Card blocked: too many wrong PINs",
                   f"Call {self.config.helpdesk} to unblock your card.", critical=True)

    def pin_expired(self) -> None:
        self._tell("pin-expired", "Your PIN must be changed",
                   f"The card accepts no sign-in until its PIN is changed. Call {self.config.helpdesk}.", critical=True)

    def pin_not_accepted(self) -> None:
        self._tell("pin-not-accepted", "PIN not accepted",
                   "The card does not accept a PIN of that length or with those characters. Check your PIN, "
                   "then remove your card and insert it again to try again.")

    def final_try_not_used(self) -> None:
        self._tell("final-try", "Not signed in: one PIN try left",
                   f"Nothing was tried: a wrong PIN would block the card. Call {self.config.helpdesk}.", critical=True)

    def card_expired(self) -> None:
        self._tell("card-expired", "Your card has expired",
                   f"No PACS accepts it any more. Call {self.config.helpdesk} for a new card.", critical=True)

    def card_not_yet_valid(self) -> None:
        self._tell("card-not-yet-valid", "Your card is not valid yet",
                   f"Its certificate starts later than this computer's clock says. Call {self.config.helpdesk}.",
                   critical=True)

    def card_revoked(self) -> None:
        self._tell("card-revoked", "Your card has been revoked",
                   f"No PACS accepts it any more. Call {self.config.helpdesk} for a new card.", critical=True)

    def card_not_usable(self) -> None:
        self._tell("card-not-usable", "Not signed in: your card could not be used",
                   f"Remove your card and insert it again. If it happens again, call {self.config.helpdesk}.")

    def card_swapped(self) -> None:
        self._tell("card-swapped", "Another card was inserted: DICOM connections ended",
                   "The previous card's session ended; the new card signs in next.")

    def pacs_unreachable(self, what: str) -> None:
        self._tell(f"pacs-unreachable:{what}", f"Cannot reach {what}",
                   f"Images cannot be sent or fetched now. Try again in a few minutes; if it goes on, call "
                   f"{self.config.helpdesk}.", repeating=True)

    def certificate_refused(self, what: str) -> None:
        self._tell(f"certificate-refused:{what}", f"{_capital(what)} does not accept your card",
                   f"Call {self.config.helpdesk}: the server refuses your card's certificate.",
                   critical=True, repeating=True)


def _duration(seconds: float) -> str:
    if seconds >= 120:
        return f"{seconds / 60:g} minutes"
    return f"{seconds:g} seconds"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]
