"""A card-session process that hangs (here: stopped with SIGSTOP, as a process stuck in a module call
or starved would be) must not freeze the card loop: the idle check and `card-agent status` ask it
how many connections it serves, and a pulled card must still end the session."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from agent_runner import associate_rq, card_session_pid, running_agent, stop_process, tunnel
from conftest import CARD_AGENT, ProvisionedPki
from fault_pkcs11 import FaultControl
from peers.pynetdicom_scp import tls_scp

SIGNED_IN = 'event=sign-in subject="CN=Alice Example'


def test_a_stuck_card_session_neither_freezes_the_card_loop_nor_status(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 104)], module=str(fault_module),
                       env=card.env(), agent={"idle_timeout": 2}) as agent:
        agent.wait_for_log(SIGNED_IN)
        worker = card_session_pid(agent.process.pid)
        assert worker is not None
        stop_process(worker)
        try:
            time.sleep(2.5)  # past idle_timeout: the card loop's idle check asks the stopped process

            started = time.monotonic()
            config = str(tmp_path / "agent" / "agent.toml")
            status = subprocess.run([CARD_AGENT, "status", "--json", "--config", config],
                                    capture_output=True, text=True, env=test_pki.env(**card.env()), timeout=15,
                                    check=False)
            answered_in = time.monotonic() - started
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["state"] == "signed in"
            assert answered_in < 5.0, f"status answered in {answered_in:.1f} s"

            card.remove_card()
            pulled = time.monotonic()
            agent.wait_for_log('event=card-removed token="alice"', timeout=5)
            removed = time.monotonic()
            assert removed - pulled < 3.0
            # Ending it waits 4 s in all for its final counts and its exit, then kills it; meanwhile
            # the card loop notices no card and no signal. (Before: 4 s for the counts, then 3 s more.)
            log = agent.wait_for_log('event=sign-out reason="card removed"', timeout=15)
            signed_out_after = time.monotonic() - removed
        finally:
            try:
                os.kill(worker, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert log.count("card-agent: WARNING: card session of CN=Alice Example,O=Example Hospital Test PKI: the "
                     f"card-session process (pid {worker}) has not answered status within 2 s") == 1, log
    assert "idle timeout" not in log  # whether a transfer was open was not known: the session was not idled out
    assert 3.5 < signed_out_after < 5.5, f"signed out {signed_out_after:.1f} s after the card was removed"


def test_a_silent_card_session_holds_the_idle_lock_off_for_at_most_ten_seconds(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    """The clinician walked away; the card-session process answers nothing (stopped here). The idle
    lock used to wait for an answer that never came: the session stayed signed in, and a connection
    queued meanwhile on the lent listener was relayed as the clinician once the process ran again.
    Now it is ended as idle once it has been silent for 10 s past the idle timeout, and the queued
    connection is turned away."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    with tls_scp(pki_dir=test_pki.pki) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], module=str(fault_module),
                          env=card.env(), agent={"idle_timeout": 2}) as agent:
        agent.wait_for_log(SIGNED_IN)
        worker = card_session_pid(agent.process.pid)
        assert worker is not None
        stop_process(worker)
        stopped = time.monotonic()
        try:
            queued = socket.create_connection(("127.0.0.1", agent.port()), timeout=30)
            queued.sendall(associate_rq())
            log = agent.wait_for_log('event=sign-out reason="idle timeout"', timeout=35)
            signed_out_after = time.monotonic() - stopped
            answer = queued.recv(65536)
        finally:
            queued.close()
            try:
                os.kill(worker, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log = agent.wait_for_log("rejected: ")
    subject = "CN=Alice Example,O=Example Hospital Test PKI"
    assert re.search(f"card-agent: WARNING: card session of {subject}: idle for 2 s and no answer from its process "
                     r"for 1\d s: ended as idle", log), log
    # Silent for 10 s from the first unanswered question (at the idle deadline), then 4 s to end it;
    # a loaded machine (the whole suite on 2 cores) adds a few seconds.
    assert 12 < signed_out_after < 25, f"signed out {signed_out_after:.1f} s after the process stopped"
    assert answer[:1] == b"\x03"  # A-ASSOCIATE-RJ, where the PACS, reached as the clinician, accepts
