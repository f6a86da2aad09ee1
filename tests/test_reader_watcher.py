"""The card loop's view of cards from pcscd alone (agent/card/readers.py), tested exhaustively.

ReaderWatcher reads two things of the PC/SC event source: whether pcscd answers (``live``) and
which readers hold a card with their card-event counts (``cards``). The source here is a plain
object holding those two values, standing for pcscd's answers; the watcher against the real pcscd
and virtual CAC is tested in test_virtual_cac.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from dicom_card_agent.card.readers import RESTART_HOLD_SECONDS, ReaderCard, ReaderWatcher
from dicom_card_agent.card.watcher import UNREADABLE_LOOKS, UNREADABLE_SECONDS, CannotLook

READERS = ("Reader A 00 00", "Reader B 00 01", "Reader C 00 02")


@dataclass
class PcscAnswers:
    live: bool = True
    cards: dict[str, int] = field(default_factory=dict)
    generation: int = 0  # which pcscd answers: one more after each restart

    def unanswered_for(self) -> float:
        return 0.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ReaderWatcherModel(RuleBasedStateMachine):
    """Cards come and go in three readers (a swap between two looks included) and pcscd goes away
    and comes back, or restarts; after every look the watcher must answer what the model says: the
    card inserted last among those present that were not passed over, none while pcscd has been
    away past the grace, "cannot look" within it, and none for a moment after a restart that found
    cards present, which are new cards after it."""

    def __init__(self) -> None:
        super().__init__()
        self.answers = PcscAnswers()
        self.clock = Clock()
        self.watcher = ReaderWatcher(self.answers, self.clock, first_wait=0)
        self.events = dict.fromkeys(READERS, 0)  # pcscd counts each insertion and removal
        # The model: what the watcher has seen, in the order it saw the cards arrive.
        self.order: list[ReaderCard] = []  # oldest first
        self.passed_over: set[ReaderCard] = set()
        self.chosen: ReaderCard | None = None
        self.away_since: float | None = None
        self.away_looks = 0
        self.present: list[ReaderCard] = []  # what the last look found
        self.generation = 0
        self.hold_until = 0.0

    @rule(reader=st.sampled_from(READERS))
    def insert(self, reader: str) -> None:
        if reader not in self.answers.cards:
            self.events[reader] += 1
            self.answers.cards = {**self.answers.cards, reader: self.events[reader]}

    @rule(reader=st.sampled_from(READERS))
    def pull(self, reader: str) -> None:
        if reader in self.answers.cards:
            self.events[reader] += 1
            self.answers.cards = {name: count for name, count in self.answers.cards.items() if name != reader}

    @rule(reader=st.sampled_from(READERS))
    def swap_between_looks(self, reader: str) -> None:
        self.pull(reader)
        self.insert(reader)

    @rule(live=st.booleans())
    def pcscd(self, live: bool) -> None:
        self.answers.live = live

    @rule()
    def pcscd_restarts(self) -> None:
        """A new pcscd, back before the grace ran out (as a USB reader's card is at once): it
        counts card events from the start, so a card in a reader may have the count it had."""
        self.answers.live, self.answers.generation = True, self.answers.generation + 1
        self.events = dict.fromkeys(READERS, 1)
        self.answers.cards = dict.fromkeys(self.answers.cards, 1)

    @rule(seconds=st.sampled_from([0.05, 0.3, 1.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule()
    def look(self) -> None:
        expected = self._expected_look()
        if expected is CannotLook:
            with pytest.raises(CannotLook):
                self.watcher.look()
            return
        assert self.watcher.look() == expected

    def _expected_look(self) -> ReaderCard | None | type[CannotLook]:
        if not self.answers.live:
            if self.away_since is None:
                self.away_since, self.away_looks = self.clock.now, 0
            self.away_looks += 1
            if self.clock.now - self.away_since < UNREADABLE_SECONDS or self.away_looks < UNREADABLE_LOOKS:
                return CannotLook
            self.present = []
            return None
        self.away_since = None
        if self.answers.generation != self.generation:
            self.generation = self.answers.generation
            if self.present:
                self.hold_until = self.clock.now + RESTART_HOLD_SECONDS
            self.order, self.passed_over = [], set()
        if self.clock.now < self.hold_until:
            self.present, self.chosen = [], None
            return None
        present = [ReaderCard(reader, count, self.generation) for reader, count in sorted(self.answers.cards.items())]
        self.present = present
        self.order = [card for card in self.order if card in present]
        self.passed_over &= set(present)
        self.order += list(reversed([card for card in present if card not in self.order]))  # first reader last
        candidates = [card for card in reversed(self.order) if card not in self.passed_over]
        chosen = candidates[0] if candidates else None
        if chosen is not None and self.chosen is not None and chosen != self.chosen and self.chosen in present:
            self.passed_over.add(self.chosen)
        self.chosen = chosen
        return chosen


TestReaderWatcher = ReaderWatcherModel.TestCase
TestReaderWatcher.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)


def test_a_card_swapped_between_two_looks_is_a_new_card() -> None:
    answers = PcscAnswers(cards={READERS[0]: 1})
    watcher = ReaderWatcher(answers)
    first = watcher.look()
    answers.cards = {READERS[0]: 3}  # pulled (2) and another inserted (3) before the next look
    second = watcher.look()
    assert first is not None and second is not None and first != second and first.reader == second.reader


def test_the_card_in_the_first_reader_wins_when_cards_are_found_together() -> None:
    answers = PcscAnswers(cards={READERS[1]: 1, READERS[0]: 1})
    assert ReaderWatcher(answers).look() == ReaderCard(READERS[0], 1)


def test_a_card_passed_over_for_a_newer_one_waits_for_its_re_insertion() -> None:
    answers = PcscAnswers(cards={READERS[0]: 1})
    watcher = ReaderWatcher(answers)
    assert watcher.look() == ReaderCard(READERS[0], 1)
    answers.cards = {READERS[0]: 1, READERS[1]: 1}
    assert watcher.look() == ReaderCard(READERS[1], 1)  # the newer card
    answers.cards = {READERS[0]: 1}
    assert watcher.look() is None  # the older card is not signed in again by itself
    answers.cards = {READERS[0]: 3}  # removed and inserted again
    assert watcher.look() == ReaderCard(READERS[0], 3)


def test_a_pcscd_restart_with_the_card_in_its_reader_is_a_removal_then_a_new_card() -> None:
    """pcscd restarted and the card was back within the grace: its count started again at the same
    value, so the card looked the same, and the card session went on with a module whose handle
    (and login) died with the old pcscd: "signed in", and every handshake failed with "EVP lib"."""
    clock = Clock()
    answers = PcscAnswers(cards={READERS[0]: 1})
    watcher = ReaderWatcher(answers, clock, first_wait=0)
    before = watcher.look()
    answers.generation += 1  # the new pcscd: the card present, its count 1 again
    assert before == ReaderCard(READERS[0], 1) and watcher.look() is None
    clock.now += RESTART_HOLD_SECONDS / 2
    assert watcher.look() is None  # long enough for the card loop to end the session
    clock.now += RESTART_HOLD_SECONDS / 2
    after = watcher.look()
    assert after == ReaderCard(READERS[0], 1, pcscd=1) and after != before
    # Nobody inserted it: the sign-in it starts asks first (SignInCause.READER_RESTARTED), or the
    # PIN dialog would take what the clinician is typing half a second after her session ended.
    assert after is not None and after.after_restart and not before.after_restart
    assert watcher.look().after_restart  # every look until it leaves (the card loop acts on the first)
    answers.cards = {}
    assert watcher.look() is None
    answers.cards = {READERS[0]: 3}  # pulled and inserted again, by hand
    again = watcher.look()
    assert again == ReaderCard(READERS[0], 3, pcscd=1) and not again.after_restart


def test_a_card_back_after_pcscd_was_away_past_the_grace_was_not_inserted() -> None:
    """pcscd stopped for longer than the grace (an upgrade stops it, unpacks, starts it): the card
    counted as removed, and the card the new pcscd shows in its reader is the one that was there."""
    clock = Clock()
    answers = PcscAnswers(cards={READERS[0]: 1, READERS[1]: 1})
    watcher = ReaderWatcher(answers, clock, first_wait=0)
    assert watcher.look() == ReaderCard(READERS[0], 1)
    answers.live = False
    for _ in range(UNREADABLE_LOOKS):
        with pytest.raises(CannotLook):
            watcher.look()
    clock.now += UNREADABLE_SECONDS
    assert watcher.look() is None  # taken to be removed: the session ends
    answers.live, answers.generation, answers.cards = True, 1, {READERS[0]: 1}
    back = watcher.look()
    assert back == ReaderCard(READERS[0], 1, pcscd=1) and back is not None and back.after_restart
    answers.cards = {READERS[0]: 1, READERS[1]: 1}  # shown by the new pcscd later: still the one that was there
    assert watcher.look() == ReaderCard(READERS[1], 1, pcscd=1)
    assert all(card.after_restart for card in watcher.present)
    answers.cards = {READERS[2]: 1}  # a reader that held no card: this one was inserted
    new = watcher.look()
    assert new == ReaderCard(READERS[2], 1, pcscd=1) and new is not None and not new.after_restart


def test_a_card_pulled_during_the_restart_hold_and_inserted_again_was_inserted() -> None:
    clock = Clock()
    answers = PcscAnswers(cards={READERS[0]: 1})
    watcher = ReaderWatcher(answers, clock, first_wait=0)
    watcher.look()
    answers.generation += 1
    assert watcher.look() is None
    answers.cards = {}  # pulled during the hold ...
    assert watcher.look() is None
    answers.cards = {READERS[0]: 3}  # ... and inserted again
    clock.now += RESTART_HOLD_SECONDS
    card = watcher.look()
    assert card == ReaderCard(READERS[0], 3, pcscd=1) and card is not None and not card.after_restart
