"""Identity follows the card: no card, insertion, removal mid-association, swap, re-insertion.

The card's comings and goings are made by the fault-injecting PKCS#11 module around the real
SoftHSM tokens (SoftHSM itself cannot simulate a removal): `show_token` puts one token in the
reader, `present = 0` pulls it. Both the agent's card watcher (python-pkcs11) and its TLS (OpenSSL's
pkcs11-provider) load that module, as they would load a card's.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pydicom
from cryptography import x509

from agent_runner import ANY_SOFTHSM_TOKEN, associate_rq, running_agent, send_and_close, tunnel, wait_for
from conftest import USER_PIN, ProvisionedPki, run_card_agent
from dicom_card_agent.dicom.pdu import parse_associate_rj
from fault_pkcs11 import FaultControl
from peers.pynetdicom_scp import associate, echo, tls_scp

VERIFICATION = "1.2.840.10008.1.1"


def certificate(test_pki: ProvisionedPki, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((test_pki.pki / "clients" / f"{name}.pem").read_bytes())


def test_card_lifecycle_on_a_shared_workstation(test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    card.remove_card()  # the agent starts with an empty reader
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], token=ANY_SOFTHSM_TOKEN,
                           module=str(fault_module), env=card.env()) as agent:
            assert "ready: 1 tunnel(s) for nobody yet (no card inserted)" in agent.log()
            answer = send_and_close(agent.port(), associate_rq())
            assert parse_associate_rj(answer).describe().startswith("rejected-transient")
            agent.wait_for_log("rejected: no card inserted")

            card.insert_card()  # alice signs in
            agent.wait_for_log('event=sign-in subject="CN=Alice Example')
            assert echo(agent.port())

            held = associate(agent.port(), sop_classes=[VERIFICATION])  # an association in progress
            assert held.is_established
            card.remove_card()
            pulled = time.monotonic()
            wait_for(lambda: held.is_aborted, timeout=5)
            aborted_after = time.monotonic() - pulled
            log = agent.wait_for_log('event=sign-out reason="card removed"')
            assert not echo(agent.port())

            card.show("bob")  # the next clinician's card
            card.insert_card()
            agent.wait_for_log('event=sign-in subject="CN=Bob Example')
            assert echo(agent.port())

            card.show("alice")  # swapped back: alice again, without restarting the agent
            agent.wait_for_log('event=sign-out reason="card swapped"')
            wait_for(lambda: agent.log().count('event=sign-in subject="CN=Alice Example') == 2)
            assert echo(agent.port())
            log = agent.log()
            supervisor_pid = agent.process.pid
        seen = [x509.load_der_x509_certificate(a.peer_certificate_der) for a in pacs.associations]
    # A functional bound (the removal is polled every 50 ms), not a performance claim: see benchmarks/.
    assert aborted_after < 2.0
    alice, bob = certificate(test_pki, "alice"), certificate(test_pki, "bob")
    assert seen == [alice, alice, bob, alice]
    # Alice's second session could not resume the first one: it is a new card session.
    handshakes = [line for line in log.splitlines() if " to 127.0.0.1:" in line]
    assert "full handshake" in handshakes[-1]
    # Three sign-ins, each exactly one PIN attempt, made by its own card-session process (the
    # supervisor never logs in: docs/pin-handling.md); the pkcs11-provider used that login and
    # nothing ever prompted for a PIN on its own (OpenSSL's UI fallback).
    logins = [line for line in card.log_lines() if line.startswith("C_Login")]
    assert len(logins) == 3 and all("rv=0x0" in line for line in logins), logins
    pids = {line.rsplit("pid=", 1)[1] for line in logins}
    assert len(pids) == 3 and str(supervisor_pid) not in pids
    assert "Enter PIN" not in log


def test_status_and_lock(test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("bob")
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], token="",
                           module=str(fault_module), env=card.env(),
                           agent={"runtime_dir": str(tmp_path / "run")}) as agent:
            config = tmp_path / "agent" / "agent.toml"
            env = dict(os.environ)
            held = associate(agent.port(), sop_classes=[VERIFICATION])
            assert held.is_established and held.send_c_echo().Status == 0
            status = json.loads(run_card_agent("status", "--config", config, "--json", env=env, check=True).stdout)
            assert status["state"] == "signed in" and status["identity"].startswith("CN=Bob Example")
            assert status["token"] == "bob" and status["since"]
            assert status["tunnels"][0]["open_connections"] == 1 and status["tunnels"][0]["bytes_up"] > 0
            readable = run_card_agent("status", "--config", config, env=env, check=True).stdout
            assert "identity: CN=Bob Example" in readable and "1 open" in readable

            locked = run_card_agent("lock", "--config", config, env=env, check=True).stdout
            assert "locked: every connection of the card session was closed" in locked
            wait_for(lambda: held.is_aborted, timeout=5)
            log = agent.wait_for_log('event=sign-out reason="locked"')
            status = json.loads(run_card_agent("status", "--config", config, "--json", env=env, check=True).stdout)
            assert status["state"].startswith("locked: remove and re-insert the card") and status["identity"] is None
            assert not echo(agent.port())  # still locked: the card stays in the reader but is not used

            card.remove_card()
            agent.wait_for_log('event=card-removed token="bob"')
            card.insert_card()
            wait_for(lambda: agent.log().count("event=sign-in ") == 2)
            assert echo(agent.port())
    assert "Enter PIN" not in log


def test_idle_timeout_ends_the_session_but_not_while_an_association_is_open(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)],
                           agent={"idle_timeout": 1.5}) as agent:
            held = associate(agent.port(), sop_classes=[VERIFICATION])
            assert held.is_established
            time.sleep(3)  # longer than idle_timeout, with an association open
            assert "event=sign-out" not in agent.log() and held.send_c_echo().Status == 0
            held.release()
            log = agent.wait_for_log('event=sign-out reason="idle timeout"', timeout=10)
            assert not echo(agent.port())
            agent.wait_for_log("rejected: locked after 1.5 s without activity: remove and re-insert the card")
    assert log.count("event=sign-in ") == 1


def large_object(path: Path, megabytes: int) -> Path:
    """One multi-frame secondary capture object of about ``megabytes`` MB of random 16-bit pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rows = columns = 2048
    frames = max(1, megabytes * 1_000_000 // (rows * columns * 2))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Pull^Card", "PULL-1", "OT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = os.urandom(rows * columns * 2 * frames)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_pulling_the_card_during_a_200_mb_transfer(test_pki: ProvisionedPki, tmp_path: Path,
                                                     fault_module: Path) -> None:
    """The application sees A-ABORT, the PACS keeps no partial object, the agent signs the next card in."""
    import subprocess

    from peers import dcmtk
    from peers.pki_files import TlsServerFiles
    from peers.ports import peer_env

    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    big = large_object(tmp_path / "big.dcm", 200)
    out = tmp_path / "received"
    with dcmtk.storescp(out, tls=TlsServerFiles.from_pki(test_pki.pki), log_level="info") as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], token=ANY_SOFTHSM_TOKEN,
                           module=str(fault_module), env=card.env()) as agent:
            agent.wait_for_log("event=sign-in ")
            store = subprocess.Popen(dcmtk.storescu_argv(agent.port(), [big], log_level="info"),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=peer_env())
            try:
                # Pull once the PACS has a good part of the object, and before it has all of it.
                wait_for(lambda: sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) > 20_000_000
                         or store.poll() is not None, timeout=60)
                card.remove_card()
                output, _ = store.communicate(timeout=60)
            finally:
                if store.poll() is None:
                    store.kill()
            agent.wait_for_log('event=sign-out reason="card removed"')
            assert agent.process.poll() is None

            card.show("bob")
            card.insert_card()
            agent.wait_for_log('event=sign-in subject="CN=Bob Example')
            small = large_object(tmp_path / "small.dcm", 1)
            again = subprocess.run(dcmtk.storescu_argv(agent.port(), [small]), capture_output=True, text=True,
                                   env=peer_env(), timeout=60)
        stored = [p for p in out.rglob("*") if p.is_file()]
    assert store.returncode != 0, output
    # DCMTK's words for an A-ABORT PDU received (a dropped connection reads "Network closed")
    assert "Peer Aborted Association" in output, output[-2000:]
    assert again.returncode == 0, again.stdout + again.stderr
    small_uid = pydicom.dcmread(small, stop_before_pixels=True).SOPInstanceUID
    # storescp names what it stores <modality>.<SOP Instance UID>
    assert [p.name.split(".", 1)[1] for p in stored] == [small_uid], (
        f"the PACS kept more than the one complete object: {[(p.name, p.stat().st_size) for p in stored]}")


def test_pin_pad_reader_signs_in_through_the_card_session_process(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    card.pin_pad(USER_PIN)  # the reader's keypad "types" the PIN: the agent sends none
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], token="", pin="unused",
                           module=str(fault_module), env=card.env(), identity={"pin": "protected"}) as agent:
            agent.wait_for_log('event=sign-in subject="CN=Alice Example')
            assert echo(agent.port())
            supervisor_pid = agent.process.pid
    logins = [line for line in card.log_lines() if line.startswith("C_Login")]
    assert len(logins) == 1 and "rv=0x0" in logins[0] and f"pid={supervisor_pid}" not in logins[0], logins
