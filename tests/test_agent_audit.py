"""The running agent's audit trail: card sign-in and removal, a refused local peer, a study stored
through a tunnel, a TLS failure, all as DICOM audit messages in the local file and at a real
rsyslog TLS audit repository."""

from __future__ import annotations

import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pydicom

from agent_runner import NOBODY, associate_rq, running_agent, s_server, send_and_close, tunnel
from conftest import ProvisionedPki, run_card_agent
from fault_pkcs11 import FaultControl
from peers.dcmtk import storescp, storescu
from peers.pki_files import TlsServerFiles
from peers.rsyslog import rsyslog_tls
from peers.study import make_study, sop_instance_uid
from test_tunnel_agent import NOBODY_CLIENT


def event_ids(messages: list[ET.Element]) -> list[str]:
    """(EventID code, EventTypeCode code or "") of each message, e.g. "110114/110122"."""
    ids = []
    for message in messages:
        identification = message.find("EventIdentification")
        event_type = identification.find("EventTypeCode")
        ids.append(identification.find("EventID").get("csd-code") + "/" +
                   (event_type.get("csd-code") if event_type is not None else ""))
    return ids


def test_a_clinician_day_in_the_audit_trail(test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    study = make_study(tmp_path / "study", files=3)
    audit_file = tmp_path / "audit" / "audit.log"
    with rsyslog_tls(tmp_path / "rsyslog", TlsServerFiles.from_pki(test_pki.pki)) as repository, \
            storescp(tmp_path / "received", tls=TlsServerFiles.from_pki(test_pki.pki), log_level="info") as pacs, \
            s_server(test_pki, tmp_path, "-naccept", "1", cert="untrusted-server-chain.pem",
                     key="untrusted-server.key") as (untrusted_port, _):
        audit = {"file": str(audit_file), "spool": str(tmp_path / "spool"),
                 "syslog": {"address": repository.address, "ca": str(test_pki.ca_bundle),
                            "server_name": "localhost"}}
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port), tunnel("rogue", untrusted_port)],
                           token="", module=str(fault_module), env=card.env(), audit=audit,
                           agent={"runtime_dir": str(tmp_path / "run")}) as agent:
            agent.wait_for_log("event=sign-in ")
            assert storescu(agent.port("pacs"), study).returncode == 0
            send_and_close(agent.port("rogue"), associate_rq())  # a server the agent does not trust
            subprocess.run([*NOBODY, NOBODY_CLIENT, str(agent.port("pacs")), associate_rq().hex()],
                           capture_output=True, timeout=30)
            agent.wait_for_log("refused local connection from uid 65534")
            # Delivery to the repository runs on its own: under load the last records may still be on
            # their way when the refusal is logged. `status` must come to say that none waits.
            waiting = f"audit:    to {audit_file} and {repository.address}, repository connected, 0 waiting"
            status = run_card_agent("status", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env())
            deadline = time.monotonic() + 10
            while waiting not in status.stdout and time.monotonic() < deadline:
                time.sleep(0.2)
                status = run_card_agent("status", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env())
            card.remove_card()
            agent.wait_for_log('event=sign-out reason="card removed"')
        # the agent has stopped: Application Stop is the last message
        local = [ET.fromstring(line) for line in audit_file.read_bytes().splitlines()]
        delivered = repository.wait_for_messages(len(local))
        tail = run_card_agent("audit", "tail", "--file", audit_file, env=test_pki.env())
    ids = event_ids(local)
    assert ids[0] == "110100/110120" and ids[-1] == "110100/110121"  # Application Activity start ... stop
    assert "110114/110122" in ids and "110114/110123" in ids  # User Authentication login, logout
    assert ids.count("110113/110126") == 1  # Security Alert: node authentication (the untrusted server)
    assert ids.count("110113/110132") == 1  # Security Alert: use of a restricted function (uid 65534)
    transferred = [m for m, i in zip(local, ids, strict=True) if i.startswith("110104/")]
    assert len(transferred) == 1
    sent = {sop_instance_uid(path) for path in study}
    xml = ET.tostring(transferred[0], encoding="unicode")
    assert all(uid in xml for uid in sent), xml
    assert "Alice Example" in xml and f"{pacs.port}" in xml
    first = pydicom.dcmread(study[0], stop_before_pixels=True)
    assert first.StudyInstanceUID in xml and first.PatientID in xml  # read from the data sets as they passed
    bom = "\ufeff".encode()
    assert all(m.msg.startswith(bom) and ET.fromstring(m.msg[len(bom):]).tag == "AuditMessage" for m in delivered)
    assert [ET.fromstring(m.msg[len(bom):]).find("EventIdentification/EventID").get("csd-code")
            for m in delivered] == [i.split("/")[0] for i in ids]  # the repository got them all, in order
    assert "Logout" in tail.stdout and "(card removed)" in tail.stdout, tail.stdout + tail.stderr
    assert f"3 instances of study {first.StudyInstanceUID}" in tail.stdout
    assert waiting in status.stdout, \
        status.stdout + status.stderr


# Three component groups, each within VR PN's 64 characters; in a report's JSON a kanji or kana
# takes six bytes (\\uXXXX).
JAPANESE_NAME = ("YAMADAYAMADAYAMADA^TAROUTAROUTAROU=" + "\u5c71\u7530" * 8 + "^" + "\u592a\u90ce" * 7 + "="
                 + "\u3084\u307e\u3060" * 4 + "^" + "\u305f\u308d\u3046" * 4)


def test_a_batch_of_long_names_reaches_the_audit_trail_and_so_does_what_follows(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """A report of 100 C-STOREs with 64-character UIDs and a Japanese patient name (each character
    six bytes in the report's JSON) is ~70 KB: over the 64 KiB the reports channel took, it ended the
    supervisor's report reader, and with it every later audit record of the card session, while
    the associations went on."""
    study = make_study(tmp_path / "study", files=100)
    for path in study:
        dataset = pydicom.dcmread(path)
        dataset.SpecificCharacterSet = "ISO_IR 192"
        dataset.PatientName = JAPANESE_NAME
        dataset.PatientID = "P" * 64
        dataset.save_as(path)
    audit_file = tmp_path / "audit" / "audit.log"
    with storescp(tmp_path / "received", tls=TlsServerFiles.from_pki(test_pki.pki)) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)],
                          audit={"file": str(audit_file)}) as agent:
        assert storescu(agent.port(), study).returncode == 0
        assert storescu(agent.port(), study[:1], calling_ae="SECOND").returncode == 0
        agent.wait_for_log("SECOND")
        log = agent.log()
    transferred = [ET.fromstring(line) for line in audit_file.read_bytes().splitlines()
                   if b'csd-code="110104"' in line]
    # The 100 instances come in one report, or in more when storing them took longer than a
    # report waits (transfers.FLUSH_AFTER: a busy machine); SECOND's single instance last.
    instances = [len(message.findall(".//Instance")) for message in transferred]
    assert "dropped" not in log, log
    assert sum(instances[:-1]) == 100 and instances[-1] == 1, instances
    assert "SECOND" in ET.tostring(transferred[-1], encoding="unicode")
    assert all("\u5c71\u7530" in ET.tostring(message, encoding="unicode") for message in transferred[:-1])
