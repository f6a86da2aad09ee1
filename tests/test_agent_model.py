"""A model of the card life-cycle played against the real agent (issue 10).

Hypothesis (RuleBasedStateMachine) drives one running agent per example: SoftHSM behind the fault
module (cards inserted, pulled at any moment including during the PIN dialog and in the middle of a
TLS handshake, swapped), pinentry-tty on a pseudo-terminal where the clinician types the PIN, a
wrong PIN or Ctrl-D, ``lock`` on the control socket, SIGKILL of the card-session process, SIGHUP,
port probes and C-STOREs to a pynetdicom TLS PACS that records the certificate of each association.
After every step it checks that the agent is alive, that its ``status`` is the model's (state text,
card, identity), that only a signed-in card's associations reach the PACS (with that card's
certificate), that no PIN dialog or card-session process outlives its state, that the card saw
one C_Login per PIN typed and nothing else (no OpenSSL "Enter PIN" prompt either), and that the
agent logged exactly the card insertions and removals the test made; after each example, that
every successful Login of the audit trail has its Logout.

A bounded run is part of the suite; a longer one is a command:

    CARD_AGENT_MODEL_EXAMPLES=200 CARD_AGENT_MODEL_STEPS=30 .venv/bin/python -m pytest tests/test_agent_model.py
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, Verbosity, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from agent_runner import ANY_SOFTHSM_TOKEN, card_session_pid, running_agent, stat_fields, tunnel, wait_for
from conftest import USER_PIN, ProvisionedPki
from dicom_card_agent.lifecycle.machine import MAX_SESSION_LOSSES
from fault_pkcs11 import FaultControl
from peers.pynetdicom_scp import RecordingScp, associate, tls_scp
from test_card_lifecycle_faults import PINENTRY_TTY, Terminal

EXAMPLES = int(os.environ.get("CARD_AGENT_MODEL_EXAMPLES", "8"))
STEPS = int(os.environ.get("CARD_AGENT_MODEL_STEPS", "12"))
# Shrinking replays a failure many times, up to SETTLE seconds each, against a real system whose
# timing differs between replays: off unless asked for; the failing steps are printed either way.
SHRINK = os.environ.get("CARD_AGENT_MODEL_SHRINK") == "1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SUBJECTS = {"alice": "CN=Alice Example,O=Example Hospital Test PKI",
            "bob": "CN=Bob Example,O=Example Hospital Test PKI"}
NO_CARD = "no card inserted"
PIN_PENDING = "card present, PIN not yet entered"
SIGNED_IN = "signed in"
LOCKED = "locked: remove and re-insert the card to sign in again"
CANCELLED = "card present, PIN entry cancelled: remove and re-insert the card to sign in again"
WRONG_PIN = "card present, PIN not accepted: remove and re-insert the card to try again"
WRONG_PIN_ERROR = "wrong PIN for token '{card}'"  # `last_error` goes on with the serial and what the card reports
# pinentry-tty's prompt for the question a dialog nobody asked for asks first: [s]ign in (again) or [c]ancel.
QUESTION = b"[sc]?"
LOST = (f"card present, the card session ended unexpectedly {MAX_SESSION_LOSSES} times: remove and re-insert "
        "the card to sign in again")
LOGIN, LOGOUT = 'csd-code="110122"', 'csd-code="110123"'
SETTLE = 15.0  # seconds a state may take to settle on this loaded 2-core machine: a bound, not a claim


def control(run_dir: Path, command: str) -> dict:
    """One request on the agent's control socket (what `card-agent status --json` / `lock` send)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(str(run_dir / "control.sock"))
        client.sendall(json.dumps({"command": command}).encode() + b"\n")
        return json.loads(client.makefile("rb").readline())


def session_pinentries(session: int) -> list[int]:
    """pinentry-tty processes in the agent's session (other tests may run their own meanwhile)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == session and (stat.parent / "cmdline").read_bytes().startswith(PINENTRY_TTY.encode()):
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def own_tokens(test_pki: ProvisionedPki, tmp_path: Path) -> ProvisionedPki:
    """A copy of the test PKI and its tokens: the wrong PINs typed here leave SoftHSM's "few PIN tries
    left" on a token until its next good login, which other tests of the session must not see."""
    copy = tmp_path / "pki-copy"
    shutil.copytree(test_pki.directory, copy, symlinks=True)
    conf = copy / test_pki.softhsm_conf.relative_to(test_pki.directory)
    conf.write_text(conf.read_text().replace(str(test_pki.directory), str(copy)))
    return ProvisionedPki(copy, conf)


def small_instance() -> Dataset:
    dataset = Dataset()
    dataset.SOPClassUID, dataset.SOPInstanceUID = SECONDARY_CAPTURE, generate_uid()
    dataset.PatientName, dataset.PatientID, dataset.Modality = "Model^Test", "MODEL1", "OT"
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    return dataset


def audit_balance(audit: Path) -> tuple[int, int]:
    """(successful Logins, Logouts) in the audit file; a refused PIN is a Login with outcome 4 or 8."""
    logins = logouts = 0
    for line in audit.read_text().splitlines() if audit.exists() else []:
        if LOGIN in line and re.search(r'EventOutcomeIndicator="0"', line):
            logins += 1
        elif LOGOUT in line:
            logouts += 1
    return logins, logouts


class AgentModel(RuleBasedStateMachine):
    """The model: which card is in the reader, the state the agent must be in, the exact status text."""

    test_pki: ProvisionedPki
    fault_module: Path
    workdir: Path
    examples = 0

    def __init__(self) -> None:
        super().__init__()
        AgentModel.examples += 1
        self.dir = self.workdir / f"example-{AgentModel.examples}"
        self.dir.mkdir(parents=True)
        self.stack = ExitStack()
        self.card = FaultControl(self.dir / "reader.ctl")
        self.card.show("alice")
        self.card.remove_card()  # every example starts with an empty reader
        self.terminal = Terminal()
        self.stack.callback(self.terminal.close)
        self.audit = self.dir / "audit.log"
        try:
            self.pacs: RecordingScp = self.stack.enter_context(tls_scp(pki_dir=self.test_pki.pki))
            self.agent = self.stack.enter_context(running_agent(
                self.test_pki, self.dir / "agent", [tunnel("pacs", self.pacs.port)], token=ANY_SOFTHSM_TOKEN,
                module=str(self.fault_module), env=self.card.env(), stdin=self.terminal.slave,
                identity={"pin": f"pinentry:{PINENTRY_TTY}"}, audit={"file": str(self.audit)}))
        except BaseException:
            self.stack.close()  # Hypothesis calls teardown only on a machine it could make
            raise
        self.run_dir = self.dir / "agent" / "run"
        self.reader: str | None = None
        self.status = NO_CARD
        self.losses = 0
        self.prompts_before = 0  # PIN prompts on the screen before the dialog of the current attempt
        self.asks_first = False  # the current attempt's dialog asks "sign in?" before the PIN (Cancel the default)
        self.questions_before = 0  # such questions on the screen before it
        self.stored: list[tuple[str, str]] = []  # (SOP Instance UID, card) the PACS must hold, in order
        self.associations: list[str] = []  # the card of each association that reached the PACS, in order
        self.removals = self.insertions = 0  # card events the agent must have logged, no more
        self.pins_typed = 0  # PINs typed into a dialog (right or wrong): each is one C_Login, no more

    def teardown(self) -> None:
        try:
            self.stack.close()  # stops the agent: it signs out first
            logins, logouts = audit_balance(self.audit)
            assert logins == logouts, f"{logins} Login(s) but {logouts} Logout(s) in {self.audit}"
        finally:
            self.stack = ExitStack()

    # -- helpers --

    def dialog_opened(self, prompts_before: int | None = None, questions_before: int | None = None, *,
                      asks_first: bool = False) -> None:
        """A new sign-in attempt opens a PIN dialog now (no earlier dialog can still draw);
        ``prompts_before``, ``questions_before``: the prompts counted before the step that opens
        it, when the dialog may draw before the step can tell that it happened (a lost session asks
        again at once). ``asks_first``: nobody asked for this dialog (a lost session, a card
        inserted over another card's dialog), so it asks whether to sign in before the PIN."""
        screen = self.terminal.screen
        self.prompts_before = screen.count(b"PIN:") if prompts_before is None else prompts_before
        self.questions_before = screen.count(QUESTION) if questions_before is None else questions_before
        self.asks_first = asks_first
        self.status = PIN_PENDING

    def wait_for_question(self) -> None:
        try:
            wait_for(lambda: self.terminal.screen.count(QUESTION) > self.questions_before, SETTLE)
        except AssertionError:
            raise AssertionError(f"no new question after {self.questions_before}; the screen ends "
                                 f"{self.terminal.screen[-600:]!r}\n{self.agent.log()}") from None

    def wait_for_prompt(self) -> None:
        """The PIN prompt of the current attempt, once its question (if it asks one) is answered "sign in"."""
        if self.asks_first:
            self.wait_for_question()
            self.terminal.type(b"s")
            self.asks_first = False
        try:
            wait_for(lambda: self.terminal.screen.count(b"PIN:") > self.prompts_before, SETTLE)
        except AssertionError:
            raise AssertionError(f"no new PIN prompt after {self.prompts_before}; the screen ends "
                                 f"{self.terminal.screen[-600:]!r}; dialogs "
                                 f"{session_pinentries(self.agent.process.pid)}\n{self.agent.log()}") from None

    def wait_for_state(self) -> dict:
        """The agent's status once it reached the model's (or an AssertionError saying where it stuck)."""
        seen: list[dict] = []

        def reached() -> bool:
            seen.append(control(self.run_dir, "status"))
            return self.matches(seen[-1])
        try:
            wait_for(reached, SETTLE)
        except AssertionError:
            raise AssertionError(f"status {seen[-1]['state']!r}, model {self.status!r}; the screen ends "
                                 f"{self.terminal.screen[-600:]!r}\n{self.agent.log()}") from None
        return seen[-1]

    def matches(self, status: dict) -> bool:
        state = status["state"]
        if status["token"] != self.reader:  # e.g. a swap not seen yet: the old card's state still shows
            return False
        if self.status == WRONG_PIN:
            return (state == WRONG_PIN
                    and (status["last_error"] or "").startswith(WRONG_PIN_ERROR.format(card=self.reader)))
        if self.status == SIGNED_IN:
            return state == SIGNED_IN and status["identity"] == SUBJECTS[self.reader] and status["token"] == self.reader
        return state == self.status

    # -- card events --

    @initialize(card=st.sampled_from(sorted(SUBJECTS)))
    def signed_in(self, card: str) -> None:
        """Every example starts signed in, so that its few steps are spent on a working day."""
        self.insert(card)
        self.the_agent_is_what_the_model_says()
        self.enter_pin()

    @precondition(lambda self: self.reader is None)
    @rule(card=st.sampled_from(sorted(SUBJECTS)))
    def insert(self, card: str) -> None:
        # One write: show() then insert_card() would be two generations, which the agent may see as
        # an insertion, a removal and another insertion (and a first PIN dialog drawn, then closed).
        generation = int(self.card.keys().get("generation", "0")) + 1
        self.card.set(show_token=card, present=1, generation=generation)
        self.insertions += 1
        self.reader, self.losses = card, 0
        self.dialog_opened()

    @precondition(lambda self: self.reader is not None)
    @rule()
    def pull(self) -> None:
        """At any moment: with the PIN dialog open or drawing, signed in, locked..."""
        self.card.remove_card()
        self.removals += 1
        self.reader, self.status = None, NO_CARD

    @precondition(lambda self: self.reader is not None)
    @rule()
    def swap(self) -> None:
        over_a_dialog = self.status == PIN_PENDING
        if over_a_dialog:
            self.wait_for_prompt()  # so that the old dialog cannot draw after the new one's baseline
        other = "bob" if self.reader == "alice" else "alice"
        self.card.show(other)
        self.removals, self.insertions = self.removals + 1, self.insertions + 1  # logged as both
        self.reader, self.losses = other, 0
        self.dialog_opened(asks_first=over_a_dialog)

    @precondition(lambda self: self.status == SIGNED_IN)
    @rule()
    def pull_mid_handshake(self) -> None:
        """Pull the card while the card session signs a handshake's CertificateVerify (slowed to 3 s)."""
        begun, card = self._sign_inits(), self.reader
        self.card.sign_delay(3000)
        result: dict = {}
        client = threading.Thread(target=lambda: result.update(assoc=associate(self.agent.port())), daemon=True)
        client.start()
        try:
            # A resumed TLS session signs nothing: then the association is pulled from under instead.
            wait_for(lambda: self._sign_inits() > begun or not client.is_alive(), SETTLE)
            self.card.remove_card()
            self.removals += 1
            self.reader, self.status = None, NO_CARD
            client.join(SETTLE)
        finally:
            self.card.sign_delay(None)
        assoc = result["assoc"]
        if assoc.is_established:  # only if it completed before the pull: it must be ended by the pull
            self.associations.append(card)
            wait_for(lambda: assoc.is_aborted, SETTLE)

    def _sign_inits(self) -> int:
        return sum(line.startswith("C_SignInit rv=0x0") for line in self.card.log_lines())

    # -- the clinician at the PIN dialog --

    @precondition(lambda self: self.status == PIN_PENDING)
    @rule()
    def enter_pin(self) -> None:
        self.wait_for_prompt()
        self.terminal.type(USER_PIN.encode() + b"\r")
        self.pins_typed += 1
        self.status = SIGNED_IN

    @precondition(lambda self: self.status == PIN_PENDING)
    @rule()
    def wrong_pin(self) -> None:
        self.wait_for_prompt()
        self.terminal.type(b"999999\r")
        self.pins_typed += 1
        self.status = WRONG_PIN

    @precondition(lambda self: self.status == PIN_PENDING and self.asks_first)
    @rule()
    def decline_to_sign_in(self) -> None:
        """The question of a dialog nobody asked for, answered Cancel: no PIN is asked."""
        self.wait_for_question()
        self.terminal.type(b"c")
        self.asks_first = False
        self.status = CANCELLED

    @precondition(lambda self: self.status == PIN_PENDING)
    @rule()
    def cancel_pin(self) -> None:
        self.wait_for_prompt()
        self.terminal.type(b"\x04")  # Ctrl-D
        self.status = CANCELLED

    # -- the workstation --

    @precondition(lambda self: self.status in (SIGNED_IN, PIN_PENDING))  # elsewhere a no-op, rarely worth a step
    @rule()
    def lock(self) -> None:
        answer = control(self.run_dir, "lock")
        assert answer["locked"], answer
        self.status = LOCKED

    @precondition(lambda self: self.status == SIGNED_IN)
    @rule()
    def kill_card_session(self) -> None:
        self.wait_for_state()  # the session of this state, not one still starting
        worker = card_session_pid(self.agent.process.pid)
        assert worker is not None, "signed in without a card-session process"
        prompts_before, questions_before = self.terminal.screen.count(b"PIN:"), self.terminal.screen.count(QUESTION)
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: card_session_pid(self.agent.process.pid) != worker, SETTLE)
        self.losses += 1
        if self.losses < MAX_SESSION_LOSSES:  # a lost session asks for the PIN again, asking first
            self.dialog_opened(prompts_before, questions_before, asks_first=True)
        else:
            self.status = LOST

    @rule()
    def sighup(self) -> None:
        """A reload of the unchanged file (tests/test_reload.py changes it): the agent stays, in the same state."""
        self.wait_for_state()
        self.agent.process.send_signal(signal.SIGHUP)
        # Nothing is to happen, so there is no event to wait for: give a wrong reaction time to show.
        time.sleep(0.5)

    @rule()
    def suspend_and_resume(self) -> None:
        """Ctrl-Z, then `fg`: a signed-in session is locked before the agent is suspended (suspended,
        it would not see the card pulled); in any other state the agent is back as it was."""
        self.wait_for_state()
        pid = self.agent.process.pid
        self.agent.process.send_signal(signal.SIGTSTP)
        wait_for(lambda: stat_fields(pid)[0] == "T", SETTLE)
        self.agent.process.send_signal(signal.SIGCONT)
        if self.status == SIGNED_IN:
            self.status = LOCKED

    @rule(signum=st.sampled_from([signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM]))
    def meaningless_signal(self, signum: signal.Signals) -> None:
        """`pkill -USR1 -f card-agent`: to the agent and its card session, whatever the state (a PIN
        dialog open included): logged and ignored, the agent in the same state."""
        self.wait_for_state()
        worker = card_session_pid(self.agent.process.pid)
        self.agent.process.send_signal(signum)
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):  # one that was just ending
                os.kill(worker, signum)
        time.sleep(0.5)  # nothing is to happen: give a wrong reaction time to show

    @rule()
    def probe(self) -> None:
        """A port check: connect and leave; nothing reaches the PACS."""
        with socket.create_connection(("127.0.0.1", self.agent.port()), timeout=10):
            pass

    @rule()
    def store(self) -> None:
        if self.status == SIGNED_IN:
            self.wait_for_state()
        assoc = associate(self.agent.port(), sop_classes=[SECONDARY_CAPTURE])
        if self.status != SIGNED_IN:
            assert not assoc.is_established, f"an association succeeded in state {self.status!r}"
            return
        assert assoc.is_established, f"signed in as {self.reader}, but the association failed:\n{self.agent.log()}"
        self.associations.append(self.reader)
        instance = small_instance()
        assert assoc.send_c_store(instance).Status == 0
        assoc.release()
        self.stored.append((instance.SOPInstanceUID, self.reader))

    # -- invariants, after every step (one method: the state must have settled before the rest is judged) --

    @invariant()
    def the_agent_is_what_the_model_says(self) -> None:
        assert self.agent.process.poll() is None, f"the agent exited:\n{self.agent.log()}"
        self.wait_for_state()
        self.a_pin_dialog_only_while_the_pin_is_pending()
        self.a_card_session_only_while_signed_in_or_pin_pending()
        self.the_pacs_saw_only_signed_in_cards_with_their_certificates()
        self.no_pin_try_the_clinician_did_not_make()
        self.the_card_events_that_happened_and_no_others()

    def the_card_events_that_happened_and_no_others(self) -> None:
        """A removal nobody made would close a PIN dialog or end a session (seen with a transient
        PKCS#11 error of the reader, which agent/card/watcher.py present_card takes for no card)."""
        log = self.agent.log()
        seen = (log.count("event=card-removed "), log.count("event=card-inserted "))
        assert seen == (self.removals, self.insertions), (
            f"the agent logged {seen[0]} removal(s) and {seen[1]} insertion(s); the test made "
            f"{self.removals} and {self.insertions}:\n{log}")

    def no_pin_try_the_clinician_did_not_make(self) -> None:
        logins = [line for line in self.card.log_lines() if line.startswith("C_Login")]
        assert len(logins) == self.pins_typed, f"{self.pins_typed} PIN(s) typed, but the card saw {logins}"
        # OpenSSL's own prompt: the pkcs11-provider wanting to log in by itself (stdin is the terminal here)
        assert "Enter PIN" not in self.agent.log() and b"Enter PIN" not in self.terminal.screen, self.agent.log()

    def a_pin_dialog_only_while_the_pin_is_pending(self) -> None:
        expected = 1 if self.status == PIN_PENDING else 0
        wait_for(lambda: len(session_pinentries(self.agent.process.pid)) == expected, SETTLE)

    def a_card_session_only_while_signed_in_or_pin_pending(self) -> None:
        """Signed in, a card-session process serves; while the PIN is pending, the process started at
        insertion (it probed the card) waits for the PIN; otherwise none runs: nothing of a pulled,
        locked or refused card survives."""
        running = self.status in (SIGNED_IN, PIN_PENDING)
        wait_for(lambda: (card_session_pid(self.agent.process.pid) is not None) == running, SETTLE)

    def the_pacs_saw_only_signed_in_cards_with_their_certificates(self) -> None:
        with self.pacs._lock:
            received = [(r.sop_instance_uid, a.peer_subject) for a in self.pacs.associations for r in a.received]
            completed = [a for a in self.pacs.associations if a.calling_ae or a.echoes or a.received]
        assert received == [(uid, SUBJECTS[card]) for uid, card in self.stored]
        # Every association that got as far as its A-ASSOCIATE-RQ is one the model expected, with its card.
        assert [a.peer_subject for a in completed] == [SUBJECTS[card] for card in self.associations], completed


@pytest.mark.skipif(not Path(PINENTRY_TTY).exists() and os.environ.get("CI") != "true", reason="no pinentry-tty")
def test_the_agent_follows_the_model(test_pki: ProvisionedPki, fault_module: Path, tmp_path: Path) -> None:
    AgentModel.test_pki = own_tokens(test_pki, tmp_path)
    AgentModel.fault_module, AgentModel.workdir = fault_module, tmp_path
    run_state_machine_as_test(AgentModel, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
        phases=tuple(Phase) if SHRINK else (Phase.explicit, Phase.reuse, Phase.generate),
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.verbose if os.environ.get("CARD_AGENT_MODEL_VERBOSE") else Verbosity.normal))


# Found by this model: a `status` that asked the card-session process for its counters while that
# session ended (card pulled or swapped) found the channel gone between its send and its receive,
# raised AttributeError in the control thread, and that thread died: from then on `card-agent
# status` and `card-agent lock` got no answer until the agent was restarted.
def test_status_keeps_answering_while_card_sessions_end(test_pki: ProvisionedPki, fault_module: Path,
                                                         tmp_path: Path) -> None:
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    run_dir = tmp_path / "agent" / "run"
    stop = threading.Event()
    errors: list[str] = []

    def poll() -> None:  # a status bar asking all the time, as a tray icon would
        while not stop.is_set():
            try:
                control(run_dir, "status")
            except (OSError, ValueError) as error:
                errors.append(f"{type(error).__name__}: {error}")
                return

    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], token=ANY_SOFTHSM_TOKEN,
                           module=str(fault_module), env=card.env()) as agent:
            agent.wait_for_log("event=sign-in ")
            pollers = [threading.Thread(target=poll, daemon=True) for _ in range(4)]
            for poller in pollers:
                poller.start()
            try:
                for swap in range(1, 31):  # each swap ends a card session while status is asked
                    card.show("bob" if swap % 2 else "alice")
                    wait_for(lambda swap=swap: agent.log().count("event=sign-in ") == swap + 1 or errors
                             or "Exception in thread control" in agent.log(), SETTLE)
                    if errors or "Exception in thread control" in agent.log():
                        break
            finally:
                stop.set()
                for poller in pollers:
                    poller.join(15)
            try:
                answer = control(run_dir, "status")
            except OSError as error:  # a timeout once the control thread died
                answer = {"state": f"no answer: {error}"}
            log = agent.log()
    assert "Exception in thread control" not in log, log
    assert errors == [] and answer["state"] == SIGNED_IN, (errors, answer)
