"""The clinician's words and the pinentry choice, without a desktop: the exact texts, the
[desktop] table's errors, which pinentry a session gets (from real files on a PATH)."""

from __future__ import annotations

import datetime
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dicom_card_agent.desktop.config import DesktopConfig, parse_desktop_config
from dicom_card_agent.desktop.notifications import Notice, Notifier, escape_markup
from dicom_card_agent.desktop.pinentry_choice import NoPinentryError, choose_pinentry
from dicom_card_agent.desktop.words import person_name, pin_dialog, purpose
from dicom_card_agent.errors import ConfigError
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


def test_what_the_pin_is_for() -> None:
    assert purpose("Radiology PACS", ["pacs"]) == "Radiology PACS"
    assert purpose("", ["pacs"]) == "the DICOM connection pacs"
    assert purpose("", ["pacs", "archive", "retrieves"]) == "the DICOM connections pacs, archive and retrieves"


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


def test_a_repeating_cause_is_told_once_per_few_minutes_each() -> None:
    sent: list[str] = []
    notifier = Notifier(True, sender=lambda notice: sent.append(notice.summary))
    for summary, cause in [("down", "pacs-unreachable:a"), ("down again", "pacs-unreachable:a"),
                           ("other down", "pacs-unreachable:b")]:
        notifier.notify(Notice(cause, summary, "", repeating=True))
    notifier.notify(Notice("card-removed", "removed", ""))
    notifier.notify(Notice("card-removed", "removed again", ""))
    off = Notifier(False, sender=lambda notice: sent.append("never"))
    off.notify(Notice("card-removed", "x", ""))
    deadline = time.monotonic() + 5
    while len(sent) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # a fifth, wrongly sent, would be in by now
    assert sent == ["down", "other down", "removed", "removed again"]
    assert escape_markup("<b>A & B</b>") == "&lt;b&gt;A &amp; B&lt;/b&gt;"
