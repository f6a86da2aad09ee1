"""Reports that several associations of one card session send at the same moment all reach the
audit trail.

A report longer than one record of the reports channel (agent/session/channel.py PART, 60 KiB: 100
instances with long texts) goes as a header and several parts, each its own send; the relay
threads shared the channel without a lock, so two such reports sent at once interleaved. The
supervisor's report reader died on the JSON it could not parse, and nothing of the card session was
audited from then on, while its associations went on and `status` counted no failure (a reviewer).
Here four applications each pipeline 100 C-STOREs with 1,000-character patient names through the
real agent (SoftHSM) to a TLS PACS that does not answer them, and close together; a fifth
association follows."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from agent_runner import ANY_SOFTHSM_TOKEN, accept_for, agent_status, associate_rq, running_agent, tunnel, wait_for
from conftest import ProvisionedPki
from dicom_card_agent.dicom.pdu import (
    A_ASSOCIATE_AC,
    AssociateRequest,
    MaximumLength,
    PresentationContextItemRQ,
    encode_associate_rq,
)
from fault_pkcs11 import FaultControl
from test_association_audit_fidelity import CT_IMAGE_STORAGE, IMPLICIT_VR_LITTLE_ENDIAN, c_store, implicit
from test_report_size import accepting_pacs, associate, site
from test_tunnel_association import receive_pdu

SIGNED_IN = 'event=sign-in subject="CN=Alice Example'
APPLICATIONS, INSTANCES = 4, 100


def long_named_instance(application: int, index: int) -> tuple[str, bytes]:
    """A CT instance whose patient name and ID are 1,000 characters long: 100 of them make a report
    of over 60 KiB."""
    uid = f"1.2.826.0.1.3680043.9.8.{application}.{index}"
    dataset = Dataset()
    dataset.SOPClassUID, dataset.SOPInstanceUID = CT_IMAGE_STORAGE, uid
    dataset.PatientName = f"LONGNAME{application}^" + "X" * 1000
    dataset.PatientID = f"LONGID{application}-" + "9" * 1000
    dataset.StudyInstanceUID, dataset.Modality = f"{uid}.9", "CT"
    return uid, implicit(dataset)


def associated(port: int, calling_ae: str) -> socket.socket:
    application = socket.create_connection(("127.0.0.1", port), timeout=30)
    application.sendall(encode_associate_rq(AssociateRequest(
        protocol_version=1, called_ae_title="PACS", calling_ae_title=calling_ae,
        application_context_name="1.2.840.10008.3.1.1.1",
        presentation_contexts=(PresentationContextItemRQ(1, CT_IMAGE_STORAGE, (IMPLICIT_VR_LITTLE_ENDIAN,)),),
        user_information=(MaximumLength(16384),))))
    assert receive_pdu(application)[0] == A_ASSOCIATE_AC
    return application


class SilentPacs:
    """A TLS PACS (the test PKI's server certificate, the card's certificate required) that accepts
    each association and then reads everything without answering: the instances stay unanswered,
    so each association's report of them goes out as it ends."""

    def __init__(self, test_pki: ProvisionedPki) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(test_pki.pki / "server-chain.pem", test_pki.pki / "server.key")
        self.context.load_verify_locations(test_pki.ca_bundle)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = 0  # bytes after the A-ASSOCIATE-RQs, all connections together
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(raw,), daemon=True).start()

    def _read(self, raw: socket.socket) -> None:
        with contextlib.suppress(OSError), self.context.wrap_socket(raw, server_side=True) as tls:
            _, request = receive_pdu(tls)
            tls.sendall(accept_for(request))
            while chunk := tls.recv(65536):
                with self._lock:
                    self.received += len(chunk)

    def close(self) -> None:
        self.listener.close()


def association_ends(audit_file: Path) -> list[str]:
    return [line.decode() for line in audit_file.read_bytes().splitlines() if b"ASSOCIATION-END" in line]


def test_long_reports_sent_at_once_all_reach_the_audit_trail(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    audit_file = tmp_path / "audit" / "audit.log"
    pacs = SilentPacs(test_pki)
    try:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)],
                           audit={"file": str(audit_file)}) as agent:
            agent.wait_for_log(SIGNED_IN)
            applications = [associated(agent.port(), f"BULK{number}") for number in range(APPLICATIONS)]
            sent = 0
            for number, application in enumerate(applications):
                messages = b"".join(c_store(index + 1, *long_named_instance(number, index))
                                    for index in range(INSTANCES))
                application.sendall(messages)
                sent += len(messages)
            wait_for(lambda: pacs.received >= sent, timeout=30)  # every instance has passed the agent
            together = threading.Barrier(APPLICATIONS)

            def close(application: socket.socket) -> None:
                together.wait()
                application.close()  # each association's end reports its 100 unanswered instances

            threads = [threading.Thread(target=close, args=(application,)) for application in applications]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            wait_for(lambda: len(association_ends(audit_file)) >= APPLICATIONS, timeout=20)
            later = associated(agent.port(), "LATER")  # an ordinary association afterwards
            later.close()
            wait_for(lambda: "LATER" in "".join(association_ends(audit_file)), timeout=20)
            log = agent.log()
    finally:
        pacs.close()
    transferred = [line for line in audit_file.read_bytes().splitlines() if b'csd-code="110104"' in line]
    assert "Traceback" not in log, log
    assert len(association_ends(audit_file)) == APPLICATIONS + 1
    assert sum(line.count(b"<Instance UID=") for line in transferred) == APPLICATIONS * INSTANCES


# The card-session process of another build (or two of its reports interleaved): a record that is
# not a report comes before its association-begin. No card session of this build sends one.
GARBLED_BEFORE_BEGIN = '''
import sys
if sys.flags.safe_path:  # the card-session process (started with -P)
    from dicom_card_agent.session import channel
    _send = channel.send
    def send(to, message, fds=None):
        if message.get("kind") == "association-begin":
            to.sendall(b'{"kind": "association-begin", "fields": {"tun')
        return _send(to, message, fds)
    channel.send = send
'''


def test_a_report_that_cannot_be_read_is_counted_lost_and_the_next_ones_are_recorded(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The supervisor's report reader died on a record that was not JSON: every later record of the
    card session was lost, and `status` counted nothing."""
    audit_file = tmp_path / "audit" / "audit.log"
    with accepting_pacs(test_pki) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs)],
                          env=site(tmp_path, GARBLED_BEFORE_BEGIN), audit={"file": str(audit_file)}) as agent:
        agent.wait_for_log(SIGNED_IN)
        assert associate(agent.port(), associate_rq()) == A_ASSOCIATE_AC
        wait_for(lambda: len(association_ends(audit_file)) == 1, timeout=20)
        status = agent_status(tmp_path / "agent", test_pki.env())["audit"]
        log = agent.log()
    begins = [line for line in audit_file.read_bytes().splitlines() if b"ASSOCIATION-BEGIN" in line]
    assert len(begins) == 1  # the report after the garbled record was read and recorded
    assert (status["failures"], status["lost"]) == (1, 1), status
    assert re.search(r"card-agent: ERROR: audit: the card session's report unknown could not be recorded \(not "
                     r"readable: Unterminated string starting at: line 1 column \d+ \(char \d+\)\); what it said is "
                     "missing from the audit trail", log), log
    assert "Traceback" not in log, log


def instance_with_patient(message_id: int, uid: str, patient_id: str) -> bytes:
    """A C-STORE of a CT instance of its own patient: one audit record each."""
    dataset = Dataset()
    dataset.SOPClassUID, dataset.SOPInstanceUID = CT_IMAGE_STORAGE, uid
    dataset.PatientName, dataset.PatientID = "", patient_id
    dataset.StudyInstanceUID, dataset.Modality = "1.9", "CT"
    return c_store(message_id, uid, implicit(dataset))


def alice_swapped_with_reports_due(test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path,
                                   audit_config: dict[str, Any] | None = None, *, stop_after_swap: bool = False
                                   ) -> tuple[list[bytes], dict[str, Any], str]:
    """Two of alice's applications with 4,000 C-STOREs each (a patient each) unanswered at a PACS
    when her card is swapped for bob's; once the supervisor recorded all that reached it: the
    audit file's lines, `status`'s audit counts and the agent's log. ``audit_config``: [audit]
    settings besides the file. ``stop_after_swap``: the agent is stopped (SIGTERM) as soon as bob
    has signed in, and the counts are those of the log's last `status` (none: {})."""
    audit_file = tmp_path / "audit" / "audit.log"
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    pacs = SilentPacs(test_pki)
    try:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], token=ANY_SOFTHSM_TOKEN,
                           module=str(fault_module), env=card.env(),
                           audit={"file": str(audit_file), **(audit_config or {})}) as agent:
            agent.wait_for_log(SIGNED_IN)
            applications = [associated(agent.port(), f"ALICEAPP{number}") for number in range(2)]
            sent = 0
            for number, application in enumerate(applications):
                messages = b"".join(instance_with_patient(index + 1, f"1.{number}.{index}",
                                                          f"ALICEPAT-{number}-{index}") for index in range(4000))
                application.sendall(messages)
                sent += len(messages)
            wait_for(lambda: pacs.received >= sent, timeout=60)
            card.show("bob")
            agent.wait_for_log('event=sign-in subject="CN=Bob Example', timeout=60)
            audit: dict[str, Any] = {}
            if stop_after_swap:
                agent.process.send_signal(signal.SIGTERM)
                agent.process.wait(60)
            else:
                recorded = lambda: audit_file.read_bytes().count(b"ALICEPAT-")  # noqa: E731
                settled = -1
                while recorded() != settled:  # the supervisor records what reached it, after the Logout too
                    settled = recorded()
                    time.sleep(1.0)
                audit = agent_status(tmp_path / "agent", test_pki.env(**card.env()))["audit"]
            log = agent.log()
            for application in applications:
                application.close()
    finally:
        pacs.close()
    return audit_file.read_bytes().splitlines(), audit, log
