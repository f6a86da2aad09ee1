"""Delivery that loses nothing: RELP (acknowledged) and syslog-TLS (confirmed by the end of the
connection) against a real rsyslog that is stopped (SIGSTOP), killed (SIGKILL) and restarted.

Every message recorded arrives (duplicates allowed: at least once); a message is recognised by
its ``[meta sequenceId]`` with HOSTNAME, TIMESTAMP and PROCID (docs/audit.md). The trail API is used where
the association is not the point; tests/test_audit_failure.py goes through a real agent.
"""

from __future__ import annotations

import resource
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest

import test_audit_syslog
from dicom_card_agent.audit.config import AuditConfig
from dicom_card_agent.audit.events import AuditEvent
from dicom_card_agent.audit.trail import AuditTrail
from peers.pki_files import TlsClientFiles, TlsServerFiles
from peers.rsyslog import Rsyslog, rsyslog_relp, rsyslog_tls
from test_audit_syslog import audit_config, reasons, wait_until

# the test PKI files and the agent's client identity, as tests/test_audit_syslog.py makes them
pki = test_audit_syslog.pki
client = test_audit_syslog.client

TRANSPORTS = ["relp", "tls"]


def config_for(transport: str, tmp_path: Path, pki: Path, client: TlsClientFiles | None, port: int) -> AuditConfig:
    config = audit_config(tmp_path, pki, client, port)
    assert config.syslog is not None
    if transport == "tls":
        return config  # the default
    return replace(config, syslog=replace(config.syslog, transport=transport))


def repository_for(transport: str, directory: Path, pki: Path, **options):
    opener = rsyslog_relp if transport == "relp" else rsyslog_tls
    return opener(directory, TlsServerFiles.from_pki(pki), auth_mode="x509/certvalid", **options)


def numbered(n: int, prefix: str = "event") -> AuditEvent:
    return AuditEvent.application_stop(reason=f"{prefix} {n}")


def received_ids(repository: Rsyslog) -> list[tuple[str, int | None]]:
    return [(m.procid, m.sequence_id) for m in repository.messages()]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_messages_arrive_in_order_with_their_sequence_ids(transport: str, tmp_path: Path, pki: Path,
                                                          client: TlsClientFiles):
    with repository_for(transport, tmp_path / "rsyslog", pki) as repository:
        with AuditTrail(config_for(transport, tmp_path, pki, client, repository.port)) as trail:
            for n in range(300):  # more than the RELP window of 128
                trail.record(numbered(n))
            assert trail.wait_delivered(30), trail.status()
            assert trail.status()["transport"] == transport and trail.status()["delivered"] == 300
        repository.wait_for_messages(300)
        time.sleep(0.3)  # anything extra (a duplicate) would have arrived by now on loopback
        assert reasons(repository.messages()) == [f"event {n}" for n in range(300)]
        assert [sequence for _, sequence in received_ids(repository)] == list(range(1, 301))
        assert not list((tmp_path / "spool").glob("*.msg"))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_repository_stopped_then_killed_then_restarted_loses_nothing(transport: str, tmp_path: Path, pki: Path,
                                                                     client: TlsClientFiles):
    """The issue's scenario: SIGSTOP the repository, record, SIGKILL it, restart it. The old
    syslog-TLS sink deleted each message once written to the connection: all 60 were lost."""
    with repository_for(transport, tmp_path / "rsyslog", pki) as repository:
        with AuditTrail(config_for(transport, tmp_path, pki, client, repository.port)) as trail:
            for n in range(3):
                trail.record(numbered(n))
            assert trail.wait_delivered(20), trail.status()
            repository.pause()
            for n in range(3, 63):
                trail.record(numbered(n))
                time.sleep(0.01)  # a trickle: the sender writes into the stopped repository's connection
            time.sleep(1.0)
            assert trail.pending() == 60, trail.status()  # nothing confirmed by a stopped repository
            repository.kill()
            wait_until(lambda: trail.status()["last_error"] != "", what="the lost connection noticed")
            assert trail.pending() == 60
            repository.start()
            assert trail.wait_delivered(60), trail.status()
        time.sleep(0.3)
        received = reasons(repository.messages())
        assert set(received) == {f"event {n}" for n in range(63)}  # every one, perhaps some twice
        ids = received_ids(repository)
        assert {sequence for _, sequence in ids} == set(range(1, 64))
        # a duplicate is the same message byte for byte, so the (PROCID, sequenceId) pair names it
        assert len(set(repository.raw_lines())) == len({(p, s) for p, s in ids})
        assert not list((tmp_path / "spool").glob("*.msg"))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_agent_restart_while_repository_stopped_loses_nothing(transport: str, tmp_path: Path, pki: Path,
                                                              client: TlsClientFiles):
    """Messages sent into a stopped repository and not confirmed stay in the spool; the next
    trail on that spool sends them once the repository is back."""
    with repository_for(transport, tmp_path / "rsyslog", pki) as repository:
        config = config_for(transport, tmp_path, pki, client, repository.port)
        first = AuditTrail(config)
        first.record(numbered(0))
        assert first.wait_delivered(20)
        repository.pause()
        for n in range(1, 11):
            first.record(numbered(n))
        time.sleep(0.5)
        first.close(timeout=0.5)
        assert len(list((tmp_path / "spool").glob("*.msg"))) == 10
        repository.kill()
        repository.start()
        with AuditTrail(config) as second:
            assert second.wait_delivered(30), second.status()
        time.sleep(0.3)
        assert set(reasons(repository.messages())) == {f"event {n}" for n in range(11)}


def test_relp_without_client_certificate_gets_nothing(tmp_path: Path, pki: Path):
    with repository_for("relp", tmp_path / "rsyslog", pki) as repository:
        with AuditTrail(config_for("relp", tmp_path, pki, None, repository.port)) as trail:
            trail.record(numbered(0))
            wait_until(lambda: trail.status()["last_error"] != "", what="a failed delivery")
            time.sleep(1.0)
            assert trail.pending() == 1 and trail.status()["delivered"] == 0, trail.status()
            trail.close(timeout=0.2)
        assert repository.raw_lines() == []


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_delivery_works_with_descriptors_above_1023(transport: str, tmp_path: Path, pki: Path,
                                                    client: TlsClientFiles):
    """select.select() cannot watch a descriptor above 1023 (FD_SETSIZE): the old sender took that
    for a closed connection and never delivered in a process with many files open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.fail(f"the open files hard limit ({hard}) is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    fillers: list[socket.socket] = []
    try:
        while not fillers or fillers[-1].fileno() < 1100:
            fillers.append(socket.socket())
        with repository_for(transport, tmp_path / "rsyslog", pki) as repository:
            with AuditTrail(config_for(transport, tmp_path, pki, client, repository.port)) as trail:
                for n in range(5):
                    trail.record(numbered(n))
                assert trail.wait_delivered(20), trail.status()
            repository.wait_for_messages(5)
            assert reasons(repository.messages()) == [f"event {n}" for n in range(5)]
    finally:
        for sock in fillers:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_repository_down_then_back_delivers_once_in_order(transport: str, tmp_path: Path, pki: Path,
                                                          client: TlsClientFiles):
    """A repository that is shut down normally (SIGTERM) and started again: nothing was in flight,
    so every message arrives exactly once, in order."""
    with repository_for(transport, tmp_path / "rsyslog", pki) as repository:
        with AuditTrail(config_for(transport, tmp_path, pki, client, repository.port)) as trail:
            for n in range(3):
                trail.record(numbered(n))
            assert trail.wait_delivered(20)
            repository.stop()
            for n in range(3, 23):
                trail.record(numbered(n))
            wait_until(lambda: "refused" in trail.status()["last_error"], what="connection refused seen")
            assert trail.pending() == 20
            repository.start()
            assert trail.wait_delivered(30), trail.status()
        repository.wait_for_messages(23)
        time.sleep(0.3)
        assert reasons(repository.messages()) == [f"event {n}" for n in range(23)]
