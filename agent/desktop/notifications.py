"""Desktop notifications: what the clinician is told without reading a log.

Sent through the freedesktop Notifications D-Bus interface on the session bus (jeepney; no
program is run), from a thread of their own, so that a slow or absent notification server never
holds up the card loop. Without a session bus the agent is silent (a service, a test rig); with
``[desktop] notifications = false`` it never tries. A cause that repeats (the PACS down for an
hour) is told once per :data:`REPEAT_SECONDS`. The words are plain: no PIN, no distinguished name,
no stack trace; text that comes from elsewhere (a tunnel name, the site label) is markup-escaped.

On a shared workstation the notices of one card must not be read by the next clinician: a newer
notice of the same slot replaces the one on screen (``replaces_id``), and when a card is pulled or
another inserted, every notice shown so far is withdrawn (``CloseNotification``), critical ones
(which notification servers keep until clicked) included.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from jeepney import DBusAddress, new_method_call
from jeepney.io.blocking import DBusConnection, open_dbus_connection
from jeepney.low_level import Message
from jeepney.wrappers import DBusErrorResponse, unwrap_msg

from dicom_card_agent.desktop.config import DesktopConfig

log = logging.getLogger("agent.desktop")

APP_NAME = "DICOM card agent"
ICON = "dialog-password"
REPEAT_SECONDS = 300.0  # one notification per repeating cause (PACS down, certificate refused) in this time
SEND_TIMEOUT_SECONDS = 2.0
_NORMAL, _CRITICAL = 1, 2
CARD_SLOT = "card"  # the card's own story (signed in, wrong PIN, removed...): one notice on screen at a time
_ADDRESS = DBusAddress("/org/freedesktop/Notifications", bus_name="org.freedesktop.Notifications",
                       interface="org.freedesktop.Notifications")


@dataclass(frozen=True)
class Notice:
    """One notification: ``cause`` names what it is about, for rate-limiting and for tests; a
    notice replaces the one on screen of the same ``slot``."""

    cause: str
    summary: str
    body: str
    critical: bool = False
    repeating: bool = False  # told once per REPEAT_SECONDS
    slot: str = CARD_SLOT


@dataclass(frozen=True)
class Withdrawal:
    """Take every notice shown so far off the screen: the card they were about left, or another came."""


class Sender(Protocol):
    def show(self, notice: Notice, replaces: int) -> int:
        """Show ``notice`` in place of the shown notice ``replaces`` (0: none); its id (0: not shown)."""

    def withdraw(self, shown: int) -> None:
        """Take the notice ``shown`` (an id :meth:`show` returned) off the screen."""


def escape_markup(text: str) -> str:
    """Notification servers may read the body as markup (the spec's subset of HTML)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class DBusSender:
    """Notify over the session bus; one connection, made when first needed and again after a failure."""

    def __init__(self) -> None:
        self._connection: DBusConnection | None = None
        self._told_no_bus = False

    def show(self, notice: Notice, replaces: int) -> int:
        hints = {"urgency": ("y", _CRITICAL if notice.critical else _NORMAL),
                 "category": ("s", "device" if notice.slot == CARD_SLOT else "network")}
        reply = self._call(new_method_call(_ADDRESS, "Notify", "susssasa{sv}i", (
            APP_NAME, replaces, ICON, notice.summary, escape_markup(notice.body), [], hints, -1)))
        if reply is None:
            return 0
        try:
            return int(unwrap_msg(reply)[0])
        except DBusErrorResponse as error:  # no notification server on the bus
            self._nobody_to_tell(error)
            return 0

    def withdraw(self, shown: int) -> None:
        # An error reply only says the notice is gone already (closed by the clinician, or expired).
        self._call(new_method_call(_ADDRESS, "CloseNotification", "u", (shown,)))

    def _call(self, message: Message) -> Message | None:
        """The reply; None when there is no session bus to ask."""
        try:
            if self._connection is None:
                if not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
                    raise KeyError("DBUS_SESSION_BUS_ADDRESS")
                self._connection = open_dbus_connection(bus="SESSION")
            return self._connection.send_and_get_reply(message, timeout=SEND_TIMEOUT_SECONDS)
        except (OSError, KeyError, ValueError, TimeoutError) as error:
            self._nobody_to_tell(error)
            return None

    def _nobody_to_tell(self, error: Exception) -> None:
        """No session bus (a service, a rig), or no notification server on it: said once."""
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
    """Queue notices and withdrawals for the sending thread, in order, dropping repeats of a
    repeating cause. The sending thread alone knows what is on screen (the server's ids)."""

    def __init__(self, enabled: bool, sender: Sender | None = None) -> None:
        self.enabled = enabled
        self._sender = sender or DBusSender()
        self._last: dict[str, float] = {}
        self._queue: queue.SimpleQueue[Notice | Withdrawal] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._on_screen: dict[str, int] = {}  # slot -> the id of its notice shown last; the sending thread's

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
        self._put(notice)

    def withdraw_all(self) -> None:
        """Take every notice shown so far off the screen; a repeating cause may be told again at once
        (to the next clinician, about her own session)."""
        if not self.enabled:
            return
        with self._lock:
            self._last.clear()
        self._put(Withdrawal())

    def _put(self, item: Notice | Withdrawal) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._send_all, name="desktop-notifications", daemon=True)
                self._thread.start()
        self._queue.put(item)

    def _send_all(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if isinstance(item, Withdrawal):
                    self._withdraw_shown()
                else:
                    self._on_screen[item.slot] = self._sender.show(item, self._on_screen.get(item.slot, 0))
            except Exception:  # a notification must never end the agent
                log.exception("could not show or withdraw the desktop notification %r", item)

    def _withdraw_shown(self) -> None:
        shown, self._on_screen = self._on_screen, {}
        for notice_id in shown.values():
            if notice_id:
                self._sender.withdraw(notice_id)


class DesktopNotices:
    """What happened, in the clinician's words: the card loop calls one method per event."""

    def __init__(self, config: DesktopConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier(config.notifications)

    def _tell(self, cause: str, summary: str, body: str, *, critical: bool = False, repeating: bool = False,
              slot: str = CARD_SLOT) -> None:
        self.notifier.notify(Notice(cause, summary, body, critical=critical, repeating=repeating, slot=slot))

    def _tell_apart(self, cause: str, summary: str, body: str, **kind: bool) -> None:
        """A notice with a slot of its own (a PACS problem): it replaces only an earlier one of its cause."""
        self._tell(cause, summary, body, slot=cause, **kind)

    def withdraw_all(self) -> None:
        """The card the notices on screen were about was pulled, or another card was inserted."""
        self.notifier.withdraw_all()

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
        self._tell("sign-in-cancelled", summary, _NO_TRY_REINSERT)

    def sign_in_cancelled_by_another_card(self, pin_asked: bool) -> None:
        """The sign-in under way was given up for a card inserted meanwhile; ``pin_asked``: before
        any PIN reached the card (else the PIN was entered and the login may have begun)."""
        self._tell("sign-in-cancelled-other-card", "Sign-in cancelled: another card was inserted",
                   _NO_TRY_REINSERT if pin_asked else "To sign in, remove your card and insert it again.")

    def session_lost(self, *, signed_in: bool, signs_in_again: bool, asks_first: bool) -> None:
        """The card-session process ended without being asked to, signed in or while signing in. A
        sign-in follows (``signs_in_again``; ``asks_first``: in a window asking whether to), or, after
        too many losses, the card waits for re-insertion."""
        summary = "DICOM session ended unexpectedly" if signed_in else "Sign-in stopped unexpectedly"
        before = "Your DICOM connections were ended." if signed_in else "No PIN try was used."
        if asks_first:
            after = "To continue, choose Sign in again in the window that opens."
        elif signs_in_again:
            after = "Your card is being signed in again."
        else:
            after = f"Remove your card and insert it again. If it happens again, call {self.config.helpdesk}."
        self._tell("session-lost", summary, f"{before} {after}")

    def no_pin_entered(self) -> None:
        self._tell("no-pin-entered", "No PIN entered: no try was used",
                   "Remove your card and insert it again to sign in.")

    def pin_window_failed(self) -> None:
        self._tell("pin-window-failed", "Not signed in: the PIN window could not be used",
                   f"No PIN try was used; nothing is wrong with your card. Remove your card and insert it again "
                   f"to sign in. If it happens again, call {self.config.helpdesk}.")

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

    def card_expired(self, *, session_ended: bool = False) -> None:
        """The card's certificate has expired: found at a sign-in, or (``session_ended``) as it
        expired during the card session, which the agent then ended."""
        self._tell("card-expired", "Your card has expired" + (_SESSION_ENDED if session_ended else ""),
                   f"No PACS accepts it any more. Call {self.config.helpdesk} for a new card.", critical=True)

    def card_expires_soon(self, left: str, until: str) -> None:
        """At sign-in: the card's certificate expires within ``left`` (words), at ``until`` (local time)."""
        self._tell_apart("card-expires-soon", f"Your card expires in {left}",
                         f"It cannot be used after {until}. Call {self.config.helpdesk} for a new card before then.")

    def card_not_yet_valid(self) -> None:
        self._tell("card-not-yet-valid", "Your card is not valid yet",
                   f"Its certificate starts later than this computer's clock says. Call {self.config.helpdesk}.",
                   critical=True)

    def card_revoked(self, *, session_ended: bool = False) -> None:
        """The card's certificate is revoked: found at a sign-in, or (``session_ended``) learnt
        during the card session, which the agent then ended."""
        self._tell("card-revoked", "Your card has been revoked" + (_SESSION_ENDED if session_ended else ""),
                   f"No PACS accepts it any more. Call {self.config.helpdesk} for a new card.", critical=True)

    def card_not_usable(self) -> None:
        self._tell("card-not-usable", "Not signed in: your card could not be used",
                   f"Remove your card and insert it again. If it happens again, call {self.config.helpdesk}.")

    def card_swapped(self) -> None:
        self._tell("card-swapped", "Another card was inserted: DICOM connections ended",
                   "The previous card's session ended; the new card signs in next.")

    def pacs_unreachable(self, what: str) -> None:
        self._tell_apart(f"pacs-unreachable:{what}", f"Cannot reach {what}",
                         f"Images cannot be sent or fetched now. Try again in a few minutes; if it goes on, call "
                         f"{self.config.helpdesk}.", repeating=True)

    def certificate_refused(self, what: str) -> None:
        self._tell_apart(f"certificate-refused:{what}", f"{_capital(what)} does not accept your card",
                         f"Call {self.config.helpdesk}: the server refuses your card's certificate.",
                         critical=True, repeating=True)


_NO_TRY_REINSERT = "No PIN try was used. To sign in, remove your card and insert it again."
# After a summary, when the card session was ended for what the summary says (its certificate).
_SESSION_ENDED = ": DICOM connections ended"


def _duration(seconds: float) -> str:
    if seconds >= 120:
        return f"{seconds / 60:g} minutes"
    return f"{seconds:g} seconds"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]
