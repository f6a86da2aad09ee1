"""The supervisor's card loop: the I/O shell around the card life-cycle (agent/lifecycle/machine.py).

The loop looks at the reader, watches the card-session process and the idle timer, and feeds the
machine what it sees; lock comes from the control socket, stop from the signal handlers. It
carries out what the machine answers: a sign-in (PIN dialog, login, starting the card-session
process) runs in a thread of its own, so that card events, signals, ``status`` and applications
are answered while a PIN dialog is open; cancelling it closes the dialog. Ending a session ends its
card-session process, and with it every connection, resumable session, the PIN and the login.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import functools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from dicom_card_agent.audit.events import User
from dicom_card_agent.card.pcsc import RETRY_SECONDS
from dicom_card_agent.card.readers import ReaderCard, ReaderWatcher
from dicom_card_agent.card.watcher import CannotLook, Card, CardEvents, CardWatcher, DescriptorsExhausted
from dicom_card_agent.clock import awake_or_asleep
from dicom_card_agent.config.model import AgentConfig
from dicom_card_agent.desktop.session_notices import SessionNotices
from dicom_card_agent.desktop.words import asking_first, time_left
from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.lifecycle.cancel import SignInCancelledError, SignInScope
from dicom_card_agent.lifecycle.machine import (
    CancelSignIn,
    CardInserted,
    CardLifecycle,
    CardRemoved,
    CertificateExpired,
    CertificateRevoked,
    Effect,
    EndSession,
    Event,
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
    no_card_status,
)
from dicom_card_agent.revocation.own_certificate import CARD_REVOKED
from dicom_card_agent.session.audit import AuditRecorder
from dicom_card_agent.session.channel import LEASE_RENEW_SECONDS, LEASE_SECONDS
from dicom_card_agent.session.events import event
from dicom_card_agent.session.identity import SignedIn as SignedInIdentity
from dicom_card_agent.session.identity import log_signed_in, sign_in, signed_in_again, unusable_reason
from dicom_card_agent.session.probe import CardInUseError, FoundCard, ProbeRequest
from dicom_card_agent.session.retune import session_change
from dicom_card_agent.session.supervisor import (
    CardSession,
    CardSessionLostError,
    CardSessionUnresponsive,
    describe_exit,
    pin_variables,
)
from dicom_card_agent.token.login import LoginError, waiting_reason
from dicom_card_agent.token.module import LoadedModule, ModuleLoadError, ModuleWaitsForPcscd, load_module
from dicom_card_agent.token.pin import PromptAskingFirst, reworded_dialogs
from dicom_card_agent.token.pinentry import PinEntryCancelledError, PinEntryTimedOutError
from dicom_card_agent.token.secret import Secret
from dicom_card_agent.tunnel.counters import Counts, Totals, add_counts, empty_counts
from dicom_card_agent.tunnel.lent_listeners import LISTENERS_NOT_TAKEN, PEER_REFUSED, SUPERVISOR_SILENT
from dicom_card_agent.tunnel.relay import CARD_LOST

log = logging.getLogger("agent.session")

TICK_SECONDS = 0.05  # how often the loop checks the session, the timers and the stop flag
# A signed-in card-session process that reads nothing of its channel for this long (it reads the lease
# every second) has its lent listeners taken back until it reads again. Longer than the supervisor's
# own lease (channel.LEASE_SECONDS), which guards against a pulled card going unnoticed: a stall here
# only delays, and an application that waited through a short one is better served than refused;
# shorter than the 30 s applications wait for an answer by default (DCMTK's and pynetdicom's ACSE
# timeout), so that they read a refusal instead of their own timeout.
SILENT_CARD_SESSION_SECONDS = 10.0
# Past idle_timeout, how long a card-session process that answers no status question may hold the lock off.
SILENT_SESSION_IDLE_SECONDS = 10.0
# How long a stopping agent waits for the reports of ended card sessions to be recorded: within
# systemd's TimeoutStopSec=30 (systemd/card-agent.service), after the card session's own end (4 s).
RECORDING_AT_STOP_SECONDS = 15.0
# How long a stopping agent waits for a sign-in under way to end once cancelled: its PIN prompt or
# dialog then gives the terminal back as it was (a prompt notices within 0.2 s). Gone with the
# process instead, it left the clinician's terminal with echo off.
SIGN_IN_END_AT_STOP_SECONDS = 2.0
_NO_DESCRIPTOR_LEFT = "no file descriptor left (another process's connections may hold them)"
# A sign-in that could not start for a shortage of the system's is tried again after this long,
# doubled each time up to the most.
SHORTAGE_FIRST_RETRY_SECONDS = 1.0
SHORTAGE_MAX_RETRY_SECONDS = 30.0
_SHORTAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC, errno.EDQUOT, errno.EAGAIN})
EXPIRY_NOTICE_DAYS = 14  # a certificate that expires sooner is told at sign-in (log, desktop)
STARTUP_SIGN_IN_SECONDS = 60.0  # how long `run` waits for an unattended (env:, file:) sign-in before "ready"


# A card as the card loop knows it: a token (the module was asked) or the card in a reader (pcscd was).
WatchedCard = Card | ReaderCard


@dataclass
class _SignIn:
    """A sign-in under way in its thread."""

    attempt: int
    card: WatchedCard
    scope: SignInScope
    started: float  # awake_or_asleep(): pin_dialog_timeout counts a suspend too
    cause: SignInCause = SignInCause.INSERTED  # why it started: any cause but an insertion asks first
    session: CardSession | None = None  # its card-session process, once started
    # What the system lacked (or who held the card), from a try that could not start until the next
    # try has read the card: `status` says so while the sign-in waits and while it tries again.
    cannot_start: str | None = None
    audited: bool = False  # its failure (or that it was given up) is in the audit trail: once only
    thread: threading.Thread | None = None

    def card_read(self) -> WatchedCard:
        """The card as the sign-in knows it: its token once the probe read it, else as the loop saw it."""
        return self.session.card if self.session is not None and self.session.card else self.card


class SessionTotals(Totals):
    """The counts since start, never going down: the ended sessions' totals plus what the card
    sessions not yet taken into them last told (the signed-in one, and one being ended).

    A session is counted from its sign-in (:meth:`serving`) until :meth:`take` moves its final
    counts into the totals, in one step under one lock: ending a session that does not answer takes
    up to 4 s, and a scrape then must see it neither missing nor twice. Each session's counts are
    those of its latest ``status`` answer (``CardSession.last_counts``), not an answer the caller
    holds, which may belong to a session taken into the totals since the caller asked it."""

    def __init__(self) -> None:
        super().__init__()
        self._sessions_lock = threading.Lock()
        self._counted: list[CardSession] = []

    def serving(self, session: CardSession) -> None:
        """``session`` signed in: its counts are part of the totals from now on."""
        with self._sessions_lock:
            self._counted.append(session)

    def take(self, session: CardSession) -> None:
        """``session`` has ended (its final counts, or its last known ones, are in ``last_counts``)."""
        with self._sessions_lock:
            self.session_ended(session.last_counts)
            self._counted = [each for each in self._counted if each is not session]

    def since_start(self, name: str) -> Counts:
        """Ended sessions, the sessions counted now, and what the supervisor turned away."""
        with self._sessions_lock:
            counts = super().since_start(name)
            for session in self._counted:
                add_counts(counts, session.last_counts.get(name, empty_counts()))
        return counts


class ListenerLending(Protocol):
    def lend(self, session: CardSession) -> None: ...
    def take_back(self, session: CardSession) -> None: ...


class SessionManager:
    def __init__(self, config: AgentConfig, *, confirm_final_try: bool = False,
                 audit: AuditRecorder | None = None) -> None:
        self.config = config
        self.audit = audit or AuditRecorder(None)
        self.confirm_final_try = confirm_final_try
        # Not initialised when pcscd is to tell of cards: OpenSC would probe a card present at start-up.
        self.module: LoadedModule = load_module(config.identity.module, initialise=False)
        self.machine = CardLifecycle()
        # Asks the module, or (presence = "pcsc" in the module's profile, pcscd answering) only pcscd:
        # replaced by a ReaderWatcher when the card events start (see _watch_reader).
        self.watcher: CardWatcher | ReaderWatcher = CardWatcher(
            self.module, config.identity.token, lambda token: unusable_reason(self.config, self.module, token))
        self._probed: Card | None = None  # the token the current card holds, once its probe has said
        self.session: CardSession | None = None  # the signed-in attempt's card-session process
        self._session_attempt = 0
        self._session_card: Card | None = None  # the card the session signed in with
        self._sign_in: _SignIn | None = None
        self._pending_sessions: dict[int, CardSession] = {}  # signed in, not yet taken up by the loop
        self._late: queue.SimpleQueue[Event] = queue.SimpleQueue()  # what sign-in threads report
        self.since: float | None = None
        self.last_error: str | None = None
        # Idle time, the PIN dialog's timeout and the lease count a suspend (agent/clock.py): a workstation
        # that slept 8 hours has been idle for 8 hours.
        self.last_activity = awake_or_asleep()
        self._next_idle_check = 0.0
        self._recording: list[CardSession] = []  # ended card sessions whose reports are still being recorded
        self._lock = threading.RLock()
        # The reader thread's latest look, when it started (awake_or_asleep()), every card present then
        # and those of them passed over for a newer card: one tuple, so that the loop never takes one
        # look's card with another's time or cards.
        self._seen: tuple[WatchedCard | None, float, tuple[WatchedCard, ...], tuple[WatchedCard, ...]] = \
            (None, 0.0, (), ())
        self._lease_renewed = 0.0  # awake_or_asleep() of the latest lease sent to the card session
        # The signed-in session whose process has read nothing for SILENT_CARD_SESSION_SECONDS: its
        # listeners are taken back meanwhile (see _check_session_reads).
        self._silent_session: CardSession | None = None
        self._silent_since = 0.0  # time.monotonic() since when it has read nothing
        # Who each recent sign-in (by attempt) signed in as, for its card session's reports: those of
        # an ended session may still be read (its reports thread outlives it by what is left to read).
        self._report_users: dict[int, User] = {}
        self._first_look = threading.Event()
        self._reader_starved_since: float | None = None  # looks failing for want of descriptors since (clock.py)
        self._card_events: CardEvents | None = None  # the reader thread's, for `status`
        self._wake = threading.Event()  # something to act on: a look at the reader, a report
        self._reader: threading.Thread | None = None
        self.totals = SessionTotals()  # `status` counts since start: sessions, and what was turned away
        self.desktop = SessionNotices(config)  # what the clinician is told (agent/desktop)
        # After each step of the loop (agent/service/heartbeat.py): the service manager's STATUS= and
        # watchdog pings come from here, so that a loop that stops turning stops pinging.
        self.heartbeat: Callable[[], None] = lambda: None
        # The tunnels' listeners (agent/tunnel/server.py): lent to each signed-in card session, which
        # then accepts on them itself, and taken back as it ends.
        self.listeners: ListenerLending | None = None
        # The agent's stop flag (set by a stop signal: agent/service/signals.py), given to start() and
        # run(): once it is set, no sign-in is started, whatever the machine asks (a session lost while
        # the agent stops).
        self._stopping = threading.Event()
        self._audit_once = threading.Lock()  # a sign-in's thread and the loop may both see it end

    # -- what the rest of the agent asks ----------------------------------------------------------

    @property
    def state(self) -> str:
        shortage = self._cannot_start()
        if shortage and self.machine.state is State.PIN_PENDING:
            return f"card present, the sign-in could not start ({shortage}): trying again"
        if self.machine.state is State.NO_CARD:  # "no card inserted" unless a card waits in its reader
            return no_card_status([card if isinstance(card, ReaderCard) else f"card {card}" for card in self._seen[3]])
        shown = self.lifecycle_state
        return shown.value if shown is not self.machine.state else self.machine.status

    @property
    def lifecycle_state(self) -> State:
        """The card life-cycle's state as `status` and the metrics tell it: PIN_PENDING with a PIN
        that asks nobody (env:, file:) is SIGNING_IN. Nobody is to enter that PIN: the agent reads
        the card and gives it the configured one; "PIN not yet entered" sent administrators of
        unattended workstations looking for someone to type it."""
        if self.machine.state is State.PIN_PENDING and self.config.identity.pin.asks_nobody:
            return State.SIGNING_IN
        return self.machine.state

    def _cannot_start(self) -> str | None:
        """What the sign-in under way lacked when it could not start, while it waits to try again."""
        pending = self._sign_in
        return pending.cannot_start if pending is not None else None

    @property
    def card(self) -> Card | None:
        """The token of the current card: known at once from the module, or after the card-session
        process's probe when the card is known from pcscd alone."""
        card = self.machine.card
        return card if isinstance(card, Card) else self._probed

    def current_session(self) -> CardSession | None:
        return self.session

    def touch(self) -> None:
        """An association was handed to the session."""
        self.last_activity = awake_or_asleep()

    def turned_away(self, name: str, reason: str | None = None) -> None:
        """Count an association the supervisor answered itself; ``reason`` defaults to the state
        (no_card, pin_pending, signing_in, waiting, signed_in: the card session could not take it)."""
        self.totals.turned_away(name, reason or self.machine.state.name.lower())

    def lock(self) -> State | None:
        """End the session (or the sign-in under way) now; the card must be re-inserted. The state
        that was locked; None when there was nothing to lock."""
        with self._lock:
            locked = self.machine.state
            if locked not in (State.SIGNED_IN, State.PIN_PENDING, State.SIGNING_IN):
                return None
            self._feed(Lock())
            self.desktop.locked()
            return locked

    def lock_before_suspend(self) -> str | None:
        """SIGTSTP (Ctrl-Z): a signed-in session is locked, since the suspended agent would not see
        its card pulled while the card-session process (in a session of its own, which the terminal
        does not suspend) went on relaying. A sign-in under way is left to go on once the agent is
        back. The subject locked; None when nothing was signed in."""
        with self._lock:
            session = self.session
            if self.machine.state is not State.SIGNED_IN or session is None:
                return None
            self.lock()
            return session.signed_in.files.subject

    def reconfigure(self, config: AgentConfig) -> str:
        """A reloaded configuration (agent/session/reload.py): the card session serves its tunnels
        in place when it can, else it ends and the card is signed in again (the Reload event).
        What happened, for the log."""
        with self._lock:
            self.config = config
            if isinstance(self.watcher, ReaderWatcher):  # whether a card is probed before it is chosen
                self.watcher.vet = self._vet if config.identity.token else None
        return self._retune()

    def _retune(self) -> str:
        """Bring the signed-in card session up to date with ``self.config``. Called without the lock:
        the card-session process may take its time to answer (it makes TLS contexts, a stuck one
        up to START_TIMEOUT_SECONDS), and meanwhile the card loop must act on a pulled card."""
        with self._lock:
            session, config = self.session, self.config
            if session is None or self.machine.state is not State.SIGNED_IN:
                # A sign-in under way goes on; its card session is brought up to date when it is ready.
                return f"no card session ({self.state})"
            reason = session_change(session.config, config)
        if not reason:
            answer = session.reconfigure(config)
            if answer["type"] == "reloaded":
                return "the card session goes on"
            reason = answer["message"]
        with self._lock:
            if self.session is not session:  # pulled, locked or lost while it was being asked
                return f"the card session ended meanwhile ({self.state})"
            log.warning("configuration reloaded: the card session of %s cannot take it in place (%s): it ends, "
                        "and the card is signed in again", session.signed_in.files.subject, reason)
            self._feed(Reload())
        return f"the card session was ended ({reason})"

    # -- the loop -----------------------------------------------------------------------------------

    def start(self, stop: threading.Event) -> None:
        """Start watching the reader and act on its first look. With a PIN source that asks nobody
        (env:, file:), wait until that sign-in is settled, so that "ready" means signed in on an
        unattended machine; one that could not start for a shortage of the system's (a full disk)
        is settled as far as "ready" goes: it is tried again in its thread, and status says so."""
        self._stopping = stop
        self._reader = threading.Thread(target=self._watch_reader, args=(stop,), name="card-reader", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + STARTUP_SIGN_IN_SECONDS
        while not self._first_look.wait(0.02):
            if stop.is_set() or time.monotonic() > deadline:
                return
        self.step()
        if self.config.identity.pin.kind not in ("env", "file"):
            return
        while self.machine.state in (State.PIN_PENDING, State.SIGNING_IN) and time.monotonic() < deadline:
            if self._cannot_start():
                return
            if stop.wait(0.02):
                return
            self.step()
            self.heartbeat()

    def run(self, stop: threading.Event) -> None:
        """Until ``stop``: act on what the reader, the sign-ins, the session and the timers say."""
        self._stopping = stop
        while not stop.is_set():
            if self._wake.wait(TICK_SECONDS):
                self._wake.clear()
            self.step()
            self.heartbeat()

    def _watch_reader(self, stop: threading.Event) -> None:
        """Look at the reader whenever card events say so, in a thread of its own: a card's probe
        (OpenSC: ~2 s after insertion) must not hold up signals, lost sessions or timers."""
        with CardEvents(card_readers=self.module.profile.card_readers) as events:
            self._card_events = events
            if not self._through_pcscd_alone(events):
                if not self._module_started(stop):
                    return
                if isinstance(self.watcher, CardWatcher):
                    self.watcher.pcsc_changes = events.changes  # a look re-reads the tokens only on a change
            events_came_late = False
            while not stop.is_set():
                # pcscd answering only after the start (its socket unit enabled late, the daemon back):
                # the watcher changes at a moment with no card, never under a card or its session.
                events_came_late = events.retry_pcsc() or events_came_late
                if events_came_late and not self.watcher.present and self.session is None:
                    events_came_late = False
                    self._through_pcscd_alone(events)
                started = awake_or_asleep()  # a look under way as the process was stopped is an old one
                try:
                    card = self.watcher.look()
                except DescriptorsExhausted:  # not a pulled card: keep it, say so once per episode
                    if self._reader_starved_since is None:
                        log.warning("cannot look at the card reader: %s; the card is taken to be still there",
                                    _NO_DESCRIPTOR_LEFT)
                        self._reader_starved_since = started
                except CannotLook:  # a sign-in is talking to the module: look again at the next event
                    pass
                else:
                    self._reader_starved_since = None
                    self._seen = (card, started, self.watcher.present, self.watcher.passed_over_present)
                    self._first_look.set()
                    self._wake.set()
                if events.wait(stop, self.watcher.look_interval):
                    return

    def _module_started(self, stop: threading.Event) -> bool:
        """The module initialised for the card loop, which asks it of cards itself; False when it cannot
        be (logged) or the agent stops first. A module waiting for a pcscd that does not answer now
        (stopped, stuck) is tried again every RETRY_SECONDS: the loop watches once pcscd is back."""
        told = False
        while True:
            try:
                self.module.lib  # noqa: B018 - initialised here if it was left to pcscd, which does not answer
                return True
            except ModuleWaitsForPcscd as error:
                if not told:
                    log.error("cannot watch the card reader yet: %s; trying again every %g s", error, RETRY_SECONDS)
                    told = True
            except ModuleLoadError as error:
                log.error("cannot watch the card reader: %s", error)
                return False
            if stop.wait(RETRY_SECONDS):
                return False

    def _through_pcscd_alone(self, events: CardEvents) -> bool:
        """Watch the readers through pcscd alone where pcscd's events run and the module's profile
        says so (presence = "pcsc"): the module is left to the card-session process, and so is judging
        a card by its token. False: the module is watched."""
        if events.source is None or not self.module.profile.presence_from_pcsc:
            return False
        self.watcher = ReaderWatcher(events.source, vet=self._vet if self.config.identity.token else None)
        log.info("cards are seen through pcscd alone; the card-session process probes each card once")
        return True

    def _vet(self, card: ReaderCard) -> None:
        """Find out, without ending the session of the card in use, whether ``card`` holds the token
        ``[identity] token`` accepts: a card-session process started for it probes it (the one way to
        learn a token's label or serial; the supervisor never loads the module for a card) and is
        ended before any PIN is asked. The answer goes to the watcher (ReaderWatcher.judged)."""
        if self._stopping.is_set():  # the card is not chosen meanwhile; nothing is started any more
            return
        try:
            threading.Thread(target=self._vet_in_thread, args=(card,), name="card-probe", daemon=True).start()
        except RuntimeError as error:  # no thread to be had: judged as unusable, not as the token
            self._judged(card, f"it could not be probed ({error})")

    def _vet_in_thread(self, card: ReaderCard) -> None:
        config = self.config
        session = CardSession(config)
        reason: str | None = None
        try:
            found = session.open(self._probe_request(config, card), self.module)  # as its sign-in would
            log.info("%s holds %s, which [identity] token %r accepts", card, found.card, config.identity.token)
        except Exception as error:  # not the token, unreadable, no PIN try left: not to be signed in with now
            reason = str(error) if isinstance(error, CardAgentError) else f"{type(error).__name__}: {error}"
        finally:
            _end_after_failure(session, "probed only")
        self._judged(card, reason)

    def _judged(self, card: ReaderCard, reason: str | None) -> None:
        watcher = self.watcher
        if isinstance(watcher, ReaderWatcher):
            watcher.judged(card, reason)

    @property
    def reader_trouble(self) -> str | None:
        """Why the card loop cannot look at the reader now, or sees no reader because pcscd does not
        answer, for `status`; None while all is well."""
        since = self._reader_starved_since
        if since is None:
            unavailable = self._card_events.unavailable if self._card_events is not None else None
            return None if unavailable is None else f"{unavailable}: no card reader is seen; {unavailable.remedy}"
        seconds = awake_or_asleep() - since
        # The lease is renewed from looks made: past it, the card session's lent listeners refuse
        # (not lent under [audit] on_failure = "refuse").
        lease_lapsed = (seconds >= LEASE_SECONDS and self.session is not None
                        and not self.audit.refuses_when_failing)
        consequence = ("new associations are refused until it can" if lease_lapsed
                       else "the card is taken to be still there")
        return f"cannot be looked at for {seconds:.0f} s: {_NO_DESCRIPTOR_LEFT}; {consequence}"

    def step(self) -> None:
        """Act once on the reader's latest look, the reports of sign-ins, the card-session process and
        the timers."""
        with self._lock:
            self._take_reports()
            card, seen_at, present, _ = self._seen
            if self._first_look.is_set() and card != self.machine.card:
                self.desktop.card_changed()  # the notices about the card before are not for whoever comes next
                before = self._card_left_or_stayed(card, present)
                self._probed = None
                if card is None:
                    self._feed(CardRemoved())
                else:  # inserted, or swapped for another between two looks
                    event("card-inserted", **card.event_fields(), **before)
                    # A card that stayed in its reader while pcscd restarted: nobody inserted it.
                    after_restart = isinstance(card, ReaderCard) and card.after_restart
                    self._feed(CardInserted(card, after_reader_restart=after_restart))
            self._check_session_alive()
            self._check_sign_in_process()
            self._check_pin_dialog()
            self._renew_lease(seen_at)  # before the idle check, which may wait for a status answer
            self._check_session_reads()
            self._check_idle()
            self._check_certificate_expiry()
            self.audit.record_refusal_counts()

    def _card_left_or_stayed(self, card: WatchedCard | None, present: tuple[WatchedCard, ...]) -> dict[str, str]:
        """Log that the card known so far left, unless it is still in its reader (another reader got a
        card, which is the one to sign in with now); then the new card's ``card-inserted`` names it."""
        previous = self.machine.card
        if previous is None:
            return {}
        if card is None or previous not in present:  # a reader taken for empty may still list it
            event("card-removed", **self._card_fields())
            return {}
        log.warning("card %s inserted while %s is still in its reader (%s): the new card is the one to sign in with",
                    card, self.card or previous, self.state)
        return {f"previous_{key}": value for key, value in self._card_fields().items()}

    def shutdown(self) -> None:
        pending = self._sign_in
        with self._lock:
            self._feed(Stop())
        if pending is not None and pending.thread is not None:
            pending.thread.join(SIGN_IN_END_AT_STOP_SECONDS)  # the Stop cancelled it
        self._finish_recording()

    def _finish_recording(self) -> None:
        """Before the Application Stop: the reports of ended card sessions still being recorded (an
        fsync or more each; thousands after a swap with C-STOREs unanswered), within
        RECORDING_AT_STOP_SECONDS; what is left then is counted lost."""
        deadline = time.monotonic() + RECORDING_AT_STOP_SECONDS
        recording, self._recording = self._recording, []
        for session in recording:
            given_up = session.wait_recorded(max(0.0, deadline - time.monotonic()))
            if given_up:
                self.audit.reports_given_up(given_up, RECORDING_AT_STOP_SECONDS)

    # -- feeding the machine and carrying out its effects -----------------------------------------

    def _feed(self, happened: Event) -> None:
        pending = self._sign_in
        effects = self.machine.handle(happened)
        for effect in effects:
            self._carry_out(effect)
        self._tell_unlooked_for(happened, effects)
        if isinstance(happened, CardRemoved) and pending is not None \
                and CancelSignIn(pending.attempt) in effects:  # she walked away from her sign-in
            self._audit_no_sign_in(pending, "the card was removed during the sign-in" if pending.scope.pin_was_entered
                                   else "the card was removed before the PIN was entered", cancelled=True)
        if isinstance(happened, SignedIn) and self.machine.state is State.SIGNED_IN:
            self._signed_in()

    def _tell_unlooked_for(self, happened: Event, effects: list[Effect]) -> None:
        """Tell the clinician what the machine did that she did not cause: a lost card session, a
        sign-in given up for another card (its effects say which, never the shell's guess)."""
        started = next((effect for effect in effects if isinstance(effect, StartSignIn)), None)
        if isinstance(happened, SessionLost):
            ended = any(isinstance(effect, EndSession) for effect in effects)
            if ended or (effects and started is None):  # a lost sign-in is tried again at once, unasked
                self.desktop.session_lost(signed_in=ended, signs_in_again=started is not None)
        elif isinstance(happened, CardInserted) and not happened.after_reader_restart \
                and any(isinstance(effect, CancelSignIn) for effect in effects):  # no other card came
            over_dialog = started is not None and started.cause is SignInCause.OVER_OTHER_PIN_DIALOG
            self.desktop.sign_in_cancelled_by_another_card(pin_asked=over_dialog)

    def _carry_out(self, effect: Effect) -> None:
        if isinstance(effect, StartSignIn):
            self._start_sign_in(effect.card, effect.attempt, effect.cause)  # type: ignore[arg-type]
        elif isinstance(effect, CancelSignIn):
            if self._sign_in is not None and self._sign_in.attempt == effect.attempt:
                self._sign_in.scope.cancel(self.machine.status)
                self._sign_in = None
        elif isinstance(effect, EndSession):
            self._end_session(effect.attempt, effect.reason)

    def _take_reports(self) -> None:
        while True:
            try:
                report = self._late.get_nowait()
            except queue.Empty:
                return
            if isinstance(report, (SignedIn, SignInFailed, SignInCancelled)) and self._sign_in is not None \
                    and self._sign_in.attempt == report.attempt:
                self._sign_in = None
            self._feed(report)

    # -- sign-in ------------------------------------------------------------------------------------

    def _start_sign_in(self, card: WatchedCard, attempt: int, cause: SignInCause = SignInCause.INSERTED) -> None:
        if self._stopping.is_set():
            # The stop is already asked for (the loop may be mid-turn when SIGTERM comes): a sign-in
            # now would log in to the card, with no Login record, only to log out at once. The Stop
            # that follows (shutdown) cancels the attempt the machine started.
            log.info("no sign-in to %s: the agent is stopping", card)
            return
        scope = SignInScope(on_pin_entered=lambda: self._report(PinEntered(attempt)))
        self._sign_in = _SignIn(attempt, card, scope, awake_or_asleep(), cause)
        self._sign_in.thread = threading.Thread(target=self._sign_in_thread, args=(self._sign_in,),
                                                name=f"sign-in-{attempt}", daemon=True)
        self._sign_in.thread.start()

    def _report(self, happened: Event) -> None:
        self._late.put(happened)
        self._wake.set()  # the loop acts on it now, not at its next tick

    def _sign_in_thread(self, pending: _SignIn) -> None:
        """Sign in to the card of ``pending``; whatever happens is reported to the loop, nothing is
        raised. A sign-in that could not start for want of descriptors, memory or disk space, or
        because another program held the card for itself (before any PIN was asked), is tried
        again, with a growing wait, until it starts or is cancelled: the shortage is of the moment,
        and a token that cannot be re-inserted (SoftHSM, an HSM) would otherwise need a restart."""
        retry_in = SHORTAGE_FIRST_RETRY_SECONDS
        while (shortage := self._try_sign_in(pending)) is not None:
            if not self._wait_to_retry(pending, shortage, retry_in):
                return
            retry_in = min(2 * retry_in, SHORTAGE_MAX_RETRY_SECONDS)

    def _wait_to_retry(self, pending: _SignIn, shortage: str, seconds: float) -> bool:
        """Wait before trying the sign-in of ``pending`` again; False (reported) when it was cancelled meanwhile."""
        named = pending.session.card if pending.session is not None and pending.session.card else pending.card
        log.warning("sign-in to %s could not start: %s: trying again in %g s", named, shortage, seconds)
        pending.cannot_start = shortage
        if pending.scope.wait(seconds):
            self._report(SignInCancelled(pending.attempt, pending.scope.reason))
            return False
        pending.started = awake_or_asleep()  # no dialog was open: pin_dialog_timeout counts from now
        return True

    def _try_sign_in(self, pending: _SignIn) -> str | None:
        """One try at the sign-in of ``pending``, reported to the loop; or, when it could not start
        for a shortage of the system's (nothing reported), what it lacked."""
        card, attempt, scope = pending.card, pending.attempt, pending.scope
        # The configuration of the probe and the PIN dialog; one that a reload brings meanwhile is
        # taken up before the PIN is sent (_reloaded_during_dialog), or else by the session after it.
        config = self.config
        session = CardSession(config, on_report=functools.partial(self._session_report, attempt),
                              confirm_final_try=self.confirm_final_try)
        pending.session = session  # the loop watches its process while the PIN dialog is open
        try:
            # The card's process probes it; a cancelled sign-in ends that process (scope.ends_with).
            found = scope.run(lambda: session.open(self._probe_request(config, card), self.module))
            pending.cannot_start = None  # read: its dialog (or stored PIN) comes next
            self._learnt(attempt, found.card)
            directory = session.directory
            assert directory is not None  # made by open()
            asking = _asking_first_on_terminal(config, pending.cause)
            with self._dialog_for(pending.cause):
                signed_in, pin = scope.run(lambda: sign_in(asking, self.module, found, directory,
                                                           confirm_final_try=self.confirm_final_try))
            signed_in = self._reloaded_during_dialog(session, found, signed_in, pin)
            session.start(signed_in, pin)  # the card-session process makes the one login attempt; pin is wiped
            log_signed_in(signed_in, self.module)
        except (SignInCancelledError, PinEntryCancelledError) as error:
            session.end("sign-in cancelled")
            if not scope.cancelled:  # the clinician pressed Cancel: say so, and how to try again
                log.warning("%s", error)
                self.desktop.sign_in_cancelled(error)
                self._audit_no_sign_in(pending, str(error), cancelled=True)
                self._report(SignInCancelled(attempt, self._no_pin_entered() if isinstance(error, PinEntryTimedOutError)
                                             else "PIN entry cancelled"))
            else:
                self._report(SignInCancelled(attempt, scope.reason))
            return None
        except CardSessionLostError as error:  # killed, or the card lost its login: a new process tries again
            session.end("sign-in failed")
            if scope.cancelled:  # the card left, a lock, a stop: that ended it
                self._report(SignInCancelled(attempt, scope.reason))
                return None
            log.error("sign-in to %s: %s", session.card or card, error)
            self._report(SessionLost(attempt, str(error)))
            return None
        except LoginError as error:
            session.end("PIN not accepted")
            if scope.cancelled:
                self._report(SignInCancelled(attempt, scope.reason))
                return None
            self.last_error = str(error)
            named = session.card or Card("", "")  # the probe names the card before any PIN is asked or refused
            event("pin-failure", **named.event_fields(), reason=str(error))
            if self._first_audit_of(pending):
                self.audit.sign_in_failed(named, error)
            self.desktop.sign_in_refused(error)
            log.error("%s", error)
            self._report(SignInFailed(attempt, waiting_reason(error)))
            return None
        except Exception as error:  # the card left mid-way, a broken module, anything: never the agent's end
            _end_after_failure(session)
            if scope.cancelled:
                self._report(SignInCancelled(attempt, scope.reason))
                return None
            message = str(error) if isinstance(error, CardAgentError) else f"{type(error).__name__}: {error}"
            if not scope.pin_was_entered and (_system_shortage(error) or isinstance(error, CardInUseError)):
                # Of the moment (the system's shortage, another program holding the card): tried
                # again; asked again, a PIN would be too.
                return message
            self.last_error = message
            event("sign-in-failed", **(session.card or card).event_fields(), reason=message)
            log.error("sign-in to %s failed: %s", session.card or card, message)
            self.desktop.sign_in_failed(error)
            self._audit_no_sign_in(pending, message, cancelled=False)
            self._report(SignInFailed(attempt, f"not signed in: {message}"))
            return None
        with self._lock:
            self._pending_sessions[attempt] = session
        self._report(SignedIn(attempt))
        return None

    def _reloaded_during_dialog(self, session: CardSession, found: FoundCard, signed_in: SignedInIdentity,
                                pin: Secret | None) -> SignedInIdentity:
        """``signed_in`` for the configuration the agent runs now. A reload while the PIN dialog was
        open (a changed [trust] or [[inbound]]) would end the session this sign-in starts at once,
        and ask for the PIN again: instead, what of the sign-in depends on the configuration is
        done again under the new one before the PIN is sent, and the card session starts with it.
        The PIN goes to no card the new configuration refuses: that raises, as a sign-in under it
        would have (``pin`` is wiped). When the new configuration needs what the probe did under
        the old one, the session starts with the old one and is brought up to date once signed in
        (_signed_in), as before."""
        reloaded = self.config
        if reloaded is session.config:
            return signed_in
        card = found.card
        needs_new_probe = _probe_depends_on(session.config, reloaded)
        if needs_new_probe:
            log.info("configuration reloaded during the sign-in to %s: %s; the card session starts with the "
                     "configuration the sign-in began with", card, needs_new_probe)
            return signed_in
        try:
            again = signed_in_again(reloaded, self.module, found, signed_in)
        except BaseException:
            if pin is not None:
                pin.wipe()  # not sent: the new configuration refuses the card (or its files could not be written)
            raise
        if again is None:
            log.info("configuration reloaded during the sign-in to %s: it chooses another identity on the card; "
                     "the card session starts with the configuration the sign-in began with", card)
            return signed_in
        session.config = reloaded  # what session.start() sends: the card-session process makes its TLS contexts from it
        log.info("configuration reloaded during the sign-in to %s: the card was checked against it again before "
                 "its PIN was sent; the card session starts with it", card)
        return again

    def _first_audit_of(self, pending: _SignIn) -> bool:
        """Whether the end of ``pending`` is not yet in the audit trail (and now counts as being):
        its thread and the loop may both see it end (a Cancel as the card is pulled)."""
        with self._audit_once:
            first, pending.audited = not pending.audited, True
        return first

    def _audit_no_sign_in(self, pending: _SignIn, reason: str, *, cancelled: bool) -> None:
        """A failed Login for a sign-in that ended other than by a refused PIN (docs/audit.md), once
        per sign-in: one ends so at most once per insertion (the card then waits to be re-inserted),
        so nothing repeats the record by itself."""
        if not self._first_audit_of(pending):
            return
        card = pending.card_read()
        if isinstance(card, Card):
            self.audit.sign_in_not_made(card, reason, cancelled=cancelled)
        else:  # never read: its reader is all that is known of it
            self.audit.sign_in_not_made(None, f"{card}: {reason}", cancelled=cancelled)

    @staticmethod
    def _dialog_for(cause: SignInCause) -> contextlib.AbstractContextManager[None]:
        """A PIN dialog the clinician did not open by inserting her card asks first, Cancel the default."""
        if not cause.asks_first:
            return contextlib.nullcontext()
        return reworded_dialogs(functools.partial(asking_first, cause=cause))

    def _probe_request(self, config: AgentConfig, card: WatchedCard) -> ProbeRequest:
        confirm = self.confirm_final_try or config.identity.pin.confirms_in_dialog
        if isinstance(card, ReaderCard):
            return ProbeRequest(self.module.path, reader=card.reader, confirm_final_try=confirm)
        return ProbeRequest(self.module.path, token=card.selector, confirm_final_try=confirm)

    def _learnt(self, attempt: int, card: Card) -> None:
        """The probe of ``attempt`` read which token the card holds (for ``status`` and the log)."""
        with self._lock:
            if attempt == self.machine.attempt and self.machine.card is not None:
                self._probed = card

    def _card_fields(self) -> dict[str, str]:
        """How the event log names the current card: its token, or its reader before the probe said."""
        card = self.card
        if card is not None:
            return card.event_fields()
        watched = self.machine.card
        return watched.event_fields() if isinstance(watched, (Card, ReaderCard)) else {}

    def _session_report(self, attempt: int, kind: str, fields: dict[str, Any]) -> None:
        """What the card-session process of sign-in ``attempt`` reports: for the audit trail and the
        clinician's desktop; a local user it refused on a lent listener is counted here too, as the
        supervisor's are; a card that no longer signs ends its session as a lost one."""
        if kind == CARD_LOST:
            # The card's login is gone under the process (the card was reset, or pulled and put back
            # between two looks): it cannot sign again. Ended as a lost session: the PIN is asked again.
            self._report(SessionLost(attempt, f"the card no longer signs: {fields.get('reason', '')}"))
            return
        if kind == CARD_REVOKED:  # a CRL or OCSP answer learnt while it served: the session ends
            self._report(CertificateRevoked(attempt, fields.get("reason", "")))
            return
        if kind == LISTENERS_NOT_TAKEN:  # the process had no room for them: connections are handed over instead
            session = self.session
            if self.listeners is not None and session is not None and self.machine.attempt == attempt:
                self.listeners.take_back(session)
            return
        if kind == SUPERVISOR_SILENT:  # counted as the supervisor's own refusals; nothing for the audit trail
            self.turned_away(fields["tunnel"], "supervisor_silent")
            return
        if kind == PEER_REFUSED:
            self.turned_away(fields["tunnel"], "local_peer_refused")
        # Recorded as the user this session signed in as: its last reports may be read after its
        # Logout, or the next card's Login.
        user = self._report_users.get(attempt)
        self.desktop.with_reports(functools.partial(self.audit.session_report, user=user))(kind, fields)

    def _signed_in(self) -> None:
        attempt = self.machine.attempt
        session = self._pending_sessions.pop(attempt)
        self.session, self._session_attempt = session, attempt
        self.totals.serving(session)
        self.since = time.time()
        self.touch()
        files = session.signed_in.files
        card = self._session_card = self.card
        assert card is not None
        event("sign-in", subject=files.subject, issuer=files.issuer, token=card.label, serial=card.serial)
        self._report_users = {attempt: self.audit.signed_in(session.signed_in, card),
                              **{before: user for before, user in self._report_users.items() if before >= attempt - 2}}
        self.desktop.signed_in(session.signed_in.identity.certificate)
        self._tell_if_expiring_soon(session.signed_in)
        if session.config is not self.config:  # reloaded while it was signing in: not on the loop's time
            threading.Thread(target=self._retune, name="retune", daemon=True).start()
        if self.listeners is not None and self.session is session:
            self.listeners.lend(session)

    def _renew_lease(self, seen_at: float) -> None:
        """Tell the signed-in card session, once a second, when the card was last seen, having acted
        on that look: it admits new associations on the lent listeners for channel.LEASE_SECONDS
        from then. A loop that stops turning (stopped, deadlocked) stops renewing, so a card pulled
        meanwhile lets no new association through after that; when it turns again, the lease is
        renewed only with a look taken since, after the loop has acted on it (ending the session if
        the card is gone)."""
        session = self.session
        now = awake_or_asleep()
        if session is None or self.machine.state is not State.SIGNED_IN:
            return
        if now - self._lease_renewed < LEASE_RENEW_SECONDS:
            return
        if now - seen_at >= LEASE_SECONDS:  # renews nothing (the loop was stopped): wait for the next look
            return
        if session.renew_lease(seen_at):
            self._lease_renewed = now

    def _check_session_reads(self) -> None:
        """A signed-in card-session process that reads nothing for SILENT_CARD_SESSION_SECONDS
        (stopped with SIGSTOP, in a frozen cgroup, starved) accepts nothing on the lent listeners
        either: applications would wait without an answer for as long as it lasts. The supervisor
        takes the listeners back meanwhile and answers them itself (A-ASSOCIATE-RJ, transient, see
        :meth:`session_silence`); they are lent again once the process reads. Open associations
        wait for it: they are its to relay."""
        session = self.session
        if session is None:
            return
        unread_for = session.unread_for()
        if unread_for >= SILENT_CARD_SESSION_SECONDS and self._silent_session is not session:
            self._silent_session, self._silent_since = session, time.monotonic() - unread_for
            log.warning("card session of %s: its process (pid %s) has read nothing for %.0f s (stopped or starved): "
                        "new associations are refused until it does; open associations wait for it",
                        session.signed_in.files.subject, session.pid, unread_for)
            if self.listeners is not None:
                self.listeners.take_back(session)
        elif unread_for == 0.0 and self._silent_session is session:
            self._silent_session = None
            log.info("card session of %s: its process (pid %s) reads again: new associations are admitted again",
                     session.signed_in.files.subject, session.pid)
            if self.listeners is not None:
                self.listeners.lend(session)

    def session_silence(self) -> str | None:
        """Why a new association cannot go to the signed-in card session now (its process reads
        nothing, see :meth:`_check_session_reads`); None when it can."""
        session = self._silent_session
        if session is None or session is not self.session:
            return None
        silent = time.monotonic() - self._silent_since
        return (f"the card session's process (pid {session.pid}) has read nothing for {silent:.0f} s: "
                "new associations are refused until it does")

    # -- ending -------------------------------------------------------------------------------------

    def _end_session(self, attempt: int, reason: str) -> None:
        late = self._pending_sessions.pop(attempt, None)
        if late is not None:  # signed in after it was no longer wanted: it never served anyone
            late.end(reason)
            log.info("a sign-in that finished after it was cancelled was ended: %s", reason)
            return
        if self.session is None or self._session_attempt != attempt:
            return
        session, self.session = self.session, None
        card, self._session_card = self._session_card, None  # self.card is already the next card after a swap
        started = time.monotonic()
        if self.listeners is not None:  # new connections are answered here from now on
            self.listeners.take_back(session)
        session.end(reason)
        self._recording = [ended for ended in self._recording if ended.recording]
        if session.recording:  # its reports outlast it (report_backlog.py): a stop waits for them
            self._recording.append(session)
        self.totals.take(session)  # counted all along (detached from self.session above, not from the totals)
        event("sign-out", reason=reason, subject=session.signed_in.files.subject,
              token=card.label if card else None, serial=card.serial if card else None,
              closed_in_ms=round((time.monotonic() - started) * 1000))
        self.audit.signed_out(reason)
        self.desktop.session_ended(reason)
        self.since = None

    def _check_session_alive(self) -> None:
        """A card-session process that exited without being asked to is a lost session."""
        session = self.session
        if session is None or session.process is None:
            return
        status = session.process.poll()
        if status is None:
            return
        reason = f"the card-session process {describe_exit(status)}"
        log.error("card session of %s lost: %s", session.signed_in.files.subject, reason)
        self._feed(SessionLost(self._session_attempt, reason))

    def _check_sign_in_process(self) -> None:
        """A card-session process that exits while its PIN dialog is open (crashed, killed) is a lost
        session too: the dialog would ask for a PIN that nothing can use any more."""
        pending = self._sign_in
        if pending is None or pending.session is None or self.machine.state is not State.PIN_PENDING:
            return
        process = pending.session.process
        if not pending.session.awaiting_pin or process is None or pending.scope.cancelled:
            return
        status = process.poll()
        if status is None:
            return
        reason = f"the card-session process {describe_exit(status)} while the PIN was asked for"
        log.error("sign-in to %s: %s", pending.session.card or pending.card, reason)
        self._feed(SessionLost(pending.attempt, reason))

    def _check_pin_dialog(self) -> None:
        pending = self._sign_in
        if (pending is None or pending.scope.pin_was_entered or pending.cannot_start
                or self.machine.state is not State.PIN_PENDING):
            return  # no dialog open
        if awake_or_asleep() - pending.started < self.config.identity.pin_dialog_timeout:
            return
        reason = self._no_pin_entered()
        self.desktop.sign_in_cancelled()
        self._audit_no_sign_in(pending, reason, cancelled=True)
        pending.scope.cancel(reason)
        self._sign_in = None
        self._feed(SignInCancelled(pending.attempt, reason))

    def _check_idle_at_deadline(self, timeout: float) -> None:
        """Look again when the last activity known comes to ``timeout``, not a check interval later:
        the lock then comes within a turn of the loop of the deadline (unless the session has
        accepted connections meanwhile, which the next check learns)."""
        self._next_idle_check = min(self._next_idle_check, self.last_activity + timeout)

    def _no_pin_entered(self) -> str:
        return f"no PIN entered within {self.config.identity.pin_dialog_timeout:g} s"

    def _check_idle(self) -> None:
        timeout = self.config.idle_timeout
        now = awake_or_asleep()
        if not timeout or self.session is None or now < self._next_idle_check:
            return
        self._next_idle_check = now + min(1.0, timeout / 4)
        if now - self.last_activity < timeout:
            self._check_idle_at_deadline(timeout)
            return
        try:
            tunnels = self.session.status()
        except CardSessionUnresponsive:
            # Whether a transfer is open is not known: asked again at the next check. A process that
            # stays silent relays nothing either (its relays need the interpreter that answers), and
            # the idle lock is what protects a workstation left alone: it waits no longer than this.
            if self.session.silent_for() < SILENT_SESSION_IDLE_SECONDS:
                return
            log.warning("card session of %s: idle for %g s and no answer from its process for %.0f s: ended as idle",
                        self.session.signed_in.files.subject, timeout, self.session.silent_for())
            self._feed(IdleTimeout(timeout))
            return
        # Connections the session accepted itself on lent listeners are activity too.
        self.last_activity = max(self.last_activity, self.session.last_connection)
        if now - self.last_activity < timeout:
            self._check_idle_at_deadline(timeout)
            return
        if any(t.get("open_connections") for t in tunnels.values()):
            self.touch()  # a long transfer is activity too
            return
        self._feed(IdleTimeout(timeout))

    def _tell_if_expiring_soon(self, signed_in: SignedInIdentity) -> None:
        """Say at sign-in that the certificate expires within :data:`EXPIRY_NOTICE_DAYS`, so that a
        new card comes before the session ends in the middle of work (_check_certificate_expiry)."""
        left = signed_in.expires.timestamp() - time.time()
        if left >= EXPIRY_NOTICE_DAYS * 86400:
            return
        log.warning("the certificate %s expires on %s (in %s): a new card is needed before then",
                    signed_in.files.subject, _utc(signed_in.expires), time_left(left))
        self.desktop.card_expires_soon(signed_in.expires, time_left(left))

    def _check_certificate_expiry(self) -> None:
        """End the session whose certificate's validity ended (the workstation's clock): the agent
        presents no expired certificate, and the PACS would refuse it with words about the PACS."""
        session = self.session
        if session is None or self.machine.state is not State.SIGNED_IN:
            return
        if time.time() < session.signed_in.expires.timestamp():
            return
        expired = _utc(session.signed_in.expires)
        log.warning("the certificate %s expired on %s: its card session ends; a card with a valid certificate is "
                    "needed", session.signed_in.files.subject, expired)
        self._feed(CertificateExpired(expired))


def _utc(moment: datetime.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def _asking_first_on_terminal(config: AgentConfig, cause: SignInCause) -> AgentConfig:
    """``config`` for the sign-in of ``cause``: with the ``prompt`` PIN source, one the clinician did
    not start by inserting her card asks first on the terminal, as the PIN dialog does (_dialog_for):
    what she was typing there (the rest of a PIN for a prompt that went away) must not be a PIN try."""
    if not cause.asks_first or config.identity.pin.kind != "prompt":
        return config
    pin = PromptAskingFirst("prompt", reword=functools.partial(asking_first, cause=cause))
    return dataclasses.replace(config, identity=dataclasses.replace(config.identity, pin=pin))


def _probe_depends_on(old: AgentConfig, new: AgentConfig) -> str:
    """Why a card-session process started (and its card probed) under ``old`` cannot sign in under
    ``new`` ("" when it can): [identity] chose and probed the token (a reload refuses its change
    anyway), and the process was started with the environment variables of ``old``'s PIN sources
    taken out: one that ``new`` reads would be left in its environment."""
    if old.identity != new.identity:
        return "[identity] changed, and the card was probed under the one before"
    left_in = sorted(pin_variables(new) - pin_variables(old))
    if left_in:
        return f"the card-session process was started with {', '.join(left_in)} in its environment"
    return ""


def _system_shortage(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is the system lacking something for a moment, not the
    card or the configuration: no descriptor, memory, disk space or thread to be had."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, MemoryError) or (isinstance(seen, OSError) and seen.errno in _SHORTAGE_ERRNOS):
            return True
        if isinstance(seen, RuntimeError) and "can't start new thread" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _end_after_failure(session: CardSession, reason: str = "sign-in failed") -> None:
    """End the card session of a failed sign-in (or of a probe only). Its end may fail for the same
    shortage as the sign-in (no thread or descriptor to be had): that must not end the thread unreported."""
    try:
        session.end(reason)
    except Exception:
        log.exception("ending the card session of a failed sign-in")
