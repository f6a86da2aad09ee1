"""The card life-cycle state machine (agent/lifecycle/machine.py), exhaustively: every (state,
event) pair has a row, and a Hypothesis stateful test plays any sequence of card events, PIN
dialog outcomes, sign-in results (late ones included), lost card-session processes, locks, reloads
and stops against a model of what the shell would then hold, checking the promises after each step."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dicom_card_agent.card.readers import ReaderCard, ReaderWatcher
from dicom_card_agent.lifecycle.machine import (
    EVENT_TYPES,
    MAX_SESSION_LOSSES,
    TRANSITIONS,
    CancelSignIn,
    CardInserted,
    CardLifecycle,
    CardRemoved,
    CertificateExpired,
    CertificateRevoked,
    EndSession,
    IdleTimeout,
    Lock,
    PinEntered,
    Reload,
    SessionLost,
    SignedIn,
    SignInCancelled,
    SignInCause,
    SignInFailed,
    StartSignIn,
    State,
    Stop,
    describe_transitions,
    no_card_status,
)

CARDS = ("alice", "bob")
DOC = Path(__file__).parent.parent / "docs" / "card-lifecycle.md"


def test_every_state_has_a_row_for_every_event() -> None:
    for state in State:
        assert set(TRANSITIONS[state]) == set(EVENT_TYPES), state


def test_the_documented_table_is_the_table_in_the_code() -> None:
    assert describe_transitions() in DOC.read_text(), "docs/card-lifecycle.md: paste describe_transitions() again"


def test_a_clinical_sign_in_then_pull() -> None:
    machine = CardLifecycle()
    assert machine.handle(CardInserted("alice")) == [StartSignIn("alice", 1)]
    assert machine.status == "card present, PIN not yet entered"
    assert machine.handle(PinEntered(1)) == [] and machine.state is State.SIGNING_IN
    assert machine.handle(SignedIn(1)) == [] and machine.status == "signed in"
    assert machine.handle(CardRemoved()) == [EndSession(1, "card removed")]
    assert machine.status == "no card inserted"


def test_a_pull_during_the_pin_dialog_cancels_it_and_a_late_success_is_ended() -> None:
    machine = CardLifecycle()
    machine.handle(CardInserted("alice"))
    assert machine.handle(CardRemoved()) == [CancelSignIn(1)]
    assert machine.handle(SignedIn(1)) == [EndSession(1, "the sign-in was no longer wanted")]
    assert machine.state is State.NO_CARD


def test_a_wrong_pin_waits_for_reinsertion_and_says_why() -> None:
    machine = CardLifecycle()
    machine.handle(CardInserted("alice"))
    machine.handle(PinEntered(1))
    assert machine.handle(SignInFailed(1, "wrong PIN; the card now reports: few PIN tries left")) == []
    assert machine.status == "card present, wrong PIN; the card now reports: few PIN tries left"
    assert machine.handle(CardInserted("alice")) == []  # still the same insertion
    machine.handle(CardRemoved())
    assert machine.handle(CardInserted("alice")) == [StartSignIn("alice", 2)]


def test_a_cancelled_pin_entry_says_how_to_try_again() -> None:
    machine = CardLifecycle()
    machine.handle(CardInserted("alice"))
    machine.handle(SignInCancelled(1, "PIN entry cancelled"))
    assert machine.status == "card present, PIN entry cancelled: remove and re-insert the card to sign in again"


def test_lost_sessions_sign_in_again_then_stop_looping() -> None:
    machine = CardLifecycle()
    machine.handle(CardInserted("alice"))
    machine.handle(SignedIn(1))
    for attempt in range(1, MAX_SESSION_LOSSES):
        effects = machine.handle(SessionLost(attempt, "killed by signal 9"))
        assert effects == [EndSession(attempt, "killed by signal 9"),
                           StartSignIn("alice", attempt + 1, SignInCause.SESSION_LOST)]
        machine.handle(SignedIn(attempt + 1))
    assert machine.handle(SessionLost(MAX_SESSION_LOSSES, "killed by signal 9")) == [
        EndSession(MAX_SESSION_LOSSES, "killed by signal 9")]
    assert machine.status == (f"card present, the card session ended unexpectedly {MAX_SESSION_LOSSES} times: "
                              "remove and re-insert the card to sign in again")


def test_lock_and_idle_timeout_end_the_session_with_their_own_words() -> None:
    machine = CardLifecycle()
    machine.handle(CardInserted("alice"))
    machine.handle(SignedIn(1))
    assert machine.handle(IdleTimeout(1.5)) == [EndSession(1, "idle timeout")]
    assert machine.status == "locked after 1.5 s without activity: remove and re-insert the card"
    machine.handle(CardRemoved())
    machine.handle(CardInserted("alice"))
    machine.handle(SignedIn(2))
    assert machine.handle(Lock()) == [EndSession(2, "locked")]
    assert machine.status == "locked: remove and re-insert the card to sign in again"


def test_an_expired_certificate_ends_the_session_and_asks_for_another_card() -> None:
    machine = CardLifecycle()
    machine.handle(CardInserted("alice"))
    machine.handle(SignedIn(1))
    assert machine.handle(CertificateExpired("2026-11-28 18:00 UTC")) == [EndSession(1, "certificate expired")]
    assert machine.status == ("card present, its certificate expired on 2026-11-28 18:00 UTC: a card with a valid "
                              "certificate is needed")
    assert machine.handle(CertificateExpired("2026-11-28 18:00 UTC")) == []  # said once: the session is gone
    assert machine.handle(CardRemoved()) == [] and machine.state is State.NO_CARD


def test_a_revoked_certificate_ends_its_session_and_a_stale_report_ends_nothing() -> None:
    machine = CardLifecycle()
    machine.handle(CardInserted("alice"))
    machine.handle(SignedIn(1))
    machine.handle(CardRemoved())
    machine.handle(CardInserted("bob"))
    machine.handle(SignedIn(2))
    assert machine.handle(CertificateRevoked(1, "alice's")) == [] and machine.state is State.SIGNED_IN
    assert machine.handle(CertificateRevoked(2, "revoked by CRL file F")) == [EndSession(2, "certificate revoked")]
    assert machine.status == "card present, its certificate was revoked (revoked by CRL file F): a new card is needed"


def test_a_swap_ends_the_first_session_and_signs_in_the_second_card() -> None:
    machine = CardLifecycle()
    machine.handle(CardInserted("alice"))
    machine.handle(SignedIn(1))
    assert machine.handle(CardInserted("bob")) == [EndSession(1, "card swapped"), StartSignIn("bob", 2)]


def test_only_an_insertion_opens_a_pin_dialog_that_does_not_ask_first() -> None:
    """A sign-in the clinician did not start by inserting her card (a lost session, signed in or
    not, a reload, a card inserted while another card's PIN is asked for) carries why, and asks
    first: Cancel the default."""
    machine = CardLifecycle()
    assert machine.handle(CardInserted("alice")) == [StartSignIn("alice", 1, SignInCause.INSERTED)]
    assert not SignInCause.INSERTED.asks_first
    assert machine.handle(CardInserted("bob")) == [CancelSignIn(1),
                                                   StartSignIn("bob", 2, SignInCause.OVER_OTHER_PIN_DIALOG)]
    machine.handle(PinEntered(2))
    assert machine.handle(CardInserted("alice")) == [CancelSignIn(2), StartSignIn("alice", 3)]  # no dialog open
    machine.handle(SignedIn(3))
    assert machine.handle(Reload()) == [EndSession(3, "configuration reloaded"),
                                        StartSignIn("alice", 4, SignInCause.RELOADED)]
    # Lost while its PIN dialog was open: the clinician may be typing the PIN the new dialog would take.
    assert machine.handle(SessionLost(4, "killed")) == [CancelSignIn(4),
                                                        StartSignIn("alice", 5, SignInCause.SIGN_IN_INTERRUPTED)]
    assert all(cause.asks_first for cause in SignInCause if cause is not SignInCause.INSERTED)


def test_a_card_seen_again_after_pcscd_restarted_asks_first() -> None:
    """pcscd restarted with the card in its reader: the session ended (its login died with the old
    pcscd) and, half a second later, the card the new pcscd shows opened the PIN dialog as for an
    insertion. Nobody inserted it: the clinician may be typing her report, and her words and Enter
    would have been a PIN try."""
    machine = CardLifecycle()
    machine.handle(CardInserted("alice"))
    machine.handle(SignedIn(1))
    assert machine.handle(CardRemoved()) == [EndSession(1, "card removed")]  # the watcher's hold
    assert machine.handle(CardInserted("alice@pcscd1", after_reader_restart=True)) == [
        StartSignIn("alice@pcscd1", 2, SignInCause.READER_RESTARTED)]
    assert SignInCause.READER_RESTARTED.asks_first
    machine.handle(SignedIn(2))
    # The card loop did not turn during the hold: the removal comes with the card seen again.
    assert machine.handle(CardInserted("alice@pcscd2", after_reader_restart=True)) == [
        EndSession(2, "pcscd restarted"), StartSignIn("alice@pcscd2", 3, SignInCause.READER_RESTARTED)]
    # With its PIN dialog open: the dialog closes, and the next one asks first.
    assert machine.handle(CardInserted("alice@pcscd3", after_reader_restart=True)) == [
        CancelSignIn(3), StartSignIn("alice@pcscd3", 4, SignInCause.READER_RESTARTED)]
    assert machine.handle(CardInserted("alice@pcscd3")) == []  # the same card, however it came


@pytest.mark.parametrize("removal_seen", [True, False])
def test_a_card_waiting_for_re_insertion_goes_on_waiting_when_pcscd_restarts(removal_seen: bool) -> None:
    """Alice cancelled her PIN entry (or locked her session): the card waits to be pulled and put
    back. pcscd restarts under it; the removal the restart is took the machine to NO_CARD, which
    forgot why the card waited, and the card seen again opened the PIN question (Cancel the default)
    nobody asked for. Nobody re-inserted it: it goes on waiting, saying what it said. A real pull and
    re-insertion still ends the wait."""
    machine = CardLifecycle()
    machine.handle(CardInserted("alice"))
    machine.handle(SignInCancelled(1, "PIN entry cancelled"))
    waiting = machine.status
    assert waiting == "card present, PIN entry cancelled: remove and re-insert the card to sign in again"
    if removal_seen:  # the watcher's hold
        assert machine.handle(CardRemoved()) == [] and machine.state is State.NO_CARD
    assert machine.handle(CardInserted("alice@pcscd1", after_reader_restart=True)) == []
    assert (machine.state, machine.status, machine.card) == (State.WAITING, waiting, "alice@pcscd1")
    assert machine.handle(CardRemoved()) == []  # a second restart: still the same wait
    assert machine.handle(CardInserted("alice@pcscd2", after_reader_restart=True)) == []
    assert machine.status == waiting
    # A lock too; and a real pull and re-insertion ends the wait, which is forgotten with it.
    machine.handle(CardRemoved())
    assert machine.handle(CardInserted("alice@pcscd2+1")) == [StartSignIn("alice@pcscd2+1", 2)]
    machine.handle(SignedIn(2))
    assert machine.handle(Lock()) == [EndSession(2, "locked")]
    machine.handle(CardRemoved())
    assert machine.handle(CardInserted("alice@pcscd3", after_reader_restart=True)) == []
    assert machine.status == "locked: remove and re-insert the card to sign in again"
    machine.handle(CardRemoved())
    machine.handle(CardInserted("alice@pcscd3+1"))
    machine.handle(CardRemoved())  # pulled in PIN_PENDING: no wait to keep
    assert machine.handle(CardInserted("alice@pcscd4", after_reader_restart=True)) == [
        StartSignIn("alice@pcscd4", 4, SignInCause.READER_RESTARTED)]


class LifecycleModel(RuleBasedStateMachine):
    """Plays events at the machine and keeps what the shell would hold after carrying out its effects."""

    def __init__(self) -> None:
        super().__init__()
        self.machine = CardLifecycle()
        self.reader: str | None = None  # the card really in the reader
        self.in_flight: set[int] = set()  # sign-in attempts started and neither cancelled nor reported
        self.reported: set[int] = set()  # attempts that reported their outcome
        self.sessions: set[int] = set()  # card-session processes running, by attempt
        self.started: list[int] = []
        self.may_sign_in = True  # False after a failure, cancel, lock or idle, until a (re-)insertion
        self.restarts_allowed = 0  # automatic sign-ins the machine may start (lost session, reload)
        self.stopped = False
        self.losses = 0  # card-session processes lost since the card in the reader was inserted
        self.over_other_dialog = False  # a card is being inserted while another card's PIN is asked for
        self.pcscd_restarts = 0

    def feed(self, event: object) -> None:
        for effect in self.machine.handle(event):  # type: ignore[arg-type]
            if isinstance(effect, StartSignIn):
                assert not self.stopped, "a sign-in started after stop"
                assert effect.card == self.reader, "a sign-in for a card not in the reader"
                assert self.may_sign_in or self.restarts_allowed > 0, "a PIN try the clinician did not ask for"
                if not self.may_sign_in:
                    self.restarts_allowed -= 1
                    assert effect.cause.asks_first, "a PIN dialog nobody asked for that does not ask first"
                elif self.over_other_dialog:
                    assert effect.cause is SignInCause.OVER_OTHER_PIN_DIALOG, "a dialog that may take another's PIN"
                self.may_sign_in = False  # one attempt per insertion, unless a rule allows another
                self.in_flight.add(effect.attempt)
                self.started.append(effect.attempt)
            elif isinstance(effect, CancelSignIn):
                self.in_flight.discard(effect.attempt)
            elif isinstance(effect, EndSession):
                self.sessions.discard(effect.attempt)

    def attempts(self) -> st.SearchStrategy[int]:
        """Mostly the current attempt, sometimes an earlier one (a late report)."""
        if not self.started:
            return st.just(0)
        return st.one_of(st.just(self.started[-1]), st.just(self.started[-1]), st.sampled_from(self.started))

    @rule(card=st.sampled_from(CARDS))
    def insert(self, card: str) -> None:
        self.over_other_dialog = card != self.reader and self.machine.state is State.PIN_PENDING
        asks_again = card != self.reader and self.machine.state in (State.NO_CARD, State.WAITING)
        started = len(self.started)
        if card != self.reader:
            self.reader = card
            self.may_sign_in = True
            self.losses = 0
        self.feed(CardInserted(card))
        self.over_other_dialog = False
        if asks_again:  # a (re-)insertion ends any wait, whatever the machine remembered before
            assert len(self.started) == started + 1, "a card inserted was not signed in"

    @rule()
    def remove(self) -> None:
        self.reader = None
        self.may_sign_in = True
        self.losses = 0
        self.feed(CardRemoved())

    @rule(data=st.data())
    def pin_entered(self, data: st.DataObject) -> None:
        self.feed(PinEntered(data.draw(self.attempts())))

    @rule(data=st.data())
    def pin_cancelled(self, data: st.DataObject) -> None:
        attempt = data.draw(self.attempts())
        self.in_flight.discard(attempt)
        self.feed(SignInCancelled(attempt, "PIN entry cancelled"))

    @rule(data=st.data())
    def sign_in_succeeds(self, data: st.DataObject) -> None:
        attempt = data.draw(self.attempts())
        if attempt == 0 or attempt in self.reported:
            return  # an attempt reports once
        self.reported.add(attempt)
        self.in_flight.discard(attempt)
        self.sessions.add(attempt)  # the process started before the machine heard of it
        self.feed(SignedIn(attempt))

    @rule(data=st.data())
    def sign_in_fails(self, data: st.DataObject) -> None:
        attempt = data.draw(self.attempts())
        if attempt == 0 or attempt in self.reported:
            return
        self.reported.add(attempt)
        self.in_flight.discard(attempt)
        self.feed(SignInFailed(attempt, "wrong PIN"))

    @rule(data=st.data())
    def session_lost(self, data: st.DataObject) -> None:
        attempt = data.draw(st.sampled_from(sorted(self.sessions))) if self.sessions else 0
        if attempt == 0:
            return
        self.sessions.discard(attempt)
        current = self.machine.state is State.SIGNED_IN and attempt == self.machine.attempt
        if current:
            self.restarts_allowed += 1
            self.losses += 1
        self.feed(SessionLost(attempt, "killed by signal 9"))
        if current and self.losses >= MAX_SESSION_LOSSES:
            assert self.machine.state is State.WAITING, "a crashing card session must not loop"

    @precondition(lambda self: self.machine.state is State.PIN_PENDING)
    @rule()
    def sign_in_process_lost(self) -> None:
        """The card-session process dies while it reads the card or its PIN dialog is open (the
        clinician may be typing her PIN): a new sign-in starts, asking first, until losses run out."""
        started = len(self.started)
        self.restarts_allowed += 1
        self.losses += 1
        self.feed(SessionLost(self.machine.attempt, "killed by signal 9"))
        if len(self.started) == started:
            self.restarts_allowed -= 1
            assert self.losses >= MAX_SESSION_LOSSES and self.machine.state is State.WAITING, \
                "a sign-in lost before its losses ran out was not started again"

    @precondition(lambda self: self.reader is not None)
    @rule(removal_seen=st.booleans())
    def pcscd_restarts_with_the_card_in_its_reader(self, removal_seen: bool) -> None:
        """The card's login died with the old pcscd; the new one shows it as another card (its
        card-event count starts again) that nobody inserted, so a sign-in for it is one the clinician
        did not ask for. The card loop sees the removal the watcher holds for a moment, or, when it
        did not turn meanwhile, only the card seen again."""
        assert self.reader is not None
        waiting_before = self.machine.status if self.machine.state is State.WAITING else None
        if removal_seen:
            self.feed(CardRemoved())
        self.pcscd_restarts += 1
        self.reader = f"{self.reader.split('@')[0]}@pcscd{self.pcscd_restarts}"
        self.losses = 0
        self.may_sign_in = False  # not an insertion
        started = len(self.started)
        self.restarts_allowed += 1
        self.feed(CardInserted(self.reader, after_reader_restart=True))
        if len(self.started) == started:
            self.restarts_allowed -= 1
        if waiting_before is not None:  # nobody re-inserted the card: the wait goes on, as it was
            assert len(self.started) == started, "a restart of pcscd ended a wait for re-insertion"
            assert (self.machine.state, self.machine.status) == (State.WAITING, waiting_before)

    @rule()
    def lock(self) -> None:
        self.feed(Lock())

    @rule()
    def idle(self) -> None:
        self.feed(IdleTimeout(1.5))

    @rule()
    def certificate_expires(self) -> None:
        signed_in = self.machine.state is State.SIGNED_IN
        self.feed(CertificateExpired("2026-11-28 18:00 UTC"))
        if signed_in:
            assert self.machine.state is State.WAITING and not self.sessions, "an expired certificate's session went on"

    @rule(data=st.data())
    def certificate_revoked(self, data: st.DataObject) -> None:
        """A card session tells that its card's certificate is revoked: its own (current), or one that
        ended meanwhile (stale: nothing of the current session may end for it)."""
        attempt = data.draw(self.attempts())
        ends = self.machine.state is State.SIGNED_IN and attempt == self.machine.attempt
        state = self.machine.state
        self.feed(CertificateRevoked(attempt, "revoked by CRL file F"))
        if ends:
            assert self.machine.state is State.WAITING and not self.sessions, "a revoked card's session went on"
        else:
            assert self.machine.state is state, "a stale revocation report changed the state"

    @rule()
    def reload(self) -> None:
        if self.machine.state is State.SIGNED_IN:
            self.restarts_allowed += 1
        self.feed(Reload())

    @rule()
    def stop(self) -> None:
        self.stopped = True
        self.feed(Stop())

    @invariant()
    def at_most_one_session_and_only_when_signed_in(self) -> None:
        assert len(self.sessions) <= 1, self.sessions
        if self.machine.state is State.SIGNED_IN:
            assert self.sessions == {self.machine.attempt}
        else:
            assert not self.sessions, (self.machine.state, self.sessions)

    @invariant()
    def no_session_for_a_card_not_in_the_reader(self) -> None:
        if self.sessions:
            assert self.reader is not None and self.machine.card == self.reader

    @invariant()
    def at_most_one_sign_in_in_flight_and_only_while_signing_in(self) -> None:
        live = self.in_flight - self.reported
        if self.machine.state in (State.PIN_PENDING, State.SIGNING_IN):
            assert live == {self.machine.attempt}, (self.machine.state, live)
        else:
            assert not live, (self.machine.state, live)

    @invariant()
    def stop_leaves_nothing_running(self) -> None:
        if self.stopped:
            assert self.machine.state is State.STOPPED and not self.sessions and not (self.in_flight - self.reported)

    @invariant()
    def status_is_plain_text(self) -> None:
        assert self.machine.status and "{" not in self.machine.status


TestLifecycleModel = LifecycleModel.TestCase
TestLifecycleModel.settings = settings(max_examples=400, stateful_step_count=40, deadline=None)


@pytest.mark.parametrize("state", list(State))
def test_the_status_names_the_state(state: State) -> None:
    machine = CardLifecycle()
    machine.state = state
    assert machine.status == state.value


def test_no_card_status_names_the_cards_passed_over() -> None:
    """In NO_CARD with a card passed over for a newer one still in its reader, status says so and what
    to do, instead of ``no card inserted`` (agent/session/manager.py feeds it the watcher's list)."""
    assert no_card_status([]) == State.NO_CARD.value == "no card inserted"
    assert no_card_status(["the card in reader 'R0'"]) == (
        "the card in reader 'R0' passed over for a newer card: remove and re-insert it to sign in")
    assert no_card_status(["card 'alice' (serial 1)", "card 'bob' (serial 2)"]).endswith("re-insert them to sign in")


class _PcscdReaders:
    """What ReaderWatcher reads of pcscd (PcscEvents), as plain data: no pcscd is asked."""

    def __init__(self) -> None:
        self.live = True
        self.cards: dict[str, int] = {}
        self.generation = 0

    def unanswered_for(self) -> float:
        return 0.0


READERS = ("Virtual PCD 00 00", "Virtual PCD 00 01", "Virtual PCD 00 02")


class ReaderVettingModel(RuleBasedStateMachine):
    """ReaderWatcher with ``[identity] token`` set (``vet``): cards come and go in three readers, probes
    answer in any order (usable or holding another token), the card loop looks at any moment. The card in
    use is never given up for a card not found to hold the token, and each insertion is probed once."""

    def __init__(self) -> None:
        super().__init__()
        self.source = _PcscdReaders()
        self.asked: list[ReaderCard] = []
        self.watcher = ReaderWatcher(self.source, vet=self.asked.append, first_wait=0.0)
        self.verdicts: dict[ReaderCard, str | None] = {}
        self.events = 0  # pcscd counts each reader's card events: a card put back is another card
        self.chosen: ReaderCard | None = None

    @rule(reader=st.sampled_from(READERS))
    def insert(self, reader: str) -> None:
        if reader not in self.source.cards:
            self.events += 1
            self.source.cards = {**self.source.cards, reader: self.events}

    @rule(reader=st.sampled_from(READERS))
    def pull(self, reader: str) -> None:
        self.source.cards = {name: count for name, count in self.source.cards.items() if name != reader}

    @rule(data=st.data(), usable=st.booleans())
    def probe_answers(self, data: st.DataObject, usable: bool) -> None:
        pending = [card for card in self.asked if card not in self.verdicts]
        if pending:
            card = data.draw(st.sampled_from(pending))
            self.verdicts[card] = None if usable else "it holds another token"
            self.watcher.judged(card, self.verdicts[card])

    @rule()
    def look(self) -> None:
        before, chosen = self.chosen, self.watcher.look()
        present = {ReaderCard(reader, count) for reader, count in self.source.cards.items()}
        if before is not None and before in present and chosen != before:
            assert chosen is not None, "the card in use was dropped while in its reader"
            assert self.verdicts.get(chosen, "not probed") is None, "a card not found to hold the token was chosen"
        assert chosen is None or chosen in present
        self.chosen = chosen

    @invariant()
    def each_insertion_is_probed_once(self) -> None:
        assert len(self.asked) == len(set(self.asked))


TestReaderVettingModel = ReaderVettingModel.TestCase
TestReaderVettingModel.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
