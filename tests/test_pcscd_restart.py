"""pcscd restarted with the clinician's card in its reader, with the real stack: pcscd + vpcd +
libcacard (CAC) + OpenSC, and pinentry-tty on a pseudo-terminal standing for her screen.

The restart ends the card session (the card's login died with the old pcscd), and the card the new
pcscd shows is the one that was there: nobody inserted it, so its PIN dialog asks first, Cancel the
default. Before, it opened the PIN prompt at once, and what the clinician was typing in her report
(here "1234" and Enter) went to the card as a PIN try.

A pcscd stopped (or stuck) rather than restarted answers nothing: it counts as away once silent for
a while, and the card as removed. (Here, not in test_virtual_cac.py: each module that imports the
session-scoped pcscd fixture has an instance of its own, and only the first starts pcscd.)
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from agent_runner import (
    agent_status,
    refused_at_once,
    running_agent,
    start_agent,
    stop_agent,
    stopped,
    tunnel,
    wait_for,
    write_config,
)
from conftest import CARD_AGENT, USER_PIN, ProvisionedPki
from dicom_card_agent.card import pcsc
from peers.pynetdicom_scp import associate
from pin_dialog import PINENTRY_TTY, Terminal, terminal  # noqa: F401 - a pytest fixture
from test_virtual_cac import OPENSC, VERIFICATION, own_runtime_dir, signed_in_behind_a_pacs
from virtual_card.bridge import PIN_PRESENTED
from virtual_card.fixtures import card_reader, pcscd, stack_unavailable, virtual_cards  # noqa: F401 - pytest fixtures
from virtual_card.nssdb import CardContents
from virtual_card.pcscd import OPENSC_MODULE, Pcscd, StackUnavailable
from virtual_card.reader import VirtualReader

QUESTION = b"[sc]?"  # pinentry-tty's prompt for the question asked first: [s]ign in again or [c]ancel
PROBE_SECONDS = 30  # OpenSC probes an inserted card in ~2.3 s; a loaded 2-core machine takes longer


def pins_presented(reader: VirtualReader) -> int:
    """PIN tries the card was given (VERIFY with a PIN), over every insertion into ``reader``."""
    return sum(log.read_text(errors="replace").count(PIN_PRESENTED) for log in reader.workdir.glob("bridge-*.log"))


def test_a_pcscd_restart_with_the_card_in_its_reader_asks_before_the_pin(
        test_pki: ProvisionedPki, tmp_path: Path, pcscd: Pcscd, card_reader: VirtualReader,
        virtual_cards: dict[str, CardContents], terminal: Terminal) -> None:
    if not pcscd.started_here:  # in CI the tests start pcscd: one already running there is a set-up fault
        stack_unavailable(StackUnavailable("pcscd runs outside the tests (a desktop's, systemd's): this test "
                                           "does not restart it"))
    carol = virtual_cards["carol"]
    env = test_pki.env(CARD_PIN=USER_PIN)
    # No PACS is needed: a sign-in, its end and the next sign-in are what is looked at.
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 9)], token="", module="opensc",
                       agent={"runtime_dir": str(tmp_path / "run")}, stdin=terminal.slave,
                       identity={"pin": f"pinentry:{PINENTRY_TTY}"}) as agent:
        agent.wait_for_log("card events: PC/SC events from pcscd")
        card_reader.insert(carol)
        terminal.wait_for_prompt(timeout=PROBE_SECONDS)
        terminal.type(USER_PIN.encode() + b"\r")
        agent.wait_for_log(f'event=sign-in subject="{carol.subject}"', timeout=PROBE_SECONDS)
        assert pins_presented(card_reader) == 1

        shown = len(terminal.screen)
        pcscd.restart()  # vpcd's card goes with the old pcscd ...
        card_reader.pull(wait=False)  # (its bridge has exited: reaped)
        card_reader.insert(carol)  # ... and is there as the new one starts, as a USB reader's card is
        agent.wait_for_log("event=sign-out", timeout=10)  # "card removed", or "pcscd restarted" (table)

        def dialog_shown() -> bool:
            return QUESTION in terminal.screen[shown:] or b"PIN:" in terminal.screen[shown:]

        wait_for(dialog_shown, timeout=PROBE_SECONDS)
        terminal.type(b"1234\r")  # the clinician's report, then Enter
        time.sleep(1.0)  # a PIN try would have reached the card by now
        screen = terminal.screen[shown:]
        assert pins_presented(card_reader) == 1, f"what the clinician typed went to the card as a PIN: {screen!r}"
        assert QUESTION in screen, f"the PIN dialog did not ask first; the screen shows {screen[-400:]!r}"
        assert "event=pin-failure" not in agent.log()
        assert agent_status(tmp_path / "agent", env)["state"] == "card present, PIN not yet entered"

        terminal.type(b"s")  # "Sign in again"
        wait_for(lambda: b"PIN:" in terminal.screen[shown:], timeout=10)
        terminal.type(USER_PIN.encode() + b"\r")
        wait_for(lambda: agent.log().count(f'event=sign-in subject="{carol.subject}"') == 2, timeout=PROBE_SECONDS)
        log = agent.log()
    assert pins_presented(card_reader) == 2
    assert "the card reader software restarted" in screen.decode(errors="replace").lower(), screen[-600:]
    assert "event=pin-failure" not in log
    assert USER_PIN not in log


CANCELLED = "card present, PIN entry cancelled: remove and re-insert the card to sign in again"


def test_a_card_waiting_for_re_insertion_goes_on_waiting_through_a_pcscd_restart(
        test_pki: ProvisionedPki, tmp_path: Path, pcscd: Pcscd, card_reader: VirtualReader,
        virtual_cards: dict[str, CardContents], terminal: Terminal) -> None:
    """Carol cancelled her PIN entry: her card waits to be pulled and put back. pcscd restarts with
    it in its reader. The removal the restart is made the agent forget why the card waited, and the
    card the new pcscd showed got the question "Sign in again?" that nobody asked for. Now it goes on
    waiting, saying what it said; pulling it and putting it back asks for the PIN, as it said."""
    if not pcscd.started_here:
        stack_unavailable(StackUnavailable("pcscd runs outside the tests (a desktop's, systemd's): this test "
                                           "does not restart it"))
    carol = virtual_cards["carol"]
    env = test_pki.env(CARD_PIN=USER_PIN)
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 9)], token="", module="opensc",
                       agent={"runtime_dir": str(tmp_path / "run")}, stdin=terminal.slave,
                       identity={"pin": f"pinentry:{PINENTRY_TTY}"}) as agent:
        agent.wait_for_log("card events: PC/SC events from pcscd")
        card_reader.insert(carol)
        terminal.wait_for_prompt(timeout=PROBE_SECONDS)
        terminal.type(b"\x04")  # Ctrl-D: Cancel
        wait_for(lambda: agent_status(tmp_path / "agent", env)["state"] == CANCELLED, timeout=10)

        shown = len(terminal.screen)
        pcscd.restart()
        card_reader.pull(wait=False)
        card_reader.insert(carol)  # there as the new pcscd starts: nobody re-inserted it
        wait_for(lambda: agent.log().count("event=card-inserted") == 2, timeout=10)  # the card seen again
        time.sleep(PROBE_SECONDS / 6)  # a sign-in would have probed the card and asked by now
        after_restart = terminal.screen[shown:]
        state_after_restart = agent_status(tmp_path / "agent", env)["state"]

        card_reader.pull()  # as the status says: remove the card and insert it again
        card_reader.insert(carol)
        wait_for(lambda: b"PIN:" in terminal.screen[shown:], timeout=PROBE_SECONDS)
        terminal.type(USER_PIN.encode() + b"\r")
        agent.wait_for_log(f'event=sign-in subject="{carol.subject}"', timeout=PROBE_SECONDS)
        asked_on_re_insertion = terminal.screen[shown:]
        log = agent.log()
    assert QUESTION not in after_restart and b"PIN:" not in after_restart, \
        f"a dialog nobody asked for opened after the restart: {after_restart[-400:]!r}"
    assert state_after_restart == CANCELLED
    assert QUESTION not in asked_on_re_insertion  # her own insertion: the PIN at once
    assert pins_presented(card_reader) == 1
    assert "event=pin-failure" not in log and USER_PIN not in log


def test_a_card_pulled_while_pcscd_is_stopped_ends_its_session_and_lets_no_new_association_through(
        test_pki: ProvisionedPki, tmp_path: Path, pcscd: Pcscd, card_reader: VirtualReader,
        virtual_cards: dict[str, CardContents]) -> None:
    """pcscd stopped (SIGSTOP; in life stuck in a reader's driver, or frozen) answers nothing and
    breaks no connection. Its last reader states were taken for the present ones: the card pulled
    meanwhile kept its session, its open association relayed on, and a new association went through
    as the clinician 15 s after the pull. pcscd silent for pcsc.UNANSWERED_SECONDS now counts as away:
    the card is taken to be removed (the safe side; it is asked for again once pcscd answers)."""
    if not pcscd.started_here:  # in CI the tests start pcscd: one already running there is a set-up fault
        stack_unavailable(StackUnavailable("pcscd runs outside the tests (a desktop's, systemd's): this test "
                                           "does not stop it"))
    with signed_in_behind_a_pacs(test_pki, tmp_path, card_reader, virtual_cards["carol"]) as (agent, pacs):
        held = associate(agent.port(), sop_classes=[VERIFICATION])
        assert held.is_established
        with stopped(pcscd.process.pid):
            pulled = card_reader.pull(wait=False)
            wait_for(lambda: not held.is_established, timeout=15)
            ended_after = time.monotonic() - pulled
            refused_at_once(agent.port())  # A-ASSOCIATE-RJ, as with no card
            log = agent.wait_for_log('event=sign-out reason="card removed"')
        wait_for(lambda: agent_status(tmp_path / "agent", test_pki.env())["state"] == "no card inserted",
                 timeout=10)
    assert len(pacs.associations) == 1  # the held one: nothing more reached the PACS as carol
    assert ended_after < pcsc.UNANSWERED_SECONDS + 3, ended_after
    assert re.search(r"pcscd has not answered for \d+\.\d s \(stopped, stuck or gone\): the card is taken to be "
                     r"removed", log), log


def test_the_administrator_s_commands_answer_while_pcscd_is_stopped(
        test_pki: ProvisionedPki, tmp_path: Path, pcscd: Pcscd, card_reader: VirtualReader,
        virtual_cards: dict[str, CardContents]) -> None:
    """`card-agent tokens`, `doctor` and `check` on a machine whose pcscd is stopped (or stuck) hung
    without a word for as long as it stayed so: OpenSC's C_Initialize waits for pcscd without end.
    They now say so within seconds (exit 2, or doctor's failed check), naming pcscd."""
    if not pcscd.started_here:
        stack_unavailable(StackUnavailable("pcscd runs outside the tests (a desktop's, systemd's): this test "
                                           "does not stop it"))
    card_reader.insert(virtual_cards["carol"])
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)], token="", module=OPENSC)
    env = test_pki.env(CARD_PIN=USER_PIN)
    answers = {}
    with stopped(pcscd.process.pid):
        for command in (["tokens", "--module", "opensc"], ["doctor", "--config", str(config)],
                        ["check", "--config", str(config)]):
            started = time.monotonic()
            answers[command[0]] = subprocess.run([CARD_AGENT, *command], capture_output=True, text=True, env=env,
                                                 stdin=subprocess.DEVNULL, timeout=20)
            assert time.monotonic() - started < pcsc.ANSWER_SECONDS + 5
    stuck = (f"PKCS#11 module {OPENSC_MODULE} (profile opensc) was not started: it reads cards through pcscd, and "
             f"pcscd does not answer within {pcsc.ANSWER_SECONDS:g} s (stopped, or stuck in a reader's driver); it "
             "would wait for pcscd without end. Restart it: `systemctl restart pcscd`")
    assert answers["tokens"].returncode == 2
    assert answers["tokens"].stderr == f"card-agent: error: {stuck}\n"
    assert f"fail pkcs11-module: {stuck}\n" in answers["doctor"].stdout, answers["doctor"].stdout
    assert answers["check"].returncode == 2
    assert f"fail pkcs11-module: {stuck}\n" in answers["check"].stdout, answers["check"].stdout


def test_an_agent_with_module_auto_starts_and_stops_while_pcscd_is_stopped(
        test_pki: ProvisionedPki, tmp_path: Path, pcscd: Pcscd, card_reader: VirtualReader,
        virtual_cards: dict[str, CardContents]) -> None:
    """`module = "auto"` asks pcscd which readers hold a card before it starts a module: with pcscd
    stopped, `run` waited for it before it listened or answered `status`, and a SIGTERM did not
    stop it. pcscd has 3 s to answer now; then the agent starts without its cards."""
    if not pcscd.started_here:
        stack_unavailable(StackUnavailable("pcscd runs outside the tests (a desktop's, systemd's): this test "
                                           "does not stop it"))
    card_reader.insert(virtual_cards["carol"])
    with stopped(pcscd.process.pid):
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 104)], token="", module="auto",
                           agent=own_runtime_dir(tmp_path)) as agent:
            assert agent_status(tmp_path / "agent", test_pki.env())["state"]
        assert agent.process.returncode == 0


def test_a_card_loop_that_starts_the_module_itself_waits_for_a_stopped_pcscd_and_then_signs_in(
        test_pki: ProvisionedPki, tmp_path: Path, pcscd: Pcscd, card_reader: VirtualReader,
        virtual_cards: dict[str, CardContents]) -> None:
    """Without pcscd's events (here CARD_AGENT_CARD_EVENTS=poll) the card loop starts OpenSC itself.
    With pcscd stopped, the module is not started (it would wait for pcscd without end): the loop says
    so, tries again every second, and signs the card in once pcscd answers; it must not give up."""
    if not pcscd.started_here:
        stack_unavailable(StackUnavailable("pcscd runs outside the tests (a desktop's, systemd's): this test "
                                           "does not stop it"))
    carol = virtual_cards["carol"]
    card_reader.insert(carol)
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)], token="", module=OPENSC,
                          agent=own_runtime_dir(tmp_path))
    log_path = tmp_path / "agent.log"
    with stopped(pcscd.process.pid):
        agent = start_agent(config, log_path, test_pki.env(CARD_PIN=USER_PIN, CARD_AGENT_CARD_EVENTS="poll"))
        try:
            wait_for(lambda: "cannot watch the card reader yet: PKCS#11 module" in log_path.read_text(), timeout=20)
        except BaseException:
            stop_agent(agent)
            raise
    try:
        wait_for(lambda: f'event=sign-in subject="{carol.subject}"' in log_path.read_text(), timeout=PROBE_SECONDS)
    finally:
        assert stop_agent(agent) == 0
    assert "pcscd does not answer within 3 s (stopped, or stuck in a reader's driver)" in log_path.read_text()
