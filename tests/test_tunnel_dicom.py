"""Plain DICOM applications reach TLS PACSes through the agent with the card's identity, against
real peers: DCMTK storescp/storescu/echoscu, Orthanc and a pynetdicom SCP."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from agent_runner import running_agent, tunnel
from conftest import ProvisionedPki
from peers.dcmtk import echoscu, storescp, storescu
from peers.orthanc import orthanc_tls
from peers.pki_files import TlsServerFiles
from peers.pynetdicom_scp import associate, tls_scp
from peers.study import assert_delivered, make_study, sop_instance_uid


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_study(tmp_path_factory.mktemp("study"), files=12)


def token_certificate(test_pki: ProvisionedPki, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((test_pki.pki / "clients" / f"{name}.pem").read_bytes())


def test_study_through_the_agent_arrives_identical_at_storescp(test_pki: ProvisionedPki, tmp_path: Path,
                                                                study: list[Path]) -> None:
    with storescp(tmp_path / "received", tls=TlsServerFiles.from_pki(test_pki.pki)) as scp:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", scp.port)]) as agent:
            result = storescu(agent.port(), study)  # plaintext to the agent
            assert result.returncode == 0, result.stdout
            echo = echoscu(agent.port())
            assert echo.returncode == 0, echo.stdout
            agent.wait_for_log(" full handshake ")
        received = scp.stored_files()
        subjects = scp.peer_subjects()
    assert_delivered(study, received)
    assert subjects and all(s.endswith("/CN=Alice Example") for s in subjects), subjects


def test_the_pacs_sees_the_token_certificate(test_pki: ProvisionedPki, tmp_path: Path, study: list[Path]) -> None:
    for token in ("alice", "bob"):
        with tls_scp(pki_dir=test_pki.pki) as scp:
            with running_agent(test_pki, tmp_path / token, [tunnel("pacs", scp.port)], token=token) as agent:
                association = associate(agent.port(), sop_classes=["1.2.840.10008.1.1"])
                assert association.is_established
                assert association.send_c_echo().Status == 0
                association.release()
                scp.wait_for_ended(1)
        record = scp.associations[0]
        assert x509.load_der_x509_certificate(record.peer_certificate_der) == token_certificate(test_pki, token)
        assert record.tls_version == "TLSv1.3"


def test_orthanc_stores_instances_sent_through_the_agent(test_pki: ProvisionedPki, tmp_path: Path,
                                                          study: list[Path]) -> None:
    with orthanc_tls(tmp_path / "orthanc", pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("orthanc", pacs.dicom_port)]) as agent:
            result = storescu(agent.port(), study, called_ae="ORTHANC")
            assert result.returncode == 0, result.stdout
        stored = pacs.sop_instance_uids()
    assert stored == sorted(sop_instance_uid(path) for path in study)


def test_revoked_card_is_refused_by_a_pacs_checking_the_crl(test_pki: ProvisionedPki, tmp_path: Path,
                                                             study: list[Path]) -> None:
    with storescp(tmp_path / "received", tls=TlsServerFiles.from_pki(test_pki.pki, crl=True)) as scp:
        # revocation = "off": the agent's own check would stop mallory at sign-in; this is about the PACS's answer.
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", scp.port, revocation="off")],
                           token="mallory") as agent:
            result = echoscu(agent.port())
            log = agent.wait_for_log("server rejected our certificate (CN=Mallory Example")
        assert scp.stored_files() == []
    assert result.returncode != 0
    assert "Association Rejected" in result.stdout, result.stdout
    assert "check that the PACS trusts this issuer" in log
