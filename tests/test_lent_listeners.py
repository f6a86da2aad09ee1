"""While a card is signed in, its card-session process accepts on the tunnels' listening sockets
itself (agent/tunnel/lent_listeners.py): the supervisor lends them and takes them back when the
session ends. Real agent, SoftHSM behind the fault module, a real TLS peer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from agent_runner import (
    FramedEchoServer,
    associate_rq,
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
from peers.pki_files import TlsServerFiles
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


class _HoldingPacs:
    """A TLS PACS that completes each handshake, notes when, and then holds the connection without
    a word for ``hold`` seconds (a PACS busy with a long association)."""

    def __init__(self, test_pki: ProvisionedPki, hold: float) -> None:
        self.context = TlsServerFiles.from_pki(test_pki.pki).ssl_context()
        self.hold = hold
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.handshakes: list[float] = []  # time.monotonic() of each completed handshake
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(raw,), daemon=True).start()

    def _answer(self, raw: socket.socket) -> None:
        try:
            with self.context.wrap_socket(raw, server_side=True):
                self.handshakes.append(time.monotonic())
                time.sleep(self.hold)
        except OSError:
            raw.close()

    def close(self) -> None:
        self.listener.close()


def test_connections_waiting_on_several_tunnels_at_once_are_all_served_at_once(test_pki: ProvisionedPki,
                                                                               tmp_path: Path) -> None:
    """Applications that connect to four tunnels while the card-session process is busy (stopped
    here) are all taken as soon as it runs again, each to its own PACS, though every PACS holds its
    association for 10 s. (One epoll wait used to return every listener ready at once, armed for no
    other thread: the thread served the first association to its end and the others waited behind
    it, 10 s each.)"""
    names = [f"pacs{index}" for index in range(4)]
    servers = {name: _HoldingPacs(test_pki, hold=10) for name in names}
    applications: list[socket.socket] = []
    try:
        with running_agent(test_pki, tmp_path / "agent",
                           [tunnel(name, servers[name].port) for name in names]) as agent:
            agent.wait_for_log(SIGNED_IN)
            session = card_session_pid(agent.process.pid)
            assert session is not None
            stop_process(session)
            try:
                for name in names:
                    application = socket.create_connection(("127.0.0.1", agent.port(name)), timeout=5)
                    application.sendall(associate_rq())
                    applications.append(application)
            finally:
                os.kill(session, signal.SIGCONT)
            resumed = time.monotonic()
            deadline = resumed + 8
            while time.monotonic() < deadline and not all(servers[name].handshakes for name in names):
                time.sleep(0.05)
            waited = {name: round(servers[name].handshakes[0] - resumed, 2) if servers[name].handshakes else None
                      for name in names}
    finally:
        for application in applications:
            application.close()
        for server in servers.values():
            server.close()
    assert all(seconds is not None and seconds < 3 for seconds in waited.values()), \
        f"seconds from the card session running again to each PACS's handshake: {waited}"


CLOSING_WHILE_STARTING = """
import threading
from dicom_card_agent.tunnel.lent_listeners import LentListeners
failures = 0
for _ in range(1000):
    lent = LentListeners({}, lambda kind, fields: None)
    starting = threading.Thread(target=lent.replace, args=({},))  # no thread yet: it starts one
    starting.start()
    try:
        lent.close()
    except RuntimeError:
        failures += 1
    starting.join()
print(failures)
"""


def test_closing_while_a_thread_is_being_started_ends_cleanly() -> None:
    """The card session's end closes the lent listeners while a thread that accepted a connection
    may be starting another to wait in its place. close() joined that thread before it had started
    (RuntimeError: cannot join thread before it is started), and the process ended on the traceback
    without telling its open associations (a reviewer, once in a swap storm; here a quarter of
    1,000 tries on the old code). Real threads, in a process of their own: each LentListeners keeps
    its epoll and wake-up pipe until its process ends, as the card session's does."""
    result = subprocess.run([sys.executable, "-c", CLOSING_WHILE_STARTING], capture_output=True, text=True,
                            timeout=300, check=True)
    failures = int(result.stdout)
    assert failures == 0, f"close() failed {failures} times in 1000"
