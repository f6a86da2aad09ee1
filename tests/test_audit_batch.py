"""The records of one card-session report are written with one durable write per sink.

The supervisor wrote each audit record with its own fsyncs (the file's, the spool file's and the
spool directory's): ~0.5 ms a record on a quiet disk, several on a busy one. A card swapped while
applications have thousands of C-STOREs unanswered ends a card session that reports them all in
the END_GRACE_SECONDS it has (agent/session/worker.py), and the supervisor could not keep up: of
8,000 records about half were counted lost (tests/test_concurrent_reports.py). Now a report's
records (up to ~100, one a patient) go to the file with one write and one fsync, and to the spool as
one file each with one fsync of the directory for all (AuditTrail.record_all). The contract seen
from outside is the same: when a report has been handled, each of its records is on disk in both
sinks; a write the disk refuses half-way leaves no half line and no half spool entry, and each
record that could not be stored is counted and logged. (With a spool, each message still costs the
fsync of its own file. An ending card session no longer waits for the records to be written:
tests/test_report_backlog.py.)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ProvisionedPki
from dicom_card_agent.audit.config import AuditConfig, SyslogConfig
from dicom_card_agent.audit.events import AuditEvent, Instance, RemoteNode, User
from dicom_card_agent.audit.trail import AuditTrail
from dicom_card_agent.session.audit import AuditRecorder
from peers.ports import LOOPBACK, free_port
from test_audit_failure import fill, small_tmpfs

ALICE = User("CN=Alice Example,O=Example Hospital", "CN=Example Issuing CA", "alice", "8a3f0c1d")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PATIENTS = 100  # one report's worth: a relay reports its answered C-STOREs 100 at a time
BOM_AND_DECLARATION = "\ufeff".encode() + b'<?xml version="1.0" encoding="UTF-8"?>'


def transferred(count: int, tag: str = "PAT") -> list[AuditEvent]:
    """``count`` Instances Transferred records, a patient each, as one report makes them."""
    return [AuditEvent.instances_transferred(
        tunnel="pacs", remote=RemoteNode(LOOPBACK, 11112), calling_ae="STORESCU", called_ae="PACS", user=ALICE,
        patient_id=f"{tag}-{n}", patient_name=f"{tag}^{n}", instances=[Instance(CT_IMAGE_STORAGE, f"1.2.3.{n}", "1.9")])
        for n in range(count)]


def report_of(patients: int) -> dict[str, Any]:
    """The fields of an instances-transferred report (agent/tunnel/relay.py) of ``patients`` patients."""
    return {"tunnel": "pacs", "remote": f"{LOOPBACK}:11112", "calling_ae_title": "STORESCU",
            "called_ae_title": "PACS", "direction": "outbound",
            "local": "uid 1000 pid 4242 (storescu) from 127.0.0.1:53412",
            "instances": [{"patient_id": f"PAT-{n}", "patient_name": f"PAT^{n}", "sop_class_uid": CT_IMAGE_STORAGE,
                           "sop_instance_uid": f"1.2.3.{n}", "study_uid": "1.9", "status": 0}
                          for n in range(patients)]}


def with_unreachable_repository(directory: Path, test_pki: ProvisionedPki) -> AuditConfig:
    """A file and a spool; the repository's port has nobody listening: everything stays spooled."""
    return AuditConfig(file=directory / "audit" / "audit.log", spool=directory / "spool", source_id="ws3",
                       syslog=SyslogConfig(host=LOOPBACK, port=free_port(), ca=test_pki.ca_bundle,
                                           server_name="localhost", retry_max=60))


def patients(lines: list[bytes]) -> list[str]:
    """The patient ID each message names (ParticipantObjectID of its Patient)."""
    found = [re.search(rb'ParticipantObjectID="(PAT-\d+)"', line) for line in lines]
    return [match[1].decode() if match else "" for match in found]


def spooled_xml(spool: Path) -> list[bytes]:
    """The XML of each spooled message, in sequence order."""
    return [path.read_bytes().split(BOM_AND_DECLARATION, 1)[1] for path in sorted(spool.glob("*.msg"))]


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Every fsync's file descriptor. A spy, not a fake: each call goes on to the real os.fsync."""
    calls: list[int] = []
    real = os.fsync

    def counted(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counted)
    yield calls


def test_a_report_of_100_patients_is_on_disk_in_both_sinks_when_it_has_been_handled(
        test_pki: ProvisionedPki, tmp_path: Path, fsyncs: list[int]) -> None:
    recorder = AuditRecorder(with_unreachable_repository(tmp_path, test_pki))
    trail = recorder.trail
    assert trail is not None
    try:
        fsyncs.clear()
        recorder.session_report("instances-transferred", report_of(PATIENTS), user=ALICE)
        # Read as the report has been handled, before anything else: every record is in the file and
        # the spool, one spool entry a record, in order.
        lines = (tmp_path / "audit" / "audit.log").read_bytes().splitlines()
        waiting = spooled_xml(tmp_path / "spool")
        handled_with = len(fsyncs)
    finally:
        recorder.close()
    assert patients(lines) == [f"PAT-{n}" for n in range(PATIENTS)]
    assert waiting == lines
    assert not list((tmp_path / "spool").glob("*.tmp"))
    assert (trail.failures, trail.lost) == (0, 0)
    # One fsync of the file and one of the spool's directory for the report, and each spool file's
    # own: 102, where an fsync a record in each (and the directory's a record) made 300.
    assert handled_with == PATIENTS + 2, handled_with


def test_a_batch_the_full_disk_takes_part_of_leaves_whole_lines_and_counts_each_record_it_lost(
        test_pki: ProvisionedPki, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Real tmpfs file systems, nothing injected. The file's is full but for the rest of the page its
    first line began: the kernel writes part of the batch there (a short write) and refuses the rest
    (ENOSPC). The spool's has inodes left for 5 of the batch's 10 files."""
    with small_tmpfs(tmp_path / "file-disk", size="1m") as file_disk, \
            small_tmpfs(tmp_path / "spool-disk", size="4m") as spool_disk:
        subprocess.run(["mount", "-o", "remount,nr_inodes=64", str(spool_disk)], check=True)
        config = with_unreachable_repository(spool_disk, test_pki)
        config = dataclasses.replace(config, file=file_disk / "audit.log")
        trail = AuditTrail(config)
        try:
            assert trail.record(AuditEvent.user_login(ALICE))  # the first line: its page has room for more
            fill(file_disk)
            for n in range(os.statvfs(spool_disk).f_ffree - 5):  # inodes for 5 spool files, no more
                (spool_disk / f"inode-{n}").touch()
            with caplog.at_level(logging.ERROR, logger="agent.audit"):
                assert not trail.record_all(transferred(10))
            content = (file_disk / "audit.log").read_bytes()
            waiting = spooled_xml(spool_disk / "spool")
            temporaries = list((spool_disk / "spool").glob("*.tmp"))
            failures, lost = trail.failures, trail.lost
        finally:
            trail.close(0)
    assert content.endswith(b"\n")
    lines = content.splitlines()
    for line in lines:
        ET.fromstring(line)  # each line a whole message: no half line
    in_file = len(lines) - 1  # of the batch, after the Login
    assert 0 < in_file < 10, in_file  # some fitted in the page the Login began, and the rest did not
    assert patients(lines[1:]) == [f"PAT-{n}" for n in range(in_file)]
    assert patients(waiting[1:]) == [f"PAT-{n}" for n in range(5)] and not temporaries  # whole spool entries
    # Each record one sink or both could not store is counted once, and logged for each sink.
    assert (failures, lost) == (10 - min(in_file, 5), 10 - min(in_file, 5)), (failures, lost, in_file)
    errors = [r.getMessage() for r in caplog.records]
    assert sum("not in the local audit file" in e for e in errors) == 10 - in_file, errors
    assert sum("not queued for the audit repository" in e for e in errors) == 5, errors
