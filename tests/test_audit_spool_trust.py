"""Only the agent writes its audit spool (and the audit file's directory): another local user must not
get a record of theirs delivered to the audit repository as the agent's own.

The old spool took any existing directory (``mkdir(exist_ok=True)``, no owner or mode check) and
queued every ``NNNN.msg`` in it: uid 65534 could put a forged audit message into a 1777 spool and
the agent delivered it, or a symbolic link to a file only root can read, which the agent (root)
read and sent. Now a spool (or the directory of the audit file) that is not the agent's user's own
(or root's), or is writable by group or others, is refused at start-up (``card-agent run`` exits 2,
``card-agent check`` reports it), and a message file that is not a regular file of the agent's
user is set aside as ``.untrusted``, logged, never sent. The other user is real: uid 65534 through
``setpriv`` (tests/agent_runner.py ``NOBODY``).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

import test_audit_syslog
from agent_runner import NOBODY, tunnel, write_config
from conftest import ProvisionedPki, run_card_agent
from dicom_card_agent.audit.config import AuditConfig
from dicom_card_agent.audit.events import AuditEvent
from dicom_card_agent.audit.spool import Spool
from dicom_card_agent.audit.trail import AuditTrail
from dicom_card_agent.file_trust import UnsafeFileError
from peers.pki_files import TlsClientFiles, TlsServerFiles
from peers.ports import free_port
from peers.rsyslog import rsyslog_tls
from test_audit_syslog import audit_config, reasons
from test_file_trust import run_refused

pki = test_audit_syslog.pki
client = test_audit_syslog.client

OTHER_UID = 65534
SPOOL_RISK = "put messages there that the agent would send to the audit repository as its own records"
FORGED = (b"<85>1 2025-03-04T10:20:30.123Z ws3 card-agent 4242 IHE+RFC-3881 [meta sequenceId=\"1\"] "
          b"<AuditMessage>FORGED by uid 65534</AuditMessage>")


@pytest.fixture(autouse=True)
def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("another user (setpriv --reuid=65534) and giving files to it need root")


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every user may pass through, as /var/lib (pytest's tmp_path is root's alone)."""
    directory = Path(tempfile.mkdtemp(prefix="card-agent-audit-trust-", dir="/tmp"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def as_other_user(code: str) -> None:
    """Run Python ``code`` as uid 65534."""
    result = subprocess.run([*NOBODY, code], capture_output=True, text=True, cwd="/", timeout=30)
    assert result.returncode == 0, result.stderr


def open_spool(directory: Path) -> Path:
    """A spool directory as an administrator might have made it: anyone may write (1777)."""
    directory.mkdir()
    directory.chmod(0o1777)
    return directory


def plant(spool: Path, name: str, data: bytes = FORGED) -> Path:
    path = spool / name
    as_other_user(f"open({str(path)!r}, 'wb').write({data!r})")
    assert path.stat().st_uid == OTHER_UID
    return path


def test_run_refuses_a_spool_others_can_write(test_pki: ProvisionedPki, tmp_path: Path, base: Path) -> None:
    """The reviewer's case: a 1777 spool with a message of uid 65534 in it. The old agent started and
    queued the forged message for the repository."""
    spool = open_spool(base / "audit-spool")
    forged = plant(spool, "00000000000000000001.msg")
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)],
                          audit={"spool": str(spool), "syslog": {"address": f"127.0.0.1:{free_port()}",
                                                                 "ca": str(test_pki.ca_bundle)}})
    assert run_refused(test_pki, config) == (
        f"card-agent: error: refusing to use the audit spool {spool}: it belongs to uid 0 (root) with mode 1777; it "
        f"must belong to root and be writable by neither group nor others, or another user could {SPOOL_RISK}; run "
        f"`chmod go-w {spool}`, or set [audit] spool to a directory of the agent's own\n")
    assert sorted(p.name for p in spool.iterdir()) == [forged.name]  # nothing opened, locked or moved


@pytest.mark.parametrize("sink", ["spool", "file"])
def test_check_reports_a_directory_of_another_user(test_pki: ProvisionedPki, tmp_path: Path, base: Path,
                                                   sink: str) -> None:
    """``card-agent check`` says what ``run`` would refuse (the old one said "ok ... writable")."""
    directory = base / sink
    directory.mkdir(mode=0o700)
    os.chown(directory, OTHER_UID, OTHER_UID)  # e.g. made by a package for another service
    audit = ({"spool": str(directory), "syslog": {"address": f"127.0.0.1:{free_port()}",
                                                   "ca": str(test_pki.ca_bundle)}}
             if sink == "spool" else {"file": str(directory / "audit.log")})
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)], audit=audit)
    result = run_card_agent("check", "--config", config, env=test_pki.env(CARD_PIN="123456"))
    assert result.returncode == 2, result.stdout
    lines = result.stdout.splitlines()
    what, name = ("audit spool", "the audit spool") if sink == "spool" else (
        "audit file", "the directory of the audit file")
    line = next(line for line in lines if line.startswith(f"fail {what}:"))
    assert line.startswith(f"fail {what}: refusing to use {name} {directory}: it belongs to uid {OTHER_UID} "
                           f"(nobody) with mode 0700; it must belong to root"), line
    assert f"run `chown root {directory} && chmod 700 {directory}` as root" in line
    assert lines[lines.index(line) + 1].startswith("     fix: give the directory to the agent's user (or root)")


def test_a_spool_under_a_directory_others_can_write_is_refused(base: Path) -> None:
    """Whoever can write above the spool can rename it away and put one of theirs in its place."""
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    spool = shared / "spool"
    spool.mkdir(mode=0o700)
    with pytest.raises(UnsafeFileError) as refused:
        Spool(spool)
    assert str(refused.value) == (
        f"refusing to use the audit spool {spool}: the directory {shared} above it is writable by group and others "
        f"(mode 0777), so another user could {SPOOL_RISK}; run `chmod go-w {shared}`")


def test_an_audit_file_in_a_directory_others_can_write_is_refused(base: Path) -> None:
    """Whoever can write there can replace the audit file (or make it a link the agent appends through)."""
    logs = base / "logs"
    logs.mkdir()
    logs.chmod(0o777)
    with pytest.raises(UnsafeFileError) as refused:
        AuditTrail(AuditConfig(file=logs / "audit.log"))
    assert str(refused.value) == (
        f"refusing to use the directory of the audit file {logs}: it belongs to uid 0 (root) with mode 0777; it must "
        "belong to root and be writable by neither group nor others, or another user could replace the audit file, "
        f"or put another in its place before the agent creates it; run `chmod go-w {logs}`, or set [audit] file to "
        "a file in a directory of the agent's own")
    assert not (logs / "audit.log").exists()


def test_messages_another_user_put_in_the_spool_are_set_aside_not_delivered(
        base: Path, tmp_path: Path, pki: Path, client: TlsClientFiles, caplog: pytest.LogCaptureFixture) -> None:
    """The spool was 1777 for a while (then made safe, 0700): what uid 65534 left in it meanwhile, a
    forged message and a symbolic link to a file only root may read, must not reach the repository;
    the agent's own messages still do. The old spool delivered both (the secret read as root)."""
    spool = open_spool(base / "spool")
    secret = tmp_path / "secret"
    secret.write_bytes(b"SECRET only root may read")
    secret.chmod(0o600)
    plant(spool, "00000000000000000001.msg")
    link = spool / "00000000000000000002.msg"
    as_other_user(f"import os; os.symlink({str(secret)!r}, {str(link)!r})")
    spool.chmod(0o700)  # the administrator fixes the mode; the planted files are still there
    caplog.set_level(logging.INFO, logger="agent.audit")
    with rsyslog_tls(tmp_path / "rsyslog", TlsServerFiles.from_pki(pki), auth_mode="x509/certvalid") as repository:
        with AuditTrail(replace(audit_config(tmp_path, pki, client, repository.port), spool=spool)) as trail:
            for n in range(3):
                trail.record(AuditEvent.application_stop(reason=f"own {n}"))
            assert trail.wait_delivered(20), trail.status()
            assert trail.status()["delivered"] == 3
        lines = repository.raw_lines()
        assert not [line for line in lines if b"FORGED" in line or b"SECRET" in line], lines
        assert reasons(repository.wait_for_messages(3)) == [f"own {n}" for n in range(3)]
    assert sorted(p.name for p in spool.iterdir() if p.name != ".lock") == [
        "00000000000000000001.untrusted", "00000000000000000002.untrusted"]
    assert secret.read_bytes() == b"SECRET only root may read"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert sorted(errors) == [
        f"audit spool: {spool}/00000000000000000001.msg: it belongs to uid {OTHER_UID} (nobody), not to uid 0 (root), "
        f"which runs the agent; set aside as .untrusted, not sent: another user may have put it there (see who can "
        f"write to {spool})",
        f"audit spool: {spool}/00000000000000000002.msg: it is not a regular file; set aside as .untrusted, not sent: "
        f"another user may have put it there (see who can write to {spool})",
    ], errors


def test_a_planted_message_does_not_set_the_numbering(base: Path) -> None:
    """The next sequence number follows the highest on disk: a planted 99999999999999999999.msg
    made the old spool number the agent's own messages from 10**20 on, 21 digits, which the next
    start no longer recognised as messages (left undelivered for good)."""
    spool = open_spool(base / "spool")
    plant(spool, "99999999999999999999.msg")
    spool.chmod(0o700)
    queue = Spool(spool)
    try:
        assert len(queue) == 0
        assert queue.append(b"<85>1 own message") == 1
        assert queue.oldest() == (1, b"<85>1 own message")
    finally:
        queue.close()
    assert (spool / "99999999999999999999.untrusted").exists()


def test_a_file_another_user_swaps_in_while_the_agent_runs_is_not_sent(base: Path) -> None:
    """The directory made writable while the agent runs, and one of its messages replaced by
    another user's file: read with O_NOFOLLOW and checked by fstat, it is set aside."""
    spool = base / "spool"
    queue = Spool(spool)
    try:
        queue.append(b"<85>1 own message 1")
        queue.append(b"<85>1 own message 2")
        spool.chmod(0o777)  # someone loosens it later
        as_other_user(f"import os; p = {str(spool / '00000000000000000001.msg')!r}; os.unlink(p); "
                      f"open(p, 'wb').write({FORGED!r})")
        assert queue.after(0, 10) == [(2, b"<85>1 own message 2")]
        assert len(queue) == 1
    finally:
        queue.close()
    assert (spool / "00000000000000000001.untrusted").read_bytes() == FORGED


def test_missing_directories_are_made_private_whatever_the_umask(base: Path) -> None:
    """Under umask 002 ``mkdir -p`` would make group-writable parents, which the check then refused."""
    previous = os.umask(0o002)
    try:
        queue = Spool(base / "var" / "lib" / "spool")
        queue.close()
    finally:
        os.umask(previous)
    for directory in (base / "var", base / "var" / "lib", base / "var" / "lib" / "spool"):
        assert directory.stat().st_mode & 0o777 == 0o700, directory


def test_a_directory_renamed_from_above_does_not_take_the_audit_records_elsewhere(base: Path) -> None:
    """A reviewer's attack on the file sink's rotation handling: the audit file's own directory is
    private, but the one above is writable by others (checked for the spool, not for the file). Once
    the sink looked the file up by path before each record, uid 65534 renamed the directory away,
    made one of its own in its place and got the next records there (and deleted them), or planted a
    FIFO there, whose open blocked every record, and with the trail's lock `status` and `lock`. The
    sink holds the checked directory now and opens only a regular file of its user there."""
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    path = shared / "card-agent" / "audit.log"
    with AuditTrail(AuditConfig(file=path)) as trail:
        assert trail.record(AuditEvent.application_stop(reason="before"))
        as_other_user(f"import os; os.rename({str(path.parent)!r}, {str(shared / 'moved')!r}); "
                      f"os.mkdir({str(path.parent)!r}, 0o777); os.chmod({str(path.parent)!r}, 0o777); "
                      f"os.mkfifo({str(path)!r}, 0o666)")
        recorded: list[bool] = []
        writer = threading.Thread(target=lambda: recorded.append(trail.record(AuditEvent.application_stop(
            reason="after"))), daemon=True)
        writer.start()
        writer.join(5)
        blocked = writer.is_alive()
        if blocked:  # let the old sink's open of the FIFO return, or the trail never closes
            reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            writer.join(5)
            os.close(reader)
        assert not blocked, "the record did not finish within 5 s: the sink opened the FIFO planted at its path"
        assert recorded == [True] and trail.status()["lost"] == 0
    kept = (shared / "moved" / "audit.log").read_bytes().splitlines()
    assert [b"before" in kept[0], b"after" in kept[1]] == [True, True] and len(kept) == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["audit.log"] and not path.is_file()  # the FIFO only
