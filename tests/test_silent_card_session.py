"""A signed-in card-session process that runs no more (stopped with SIGSTOP here; in life a frozen
cgroup, or a process starved on a loaded machine) accepts nothing on the listeners the supervisor
lent it. Applications that connected meanwhile used to get no answer at all until it ran again (a
reviewer measured 40 s of nothing). Now the supervisor notices that the process has read nothing of
its channel for SILENT_CARD_SESSION_SECONDS, takes the listeners back and answers A-ASSOCIATE-RJ
(rejected-transient) itself, and lends them again once the process reads. The real agent on a
SoftHSM token, a pynetdicom TLS PACS."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

from agent_runner import (
    agent_status,
    associate_rq,
    card_session_pid,
    running_agent,
    stopped,
    tunnel,
)
from conftest import ProvisionedPki
from dicom_card_agent.dicom.pdu import parse_associate_rj
from dicom_card_agent.session.manager import SILENT_CARD_SESSION_SECONDS
from fault_pkcs11 import FaultControl
from peers.pynetdicom_scp import echo, tls_scp

SIGNED_IN = 'event=sign-in subject="CN=Alice Example'
SUBJECT = "CN=Alice Example,O=Example Hospital Test PKI"


def answer_within(port: int, seconds: float) -> tuple[bytes, float]:
    """An application's A-ASSOCIATE-RQ through ``port``: what it read to the end of the stream, and
    after how long; nothing (b"") when no answer came within ``seconds``."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as application:
        application.sendall(associate_rq())
        received = b""
        try:
            while chunk := application.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    return received, time.monotonic() - started


def test_a_stopped_card_session_has_its_applications_answered_and_serves_them_again_once_it_runs(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    with tls_scp(pki_dir=test_pki.pki) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)]) as agent:
        agent.wait_for_log(SIGNED_IN)
        assert echo(agent.port())
        worker = card_session_pid(agent.process.pid)
        assert worker is not None
        with stopped(worker):
            answer, answered_after = answer_within(agent.port(), SILENT_CARD_SESSION_SECONDS + 6)
            status = agent_status(tmp_path / "agent", test_pki.env())
            assert len(pacs.associations) == 1  # the PACS saw nothing of it
        assert answer[:1] == b"\x03", f"no A-ASSOCIATE-RJ within {answered_after:.1f} s: {answer[:16]!r}"
        log = agent.wait_for_log(f"card session of {SUBJECT}: its process (pid {worker}) reads again: new "
                                 "associations are admitted again")
        assert echo(agent.port())
        assert len(pacs.associations) == 2
        assert card_session_pid(agent.process.pid) == worker  # the same session: nothing was lost
    reject = parse_associate_rj(answer)
    assert reject.describe() == ("rejected-transient by DICOM UL service-provider (Presentation related function): "
                                 "temporary-congestion")
    # Answered once the silence was noticed (the loop looks each turn), not when the process ran again.
    assert answered_after < SILENT_CARD_SESSION_SECONDS + 3, f"answered after {answered_after:.1f} s"
    assert re.search(rf"card-agent: WARNING: card session of {re.escape(SUBJECT)}: its process \(pid {worker}\) "
                     r"has read nothing for \d+ s \(stopped or starved\): new associations are refused until it "
                     "does; open associations wait for it", log), log
    assert re.search(r"card-agent: WARNING: tunnel pacs: uid \d+ pid \S+ .*: rejected: the card session's process "
                     rf"\(pid {worker}\) has read nothing for \d+ s: new associations are refused until it does",
                     log), log
    assert status["state"] == "signed in" and status["card_session_answering"] is False
    assert status["tunnels"][0]["since_start"]["associations"]["turned_away"] == {"session_silent": 1}


def test_an_idle_card_session_that_reads_keeps_its_listeners(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """Signed in, no traffic: the process reads the lease every second and is never taken for a
    silent one."""
    with tls_scp(pki_dir=test_pki.pki) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)]) as agent:
        agent.wait_for_log(SIGNED_IN)
        time.sleep(SILENT_CARD_SESSION_SECONDS + 2)  # signed in and idle: it reads the lease every second
        assert echo(agent.port())
        log = agent.log()
    assert "has read nothing" not in log and "reads again" not in log, log


def test_a_slow_sign_in_is_not_taken_for_a_silent_card_session(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    """The card's C_Login took longer than SILENT_CARD_SESSION_SECONDS (a slow card, a PIN pad): the
    process read nothing meanwhile, as it should not, and what was sent as it signed in was counted
    from the moment the card was inserted (a reviewer: "has read nothing for 7 s" right after a 6 s
    login, and the listeners taken back)."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    card.login_delay(int((SILENT_CARD_SESSION_SECONDS + 1) * 1000))
    with tls_scp(pki_dir=test_pki.pki) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], module=str(fault_module),
                          env=card.env()) as agent:
        agent.wait_for_log(SIGNED_IN, timeout=SILENT_CARD_SESSION_SECONDS + 15)
        assert echo(agent.port())
        time.sleep(2)  # a few turns of the card loop, each looking at what the process has read
        log = agent.log()
    assert "has read nothing" not in log, log
