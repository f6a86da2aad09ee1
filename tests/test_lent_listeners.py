"""While a card is signed in, its card-session process accepts on the tunnels' listening sockets
itself (agent/tunnel/lent_listeners.py): the supervisor lends them and takes them back when the
session ends. Real agent, SoftHSM behind the fault module, a real TLS peer."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

from agent_runner import (
    FramedEchoServer,
    card_session_pid,
    dicom_stream,
    echoed,
    running_agent,
    send_and_close,
    signed_in_through_fault_module,
    stop_process,
    tunnel,
)
from conftest import ProvisionedPki
from dicom_card_agent.tunnel.relay import reject_pdu
from fault_pkcs11 import FaultControl
from peers.pynetdicom_scp import echo, tls_scp

SIGNED_IN = 'event=sign-in subject="CN=Alice Example'


def test_a_signed_in_session_serves_associations_while_the_supervisor_is_stopped(test_pki: ProvisionedPki,
                                                                                 tmp_path: Path) -> None:
    """Nothing of an association passes through the supervisor once the card is signed in: with the
    supervisor stopped (SIGSTOP, as a supervisor busy in a slow module call would be), a study still
    reaches the PACS byte for byte. (The old supervisor accepted every connection itself: the
    application waited for as long as it was stopped.)"""
    server = FramedEchoServer(test_pki)
    try:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("echo", server.port)]) as agent:
            agent.wait_for_log(SIGNED_IN)
            request = dicom_stream(b"while the supervisor sleeps" * 100)
            stop_process(agent.process.pid)
            try:
                answer = send_and_close(agent.port(), request)
            finally:
                os.kill(agent.process.pid, signal.SIGCONT)
    finally:
        server.close()
    assert echoed(answer) == request
    assert server.received == [request]


def test_the_supervisor_answers_again_once_the_card_is_pulled_and_lends_to_the_next_session(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    """Pulled: the card-session process and its copies of the sockets are gone, and the supervisor
    answers A-ASSOCIATE-RJ (transient) itself; re-inserted: the new session accepts again."""
    card = FaultControl(tmp_path / "reader.ctl")
    with signed_in_through_fault_module(test_pki, tmp_path / "agent", fault_module, card) as (agent, first):
        card.remove_card()
        agent.wait_for_log('event=sign-out reason="card removed"')
        assert not os.path.exists(f"/proc/{first}"), "the card-session process outlived its card"
        refused = send_and_close(agent.port())
        card.insert_card()
        deadline = time.monotonic() + 15
        while agent.log().count(SIGNED_IN) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        second = card_session_pid(agent.process.pid)
        served = echo(agent.port())
        log = agent.log()
    assert refused == reject_pdu(transient=True)
    assert "tunnel pacs: uid 0 pid" in log and "rejected: no card inserted" in log, log
    assert second is not None and second != first
    assert served and log.count(SIGNED_IN) == 2, log


def test_connections_on_lent_listeners_keep_an_idle_session_alive(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """idle_timeout = 2 s: associations every 0.5 s for 4 s keep the session (the card-session
    process tells the idle check when it last accepted a connection); then 2 s of nothing lock it."""
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)],
                           agent={"idle_timeout": 2}) as agent:
            agent.wait_for_log(SIGNED_IN)
            busy_until = time.monotonic() + 4
            while time.monotonic() < busy_until:
                assert echo(agent.port()), agent.log()
                time.sleep(0.5)
            kept = "event=sign-out" not in agent.log()
            agent.wait_for_log('event=sign-out reason="idle timeout"', timeout=10)
    assert kept, "the session was locked for idleness while associations came every 0.5 s"


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_an_application_that_holds_its_connection_does_not_hold_up_the_next_ones(test_pki: ProvisionedPki,
                                                                                tmp_path: Path) -> None:
    """The thread that accepts a connection serves it (agent/tunnel/lent_listeners.py), and first
    starts another to accept the next one when none waits. Connections that send nothing hold a
    thread each (up to the 30 s A-ASSOCIATE-RQ wait): associations opened meanwhile go through at
    once, and sequential associations do not add threads."""
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)]) as agent:
            agent.wait_for_log(SIGNED_IN)
            session = card_session_pid(agent.process.pid)
            assert session is not None
            silent = [socket.create_connection(("127.0.0.1", agent.port()), timeout=5) for _ in range(3)]
            try:
                started = time.monotonic()
                served = [echo(agent.port()) for _ in range(5)]
                took = time.monotonic() - started
            finally:
                for sock in silent:
                    sock.close()
            assert all(served), agent.log()
            before = _threads(session)
            for _ in range(20):
                assert echo(agent.port()), agent.log()
            after = _threads(session)
    assert took < 5, f"5 associations took {took:.1f} s while 3 connections sent nothing"
    assert after <= before, f"the card session went from {before} to {after} threads over 20 associations"
