"""Where a PIN comes from: ``prompt``, ``env:VAR``, ``file:PATH`` or ``protected`` (PIN pad).

A PIN source hands out the PIN once per login attempt, as a :class:`Secret` the caller wipes.
Only ``env:`` keeps a copy between sign-ins (it cannot be read again): one, locked in memory.
See docs/pin-handling.md.

A PIN source that asks nobody (``env:``, ``file:``) cannot tell one card from another: nobody looks
at the card before its PIN goes. :class:`StoredPinUse` therefore gives it to one card only, the first
it was given to, and to none after a try that did not end signed in (docs/configuration.md, ``pin``).

A sign-in the clinician did not start by inserting her card asks first, on the terminal of the
``prompt`` PIN source too (:class:`PromptAskingFirst`): keys typed before the question are thrown
away, and only "y" goes on to the PIN.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_card_agent.desktop.config import GRAPHICAL_PINENTRIES
from dicom_card_agent.desktop.pinentry_choice import NoPinentryError, choose_pinentry
from dicom_card_agent.errors import CardAgentError, ConfigError
from dicom_card_agent.file_trust import TrustRefusal, UnsafeFileError, check_trusted_file
from dicom_card_agent.token.pinentry import (
    Confirmation,
    Pinentry,
    PinEntryCancelledError,
)
from dicom_card_agent.token.secret import Secret, take_environment_variable, wipe
from dicom_card_agent.token.terminal import ask, in_foreground_of, read_pin, wait_for_foreground

if TYPE_CHECKING:  # the words come from the caller: the configuration, which needs PinSource, needs them not
    from dicom_card_agent.desktop.words import DialogWords

PROTECTED = "protected"
# The PIN sources that ask nobody: the agent alone would choose the card their PIN goes to.
ASKS_NOBODY = ("env", "file")
PINENTRY_PROGRAM = "the PIN dialog program"
PINENTRY_RISK = "put a program of their own in its place, which the clinician would type the card's PIN into"
MAX_PIN_FILE_BYTES = 4096


class PinUnavailableError(CardAgentError):
    """The configured PIN source cannot give a PIN."""


class StoredPinWithheldError(PinUnavailableError):
    """A PIN that asks nobody is not given to this card (:class:`StoredPinUse`); nothing was tried."""


@dataclass(frozen=True)
class PinRequest:
    """What an interactive PIN source shows: the dialog's words, and how long it stays open."""

    words: DialogWords
    timeout: float | None = None

    def __str__(self) -> str:
        return f"{self.words.description} {self.words.prompt} "


@dataclass(frozen=True)
class PinSource:
    kind: str  # "prompt" | "pinentry" | "env" | "file" | "protected"
    target: str = ""  # pinentry: the program; "" = chosen for the session (agent/desktop/pinentry_choice.py)
    graphical: tuple[str, ...] = GRAPHICAL_PINENTRIES  # pinentry with no program: the graphical ones to try

    @classmethod
    def parse(cls, text: str) -> PinSource:
        kind, _, target = text.partition(":")
        if text in ("prompt", PROTECTED):
            return cls(text)
        if text == "pinentry":
            return cls("pinentry")
        if kind == "pinentry" and target:
            return cls(kind, target)
        if kind in ("env", "file") and target:
            return cls(kind, target)
        raise ConfigError(
            f"invalid PIN source {text!r}: use prompt, pinentry[:PROGRAM], protected (PIN-pad reader), "
            "env:VARIABLE or file:PATH"
        )

    @property
    def is_protected(self) -> bool:
        return self.kind == PROTECTED

    @property
    def asks_nobody(self) -> bool:
        """The PIN comes from the environment or a file: no person sees which card it goes to."""
        return self.kind in ASKS_NOBODY

    @property
    def confirms_in_dialog(self) -> bool:
        """The PIN dialog itself can ask the clinician to confirm a final PIN try."""
        return self.kind == "pinentry"

    def pinentry_program(self) -> str:
        """The path of the pinentry program that shows the dialog: the configured one, or the one for
        this session. Found again at each use, and refused each time when another user could have
        changed it: the clinician types the card's PIN into it."""
        if self.target:
            program = _installed_pinentry(self.target)
        else:
            try:
                program = choose_pinentry(self.graphical)
            except NoPinentryError as error:
                raise PinUnavailableError(str(error)) from None
        _refuse_unsafe_pinentry(program)
        return program

    def prepare(self) -> None:
        """At start-up, before the agent says it is ready: check a PIN file's owner and mode, that a
        pinentry program is there to run, and take an ``env:`` PIN out of the environment
        (:func:`take_environment_variable`) into the one locked buffer it lives in until the agent stops."""
        if self.kind == "file":
            _check_pin_file(self.target)
        elif self.kind == "env":
            _kept_from_environment(self.target)
        elif self.kind == "pinentry":
            self.pinentry_program()

    def read(self, request: PinRequest | str) -> Secret:
        """The PIN, for one login attempt: the caller wipes it. ``request`` says whose card it is and
        what the card reports, for interactive sources."""
        if self.kind == "env":
            return _kept_from_environment(self.target).copy()
        if self.kind == "file":
            return _read_pin_file(self.target)
        if self.kind == "pinentry":
            return _ask_pinentry(self.pinentry_program(), request)
        if self.kind == "prompt":
            if not sys.stdin.isatty():
                raise PinUnavailableError(
                    "a PIN is needed but there is no terminal to ask on; "
                    "use a pinentry, env:VAR or file:PATH PIN source"
                )
            return read_pin(str(request), f"the PIN prompt{_for_whom(request)}")
        raise PinUnavailableError("a protected-path token takes the PIN on the reader, not from the agent")

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}" if self.target else self.kind


@dataclass(frozen=True)
class CardName:
    """A card as a stored PIN knows it: its token's label and serial (slot ids are not stable)."""

    label: str
    serial: str

    def __str__(self) -> str:
        return f"token {self.label!r} serial {self.serial}"


NO_TRY = "not signed in, no PIN tried"
WOULD_SPEND = "a wrong PIN would spend one of the card's few tries"


class StoredPinUse:
    """Which card a PIN that asks nobody (``env:``, ``file:``) may go to, for the life of the agent
    process. Nobody sees whose card is in the reader before the PIN goes, and each wrong try spends
    one of that card's few: so the PIN goes to one card only, the first it goes to (the only card
    there), unless [identity] token names the cards it is for (a ``pkcs11:`` URI may name several:
    the admin's choice), and to none again after a try the card was not reported to accept. The
    supervisor cannot tell a wrong PIN from a card pulled, or a card-session process lost, before the
    login's answer: either way that try is the last. A failure after the card accepted it (the
    session's start, once logged in) withholds nothing. Decisions only: the caller says what
    happened (:meth:`given_to`, :meth:`accepted_by`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._card: CardName | None = None  # the card the PIN went to first: its card
        self._unanswered = False  # it went to its card, and the card has not been reported to accept it

    @property
    def card(self) -> CardName | None:
        """The card the PIN went to first; None before it went to any."""
        with self._lock:
            return self._card

    def refusal(self, source: str, card: CardName, *, cards_present: Sequence[str] = (),
                selected: bool = False) -> str | None:
        """Why the PIN of ``source`` may not go to ``card`` now; None when it may. ``cards_present``:
        the readers holding a card, as pcscd tells; ``selected``: [identity] token names the card."""
        with self._lock:
            return self._refusal(source, card, cards_present, selected)

    def given_to(self, source: str, card: CardName, *, cards_present: Sequence[str] = (),
                 selected: bool = False) -> None:
        """The PIN goes to ``card`` now: decided again and recorded in one step (another sign-in may
        have given it meanwhile); raises :class:`StoredPinWithheldError` when it may not."""
        with self._lock:
            reason = self._refusal(source, card, cards_present, selected)
            if reason is not None:
                raise StoredPinWithheldError(reason)
            self._card, self._unanswered = card, True

    def accepted_by(self, card: CardName) -> None:
        """``card`` accepted the PIN (its login succeeded, whatever failed after): it goes to that card
        again (a re-insertion, a lost session, a start that failed after the login)."""
        with self._lock:
            if card == self._card:
                self._unanswered = False

    def _refusal(self, source: str, card: CardName, cards_present: Sequence[str], selected: bool) -> str | None:
        if self._card is not None and self._unanswered:
            return (f"the stored PIN ({source}) went to {self._card} and that sign-in did not end signed in (a wrong "
                    "PIN, or the card left or its process ended before the card answered); it is not tried again, "
                    f"on that card or another, until the agent restarts ({WOULD_SPEND}): {NO_TRY}. Check the PIN, "
                    "then restart the agent")
        if self._card is not None and card != self._card and not selected:
            return (f"the stored PIN ({source}) belongs to {self._card}, the card this agent signed in with; another "
                    f"card is not tried with it ({WOULD_SPEND}): {NO_TRY}. To sign in with this card, set [identity] "
                    "token to its label and restart the agent, or use pin = \"pinentry\"")
        if self._card is None and not selected and len(cards_present) > 1:
            readers = ", ".join(repr(reader) for reader in cards_present)
            return (f"{len(cards_present)} cards are in readers ({readers}) and the stored PIN ({source}) goes to one "
                    f"card only; the agent does not guess which ({WOULD_SPEND}): {NO_TRY}. Set [identity] token to "
                    "the label of the card the PIN belongs to, or leave only that card in its reader and insert it "
                    "again")
        return None


# The one record for this process: whichever stored PIN source a reload puts in place, its card stays.
STORED_PIN_USE = StoredPinUse()


# How this thread's PIN dialog is to be reworded (agent/session/manager.py sets it for a sign-in the
# clinician did not start by inserting her card, so that the dialog asks first): None, as asked.
_REWORDING: ContextVar[Callable[[DialogWords], DialogWords] | None] = ContextVar("pin_dialog_rewording",
                                                                                default=None)


@contextmanager
def reworded_dialogs(reword: Callable[[DialogWords], DialogWords]) -> Iterator[None]:
    """PIN dialogs opened in this thread meanwhile show ``reword(words)``."""
    token = _REWORDING.set(reword)
    try:
        yield
    finally:
        _REWORDING.reset(token)


def _ask_pinentry(program: str, request: PinRequest | str) -> Secret:
    dialog = Pinentry(program)
    ttyname = dialog.ttyname if dialog.on_terminal else None
    while True:
        if ttyname is not None:  # drawn from the background, it would stop the agent
            wait_for_foreground(f"the PIN dialog{_for_whom(request)}", ttyname)
        try:
            return _converse(dialog, request)
        except PinEntryCancelledError:
            if ttyname is None or in_foreground_of(ttyname):
                raise
            # Sent to the background as it asked (Ctrl-Z, bg): it could not read the terminal, and
            # ended as cancelled. Nobody cancelled it: asked again, from the start, once back.


def _converse(dialog: Pinentry, request: PinRequest | str) -> Secret:
    if isinstance(request, str):
        return dialog.get_pin(request)
    reword = _REWORDING.get()
    words = request.words if reword is None else reword(request.words)
    questions = [Confirmation(question, ok, cancel) for question, ok, cancel in (
        (words.first_question, words.first_ok, words.first_cancel),
        (words.final_try_question, words.final_try_ok, words.final_try_cancel)) if question is not None]
    return dialog.get_pin(words.description, prompt=words.prompt, title=words.title, confirm=questions,
                          timeout=request.timeout)


# env: PINs, once taken out of the environment: the only copy, locked in memory.
_from_environment: dict[str, Secret] = {}


def _kept_from_environment(variable: str) -> Secret:
    kept = _from_environment.get(variable)
    if kept is None:
        kept = take_environment_variable(variable, locked=True)
        if not kept:
            raise PinUnavailableError(f"the PIN variable {variable} is not set or empty")
        _from_environment[variable] = kept
    return kept


def _installed_pinentry(program: str) -> str:
    """The path ``program`` runs as (looked up on PATH unless it is a path). A pinentry program that
    is not there never appears by waiting: said at start-up, not at the first card insertion."""
    found = shutil.which(program)
    if found is not None:
        return found
    where = program if os.sep in program else f"{program!r} on PATH ({os.environ.get('PATH', '')})"
    raise PinUnavailableError(
        f"the pinentry program {where} does not exist or is not executable: install pinentry-gnome3, pinentry-qt, "
        "pinentry-gtk2 or pinentry-tty, or give its path (pinentry:/usr/bin/pinentry-tty)")


def _refuse_unsafe_pinentry(program: str) -> None:
    """Raise :class:`PinUnavailableError` when another user could have changed ``program``, or a
    directory above it, as for the PKCS#11 module (agent/file_trust.py)."""
    try:
        check_trusted_file(program, PINENTRY_PROGRAM, PINENTRY_RISK)
    except UnsafeFileError as error:
        raise PinUnavailableError(str(error)) from None


PIN_FILE = "the PIN file"
PIN_FILE_RISK = "put the PIN the agent tries on the card there (spending the card's tries), or swap it for another file"
# No symbolic link as the file itself (O_NOFOLLOW), no waiting on a FIFO or a device (O_NONBLOCK): what
# is opened is then looked at through its descriptor (fstat), never by its name again.
_PIN_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _check_pin_file(path: str) -> None:
    """At start-up: everything :func:`_read_pin_file` checks, without reading the PIN."""
    descriptor, _ = _open_pin_file(path)
    os.close(descriptor)


def _open_pin_file(path: str) -> tuple[int, os.stat_result]:
    """The PIN file, opened (a descriptor the caller closes) and checked through that descriptor:
    a regular file of the agent's user, mode 0600 or stricter, in directories no other user can
    write (agent/file_trust.py): whoever can rename entries there can swap the file for a link."""
    try:
        descriptor = os.open(path, _PIN_FILE_FLAGS)
    except OSError as error:
        if error.errno == errno.ELOOP:
            _refuse_unsafe_directories(path)  # a link another user put there: say where they can write
            raise PinUnavailableError(
                f"PIN file {path} is a symbolic link: the agent opens only the file itself, so that nobody can "
                "point it elsewhere; point file: at the file it links to") from None
        raise PinUnavailableError(f"cannot read PIN file {path}: {error.strerror}") from None
    try:
        info = os.fstat(descriptor)
        _refuse_unsafe_pin_file(path, info)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor, info


def _refuse_unsafe_pin_file(path: str, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise PinUnavailableError(
            f"PIN file {path} is not a regular file (it is a {_file_kind(info.st_mode)}): the agent reads the PIN "
            "only from a regular file; point file: at one")
    if info.st_uid != os.getuid():
        raise PinUnavailableError(
            f"PIN file {path} belongs to uid {info.st_uid}, not to the agent's user (uid {os.getuid()}): "
            f"another user could change the PIN the agent tries; run `chown {os.getuid()} {path}` "
            "(as root) or point file: at a file the agent's user owns"
        )
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PinUnavailableError(
            f"PIN file {path} is readable by other users (mode {stat.S_IMODE(info.st_mode):o}): "
            f"run `chmod 600 {path}` first"
        )
    try:
        check_trusted_file(path, PIN_FILE, PIN_FILE_RISK)
    except UnsafeFileError as error:
        raise PinUnavailableError(str(error)) from None
    _refuse_unsafe_directories(path)


def _refuse_unsafe_directories(path: str) -> None:
    """check_trusted_file checks the directories above the file as resolved; a directory link on the
    way (``/shared/link/pin``) hides the directory that holds the link: each directory on the path
    as given is checked too."""
    given = Path(os.path.abspath(path))
    refusal = TrustRefusal(given, PIN_FILE, PIN_FILE_RISK)
    try:
        for directory in given.parents:
            refusal.if_unsafe(Path(os.path.realpath(directory)), directory.stat(), is_directory=True)
    except UnsafeFileError as error:
        raise PinUnavailableError(str(error)) from None


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISDIR, "directory"), (stat.S_ISSOCK, "socket"),
             (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))
    return next((name for test, name in kinds if test(mode)), f"file of mode {mode:o}")


def _read_pin_file(path: str) -> Secret:
    """The first line of the file, read as bytes into a buffer that is wiped: no str of the PIN."""
    descriptor, info = _open_pin_file(path)
    try:
        buffer = bytearray(min(info.st_size, MAX_PIN_FILE_BYTES))
        try:
            length = os.readv(descriptor, [buffer])
        except OSError as error:
            wipe(buffer)
            raise PinUnavailableError(f"cannot read PIN file {path}: {error.strerror}") from None
    finally:
        os.close(descriptor)
    view = memoryview(buffer)[:length]
    end = next((i for i, byte in enumerate(view) if byte in b"\r\n"), length)
    try:
        if end == 0:
            raise PinUnavailableError(f"PIN file {path} is empty")
        return Secret(view[:end])  # wiped within the sign-in: not worth a lock (munlock is per page)
    finally:
        view.release()
        wipe(buffer)


NOT_CONFIRMED = "not confirmed: nothing was sent to the card"
NOT_CONFIRMED_IN_TIME = "not confirmed: the question timed out; nothing was sent to the card"


@dataclass(frozen=True)
class PromptAskingFirst(PinSource):
    """The ``prompt`` PIN source for a sign-in the clinician did not start by inserting her card
    (agent/lifecycle/machine.py, ``SignInCause.asks_first``): before the PIN, the question the PIN
    dialog asks (``reword`` gives the dialog's words for it), on the same terminal, default no. What
    she was typing when it came (the rest of a PIN for the prompt that went) is no answer, nor a PIN."""

    reword: Callable[[DialogWords], DialogWords] | None = None

    def read(self, request: PinRequest | str) -> Secret:
        if isinstance(request, PinRequest) and self.reword is not None:
            words = self.reword(request.words)
            if words.first_question is not None and not ask(
                    f"{words.first_question}\n{words.first_ok.replace('_', '')}? [y/N] ",
                    f"the question before the PIN prompt{_for_whom(request)}", timeout=request.timeout,
                    timed_out=NOT_CONFIRMED_IN_TIME):
                raise PinEntryCancelledError(NOT_CONFIRMED)
        return super().read(request)


def _for_whom(request: PinRequest | str) -> str:
    """Whose card a prompt is for, in the log's words: ' for Alice Example', or ''."""
    return f" for {request.words.person}" if isinstance(request, PinRequest) and request.words.person else ""
