"""syslog-TLS delivery to an audit repository that works but reads slowly (tens of messages a
second, as one that parses each message into a database): every message arrives, within a bound.

The old sink gave each burst of up to 500 messages a fixed 5 s after its last send to be read up
to our close_notify; a repository reading 50 messages a second never managed it, so the same burst
went out again and again (a repository full of duplicates of the first 500, nothing ever leaving
the spool) and the log said "connected" / "did not confirm" at every round. The sink now waits as
long as the repository keeps taking bytes (SIOCOUTQ shrinking), and halves the burst after a
timeout for what it cannot watch (bytes the repository's kernel took but it has not read).

- ``slow_rsyslog``: the real rsyslog of tests/peers/rsyslog.py, its ruleset running each message
  through an ``omprog`` program that takes 20 ms before the ``omfile`` action (``queue.type="Direct"``:
  imtcp reads the connection no faster than that).
- ``BigBufferRepository``: a small Python TLS repository whose socket receive buffer holds a whole
  burst (``SO_RCVBUF`` 4 MiB), so its kernel acknowledges everything at once and only the burst's
  size can help. rsyslog cannot be given such a buffer (imtcp has no setting for it, and the
  system-wide ``tcp_rmem`` is not a test's to change), hence this peer.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import test_audit_syslog
from dicom_card_agent.audit.events import AuditEvent
from dicom_card_agent.audit.syslog import parse_message
from dicom_card_agent.audit.trail import AuditTrail
from peers.pki_files import TlsClientFiles, TlsServerFiles
from peers.ports import LOOPBACK, free_port
from peers.rsyslog import Rsyslog, rsyslog_tls
from test_audit_syslog import audit_config, reasons, wait_until

pki = test_audit_syslog.pki
client = test_audit_syslog.client

PADDING = "x" * 1500  # each message about 2 KB, as in the reviewer's reproduction

# omprog with confirmMessages: the program says OK once ready, then once per message it has handled.
SLOW_PROGRAM = """\
import sys, time
print("OK", flush=True)
for line in sys.stdin:
    time.sleep(float(sys.argv[1]))
    print("OK", flush=True)
"""


def padded(n: int) -> AuditEvent:
    return AuditEvent.application_stop(reason=f"event {n} {PADDING}")


def expected_reasons(count: int) -> set[str]:
    return {f"event {n} {PADDING}" for n in range(count)}


@contextlib.contextmanager
def slow_rsyslog(directory: Path, pki: Path, port: int, seconds_per_message: float) -> Iterator[Rsyslog]:
    """rsyslog (x509/certvalid) on ``port`` that handles one message per ``seconds_per_message``;
    not started."""
    with rsyslog_tls(directory, TlsServerFiles.from_pki(pki), auth_mode="x509/certvalid", port=port,
                     start=False) as repository:
        program = directory / "slow-reader.py"
        program.write_text(SLOW_PROGRAM)
        text = repository.config_path.read_text()
        slowed = text.replace('template(name="raw"', 'module(load="omprog")\ntemplate(name="raw"', 1).replace(
            '    action(type="omfile"',
            f'    action(type="omprog" binary="{sys.executable} {program} {seconds_per_message}" '
            'confirmMessages="on" template="raw")\n    action(type="omfile"', 1)
        assert slowed.count("omprog") == 2, text
        repository.config_path.write_text(slowed)
        yield repository


def spool_backlog(tmp_path: Path, pki: Path, client: TlsClientFiles, count: int) -> int:
    """``count`` messages left in the spool by a trail whose repository was not there; returns the
    port that repository is to listen on."""
    port = free_port()
    first = AuditTrail(audit_config(tmp_path, pki, client, port))
    for n in range(count):
        first.record(padded(n))
    first.close(timeout=0)
    assert len(list((tmp_path / "spool").glob("*.msg"))) == count
    return port


def audit_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "agent.audit" and r.levelno >= logging.WARNING]


def deliver_spool(tmp_path: Path, pki: Path, client: TlsClientFiles, port: int,
                  caplog: pytest.LogCaptureFixture) -> tuple[bool, dict, float]:
    """An audit trail started on the spool made by :func:`spool_backlog`, until the repository has
    every message (60 s at most): whether it has, the trail's status, the seconds it took; its log
    lines from then on are in ``caplog``."""
    caplog.clear()
    caplog.set_level(logging.INFO, logger="agent.audit")
    started = time.monotonic()
    with AuditTrail(audit_config(tmp_path, pki, client, port)) as trail:
        delivered = trail.wait_delivered(60)
        status = trail.status()
    return delivered, status, time.monotonic() - started


def test_a_slow_rsyslog_gets_every_message_and_the_spool_drains(tmp_path: Path, pki: Path, client: TlsClientFiles,
                                                                 caplog: pytest.LogCaptureFixture):
    """600 messages to an rsyslog handling 50 a second (12 s of its work). The old sink never had
    its first burst of 500 confirmed: `delivered` stayed 0."""
    count = 600
    port = spool_backlog(tmp_path, pki, client, count)
    with slow_rsyslog(tmp_path / "rsyslog", pki, port, 0.02) as repository:
        repository.start()
        delivered, status, elapsed = deliver_spool(tmp_path, pki, client, port, caplog)
        assert delivered, f"after 60 s: {status}, repository has {len(repository.raw_lines())} lines"
        assert status["delivered"] == count and status["pending"] == 0, status
        received = reasons(repository.wait_for_messages(count))
        assert set(received) == expected_reasons(count)  # each distinct message
        assert len(received) == count  # and only once: no burst had to be sent again
        assert not list((tmp_path / "spool").glob("*.msg"))
    assert audit_warnings(caplog) == []  # a slow repository is no outage
    print(f"{count} messages delivered to a 50 messages/s rsyslog in {elapsed:.1f} s; {len(received)} received")


class BigBufferRepository:
    """A syslog-TLS audit repository in Python (see the module doc for why not rsyslog): one
    connection at a time, as a single-threaded receiver; ``seconds_per_message`` for each message
    (octet-counted frames), then close_notify in answer to ours. Its receive buffer (4 MiB, the
    machine's ``rmem_max``) takes a whole burst: the agent sees every byte acknowledged at once."""

    def __init__(self, server: TlsServerFiles, port: int, seconds_per_message: float) -> None:
        self.context = server.ssl_context(require_client_cert=True)
        self.seconds_per_message = seconds_per_message
        self.received: list[bytes] = []
        self.connections = 0
        self._stop = threading.Event()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # inherited by accepted sockets
        self._listener.bind((LOOPBACK, port))
        self._listener.listen(8)
        self._listener.settimeout(0.2)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            try:
                raw.settimeout(30)
                with self.context.wrap_socket(raw, server_side=True) as sock:
                    self._read(sock)
            except (OSError, ssl.SSLError):
                pass
            finally:
                raw.close()

    def _read(self, sock: ssl.SSLSocket) -> None:
        buffer = b""
        while not self._stop.is_set():
            data = sock.recv(65536)
            if not data:  # the agent's close_notify, after everything it sent
                sock.unwrap()
                return
            buffer += data
            while b" " in buffer:
                length, _, rest = buffer.partition(b" ")
                if len(rest) < int(length):
                    break
                self.received.append(rest[:int(length)])
                buffer = rest[int(length):]
                time.sleep(self.seconds_per_message)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(35)


def test_a_repository_that_buffers_a_whole_burst_unread_gets_every_message(
        tmp_path: Path, pki: Path, client: TlsClientFiles, caplog: pytest.LogCaptureFixture):
    """300 messages at 25 ms each: the first burst (all 300) needs 7.5 s after its last byte was
    acknowledged, more than the 5 s the sink waits without progress; smaller bursts get through.
    The old sink sent the same 300 again and again, and logged every round."""
    count = 300
    port = spool_backlog(tmp_path, pki, client, count)
    repository = BigBufferRepository(TlsServerFiles.from_pki(pki), port, 0.025)
    try:
        delivered, status, elapsed = deliver_spool(tmp_path, pki, client, port, caplog)
        received = [parse_message(m) for m in repository.received]
        assert delivered, (f"after 60 s: {status}; the repository received {len(received)} messages "
                           f"({len(set(repository.received))} distinct) over {repository.connections} connections")
        assert status["delivered"] == count and status["pending"] == 0, status
        wait_until(lambda: len(set(repository.received)) >= count, 10, "every message read")
        assert set(reasons([parse_message(m) for m in repository.received])) == expected_reasons(count)
        assert not list((tmp_path / "spool").glob("*.msg"))
    finally:
        repository.close()
    warnings = audit_warnings(caplog)
    # One outage (the first burst not confirmed), logged once, and its end once.
    assert len(warnings) == 1 and "did not confirm 300 messages" in warnings[0], warnings
    assert sum("confirms messages again" in r.getMessage() for r in caplog.records) == 1
    print(f"{count} messages delivered in {elapsed:.1f} s over {repository.connections} connections; "
          f"{len(repository.received)} received")
