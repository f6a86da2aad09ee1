"""A private Orthanc 1.10 instance as a TLS PACS for tests (never the system service).

Command line: ``TCP_NODELAY=1 /usr/sbin/Orthanc --verbose WORK_DIR/orthanc.json``, all state in
WORK_DIR (storage, index, log). What Orthanc 1.10.1 cannot do, found on this machine:

- bind its HTTP or DICOM port to one address: both listen on 0.0.0.0. ``RemoteAccessAllowed:
  false`` only makes the REST API refuse requests that do not come from localhost.
- check CRLs for DICOM TLS peers (no option), or refuse TLS 1.0/1.1 (no option).
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .pki_files import TlsServerFiles
from .ports import LOOPBACK, ManagedProcess, free_port, managed_process, wait_for_port

ORTHANC = "/usr/sbin/Orthanc"
AET = "ORTHANC"

# Direct connections only: an http_proxy in the environment must not see our loopback requests.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def orthanc_config(work_dir: Path, *, dicom_port: int, http_port: int, tls: TlsServerFiles | None,
                   require_client_cert: bool = True) -> dict[str, Any]:
    """The configuration :func:`orthanc` writes to ``work_dir/orthanc.json``."""
    config: dict[str, Any] = {
        "Name": f"peers-test-{dicom_port}",
        "StorageDirectory": str(work_dir / "storage"),
        "IndexDirectory": str(work_dir / "index"),
        "Plugins": [],                      # none of /usr/share/orthanc/plugins
        "LuaScripts": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,       # REST answers localhost only (it still binds 0.0.0.0)
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "MetricsEnabled": False,
        "HttpsCACertificates": "",
        "DicomServerEnabled": True,
        "DicomAet": AET,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,       # any called AE title
        "DicomCheckModalityHost": False,
        "DicomAlwaysAllowEcho": True,       # any calling AE title may echo and store
        "DicomAlwaysAllowStore": True,
        "UnknownSopClassAccepted": True,
        "DicomModalities": {},
        "DicomModalitiesInDatabase": False,
        "OrthancPeers": {},
        "SaveJobs": False,
        "StorageCompression": False,
        "DicomTlsEnabled": tls is not None,
    }
    if tls is not None:
        config.update({
            "DicomTlsCertificate": str(tls.chain),
            "DicomTlsPrivateKey": str(tls.key),
            "DicomTlsTrustedCertificates": str(tls.ca_bundle),
            "DicomTlsRemoteCertificateRequired": require_client_cert,
        })
    return config


@dataclass
class OrthancPeer:
    """A running private Orthanc: DICOM (TLS) on ``dicom_port``, REST on ``http_port``."""

    process: ManagedProcess
    work_dir: Path
    dicom_port: int
    http_port: int
    aet: str = AET

    def log_text(self) -> str:
        return self.process.log_text()

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.http_port}/{path.lstrip('/')}"

    def get_json(self, path: str, timeout: float = 10.0) -> Any:
        with _HTTP.open(self.url(path), timeout=timeout) as response:
            return json.load(response)

    def get_bytes(self, path: str, timeout: float = 30.0) -> bytes:
        with _HTTP.open(self.url(path), timeout=timeout) as response:
            return response.read()

    def post_instance(self, dicom_file: bytes, timeout: float = 30.0) -> dict[str, Any]:
        """Store a DICOM file through the REST API (POST /instances), bypassing DICOM networking."""
        request = urllib.request.Request(self.url("/instances"), data=dicom_file, method="POST",
                                         headers={"Content-Type": "application/dicom"})
        with _HTTP.open(request, timeout=timeout) as response:
            return json.load(response)

    def instances(self) -> list[str]:
        """Orthanc identifiers of all stored instances (GET /instances)."""
        return self.get_json("/instances")

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """Tags of one instance by keyword (GET /instances/ID/simplified-tags)."""
        return self.get_json(f"/instances/{instance_id}/simplified-tags")

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file of one instance (GET /instances/ID/file)."""
        return self.get_bytes(f"/instances/{instance_id}/file")

    def sop_instance_uids(self) -> list[str]:
        """SOP Instance UIDs of all stored instances, sorted (one request: /instances?expand)."""
        return sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in self.get_json("/instances?expand"))

    def statistics(self) -> dict[str, Any]:
        return self.get_json("/statistics")


def _wait_for_rest(peer: OrthancPeer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not peer.process.alive:
            raise RuntimeError(f"Orthanc exited with {peer.process.returncode} during startup:\n"
                               f"{peer.log_text()}")
        try:
            if peer.get_json("/system", timeout=2).get("DicomPort") == peer.dicom_port:
                return
        except (OSError, ValueError):  # URLError is an OSError; not answering yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"Orthanc REST not up after {timeout} s:\n{peer.log_text()}")
        time.sleep(0.05)


@contextlib.contextmanager
def orthanc(work_dir: Path, *, tls: TlsServerFiles | None, require_client_cert: bool = True,
            dicom_port: int | None = None, http_port: int | None = None,
            extra_config: Mapping[str, Any] | None = None, startup_timeout: float = 30.0) -> Iterator[OrthancPeer]:
    """Run a private Orthanc with its state in ``work_dir``; DICOM TLS when ``tls`` is given
    (clients verified against ``tls.ca_bundle``, a certificate required unless
    ``require_client_cert`` is false), plain DICOM otherwise. Stopped with SIGTERM at the end."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    dicom_port = dicom_port or free_port()
    http_port = http_port or free_port()
    config = orthanc_config(work_dir, dicom_port=dicom_port, http_port=http_port, tls=tls,
                            require_client_cert=require_client_cert)
    config.update(extra_config or {})
    config_path = work_dir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    argv = [ORTHANC, "--verbose", str(config_path)]
    with managed_process(argv, log_path=work_dir / "orthanc.log", stop_timeout=15.0) as process:
        peer = OrthancPeer(process, work_dir, dicom_port, http_port)
        _wait_for_rest(peer, startup_timeout)
        wait_for_port(dicom_port, startup_timeout, process=process)
        yield peer


@contextlib.contextmanager
def orthanc_tls(work_dir: Path, *, pki_dir: Path, require_client_cert: bool = True,
                extra_config: Mapping[str, Any] | None = None) -> Iterator[OrthancPeer]:
    """Orthanc with DICOM TLS using the PKI's localhost server identity and ``ca-bundle.pem``."""
    with orthanc(work_dir, tls=TlsServerFiles.from_pki(pki_dir), require_client_cert=require_client_cert,
                 extra_config=extra_config) as peer:
        yield peer
