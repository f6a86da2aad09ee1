"""Rotating the local audit file with the real logrotate while the agent writes (docs/audit.md,
"Rotating the local file").

logrotate's ``create`` renames the file (and with ``compress`` gzips the renamed one and removes
it); the file sink held its descriptor open forever, so every later record went to the renamed
file, or with ``compress`` to a removed one: lost. The sink now checks before (and after) each
write that its path still names the file it holds, and opens the new one if not."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from agent_runner import pki_for_user, running_agent, tunnel, wait_for
from conftest import ProvisionedPki, run_card_agent
from dicom_card_agent.audit.config import AuditConfig
from dicom_card_agent.audit.events import AlertType, AuditEvent
from dicom_card_agent.audit.trail import AuditTrail
from peers.ports import free_port
from test_agent_audit import event_ids
from test_audit_spool_failure import USER, status_as

# (logrotate options, the name of the newest rotated file): the rotations docs/audit.md supports
ROTATIONS = {
    "create": ("create 0600\n    nocompress", "audit.log.1"),
    "create-compress": ("create 0600\n    compress", "audit.log.1.gz"),
    "create-delaycompress": ("create 0600\n    compress\n    delaycompress", "audit.log.1"),
    "rename-only": ("nocreate\n    nocompress", "audit.log.1"),  # the agent creates the new file itself
}


def logrotate_binary() -> str:
    found = shutil.which("logrotate")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("logrotate is missing (Debian package logrotate; scripts/setup installs it)")
        pytest.skip("logrotate is not installed")
    return found


def rotate(work: Path, audit_file: Path, options: str) -> None:
    """One forced rotation of ``audit_file`` by the real logrotate, with ``options``."""
    config = work / "logrotate.conf"
    config.write_text(f"{audit_file} {{\n    rotate 20\n    {options}\n    missingok\n}}\n")
    config.chmod(0o644)  # logrotate ignores a configuration others can write
    rotated = subprocess.run([logrotate_binary(), "--state", str(work / "logrotate.state"), "--force", str(config)],
                             capture_output=True, text=True, timeout=60)
    assert rotated.returncode == 0, rotated.stderr


def lines_of(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return (gzip.decompress(data) if path.suffix == ".gz" else data).splitlines()


def record_numbers(path: Path) -> list[int]:
    """The numbers of the test's records (``record N``) in one file of the trail, in file order."""
    numbers = []
    for line in lines_of(path):
        found = re.search(rb"<EventOutcomeDescription>record (\d+)</EventOutcomeDescription>", line)
        assert found, line
        numbers.append(int(found.group(1)))
    return numbers


def record(trail: AuditTrail, number: int) -> None:
    assert trail.record(AuditEvent.security_alert(AlertType.SOFTWARE_CONFIGURATION, f"record {number}"))


@pytest.mark.parametrize("rotation", sorted(ROTATIONS))
def test_each_record_is_in_the_file_of_its_time_after_rotations(rotation: str, tmp_path: Path) -> None:
    options, newest = ROTATIONS[rotation]
    audit_file = tmp_path / "log" / "audit.log"
    with AuditTrail(AuditConfig(file=audit_file)) as trail:
        for number in range(0, 3):
            record(trail, number)
        rotate(tmp_path, audit_file, options)
        for number in range(3, 6):
            record(trail, number)
        rotate(tmp_path, audit_file, options)
        for number in range(6, 9):
            record(trail, number)
    files = {path.name: record_numbers(path) for path in audit_file.parent.iterdir()}
    oldest = newest.replace(".1", ".2")
    if rotation == "create-delaycompress":
        oldest += ".gz"  # compressed at the second rotation
    assert files == {"audit.log": [6, 7, 8], newest: [3, 4, 5], oldest: [0, 1, 2]}, files
    assert all(path.stat().st_mode & 0o777 == 0o600 for path in audit_file.parent.iterdir())


def test_records_written_during_rotations_are_all_kept(tmp_path: Path) -> None:
    """A writer that does not pause while logrotate renames, compresses and removes the file five
    times: every record is in one of the files afterwards, in order within each file. A record
    written at the very moment of a rename may be in two files (docs/audit.md): never in none."""
    options, _ = ROTATIONS["create-compress"]
    audit_file = tmp_path / "log" / "audit.log"
    done = threading.Event()
    written: list[int] = []
    with AuditTrail(AuditConfig(file=audit_file)) as trail:

        def write() -> None:
            while not done.is_set():
                record(trail, len(written))
                written.append(len(written))

        writer = threading.Thread(target=write)
        writer.start()
        try:
            for _ in range(5):
                time.sleep(0.2)
                rotate(tmp_path, audit_file, options)
            time.sleep(0.2)
        finally:
            done.set()
            writer.join()
    files = {path.name: record_numbers(path) for path in audit_file.parent.iterdir()}
    assert sorted(files) == ["audit.log", *(f"audit.log.{n}.gz" for n in range(1, 6))], sorted(files)
    assert all(numbers == sorted(numbers) for numbers in files.values()), files
    everything = [number for numbers in files.values() for number in numbers]
    assert set(everything) == set(written), sorted(set(written) - set(everything))[:20]
    assert len(everything) - len(written) <= 5  # at most one record twice per rotation
    assert files["audit.log"] and files["audit.log"][-1] == written[-1]


def test_the_running_agent_writes_to_the_new_file_after_logrotate(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The real agent, rotated with ``create`` and ``compress``: the alert of a later SIGHUP reload is
    in the new audit.log and `card-agent audit tail` shows it (it showed nothing: the record went to
    the removed file)."""
    options, newest = ROTATIONS["create-compress"]
    audit_file = tmp_path / "log" / "audit.log"
    config = tmp_path / "agent" / "agent.toml"
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", free_port())],
                       audit={"file": str(audit_file)}) as agent:
        wait_for(lambda: b'csd-code="110122"' in audit_file.read_bytes())  # the sign-in's Login: the start is written
        started = audit_file.read_bytes()
        rotate(tmp_path, audit_file, options)
        agent.process.send_signal(signal.SIGHUP)  # recorded as a Software Configuration alert
        log = agent.wait_for_log("SIGHUP: configuration")
        deadline = time.monotonic() + 10  # the record may follow the log line by a moment
        tail = run_card_agent("audit", "tail", "--config", config, env=test_pki.env())
        while "Alert: Software Configuration" not in tail.stdout and time.monotonic() < deadline:
            time.sleep(0.2)
            tail = run_card_agent("audit", "tail", "--config", config, env=test_pki.env())
    assert "Alert: Software Configuration" in tail.stdout, tail.stdout + tail.stderr + log
    assert (f"INFO: audit: the audit file {audit_file} was renamed or removed (rotated); messages go to a new "
            "file there") in agent.log()
    rotated = event_ids([ET.fromstring(line) for line in lines_of(audit_file.parent / newest)])
    assert lines_of(audit_file.parent / newest) == started.splitlines(), rotated  # Application Start, Login
    current = event_ids([ET.fromstring(line) for line in lines_of(audit_file)])
    assert current[0] == "110113/110131" and current[-1] == "110100/110121", current  # the alert ... Application Stop


def test_a_new_file_the_agent_cannot_open_is_an_error_until_it_can(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """logrotate's ``create 0600 root root`` under an agent that runs as uid 65534: the agent cannot
    open the new file. That is an error naming the cause (and a lost event under "continue"), not
    a silent write elsewhere; once the file is the agent's, the next event goes there."""
    options = "create 0600 root root\n    nocompress"
    with pki_for_user(test_pki, USER) as (pki, work):
        audit_file, config = work / "log" / "audit.log", work / "agent" / "agent.toml"
        with running_agent(pki, work / "agent", [tunnel("pacs", free_port())], user=USER,
                           audit={"file": str(audit_file)}, agent={"runtime_dir": str(work / "runtime")}) as agent:
            wait_for(lambda: audit_file.exists() and b'csd-code="110122"' in audit_file.read_bytes())
            rotate(tmp_path, audit_file, options)
            agent.process.send_signal(signal.SIGHUP)
            log = agent.wait_for_log("event security-alert not in the local audit file")
            status = status_as(USER, pki, config).stdout
            os.chown(audit_file, USER, USER)  # what the administrator does
            agent.process.send_signal(signal.SIGHUP)
            wait_for(lambda: b'csd-code="110131"' in audit_file.read_bytes())
        current = event_ids([ET.fromstring(line) for line in lines_of(audit_file)])
    assert (f"ERROR: audit: the audit file {audit_file} was rotated and cannot be opened again: Permission denied; "
            "logrotate must leave the new file to the agent's user (`create 0600` without an owner, or `nocreate`), "
            "see docs/audit.md, \"Rotating the local file\"; event security-alert not in the local audit file") in log
    assert "  1 audit event could not be recorded since start (the log says which and why)" in status.splitlines()
    # the second reload's alert (the first is lost, and logged), then the agent's stop: Logout, Application Stop
    assert current == ["110113/110131", "110114/110123", "110100/110121"], current
