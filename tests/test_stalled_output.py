"""A standard error that takes nothing must not stop the agent: a terminal stopped with Ctrl-S (XOFF),
a pipe into a pager nobody scrolls, a journal stream nobody reads.

Every thread that logged used to wait for it, the card loop included: with Ctrl-S pressed at the
agent's terminal, a pulled card left its open association relaying until Ctrl-Q (measured: 45 s),
and new associations hung unanswered. The real agent on the fault module's card, a real
pseudo-terminal with the kernel's flow control, a real pipe and socket (agent/logline.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pynetdicom.sop_class import Verification

from agent_runner import refused_at_once, stop_agent, tunnel, wait_for, write_config
from conftest import CARD_AGENT, USER_PIN, ProvisionedPki, run_card_agent
from fault_pkcs11 import FaultControl
from peers.pynetdicom_scp import associate, tls_scp
from pin_dialog import Terminal, terminal  # noqa: F401 - a pytest fixture
from test_logline import one_page_pipe

SIGNED_IN = b"event=sign-in "


@contextmanager
def agent_writing_to(stderr: int, test_pki: ProvisionedPki, tmp_path: Path,
                     fault_module: Path) -> Iterator[tuple[subprocess.Popen, FaultControl, Path, int]]:
    """The agent signed in on alice's card (a stored PIN), its standard output and error ``stderr``,
    serving one tunnel to a TLS PACS; yields it, the card, its configuration and the tunnel's port."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        table = tunnel("pacs", pacs.port)
        config = write_config(tmp_path / "agent.toml", test_pki, [table], token="", module=str(fault_module),
                              identity={"pin": "env:CARD_PIN"})
        agent = subprocess.Popen([CARD_AGENT, "run", "--config", str(config)], stdin=subprocess.DEVNULL,
                                 stdout=stderr, stderr=stderr, env=test_pki.env(CARD_PIN=USER_PIN, **card.env()),
                                 start_new_session=True)
        try:
            yield agent, card, config, int(table["listen"].rsplit(":", 1)[1])
        finally:
            assert stop_agent(agent) == 0


def status_state(test_pki: ProvisionedPki, config: Path, card: FaultControl) -> str:
    """`card-agent status`'s state line; "" while the agent does not answer yet."""
    status = run_card_agent("status", "--config", config, env=test_pki.env(**card.env()))
    return next((line for line in status.stdout.splitlines() if line.startswith("state:")), "")


def test_a_card_pulled_while_ctrl_s_holds_the_terminal_ends_its_association_at_once(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, terminal: Terminal) -> None:
    """Ctrl-S at the agent's terminal, then the card pulled: the open association ends at once, a new
    one gets A-ASSOCIATE-RJ (no card), `status` says so; the log lines held back come with Ctrl-Q."""
    with agent_writing_to(terminal.slave, test_pki, tmp_path, fault_module) as (agent, card, config, port):
        wait_for(lambda: SIGNED_IN in terminal.screen, timeout=20)
        held = associate(port, sop_classes=[Verification])
        assert held.is_established
        wait_for(lambda: b"association PYNETDICOM-SCU -> ANY-SCP accepted" in terminal.screen, timeout=5)
        terminal.type(b"\x13")  # Ctrl-S: the terminal takes no more output
        time.sleep(0.2)
        shown = len(terminal.screen)
        card.remove_card()
        wait_for(lambda: not held.is_established, timeout=5)
        refused_at_once(port)  # A-ASSOCIATE-RJ as with no card, not a connection left hanging
        assert status_state(test_pki, config, card) == "state:    no card inserted"
        assert b"event=card-removed" not in terminal.screen[shown:]  # held back by the stopped terminal
        terminal.type(b"\x11")  # Ctrl-Q
        wait_for(lambda: b'event=sign-out reason="card removed"' in terminal.screen, timeout=5)
    assert b"event=card-removed" in terminal.screen[shown:]


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_a_standard_error_nobody_reads_does_not_stop_the_agent(test_pki: ProvisionedPki, tmp_path: Path,
                                                               fault_module: Path, kind: str) -> None:
    """`card-agent run 2>&1 | less` left unscrolled (a pipe), or a journal stream not read (a
    socket): once it is full, a pulled card still ends the association at once, and what the
    agent logged meanwhile is read afterwards, in order."""
    if kind == "pipe":
        reader, writer = one_page_pipe()
    else:
        ours, theirs = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        reader, writer = os.dup(ours.fileno()), os.dup(theirs.fileno())
        ours.close()
        theirs.close()
    try:
        with agent_writing_to(writer, test_pki, tmp_path, fault_module) as (agent, card, config, port):
            os.close(writer)
            writer = -1
            wait_for(lambda: status_state(test_pki, config, card) == "state:    signed in", timeout=20)
            held = associate(port, sop_classes=[Verification])
            assert held.is_established
            for _ in range(20):  # lines enough to fill it, whatever it took before
                associate(port).release()
            card.remove_card()
            started = time.monotonic()
            wait_for(lambda: not held.is_established, timeout=5)
            took = time.monotonic() - started
            assert status_state(test_pki, config, card) == "state:    no card inserted"
            output = b""
            os.set_blocking(reader, False)
            deadline = time.monotonic() + 10
            while b'event=sign-out reason="card removed"' not in output and time.monotonic() < deadline:
                try:
                    output += os.read(reader, 65536)
                except BlockingIOError:
                    time.sleep(0.05)
    finally:
        os.close(reader)
        if writer >= 0:
            os.close(writer)
    assert took < 5
    lines = output.decode().splitlines()
    assert any("event=card-removed" in line for line in lines), output
    removed = next(i for i, line in enumerate(lines) if "event=card-removed" in line)
    assert any('event=sign-out reason="card removed"' in line for line in lines[removed:]), output
