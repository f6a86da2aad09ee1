"""A card session's reports for the audit trail fit the channel to the supervisor, and a report that
does not all the same is an audit failure (docs/audit.md, "Size limits").

The supervisor reads reports of at most channel.MAX_REPORT (16 MiB). Their texts are escaped in
JSON: a control character takes 6 bytes, one outside the BMP 12. A local application's
A-ASSOCIATE-RQ of 1 MiB whose 128 abstract syntaxes are control characters (the PACS accepts them
all) made every report of its association 6.3 MB, and a batch of 100 C-STOREs with 65,000-character
UIDs of control characters (and patient names and IDs of emoji) ~10.6 MB: under 16 MiB, but a report
over it was dropped by the supervisor with all it said of the association, and was counted nowhere.
Here a real agent on SoftHSM relays such an association between a hand-made application and a
hand-made TLS PACS (DCMTK and pynetdicom refuse to send or accept such values).

Faults no real part can produce are injected by a sitecustomize module in the agent's processes
(as tests/test_upgrade_while_running.py does): a smaller channel limit, so that the reports of
this build's relay must be made to fit; a card session of another build, whose report is larger
than the supervisor takes.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import struct
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_runner import accept_for, agent_status, associate_rq, log_lines, running_agent, tunnel
from conftest import ProvisionedPki
from dicom_card_agent.audit.config import AuditConfig
from dicom_card_agent.dicom.pdu import (
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    P_DATA_TF,
    CommandFields,
    a_release_rq,
    read_command_fields,
)
from dicom_card_agent.session import channel
from dicom_card_agent.session.audit import AuditRecorder
from dicom_card_agent.session.channel import MAX_REPORT
from test_tunnel_association import receive_pdu

CONTROL = bytes(c for c in range(1, 32) if c not in b"\b\t\n\f\r")  # six bytes each in JSON
EMOJI = "\U0001f600" * 1100  # twelve bytes each in JSON (a surrogate pair)
UID_LENGTH = 65_000
INSTANCES = 100
A_RELEASE_RP_PDU = bytes.fromhex("06000000000400000000")


def control_text(length: int, tag: str) -> bytes:
    """``length`` bytes: ``tag`` and control characters."""
    text = tag.encode() + b"."
    return text + (CONTROL * (length // len(CONTROL) + 1))[:length - len(text)]


def item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def widest_rq(contexts: int = 128, abstract_length: int = 8150) -> bytes:
    """An A-ASSOCIATE-RQ just under the relay's 1 MiB, nearly all of it abstract syntaxes of control characters."""
    body = struct.pack(">HH", 1, 0) + b"PACS".ljust(16) + b"MODALITY".ljust(16) + bytes(32)
    body += item(0x10, b"1.2.840.10008.3.1.1.1")
    for n in range(contexts):
        body += item(0x20, bytes([2 * n + 1, 0, 0, 0]) + item(0x30, control_text(abstract_length, f"{n:03d}"))
                     + item(0x40, b"1.2.840.10008.1.2"))
    body += item(0x50, item(0x51, struct.pack(">L", 16384)))
    assert len(body) <= 1 << 20
    return struct.pack(">BBL", 1, 0, len(body)) + body


def element(group: int, number: int, value: bytes) -> bytes:
    """A data element, Implicit VR Little Endian."""
    return struct.pack("<HHI", group, number, len(value) + len(value) % 2) + value + b"\0" * (len(value) % 2)


def command_set(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return element(0, 0, struct.pack("<I", len(body))) + body


def us(value: int) -> bytes:
    return struct.pack("<H", value)


def c_store_rq(message_id: int, sop_class_uid: bytes, sop_instance_uid: bytes) -> bytes:
    return command_set(element(0, 0x0002, sop_class_uid), element(0, 0x0100, us(0x0001)),
                       element(0, 0x0110, us(message_id)), element(0, 0x0700, us(0)), element(0, 0x0800, us(0)),
                       element(0, 0x1000, sop_instance_uid))


def c_store_rsp(request: CommandFields) -> bytes:
    """Success, with the request's UIDs (as long as they came)."""
    return command_set(element(0, 0x0002, request.affected_sop_class_uid.encode()), element(0, 0x0100, us(0x8001)),
                       element(0, 0x0120, us(request.message_id or 0)), element(0, 0x0800, us(0x0101)),
                       element(0, 0x0900, us(0)), element(0, 0x1000, request.affected_sop_instance_uid.encode()))


def data_set(n: int) -> bytes:
    """UTF-8 patient name and ID of emoji, a study UID of control characters."""
    return (element(0x0008, 0x0005, b"ISO_IR 192") + element(0x0008, 0x0016, b"1.2.840.10008.5.1.4.1.1.2")
            + element(0x0008, 0x0018, f"1.2.3.{n}".encode()) + element(0x0010, 0x0010, (EMOJI + str(n)).encode())
            + element(0x0010, 0x0020, (EMOJI + str(n)).encode()) + element(0x0020, 0x000D, control_text(1100, "s")))


def p_data(data: bytes, *, command: bool, fragment: int = 16000) -> bytes:
    """``data`` in P-DATA-TF PDUs of one PDV each, on presentation context 1."""
    out = b""
    for offset in range(0, len(data), fragment):
        piece = data[offset:offset + fragment]
        control = (1 if command else 0) | (2 if offset + fragment >= len(data) else 0)
        pdv = struct.pack(">LBB", len(piece) + 2, 1, control) + piece
        out += struct.pack(">BBL", P_DATA_TF, 0, len(pdv)) + pdv
    return out


def read_message(sock: socket.socket) -> CommandFields:
    """The command of the next DIMSE message (its data set read and dropped); EOFError at another PDU."""
    command = b""
    while True:
        pdu_type, pdu = receive_pdu(sock)
        if pdu_type != P_DATA_TF:
            raise EOFError(pdu_type)
        offset = 6
        while offset < len(pdu):
            length = struct.unpack(">L", pdu[offset:offset + 4])[0]
            control, value = pdu[offset + 5], pdu[offset + 6:offset + 4 + length]
            offset += 4 + length
            if control & 1:
                command += value
            if control & 2 and (not control & 1 or not read_command_fields(command).has_data_set):
                return read_command_fields(command)


@contextlib.contextmanager
def accepting_pacs(test_pki: ProvisionedPki) -> Iterator[int]:
    """A TLS "PACS" that accepts every presentation context and stores every instance (Success,
    echoing the request's UIDs); yields its port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(test_pki.pki / "server-chain.pem", test_pki.pki / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(raw, server_side=True) as tls:
                    tls.settimeout(30)
                    tls.sendall(accept_for(receive_pdu(tls)[1]))
                    while True:
                        try:
                            request = read_message(tls)
                        except EOFError:  # the release
                            tls.sendall(A_RELEASE_RP_PDU)
                            break
                        tls.sendall(p_data(c_store_rsp(request), command=True))
            except (OSError, AssertionError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(5)


def associate(port: int, request: bytes, instances: int = 0) -> int:
    """``request``, then (if accepted) ``instances`` C-STOREs with UIDs of UID_LENGTH control
    characters, each waited for, and a release; the type of the PDU that answered ``request``."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as application:
        application.sendall(request)
        answer = receive_pdu(application)[0]
        if answer != A_ASSOCIATE_AC:
            return answer
        for n in range(instances):
            rq = c_store_rq(n + 1, control_text(UID_LENGTH, f"c{n}"), control_text(UID_LENGTH, f"i{n}"))
            application.sendall(p_data(rq, command=True) + p_data(data_set(n), command=False))
            assert read_message(application).status == 0
        application.sendall(a_release_rq())
        receive_pdu(application)
    return answer


def records(audit_file: Path, code: str) -> list[ET.Element]:
    code_attribute = f'csd-code="{code}"'.encode()
    return [ET.fromstring(line) for line in audit_file.read_bytes().splitlines() if code_attribute in line]


def wait_for_records(audit_file: Path, code: str, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(records(audit_file, code) if audit_file.exists() else []) < count:
        assert time.monotonic() < deadline, f"fewer than {count} records {code} in {audit_file}"
        time.sleep(0.1)


def description(message: ET.Element) -> str:
    return message.findtext("EventIdentification/EventOutcomeDescription") or ""


def site(tmp_path: Path, code: str) -> dict[str, str]:
    """The environment that has both agent processes import ``code`` first (sitecustomize)."""
    directory = tmp_path / "site"
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": str(directory)}


# Both processes: the size of each report the card session sends, to a file (a measurement only).
MEASURES_REPORTS = '''
import json, os, sys
if sys.flags.safe_path:  # the card-session process (started with -P)
    from dicom_card_agent.session import channel
    _send = channel.send
    def send(to, message, fds=None):
        if "kind" in message:
            with open(os.environ["REPORT_SIZES"], "a") as sizes:
                sizes.write(f"{message['kind']} {len(json.dumps(message))}\\n")
        return _send(to, message, fds)
    channel.send = send
'''


def test_a_hostile_applications_reports_stay_far_under_the_channels_limit(test_pki: ProvisionedPki,
                                                                        tmp_path: Path) -> None:
    """Its abstract syntaxes made each report of the association 6.3 MB; now they are cut as an
    instance's UIDs are (1,024 characters), and the largest report is the batch of instances."""
    sizes = tmp_path / "sizes"
    audit_file = tmp_path / "audit.log"
    env = {**site(tmp_path, MEASURES_REPORTS), "REPORT_SIZES": str(sizes)}
    with accepting_pacs(test_pki) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs)], env=env,
                          audit={"file": str(audit_file)}) as agent:
        assert associate(agent.port(), widest_rq(), INSTANCES) == A_ASSOCIATE_AC
        agent.wait_for_log(f"{INSTANCES} of {INSTANCES} instances stored", timeout=60)
        wait_for_records(audit_file, "ASSOCIATION", 2)
    reports = [(kind, int(size)) for kind, size in (line.split() for line in sizes.read_text().splitlines())]
    association = [size for kind, size in reports if kind.startswith("association-")]
    assert len(association) == 2 and max(association) < 1024 * 1024, reports
    assert max(size for _, size in reports) < MAX_REPORT // 2, reports
    listed = sum(len(m.findall(".//Instance")) for m in records(audit_file, "110104"))
    assert 0 < listed <= INSTANCES


# Both processes: a channel of 512 KiB, which the reports of the hostile association exceed.
SMALL_CHANNEL = '''
from dicom_card_agent.session import channel
channel.MAX_REPORT = 512 * 1024
'''


def test_reports_over_the_channels_limit_are_shortened_and_recorded(test_pki: ProvisionedPki,
                                                                    tmp_path: Path) -> None:
    """They were dropped by the supervisor: the association had no record at all."""
    audit_file = tmp_path / "audit.log"
    with accepting_pacs(test_pki) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs)], env=site(tmp_path, SMALL_CHANNEL),
                          audit={"file": str(audit_file)}) as agent:
        assert associate(agent.port(), widest_rq(), INSTANCES) == A_ASSOCIATE_AC
        agent.wait_for_log(f"{INSTANCES} of {INSTANCES} instances stored", timeout=60)
        wait_for_records(audit_file, "ASSOCIATION", 2)
        status = agent_status(tmp_path / "agent", test_pki.env())["audit"]
        log = agent.log()
    assert "dropped" not in log and " could not be recorded " not in log, log[-3000:]
    assert (status["failures"], status["lost"]) == (0, 0), status
    shortened = re.compile(r"the card session's report was shortened to fit its channel \(524288 bytes\): texts cut "
                           r"at (\d+) characters(?:, (\d+) instances not reported)?")
    association = records(audit_file, "ASSOCIATION")
    assert len(association) == 2  # its begin and end: 128 abstract syntaxes of 1,024 characters and more, 790 KB
    for message in association:
        assert shortened.fullmatch(description(message)), description(message)
    counted = 0
    for message in records(audit_file, "110104"):
        said = shortened.search(description(message))
        assert said, description(message)
        listed = len(message.findall(".//Instance"))
        not_listed = re.search(r"(\d+) more instances not listed", description(message))
        counted += listed + (int(not_listed[1]) if not_listed else 0) + int(said[2] or 0)
        limit = int(said[1])
        uid = message.find(".//Instance").get("UID")
        assert uid.endswith(f"... ({UID_LENGTH - limit} more characters)") and len(uid) < limit + 30, uid
    assert counted >= INSTANCES  # each instance listed, counted as not listed, or counted as not reported


# The card-session process of another build: its association-begin reports are larger than the
# supervisor takes (this build makes its reports fit: only another build, or a bug, sends one).
OVERSIZED_BEGIN = '''
import sys
if sys.flags.safe_path:
    from dicom_card_agent.session import channel
    _send = channel.send
    def send(to, message, fds=None):
        if message.get("kind") == "association-begin":
            message = {**message, "fields": {**message["fields"], "padding": "x" * channel.MAX_REPORT}}
        return _send(to, message, fds)
    channel.send = send
'''


@pytest.mark.parametrize("on_failure", ["continue", "refuse"])
def test_a_report_the_supervisor_drops_is_an_audit_failure(test_pki: ProvisionedPki, tmp_path: Path,
                                                           on_failure: str) -> None:
    """It was logged and dropped, and counted nowhere: `status` said nothing was lost, and under
    on_failure = "refuse" every association went on with its record missing."""
    audit_file = tmp_path / "audit.log"
    with accepting_pacs(test_pki) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs)], env=site(tmp_path, OVERSIZED_BEGIN),
                          audit={"file": str(audit_file), "on_failure": on_failure}) as agent:
        refused = on_failure == "refuse"
        agent.wait_for_log("event=sign-in ")
        assert associate(agent.port(), associate_rq()) == A_ASSOCIATE_AC
        agent.wait_for_log(" could not be recorded ", timeout=30)
        wait_for_records(audit_file, "ASSOCIATION", 1)  # the first association's end
        status = agent_status(tmp_path / "agent", test_pki.env())["audit"]
        second = associate(agent.port(), associate_rq())
        if not refused:  # its begin is lost too
            wait_for_records(audit_file, "ASSOCIATION", 2)
        lines = log_lines(agent.log())
    why = (f"association-begin: too large to be read: a message of \\d+ bytes, over the {MAX_REPORT} this "
           "channel takes")
    consequence = '; [audit] on_failure = "refuse": new associations are refused until the agent is restarted'
    said = [line for line in lines if "association-begin" in line and ("recorded" in line or "dropped" in line)]
    assert len(said) == (1 if refused else 2), said  # once per report, by the audit trail
    for line in said:
        assert re.fullmatch(
            f"card-agent: ERROR: audit: the card session's report association-begin could not be recorded \\(too "
            f"large to be read: a message of \\d+ bytes, over the {MAX_REPORT} this channel takes\\); what it said "
            f"is missing from the audit trail{re.escape(consequence) if refused else ''}",
            line), line
    assert (status["failures"], status["lost"]) == (1, 1), status
    assert second == (A_ASSOCIATE_RJ if refused else A_ASSOCIATE_AC)
    assert status["refusing"] is refused
    if refused:
        assert re.fullmatch(f"the audit trail cannot record what the card session reports \\({why}\\): restart the "
                            "agent", status["refusal"]), status


def test_a_report_that_fits_only_without_some_instances_says_how_many(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The last resort of fitting a report (no relay of this build makes one this long: at most 100
    instances a report), through the audit trail that records it. A channel of 200 KB."""
    monkeypatch.setattr(channel, "MAX_REPORT", 200_000)
    uid = CONTROL.decode() * 40
    fields = {"direction": "outbound", "tunnel": "pacs", "remote": "127.0.0.1:11112", "local": "",
              "calling_ae_title": "MODALITY", "called_ae_title": "PACS", "instances": [
                  {"sop_class_uid": uid, "sop_instance_uid": f"{uid}{n}", "status": 0, "study_uid": "1.2",
                   "patient_id": "P1", "patient_name": "Doe^Jane", "from_remote": False} for n in range(1000)]}
    sent = json.loads(json.dumps({"kind": "instances-transferred", "fields": channel.clipped(fields)}))
    assert len(json.dumps(sent)) <= channel.MAX_REPORT
    left_out = sent["fields"]["shortened"]["left_out"]["instances"]
    assert left_out + len(sent["fields"]["instances"]) == 1000 and left_out > 0
    recorder = AuditRecorder(AuditConfig(file=tmp_path / "audit.log"))
    try:
        recorder.session_report(sent["kind"], sent["fields"])
    finally:
        recorder.close()
    (message,) = records(tmp_path / "audit.log", "110104")
    assert description(message).endswith(
        "the card session's report was shortened to fit its channel (200000 bytes): texts cut at 64 characters, "
        f"{left_out} instances not reported"), description(message)
    assert message.find(".//Instance").get("UID").endswith(f"... ({len(uid) + 1 - 64} more characters)")
