"""The supervisor's lease on the listeners it lends to a signed-in card session (agent/tunnel/lent_listeners.py).

A supervisor that stops answering (SIGSTOP here; in life a deadlock or a stall) cannot act on a
pulled card. The card-session process used to go on accepting on the lent listeners and relaying
as the clinician, with TLS sessions that resume without the card, until the supervisor ran again.
Now it admits new associations only while the card loop has vouched for the card within
LEASE_SECONDS. The real agent, SoftHSM behind the fault module (the card pulled and re-inserted),
a pynetdicom TLS PACS with session resumption on."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from agent_runner import (
    RunningAgent,
    agent_status,
    card_session_pid,
    refused_at_once,
    running_agent,
    stopped,
    tunnel,
    wait_for,
)
from conftest import ProvisionedPki, run_card_agent
from dicom_card_agent.session.channel import LEASE_SECONDS
from fault_pkcs11 import FaultControl
from peers.pynetdicom_scp import RecordingScp, echo, tls_scp

SIGNED_IN = 'event=sign-in subject="CN=Alice Example'
PAST_THE_LEASE = LEASE_SECONDS + 2.0  # the lent listeners' threads look at the lease once a second
REFUSED = "rejected: the agent's supervisor (pid {pid}) has not answered for "
LAPSED = ("card-agent[session]: WARNING: the agent's supervisor (pid {pid}) has not answered for {seconds} s: new "
          "associations are refused until it does; open associations go on, and no TLS session is resumed")


@contextlib.contextmanager
def signed_in_with_resumption(test_pki: ProvisionedPki, tmp_path: Path,
                              fault_module: Path) -> Iterator[tuple[FaultControl, RecordingScp, RunningAgent]]:
    """alice's card signed in, one echo made (so a resumable TLS session exists)."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    with tls_scp(pki_dir=test_pki.pki) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port, session_resumption=True)],
                          module=str(fault_module), env=card.env()) as agent:
        agent.wait_for_log(SIGNED_IN)
        assert echo(agent.port())
        agent.wait_for_log(" full handshake to ")
        assert len(pacs.associations) == 1
        yield card, pacs, agent


def test_a_stopped_supervisor_lets_no_association_through_once_the_card_is_pulled(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    with signed_in_with_resumption(test_pki, tmp_path, fault_module) as (card, pacs, agent):
        supervisor = agent.process.pid
        worker = card_session_pid(supervisor)
        assert worker is not None
        with stopped(supervisor):
            card.remove_card()  # nobody acts on it: the card loop is stopped
            time.sleep(PAST_THE_LEASE)
            assert card_session_pid(supervisor) == worker  # still serving: it alone answers on the lent listener
            assert not echo(agent.port())  # an application's C-ECHO after the pull: refused
            described = refused_at_once(agent.port())  # the answer's values
            log = agent.wait_for_log(REFUSED.format(pid=supervisor))
            assert len(pacs.associations) == 1, pacs.associations  # the PACS saw nothing as the clinician
        # Running again, the supervisor acts on the pulled card.
        log = agent.wait_for_log('event=sign-out reason="card removed"', timeout=15)
        card.insert_card()
        deadline = time.monotonic() + 15
        while agent.log().count(SIGNED_IN) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.log().count(SIGNED_IN) == 2, agent.log()
        assert echo(agent.port())
        assert len(pacs.associations) == 2
        log = agent.log()
    assert described == ("rejected-transient by DICOM UL service-provider (Presentation related function): "
                         "temporary-congestion")
    assert re.search(re.escape(LAPSED.format(pid=supervisor, seconds="@")).replace("@", r"\d+"), log), log
    assert re.search(r"card-agent\[session\]: WARNING: tunnel pacs: uid \d+ pid \S+ .*: rejected: the agent's "
                     rf"supervisor \(pid {supervisor}\) has not answered for \d+ s: new associations are refused "
                     "until it does", log), log
    assert log.count("has not answered for") == 3, log  # the episode once, each refused association once


def test_a_supervisor_that_runs_again_with_the_card_present_lets_associations_in_with_a_new_handshake(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    with signed_in_with_resumption(test_pki, tmp_path, fault_module) as (card, pacs, agent):
        supervisor = agent.process.pid
        with stopped(supervisor):
            time.sleep(PAST_THE_LEASE)
            refused_at_once(agent.port())
        agent.wait_for_log(f"the agent's supervisor (pid {supervisor}) answers again: new associations are "
                           "admitted again", timeout=5)
        assert echo(agent.port())
        wait_for(lambda: agent.log().count(" to 127.0.0.1:") == 2)  # the relay's line comes after the release
        log = agent.log()
        assert len(pacs.associations) == 2
        # Counted in `status` as the associations the supervisor turns away itself.
        tunnels = agent_status(tmp_path / "agent", test_pki.env(**card.env()))["tunnels"]
        assert tunnels[0]["since_start"]["associations"]["turned_away"] == {"supervisor_silent": 1}
    assert 'event=sign-out' not in log  # the card stayed: the session goes on
    # The TLS session kept before the silence was forgotten: the card signed a new handshake.
    assert log.count(" full handshake to ") == 2 and " resumed to " not in log, log


def test_an_idle_agent_whose_supervisor_is_fine_keeps_its_lease(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    with signed_in_with_resumption(test_pki, tmp_path, fault_module) as (_, pacs, agent):
        time.sleep(3 * LEASE_SECONDS)  # signed in, no traffic
        assert echo(agent.port())
        log = agent.wait_for_log(" resumed to ")  # the TLS session was kept all along
        assert len(pacs.associations) == 2
    assert "has not answered" not in log and "answers again" not in log, log


def test_a_card_session_process_that_was_itself_stopped_admits_the_application_that_waited(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    """The card-session process, not the supervisor, stopped past the lease (in life: starved or
    swapped out) while an application connected: the supervisor's next lease comes within a second
    of the process reading its channel again, so the application is served, and the supervisor is
    not blamed. (It was refused with "the agent's supervisor ... has not answered for 8 s", and
    troubleshooting.md sent the admin to continue a supervisor that had run all along.)"""
    with signed_in_with_resumption(test_pki, tmp_path, fault_module) as (_, pacs, agent):
        worker = card_session_pid(agent.process.pid)
        assert worker is not None
        echoed: list[bool] = []
        with stopped(worker):
            application = threading.Thread(target=lambda: echoed.append(echo(agent.port())))
            application.start()
            time.sleep(PAST_THE_LEASE)
        application.join(20)
        log = agent.log()
    assert echoed == [True], log
    assert len(pacs.associations) == 2
    assert "has not answered" not in log, log


def test_status_of_a_suspended_agent_says_it_is_suspended_and_how_to_bring_it_back(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """A stopped agent's control socket still takes connections (the kernel queues them): `status`
    and `lock` waited 10 s, then said `no agent answers ... (timed out): is card-agent run ...
    running as this user?` of an agent that was running, suspended (Ctrl-Z, SIGSTOP)."""
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 104)]) as agent:
        agent.wait_for_log(SIGNED_IN)
        with stopped(agent.process.pid):
            asked = run_card_agent("status", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env())
    socket_path = tmp_path / "agent" / "run" / "control.sock"
    assert asked.returncode == 2, asked.stdout + asked.stderr
    assert asked.stderr == (
        f"card-agent: error: the agent on {socket_path} (pid {agent.process.pid}) is suspended and answers nothing "
        "until it is continued: it was stopped (Ctrl-Z in the terminal it runs in, or SIGSTOP); `fg` in that "
        f"terminal's shell, or `kill -CONT {agent.process.pid}`, brings it back\n")
