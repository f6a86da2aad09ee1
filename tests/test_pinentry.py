"""The PIN asked through a real pinentry program (pinentry-tty on a pseudo-terminal)."""

from __future__ import annotations

import os
import signal
import termios
import threading
import time
from pathlib import Path

import pytest

from dicom_card_agent.desktop.words import DialogWords, asking_first
from dicom_card_agent.lifecycle.cancel import SignInScope
from dicom_card_agent.lifecycle.machine import SignInCause
from dicom_card_agent.token.pin import PinRequest, PinSource, reworded_dialogs
from dicom_card_agent.token.pinentry import (
    Confirmation,
    NoPinEnteredError,
    PinDialogEndedError,
    Pinentry,
    PinEntryCancelledError,
    PinentryError,
    command,
    escape,
    parse_status,
    unescape,
    unescape_in_place,
)
from pin_dialog import Terminal, pinentry_processes, terminal  # noqa: F401


def test_pin_typed_in_pinentry_tty_reaches_the_agent(terminal: Terminal) -> None:
    person = terminal.type_when(b"PIN:", b"123456\r")
    pin = Pinentry("/usr/bin/pinentry-tty", ttyname=terminal.name).get_pin(
        "PIN of card 'alice' to sign in as CN=Alice Example (few PIN tries left): ")
    person.join(5)
    assert bytes(pin.view()) == b"123456"
    assert b"to sign in as CN=Alice Example (few PIN tries left)" in terminal.screen


def test_pin_with_assuan_special_characters(terminal: Terminal) -> None:
    person = terminal.type_when(b"PIN:", b"12%34 56\r")
    pin = Pinentry("/usr/bin/pinentry-tty", ttyname=terminal.name).get_pin("card")
    assert bytes(pin.view()) == b"12%34 56"
    pin.wipe()
    assert bytes(pin.view()) == bytes(8)
    person.join(5)


def test_a_text_too_long_for_one_assuan_line_is_shortened_and_the_pin_still_asked(terminal: Terminal) -> None:
    """A description over pinentry's 1000-byte line ended the program (`Line passed to IPC too
    long`), and the sign-in failed as `the pinentry program ... exited (no display or terminal?)`."""
    description = "Alice Example, enter the PIN for " + "Zürich 100% PACS, " * 100
    person = terminal.type_when(b"PIN:", b"123456\r")
    pin = Pinentry("/usr/bin/pinentry-tty", ttyname=terminal.name).get_pin(description)
    person.join(5)
    assert bytes(pin.view()) == b"123456"
    assert "Alice Example, enter the PIN for Zürich 100% PACS, Zürich".encode() in terminal.screen
    assert "\u2026".encode() in terminal.screen
    line = command("SETDESC", description)
    assert len(line.encode()) <= 1000 and line.endswith("\u2026")
    assert unescape(line.removeprefix("SETDESC ").removesuffix("\u2026")) in description  # no escape cut in two
    assert command("SETDESC", "100%\nsure") == "SETDESC 100%25%0Asure"


def test_empty_pin_sends_nothing_to_the_card(terminal: Terminal) -> None:
    terminal.type_when(b"PIN:", b"\r")
    with pytest.raises(NoPinEnteredError, match="no PIN entered: nothing was sent to the card"):
        Pinentry("/usr/bin/pinentry-tty", ttyname=terminal.name).get_pin("card")


def test_missing_program_says_what_to_install() -> None:
    with pytest.raises(PinentryError, match="install pinentry-gnome3"):
        Pinentry("/nonexistent/pinentry").get_pin("card")


def test_assuan_encoding_and_responses() -> None:
    assert escape("100%\nsure") == "100%25%0Asure"
    assert unescape("100%25%0Asure") == "100%\nsure"
    line = bytearray(b"D 12%2534%0A")
    end = unescape_in_place(line, 2)
    assert line[2:end] == b"12%34\n"
    assert parse_status("OK").ok
    cancelled = parse_status("ERR 83886179 Operation cancelled <Pinentry>")
    assert not cancelled.ok and cancelled.error_code == 83886179
    with pytest.raises(PinentryError):
        parse_status("garbage")
    with pytest.raises(PinentryError, match="malformed percent escape"):
        unescape_in_place(bytearray(b"%zz"))


def test_pin_source_names() -> None:
    assert PinSource.parse("pinentry") == PinSource("pinentry", "")  # chosen for the session
    assert PinSource.parse("pinentry:/usr/bin/pinentry-gnome3").target == "/usr/bin/pinentry-gnome3"


def test_cancelled_entry_sends_nothing_to_the_card(terminal: Terminal) -> None:
    terminal.type_when(b"PIN:", b"\x04")  # Ctrl-D: the person gives up
    with pytest.raises(PinentryError, match="nothing was sent to the card"):
        Pinentry("/usr/bin/pinentry-tty", ttyname=terminal.name).get_pin("card")


def test_a_dialog_nobody_asked_for_asks_first_then_the_final_try_then_the_pin(
        terminal: Terminal, monkeypatch: pytest.MonkeyPatch) -> None:
    """In this thread, reworded: the dialog asks why it opened, then (one try left) the final-try
    question, then the PIN; each question's answer is the button's mnemonic in pinentry-tty."""
    monkeypatch.setattr(os, "ttyname", lambda fd: terminal.name)
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    words = DialogWords("Sign in: Alice Example", "Alice, enter the PIN", final_try_question="One try left.",
                        person="Alice Example")
    person = terminal.type_when(b"[sc]?", b"s", (b"[uc]?", b"u"), (b"PIN:", b"123456\r"))
    with reworded_dialogs(lambda asked: asking_first(asked, SignInCause.SESSION_LOST)):
        pin = PinSource("pinentry", "/usr/bin/pinentry-tty").read(PinRequest(words))
    person.join(5)
    assert bytes(pin.view()) == b"123456"
    screen = terminal.screen.replace(b"\r", b"")
    assert screen.index(b"Sign in again as Alice Example?\n\nCancel uses no try.") < screen.index(b"One try left.")
    assert screen.index(b"One try left.") < screen.index(b"Alice, enter the PIN")


def test_cancel_in_the_first_question_asks_nothing_more(terminal: Terminal, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "ttyname", lambda fd: terminal.name)
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    words = asking_first(DialogWords("Sign in: Bob", "Bob, enter the PIN", person="Bob"),
                         SignInCause.OVER_OTHER_PIN_DIALOG)
    terminal.type_when(b"[sc]?", b"c")
    with pytest.raises(PinEntryCancelledError, match="not confirmed: nothing was sent to the card"):
        PinSource("pinentry", "/usr/bin/pinentry-tty").read(PinRequest(words))


@pytest.mark.parametrize(("ended_by", "error", "expected"), [
    (signal.SIGKILL, PinDialogEndedError,
     "the PIN dialog (/usr/bin/pinentry-tty) was ended by SIGKILL: nothing was sent to the card"),
    (signal.SIGSEGV, PinentryError,
     "the pinentry program '/usr/bin/pinentry-tty' crashed (SIGSEGV) while its dialog was open: nothing was sent "
     "to the card"),
], ids=["killed", "crashed"])
def test_a_dialog_whose_program_is_killed_or_crashes_says_which(
        terminal: Terminal, ended_by: signal.Signals, error: type, expected: str) -> None:
    """`pkill pinentry`, the OOM killer: the sign-in failed as `the pinentry program ... exited (no
    display or terminal?)`, an error pointing at the display, which was there all along. Killed, the
    dialog counts as closed unanswered (a Cancel); crashed, it is the error it was."""
    ended: list[Exception] = []

    def dialog() -> None:
        try:
            Pinentry("/usr/bin/pinentry-tty", ttyname=terminal.name).get_pin("Bob, enter the PIN")
        except PinentryError as raised:
            ended.append(raised)
    shown = threading.Thread(target=dialog, daemon=True)
    shown.start()
    terminal.wait_for_text(b"PIN:")
    [dialog_program] = pinentry_processes(parent=os.getpid())
    os.kill(dialog_program, ended_by)
    shown.join(10)
    assert len(ended) == 1 and type(ended[0]) is error, ended
    assert str(ended[0]) == expected


@pytest.mark.parametrize(("script", "expected"), [
    ("exit 1", "the pinentry program '{program}' exited (no display or terminal?)"),
    ("echo 'OK hello'; read line; exit 3",
     "the pinentry program '{program}' exited with status 3 while its dialog was open: nothing was sent to the card"),
])
def test_a_program_that_ends_by_itself_is_told_apart_from_one_without_a_display(
        tmp_path: Path, script: str, expected: str) -> None:
    program = tmp_path / "pinentry-broken"
    program.write_text(f"#!/bin/sh\n{script}\n")
    program.chmod(0o755)
    with pytest.raises(PinentryError) as ended:
        Pinentry(str(program), ttyname="").get_pin("Bob, enter the PIN")
    assert type(ended.value) is PinentryError
    assert str(ended.value) == expected.format(program=program)


@pytest.mark.parametrize("closed_at", [b"[sc]?", b"PIN:"])
def test_a_dialog_closed_by_a_cancelled_sign_in_leaves_the_terminal_as_it_was(terminal: Terminal,
                                                                              closed_at: bytes) -> None:
    """A pulled card, a lock or a stop closes pinentry-tty (SIGTERM) at its question or at its PIN
    prompt; it restores the terminal only when it ends by itself. It left echo off (and, at a
    question, canonical input too): the clinician's typing no longer showed, and in the next
    dialog Ctrl-D and Enter did not end her input."""
    modes = termios.ICANON | termios.ECHO
    before = termios.tcgetattr(terminal.slave)[3] & modes
    scope = SignInScope()
    ended: list[Exception] = []

    def dialog() -> None:
        try:
            scope.run(lambda: Pinentry("/usr/bin/pinentry-tty", ttyname=terminal.name).get_pin(
                "Bob, enter the PIN", confirm=Confirmation("Sign in as Bob?", "Sign in", "Cancel")))
        except PinentryError as error:
            ended.append(error)
    if closed_at == b"PIN:":
        terminal.type_when(b"[sc]?", b"s")
    shown = threading.Thread(target=dialog, daemon=True)
    shown.start()
    terminal.wait_for_text(closed_at)
    time.sleep(0.2)  # it waits for a key now, in the modes it set
    scope.cancel("card removed")
    shown.join(10)
    assert ended, "the dialog did not end"
    assert termios.tcgetattr(terminal.slave)[3] & modes == before
