"""The card life-cycle as one explicit state machine; no I/O.

The supervisor's I/O shell feeds it what happened (a card inserted or removed, the PIN dialog's
outcome, a sign-in's result, the card-session process exiting, lock, idle, the certificate's expiry
or revocation, reload, stop) and carries out what it answers: start a sign-in, cancel one, end a
card session. Every (state, event) pair has a row in :data:`TRANSITIONS`, so what the agent does in
each state can be read as a table (and is, in docs/card-lifecycle.md, generated from it).

Long operations (the PIN dialog, the card's probe, logging in, starting the card-session process)
run in the shell while the machine keeps answering: a sign-in is an *attempt* with a number, and
whatever an attempt reports after it was cancelled or superseded is stale. A stale sign-in that
succeeded anyway is ended at once, so no session survives for a card that has left.

The machine never starts a sign-in on its own after a failure, a cancelled PIN entry, a lock or an
idle timeout: only a (re-)insertion does, so that no PIN try is ever spent without the clinician.
The exceptions are a card-session process lost (a crash, a kill) while it reads the card, while its
PIN dialog is open or while signed in, a configuration reload, and a card seen again after pcscd
restarted (its login died with the old pcscd; nobody inserted it); they ask for the PIN again (no PIN
was sent to the lost process), and losses are bounded so that a crashing card cannot loop. Those
restarts, and a card inserted while another card's PIN is asked for, start a sign-in whose
:class:`SignInCause` makes its PIN dialog ask first, Cancel the default: nobody expects that dialog,
and the keys typed meanwhile (the rest of a PIN typed into the dialog that closed) must not become
a PIN try.

A card that waits for re-insertion (a failure, a cancelled PIN entry, a lock) goes on waiting when
pcscd restarts under it: the machine remembers, across the removal the restart makes, why it waited,
and the card seen again keeps waiting for the same reason. Only a real re-insertion ends the wait.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from enum import Enum

MAX_SESSION_LOSSES = 3  # card-session processes lost for one insertion before waiting for re-insertion


class State(Enum):
    NO_CARD = "no card inserted"
    PIN_PENDING = "card present, PIN not yet entered"
    SIGNING_IN = "card present, signing in"
    SIGNED_IN = "signed in"
    WAITING = "card present, waiting for it to be re-inserted"
    STOPPED = "the agent is stopping"


# --- events: what the shell tells the machine ---------------------------------------------------


@dataclass(frozen=True)
class CardInserted:
    """A card the configuration accepts is in the reader (also reported when it replaced another).
    ``after_reader_restart``: nobody inserted it. It stayed in its reader while pcscd restarted,
    which ended its login, and the new pcscd shows it as a new card (agent/card/readers.py)."""

    card: Hashable
    after_reader_restart: bool = False


@dataclass(frozen=True)
class CardRemoved:
    """No accepted card is in the reader any more."""


@dataclass(frozen=True)
class PinEntered:
    """The PIN dialog of ``attempt`` closed with a PIN; logging in follows."""

    attempt: int


@dataclass(frozen=True)
class SignInCancelled:
    """The clinician cancelled the PIN dialog of ``attempt``, or it timed out: no PIN try was spent."""

    attempt: int
    reason: str


@dataclass(frozen=True)
class SignedIn:
    """``attempt`` signed in and its card-session process is ready."""

    attempt: int


@dataclass(frozen=True)
class SignInFailed:
    """``attempt`` failed: wrong or locked PIN, no usable identity, the card left mid-way, a broken
    module. ``reason`` is what the log, ``status`` and the applications are told."""

    attempt: int
    reason: str


@dataclass(frozen=True)
class SessionLost:
    """The card-session process of ``attempt`` exited without being asked to (killed, crashed)."""

    attempt: int
    reason: str


@dataclass(frozen=True)
class Lock:
    """``card-agent lock``: end the session as if the card had been pulled."""


@dataclass(frozen=True)
class IdleTimeout:
    """No association for ``seconds`` (the configured ``idle_timeout``)."""

    seconds: float


@dataclass(frozen=True)
class CertificateExpired:
    """The signed-in certificate's validity ended (its notAfter, ``expired``, by the workstation's
    clock): a PACS refuses it from now on, and the agent presents no expired certificate."""

    expired: str


@dataclass(frozen=True)
class CertificateRevoked:
    """The card-session process of ``attempt`` found the card's certificate revoked (a CRL or an
    OCSP answer learnt while it served): no PACS should accept it, and the agent presents it no more."""

    attempt: int
    reason: str


@dataclass(frozen=True)
class Reload:
    """SIGHUP read a configuration the card session cannot take in place (a changed [trust] or
    [[inbound]], a tunnel needing a TLS context it did not make: agent/session/retune.py); a card
    session must be made anew to use it. A reload it takes in place is no event here."""


@dataclass(frozen=True)
class Stop:
    """SIGTERM, SIGINT or SIGQUIT, or the hang-up of the terminal the agent was started from."""


Event = (CardInserted | CardRemoved | PinEntered | SignInCancelled | SignedIn | SignInFailed | SessionLost | Lock
         | IdleTimeout | CertificateExpired | CertificateRevoked | Reload | Stop)
EVENT_TYPES: tuple[type, ...] = (CardInserted, CardRemoved, PinEntered, SignInCancelled, SignedIn, SignInFailed,
                                 SessionLost, Lock, IdleTimeout, CertificateExpired, CertificateRevoked, Reload, Stop)


# --- effects: what the machine asks the shell to do --------------------------------------------


class SignInCause(Enum):
    """Why a sign-in starts. Only the clinician's own insertion of her card opens a PIN dialog she
    expects; any other sign-in asks first (pinentry's CONFIRM, Cancel the default), so that a dialog
    grabbing the keyboard while she types elsewhere, or mid-PIN for another card, takes no PIN."""

    INSERTED = "the card was inserted"
    OVER_OTHER_PIN_DIALOG = "inserted while another card's PIN was asked for"
    SIGN_IN_INTERRUPTED = "the card session ended unexpectedly during the sign-in"
    SESSION_LOST = "the card session ended unexpectedly"
    RELOADED = "the configuration was reloaded"
    READER_RESTARTED = "the card was there all along: pcscd restarted"

    @property
    def asks_first(self) -> bool:
        return self is not SignInCause.INSERTED


@dataclass(frozen=True)
class StartSignIn:
    """Ask for the PIN of ``card`` (where the PIN source asks), log in, start its card-session
    process; ``cause`` says why, and whether the PIN dialog asks first."""

    card: Hashable
    attempt: int
    cause: SignInCause = SignInCause.INSERTED


@dataclass(frozen=True)
class CancelSignIn:
    """Close the PIN dialog of ``attempt`` (no PIN try spent) and give up the sign-in."""

    attempt: int


@dataclass(frozen=True)
class EndSession:
    """End the card-session process of ``attempt``: its connections, resumption state, login and PIN."""

    attempt: int
    reason: str


Effect = StartSignIn | CancelSignIn | EndSession


# --- the table -----------------------------------------------------------------------------------


class Guard(Enum):
    """Conditions a row may depend on, checked against the event and the machine's memory."""

    ALWAYS = "always"
    SAME_CARD = "the card already known"
    OTHER_CARD = "another card, inserted"
    SEEN_AGAIN = "another card, seen again after pcscd restarted (nobody inserted it)"
    SEEN_AGAIN_WAITING = ("the card that waited for re-insertion, seen again after pcscd restarted (nobody "
                          "re-inserted it)")
    CURRENT = "of the current attempt"
    STALE = "of an earlier attempt"
    LOSSES_LEFT = f"of the current attempt, fewer than {MAX_SESSION_LOSSES} losses since insertion"
    NO_LOSSES_LEFT = f"of the current attempt, the loss that makes {MAX_SESSION_LOSSES} since insertion"


class Action(Enum):
    START_SIGN_IN = "start a sign-in"
    CANCEL_SIGN_IN = "cancel the sign-in"
    END_SESSION = "end the session"
    END_STALE_SESSION = "end the late session"


@dataclass(frozen=True)
class Row:
    """What happens: ``do`` these actions, then go to ``then`` (None: stay). ``ends`` is the reason
    a session ends with, ``waits`` what ``status`` says in WAITING; both may name the event's
    fields in braces, e.g. "{reason}", and ``waits`` "{waited}": why the card waited before pcscd
    restarted under it. ``starts`` is the cause a started sign-in carries."""

    when: Guard
    then: State | None
    do: tuple[Action, ...] = ()
    ends: str = ""
    waits: str = ""
    starts: SignInCause = SignInCause.INSERTED  # why START_SIGN_IN starts a sign-in


def _stay() -> tuple[Row, ...]:
    return (Row(Guard.ALWAYS, None),)


_LATE = "the sign-in was no longer wanted"


def _late_success() -> tuple[Row, ...]:
    return (Row(Guard.ALWAYS, None, (Action.END_STALE_SESSION,), ends=_LATE),)


_REINSERT = "remove and re-insert the card to sign in again"
_RESTARTED = "pcscd restarted"
_LOCKED = f"locked: {_REINSERT}"
# Nobody re-inserted the card: the wait the restart interrupted goes on, with what status said.
_STILL_WAITING = Row(Guard.SEEN_AGAIN_WAITING, State.WAITING, waits="{waited}")
_S = State
_A = Action
_G = Guard

_SIGNING_IN_ROWS: dict[type, tuple[Row, ...]] = {
    CardInserted: (Row(_G.SAME_CARD, None),
                   Row(_G.OTHER_CARD, _S.PIN_PENDING, (_A.CANCEL_SIGN_IN, _A.START_SIGN_IN)),
                   Row(_G.SEEN_AGAIN, _S.PIN_PENDING, (_A.CANCEL_SIGN_IN, _A.START_SIGN_IN),
                       starts=SignInCause.READER_RESTARTED)),
    CardRemoved: (Row(_G.ALWAYS, _S.NO_CARD, (_A.CANCEL_SIGN_IN,)),),
    SignInCancelled: (Row(_G.CURRENT, _S.WAITING, waits=f"card present, {{reason}}: {_REINSERT}"),
                      Row(_G.STALE, None)),
    SignedIn: (Row(_G.CURRENT, _S.SIGNED_IN), Row(_G.STALE, None, (_A.END_STALE_SESSION,), ends=_LATE)),
    SignInFailed: (Row(_G.CURRENT, _S.WAITING, waits="card present, {reason}"), Row(_G.STALE, None)),
    # The card's process died while it read the card, or while its PIN dialog was open (that dialog
    # asks for nothing usable), or the card lost the login it had just accepted (reset, its reader
    # restarted): a new process reads the card again. Its dialog asks first, or it would take the
    # rest of a PIN being typed into the one that closed.
    SessionLost: (Row(_G.LOSSES_LEFT, _S.PIN_PENDING, (_A.CANCEL_SIGN_IN, _A.START_SIGN_IN),
                      starts=SignInCause.SIGN_IN_INTERRUPTED),
                  Row(_G.NO_LOSSES_LEFT, _S.WAITING, (_A.CANCEL_SIGN_IN,),
                      waits=f"card present, the card session ended unexpectedly {MAX_SESSION_LOSSES} times: "
                            f"{_REINSERT}"),
                  Row(_G.STALE, None)),
    Lock: (Row(_G.ALWAYS, _S.WAITING, (_A.CANCEL_SIGN_IN,), waits=_LOCKED),),
    IdleTimeout: _stay(),
    CertificateExpired: _stay(),
    CertificateRevoked: _stay(),
    Reload: _stay(),
    Stop: (Row(_G.ALWAYS, _S.STOPPED, (_A.CANCEL_SIGN_IN,)),),
}

TRANSITIONS: dict[State, dict[type, tuple[Row, ...]]] = {
    _S.NO_CARD: {
        # A card seen again after pcscd restarted was not inserted: the clinician may be typing in her
        # report (the restart ended her session half a second ago), and the dialog would take her keys.
        # SEEN_AGAIN_WAITING: the card waited for re-insertion as pcscd restarted, and the removal the
        # restart is brought it here; a restart is no re-insertion.
        CardInserted: (Row(_G.OTHER_CARD, _S.PIN_PENDING, (_A.START_SIGN_IN,)),
                       Row(_G.SEEN_AGAIN, _S.PIN_PENDING, (_A.START_SIGN_IN,), starts=SignInCause.READER_RESTARTED),
                       _STILL_WAITING),
        CardRemoved: _stay(),
        PinEntered: _stay(),
        SignInCancelled: _stay(),
        SignedIn: _late_success(),
        SignInFailed: _stay(),
        SessionLost: _stay(),
        Lock: _stay(),
        IdleTimeout: _stay(),
        CertificateExpired: _stay(),
        CertificateRevoked: _stay(),
        Reload: _stay(),
        Stop: (Row(_G.ALWAYS, _S.STOPPED),),
    },
    _S.PIN_PENDING: {
        **_SIGNING_IN_ROWS,
        # The other card's dialog must not take the rest of a PIN being typed for this one.
        CardInserted: (Row(_G.SAME_CARD, None),
                       Row(_G.OTHER_CARD, _S.PIN_PENDING, (_A.CANCEL_SIGN_IN, _A.START_SIGN_IN),
                           starts=SignInCause.OVER_OTHER_PIN_DIALOG),
                       Row(_G.SEEN_AGAIN, _S.PIN_PENDING, (_A.CANCEL_SIGN_IN, _A.START_SIGN_IN),
                           starts=SignInCause.READER_RESTARTED)),
        PinEntered: (Row(_G.CURRENT, _S.SIGNING_IN), Row(_G.STALE, None)),
    },
    _S.SIGNING_IN: {
        **_SIGNING_IN_ROWS,
        PinEntered: _stay(),
    },
    _S.SIGNED_IN: {
        # SEEN_AGAIN here: the card loop did not turn while the watcher held the card removed after
        # the restart (agent/card/readers.py), so the removal comes as this event's.
        CardInserted: (Row(_G.SAME_CARD, None),
                       Row(_G.OTHER_CARD, _S.PIN_PENDING, (_A.END_SESSION, _A.START_SIGN_IN), ends="card swapped"),
                       Row(_G.SEEN_AGAIN, _S.PIN_PENDING, (_A.END_SESSION, _A.START_SIGN_IN), ends=_RESTARTED,
                           starts=SignInCause.READER_RESTARTED)),
        CardRemoved: (Row(_G.ALWAYS, _S.NO_CARD, (_A.END_SESSION,), ends="card removed"),),
        PinEntered: _stay(),
        SignInCancelled: _stay(),
        SignedIn: (Row(_G.CURRENT, None), Row(_G.STALE, None, (_A.END_STALE_SESSION,), ends=_LATE)),
        SignInFailed: _stay(),
        # Nobody asked for the dialog that follows: the clinician may be typing in her application.
        SessionLost: (Row(_G.LOSSES_LEFT, _S.PIN_PENDING, (_A.END_SESSION, _A.START_SIGN_IN), ends="{reason}",
                          starts=SignInCause.SESSION_LOST),
                      Row(_G.NO_LOSSES_LEFT, _S.WAITING, (_A.END_SESSION,), ends="{reason}",
                          waits=f"card present, the card session ended unexpectedly {MAX_SESSION_LOSSES} times: "
                                f"{_REINSERT}"),
                      Row(_G.STALE, None)),
        Lock: (Row(_G.ALWAYS, _S.WAITING, (_A.END_SESSION,), ends="locked", waits=_LOCKED),),
        IdleTimeout: (Row(_G.ALWAYS, _S.WAITING, (_A.END_SESSION,), ends="idle timeout",
                          waits="locked after {seconds:g} s without activity: remove and re-insert the card"),),
        # Re-inserting the card would not help (its sign-in refuses an expired certificate): a new one is needed.
        CertificateExpired: (Row(_G.ALWAYS, _S.WAITING, (_A.END_SESSION,), ends="certificate expired",
                                 waits="card present, its certificate expired on {expired}: a card with a valid "
                                       "certificate is needed"),),
        CertificateRevoked: (Row(_G.CURRENT, _S.WAITING, (_A.END_SESSION,), ends="certificate revoked",
                                 waits="card present, its certificate was revoked ({reason}): a new card is needed"),
                             Row(_G.STALE, None)),
        Reload: (Row(_G.ALWAYS, _S.PIN_PENDING, (_A.END_SESSION, _A.START_SIGN_IN), ends="configuration reloaded",
                     starts=SignInCause.RELOADED),),
        Stop: (Row(_G.ALWAYS, _S.STOPPED, (_A.END_SESSION,), ends="the agent is stopping"),),
    },
    _S.WAITING: {
        # A card seen again after pcscd restarted here (the card loop did not turn during the watcher's
        # hold) is the waiting card: nobody re-inserted it, so it goes on waiting, as from NO_CARD.
        CardInserted: (Row(_G.SAME_CARD, None), Row(_G.OTHER_CARD, _S.PIN_PENDING, (_A.START_SIGN_IN,)),
                       _STILL_WAITING),
        CardRemoved: (Row(_G.ALWAYS, _S.NO_CARD),),
        PinEntered: _stay(),
        SignInCancelled: _stay(),
        SignedIn: _late_success(),
        SignInFailed: _stay(),
        SessionLost: _stay(),
        Lock: _stay(),
        IdleTimeout: _stay(),
        CertificateExpired: _stay(),
        CertificateRevoked: _stay(),
        Reload: _stay(),
        Stop: (Row(_G.ALWAYS, _S.STOPPED),),
    },
    _S.STOPPED: {event: _stay() for event in EVENT_TYPES} | {SignedIn: _late_success()},
}


def no_card_status(passed_over: Sequence[object]) -> str:
    """What ``status`` says in NO_CARD: ``no card inserted``, unless cards are in their readers that
    were passed over for a newer card (the watcher knows them, agent/card/watcher.py ArrivalOrder):
    the newer card left, and they wait to be re-inserted rather than sign in by themselves."""
    if not passed_over:
        return State.NO_CARD.value
    them = "it" if len(passed_over) == 1 else "them"
    return (f"{', '.join(map(str, passed_over))} passed over for a newer card: remove and re-insert {them} "
            "to sign in")


class LifecycleError(Exception):
    """The table has no row for what happened: a bug in the table, never a user's doing."""


class CardLifecycle:
    """The machine: :meth:`handle` an event, get the effects to carry out, read :attr:`state`."""

    def __init__(self) -> None:
        self.state = State.NO_CARD
        self.card: Hashable | None = None
        self.attempt = 0  # the number of the newest sign-in attempt; 0 before the first
        self.losses = 0  # card-session processes lost since the card was inserted
        self.waiting = ""  # what status says while the machine waits for re-insertion
        # Why the card waited for re-insertion when it was last removed: a card pcscd shows again after
        # restarting (nobody re-inserted it) goes on waiting for it. "" when it did not wait.
        self.waited_before_removal = ""

    @property
    def status(self) -> str:
        """What ``status`` shows and what an application's A-ASSOCIATE-RJ is logged with."""
        if self.state is State.WAITING and self.waiting:
            return self.waiting
        return self.state.value

    def handle(self, event: Event) -> list[Effect]:
        row = self._row(event)
        fields = {**vars(event), "waited": self._wait_to_keep()}
        effects = [self._act(action, event, row) for action in row.do]
        if row.then is State.WAITING:
            self.waiting = row.waits.format(**fields)
        if row.then is not None:
            self.state = row.then
        self._remember(event, row, waited=fields["waited"])
        return effects

    def _row(self, event: Event) -> Row:
        rows = TRANSITIONS[self.state].get(type(event))
        if rows is None:
            raise LifecycleError(f"no row for {type(event).__name__} in state {self.state.name}")
        for row in rows:
            if self._holds(row.when, event):
                return row
        raise LifecycleError(f"no row of {type(event).__name__} in state {self.state.name} fits {event!r}")

    def _holds(self, guard: Guard, event: Event) -> bool:
        if guard is Guard.ALWAYS:
            return True
        if guard in (Guard.SAME_CARD, Guard.OTHER_CARD, Guard.SEEN_AGAIN, Guard.SEEN_AGAIN_WAITING):
            assert isinstance(event, CardInserted)
            if event.card == self.card:
                return guard is Guard.SAME_CARD
            if not event.after_reader_restart:
                return guard is Guard.OTHER_CARD
            return guard is (Guard.SEEN_AGAIN_WAITING if self._wait_to_keep() else Guard.SEEN_AGAIN)
        assert isinstance(event, (PinEntered, SignInCancelled, SignedIn, SignInFailed, SessionLost,
                                  CertificateRevoked))  # carry attempt
        current = event.attempt == self.attempt
        if guard is Guard.CURRENT:
            return current
        if guard is Guard.STALE:
            return not current
        if guard is Guard.LOSSES_LEFT:
            return current and self.losses + 1 < MAX_SESSION_LOSSES
        return current and self.losses + 1 >= MAX_SESSION_LOSSES  # NO_LOSSES_LEFT

    def _wait_to_keep(self) -> str:
        """Why the card waits for re-insertion, which a card seen again after pcscd restarted must not
        end: the wait now, or the one the card was removed in."""
        return self.waiting if self.state is State.WAITING else self.waited_before_removal

    def _act(self, action: Action, event: Event, row: Row) -> Effect:
        ends = row.ends.format(**vars(event))
        if action is Action.START_SIGN_IN:
            card = event.card if isinstance(event, CardInserted) else self.card
            self.attempt += 1
            return StartSignIn(card, self.attempt, row.starts)
        if action is Action.CANCEL_SIGN_IN:
            return CancelSignIn(self.attempt)
        if action is Action.END_STALE_SESSION:
            assert isinstance(event, SignedIn)
            return EndSession(event.attempt, ends)
        return EndSession(self.attempt, ends)  # END_SESSION: the current attempt's session

    def _remember(self, event: Event, row: Row, *, waited: str) -> None:
        if isinstance(event, CardInserted) and row.when is not Guard.SAME_CARD:
            self.card, self.losses, self.waited_before_removal = event.card, 0, ""
        elif isinstance(event, CardRemoved):
            # Kept only for a card seen again after pcscd restarted: any insertion forgets it.
            self.card, self.losses, self.waited_before_removal = None, 0, waited
        elif isinstance(event, SessionLost) and row.when is not Guard.STALE and row.then is not None:
            self.losses += 1


def describe_transitions() -> str:
    """:data:`TRANSITIONS` as a Markdown table, for docs/card-lifecycle.md."""
    lines = ["| state | event | when | next state | the agent |", "|---|---|---|---|---|"]
    for state, rows_by_event in TRANSITIONS.items():
        for event_type in EVENT_TYPES:
            for row in rows_by_event[event_type]:
                then = "(stays)" if row.then is None else row.then.name
                actions = ", ".join(action.value for action in row.do) or "nothing"
                if row.ends:
                    actions += f" ({_placeholders(row.ends)})"
                if row.starts.asks_first:
                    actions += f"; the sign-in asks first ({row.starts.value})"
                if row.waits:
                    actions += f"; `status`: {_placeholders(row.waits)}"
                lines.append(f"| {state.name} | {event_type.__name__} | {row.when.value} | {then} | {actions} |")
    return "\n".join(lines) + "\n"


def _placeholders(text: str) -> str:
    return re.sub(r"\{(\w+)(:[^}]*)?\}", lambda match: f"<{match.group(1)}>", text)
