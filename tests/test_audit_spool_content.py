"""A spool file that holds no message the repository can take is set aside, never sent.

An empty message file (what a crash on a file system without data ordering, or a disk error, can
leave) used to go out over syslog-TLS as the frame ``0 ``, which RFC 5425 has no place for: rsyslog
read it as the start of the next message, stored the four records after it as one line, and the
agent counted them delivered (over RELP: an empty record). The same for a file without a syslog
header, and for a message longer than the repository takes (from an agent without today's size
limit). Here the spool holds one of each between ordinary records, and a real rsyslog, configured
as docs/audit.md says, must store exactly the ordinary ones, byte for byte, one a line.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conftest import ProvisionedPki
from dicom_card_agent.audit.config import AuditConfig, SyslogConfig
from dicom_card_agent.audit.events import AuditEvent, User
from dicom_card_agent.audit.syslog import frame
from dicom_card_agent.audit.trail import AuditTrail
from peers.pki_files import TlsServerFiles
from peers.ports import LOOPBACK
from peers.rsyslog import rsyslog_tls

ALICE = User("CN=Alice Example,O=Example Hospital", "CN=Example Issuing CA", "alice", "8a3f0c1d")


def config(tmp_path: Path, test_pki: ProvisionedPki, port: int, transport: str) -> AuditConfig:
    return AuditConfig(file=tmp_path / "audit.log", spool=tmp_path / "spool", source_id="ws3",
                       syslog=SyslogConfig(host=LOOPBACK, port=port, ca=test_pki.ca_bundle, server_name="localhost",
                                           retry_max=0.5, transport=transport))


def spooled(spool: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(spool.glob("*.msg"))}


@pytest.mark.parametrize("transport", ["tls", "relp"])
def test_a_spool_file_without_a_message_is_set_aside_and_the_others_arrive_one_a_line(
        test_pki: ProvisionedPki, tmp_path: Path, transport: str, caplog: pytest.LogCaptureFixture) -> None:
    spool = tmp_path / "spool"
    with rsyslog_tls(tmp_path / "rsyslog", TlsServerFiles.from_pki(test_pki.pki), protocol=transport,
                     start=False) as repository:
        trail = AuditTrail(config(tmp_path, test_pki, repository.port, transport))
        for n in range(6):
            trail.record(AuditEvent.user_login(ALICE, reason=f"login {n}"))
        trail.close(0.5)  # the repository is not started: all six wait in the spool
        waiting = spooled(spool)
        names = list(waiting)
        assert len(names) == 6
        (spool / names[1]).write_bytes(b"")  # emptied
        (spool / names[2]).write_bytes(b"login 2 without its syslog header")
        # Over the 64 KiB docs/audit.md bounds a message to (an earlier agent's), and over rsyslog's 256k.
        oversized = waiting[names[3]].replace(b"login 3", b"login 3 " + b"x" * 300_000)
        (spool / names[3]).write_bytes(oversized)
        repository.start()
        with caplog.at_level(logging.ERROR, logger="agent.audit"), \
                AuditTrail(config(tmp_path, test_pki, repository.port, transport)) as trail:
            assert trail.wait_delivered(20)
            delivered = trail.repository.delivered if trail.repository is not None else 0
        expected = [waiting[names[0]], waiting[names[4]], waiting[names[5]]]
        assert repository.raw_lines() == expected
    assert delivered == 3
    assert sorted(p.name for p in spool.glob("*.bad")) == [n.replace(".msg", ".bad") for n in names[1:4]]
    assert not list(spool.glob("*.msg"))
    problems = [r.getMessage() for r in caplog.records if "set aside as .bad" in r.getMessage()]
    assert [p.split(": ", 2)[2].split(";")[0] for p in problems] == [
        "it is empty",
        "it does not start with a syslog header (<PRI>1): b'login 2 without '",
        f"it has {len(oversized)} bytes, more than the 65536 of a message",
    ], problems


def test_an_empty_message_has_no_rfc_5425_frame() -> None:
    with pytest.raises(ValueError, match="empty"):
        frame(b"")
    assert frame(b"<85>1 x") == b"7 <85>1 x"
