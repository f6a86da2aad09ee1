"""The relay closes the PACS connection when the association is over and the application has gone:
PS3.8 gives that close to the requestor, and a PACS may wait for it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from agent_runner import running_agent, tunnel, wait_for
from conftest import ProvisionedPki
from peers.orthanc import orthanc
from peers.pki_files import TlsServerFiles
from peers.ports import peer_env


def connections_to(port: int) -> list[str]:
    """TCP connections (any state) whose peer is 127.0.0.1:``port``."""
    rows = subprocess.run(["ss", "-tnH", "state", "all", "dst", f"127.0.0.1:{port}"], capture_output=True,
                          text=True, check=True).stdout
    return [row for row in rows.splitlines() if row.strip()]


def test_a_pacs_abort_ends_the_relayed_connection_at_once(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """Orthanc refuses a C-FIND from an unknown AE with an A-ABORT and then waits for the requestor to
    close; the agent used to wait for Orthanc instead, holding both connections until it stopped."""
    with orthanc(tmp_path / "orthanc", tls=TlsServerFiles.from_pki(test_pki.pki)) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.dicom_port)]) as agent:
            find = subprocess.run(["findscu", "-S", "-aet", "FINDSCU", "-aec", "ORTHANC", "-k",
                                   "QueryRetrieveLevel=STUDY", "-k", "PatientID=X", "127.0.0.1", str(agent.port())],
                                  capture_output=True, text=True, env=peer_env(), timeout=60)
            assert "0006:0317 Peer aborted Association" in find.stderr
            ended = time.monotonic()
            agent.wait_for_log("FINDSCU -> ORTHANC, ", timeout=5)
            wait_for(lambda: not connections_to(pacs.dicom_port), timeout=5)
            assert time.monotonic() - ended < 3
            log = agent.log()
            assert not [line for line in log.splitlines() if "WARNING" in line]
    # The PACS's A-ABORT is news of its own, with its source and reason as PS3.8 names them.
    assert "association FINDSCU -> ORTHANC aborted by the PACS: A-ABORT from DICOM UL service-user\n" in log, log
    assert "; aborted by the acceptor (A-ABORT from DICOM UL service-user)\n" in log, log
