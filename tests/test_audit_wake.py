"""The audit repository sender leaves nothing unread behind it (agent/audit/sinks.py), against a
real rsyslog over TLS and over RELP (tests/peers/rsyslog.py).

Every sink was given a wake-up socket pair, written one byte per message, but only the RELP sender
ever read it: with transport = "tls" its bytes piled up in the kernel for the agent's whole life
(~768 bytes of kernel memory each), until the pair was full and every later write failed unseen.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import termios
from pathlib import Path

import pytest

from dicom_card_agent.audit.config import AuditConfig, SyslogConfig
from dicom_card_agent.audit.events import AuditEvent
from dicom_card_agent.audit.trail import AuditTrail
from peers.pki_files import TlsServerFiles
from peers.ports import LOOPBACK
from peers.rsyslog import Rsyslog, rsyslog_tls
from test_audit_syslog import pki  # noqa: F401 - a pytest fixture

MESSAGES = 300  # more than the ~278 one-byte writes a socket pair takes before it is full


def open_descriptors() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def unread_on_unix_streams(descriptors: set[int]) -> dict[int, int]:
    """Bytes waiting unread on each unix stream socket among ``descriptors`` (FIONREAD), if any."""
    unread = {}
    for fd in descriptors:
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:  # closed since it was listed
            continue
        with sock:
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                continue
            waiting = int.from_bytes(fcntl.ioctl(sock, termios.FIONREAD, bytes(4)), "little")
            if waiting:
                unread[fd] = waiting
    return unread


@pytest.fixture(params=["tls", "relp"])
def repository(request: pytest.FixtureRequest, pki: Path, tmp_path: Path):  # noqa: F811 - pki is a fixture
    with rsyslog_tls(tmp_path / "rsyslog", TlsServerFiles.from_pki(pki), protocol=request.param) as server:
        yield request.param, server


def test_every_message_delivered_leaves_no_wake_up_byte_unread(
        repository: tuple[str, Rsyslog], pki: Path, tmp_path: Path) -> None:  # noqa: F811 - pki is a fixture
    transport, server = repository
    config = AuditConfig(
        file=tmp_path / "audit.log", spool=tmp_path / "spool",
        syslog=SyslogConfig(host=LOOPBACK, port=server.port, ca=pki / "ca-bundle.pem", server_name="localhost",
                            retry_max=0.5, transport=transport),
        source_id="ws3")
    before = open_descriptors()
    with AuditTrail(config) as trail:
        the_trails = open_descriptors() - before
        for n in range(MESSAGES):
            assert trail.record(AuditEvent.application_stop(reason=f"event {n}"))
        assert trail.wait_delivered(60), trail.status()
        assert len(server.wait_for_messages(MESSAGES)) == MESSAGES
        unread = unread_on_unix_streams(the_trails)
    assert unread == {}, f"{transport}: bytes left unread on the audit trail's unix sockets: {unread}"
