"""A card-session process that hangs (here: stopped with SIGSTOP, as a process stuck in a module call
or starved would be) must not freeze the card loop: the idle check and `card-agent status` ask it
how many connections it serves, and a pulled card must still end the session."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from agent_runner import card_session_pid, running_agent, tunnel
from conftest import CARD_AGENT, ProvisionedPki
from fault_pkcs11 import FaultControl

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
        os.kill(worker, signal.SIGSTOP)
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
