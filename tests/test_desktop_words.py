"""The clinician's words and the pinentry choice, without a desktop: the exact texts, the
[desktop] table's errors, which pinentry a session gets (from real files on a PATH)."""

from __future__ import annotations

import datetime
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dicom_card_agent.desktop.config import DesktopConfig, parse_desktop_config
from dicom_card_agent.desktop.notifications import DesktopNotices, Notice, Notifier, escape_markup
from dicom_card_agent.desktop.pinentry_choice import NoPinentryError, choose_pinentry
from dicom_card_agent.desktop.words import asking_first, person_name, pin_dialog, purpose, time_left, tries_left
from dicom_card_agent.errors import ConfigError
from dicom_card_agent.lifecycle.machine import SignInCause
from dicom_card_agent.token.discovery import PinState


def certificate(*attributes: x509.NameAttribute) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Hospital"), *attributes])
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))


def test_the_person_is_named_as_a_person_reads_it_never_by_a_dn() -> None:
    assert person_name(certificate(x509.NameAttribute(NameOID.COMMON_NAME, "Alice Example"))) == "Alice Example"
    assert person_name(certificate(x509.NameAttribute(NameOID.GIVEN_NAME, "Bob"),
                                   x509.NameAttribute(NameOID.SURNAME, "Jones"))) == "Bob Jones"
    assert person_name(certificate()) == "the card holder"


def test_a_name_that_would_drive_a_terminal_is_shown_escaped() -> None:
    """The name goes into the PIN prompt on a terminal and into pinentry-tty's dialog as written: a
    certificate's escape sequences (a window title, the screen cleared, the cursor moved over the
    words) would act there."""
    cn = "Alice\x1b]0;Sign in: Bob\x07\x1b[2J Example\u202e"
    assert person_name(certificate(x509.NameAttribute(NameOID.COMMON_NAME, cn))) == \
        "Alice\\x1b]0;Sign in: Bob\\x07\\x1b[2J Example\\u202e"


def test_what_the_pin_is_for() -> None:
    assert purpose("Radiology PACS", ["pacs"]) == "Radiology PACS"
    assert purpose("", ["pacs"]) == "the DICOM connection pacs"
    assert purpose("", ["pacs", "archive", "retrieves"]) == "the DICOM connections pacs, archive and retrieves"
    five = [f"site-{n}" for n in range(5)]
    assert purpose("", five) == "the DICOM connections site-0, site-1, site-2, site-3 and site-4"
    many = [f"site-{n}" for n in range(45)]
    assert purpose("", many) == "the DICOM connections site-0, site-1, site-2, site-3 and 41 more"


def test_a_name_longer_than_a_common_name_may_be_is_shortened() -> None:
    surname = "Example-" * 20  # a common name may not be this long; a surname may
    shown = person_name(certificate(x509.NameAttribute(NameOID.GIVEN_NAME, "Alice"),
                                    x509.NameAttribute(NameOID.SURNAME, surname)))
    assert shown == f"Alice {surname}"[:63] + "\u2026" and len(shown) == 64


def test_the_dialog_in_plain_words() -> None:
    plain = pin_dialog("Alice Example", "Radiology PACS", PinState.OK, "IT", ask_final_try=True)
    assert (plain.title, plain.description, plain.prompt, plain.final_try_question) == (
        "Sign in: Alice Example", "Alice Example, enter the PIN of your card to use Radiology PACS.", "PIN:", None)
    low = pin_dialog("Alice Example", "Radiology PACS", PinState.COUNT_LOW, "IT", ask_final_try=True)
    assert low.description.endswith("\n\nOnly a few PIN tries are left: type your PIN carefully.")
    last = pin_dialog("Alice Example", "Radiology PACS", PinState.FINAL_TRY, "the service desk", ask_final_try=True)
    assert last.description.endswith("\n\nThis is your last PIN try: a wrong PIN blocks the card.")
    assert last.final_try_question == (
        "Alice Example, your card has one PIN try left. If the next PIN is wrong, the card is blocked and only "
        "the service desk can unblock it.\n\nContinue only if you are sure of your PIN. Cancel uses no try.")
    admin = pin_dialog("Alice Example", "Radiology PACS", PinState.FINAL_TRY, "IT", ask_final_try=False)
    assert admin.final_try_question is None  # --confirm-final-try: confirmed already


def test_a_dialog_nobody_asked_for_asks_first_with_cancel_the_default() -> None:
    words = pin_dialog("Alice Example", "Radiology PACS", PinState.FINAL_TRY, "IT", ask_final_try=True)
    lost = asking_first(words, SignInCause.SESSION_LOST)
    assert (lost.first_question, lost.first_ok, lost.first_cancel) == (
        "Your DICOM session ended unexpectedly. Sign in again as Alice Example?\n\nCancel uses no try.",
        "_Sign in again", "_Cancel")
    assert lost.final_try_question == words.final_try_question  # asked next, as before
    assert asking_first(words, SignInCause.RELOADED).first_question == (
        "Your DICOM session was restarted for new settings. Sign in again as Alice Example?\n\nCancel uses no try.")
    other = asking_first(words, SignInCause.OVER_OTHER_PIN_DIALOG)
    assert (other.first_question, other.first_ok) == (
        "This card was inserted while another card's PIN window was open. Sign in as Alice Example?\n\n"
        "Cancel uses no try.", "_Sign in")
    assert words.first_question is None  # an insertion asks nothing first


def test_a_wrong_pin_says_only_what_the_card_told() -> None:
    assert tries_left(PinState.COUNT_LOW) == "Only a few tries are left."
    assert tries_left(PinState.FINAL_TRY) == "One try is left: the next wrong PIN blocks the card."
    # No flag set: the card may have one try left or ten; PKCS#11 cannot tell which.
    assert tries_left(PinState.OK) == "The card did not say how many tries are left: type carefully."


def executable(directory: Path, name: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\nexit 1\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_a_graphical_session_gets_the_first_installed_graphical_pinentry(tmp_path: Path) -> None:
    qt, tty = executable(tmp_path, "pinentry-qt"), executable(tmp_path, "pinentry-tty")
    graphical = ("pinentry-gnome3", "pinentry-qt", "pinentry-gtk-2")
    assert choose_pinentry(graphical, {"PATH": str(tmp_path), "DISPLAY": ":0"}, has_terminal=True) == str(qt)
    assert choose_pinentry(graphical, {"PATH": str(tmp_path), "WAYLAND_DISPLAY": "wayland-0"},
                           has_terminal=False) == str(qt)
    assert choose_pinentry(graphical, {"PATH": str(tmp_path)}, has_terminal=True) == str(tty)
    with pytest.raises(NoPinentryError, match="needs a desktop session .* or a terminal"):
        choose_pinentry(graphical, {"PATH": str(tmp_path)}, has_terminal=False)
    with pytest.raises(NoPinentryError, match=r"no graphical pinentry is installed \(looked for pinentry-gtk-2"):
        choose_pinentry(("pinentry-gtk-2",), {"PATH": str(tmp_path), "DISPLAY": ":0"}, has_terminal=False)


def test_the_desktop_table() -> None:
    assert parse_desktop_config(None, "a.toml") == DesktopConfig()
    chosen = parse_desktop_config({"notifications": False, "site_label": "Radiology PACS", "helpdesk": "ext. 4444",
                                   "pinentry": "pinentry-qt"}, "a.toml")
    assert chosen == DesktopConfig(False, "Radiology PACS", "ext. 4444", ("pinentry-qt",))
    with pytest.raises(ConfigError, match=r"a.toml \[desktop\]: unknown key\(s\) notification;"):
        parse_desktop_config({"notification": True}, "a.toml")
    with pytest.raises(ConfigError, match=r"\[desktop\].notifications: must be true or false"):
        parse_desktop_config({"notifications": "yes"}, "a.toml")
    with pytest.raises(ConfigError, match=r"\[desktop\].pinentry: must be a list of pinentry programs"):
        parse_desktop_config({"pinentry": []}, "a.toml")
    assert parse_desktop_config({"site_label": "x" * 100, "helpdesk": "y" * 200}, "a.toml").helpdesk == "y" * 200
    with pytest.raises(ConfigError) as too_long:
        parse_desktop_config({"helpdesk": "y" * 201}, "a.toml")
    assert str(too_long.value) == ("a.toml [desktop].helpdesk: 201 characters, where at most 200 fit in the sentence "
                                   "of the PIN dialog and the notifications that shows it: shorten it")
    with pytest.raises(ConfigError, match=r"\[desktop\].site_label: 101 characters, where at most 100 fit"):
        parse_desktop_config({"site_label": "x" * 101}, "a.toml")


class Screen:
    """A notification server: what is shown, by id, and what was sent in what place."""

    def __init__(self) -> None:
        self.shown: dict[int, str] = {}
        self.sent: list[tuple[str, int]] = []  # (summary, the id it replaced)
        self._next = 0

    def show(self, notice: Notice, replaces: int) -> int:
        self.sent.append((notice.summary, replaces))
        if replaces not in self.shown:
            self._next += 1
            replaces = self._next
        self.shown[replaces] = notice.summary
        return replaces

    def withdraw(self, shown: int) -> None:
        self.shown.pop(shown, None)


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # anything sent wrongly after it would be in by now


def test_a_cards_notices_replace_each_other_and_leave_with_the_card() -> None:
    screen = Screen()
    notices = DesktopNotices(DesktopConfig(helpdesk="IT"), Notifier(True, sender=screen))
    notices.signed_in("Alice Example", "Radiology PACS")
    notices.pacs_unreachable("Radiology PACS")  # a slot of its own: it does not replace the card's
    notices.locked()
    wait_until(lambda: len(screen.sent) == 3)
    assert sorted(screen.shown.values()) == ["Cannot reach Radiology PACS", "DICOM session locked"]
    assert screen.sent == [("Signed in as Alice Example", 0), ("Cannot reach Radiology PACS", 0),
                           ("DICOM session locked", 1)]  # in place of the first, id 1
    notices.withdraw_all()  # Alice pulls her card
    notices.pin_blocked()
    notices.withdraw_all()
    notices.pacs_unreachable("Radiology PACS")  # told again at once: to the next clinician
    wait_until(lambda: len(screen.sent) == 5)
    assert list(screen.shown.values()) == ["Cannot reach Radiology PACS"]
    assert screen.sent[3:] == [("Card blocked: too many wrong PINs", 0), ("Cannot reach Radiology PACS", 0)]


def test_a_repeating_cause_is_told_once_per_few_minutes_each() -> None:
    sent: list[str] = []

    class Recorder:
        def show(self, notice: Notice, replaces: int) -> int:
            sent.append(notice.summary)
            return len(sent)

        def withdraw(self, shown: int) -> None:
            sent.append("withdrawn")

    notifier = Notifier(True, sender=Recorder())
    for summary, cause in [("down", "pacs-unreachable:a"), ("down again", "pacs-unreachable:a"),
                           ("other down", "pacs-unreachable:b")]:
        notifier.notify(Notice(cause, summary, "", repeating=True))
    notifier.notify(Notice("card-removed", "removed", ""))
    notifier.notify(Notice("card-removed", "removed again", ""))
    off = Notifier(False, sender=Recorder())
    off.notify(Notice("card-removed", "x", ""))
    deadline = time.monotonic() + 5
    while len(sent) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # a fifth, wrongly sent, would be in by now
    assert sent == ["down", "other down", "removed", "removed again"]
    assert escape_markup("<b>A & B</b>") == "&lt;b&gt;A &amp; B&lt;/b&gt;"


@pytest.mark.parametrize(("seconds", "words"), [
    (14 * 86400 - 1, "13 days"), (86400, "1 day"), (86399, "23 hours"), (3600, "1 hour"), (3599, "59 minutes"),
    (60, "1 minute"), (59.9, "59 seconds"), (1, "1 second"), (0.5, "0 seconds"), (-3, "0 seconds"),
])
def test_time_left_is_the_largest_whole_unit(seconds: float, words: str) -> None:
    """How long a card has left, as the notice at sign-in says it ("Your card expires in 3 days")."""
    assert time_left(seconds) == words
