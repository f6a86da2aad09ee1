"""The audit trail against a real audit repository: rsyslog + gnutls on loopback (tests/peers/rsyslog.py).

Messages arrive over RFC 5425 TLS and parse (RFC 5424 header as IHE ATNA asks, the XML with the
right EventID); with the repository stopped, events wait in the spool and arrive after its
restart in order, exactly once; a new AuditTrail on the same spool delivers what an earlier one
left; an unreachable or silent repository never blocks ``record()``; a repository whose
certificate is not trusted, or that refuses our client certificate, gets nothing.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from cryptography.hazmat.primitives import serialization

from dicom_card_agent.audit.config import AuditConfig, SyslogConfig
from dicom_card_agent.audit.events import AlertType, AuditEvent, Instance, LocalPeer, RemoteNode, SessionEnd, User
from dicom_card_agent.audit.syslog import BOM, SyslogMessage
from dicom_card_agent.audit.trail import AuditTrail
from dicom_card_agent.softhsm import pki as test_ca
from peers.pki_files import TlsClientFiles, TlsServerFiles
from peers.ports import LOOPBACK, free_port
from peers.rsyslog import Rsyslog, rsyslog_tls

ALICE = User("CN=Alice Example,O=Example Hospital", "CN=Example Issuing CA", "alice", "8a3f0c1d")
PACS = RemoteNode("127.0.0.1", 11112)
CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The file layout of the test PKI's ``pki/`` (CA bundle, localhost server identities from the
    issuing CA and from an unrelated CA, the CA keys), made with the same CA code as
    ``card-agent softhsm init`` (softhsm.pki) but without tokens: the audit repository needs files only."""
    directory = tmp_path_factory.mktemp("audit-pki")
    root = test_ca.root_ca("Audit Test Root CA")
    issuing = root.issue_ca("Audit Test Issuing CA", years=10)
    untrusted = test_ca.root_ca("Untrusted Audit Test CA")
    server, server_key = issuing.issue_server(["localhost"], ["127.0.0.1", "::1"])
    other_server, other_key = untrusted.issue_server(["localhost"], ["127.0.0.1", "::1"])

    def pem(*certificates) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)

    def key(private_key) -> bytes:
        return private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())

    (directory / "private").mkdir()
    files = {
        "ca-bundle.pem": pem(root.certificate, issuing.certificate), "issuing-ca.pem": pem(issuing.certificate),
        "untrusted-ca.pem": pem(untrusted.certificate), "server-chain.pem": pem(server, issuing.certificate),
        "untrusted-server-chain.pem": pem(other_server, untrusted.certificate), "server.key": key(server_key),
        "untrusted-server.key": key(other_key), "private/issuing-ca.key": key(issuing.key),
        "private/untrusted-ca.key": key(untrusted.key),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


@pytest.fixture(scope="module")
def client(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> TlsClientFiles:
    """The agent's own client identity for the audit repository (a file key, not the card)."""
    return TlsClientFiles.issue(pki, tmp_path_factory.mktemp("audit-client"), "card-agent audit ws3")


@pytest.fixture
def repository(pki: Path, tmp_path: Path):
    """rsyslog requiring a client certificate from the test CA (x509/certvalid)."""
    with rsyslog_tls(tmp_path / "rsyslog", TlsServerFiles.from_pki(pki), auth_mode="x509/certvalid") as server:
        yield server


def audit_config(tmp_path: Path, pki: Path, client: TlsClientFiles | None, port: int, *,
                 server_name: str = "localhost") -> AuditConfig:
    return AuditConfig(
        file=tmp_path / "audit.log", spool=tmp_path / "spool",
        syslog=SyslogConfig(host=LOOPBACK, port=port, ca=pki / "ca-bundle.pem", server_name=server_name,
                            certificate=client.chain if client else None, key=client.key if client else None,
                            retry_max=0.5),
        source_id="ws3")


def wait_until(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met after {timeout} s")
        time.sleep(0.02)


def reasons(messages: list[SyslogMessage]) -> list[str]:
    return [ET.fromstring(m.xml).findtext("EventIdentification/EventOutcomeDescription") or "" for m in messages]


def numbered(n: int, prefix: str = "event") -> AuditEvent:
    return AuditEvent.application_stop(reason=f"{prefix} {n}")


def test_messages_arrive_and_parse(repository: Rsyslog, tmp_path: Path, pki: Path, client: TlsClientFiles):
    common = dict(tunnel="pacs", remote=PACS, calling_ae="STORESCU", called_ae="PACS",
                  local_peer=LocalPeer(uid=1000, pid=4242, process="storescu"), user=ALICE)
    events = [
        AuditEvent.application_start(),
        AuditEvent.user_login(ALICE),
        AuditEvent.association_begin(**common),
        AuditEvent.instances_transferred(instances=[Instance(CT, f"1.2.3.{n}", "1.2.3") for n in range(300)],
                                         **common),
        AuditEvent.association_end(bytes_up=10_000_000, bytes_down=4_000, **common),
        AuditEvent.security_alert(AlertType.TLS_VERIFICATION_FAILED, "certificate verify failed", remote=PACS),
        AuditEvent.user_logout(ALICE, SessionEnd.CARD_REMOVED),
        AuditEvent.application_stop(),
    ]
    expected = ["110100", "110114", "ASSOCIATION", "110104", "ASSOCIATION", "110113", "110114", "110100"]
    with AuditTrail(audit_config(tmp_path, pki, client, repository.port), hostname="ws3.hospital.example") as trail:
        for event in events:
            assert trail.record(event)
        assert trail.wait_delivered(20), trail.status()
        assert trail.status()["connected"] and trail.status()["delivered"] == len(events)
    received = repository.wait_for_messages(len(events))
    assert len(received) == len(events)
    for message, event, event_id in zip(received, events, expected, strict=True):
        assert message.pri == (84 if event_id == "110113" else 85)  # authpriv.warning / authpriv.notice
        assert (message.version, message.hostname, message.app_name) == (1, "ws3.hospital.example", "card-agent")
        assert message.msgid == "IHE+RFC-3881" and message.procid == str(event.agent_pid)
        assert message.msg.startswith(BOM + b"<?xml")
        root = ET.fromstring(message.xml)
        assert root.find("EventIdentification/EventID").get("csd-code") == event_id
        assert root.find("AuditSourceIdentification").get("AuditSourceID") == "ws3"
    large = ET.fromstring(received[3].xml)  # ~25 KB: more than rsyslog's default 8 KiB limit
    assert len(received[3].msg) > 8192
    assert len(large.findall(".//SOPClass/Instance")) == 300
    # the local file has the same messages, one per line
    assert [line for line in (tmp_path / "audit.log").read_bytes().splitlines()] == [m.xml[38:] for m in received]


def test_repository_down_then_back_every_message_arrives_once_in_order(
        repository: Rsyslog, tmp_path: Path, pki: Path, client: TlsClientFiles):
    with AuditTrail(audit_config(tmp_path, pki, client, repository.port)) as trail:
        for n in range(3):
            trail.record(numbered(n))
        assert trail.wait_delivered(20)
        repository.wait_for_messages(3)

        repository.stop()
        for n in range(3, 23):
            trail.record(numbered(n))
        # nothing can be delivered: the sender notices the closed connection and waits
        wait_until(lambda: "refused" in trail.status()["last_error"], what="connection refused seen")
        assert trail.pending() == 20 and not trail.status()["connected"]
        assert len(list((tmp_path / "spool").glob("*.msg"))) == 20

        repository.start()
        assert trail.wait_delivered(30), trail.status()
        trail.record(numbered(23))
        assert trail.wait_delivered(20)
    received = repository.wait_for_messages(24)
    time.sleep(0.3)  # anything extra (a duplicate) would have arrived by now on loopback
    assert reasons(repository.messages()) == [f"event {n}" for n in range(24)]
    assert not list((tmp_path / "spool").glob("*.msg"))
    assert len(received) == 24


def test_new_trail_delivers_what_an_earlier_one_left_in_the_spool(
        pki: Path, client: TlsClientFiles, tmp_path: Path):
    server = TlsServerFiles.from_pki(pki)
    with rsyslog_tls(tmp_path / "rsyslog", server, auth_mode="x509/certvalid", start=False) as repository:
        config = audit_config(tmp_path, pki, client, repository.port)
        first = AuditTrail(config)
        for n in range(5):
            first.record(numbered(n, "before restart"))
        first.close(timeout=0.5)  # the repository is down: the messages stay on disk
        assert len(list((tmp_path / "spool").glob("*.msg"))) == 5

        repository.start()
        with AuditTrail(config) as second:
            assert second.wait_delivered(30), second.status()
            second.record(numbered(5, "after restart"))
            assert second.wait_delivered(20)
        repository.wait_for_messages(6)
        time.sleep(0.3)
        assert reasons(repository.messages()) == [f"before restart {n}" for n in range(5)] + ["after restart 5"]
        # the local file got each event once, when it was recorded
        assert len((tmp_path / "audit.log").read_bytes().splitlines()) == 6


@pytest.mark.parametrize("peer", ["nothing listening", "accepts but never answers"])
def test_unreachable_repository_never_blocks_record(peer: str, pki: Path, client: TlsClientFiles, tmp_path: Path):
    silent = None
    port = free_port()
    if peer == "accepts but never answers":
        silent = socket.create_server((LOOPBACK, port))  # the TLS handshake never completes
    try:
        trail = AuditTrail(audit_config(tmp_path, pki, client, port))
        started = time.monotonic()
        for n in range(100):
            before = time.monotonic()
            trail.record(numbered(n))
            assert time.monotonic() - before < 1.0
        elapsed = time.monotonic() - started
        assert trail.pending() == 100
        assert elapsed < 10, f"100 records took {elapsed:.1f} s"
        close_started = time.monotonic()
        trail.close(timeout=0.5)
        # close waits its timeout, then cuts a connect or handshake in progress
        assert time.monotonic() - close_started < 0.5 + 2
        assert len(list((tmp_path / "spool").glob("*.msg"))) == 100
    finally:
        if silent is not None:
            silent.close()


def test_untrusted_repository_gets_nothing(pki: Path, client: TlsClientFiles, tmp_path: Path):
    """A repository whose certificate is not from the configured CA is never sent to."""
    untrusted = TlsServerFiles(pki / "untrusted-server.key", pki / "untrusted-server-chain.pem",
                               pki / "ca-bundle.pem")
    with rsyslog_tls(tmp_path / "rsyslog", untrusted, auth_mode="anon") as repository:
        with AuditTrail(audit_config(tmp_path, pki, client, repository.port)) as trail:
            trail.record(numbered(0))
            wait_until(lambda: "certificate" in trail.status()["last_error"], what="certificate refused")
            assert trail.pending() == 1
            trail.close(timeout=0.2)
        assert repository.raw_lines() == []


def test_wrong_server_name_gets_nothing(repository: Rsyslog, pki: Path, client: TlsClientFiles, tmp_path: Path):
    config = audit_config(tmp_path, pki, client, repository.port, server_name="audit.hospital.example")
    with AuditTrail(config) as trail:
        trail.record(numbered(0))
        wait_until(lambda: "certificate" in trail.status()["last_error"], what="host name mismatch seen")
        assert trail.pending() == 1
        trail.close(timeout=0.2)
    assert repository.raw_lines() == []


def test_repository_refusing_our_missing_client_certificate_loses_nothing(
        repository: Rsyslog, pki: Path, tmp_path: Path):
    """x509/certvalid without a client certificate: with TLS 1.3 the refusal comes after our
    handshake; the settle check must notice it before the message is written."""
    with AuditTrail(audit_config(tmp_path, pki, None, repository.port)) as trail:
        trail.record(numbered(0))
        wait_until(lambda: trail.status()["last_error"] != "", what="a failed delivery")
        time.sleep(1.0)  # several attempts
        assert trail.pending() == 1, trail.status()
        assert trail.status()["delivered"] == 0
        assert "client certificate" in trail.status()["last_error"]
        trail.close(timeout=0.2)
    assert repository.raw_lines() == []


def test_concurrent_records_arrive_complete(repository: Rsyslog, pki: Path, client: TlsClientFiles, tmp_path: Path):
    """The supervisor records from several threads: every message arrives whole, once."""
    with AuditTrail(audit_config(tmp_path, pki, client, repository.port)) as trail:
        def worker(name: str) -> None:
            for n in range(25):
                trail.record(numbered(n, name))
        threads = [threading.Thread(target=worker, args=(f"t{i}",)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert trail.wait_delivered(30)
    received = reasons(repository.wait_for_messages(100))
    assert sorted(received) == sorted(f"t{i} {n}" for i in range(4) for n in range(25))
    for i in range(4):  # each thread's events in its own order
        assert [r for r in received if r.startswith(f"t{i} ")] == [f"t{i} {n}" for n in range(25)]
