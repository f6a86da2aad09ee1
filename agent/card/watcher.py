"""Which card is present now, and when to look again.

Polling ``C_GetSlotList(tokenPresent)`` is cheap (microseconds on SoftHSM, ~10 ms on OpenSC with
pcscd) and works with every module; python-pkcs11's ``wait_for_slot_event`` loses the slot id
(design notes, section 2). A card that left is no longer in the slot list, or its module answers
CKR_TOKEN_NOT_PRESENT, CKR_DEVICE_REMOVED, CKR_SLOT_ID_INVALID or CKR_TOKEN_NOT_RECOGNIZED: that is
"no card" at once. Any other error (CKR_GENERAL_ERROR, CKR_DEVICE_ERROR, ...) is a look that failed,
not a removal: SoftHSM answers C_GetTokenInfo with CKR_GENERAL_ERROR while another process (the
card-session process logging in) rewrites the token's file, which under load the card loop saw and
took for a pulled card, ending the clinician's session. The card is then taken to be as it was until
looks have failed for :data:`UNREADABLE_SECONDS` (and :data:`UNREADABLE_LOOKS` looks) in a row; a
reader that stays unreadable longer counts as empty, so that a card pulled from a module that only
answers errors still ends its session.

Where pcscd runs, its reader events (agent.card.pcsc) cut the wait between two polls short, so a
removal is acted on as soon as pcscd reports it instead of at the next tick; polling stays as the
backstop for modules that do not use pcscd and for events pcscd does not report.

A look is ``C_GetSlotList(tokenPresent)`` and a ``C_GetTokenInfo`` per token. The second costs a
card round trip with OpenSC (it asks the card for the PIN's retry counter: a VERIFY without data),
which every 50 ms made the reader's polling the card's busiest client, 20 APDUs a second, taking
turns with the card-session process's probe, login and signatures. While PC/SC events are live,
the tokens' information is therefore read again only when pcscd reported a change, the slots with
a token changed, or :data:`TOKEN_INFO_SECONDS` after it was last read (a backstop for a lost
event); the slot list itself, which OpenSC answers from pcscd's reader state, is asked every look,
so a pulled card is seen as soon as before.

A token in a slot that cannot hold a removable device (no CKF_REMOVABLE_DEVICE: SoftHSM, an HSM
partition) is always there, as PKCS#11 defines such a slot, so it is looked at every
:data:`FIXED_TOKEN_LOOK_SECONDS` instead: every 50 ms cost SoftHSM ~250 system calls a look (1.6%
of a core while idle) and would ask a network HSM 20 times a second. Where the module also has a
removable slot (an nShield's card reader beside its module slot) every look stays 50 ms apart, so
that a card inserted there is seen as soon as before.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from pkcs11.constants import SlotFlag
from pkcs11.exceptions import DeviceRemoved, PKCS11Error, SlotIDInvalid, TokenNotPresent, TokenNotRecognised
from pkcs11.types import Slot, Token

from dicom_card_agent.card.pcsc import RETRY_SECONDS, PcscEventSource, PcscUnavailable
from dicom_card_agent.descriptors import descriptors_exhausted
from dicom_card_agent.token.discovery import matching_tokens, token_serial, tokens_in
from dicom_card_agent.token.module import MODULE_CALLS, LoadedModule

log = logging.getLogger("agent.card")

POLL_SECONDS = 0.05  # removal must be observed within 250 ms
FIXED_TOKEN_LOOK_SECONDS = 1.0  # a module with no removable slot (see the module's docstring)
# "poll" turns the PC/SC wake-ups off (diagnosis of a misbehaving pcscd, benchmarks).
EVENTS_ENV = "CARD_AGENT_CARD_EVENTS"


@dataclass(frozen=True)
class Card:
    """A token in a slot, identified by label and serial (slot ids are not stable)."""

    label: str
    serial: str

    @property
    def selector(self) -> str:
        return f"pkcs11:token={self.label};serial={self.serial}"

    def event_fields(self) -> dict[str, str]:
        return {"token": self.label, "serial": self.serial}

    def __str__(self) -> str:
        return f"{self.label!r} (serial {self.serial})"


class CannotLook(Exception):
    """The reader cannot be looked at this time: the card is taken to be as it was."""


class ModuleBusy(CannotLook):
    """A sign-in is talking to the module."""


class DescriptorsExhausted(CannotLook):
    """The process has no file descriptor left (EMFILE/ENFILE), so the module could not answer:
    not a sign that the card left. Another user's connections can cause this."""


class CardUnreadable(CannotLook):
    """The module failed to answer with an error that does not say the card left: the card is taken
    to be as it was, for at most :data:`UNREADABLE_SECONDS`."""


BUSY_WAIT_SECONDS = 0.1  # the card loop must stay free for signals and the session's checks

# The answers that mean the card left; any other error is a failed look (see the module's docstring).
GONE_ERRORS: tuple[type[PKCS11Error], ...] = (TokenNotPresent, DeviceRemoved, SlotIDInvalid, TokenNotRecognised)
# How long looks may fail in a row before the reader counts as empty: long enough to ride out a
# module busy for a moment under load (SoftHSM's lasted one look), short enough that a card pulled
# from a module answering only errors still ends its session within about a second.
UNREADABLE_SECONDS = 1.0
UNREADABLE_LOOKS = 3  # and at least this many looks, should the card loop itself be starved of CPU
# With PC/SC events live: the longest the tokens' information (label, serial) is taken from an
# earlier look without a change reported by pcscd.
TOKEN_INFO_SECONDS = 1.0
# How many changes pcscd has reported so far, or None while PC/SC events are not live.
PcscChanges = Callable[[], "int | None"]


# Why a card cannot sign in as configured, judged from what it shows without a login (None: it can).
# Raises PKCS11Error when the card cannot be read (pulled while being looked at).
Judge = Callable[[Token], "str | None"]


C = TypeVar("C", bound=Hashable)


class ArrivalOrder(Generic[C]):
    """The cards present, the order in which they appeared, and the ones passed over: a card that
    was chosen and then passed over for a newer one waits until it is re-inserted (a card that
    left and came back is new). Cards first seen at the same look count as inserted in the order
    given, the first last, so that, all else equal, the first slot or reader wins."""

    def __init__(self) -> None:
        self.present: tuple[C, ...] = ()
        self.passed_over: set[C] = set()
        self.chosen: C | None = None
        self._rank: dict[C, int] = {}
        self._count = 0

    def note(self, cards: Sequence[C]) -> set[C]:
        """The cards present at this look; those that left since the last."""
        self.present = tuple(cards)
        gone = set(self._rank) - set(cards)
        for card in gone:
            del self._rank[card]
            self.passed_over.discard(card)
        for card in reversed([card for card in cards if card not in self._rank]):
            self._count += 1
            self._rank[card] = self._count
        return gone

    def newest_first(self, cards: Iterable[C]) -> list[C]:
        return sorted(cards, key=lambda card: self._rank.get(card, 0), reverse=True)

    def choose(self, chosen: C | None) -> C | None:
        """This look's choice; the card chosen before, when another is chosen while it is still
        present, is passed over. Returns the card chosen before."""
        before = self.chosen
        if chosen is not None and before is not None and chosen != before and before in self.present:
            self.passed_over.add(before)
        self.chosen = chosen
        return before


class FailingLooks:
    """Looks that fail in a row: the card is taken to be as it was for :data:`UNREADABLE_SECONDS`
    (and :data:`UNREADABLE_LOOKS` looks), then the reader counts as empty."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.since: float | None = None  # when looks began to fail in a row (None: the last one worked)
        self.looks = 0
        self._gave_up = False

    def failed(self, reason: str, first_words: str) -> float | None:
        """Raise :class:`CardUnreadable` within the grace (logging ``first_words`` at the first
        failure); past it, how long looks have failed, the first time only (None after)."""
        now = self.clock()
        if self.since is None:
            self.since, self.looks, self._gave_up = now, 0, False
            log.info("%s", first_words)
        self.looks += 1
        failing_for = now - self.since
        if failing_for < UNREADABLE_SECONDS or self.looks < UNREADABLE_LOOKS:
            raise CardUnreadable(reason)
        if self._gave_up:
            return None
        self._gave_up = True
        return failing_for

    def answered(self, words: str) -> None:
        """A look worked: a run of failed looks, if any, is over (``words`` logged with its count of looks)."""
        if self.since is not None:
            log.info(words, self.looks)
        self.since, self.looks = None, 0


class CardWatcher:
    """Which card is present now, and, when several are (several readers), which one to sign in with.

    With several candidates, each card is judged once per insertion (cached by label and serial,
    from the public objects, no login: no PIN try is spent to find out) and the most recently
    inserted card with a usable identity is chosen; the choice and what was skipped are logged.
    Cards present at the first look count as inserted in slot order, the first slot last (so that,
    all else equal, the first slot wins, as with a single reader). When no candidate is usable,
    the most recent one is returned all the same: its sign-in fails with the reason, which
    ``status`` shows.

    A card that was chosen and then passed over for a newer one is not chosen again until it is
    re-inserted: when the newer card leaves, the agent does not sign in by itself with a card that
    may have been locked, have failed its PIN, or been left behind by a clinician who went away."""

    def __init__(self, module: LoadedModule, selector: str | None, judge: Judge | None = None) -> None:
        self.module = module
        self.selector = selector
        self.judge = judge
        self._order: ArrivalOrder[Card] = ArrivalOrder()  # every initialised token seen at the last look
        self._verdicts: dict[Card, str | None] = {}  # Card -> why unusable (None: usable)
        self._reported: object = None  # what was last logged, so that a choice is logged once
        self._failures = FailingLooks()
        self.pcsc_changes: PcscChanges | None = None  # set by the card loop where PC/SC events run
        # The tokens of the last look that read them, and what it saw (see the module's docstring).
        self._tokens: list[Token] = []
        self._token_slots: tuple[int, ...] | None = None
        self._tokens_read_at = 0.0
        self._tokens_changes: int | None = None
        self.look_interval = POLL_SECONDS  # how long the card loop waits for the next look
        self._interval_slots: tuple[int, ...] | None = None  # the slots with a token it was judged from

    @property
    def present(self) -> tuple[Card, ...]:
        return self._order.present

    @property
    def passed_over_present(self) -> tuple[Card, ...]:
        """Cards present that wait for re-insertion: passed over for a newer card."""
        return tuple(card for card in self._order.present if card in self._order.passed_over)

    def look(self) -> Card | None:
        """The card to sign in with, if any is present. Raises :class:`ModuleBusy` when another
        thread (a sign-in) holds the module for longer than :data:`BUSY_WAIT_SECONDS`,
        :class:`CardUnreadable` when the module failed to answer (for a while: see the module's
        docstring), :class:`DescriptorsExhausted` when the process is out of file descriptors."""
        if not MODULE_CALLS.acquire(timeout=BUSY_WAIT_SECONDS):
            raise ModuleBusy()
        try:
            if descriptors_exhausted():  # the module would fail, or see no token, for want of files
                raise DescriptorsExhausted()
            tokens = self._present_tokens()
            if not tokens and descriptors_exhausted():
                raise DescriptorsExhausted()
            self._answered()
            for gone in self._order.note([Card(t.label, token_serial(t)) for t in tokens]):
                self._verdicts.pop(gone, None)
            if self.selector:
                candidates = matching_tokens(tokens, self.selector)
                if not candidates:
                    self._report_absent()
            else:
                candidates = tokens
            return self._choose(candidates)
        except GONE_ERRORS:
            self._answered()
            return None
        except PKCS11Error as error:
            if descriptors_exhausted():
                raise DescriptorsExhausted() from None
            self._failed_look(error)
            return None  # failing for longer than the grace: the reader counts as empty
        finally:
            MODULE_CALLS.release()

    def _present_tokens(self) -> list[Token]:
        """The initialised tokens present; their information read again only when it may have
        changed (see the module's docstring). The caller holds :data:`MODULE_CALLS`."""
        changes = self.pcsc_changes() if self.pcsc_changes is not None else None  # before the look: a
        # change reported while it runs makes the next look read the tokens again
        slots = self.module.slots_with_token()
        slot_ids = tuple(slot.slot_id for slot in slots)
        if slot_ids != self._interval_slots:
            self._judge_look_interval(slots)
            self._interval_slots = slot_ids
        if (changes is not None and changes == self._tokens_changes and slot_ids == self._token_slots
                and time.monotonic() - self._tokens_read_at < TOKEN_INFO_SECONDS):
            return self._tokens
        self._token_slots = None  # a read that fails is not reused
        tokens = tokens_in(slots)
        self._tokens, self._token_slots = tokens, slot_ids
        self._tokens_read_at, self._tokens_changes = time.monotonic(), changes
        return tokens

    def _judge_look_interval(self, slots_with_token: list[Slot]) -> None:
        """Every 50 ms, unless no card can be inserted or pulled here (see the module's docstring).
        The caller holds :data:`MODULE_CALLS`."""
        fixed = (bool(slots_with_token) and not any(map(_removable, slots_with_token))
                 and not any(map(_removable, self.module.all_slots())))
        interval = FIXED_TOKEN_LOOK_SECONDS if fixed else POLL_SECONDS
        if interval == self.look_interval:
            return
        self.look_interval = interval
        if fixed:
            log.info("the module's tokens are in slots that cannot hold a removable device: the card loop "
                     "looks at them every %g s", FIXED_TOKEN_LOOK_SECONDS)
        else:
            log.info("the module has a slot for a removable device: the card loop looks every %g ms",
                     POLL_SECONDS * 1000)

    def _failed_look(self, error: PKCS11Error) -> None:
        """Raise :class:`CardUnreadable` while looks have failed for less than the grace; return
        (the reader counts as empty) once they have failed for longer."""
        failing_for = self._failures.failed(_error_name(error), f"the card reader could not be read "
                                            f"({_error_name(error)}): the card is taken to be as it was; looking again")
        if failing_for is not None:
            log.warning("the card reader has not answered for %.1f s (%d looks failed, the last with %s): the card "
                        "is taken to be removed", failing_for, self._failures.looks, _error_name(error))

    def _answered(self) -> None:
        self._failures.answered("the card reader answers again (after %d failed looks)")

    def _choose(self, tokens: list[Token]) -> Card | None:
        chosen = self._choose_among(tokens)
        self._order.choose(chosen)
        return chosen

    def _choose_among(self, tokens: list[Token]) -> Card | None:
        cards = {Card(t.label, token_serial(t)): t for t in tokens}
        waiting = [card for card in cards if card in self._order.passed_over]
        for card in waiting:
            del cards[card]
        if not cards:
            if waiting:
                self._report_passed_over(waiting)
            return None
        newest_first = self._order.newest_first(cards)
        if len(cards) == 1 or self.judge is None:
            return newest_first[0]
        for card in newest_first:
            if card not in self._verdicts:
                try:
                    self._verdicts[card] = self.judge(cards[card])
                except PKCS11Error as error:  # gone or unreadable mid-way: judged again at the next look
                    log.debug("card %s could not be judged: %s", card, error)
                    continue
        usable = [card for card in newest_first if card in self._verdicts and self._verdicts[card] is None]
        chosen = usable[0] if usable else newest_first[0]
        self._report_choice(chosen, newest_first, bool(usable))
        return chosen

    def _report_choice(self, chosen: Card, newest_first: list[Card], usable: bool) -> None:
        key = (chosen, tuple(newest_first), tuple(self._verdicts.get(c, "?") for c in newest_first))
        if key == self._reported:
            return
        self._reported = key
        others = []
        for card in newest_first:
            if card == chosen:
                continue
            if card not in self._verdicts:
                others.append(f"{card} could not be read")
            elif self._verdicts[card] is not None:
                others.append(f"{card} {self._verdicts[card]}")
            else:
                others.append(f"{card} was inserted earlier")
        if usable:
            log.info("card %s chosen: %s", chosen, "; ".join(others))
        else:
            log.warning("none of the %d cards present holds a usable identity; trying the most recently "
                        "inserted, %s: %s", len(newest_first), chosen, "; ".join(others))

    def _report_passed_over(self, waiting: list[Card]) -> None:
        key = ("passed over", tuple(waiting))
        if key == self._reported:
            return
        self._reported = key
        log.info("%s not signed in again: a card inserted after %s was used; remove and re-insert %s to sign in",
                 ", ".join(f"card {card}" for card in waiting), "it" if len(waiting) == 1 else "them",
                 "it" if len(waiting) == 1 else "them")

    def _report_absent(self) -> None:
        """The named token is waited for (it may be a card not yet inserted): say once per change
        of the cards present which ones are there, so that a typo shows."""
        key = ("absent", self.present)
        if key == self._reported:
            return
        self._reported = key
        present = ", ".join(str(card) for card in self.present) or "none"
        log.warning("token %r is not present; present tokens: %s; waiting for it (check [identity] token "
                    "if it should be one of these)", self.selector, present)


class CardEvents:
    """What the card loop sleeps on between two looks at the reader: ``POLL_SECONDS``, cut short by
    a PC/SC event where pcscd answers. Use as a context manager (it owns the PC/SC thread)."""

    def __init__(self, *, use_pcsc: bool | None = None, card_readers: bool = True) -> None:
        """``card_readers`` False: the module's tokens are not in PC/SC readers (SoftHSM), so
        pcscd has nothing to tell and is not asked."""
        self._changed = threading.Event()
        self._source: PcscEventSource | None = None
        self.use_pcsc = os.environ.get(EVENTS_ENV, "") != "poll" if use_pcsc is None else use_pcsc
        self.card_readers = card_readers
        self._polling = f"polling every {POLL_SECONDS * 1000:g} ms"
        self.description = self._polling
        # Why pcscd's events cannot be had, for a module whose tokens are in card readers, while they
        # cannot: they are asked for again every RETRY_SECONDS (retry_pcsc), the module polled meanwhile.
        self.unavailable: PcscUnavailable | None = None
        self._retry_at = 0.0

    @property
    def pcsc(self) -> bool:
        return self._source is not None

    @property
    def source(self) -> PcscEventSource | None:
        """pcscd's events, where they run (the card loop may learn of cards from them alone)."""
        return self._source

    def __enter__(self) -> CardEvents:
        if not self.card_readers:
            self.description += " (the module's tokens are not in card readers: no PC/SC events to wait for)"
        elif self.use_pcsc:
            if not self._start_pcsc():
                self.description += f" (no PC/SC events: {self.unavailable})"
        else:
            self.description += f" (PC/SC events off: {EVENTS_ENV}=poll)"
        if self.unavailable is None:
            log.info("card events: %s", self.description)
        else:
            log.warning("card events: %s: no card reader is seen until pcscd answers (%s)", self.description,
                        self.unavailable.remedy)
        return self

    def retry_pcsc(self) -> bool:
        """Ask for pcscd's events again if they could not be had and RETRY_SECONDS have passed since
        the last try; True when they now run."""
        if self.unavailable is None or time.monotonic() < self._retry_at or not self._start_pcsc():
            return False
        log.info("card events: pcscd answers now: %s", self.description)
        return True

    def _start_pcsc(self) -> bool:
        """Ask pcscd for its events; False, with why in :attr:`unavailable`, when it does not answer."""
        try:
            self._source = PcscEventSource(self._changed.set).start()
        except PcscUnavailable as error:
            self.unavailable, self._retry_at = error, time.monotonic() + RETRY_SECONDS
            return False
        self.unavailable = None
        self.description = f"PC/SC events from pcscd, and {self._polling}"
        return True

    def __exit__(self, *exc: object) -> None:
        if self._source is not None:
            self._source.stop()
            self._source = None

    def changes(self) -> int | None:
        """How many changes pcscd has reported; None while PC/SC events are not live (none asked
        for, pcscd away), when every look must read the tokens."""
        source = self._source
        return source.events if source is not None and source.live else None

    def notify(self) -> None:
        """Look now (what a PC/SC event does)."""
        self._changed.set()

    def wait(self, stop: threading.Event, seconds: float = POLL_SECONDS) -> bool:
        """Sleep until the next look at the reader, at most ``seconds``; True when the agent is
        stopping instead."""
        if stop.is_set():
            return True
        if self._changed.wait(seconds):
            self._changed.clear()  # a change arriving after this is seen by the look that follows
        return stop.is_set()


def _removable(slot: Slot) -> bool:
    return bool(slot.flags & SlotFlag.REMOVABLE_DEVICE)


def _error_name(error: PKCS11Error) -> str:
    """python-pkcs11's errors have no message: their class names the CKR_ code."""
    return str(error) or type(error).__name__
