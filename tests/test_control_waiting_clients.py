"""Clients of the control socket that connect and send nothing, or half a request: the agent read
one request at a time, each with 5 s to come whole, so that three such clients (a monitoring script
gone wrong, run by the clinician's own user) held `card-agent status` and `card-agent lock` (the
desktop's "Lock DICOM session") past the command's 10-s wait: "no agent answers". Real agent on
SoftHSM."""

from __future__ import annotations

import json
import os
import resource
import select
import socket
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from agent_runner import free_port, running_agent, tunnel
from conftest import ProvisionedPki, run_card_agent
from dicom_card_agent.session.control_server import _readable


def connected(stack: ExitStack, path: Path) -> socket.socket:
    client = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    client.settimeout(15)
    client.connect(str(path))
    return client


def answer_of(client: socket.socket) -> dict:
    return json.loads(client.makefile("rb").readline())


def test_clients_that_send_nothing_hold_neither_status_nor_lock(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", free_port())]) as agent:
        agent.wait_for_log('event=sign-in subject="CN=Alice Example')
        control = tmp_path / "agent" / "run" / "control.sock"
        config = tmp_path / "agent" / "agent.toml"
        with ExitStack() as stack:
            silent = [connected(stack, control) for _ in range(3)]
            slow = connected(stack, control)
            slow.sendall(b'{"command": "sta')
            time.sleep(0.5)  # all four accepted and waiting before the commands below connect
            started = time.monotonic()
            status = run_card_agent("status", "--config", config, env=test_pki.env())
            status_took = time.monotonic() - started
            slow.sendall(b'tus"}\n')
            slow_answer = answer_of(slow)
            late_answers = [answer_of(client) for client in silent]
            locked = run_card_agent("lock", "--config", config, env=test_pki.env())
    assert status.returncode == 0 and status.stdout.startswith("state:    signed in\n"), status.stdout + status.stderr
    assert status_took < 3, status_took  # its own start-up, not the waiting clients' 5 s each
    assert slow_answer["state"] == "signed in"  # a request that trickles in is still answered
    assert late_answers == [{"error": "bad request: no whole request within 5 s"}] * 3
    assert locked.returncode == 0 and locked.stdout.startswith("locked: "), locked.stdout + locked.stderr


def test_a_crowd_of_waiting_clients_costs_the_oldest_its_place(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", free_port())]) as agent:
        agent.wait_for_log('event=sign-in subject="CN=Alice Example')
        control = tmp_path / "agent" / "run" / "control.sock"
        with ExitStack() as stack:
            crowd = [connected(stack, control) for _ in range(20)]
            time.sleep(0.5)
            status = run_card_agent("status", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env())
            first = answer_of(crowd[0])
    assert status.returncode == 0, status.stdout + status.stderr
    assert first == {"error": "bad request: closed before it came whole, as the oldest of 16 connections waiting"}


def test_a_client_descriptor_above_1023_is_waited_on() -> None:
    """An agent under a raised LimitNOFILE may give a control client a descriptor select() refuses."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    high = 2000
    if hard != resource.RLIM_INFINITY and hard <= high:
        raise AssertionError(f"the hard descriptor limit ({hard}) leaves no descriptor {high} to test with")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, high + 1), hard))
    ours, theirs = socket.socketpair()
    try:
        os.dup2(ours.fileno(), high)
        theirs.sendall(b"{}\n")
        with pytest.raises(ValueError):  # what the control loop used, and why it no longer does
            select.select([high], [], [], 0)
        assert _readable([high], 1.0) == {high}
    finally:
        os.close(high)
        ours.close()
        theirs.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
