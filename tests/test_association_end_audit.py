"""The audit trail of an association the card session ends (lock, card pulled, idle timeout) while the
application holds it open and idle, as a viewer between studies does: its stored instances and its
Association End come before the Logout, and the session still ends at once."""

from __future__ import annotations

import socket
import xml.etree.ElementTree as ET
from pathlib import Path

from pydicom.uid import generate_uid

from agent_runner import running_agent, tunnel
from conftest import ProvisionedPki, run_card_agent
from dicom_card_agent.dicom.pdu import (
    A_ABORT,
    A_ASSOCIATE_AC,
    P_DATA_TF,
    AssociateRequest,
    MaximumLength,
    PresentationContextItemRQ,
    encode_associate_rq,
)
from peers.dcmtk import storescp
from peers.pki_files import TlsServerFiles
from test_association_audit_fidelity import CT_IMAGE_STORAGE, IMPLICIT_VR_LITTLE_ENDIAN, c_store, ct_instance, implicit
from test_tunnel_association import c_echo_rq_on, receive_pdu


def audit_events(audit_file: Path) -> list[tuple[str, str]]:
    """(what, EventOutcomeDescription) of each message in ``audit_file``: what is the event type's
    name (Association End, Logout), or the event's where it has no type."""
    events = []
    for line in audit_file.read_bytes().splitlines():
        identification = ET.fromstring(line).find("EventIdentification")
        assert identification is not None
        kind = identification.find("EventTypeCode")
        if kind is None:
            kind = identification.find("EventID")
        assert kind is not None
        events.append((kind.get("originalText", ""), identification.findtext("EventOutcomeDescription") or ""))
    return events


def c_echo_rq() -> bytes:
    return c_echo_rq_on(1)


def test_a_lock_while_the_viewer_idles_keeps_its_stored_instance_and_association_end_in_the_audit_trail(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The application stored an instance and keeps its association open without reading. At the
    lock the relay used to wait up to 2 s for it to close after the A-ABORT before it reported
    anything; the card-session process is ended 2 s after the lock (END_GRACE_SECONDS), so the
    trail had the Association Begin and then the Logout, and the sign-out took 2006 ms."""
    audit_file = tmp_path / "audit" / "audit.log"
    sop_instance_uid = generate_uid()
    request = encode_associate_rq(AssociateRequest(
        protocol_version=1, called_ae_title="STORESCP", calling_ae_title="VIEWER",
        application_context_name="1.2.840.10008.3.1.1.1",
        presentation_contexts=(PresentationContextItemRQ(1, CT_IMAGE_STORAGE, (IMPLICIT_VR_LITTLE_ENDIAN,)),),
        user_information=(MaximumLength(16384),)))
    with storescp(tmp_path / "received", tls=TlsServerFiles.from_pki(test_pki.pki)) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)],
                          audit={"file": str(audit_file)}) as agent:
        with socket.create_connection(("127.0.0.1", agent.port()), timeout=15) as viewer:
            viewer.sendall(request)
            assert receive_pdu(viewer)[0] == A_ASSOCIATE_AC
            viewer.sendall(c_store(1, sop_instance_uid, implicit(ct_instance("PID-42", sop_instance_uid,
                                                                             generate_uid()))))
            assert receive_pdu(viewer)[0] == P_DATA_TF  # the C-STORE-RSP: the PACS has the instance
            run_card_agent("lock", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env(), check=True)
            log = agent.wait_for_log('event=sign-out reason="locked"')
            # The viewer, back from its idle time, reads the A-ABORT and the end of the connection.
            pdu_type, _ = receive_pdu(viewer)
            assert pdu_type == A_ABORT and viewer.recv(1) == b""
    closed_in_ms = int(log.split('event=sign-out reason="locked"')[1].split("closed_in_ms=")[1].split()[0])
    assert closed_in_ms < 500, log
    events = audit_events(audit_file)
    begin = events.index(("Association Begin", ""))
    assert [what for what, _ in events[begin:begin + 4]] == [
        "Association Begin", "DICOM Instances Transferred", "Association End", "Logout"], events
    assert events[begin + 2] == ("Association End", "card session ended: locked")
