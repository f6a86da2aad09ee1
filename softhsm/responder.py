"""A test revocation server for the test PKI: OCSP answered by `openssl ocsp`, CRLs served as files.

One loopback HTTP server: a POST is an OCSP request, answered by a one-shot ``openssl ocsp -index
... -reqin ... -respout ...`` (the real OpenSSL responder; its ``-port`` mode would listen on every
interface, and servers of this project listen on loopback only); a GET of /NAME serves the file
NAME of the CRL directory. It counts the requests, so tests can show that a cached answer costs
none. For tests and demos only: `card-agent softhsm ocsp-responder start DIR`.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509

from dicom_card_agent.softhsm.pki import RevocationSources

OCSP_PATH = "/ocsp"
PID_FILE = "ocsp/responder.pid"
LOG_FILE = "ocsp/responder.log"


def sources_at(port: int) -> RevocationSources:
    return RevocationSources(f"http://127.0.0.1:{port}{OCSP_PATH}", f"http://127.0.0.1:{port}/issuing-ca.crl")


def index(certificates: list[x509.Certificate], revoked: list[x509.Certificate]) -> str:
    """An `openssl ca` index (the database `openssl ocsp -index` answers from): one line per certificate."""
    lines = []
    revoked_serials = {c.serial_number for c in revoked}
    for cert in certificates:
        expiry = f"{cert.not_valid_after_utc:%y%m%d%H%M%S}Z"
        serial = f"{cert.serial_number:X}"
        serial = serial if len(serial) % 2 == 0 else "0" + serial
        subject = "/" + "/".join(f"{a.rfc4514_attribute_name}={a.value!s}" for a in cert.subject)
        if cert.serial_number in revoked_serials:
            when = f"{cert.not_valid_before_utc + datetime.timedelta(hours=1):%y%m%d%H%M%S}Z,keyCompromise"
            lines.append(f"R\t{expiry}\t{when}\t{serial}\tunknown\t{subject}")
        else:
            lines.append(f"V\t{expiry}\t\t{serial}\tunknown\t{subject}")
    return "\n".join(lines) + "\n"


@dataclass
class ResponderFiles:
    """What the OCSP side signs with and answers from; ``index`` None: OCSP requests get HTTP 404."""

    index: Path | None
    ca: Path  # the issuing CA certificate (whose certificates are asked about)
    signer: Path  # signs the responses: the CA itself or a delegated responder
    signer_key: Path
    crl_directory: Path | None = None
    ndays: int = 1

    @classmethod
    def for_pki(cls, pki_dir: Path) -> ResponderFiles:
        return cls(pki_dir / "ocsp" / "index.txt", pki_dir / "issuing-ca.pem", pki_dir / "ocsp-signer.pem",
                   pki_dir / "private" / "ocsp-signer.key", pki_dir / "crl-http")


@dataclass
class RevocationServer:
    """The server, on 127.0.0.1:``port``; ``requests`` counts OCSP requests and CRL downloads."""

    port: int
    files: ResponderFiles
    requests: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests["ocsp"] += 1
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                answer = server.answer_ocsp(body)
                self._send(answer, "application/ocsp-response")

            def do_GET(self) -> None:  # noqa: N802
                server.requests["crl"] += 1
                directory = server.files.crl_directory
                name = self.path.lstrip("/")
                path = directory / name if directory is not None and name and "/" not in name else None
                self._send(path.read_bytes() if path is not None and path.is_file() else None, "application/pkix-crl")

            def _send(self, body: bytes | None, content_type: str) -> None:
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                sys.stderr.write(f"{self.address_string()} {format % args}\n")

        self._http = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread: threading.Thread | None = None

    def answer_ocsp(self, request: bytes) -> bytes | None:
        files = self.files
        if files.index is None:
            return None
        with tempfile.TemporaryDirectory() as scratch:
            request_path, response_path = Path(scratch) / "request.der", Path(scratch) / "response.der"
            request_path.write_bytes(request)
            result = subprocess.run(
                ["openssl", "ocsp", "-index", str(files.index), "-CA", str(files.ca), "-rsigner", str(files.signer),
                 "-rkey", str(files.signer_key), "-ndays", str(files.ndays), "-reqin", str(request_path),
                 "-respout", str(response_path)], capture_output=True, timeout=30, check=False)
            if result.returncode != 0 or not response_path.exists():
                sys.stderr.write(result.stderr.decode(errors="replace"))
                return None
            return response_path.read_bytes()

    def start(self) -> RevocationServer:
        self._thread = threading.Thread(target=self._http.serve_forever, name="revocation-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._http.serve_forever()

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> RevocationServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def configured_port(directory: Path) -> int:
    return int((directory / "pki" / "ocsp" / "port").read_text())


def start_background(directory: Path) -> tuple[int, int]:
    """Start the test PKI's server as a background process; (pid, port). One per directory."""
    directory = directory.resolve()
    pid_path = directory / "pki" / PID_FILE
    running = _running_pid(pid_path)
    if running is not None:
        raise RuntimeError(f"the responder of {directory} is running already (pid {running}); stop it first")
    port = configured_port(directory)
    with open(directory / "pki" / LOG_FILE, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "dicom_card_agent.softhsm.responder", str(directory)],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    pid_path.write_text(f"{process.pid}\n")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pid_path.unlink(missing_ok=True)
            raise RuntimeError(f"the responder did not start (see {directory / 'pki' / LOG_FILE}; is port {port} "
                               "taken? `card-agent softhsm init --force --revocation-port N` picks another)")
        if _listening(port):
            return process.pid, port
        time.sleep(0.05)
    return process.pid, port


def stop_background(directory: Path) -> int | None:
    """Stop the responder that :func:`start_background` started for ``directory``; its pid, or None."""
    pid_path = directory.resolve() / "pki" / PID_FILE
    pid = _running_pid(pid_path)
    pid_path.unlink(missing_ok=True)
    if pid is None:
        return None
    os.kill(pid, signal.SIGTERM)
    return pid


def _running_pid(pid_path: Path) -> int | None:
    """The pid in ``pid_path`` if that process is still this responder (not a reused pid)."""
    try:
        pid = int(pid_path.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"dicom_card_agent.softhsm.responder" in cmdline else None


def _listening(port: int) -> bool:
    import socket
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def main() -> None:
    directory = Path(sys.argv[1])
    server = RevocationServer(configured_port(directory), ResponderFiles.for_pki(directory / "pki"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()


if __name__ == "__main__":
    main()
