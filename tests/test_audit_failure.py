"""The audit trail of a real agent when the repository or the disk fails: nothing recorded is lost.

- The repository (RELP or syslog-TLS, real rsyslog) is stopped (SIGSTOP) while a study goes
  through the agent, then killed and restarted: every message of the local file arrives.
- The disk of the audit file and spool fills up (a real tmpfs) with ``[audit] on_failure =
  "refuse"``: associations are refused with the reason, events recorded meanwhile wait in memory,
  and once space returns the next association is accepted and every event is written and delivered.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_runner import inbound_listener, port_of, running_agent, tunnel, wait_for
from conftest import ProvisionedPki, run_card_agent
from fault_pkcs11 import FaultControl
from peers.dcmtk import storescp, storescu
from peers.pki_files import TlsServerFiles
from peers.rsyslog import rsyslog_relp, rsyslog_tls
from peers.study import assert_delivered, make_study
from test_agent_audit import event_ids
from test_inbound import node_identity, pacs_identity

BOM = "\ufeff".encode()


def audit_table(root: Path, repository_address: str, ca: Path, transport: str, **extra: object) -> dict:
    syslog = {"address": repository_address, "ca": str(ca), "server_name": "localhost", "retry_max": 0.5}
    if transport != "tls":  # the default
        syslog["transport"] = transport
    return {"file": str(root / "audit" / "audit.log"), "spool": str(root / "spool"), "syslog": syslog, **extra}


def local_messages(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def delivered_xml(repository) -> list[bytes]:
    return [m.msg[len(BOM) + len(b'<?xml version="1.0" encoding="UTF-8"?>'):] for m in repository.messages()]


def wait_for_count(agent, text: str, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while agent.log().count(text) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not {count} times in the agent's log:\n{agent.log()}")
        time.sleep(0.05)


@pytest.mark.parametrize("transport", ["relp", "tls"])
def test_repository_stopped_killed_restarted_during_a_study_loses_nothing(
        transport: str, test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    study = make_study(tmp_path / "study", files=5)
    opener = rsyslog_relp if transport == "relp" else rsyslog_tls
    with opener(tmp_path / "rsyslog", TlsServerFiles.from_pki(test_pki.pki)) as repository, \
            storescp(tmp_path / "received", tls=TlsServerFiles.from_pki(test_pki.pki)) as pacs:
        audit = audit_table(tmp_path, repository.address, test_pki.ca_bundle, transport)
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], token="",
                           module=str(fault_module), env=card.env(), audit=audit) as agent:
            agent.wait_for_log("event=sign-in ")
            repository.wait_for_messages(2)  # Application Start, Login
            repository.pause()
            sent = storescu(agent.port("pacs"), study)
            assert sent.returncode == 0, sent.stdout + agent.log()
            time.sleep(1.0)  # the sender writes the association's messages into the stopped repository
            waiting = sorted((tmp_path / "spool").glob("*.msg"))
            assert len(waiting) >= 3, waiting  # Association Begin, Instances Transferred, Association End
            repository.kill()
            repository.start()
            card.remove_card()
            agent.wait_for_log('event=sign-out reason="card removed"')
        local = local_messages(tmp_path / "audit" / "audit.log")
        repository.wait_for_messages(len(local), timeout=30)
        time.sleep(0.3)
        received = delivered_xml(repository)
        sequence_ids = {m.sequence_id for m in repository.messages()}
    assert set(received) == set(local)  # every message recorded arrived (some perhaps twice)
    assert sequence_ids == set(range(1, len(local) + 1))  # the ids the agent gave, each at least once
    ids = event_ids([ET.fromstring(line) for line in local])
    assert ids[0] == "110100/110120" and ids[-1] == "110100/110121" and "110104/" in ids
    assert not list((tmp_path / "spool").glob("*.msg"))


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("this test mounts a small tmpfs (a disk that fills up): run it as root, as CI does")
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full (ENOSPC); return it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk in (65536, 512):  # large chunks, then the last bytes until not even 512 fit
            _write_until_full(fd, chunk)
    finally:
        os.close(fd)
    return filler


def _write_until_full(fd: int, chunk: int) -> None:
    try:
        while True:
            os.write(fd, b"\0" * chunk)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise


def test_full_disk_with_refuse_refuses_associations_until_space_returns(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    study = make_study(tmp_path / "study", files=2)
    with small_tmpfs(tmp_path / "disk") as disk, \
            rsyslog_tls(tmp_path / "rsyslog", TlsServerFiles.from_pki(test_pki.pki)) as repository, \
            storescp(tmp_path / "received", tls=TlsServerFiles.from_pki(test_pki.pki)) as pacs:
        audit = audit_table(disk, repository.address, test_pki.ca_bundle, "tls", on_failure="refuse")
        audit_file = disk / "audit" / "audit.log"
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], token="",
                           module=str(fault_module), env=card.env(), audit=audit) as agent:
            agent.wait_for_log("event=sign-in ")
            # Delivered first: a spool file the repository confirmed after the fill would be removed,
            # and free the space the refusal below says there is not (4 KiB free, on a busy machine).
            wait_for(lambda: not list((disk / "spool").glob("*.msg")), timeout=30)
            filler = fill(disk)

            refused = storescu(agent.port("pacs"), study)  # the disk is full: refused before anything is lost
            assert refused.returncode != 0
            assert "Association Rejected" in refused.stdout and "Transient" in refused.stdout, refused.stdout
            log = agent.wait_for_log("rejected: the audit trail cannot be written")
            refusal = next(line for line in log.splitlines() if "rejected: the audit trail cannot be written" in line)
            assert ("rejected: the audit trail cannot be written "
                    f"(0 KiB free on the file system of {audit_file.parent}, "
                    "less than the 1024 KiB the audit trail keeps in reserve); [audit] on_failure = \"refuse\": "
                    "free space there, associations are accepted again as soon as the trail can be written"
                    ) in refusal, refusal

            card.remove_card()  # Logout, recorded while the disk is full: kept in memory
            agent.wait_for_log('event=sign-out reason="card removed"')
            card.insert_card()  # Login, too
            wait_for_count(agent, "event=sign-in ", 2)
            log = agent.wait_for_log("new associations are refused until it can be written again")
            # tmpfs may still fit a line into the audit file's last page; a new spool file never fits
            failed = re.search(r"ERROR: audit: (cannot write to the audit (?:file|spool) \S+: "
                               r"No space left on device); "
                               r"\[audit\] on_failure = \"refuse\": new associations are refused until it can be "
                               r"written again \(free space there\); events wait in memory meanwhile", log)
            assert failed, log
            refused = storescu(agent.port("pacs"), study)
            assert refused.returncode != 0 and "Association Rejected" in refused.stdout, refused.stdout
            # the reason is the failed write, or the free space (the sender's deletions may have made room for a moment)
            assert agent.log().count("rejected: the audit trail cannot be written (") == 2
            status = run_card_agent("status", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env())
            assert re.search(r", \d+ events? kept in memory: the audit trail cannot be written$", status.stdout,
                             re.M), status.stdout + status.stderr
            assert len(list((tmp_path / "received").rglob("*.dcm"))) == 0

            filler.unlink()  # space returns
            accepted = storescu(agent.port("pacs"), study)
            assert accepted.returncode == 0, accepted.stdout
            log = agent.wait_for_log("audit: the audit trail can be written again; associations are accepted again")
            assert log.count("audit: the audit trail can be written again") == 1
            assert re.search(r"audit: the audit (file|spool) takes messages again: \d+ events? written late", log)
            card.remove_card()
            wait_for_count(agent, 'event=sign-out reason="card removed"', 2)
        local = local_messages(audit_file)
        repository.wait_for_messages(len(local), timeout=30)
        received = delivered_xml(repository)
    ids = event_ids([ET.fromstring(line) for line in local])
    assert ids == ["110100/110120", "110114/110122", "110114/110123", "110114/110122",
                   "ASSOCIATION/ASSOCIATION-BEGIN", "110104/", "ASSOCIATION/ASSOCIATION-END",
                   "110114/110123", "110100/110121"], ids
    assert received == local  # every event delivered, in order, once


def test_full_disk_with_refuse_turns_the_pacs_away_at_an_inbound_listener(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """A C-MOVE delivery would be audited too: while the trail cannot be written the PACS's
    connection is closed (no TLS without the card session's answer, so no DICOM answer either)."""
    study = make_study(tmp_path / "study", files=1)
    with small_tmpfs(tmp_path / "disk") as disk, storescp(tmp_path / "viewer", tls=None) as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", client_names=["localhost"],
                                    **node_identity(test_pki))
        audit = {"file": str(disk / "audit.log"), "on_failure": "refuse"}
        with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener], audit=audit) as agent:
            filler = fill(disk)
            refused = storescu(port_of(listener), study, tls=pacs_identity(test_pki), calling_ae="PACS")
            log = agent.wait_for_log("turned away: the audit trail cannot be written")
            assert refused.returncode != 0 and not viewer.stored_files()
            assert re.search(r"inbound retrieves: PACS at 127\.0\.0\.1:\d+ turned away: the audit trail cannot be "
                             rf"written \(0 KiB free on the file system of {re.escape(str(disk))}, less than the "
                             r"1024 KiB the audit trail keeps in reserve\); \[audit\] on_failure = \"refuse\"",
                             log), log
            filler.unlink()
            accepted = storescu(port_of(listener), study, tls=pacs_identity(test_pki), calling_ae="PACS")
            agent.wait_for_log("instances stored", timeout=40)
            assert accepted.returncode == 0, accepted.stdout
        assert_delivered(study, viewer.stored_files())
