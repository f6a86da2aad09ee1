"""The card-session process runs the configuration the supervisor runs, not whatever the file says.

It read the configuration file again at each sign-in: an edit that was not reloaded (yet) sent the
next session's traffic to the new PACS while `status` still named the old one; an edit a reload
had refused ("the running configuration goes on") made the next sign-in fail, locking the
clinician out mid-shift, and so did a file replaced by a link to another user's file. The
supervisor now hands each card-session process the bytes it parsed.

Real agent and card-session processes, SoftHSM tokens behind the fault module (to pull and
re-insert the card), two real pynetdicom PACS over TLS: where the C-ECHO arrives tells which
configuration the new card session runs.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from agent_runner import RunningAgent, running_agent, tunnel
from conftest import ProvisionedPki
from fault_pkcs11 import FaultControl
from peers.pynetdicom_scp import echo, tls_scp

SIGN_IN = 'event=sign-in subject="CN=Alice Example'
NOBODY = 65534


def wait_for_count(agent: RunningAgent, text: str, count: int, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while (log := agent.log()).count(text) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not {count} times in the agent's log:\n{log}")
        time.sleep(0.05)
    return log


def change_the_file(config: Path, change: str, first_pacs: int, second_pacs: int) -> None:
    """What the administrator (or configuration management) does to the file: remote now names
    the second PACS."""
    edited = config.read_text().replace(f'"127.0.0.1:{first_pacs}"', f'"127.0.0.1:{second_pacs}"')
    if change == "typo, refused at reload":
        edited = edited.replace("remote = ", "remot = ")
    if change == "link to another user's file, refused at reload":
        elsewhere = config.parent.parent / "elsewhere"
        elsewhere.mkdir()
        target = elsewhere / "agent.toml"
        target.write_text(edited)
        os.chown(target, NOBODY, NOBODY)
        config.unlink()
        config.symlink_to(target)
    else:
        config.write_text(edited)


@pytest.mark.parametrize("change", ["edited, not reloaded", "typo, refused at reload",
                                    "link to another user's file, refused at reload"])
def test_the_next_card_session_runs_the_configuration_the_agent_runs(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, change: str) -> None:
    if os.geteuid() != 0 and change.startswith("link"):
        pytest.skip("a file of another user is made as root")
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    config = tmp_path / "agent" / "agent.toml"
    with tls_scp(pki_dir=test_pki.pki) as first, tls_scp(pki_dir=test_pki.pki) as second, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", first.port)], module=str(fault_module),
                          env=card.env()) as agent:
        agent.wait_for_log(SIGN_IN)
        assert echo(agent.port())
        change_the_file(config, change, first.port, second.port)
        if change != "edited, not reloaded":
            agent.process.send_signal(signal.SIGHUP)
            refusal = agent.wait_for_log("SIGHUP: configuration not reloaded, the running one goes on: ")

        card.remove_card()
        agent.wait_for_log('event=sign-out reason="card removed"')
        card.insert_card()
        log = wait_for_count(agent, SIGN_IN, 2)
        answered = echo(agent.port())
        first.wait_for(lambda scp: len(scp.associations) == 2, what="the second C-ECHO at the running PACS")
    assert " failed: " not in log, log
    assert answered
    assert second.associations == [], "the card session ran the file's configuration, not the agent's"
    if change == "typo, refused at reload":
        assert "unknown key 'remot'" in refusal, refusal
    if change.startswith("link"):
        assert "refusing to use the configuration file" in refusal and f"uid {NOBODY}" in refusal, refusal
