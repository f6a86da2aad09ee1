"""What the audit trail says an application stored, against what a real PACS (DCMTK storescp) did
with it, for data sets and message sequences that break the standard in ways a parser or a matcher
can read two ways."""

from __future__ import annotations

import socket
import struct
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid

from agent_runner import running_agent, tunnel
from conftest import ProvisionedPki
from dicom_card_agent.dicom.pdu import (
    A_ASSOCIATE_AC,
    P_DATA_TF,
    AssociateRequest,
    MaximumLength,
    PresentationContextItemRQ,
    a_release_rq,
    encode_associate_rq,
    read_command_fields,
)
from peers.dcmtk import DCMDUMP, storescp
from peers.pki_files import TlsServerFiles
from test_tunnel_association import receive_pdu

CT_IMAGE_STORAGE, IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2"


def implicit(dataset: Dataset) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, True
    write_dataset(out, dataset)
    return out.getvalue()


def ct_instance(patient_id: str, sop_instance_uid: str, study_uid: str) -> Dataset:
    dataset = Dataset()
    dataset.SOPClassUID, dataset.SOPInstanceUID = CT_IMAGE_STORAGE, sop_instance_uid
    dataset.PatientName, dataset.PatientID = "Doe^Jane", patient_id
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.Modality = study_uid, generate_uid(), "CT"
    return dataset


def c_store_rq(message_id: int, sop_instance_uid: str) -> bytes:
    command = Dataset()
    command.AffectedSOPClassUID, command.CommandField, command.MessageID = CT_IMAGE_STORAGE, 0x0001, message_id
    command.Priority, command.CommandDataSetType, command.AffectedSOPInstanceUID = 0, 0x0000, sop_instance_uid
    elements = implicit(command)
    return struct.pack("<HHIL", 0, 0, 4, len(elements)) + elements  # with its (0000,0000) group length


def pdu(context_id: int, control: int, fragment: bytes) -> bytes:
    return struct.pack(">BBLLBB", P_DATA_TF, 0, len(fragment) + 6, len(fragment) + 2, context_id, control) + fragment


def c_store(message_id: int, sop_instance_uid: str, data_set: bytes) -> bytes:
    return pdu(1, 0x03, c_store_rq(message_id, sop_instance_uid)) + pdu(1, 0x02, data_set)


def store_raw(port: int, messages: bytes, responses: int) -> list[tuple[int, str]]:
    """One association for CT Image Storage: ``messages`` in one write, then (Status, Affected SOP
    Instance UID) of each of ``responses`` C-STORE-RSPs, and a release."""
    request = encode_associate_rq(AssociateRequest(
        protocol_version=1, called_ae_title="STORESCP", calling_ae_title="MODALITY",
        application_context_name="1.2.840.10008.3.1.1.1",
        presentation_contexts=(PresentationContextItemRQ(1, CT_IMAGE_STORAGE, (IMPLICIT_VR_LITTLE_ENDIAN,)),),
        user_information=(MaximumLength(16384),)))
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=15) as application:
        application.sendall(request)
        assert receive_pdu(application)[0] == A_ASSOCIATE_AC
        application.sendall(messages)
        for _ in range(responses):
            pdu_type, response = receive_pdu(application)
            assert pdu_type == P_DATA_TF and response[11] & 0x03 == 0x03  # one whole command PDV
            fields = read_command_fields(response[12:])
            answers.append((fields.status, fields.affected_sop_instance_uid))
        application.sendall(a_release_rq())
        receive_pdu(application)
    return answers


def transferred(audit_file: Path) -> list[tuple[str, str]]:
    """(EventOutcomeIndicator, the message's XML) of each DICOM Instances Transferred message."""
    messages = [ET.fromstring(line) for line in audit_file.read_bytes().splitlines() if b'csd-code="110104"' in line]
    return [(m.find("EventIdentification").get("EventOutcomeIndicator"), ET.tostring(m, encoding="unicode"))
            for m in messages]


def test_a_data_set_with_its_patient_id_twice_is_not_audited_under_the_decoy(test_pki: ProvisionedPki,
                                                                             tmp_path: Path) -> None:
    """DCMTK keeps the first of a repeated attribute, pydicom (which reads the audit's patient) the
    last: the PACS stored REAL-PATIENT, the audit trail said DECOY-PATIENT."""
    sop_instance_uid, study_uid = generate_uid(), generate_uid()
    data_set = implicit(ct_instance("REAL-PATIENT", sop_instance_uid, study_uid))
    real = data_set.index(struct.pack("<HH", 0x0010, 0x0020))
    after_it = real + 8 + int.from_bytes(data_set[real + 4:real + 8], "little")
    decoy = Dataset()
    decoy.PatientID = "DECOY-PATIENT"
    data_set = data_set[:after_it] + implicit(decoy) + data_set[after_it:]
    audit_file = tmp_path / "audit" / "audit.log"
    with storescp(tmp_path / "received", tls=TlsServerFiles.from_pki(test_pki.pki)) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)],
                          audit={"file": str(audit_file)}) as agent:
        assert store_raw(agent.port(), c_store(1, sop_instance_uid, data_set), 1) == [(0x0000, sop_instance_uid)]
        agent.wait_for_log("1 of 1 instances stored")
        (stored,) = pacs.stored_files()
    assert stored.read_bytes().endswith(data_set)  # bit-preserving: as sent
    dump = subprocess.run([DCMDUMP, str(stored)], capture_output=True, text=True, timeout=30).stdout
    assert "(0010,0020) LO [REAL-PATIENT]" in dump  # what the PACS took the patient to be
    ((outcome, xml),) = transferred(audit_file)
    assert outcome == "0" and sop_instance_uid in xml
    assert "DECOY-PATIENT" not in xml and study_uid not in xml  # the data set names no patient or study
    assert 'ParticipantObjectTypeCodeRole="1"' in xml and 'ParticipantObjectID=""' in xml


def test_a_reused_message_id_is_answered_in_the_order_the_pacs_answers(test_pki: ProvisionedPki,
                                                                      tmp_path: Path) -> None:
    """Two C-STOREs written at once with Message ID 7: the first is refused (its data set is another
    instance than its command names; storescp without +B checks that), the second stored. The
    agent matched the newest request first and swapped them in the audit trail."""
    refused, stored = generate_uid(), generate_uid()
    other = implicit(ct_instance("PAT-A", generate_uid(), generate_uid()))
    matching = implicit(ct_instance("PAT-B", stored, generate_uid()))
    audit_file = tmp_path / "audit" / "audit.log"
    with storescp(tmp_path / "received", tls=TlsServerFiles.from_pki(test_pki.pki), extra_args=["-B"]) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)],
                          audit={"file": str(audit_file)}) as agent:
        answers = store_raw(agent.port(), c_store(7, refused, other) + c_store(7, stored, matching), 2)
        agent.wait_for_log("1 of 2 instances stored")
    assert [status for status, _ in answers][1] == 0x0000 and answers[0][0] != 0x0000, answers
    outcomes = {uid: outcome for outcome, xml in transferred(audit_file) for uid in (refused, stored) if uid in xml}
    assert outcomes == {refused: "4", stored: "0"}  # minor failure, success
