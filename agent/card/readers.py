"""Which card is present, learnt from pcscd alone, for modules whose probe of a card is costly.

OpenSC probes a card (~40 round trips, ~2 s on a real card) in every process that asks its module
about it. Where the module's profile says so (``presence = "pcsc"``) and pcscd answers, the card
loop therefore never asks the module: a card is "the card in reader R", known from pcscd's reader
states (agent/card/pcsc.py), and the one probe is made by the card-session process started for it
(agent/session/probe.py), which finds out which token it holds. A card pulled and another inserted
between two looks is a new card: pcscd counts each reader's card events.

With several readers holding cards, the card inserted last is chosen (the module is not asked, so
cards cannot be judged beforehand as :class:`~dicom_card_agent.card.watcher.CardWatcher` judges
them). A card that was chosen and then passed over for a newer one is not chosen again until it
is re-inserted, as there.

Except where ``[identity] token`` accepts one card only: then a card that arrives while the chosen
card is still in its reader is chosen only once a card-session process started for it has probed it
and found that token (``vet``: agent/session/manager.py). Nothing of PC/SC tells a token's label or
serial, and the supervisor never loads the module for a card; until the probe answers, and for good
when it finds another token, the chosen card stays chosen and its session goes on. A card so
skipped is judged again only when it is re-inserted.

After pcscd restarts (or comes back after being away) the first card it shows in a reader that held
one as it went is marked :attr:`ReaderCard.after_restart`: nobody inserted it, so the sign-in it
starts asks first (agent/lifecycle/machine.py, ``SignInCause.READER_RESTARTED``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from dicom_card_agent.card.watcher import POLL_SECONDS, ArrivalOrder, FailingLooks

log = logging.getLogger("agent.card")


class PcscEvents(Protocol):
    """What is read of :class:`~dicom_card_agent.card.pcsc.PcscEventSource`."""

    cards: dict[str, int]
    generation: int

    @property
    def live(self) -> bool:
        """Whether pcscd answers, and a change would be reported."""
        ...

    def unanswered_for(self) -> float:
        """Seconds since pcscd last answered."""
        ...

FIRST_STATES_SECONDS = 1.0
FIRST_STATES_STEP = 0.01
# After pcscd restarted with a card in a reader, how long the watcher answers "no card": long enough
# for the card loop to see the removal (and end the session) before the card is new again.
RESTART_HOLD_SECONDS = 0.5


@dataclass(frozen=True)
class ReaderCard:
    """A card in a PC/SC reader, known before any PKCS#11 call."""

    reader: str
    insertion: int  # pcscd's count of the reader's card events when the card was seen
    pcscd: int = 0  # which pcscd counted them (PcscEventSource.generation): a restarted one counts anew
    # Nobody inserted it: it was in its reader as the previous pcscd went. Not part of which card it is
    # (compare=False), so that the card loop's "another card?" is asked as before.
    after_restart: bool = field(default=False, compare=False)

    def event_fields(self) -> dict[str, str]:
        return {"reader": self.reader}

    def __str__(self) -> str:
        return f"the card in reader {self.reader!r}"


# Starts finding out, away from the card loop, whether the configuration would sign in with a card
# (a probe by a card-session process of its own); the answer comes back through ReaderWatcher.judged.
Vet = Callable[[ReaderCard], None]


class ReaderWatcher:
    """The card to sign in with, from pcscd's reader states; the same answers as
    :meth:`CardWatcher.look <dicom_card_agent.card.watcher.CardWatcher.look>`."""

    def __init__(self, source: PcscEvents, clock: Callable[[], float] = time.monotonic, *,
                 first_wait: float = FIRST_STATES_SECONDS, vet: Vet | None = None) -> None:
        """``vet``: set where ``[identity] token`` accepts one card only (see the module's docstring)."""
        self.source = source
        self.first_wait = first_wait
        self.vet = vet
        self._verdicts_lock = threading.Lock()
        # Cards that came while the chosen one was in its reader: why the configuration would not sign
        # in with each (None: it would); absent while its probe has not answered.
        self._verdicts: dict[ReaderCard, str | None] = {}
        self._vetting: set[ReaderCard] = set()  # probes asked for, not yet answered
        self._skip_logged: set[ReaderCard] = set()
        self._order: ArrivalOrder[ReaderCard] = ArrivalOrder()
        self._failures = FailingLooks(clock)  # pcscd away
        self._looked = False
        self._clock = clock
        self._generation = source.generation
        self._restart_hold_until = 0.0
        # Readers that held a card as pcscd went (restarted, or away past the grace), until the new
        # pcscd shows a card there; then that card's count under the new pcscd, which marks it.
        self._held_as_pcscd_went: set[str] = set()
        self._there_all_along: dict[str, int] = {}

    look_interval = POLL_SECONDS  # pcscd's events cut it short

    @property
    def present(self) -> tuple[ReaderCard, ...]:
        return self._order.present

    @property
    def passed_over_present(self) -> tuple[ReaderCard, ...]:
        """Cards in their readers that wait for re-insertion: passed over for a newer card."""
        return tuple(card for card in self._order.present if card in self._order.passed_over)

    def judged(self, card: ReaderCard, reason: str | None) -> None:
        """What the probe ``vet`` started for ``card`` found: why the configuration would not sign in
        with it, or None when it would. Called from any thread; the next look acts on it."""
        with self._verdicts_lock:
            self._vetting.discard(card)
            self._verdicts[card] = reason

    def look(self) -> ReaderCard | None:
        """Raises :class:`CardUnreadable` while pcscd has been away for less than the grace of
        :mod:`~dicom_card_agent.card.watcher` (the card is taken to be as it was); after it, no card."""
        first, self._looked = not self._looked, True
        if not self.source.live and not (first and self._first_states()):
            self._pcscd_away()
            return None
        self._failures.answered("pcscd answers again (after %d looks without it)")
        states, generation = self.source.cards, self.source.generation  # in this order: see PcscEventSource._run
        if generation != self._generation:
            self._pcscd_restarted(generation)
        self._note_cards_there_all_along(states)  # during the hold too: a card pulled meanwhile is not marked
        if self._clock() < self._restart_hold_until:
            self._order.choose(None)
            return None
        cards = [ReaderCard(reader, count, generation, after_restart=self._there_all_along.get(reader) == count)
                 for reader, count in sorted(states.items())]
        self._order.note(cards)
        waiting = [card for card in cards if card in self._order.passed_over]
        candidates = self._order.newest_first(card for card in cards if card not in self._order.passed_over)
        candidates = self._vetted(candidates)
        chosen = candidates[0] if candidates else None
        before = self._order.choose(chosen)
        if before is not None and before in self._order.passed_over:
            log.info("%s chosen: it was inserted after %s", chosen, before)
        elif chosen is None and waiting and before is not None:
            log.info("%s not signed in again: a card inserted after it was used; remove and re-insert it to "
                     "sign in", ", ".join(str(card) for card in waiting))
        return chosen

    def _vetted(self, newest_first: list[ReaderCard]) -> list[ReaderCard]:
        """Without the cards that arrived after the chosen one, while it is still in its reader, that
        the configuration has not been found to sign in with (their probe is asked for here, once)."""
        present = set(newest_first)
        with self._verdicts_lock:  # a card that left is judged anew if it comes back (a new insertion)
            self._verdicts = {card: verdict for card, verdict in self._verdicts.items() if card in present}
            self._skip_logged &= present
        chosen = self._order.chosen
        if self.vet is None or chosen is None or chosen not in present:
            return newest_first
        kept: list[ReaderCard] = []
        for card in newest_first:
            if card == chosen:
                return [*kept, chosen]  # the older cards stay behind it, as they would
            with self._verdicts_lock:
                known, verdict = card in self._verdicts, self._verdicts.get(card)
                ask = not known and card not in self._vetting
                if ask:
                    self._vetting.add(card)
            if ask:
                log.info("%s inserted while %s is in use: probing it for [identity] token first (the card in "
                         "use stays in use meanwhile)", card, chosen)
                self.vet(card)
            elif known and verdict is None:
                kept.append(card)
            elif known and card not in self._skip_logged:
                self._skip_logged.add(card)
                log.warning("%s skipped: %s; %s stays in use (a skipped card is probed again when it is "
                            "re-inserted)", card, verdict, chosen)
        return kept

    def _pcscd_restarted(self, generation: int) -> None:
        """A new pcscd answers. Whatever the card-session process's module held of the old one (its
        card handle, and with it the login) is gone: a card that was in a reader counts as removed,
        for :data:`RESTART_HOLD_SECONDS`, then as there again, not inserted (its PIN is asked again,
        asking first). The card-event counts start again with the new pcscd, so without this the card
        looked the same."""
        self._generation = generation
        self._there_all_along = {}  # counts of the old pcscd
        if self._order.present:
            log.warning("pcscd restarted while %s was in its reader: the card's login ended with it; the card "
                        "counts as removed, then as there again (its PIN is asked again, asking first)",
                        ", ".join(str(card) for card in self._order.present))
            self._restart_hold_until = self._clock() + RESTART_HOLD_SECONDS
            self._held_as_pcscd_went |= {card.reader for card in self._order.present}
        self._order.note([])

    def _note_cards_there_all_along(self, states: dict[str, int]) -> None:
        """The first card the new pcscd shows in a reader that held one as the old pcscd went is the
        card that was there (a card pulled and another inserted meanwhile cannot be told from it;
        asking first is the safe side). A card inserted after it has another count: not marked."""
        for reader in self._held_as_pcscd_went & states.keys():
            self._there_all_along[reader] = states[reader]
        self._held_as_pcscd_went -= states.keys()

    def _first_states(self) -> bool:
        """At the first look, pcscd's event thread may not have read the readers yet: wait for it
        a moment rather than report pcscd away. True once it has."""
        for _ in range(round(self.first_wait / FIRST_STATES_STEP)):
            if self.source.live:
                break
            time.sleep(FIRST_STATES_STEP)
        return self.source.live

    def _pcscd_away(self) -> None:
        failing_for = self._failures.failed("pcscd does not answer",
                                            "pcscd does not answer: the card is taken to be as it was; looking again")
        if failing_for is not None and self.present:
            # A stopped or stuck pcscd keeps its connection: it counts as away only once it has not
            # answered for a while (pcsc.UNANSWERED_SECONDS), which is how long it has been silent.
            log.warning("pcscd has not answered for %.1f s (stopped, stuck or gone): the card is taken to be removed",
                        max(failing_for, self.source.unanswered_for()))
            self._held_as_pcscd_went |= {card.reader for card in self.present}  # back, it shows them again
        self._order.present = ()
