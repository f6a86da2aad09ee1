"""`card-agent run` with a PIN source that asks nobody (env:, file:) waits for that sign-in before it
says "ready" (and tells systemd so), for a minute at most. Two faults of that wait, found by running
the agent with its runtime directory on a full file system (a real tmpfs):

- a sign-in that could not start for a full disk is tried again with a growing wait (1 s, 2 s, ...),
  and the start waited for it all the same: the agent said "ready" only after the minute, where
  systemd's start (TimeoutStartSec=90) is close to giving up;
- `status` and `lock` were not answered before "ready": for that whole minute `status` timed out
  ("no agent answers on ... (timed out)"), as it did during any slow unattended sign-in.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from agent_runner import (
    associate_rq,
    card_session_pid,
    running_agent,
    send_and_close,
    start_agent,
    stop_agent,
    tunnel,
    wait_for,
    write_config,
)
from conftest import ProvisionedPki, run_card_agent
from dicom_card_agent.dicom.pdu import parse_associate_rj
from fault_pkcs11 import FaultControl
from peers.ports import free_port
from test_audit_failure import fill, small_tmpfs
from test_metrics import scrape_all, value

SIGNED_IN = 'event=sign-in subject="CN=Alice Example'


def test_a_full_runtime_directory_holds_up_the_sign_in_not_the_agent(test_pki: ProvisionedPki,
                                                                    tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        runtime_dir = disk / "run"
        runtime_dir.mkdir(mode=0o700)
        filler = fill(disk)
        started = time.monotonic()
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 9)],
                           agent={"runtime_dir": str(runtime_dir)}) as agent:
            ready_after = time.monotonic() - started
            status = run_card_agent("status", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env())
            filler.unlink()  # the administrator frees space: the next try signs in, no restart
            agent.wait_for_log(SIGNED_IN, timeout=20)
            log = agent.log()
    cannot_write = (f"cannot write the card session's files in {runtime_dir}: No space left on device (free space "
                    "there, or set [agent] runtime_dir to a file system with room)")
    assert re.search(rf"WARNING: sign-in to 'alice' \(serial \w+\) could not start: {re.escape(cannot_write)}: "
                     r"trying again in 1 s\n", log), log
    assert ready_after < 15, (ready_after, log)  # was 60 s (the start's longest wait)
    assert f"INFO: ready: 1 tunnel(s) for nobody yet (card present, the sign-in could not start ({cannot_write}): " \
           "trying again)" in log, log
    assert status.returncode == 0, status.stderr
    assert f"state:    card present, the sign-in could not start ({cannot_write}): trying again\n" in status.stdout, \
        status.stdout


def test_status_answers_while_the_start_waits_for_a_slow_sign_in(test_pki: ProvisionedPki, tmp_path: Path,
                                                                fault_module: Path) -> None:
    """A card whose login takes 15 s (a slow card; here C_Login delayed by the fault module, which a
    real card cannot be made to do on cue): `status` answers within the seconds a person waits, while
    the agent is not yet ready. Before, it waited for "ready" and gave up after its 10 s."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    card.login_delay(15_000)
    workdir = tmp_path / "agent"
    workdir.mkdir()
    config = write_config(workdir / "agent.toml", test_pki, [tunnel("pacs", 9)], module=str(fault_module))
    log_path = workdir / "agent.log"
    process = start_agent(config, log_path, test_pki.env(CARD_PIN="123456", **card.env()))
    try:
        wait_for(lambda: any(line.startswith("login-delay") for line in card.log_lines()), timeout=30)
        asked = time.monotonic()
        status = run_card_agent("status", "--config", config, env=test_pki.env())
        answered_after = time.monotonic() - asked
        log_at_answer = log_path.read_text()
        wait_for(lambda: SIGNED_IN in log_path.read_text(), timeout=30)
    finally:
        stop_agent(process)
    assert status.returncode == 0, (status.stderr, log_at_answer)
    assert "ready:" not in log_at_answer, log_at_answer
    assert answered_after < 5, answered_after
    state = next(line for line in status.stdout.splitlines() if line.startswith("state:"))
    assert state in ("state:    card present, PIN not yet entered", "state:    card present, signing in"), status.stdout


def test_an_unattended_sign_in_reads_as_signing_in_not_as_a_pin_to_enter(test_pki: ProvisionedPki, tmp_path: Path,
                                                                         fault_module: Path) -> None:
    """With a PIN that asks nobody (env:), nobody is to enter it: while the card session read the
    card inserted (its certificates, before the PIN goes to it), `status` and an application's
    refusal said "card present, PIN not yet entered", which sends the administrator of an unattended
    workstation looking for someone to type it. They say "card present, signing in", and the
    metrics' card state is signing_in. The read is held 4 s by the fault module (a real card cannot
    be slowed on cue); on SoftHSM it takes ~0.7 s."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    card.remove_card()
    metrics_port = free_port()
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 9)], module=str(fault_module),
                       env=card.env(), metrics={"listen": f"127.0.0.1:{metrics_port}"}) as agent:
        card.find_delay(4_000)
        card.insert_card()
        wait_for(lambda: any(line.startswith("find-delay") for line in card.log_lines()), timeout=30)
        status = run_card_agent("status", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env())
        scraped = scrape_all(metrics_port)
        answer = send_and_close(agent.port(), associate_rq())
        agent.wait_for_log("rejected: card present, signing in")
        log_in_the_read = agent.log()
        card.find_delay(None)
        agent.wait_for_log(SIGNED_IN, timeout=30)
    assert status.returncode == 0, status.stderr
    assert "state:    card present, signing in\n" in status.stdout, status.stdout
    assert parse_associate_rj(answer).describe().startswith("rejected-transient"), answer
    assert "PIN not yet entered" not in log_in_the_read, log_in_the_read
    assert (value(scraped, "card_agent_card_state", state="signing_in"),
            value(scraped, "card_agent_card_state", state="pin_pending")) == (1, 0)


def test_a_sighup_while_the_start_waits_for_the_sign_in_is_acted_on_once_ready(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    """The start waits up to a minute for an unattended sign-in; a SIGHUP then (configuration
    management writing the file and signalling every agent) was ignored, and the new configuration
    waited for the next SIGHUP or restart. It is now read once the agent is ready. The login is held
    5 s by the fault module."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    card.login_delay(5_000)
    workdir = tmp_path / "agent"
    workdir.mkdir()
    first, second = tunnel("first", 9), tunnel("second", 9)
    config = write_config(workdir / "agent.toml", test_pki, [first], module=str(fault_module))
    log_path = workdir / "agent.log"
    process = start_agent(config, log_path, test_pki.env(CARD_PIN="123456", **card.env()))
    try:
        wait_for(lambda: any(line.startswith("login-delay") for line in card.log_lines()), timeout=30)
        write_config(config, test_pki, [first, second], module=str(fault_module))
        process.send_signal(signal.SIGHUP)
        reloaded = f"card-agent: INFO: SIGHUP: configuration {config} reloaded: added second; the card session goes on"
        wait_for(lambda: reloaded in log_path.read_text(), timeout=30)
        log = log_path.read_text()
    finally:
        stop_agent(process)
    assert log.index("INFO: ready: 1 tunnel(s) for CN=Alice Example") < log.index(reloaded), log
    assert "SIGHUP came while the agent started: the configuration is read again now" in log, log
    assert process.returncode == 0, log


def sighup_disposition(pid: int) -> str:
    """SIGHUP in the main thread of ``pid`` (/proc/PID/status): "blocked", "caught" (a handler),
    "ignored", "default", or "gone"."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "gone"
    masks = dict(line.split(":\t", 1) for line in status.splitlines() if line.startswith("Sig"))
    bit = 1 << (signal.SIGHUP - 1)
    for field, disposition in (("SigBlk", "blocked"), ("SigCgt", "caught"), ("SigIgn", "ignored")):
        if int(masks[field], 16) & bit:
            return disposition
    return "default"


def agent_caught_holding_sighup(start: Callable[[], subprocess.Popen],
                                holder: Callable[[subprocess.Popen], int | None]) -> tuple[subprocess.Popen, int]:
    """An agent ``start`` made, and the process ``holder`` finds of it (itself, or its card session),
    caught while that process holds SIGHUP back (a few hundred milliseconds as it starts). A test
    starved past that moment starts the agent again, 3 times at most; on code that never holds it,
    AssertionError."""
    seen = []
    for _ in range(3):
        process = start()
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            pid = holder(process)
            disposition = sighup_disposition(pid) if pid is not None else "not started"
            if pid is not None and disposition == "blocked":
                return process, pid
            if disposition in ("caught", "ignored"):  # past the hold, or never held
                break
            time.sleep(0.002)
        seen.append(disposition)
        stop_agent(process)
    raise AssertionError(f"SIGHUP was never seen held back in 3 starts (then: {seen})")


def test_a_sighup_as_the_agent_process_starts_is_held_until_the_agent_acts_on_it(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """Configuration management that signals every agent (`pkill -HUP card-agent`) as one starts:
    in its first half second (the interpreter's imports, the configuration's reading) a SIGHUP took
    the default action and ended the agent. The executable now holds SIGHUP back from its first
    statement until the agent's handler is in place; the signal is sent while it is held. So is a
    signal the agent ignores (SIGUSR1), whose default action ended it too."""
    workdir = tmp_path / "agent"
    workdir.mkdir()
    config = write_config(workdir / "agent.toml", test_pki, [tunnel("first", 9)])
    log_path = workdir / "agent.log"
    process, _ = agent_caught_holding_sighup(
        lambda: start_agent(config, log_path, test_pki.env(CARD_PIN="123456")), lambda agent: agent.pid)
    try:
        process.send_signal(signal.SIGHUP)
        process.send_signal(signal.SIGUSR1)
        wait_for(lambda: "INFO: ready: " in log_path.read_text() or process.poll() is not None, timeout=30)
        reloaded = f"card-agent: INFO: SIGHUP: configuration {config} reloaded: "
        wait_for(lambda: reloaded in log_path.read_text() or process.poll() is not None, timeout=10)
        alive = process.poll() is None
        log = log_path.read_text()
    finally:
        stop_agent(process)
    assert alive, f"the SIGHUP ended the starting agent ({process.returncode}):\n{log}"
    assert log.index("INFO: ready: 1 tunnel(s)") < log.index(reloaded), log
    assert "SIGHUP came while the agent started: the configuration is read again now" in log, log
    assert "card-agent: WARNING: SIGUSR1 ignored: it means nothing to card-agent" in log, log
    assert process.returncode == 0, log


def test_a_sighup_as_the_card_session_process_starts_does_not_end_it(test_pki: ProvisionedPki,
                                                                       tmp_path: Path) -> None:
    """The card-session process leaves SIGHUP to the supervisor (a reload), but it can only say so
    once its interpreter has started and imported its code (half a second): a SIGHUP to every
    process of the agent at a card's insertion (`systemctl kill -s HUP`) ended it then. The
    supervisor starts it with the signal blocked; the signal is sent while it is, with SIGQUIT,
    SIGTSTP and SIGUSR1, which the process leaves to the supervisor too."""
    workdir = tmp_path / "agent"
    workdir.mkdir()
    config = write_config(workdir / "agent.toml", test_pki, [tunnel("first", 9)])
    log_path = workdir / "agent.log"
    process, session = agent_caught_holding_sighup(
        lambda: start_agent(config, log_path, test_pki.env(CARD_PIN="123456")),
        lambda agent: card_session_pid(agent.pid))
    try:
        for signum in (signal.SIGHUP, signal.SIGQUIT, signal.SIGTSTP, signal.SIGUSR1):
            os.kill(session, signum)
        wait_for(lambda: SIGNED_IN in log_path.read_text() or process.poll() is not None, timeout=30)
        signed_in_by = card_session_pid(process.pid)
        log = log_path.read_text()
    finally:
        stop_agent(process)
    assert signed_in_by == session, log
    assert f"card session started (pid {session})" in log, log
