"""DCMTK 3.6.7 peers: ``storescp`` as a (TLS) PACS stand-in, ``storescu``/``echoscu`` as (TLS)
local applications, and an OpenSSL server that speaks only TLS 1.1 for negative tests.

Command lines (``[..]`` optional, TLS part only with ``tls``)::

    storescp -ll debug -aet STORESCP -od OUT_DIR +xa -pm -dhl +B
             [+tls server.key server-chain.pem -pw +cf ca-bundle.pem (-rc|-vc) [+crl CRL]] PORT
    storescu -ll info -R -xy -aet CALLING -aec CALLED
             [(+tls KEY CHAIN -pw | +tla) +cf ca-bundle.pem -rc] 127.0.0.1 PORT FILE...
    echoscu  -ll info -aet CALLING -aec CALLED [TLS as storescu] 127.0.0.1 PORT
    openssl s_server -tls1_1 -cipher DEFAULT@SECLEVEL=0 -cert CHAIN -key KEY
             -accept 127.0.0.1:PORT -www -quiet

All run with ``TCP_NODELAY=1``. Notes on DCMTK 3.6.7 as shipped in Debian 12:

- storescp logs the TLS version, cipher suite and the client certificate's subject and issuer
  only at debug level (``-ll debug``, between ``BEGIN/END TLS CONNECTION DETAILS``), and at that
  level also User Identity usernames and passwords in clear (fine for tests, never in production).
- ``+crl FILE`` (implies ``+crv``, leaf check) makes storescp reject revoked client certificates.
  It logs only "TLS error: certificate verify failed" (not the reason); with TLS 1.3 the
  rejection comes after the client's handshake finished, so storescu just reports "Peer aborted
  Association (or never connected)", as for a missing client certificate.
- storescu/echoscu verify the server certificate against ``+cf`` (``-rc``) but do NOT check the
  host name: a server certificate for another host from a trusted CA is accepted.
- storescu proposes only uncompressed transfer syntaxes unless told otherwise; ``-xy`` adds JPEG
  baseline (8-bit lossy), which the sample study uses. RLE, JPEG 2000 etc. would need other flags
  (one at a time), so the sample study avoids them. Without ``-R`` storescu proposes its built-in
  list of 64 SOP classes first (2 contexts each with ``-xy``: all 128) and silently leaves out
  the files' other SOP classes (e.g. Segmentation): "No presentation context for: (SG)".
- storescu sends uncompressed objects as Explicit VR Little Endian when storescp accepts it
  (implicit VR files are converted on the fly, and sequences get explicit lengths), JPEG baseline
  as is. storescp writes the dataset exactly as received (``+B``, bit preserving), so what a relay
  delivered can be compared byte for byte (the sample study has no trailing padding, which
  storescp drops).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .pki_files import TlsClientFiles, TlsServerFiles
from .ports import LOOPBACK, ManagedProcess, free_port, managed_process, run_peer_tool, wait_for_port

STORESCP = "storescp"
STORESCU = "storescu"
ECHOSCU = "echoscu"
DCMDUMP = "dcmdump"
OPENSSL = "openssl"

TLS_DETAILS_BEGIN = "BEGIN TLS CONNECTION DETAILS"


@dataclass
class StoreScp:
    """A running storescp; files it received are in ``out_dir`` (named ``<modality>.<SOP UID>``)."""

    process: ManagedProcess
    port: int
    out_dir: Path

    def log_text(self) -> str:
        return self.process.log_text()

    def stored_files(self) -> list[Path]:
        """Received files, sorted by name. storescp writes a file before it answers the C-STORE,
        so after a successful storescu run all of its files are here."""
        return sorted(p for p in self.out_dir.rglob("*") if p.is_file() and not p.name.startswith("."))

    def peer_subjects(self) -> list[str]:
        """Client certificate subjects as DCMTK logs them (``/O=.../CN=...``), one per TLS
        association, in order; empty without TLS or client certificates."""
        subjects, in_details, after_peer = [], False, False
        for line in self.log_text().splitlines():
            if TLS_DETAILS_BEGIN in line:
                in_details, after_peer = True, False
            elif "END TLS CONNECTION DETAILS" in line:
                in_details = False
            elif in_details and "Peer" in line and "Certificate" in line:
                after_peer = True
            elif in_details and after_peer and "Subject" in line and ":" in line:
                subjects.append(line.split(":", 2)[-1].strip())
                after_peer = False
        return subjects


def _server_tls_args(tls: TlsServerFiles, require_client_cert: bool) -> list[str]:
    args = ["+tls", str(tls.key), str(tls.chain), "-pw", "+cf", str(tls.ca_bundle),
            "-rc" if require_client_cert else "-vc"]
    if tls.crl is not None:
        args += ["+crl", str(tls.crl)]
    return args


def storescp_argv(out_dir: Path, port: int, *, tls: TlsServerFiles | None = None,
                  require_client_cert: bool = True, aet: str = "STORESCP", log_level: str = "debug",
                  extra_args: Sequence[str] = ()) -> list[str]:
    """The storescp command line used by :func:`storescp`."""
    argv = [STORESCP, "-ll", log_level, "-aet", aet, "-od", str(out_dir),
            "+xa",   # accept all transfer syntaxes DCMTK knows (incl. JPEG baseline) as proposed
            "-pm",   # promiscuous: accept unknown/private SOP classes too
            "-dhl",  # no reverse DNS lookup of the caller
            "+B"]    # bit preserving: write the dataset exactly as received
    if tls is not None:
        argv += _server_tls_args(tls, require_client_cert)
    return argv + list(extra_args) + [str(port)]


@contextlib.contextmanager
def storescp(out_dir: Path, *, port: int | None = None, tls: TlsServerFiles | None = None,
             require_client_cert: bool = True, aet: str = "STORESCP", log_level: str = "debug",
             extra_args: Sequence[str] = (), log_path: Path | None = None,
             startup_timeout: float = 10.0, prefix: Sequence[str] = ()) -> Iterator[StoreScp]:
    """Run storescp on 127.0.0.1 (all interfaces, in fact: storescp cannot bind to one) until the
    block ends; started through ``prefix`` if given (``SeparateHost.prefix``: in its namespace).

    ``tls=None``: plain DICOM. With ``tls``: ``+tls`` with the server identity, clients verified
    against ``tls.ca_bundle``: ``-rc`` (certificate required) or, with ``require_client_cert=False``,
    ``-vc`` (verified if sent); ``tls.crl`` adds ``+crl``. ``log_level="debug"`` is needed for the
    client subject in the log; use ``"info"`` for big transfers. The log goes to ``log_path``
    (default: ``<out_dir>.storescp.log`` next to ``out_dir``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = log_path or out_dir.with_name(f"{out_dir.name}.storescp.log")
    argv = storescp_argv(out_dir, port, tls=tls, require_client_cert=require_client_cert, aet=aet,
                         log_level=log_level, extra_args=extra_args)
    with managed_process([*prefix, *argv], log_path=log_path) as process:
        wait_for_port(port, startup_timeout, process=process)
        yield StoreScp(process, port, out_dir)


def _client_tls_args(tls: TlsClientFiles) -> list[str]:
    if tls.chain is None:
        identity = ["+tla"]  # TLS without a client certificate
    else:
        identity = ["+tls", str(tls.key), str(tls.chain), "-pw"]
    return identity + ["+cf", str(tls.ca_bundle), "-rc"]


def storescu_argv(port: int, files: Iterable[Path], *, tls: TlsClientFiles | None = None,
                  calling_ae: str = "STORESCU", called_ae: str = "STORESCP", host: str = LOOPBACK,
                  log_level: str = "info", extra_args: Sequence[str] = ()) -> list[str]:
    """The storescu command line used by :func:`storescu`."""
    argv = [STORESCU, "-ll", log_level,
            "-R",   # propose only the SOP classes of the files (the default list has no room left)
            "-xy",  # propose JPEG baseline besides the uncompressed transfer syntaxes
            "-aet", calling_ae, "-aec", called_ae]
    if tls is not None:
        argv += _client_tls_args(tls)
    return argv + list(extra_args) + [host, str(port)] + [str(f) for f in files]


def storescu(port: int, files: Iterable[Path], *, tls: TlsClientFiles | None = None,
             calling_ae: str = "STORESCU", called_ae: str = "STORESCP", host: str = LOOPBACK,
             log_level: str = "info", extra_args: Sequence[str] = (),
             timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Send ``files`` in one association with storescu; return the finished process (exit status
    in ``.returncode``, log in ``.stdout``). ``tls``: ``+tls`` with its file identity, or ``+tla``
    if it has none; the server is verified against ``tls.ca_bundle`` (no host name check)."""
    argv = storescu_argv(port, files, tls=tls, calling_ae=calling_ae, called_ae=called_ae, host=host,
                         log_level=log_level, extra_args=extra_args)
    return run_peer_tool(argv, timeout=timeout)


def echoscu_argv(port: int, *, tls: TlsClientFiles | None = None, calling_ae: str = "ECHOSCU",
                 called_ae: str = "ANY-SCP", host: str = LOOPBACK, log_level: str = "info",
                 extra_args: Sequence[str] = ()) -> list[str]:
    """The echoscu command line used by :func:`echoscu`."""
    argv = [ECHOSCU, "-ll", log_level, "-aet", calling_ae, "-aec", called_ae]
    if tls is not None:
        argv += _client_tls_args(tls)
    return argv + list(extra_args) + [host, str(port)]


def echoscu(port: int, *, tls: TlsClientFiles | None = None, calling_ae: str = "ECHOSCU",
            called_ae: str = "ANY-SCP", host: str = LOOPBACK, log_level: str = "info",
            extra_args: Sequence[str] = (), timeout: float = 60.0) -> subprocess.CompletedProcess:
    """One C-ECHO with echoscu (plain or TLS, as :func:`storescu`); exit status 0 = success."""
    argv = echoscu_argv(port, tls=tls, calling_ae=calling_ae, called_ae=called_ae, host=host,
                        log_level=log_level, extra_args=extra_args)
    return run_peer_tool(argv, timeout=timeout)


@dataclass
class Tls11Server:
    """A running ``openssl s_server`` that negotiates TLS 1.1 and nothing else."""

    process: ManagedProcess
    port: int

    def log_text(self) -> str:
        return self.process.log_text()


@contextlib.contextmanager
def tls11_only_server(work_dir: Path, *, tls: TlsServerFiles, port: int | None = None,
                      startup_timeout: float = 10.0) -> Iterator[Tls11Server]:
    """``openssl s_server -tls1_1`` on 127.0.0.1 with the given server identity, for "the client
    must refuse TLS < 1.2" tests. ``DEFAULT@SECLEVEL=0`` is needed: OpenSSL 3 refuses TLS 1.1 at
    its default security level 1 (no SHA-1 signatures). It answers a completed handshake with a
    small HTTP page (``-www``) and does not read stdin. A TLS 1.2+ client gets a
    "protocol version" alert."""
    port = port or free_port()
    work_dir = Path(work_dir)
    argv = [OPENSSL, "s_server", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0",
            "-cert", str(tls.chain), "-key", str(tls.key), "-accept", f"{LOOPBACK}:{port}", "-www", "-quiet"]
    with managed_process(argv, log_path=work_dir / f"tls11-server-{port}.log") as process:
        wait_for_port(port, startup_timeout, process=process)
        yield Tls11Server(process, port)
