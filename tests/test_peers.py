"""The DICOM test peers (tests/peers) work for real, with FILE client identities from the test PKI:
DCMTK storescp/storescu/echoscu over TLS, a private Orthanc with DICOM TLS, the recording
pynetdicom SCP, the TLS 1.1-only server, the sample study and the process helpers.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
import warnings
from pathlib import Path

import pydicom
import pytest
from cryptography.hazmat.primitives import serialization

from conftest import ProvisionedPki
from peers.dcmtk import echoscu, storescp, storescu, tls11_only_server
from peers.orthanc import orthanc_tls
from peers.pki_files import TlsClientFiles, TlsServerFiles, issue_server_file_identity, subject_string, write_crl
from peers.ports import ephemeral_range, free_port, managed_process, wait_for_port
from peers.pynetdicom_scp import associate, plain_scp, tls_scp
from peers.study import (
    PATIENT_ID,
    TEMPLATES,
    assert_delivered,
    datasets_equal,
    make_study,
    sop_instance_uid,
    template_path,
)

CLIENT_CN = "File Client"


@pytest.fixture(scope="module")
def pki(test_pki: ProvisionedPki) -> Path:
    return test_pki.pki


@pytest.fixture(scope="module")
def client(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> TlsClientFiles:
    """A clinician-like client identity with its key in a file."""
    return TlsClientFiles.issue(pki, tmp_path_factory.mktemp("client"), CLIENT_CN)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_study(tmp_path_factory.mktemp("study"), files=12)


def dcmtk_subject(files: TlsClientFiles) -> str:
    """The subject as DCMTK logs it: /O=.../CN=..."""
    return "/" + "/".join(f"{a.rfc4514_attribute_name}={a.value}" for a in files.certificate.subject)


# -- sample study --

def test_study_is_one_varied_study(study: list[Path]) -> None:
    datasets = [pydicom.dcmread(p) for p in study]
    assert len(study) == 12
    assert len({d.SOPInstanceUID for d in datasets}) == 12
    assert {d.StudyInstanceUID for d in datasets} == {datasets[0].StudyInstanceUID}
    assert {d.PatientID for d in datasets} == {PATIENT_ID}
    assert len({d.SeriesInstanceUID for d in datasets}) == 12
    assert all(d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID for d in datasets)
    originals = {str(pydicom.dcmread(template_path(n), stop_before_pixels=True).SOPInstanceUID) for n, _ in TEMPLATES}
    assert not originals & {d.SOPInstanceUID for d in datasets}
    assert {d.file_meta.TransferSyntaxUID for d in datasets} == {
        "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50"}
    assert {"CT", "MR", "US", "OT", "RTDOSE", "CR", "SEG", "ECG", "SR"} <= {d.Modality for d in datasets}
    assert any(int(d.get("NumberOfFrames", 1)) > 1 for d in datasets)


def test_study_bulk_clones_reach_the_size_quickly(tmp_path: Path) -> None:
    start = time.monotonic()
    paths = make_study(tmp_path, files=3, min_total_bytes=20_000_000)
    elapsed = time.monotonic() - start
    total = sum(p.stat().st_size for p in paths)
    assert 20_000_000 <= total < 21_000_000
    assert elapsed < 5, elapsed
    last = pydicom.dcmread(paths[-1])
    assert last.SOPInstanceUID == last.file_meta.MediaStorageSOPInstanceUID
    assert int(last.InstanceNumber) == len(paths)
    assert len({sop_instance_uid(p) for p in paths}) == len(paths)
    assert datasets_equal(paths[0], paths[3]) == ["(0008,0018)", "(0020,0013)"]  # same template


def test_datasets_equal_finds_changed_missing_and_nested_elements(study: list[Path], tmp_path: Path) -> None:
    source = next(p for p in study if "liver" in p.name)  # has nested sequences
    assert datasets_equal(source, source) == []
    changed = pydicom.dcmread(source)
    changed.PatientName = "OTHER^NAME"
    del changed.StudyDescription
    changed.ReferencedSeriesSequence[0].SeriesInstanceUID = "1.2.3"
    changed.file_meta.ImplementationVersionName = "CHANGED"  # file meta is not compared
    changed.save_as(tmp_path / "changed.dcm")
    assert datasets_equal(source, tmp_path / "changed.dcm") == [
        "(0008,1030)", "(0008,1115)[0].(0020,000E)", "(0010,0010)"]


# -- process helpers --

def test_managed_process_sets_nodelay_logs_and_kills_its_group(tmp_path: Path) -> None:
    log = tmp_path / "sh.log"
    with managed_process(["sh", "-c", 'echo "nodelay=$TCP_NODELAY"; sleep 60 & echo "child=$!"; wait'],
                         log_path=log) as process:
        text = process.wait_for_log("child=")
        child = int(text.split("child=")[1].split()[0])
        assert process.alive
        leaving = time.monotonic()
    assert time.monotonic() - leaving < 3, "the process group was not stopped promptly"
    assert "nodelay=1" in text
    assert not process.alive and process.returncode is not None
    state = Path(f"/proc/{child}/stat")
    deadline = time.monotonic() + 5
    while state.exists() and state.read_text().split(")")[1].split()[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not state.exists() or state.read_text().split(")")[1].split()[0] == "Z", "grandchild survived"


def test_free_port_never_hands_out_a_port_twice_nor_one_the_kernel_gives_to_connections() -> None:
    # CI once gave storescp the port just handed to an agent's listener (two bind(0) probes, each
    # closed at once, got the same port); 600 probes of the old bind(0) free_port repeated one.
    low, high = ephemeral_range()
    ports = [free_port() for _ in range(600)]
    assert len(set(ports)) == len(ports)
    assert not [port for port in ports if low <= port <= high]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))  # and each was bindable


def test_wait_for_port_reports_a_peer_that_died(tmp_path: Path) -> None:
    with managed_process(["sh", "-c", "echo cannot start; exit 3"], log_path=tmp_path / "x.log") as process:
        with pytest.raises(RuntimeError, match="(?s)exited with 3.*cannot start"):
            wait_for_port(free_port(), 5, process=process)
    with pytest.raises(TimeoutError):
        wait_for_port(free_port(), 0.2)


# -- DCMTK --

def test_storescu_tls_delivers_study_to_storescp_tls(pki: Path, client: TlsClientFiles, study: list[Path],
                                                    tmp_path: Path) -> None:
    with storescp(tmp_path / "in", tls=TlsServerFiles.from_pki(pki)) as scp:
        result = storescu(scp.port, study, tls=client, calling_ae="CLINICIAN")
        assert result.returncode == 0, result.stdout + scp.log_text()
        assert_delivered(study, scp.stored_files())
        assert scp.peer_subjects() == [dcmtk_subject(client)]
        assert "CLINICIAN" in scp.log_text()


def test_storescp_requires_a_client_certificate(pki: Path, study: list[Path], tmp_path: Path) -> None:
    with storescp(tmp_path / "in", tls=TlsServerFiles.from_pki(pki)) as scp:
        result = storescu(scp.port, study[:1], tls=TlsClientFiles.anonymous(pki))
        assert result.returncode != 0, result.stdout
        assert scp.stored_files() == []
        assert "peer did not return a certificate" in scp.log_text()


def test_storescp_crl_rejects_a_revoked_file_client(pki: Path, client: TlsClientFiles, study: list[Path],
                                                   tmp_path: Path) -> None:
    revoked = TlsClientFiles.issue(pki, tmp_path / "revoked", "Revoked File Client")
    crl = write_crl(pki, tmp_path / "issuing.crl.pem", [revoked.chain])
    with storescp(tmp_path / "without-crl", tls=TlsServerFiles.from_pki(pki)) as scp:
        assert (before := storescu(scp.port, study[:1], tls=revoked)).returncode == 0, before.stdout
    with storescp(tmp_path / "in", tls=TlsServerFiles.from_pki(pki, crl=crl)) as scp:
        refused = storescu(scp.port, study[:1], tls=revoked)
        accepted = storescu(scp.port, study[:1], tls=client)
        log = scp.log_text()
    assert refused.returncode != 0, refused.stdout
    assert "TLS error: certificate verify failed" in log, log  # DCMTK does not say why
    assert accepted.returncode == 0, accepted.stdout + log
    assert [p.name for p in scp.stored_files()] == [f"CT.{sop_instance_uid(study[0])}"]
    assert scp.peer_subjects() == [dcmtk_subject(client)]


def test_echoscu_tls_and_plain(pki: Path, client: TlsClientFiles, tmp_path: Path) -> None:
    with storescp(tmp_path / "tls", tls=TlsServerFiles.from_pki(pki)) as scp:
        assert (result := echoscu(scp.port, tls=client)).returncode == 0, result.stdout + scp.log_text()
        assert echoscu(scp.port).returncode != 0  # plain DICOM to a TLS port
    with storescp(tmp_path / "plain", tls=None) as scp:
        assert (result := echoscu(scp.port)).returncode == 0, result.stdout + scp.log_text()
        assert scp.peer_subjects() == []


def test_dcmtk_clients_do_not_check_the_server_host_name(pki: Path, client: TlsClientFiles,
                                                        tmp_path: Path) -> None:
    """Documents a DCMTK 3.6.7 limit: only the chain is verified (the agent must do better)."""
    chain, key = issue_server_file_identity(pki, tmp_path, ["pacs.elsewhere.example"])
    wrong_host = TlsServerFiles(key, chain, pki / "ca-bundle.pem")
    untrusted = TlsServerFiles(pki / "untrusted-server.key", pki / "untrusted-server-chain.pem", pki / "ca-bundle.pem")
    with storescp(tmp_path / "wrong", tls=wrong_host) as scp:
        assert echoscu(scp.port, tls=client).returncode == 0
        with pytest.raises(ssl.SSLCertVerificationError, match="match"):
            with socket.create_connection(("127.0.0.1", scp.port)) as raw:
                client.ssl_context().wrap_socket(raw, server_hostname="localhost")
    with storescp(tmp_path / "untrusted", tls=untrusted) as scp:
        assert echoscu(scp.port, tls=client).returncode != 0


# -- Orthanc --

def test_orthanc_tls_stores_the_study_and_refuses_clients_without_certificate(
        pki: Path, client: TlsClientFiles, study: list[Path], tmp_path: Path) -> None:
    with orthanc_tls(tmp_path / "orthanc", pki_dir=pki) as pacs:
        assert pacs.instances() == []
        anonymous = storescu(pacs.dicom_port, study[:1], tls=TlsClientFiles.anonymous(pki), called_ae=pacs.aet)
        assert anonymous.returncode != 0, anonymous.stdout
        result = storescu(pacs.dicom_port, study, tls=client, called_ae=pacs.aet)
        assert result.returncode == 0, result.stdout + pacs.log_text()
        assert pacs.sop_instance_uids() == sorted(sop_instance_uid(p) for p in study)
        received = tmp_path / "from-orthanc"
        received.mkdir()
        for instance in pacs.instances():
            (received / f"{instance}.dcm").write_bytes(pacs.instance_file(instance))
        assert_delivered(study, sorted(received.iterdir()))
        tags = pacs.instance_tags(pacs.instances()[0])
        assert tags["PatientID"] == PATIENT_ID
        assert "peer did not return a certificate" in pacs.log_text()
    assert not pacs.process.alive


# -- pynetdicom SCP --

def test_tls_scp_records_client_certificate_user_and_datasets(pki: Path, client: TlsClientFiles,
                                                             study: list[Path]) -> None:
    datasets = [pydicom.dcmread(p) for p in study]
    with tls_scp(pki_dir=pki) as scp:
        assoc = associate(scp.port, tls=client, sop_classes=[d.SOPClassUID for d in datasets],
                          calling_ae="CLINICIAN", username="alice")
        assert assoc.is_established
        try:
            assert assoc.send_c_echo().Status == 0x0000
            statuses = [assoc.send_c_store(d).Status for d in datasets]
        finally:
            assoc.release()
        assert statuses == [0x0000] * len(datasets)
        [record] = scp.wait_for_ended(1)
    der = client.certificate.public_bytes(serialization.Encoding.DER)
    assert record.peer_certificate_der == der
    assert record.peer_subject == subject_string(client.certificate)
    assert "CN=File Client" in record.peer_subject
    assert record.tls_version in ("TLSv1.2", "TLSv1.3")
    assert (record.calling_ae, record.usernames, record.echoes, record.ended) == ("CLINICIAN", ["alice"], 1, "released")
    assert_delivered(study, record.received)
    assert scp.handshake_failures == []


def test_tls_scp_refuses_clients_without_certificate(pki: Path) -> None:
    with tls_scp(pki_dir=pki) as scp:
        assoc = associate(scp.port, tls=TlsClientFiles.anonymous(pki))
        assert not assoc.is_established
        scp.wait_for(lambda s: s.handshake_failures, what="a failed handshake")
        assert scp.associations == []


def test_tls_scp_receives_from_storescu(pki: Path, client: TlsClientFiles, study: list[Path], tmp_path: Path) -> None:
    with tls_scp(pki_dir=pki, out_dir=tmp_path / "in") as scp:
        result = storescu(scp.port, study, tls=client, called_ae=scp.ae_title)
        assert result.returncode == 0, result.stdout
        [record] = scp.wait_for_ended(1)
    assert record.peer_subject == subject_string(client.certificate)
    assert all(r.path is not None and r.path.exists() for r in record.received)
    assert_delivered(study, record.received)


def test_plain_scp_baseline(study: list[Path]) -> None:
    with plain_scp() as scp:
        assert echoscu(scp.port).returncode == 0
        assert storescu(scp.port, study[:2]).returncode == 0
        records = scp.wait_for_ended(2)
    assert [r.echoes for r in records] == [1, 0]
    assert all(r.peer_certificate_der is None and r.tls_version is None for r in records)
    assert_delivered(study[:2], records[1].received)


# -- TLS 1.1-only server --

def test_tls11_only_server_refuses_tls12_and_later(pki: Path, tmp_path: Path) -> None:
    with tls11_only_server(tmp_path, tls=TlsServerFiles.from_pki(pki)) as server:
        legacy = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1_1: that's the point
            legacy.minimum_version = legacy.maximum_version = ssl.TLSVersion.TLSv1_1
        legacy.set_ciphers("DEFAULT@SECLEVEL=0")
        legacy.load_verify_locations(pki / "ca-bundle.pem")
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            with legacy.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.version() == "TLSv1.1"
        modern = TlsClientFiles.anonymous(pki).ssl_context()  # TLS 1.2+
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION|protocol version|UNSUPPORTED_PROTOCOL"):
                modern.wrap_socket(raw, server_hostname="localhost")
        result = echoscu(server.port, tls=TlsClientFiles.anonymous(pki), timeout=20)
        assert result.returncode != 0, result.stdout


def test_no_peer_process_outlives_its_block(pki: Path, tmp_path: Path) -> None:
    with storescp(tmp_path / "in", tls=TlsServerFiles.from_pki(pki)) as scp:
        pid = scp.process.pid
        assert Path(f"/proc/{pid}").exists()
    assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
