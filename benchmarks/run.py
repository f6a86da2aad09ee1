#!/usr/bin/env python3
"""dicom-card-agent benchmark: one command, one table. Not part of the test suite.

    .venv/bin/python benchmarks/run.py [--quick] [--keep] [--key rsa|ec]

Provisions its own SoftHSM tokens and test PKI (``card-agent softhsm init``) in a temporary
directory (on /dev/shm when possible), builds ONE bulk study, and measures in the same run,
against the same study and the same token key (``--key rsa``, the default: token "alice", RSA-2048;
``--key ec``: token "bob", EC P-256; CKA_ID 01 either way; the file keys are of the same kind):

1. bulk throughput, one association, ``storescu -R -xy`` -> ``storescp`` (TCP_NODELAY=1):
   plaintext; direct TLS with a FILE client key; through ``card-agent run``; through stunnel
   with the libp11 "pkcs11" ENGINE on the same SoftHSM key (plus an extra, labelled stunnel row
   with a file key, and in 2. one with the engine and session resumption off);
2. fresh-association latency (connect, A-ASSOCIATE, C-ECHO, A-RELEASE, close), median and p90
   of N, with two clients: a lean raw-socket DICOM client (no framework overhead) and pynetdicom;
3. token signatures (C_Sign, counted by the fault_pkcs11 wrapper around SoftHSM) per resumed
   association and per association with ``session_resumption = false``;
4. peak RSS (VmHWM) of the agent's supervisor and card-session processes after the bulk runs;
5. 8 concurrent ``storescu`` transfers (the study split in 8), through the agent and through stunnel:
   aggregate throughput and per-transfer fairness (slowest / fastest).

Targets are ratios to stunnel + libp11 on the same key, measured in the same run; ratios to direct
TLS are printed as references.
The report (markdown) goes to stdout, progress to stderr. Every process started here (agent,
storescp, stunnel) is stopped on exit, also on Ctrl-C, SIGTERM or errors.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # leave no __pycache__ behind in tests/ or agent/

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO, REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import pydicom  # noqa: E402
import pynetdicom  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian  # noqa: E402

from dicom_card_agent.tls.policy import TLS_GROUPS  # noqa: E402
from fault_pkcs11 import FaultControl  # noqa: E402
from fault_pkcs11 import build as build_fault_module  # noqa: E402
from peers import dcmtk  # noqa: E402
from peers.pki_files import TlsClientFiles, TlsServerFiles  # noqa: E402
from peers.ports import LOOPBACK, ManagedProcess, free_port, managed_process, peer_env, wait_for_port  # noqa: E402
from peers.study import new_uid, template_path  # noqa: E402

USER_PIN = "123456"          # the public test PIN of `card-agent softhsm init`
TOKEN = "alice"              # RSA-2048 clinician, key CKA_ID 01


@dataclass(frozen=True)
class TokenKey:
    """The card identity of a run, and the kind of file key it is compared with."""

    token: str
    key_type: str  # for tests/peers/pki_files.py
    description: str


TOKEN_KEYS = {"rsa": TokenKey(TOKEN, "rsa", "RSA-2048"), "ec": TokenKey("bob", "ec", "EC P-256")}
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
CALLED_AE = "STORESCP"
CALLING_AE = "BENCH"
MB = 1_000_000               # throughput in MB/s = 10^6 bytes per second of DICOM file bytes
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"

# Targets (issue "Faster than stunnel"): ratios to stunnel + libp11 on the same SoftHSM key, same run.
TARGET_BULK = 1.00           # agent bulk MB/s >= 1.0x stunnel's
TARGET_CPU_PER_GB = 1.00     # agent relay CPU per GB <= 1.0x stunnel's
TARGET_FULL = 1.00           # association set-up, full handshake every time, <= 1.0x stunnel's
TARGET_RESUMED = 1.00        # association set-up, resumed, <= 1.0x stunnel's
# The set-up rows again with each sample ISOLATION_PAUSE seconds after the previous one has ended (an
# extra measurement, no verdict): back to back, a sample shares the CPUs with the previous route's
# relay still closing its connection, so each route also pays for the one before it.
ISOLATED_KEYS = ("agent_full", "agent", "stunnel", "stunnel_full")
ISOLATION_PAUSE = 0.005
TARGET_CONCURRENT = 1.00     # aggregate MB/s of CONCURRENT_TRANSFERS storescu at once >= 1.0x stunnel's
CONCURRENT_TRANSFERS = 8     # a viewer prefetching several studies

# (template, rows, columns): 16-bit greyscale, uncompressed; 2.1 to 8.4 MB per object
BULK_SHAPES = (("CT_small.dcm", 2048, 2048), ("MR_small.dcm", 1024, 1024),
               ("CT_small.dcm", 1536, 1536), ("MR_small.dcm", 1280, 1280))


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------- tools


def _find_system_tool(name: str) -> str:
    """A DCMTK tool from the system, never pynetdicom's same-named scripts in .venv/bin."""
    venv_bin = Path(sys.executable).parent.resolve()
    for directory in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]:
        if not directory or Path(directory).resolve() == venv_bin:
            continue
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise BenchError(f"{name} (DCMTK) not found on PATH; install dcmtk")


def use_system_dcmtk() -> None:
    """DCMTK's tools from the system, whatever is first on PATH (see :func:`_find_system_tool`)."""
    for tool in ("STORESCP", "STORESCU", "ECHOSCU"):
        setattr(dcmtk, tool, _find_system_tool(getattr(dcmtk, tool).lower()))


@contextlib.contextmanager
def softhsm_work_directory(prefix: str) -> Iterator[tuple[Path, Path, Path]]:
    """For the diagnostic scripts: a work directory (in /dev/shm when it can be) holding `card-agent
    softhsm init`'s tokens and PKI, with no OpenSSL or module settings inherited and DCMTK from the
    system; yields (work, pki, softhsm2.conf) and removes it afterwards."""
    for name in ("OPENSSL_CONF", "CARD_AGENT_MODULE", "SOFTHSM2_CONF"):
        os.environ.pop(name, None)
    use_system_dcmtk()
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
    try:
        subprocess.run([card_agent_executable(), "softhsm", "init", str(work / "tokens")], check=True,
                       capture_output=True, text=True)
        yield work, work / "tokens" / "pki", work / "tokens" / "softhsm2.conf"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def card_agent_executable() -> str:
    for candidate in (REPO / ".venv" / "bin" / "card-agent", Path(sys.executable).parent / "card-agent"):
        if candidate.is_file():
            return str(candidate)
    raise BenchError("card-agent not found: run scripts/setup first (it creates .venv)")


def _first_line(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown ({error})"
    lines = [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return lines[0] if lines else "unknown"


def _stunnel_version(executable: str) -> str:
    result = subprocess.run([executable, "-version"], capture_output=True, text=True, timeout=20,
                            stdin=subprocess.DEVNULL)
    match = re.search(r"stunnel \S+ on \S+", result.stdout + result.stderr)
    return match.group(0) if match else "unknown"


def _dpkg_version(package: str) -> str:
    if shutil.which("dpkg-query") is None:
        return "?"
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "not installed"


def machine_info(stunnel: str | None) -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    return {
        "nproc": _first_line(["nproc"]),
        "cpu": cpu,
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "os": _os_release(),
        "python": f"{platform.python_version()} ({sys.executable})",
        "openssl": f"{_first_line(['openssl', 'version'])}; Python ssl: {ssl.OPENSSL_VERSION}",
        "dcmtk": _first_line([dcmtk.STORESCU, "--version"]).strip("$ "),
        "stunnel": _stunnel_version(stunnel) if stunnel else "not installed",
        "packages": ", ".join(f"{p} {_dpkg_version(p)}" for p in (
            "pkcs11-provider", "libengine-pkcs11-openssl", "softhsm2", "stunnel4")),
        "python packages": f"pynetdicom {pynetdicom.__version__}, pydicom {pydicom.__version__}",
    }


def git_commit() -> str:
    """The commit measured, and whether agent/ differs from it (read-only git commands; with
    GIT_OPTIONAL_LOCKS=0 git status does not even refresh the index)."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, env=env)
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "agent"],
                                capture_output=True, text=True, timeout=10, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    dirty = " + uncommitted changes in agent/" if status.returncode == 0 and status.stdout.strip() else ""
    return head.stdout.strip() + dirty


def _os_release() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.platform()


# ------------------------------------------------------------------------------------- /proc


def proc_stat_cpu(pid: int) -> float:
    """utime + stime of a process in seconds (0.0 if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def child_pids(pid: int) -> list[int]:
    """Direct children of a process, from /proc/PID/task/*/children (no psutil)."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                children += [int(p) for p in (task / "children").read_text().split()]
    return sorted(set(children))


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    return "?"


def time_wait_rows() -> int:
    """TCP sockets in TIME_WAIT (state 06 in /proc/net/tcp), left by recently closed connections."""
    with contextlib.suppress(OSError):
        return sum(1 for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                   if len(line.split()) > 3 and line.split()[3] == "06")
    return 0


def wait_for_quiet_tcp_table(max_wait: float = 70.0) -> tuple[int, float]:
    """Let TIME_WAIT sockets of earlier runs expire (Linux keeps them 60 s), so that every latency
    phase starts from the same, quiet socket table; returns (TIME_WAIT rows left, seconds waited)."""
    started = time.monotonic()
    rows = time_wait_rows()
    if rows:
        say(f"waiting up to {max_wait:.0f} s for {rows} TIME_WAIT sockets to expire (quiet socket table)")
    while rows and time.monotonic() - started < max_wait:
        time.sleep(2)
        rows = time_wait_rows()
    return rows, time.monotonic() - started


def tcp_table_rows() -> int:
    with contextlib.suppress(OSError):
        return max(0, len(Path("/proc/net/tcp").read_text().splitlines()) - 1)
    return -1


@dataclass(frozen=True)
class PeerLookupCost:
    rows: int            # lines in /proc/net/tcp (TIME_WAIT included)
    admit_ms: float      # agent.tunnel.peer.admit_peer on a loopback connection (sock_diag), median
    read_ms: float       # reading /proc/net/tcp alone (its fallback without sock_diag), median
    parse_ms: float      # agent.tunnel.peer.parse_proc_net_tcp on that text, median


def peer_lookup_cost(repeat: int = 15) -> PeerLookupCost:
    """What the agent's check of a local TCP client costs per connection right now, measured in
    this process with the agent's own code (agent.tunnel.peer.admit_peer: one sock_diag question for
    the client's socket) on a real loopback connection, and what its fallback where the kernel has
    no sock_diag (reading and parsing /proc/net/tcp) would cost at the same moment."""
    from dicom_card_agent.tunnel.peer import PeerPolicy, admit_peer, parse_proc_net_tcp
    policy = PeerPolicy(frozenset({os.getuid()}))
    admit, read, parse = [], [], []
    with socket.socket() as server:
        server.bind((LOOPBACK, 0))
        server.listen(4)
        with socket.create_connection(server.getsockname()) as _client:
            accepted, _ = server.accept()
            with accepted:
                for _ in range(repeat):
                    started = time.perf_counter()
                    admit_peer(accepted, policy)
                    admit.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    text = Path("/proc/net/tcp").read_text()
                    read.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    parse_proc_net_tcp(text, False)
                    parse.append(time.perf_counter() - started)
    return PeerLookupCost(tcp_table_rows(), statistics.median(admit) * 1000, statistics.median(read) * 1000,
                          statistics.median(parse) * 1000)


def _parent_pid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _ancestors() -> set[int]:
    """This process's parents (a `timeout` or shell that started the benchmark holds its command line)."""
    found, pid = set(), os.getppid()
    while pid > 1 and len(found) < 64:
        found.add(pid)
        pid = _parent_pid(pid)
    return found


def _ours(pid: int) -> bool:
    """This process, one of its descendants, or one of its ancestors."""
    if pid in _ancestors():
        return True
    for _ in range(64):
        if pid == os.getpid():
            return True
        if pid <= 1:
            return False
        pid = _parent_pid(pid)
    return False


def other_heavy_processes() -> list[str]:
    """Test suites, other agents or other benchmarks running now (they would skew every number)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or _ours(int(entry.name)):
            continue
        text = cmdline(int(entry.name))
        if re.search(r"\bpytest\b|scripts/test|benchmarks/run\.py|card-agent run|session\.worker|"
                     r"\bstorescp\b|\bstunnel", text):
            found.append(f"pid {entry.name}: {text[:120]}")
    return found


# ---------------------------------------------------------------------------------- the study


def make_bulk_study(out_dir: Path, total_bytes: int) -> list[Path]:
    """Write one study of large uncompressed objects (16-bit greyscale CT and MR cloned from
    pydicom's bundled CT_small/MR_small with a synthetic random Pixel Data of 2-8 MB, Explicit VR
    Little Endian, new UIDs) until ``total_bytes`` are reached. Returns the paths in order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid, patient_id = new_uid(), f"BENCH-{os.getpid()}"
    templates = []
    for index, (name, rows, columns) in enumerate(BULK_SHAPES):
        ds = dcmread(template_path(name))
        ds.PatientName, ds.PatientID = "BENCH^BULK STUDY", patient_id
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyInstanceUID, ds.StudyID = study_uid, "BENCH"
        ds.StudyDate, ds.StudyTime = "20240101", "120000"
        ds.AccessionNumber, ds.StudyDescription = "BENCH0001", "dicom-card-agent bulk benchmark study"
        ds.SeriesInstanceUID, ds.SeriesNumber = new_uid(), index + 1
        if "FrameOfReferenceUID" in ds:
            ds.FrameOfReferenceUID = new_uid()
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue", "NumberOfFrames"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        templates.append(ds)
    paths: list[Path] = []
    total = 0
    while total < total_bytes:
        index = len(paths)
        ds = templates[index % len(templates)]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = new_uid()
        ds.InstanceNumber = index + 1
        ds.PixelData = os.urandom(ds.Rows * ds.Columns * 2)  # any 16-bit pattern is a valid signed value
        path = out_dir / f"{index:05d}-{Path(BULK_SHAPES[index % len(BULK_SHAPES)][0]).stem}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        total += path.stat().st_size
    for path in paths[:len(templates)]:  # each kind reads back as what it claims to be
        check = dcmread(path)
        if len(check.PixelData) != check.Rows * check.Columns * 2:
            raise BenchError(f"{path}: Pixel Data length does not match Rows x Columns")
    return paths


# -------------------------------------------------------------------------------- lean client


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _echo_pdus(called: str = CALLED_AE) -> tuple[bytes, bytes]:
    """A-ASSOCIATE-RQ for Verification (PS3.8 9.3.2) and a C-ECHO-RQ in a P-DATA-TF, built here so
    that the client depends on nothing of the agent."""
    context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, VERIFICATION.encode())
                    + _item(0x40, IMPLICIT_VR_LE.encode()))
    user_information = _item(0x50, _item(0x51, struct.pack(">I", 16384))
                             + _item(0x52, PYDICOM_IMPLEMENTATION_UID.encode()))
    body = (struct.pack(">HH", 1, 0) + called.encode().ljust(16) + CALLING_AE.encode().ljust(16) + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + context + user_information)
    request = struct.pack(">BBI", 0x01, 0, len(body)) + body

    def element(element_number: int, value: bytes) -> bytes:
        return struct.pack("<HHI", 0x0000, element_number, len(value)) + value

    body = (element(0x0002, VERIFICATION.encode() + b"\0") + element(0x0100, struct.pack("<H", 0x0030))
            + element(0x0110, struct.pack("<H", 1)) + element(0x0800, struct.pack("<H", 0x0101)))
    command = element(0x0000, struct.pack("<I", len(body))) + body
    pdv = struct.pack(">IBB", len(command) + 2, 1, 0x03) + command  # context 1, command, last fragment
    return request, struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


ASSOCIATE_RQ, C_ECHO_RQ = _echo_pdus()
RELEASE_RQ = struct.pack(">BBI", 0x05, 0, 4) + bytes(4)


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise BenchError("connection closed by the peer")
        data += chunk
    return bytes(data)


def _recv_pdu(sock: socket.socket) -> tuple[int, bytes]:
    pdu_type, _, length = struct.unpack(">BBI", _recv_exact(sock, 6))
    return pdu_type, _recv_exact(sock, length)


def _echo_status(p_data: bytes) -> int | None:
    command = p_data[6:]  # PDV length (4), context id, message control header
    offset = 0
    while offset + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, offset)
        if (group, element) == (0x0000, 0x0900):
            return struct.unpack_from("<H", command, offset + 8)[0]
        offset += 8 + length
    return None


@dataclass
class Resumption:
    """The TLS session a lean client resumes (the "direct TLS, resumed" extra row)."""

    session: ssl.SSLSession | None = None
    resumed: int = 0
    full: int = 0


def lean_echo(port: int, context: ssl.SSLContext | None = None, info: dict | None = None,
              resumption: Resumption | None = None) -> None:
    """Connect (TCP_NODELAY), optionally TLS, A-ASSOCIATE, C-ECHO, A-RELEASE, close."""
    sock = socket.create_connection((LOOPBACK, port), timeout=30)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname="localhost",
                                       session=resumption.session if resumption else None)
            if info is not None:
                info.setdefault("version", sock.version())
                info.setdefault("cipher", (sock.cipher() or ("?",))[0])
        sock.sendall(ASSOCIATE_RQ)
        pdu_type, body = _recv_pdu(sock)
        if pdu_type != 0x02:
            raise BenchError(f"association not accepted (PDU type {pdu_type:#04x}: {body[:16].hex()})")
        sock.sendall(C_ECHO_RQ)
        pdu_type, body = _recv_pdu(sock)
        if pdu_type != 0x04 or _echo_status(body) != 0:
            raise BenchError(f"C-ECHO failed (PDU type {pdu_type:#04x}, status {_echo_status(body)})")
        sock.sendall(RELEASE_RQ)
        pdu_type, _ = _recv_pdu(sock)
        if pdu_type != 0x06:
            raise BenchError(f"no A-RELEASE-RP (PDU type {pdu_type:#04x})")
        if resumption is not None and isinstance(sock, ssl.SSLSocket):
            if sock.session_reused:
                resumption.resumed += 1
            else:
                resumption.full += 1
            resumption.session = sock.session  # with TLS 1.3 the ticket came after the handshake
    finally:
        sock.close()


class PynetdicomClient:
    """pynetdicom SCU, one AE for all rows; TCP_NODELAY set when the connection opens."""

    def __init__(self) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification

        from peers.pynetdicom_scp import keep_responses_for_the_waiting_request, set_nodelay
        self.keep_responses = keep_responses_for_the_waiting_request
        self.ae = AE(CALLING_AE)
        self.ae.add_requested_context(Verification)
        self.handlers = [(evt.EVT_CONN_OPEN, set_nodelay)]

    def echo(self, port: int, context: ssl.SSLContext | None = None) -> None:
        tls_args = (context, "localhost") if context is not None else None
        assoc = self.ae.associate(LOOPBACK, port, ae_title=CALLED_AE, tls_args=tls_args, evt_handlers=self.handlers)
        if not assoc.is_established:
            sock = getattr(assoc.dul.socket, "socket", None)
            if sock is not None:
                sock.close()
            raise BenchError("pynetdicom: association not established")
        self.keep_responses(assoc)  # else 1 echo in a few hundred may wait 30 s on a loaded machine
        status = assoc.send_c_echo()
        assoc.release()
        if status is None or getattr(status, "Status", None) != 0:
            raise BenchError(f"pynetdicom: C-ECHO failed ({status})")


# ------------------------------------------------------------------------------------ servers


def write_agent_config(path: Path, pki: Path, runtime_dir: Path, module: str,
                       tunnels: list[tuple[str, int, int, bool]], token: str = TOKEN,
                       revocation: dict[str, str] | None = None, crl_files: bool = True) -> Path:
    """(name, listen port, remote port, session_resumption) per tunnel; ``revocation`` the policy of
    some tunnels by name; without ``crl_files`` OCSP and CRL distribution points are the only sources."""
    def q(value: object) -> str:
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    crl = f"[{q(pki / 'issuing-ca.crl.pem')}]" if crl_files else "[]"
    lines = ["[identity]", f"token = {q(token)}", f"module = {q(module)}", 'pin = "env:CARD_PIN"', "",
             "[trust]", f"ca = {q(pki / 'ca-bundle.pem')}", f"crl = {crl}",
             f"revocation_cache = {q(runtime_dir / 'revocation-cache')}", "",
             "[agent]", 'log_level = "info"', f"runtime_dir = {q(runtime_dir)}", ""]
    for name, listen, remote, resumption in tunnels:
        lines += ["[[tunnel]]", f"name = {q(name)}", f'listen = "127.0.0.1:{listen}"',
                  f'remote = "127.0.0.1:{remote}"', 'server_name = "localhost"',
                  f"session_resumption = {'true' if resumption else 'false'}",
                  *([f"revocation = {q(revocation[name])}"] if revocation and name in revocation else []), ""]
    path.write_text("\n".join(lines))
    return path


@dataclass
class Agent:
    process: ManagedProcess
    log_path: Path
    ports: dict[str, int]

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.process.log_text()

    def session_pid(self) -> int | None:
        for pid in child_pids(self.pid):
            if "agent.session.worker" in cmdline(pid):
                return pid
        return None

    def finished_connections(self) -> int:
        return self.log().count(" to 127.0.0.1:")

    def wait_for_connections(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.finished_connections() < count:
            if time.monotonic() > deadline:
                raise BenchError(f"the agent logged {self.finished_connections()} of {count} connections")
            time.sleep(0.01)


@contextlib.contextmanager
def running_agent(work: Path, name: str, pki: Path, softhsm_conf: Path, module: str,
                  tunnels: list[tuple[str, int, bool]], extra_env: dict[str, str] | None = None,
                  token: str = TOKEN, **config: object) -> Iterator[Agent]:
    """``card-agent run`` with tunnels (name, remote port, session_resumption) on free loopback ports."""
    runtime_dir = work / f"{name}-runtime"
    runtime_dir.mkdir(mode=0o700, exist_ok=True)
    ports = {tunnel_name: free_port() for tunnel_name, _, _ in tunnels}
    config = write_agent_config(work / f"{name}.toml", pki, runtime_dir, module,
                                [(t, ports[t], remote, resumption) for t, remote, resumption in tunnels], token,
                                **config)  # type: ignore[arg-type]
    env = {"SOFTHSM2_CONF": str(softhsm_conf), "CARD_PIN": USER_PIN, **(extra_env or {})}
    log_path = work / f"{name}.log"
    with managed_process([card_agent_executable(), "run", "--config", str(config)], log_path=log_path,
                         env=env, stop_timeout=10) as process:
        agent = Agent(process, log_path, ports)
        deadline = time.monotonic() + 60
        while "card-agent: INFO: ready:" not in agent.log():
            if not process.alive or time.monotonic() > deadline:
                raise BenchError(f"card-agent ({name}) did not become ready (exit {process.returncode}):\n"
                                 f"{agent.log()}")
            time.sleep(0.05)
        try:
            yield agent
        finally:
            # SIGTERM the supervisor only: it ends its card session itself. managed_process then
            # SIGKILLs whatever is left of the process group.
            if process.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while process.alive and time.monotonic() < deadline:
                    time.sleep(0.05)


@dataclass
class Stunnel:
    process: ManagedProcess
    port: int
    config: Path

    def log(self) -> str:
        return self.process.log_text()


def write_token_chain(pki: Path, token: str, path: Path) -> Path:
    """The token's certificate and the issuing CA in one PEM file, as stunnel's ``cert`` and a TLS
    client's certificate chain take them."""
    path.write_bytes((pki / "clients" / f"{token}.pem").read_bytes() + (pki / "issuing-ca.pem").read_bytes())
    return path


def token_key_uri(token: str) -> str:
    """The PKCS#11 URI of a test token's TLS key (CKA_ID 01), as the libp11 engine and the pkcs11-provider take it."""
    return f"pkcs11:token={token};id=%01;type=private"


def engines_dir() -> Path | None:
    text = _first_line(["openssl", "version", "-e"])
    match = re.search(r'ENGINESDIR:\s*"([^"]+)"', text)
    return Path(match.group(1)) if match else None


def write_stunnel_config(path: Path, *, accept_port: int, connect_port: int, cert_chain: Path, ca_bundle: Path,
                         engine_key_uri: str | None = None, key_file: Path | None = None,
                         session_resume: bool = True) -> Path:
    """stunnel client-mode config; with ``engine_key_uri`` the key is on the token through the libp11
    "pkcs11" ENGINE, whose PIN stunnel can only take from this file (hence mode 0600)."""
    # syslog = no: with "foreground = yes" stunnel also logs to syslog, and where /dev/log is missing
    # (containers) it writes every line to /dev/console, which costs it 10-20 ms per connection.
    lines = ["foreground = yes", "syslog = no", "pid =", "debug = info", ""]
    if engine_key_uri is not None:
        lines += ["engine = pkcs11", f"engineCtrl = MODULE_PATH:{SOFTHSM_MODULE}",
                  f"engineCtrl = PIN:{USER_PIN}", ""]
    lines += ["[dicom]", "client = yes", f"accept = {LOOPBACK}:{accept_port}", f"connect = {LOOPBACK}:{connect_port}",
              f"cert = {cert_chain}", f"CAfile = {ca_bundle}", "verifyChain = yes", "checkHost = localhost",
              "sni = localhost", "sslVersionMin = TLSv1.2", "socket = l:TCP_NODELAY=1", "socket = r:TCP_NODELAY=1",
              f"sessionResume = {'yes' if session_resume else 'no'}"]
    if engine_key_uri is not None:
        lines += ["engineId = pkcs11", f"key = {engine_key_uri}"]
    else:
        lines += [f"key = {key_file}"]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    return path


@contextlib.contextmanager
def running_stunnel(executable: str, config: Path, port: int, log_path: Path,
                    env: dict[str, str]) -> Iterator[Stunnel]:
    with managed_process([executable, str(config)], log_path=log_path, env=env) as process:
        wait_for_port(port, 15, process=process)
        yield Stunnel(process, port, config)


# -------------------------------------------------------------------------------- statistics


def _finish_all(processes: list[subprocess.Popen], started: float) -> tuple[list[float], list[bytes]]:
    """Wait for every process at once; each one's time runs from ``started`` to its own exit."""
    durations = [0.0] * len(processes)
    outputs = [b""] * len(processes)

    def finish(index: int) -> None:
        outputs[index] = processes[index].communicate(timeout=900)[0]
        durations[index] = time.perf_counter() - started

    waiters = [threading.Thread(target=finish, args=(index,)) for index in range(len(processes))]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join()
    return durations, outputs


def median(values: list[float]) -> float:
    return statistics.median(values)


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


# ------------------------------------------------------------------------------------ results


@dataclass
class Route:
    key: str
    label: str
    port: int | None = None                 # None: not available
    tls: TlsClientFiles | None = None       # storescu +tls identity (direct rows)
    context: ssl.SSLContext | None = None   # in-process TLS (direct row of the latency clients)
    cpu_pids: Callable[[], list[int]] = field(default=lambda: [])  # relay processes to account CPU to
    unavailable: str = ""
    resumption: Resumption | None = None    # lean client resumes its own TLS session (extra row)


@dataclass
class ConcurrentRun:
    durations: list[float]   # s from the common start to each storescu's exit
    cpu_relay: float

    @property
    def wall(self) -> float:
        return max(self.durations)

    @property
    def fairness(self) -> float:
        return max(self.durations) / min(self.durations)


@dataclass
class BulkResult:
    seconds: list[float] = field(default_factory=list)
    cpu_client: list[float] = field(default_factory=list)
    cpu_relay: list[float] = field(default_factory=list)
    cpu_server: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------- benchmark


class Benchmark:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.reps = args.reps or (3 if self.quick else 9)
        self.samples = args.samples or (20 if self.quick else 50)
        self.sign_n = 5 if self.quick else 20
        self.study_bytes = int((args.study_mb or (40 if self.quick else 280)) * MB)
        self.key = TOKEN_KEYS[args.key]
        self.problems: list[str] = []

    # -- set-up --------------------------------------------------------------------------------

    def provision(self, work: Path) -> None:
        say("provisioning SoftHSM tokens and the test PKI (card-agent softhsm init)")
        env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "OPENSSL_CONF")}
        result = subprocess.run([card_agent_executable(), "softhsm", "init", str(work / "tokens"),
                                 "--revocation-port", str(free_port())], env=env,
                                capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise BenchError(f"card-agent softhsm init failed:\n{result.stdout}\n{result.stderr}")
        export = result.stdout.strip().splitlines()[-1]
        if not export.startswith("export SOFTHSM2_CONF="):
            raise BenchError(f"unexpected output of card-agent softhsm init: {result.stdout!r}")
        self.softhsm_conf = Path(export.partition("=")[2])
        self.pki = work / "tokens" / "pki"
        self.direct_files = TlsClientFiles.issue(self.pki, work / "file-identity", "Direct TLS Benchmark",
                                                 key_type=self.key.key_type)  # the token key's kind
        self.token_chain = write_token_chain(self.pki, self.key.token, work / "token-chain.pem")

    def run(self) -> str:
        started = datetime.datetime.now(datetime.timezone.utc)
        base = Path(self.args.tmp_dir) if self.args.tmp_dir else (
            Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else None)
        work = Path(tempfile.mkdtemp(prefix="card-agent-bench-", dir=base))
        say(f"work directory {work}")
        self.work = work
        try:
            with contextlib.ExitStack() as stack:
                return self._run(stack, work, started)
        finally:
            if self.args.keep:
                say(f"kept {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)

    def _run(self, stack: contextlib.ExitStack, work: Path, started: datetime.datetime) -> str:
        use_system_dcmtk()
        busy = other_heavy_processes()
        deadline = time.monotonic() + self.args.wait_idle
        while busy and time.monotonic() < deadline:
            say(f"waiting (up to {self.args.wait_idle:.0f} s in all) for other heavy processes to end: "
                + "; ".join(busy))
            time.sleep(10)
            busy = other_heavy_processes()
        if busy:
            self.problems.append("other heavy processes were running when the benchmark started (numbers are "
                                 "skewed):\n" + "\n".join(busy))
            say("WARNING: " + self.problems[-1])
        stunnel_exe = shutil.which("stunnel4") or shutil.which("stunnel")
        self.info = machine_info(stunnel_exe)
        self.provision(work)

        say(f"building the bulk study (~{self.study_bytes / MB:.0f} MB)")
        self.files = make_bulk_study(work / "study", self.study_bytes)
        self.total_bytes = sum(p.stat().st_size for p in self.files)
        sizes = [p.stat().st_size for p in self.files]
        self.study_text = (f"{len(self.files)} objects, {self.total_bytes / MB:.1f} MB "
                           f"({min(sizes) / MB:.1f}-{max(sizes) / MB:.1f} MB each; 16-bit CT/MR, "
                           "Explicit VR Little Endian, uncompressed, random pixel data)")

        # servers: the same storescp instances serve every row
        out_plain, out_tls = work / "out-plain", work / "out-tls"
        scp_plain = stack.enter_context(dcmtk.storescp(out_plain, log_level="warn"))
        scp_tls = stack.enter_context(dcmtk.storescp(out_tls, tls=TlsServerFiles.from_pki(self.pki),
                                                     require_client_cert=True, log_level="warn"))
        self.scp_pids = {scp_plain.port: scp_plain.process.pid, scp_tls.port: scp_tls.process.pid}
        self.out_dirs = {scp_plain.port: out_plain, scp_tls.port: out_tls}

        say(f"starting card-agent (token {self.key.token} on SoftHSM, module softhsm2)")
        agent = stack.enter_context(running_agent(
            work, "agent", self.pki, self.softhsm_conf, "softhsm2",
            [("pacs", scp_tls.port, True), ("pacs-full", scp_tls.port, False)], token=self.key.token))
        self.agent = agent

        direct_context = self.direct_files.ssl_context()
        routes = {
            "plain": Route("plain", "plaintext (no TLS)", scp_plain.port),
            "direct": Route("direct", "direct TLS, file key", scp_tls.port, tls=self.direct_files,
                            context=direct_context),
            "direct_resumed": Route("direct_resumed", "direct TLS, file key, resumed (extra row)", scp_tls.port,
                                    context=direct_context, resumption=Resumption()),
            "agent": Route("agent", "card-agent, SoftHSM key", agent.ports["pacs"],
                           cpu_pids=lambda: [agent.pid, *(p for p in [agent.session_pid()] if p)]),
            "agent_full": Route("agent_full", "card-agent, full handshake every time", agent.ports["pacs-full"],
                                cpu_pids=lambda: [agent.pid, *(p for p in [agent.session_pid()] if p)]),
        }
        routes["stunnel"] = self._start_stunnel(stack, work, stunnel_exe, scp_tls.port, engine=True)
        routes["stunnel_file"] = self._start_stunnel(stack, work, stunnel_exe, scp_tls.port, engine=False)
        routes["stunnel_full"] = self._start_stunnel(stack, work, stunnel_exe, scp_tls.port, engine=True,
                                                     session_resume=False)
        self.routes = routes

        self.check_routes()
        agent.wait_for_connections(2)
        self.tls_details = self.describe_tls()

        bulk_keys = ["plain", "direct", "agent", "stunnel", "stunnel_file"]
        self.bulk = self.run_bulk([routes[k] for k in bulk_keys if routes[k].port is not None])
        self.memory = self.agent_memory()
        self.concurrent = self.run_concurrent([routes[k] for k in ("direct", "agent", "stunnel")
                                               if routes[k].port is not None])

        latency_keys = ["plain", "direct", "direct_resumed", "agent_full", "agent", "stunnel", "stunnel_file",
                        "stunnel_full"]
        latency_routes = [routes[k] for k in latency_keys if routes[k].port is not None]
        drain = 10.0 if self.quick else 70.0
        self.quiet = [wait_for_quiet_tcp_table(drain)]
        self.lookup_start = self._lookup_cost()
        self.latency_lean, self.tcp_lean = self.run_latency(latency_routes, "lean", self.lean_call)
        self.latency_isolated, _ = self.run_latency(
            [routes[k] for k in ISOLATED_KEYS if routes[k].port is not None], "lean, isolated", self.lean_call,
            pause=ISOLATION_PAUSE)
        pynetdicom_client = PynetdicomClient()  # cannot resume a TLS session: no "direct, resumed" row
        self.quiet.append(wait_for_quiet_tcp_table(drain))
        self.latency_pynetdicom, self.tcp_pynetdicom = self.run_latency(
            [r for r in latency_routes if r.resumption is None], "pynetdicom",
            lambda route: pynetdicom_client.echo(route.port, route.context))
        self.lookup_end = self._lookup_cost()
        self.agent_log_counts = (agent.log().count(" resumed "), agent.log().count(" full handshake "))
        self.stunnel_reuse = {k: self._stunnel_reuse(routes[k]) for k in ("stunnel", "stunnel_file", "stunnel_full")}

        self.signatures = self.count_signatures(work, scp_tls.port)
        self.revocation = measure_revocation(stack, work, self.pki, self.softhsm_conf, scp_tls.port, self.samples,
                                             token=self.key.token)
        busy = other_heavy_processes()
        if busy:
            self.problems.append("other heavy processes were running when the benchmark ended (numbers are "
                                 "skewed):\n" + "\n".join(busy))
        finished = datetime.datetime.now(datetime.timezone.utc)
        return self.report(started, finished)

    def _start_stunnel(self, stack: contextlib.ExitStack, work: Path, executable: str | None, remote_port: int,
                       *, engine: bool, session_resume: bool = True) -> Route:
        key, label = ("stunnel", "stunnel + libp11 engine, SoftHSM key") if engine else (
            "stunnel_file", "stunnel, file key (extra row)")
        if not session_resume:
            key, label = f"{key}_full", f"{label.removesuffix(' (extra row)')}, full handshake every time (extra row)"
        if executable is None:
            return Route(key, label, unavailable="stunnel4 is not installed")
        if engine:
            directory = engines_dir()
            if directory is None or not (directory / "pkcs11.so").exists():
                return Route(key, label, unavailable=f"no pkcs11.so in the OpenSSL engines directory {directory} "
                                                     "(install libengine-pkcs11-openssl)")
        port = free_port()
        config = write_stunnel_config(
            work / f"{key}.conf", accept_port=port, connect_port=remote_port, cert_chain=self.token_chain if engine
            else self.direct_files.chain, ca_bundle=self.pki / "ca-bundle.pem",
            engine_key_uri=token_key_uri(self.key.token) if engine else None,
            key_file=None if engine else self.direct_files.key, session_resume=session_resume)
        say(f"starting {label}")
        try:
            stunnel = stack.enter_context(running_stunnel(executable, config, port, work / f"{key}.log",
                                                          {"SOFTHSM2_CONF": str(self.softhsm_conf)}))
            lean_echo(port)
        except Exception as error:  # noqa: BLE001 (reported as n/a with the reason)
            log = (work / f"{key}.log").read_text(errors="replace") if (work / f"{key}.log").exists() else ""
            tail = "\n".join(line for line in log.splitlines()[-15:])
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
            self.problems.append(f"{label}: does not work here: {reason}\nlast lines of its log:\n{tail}")
            return Route(key, label, unavailable=reason)
        pid = stunnel.process.pid
        return Route(key, label, port, cpu_pids=lambda: [pid])

    def _stunnel_reuse(self, route: Route) -> tuple[int, int] | None:
        if route.port is None:
            return None
        log = (self.work_log(route.key)).read_text(errors="replace")
        return log.count("previous session reused"), log.count("new session negotiated")

    def work_log(self, key: str) -> Path:
        return self.work / f"{key}.log"

    def check_routes(self) -> None:
        say("checking every route with one C-ECHO")
        for route in self.routes.values():
            if route.port is None:
                continue
            lean_echo(route.port, route.context)

    def describe_tls(self) -> list[str]:
        lines = []
        info: dict = {}
        lean_echo(self.routes["direct"].port, self.routes["direct"].context, info)
        lines.append("in-process client (Python ssl, file key) -> storescp: "
                     f"{info.get('version')}, {info.get('cipher')}")
        echo = subprocess.run(dcmtk.echoscu_argv(self.routes["direct"].port, tls=self.direct_files, log_level="debug",
                                                 called_ae=CALLED_AE),
                              capture_output=True, text=True, env=peer_env(), timeout=60)
        protocol = re.search(r"Protocol\s*:\s*(\S+)", echo.stdout + echo.stderr)
        cipher = re.search(r"Ciphersuite\s*:\s*(\S+)", echo.stdout + echo.stderr)
        lines.append(f"DCMTK storescu/echoscu +tls (file key) -> storescp: {protocol.group(1) if protocol else '?'}, "
                     f"{cipher.group(1).rstrip(',') if cipher else '?'}")
        versions = sorted(set(re.findall(r": (TLSv1\.\d) (?:resumed|full handshake) ", self.agent.log())))
        lines.append(f"card-agent -> storescp: {', '.join(versions) or '?'} (cipher suite not logged by the agent)")
        for key in ("stunnel", "stunnel_file"):
            route = self.routes[key]
            if route.port is None:
                continue
            log = self.work_log(key).read_text(errors="replace")
            suites = sorted(set(re.findall(r"(TLSv1\.\d) ciphersuite: (\S+)", log)))
            lines.append(f"{route.label} -> storescp: {', '.join(' '.join(s) for s in suites) or '?'}")
        return lines

    # -- 1. bulk -------------------------------------------------------------------------------

    def _clear_out(self, port: int) -> None:
        out = self.out_dirs[port]
        for path in out.rglob("*"):
            if path.is_file():
                path.unlink()

    def _stored(self, port: int) -> int:
        return sum(1 for p in self.out_dirs[port].rglob("*") if p.is_file() and not p.name.startswith("."))

    def run_bulk(self, routes: list[Route]) -> dict[str, BulkResult]:
        results = {route.key: BulkResult() for route in routes}
        say(f"bulk: {len(routes)} routes x {self.reps} interleaved runs of {len(self.files)} objects, "
            f"{self.total_bytes / MB:.0f} MB")
        for rep in range(-1, self.reps):  # rep -1: warm-up, not counted
            order = routes[rep % len(routes):] + routes[:rep % len(routes)]
            for route in order:
                server_port = self._server_port(route)
                self._clear_out(server_port)
                argv = dcmtk.storescu_argv(route.port, self.files, tls=route.tls, called_ae=CALLED_AE,
                                           log_level="warn")
                relay_pids = route.cpu_pids()
                relay_before = sum(proc_stat_cpu(p) for p in relay_pids)
                server_before = proc_stat_cpu(self.scp_pids[server_port])
                children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
                started = time.perf_counter()
                result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, errors="replace", env=peer_env(),
                                        timeout=900)
                elapsed = time.perf_counter() - started
                children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
                time.sleep(0.05)  # let the relay account its last bytes
                relay_cpu = sum(proc_stat_cpu(p) for p in relay_pids) - relay_before
                server_cpu = proc_stat_cpu(self.scp_pids[server_port]) - server_before
                stored = self._stored(server_port)
                if result.returncode != 0 or stored != len(self.files):
                    raise BenchError(f"bulk {route.label}: storescu exit {result.returncode}, {stored} of "
                                     f"{len(self.files)} stored:\n{result.stdout[-3000:]}")
                say(f"  {'warm-up' if rep < 0 else f'run {rep + 1}/{self.reps}'} {route.label}: "
                    f"{self.total_bytes / MB / elapsed:.0f} MB/s ({elapsed:.2f} s)")
                if rep < 0:
                    continue
                entry = results[route.key]
                entry.seconds.append(elapsed)
                entry.cpu_client.append((children_after.ru_utime - children_before.ru_utime)
                                        + (children_after.ru_stime - children_before.ru_stime))
                entry.cpu_relay.append(relay_cpu)
                entry.cpu_server.append(server_cpu)
        for route in routes:
            self._clear_out(self._server_port(route))
        return results

    def run_concurrent(self, routes: list[Route]) -> dict[str, list[ConcurrentRun]]:
        """CONCURRENT_TRANSFERS storescu at once per route, each with its share of the study."""
        shares = [self.files[index::CONCURRENT_TRANSFERS] for index in range(CONCURRENT_TRANSFERS)]
        if not all(shares):
            raise BenchError(f"the study has {len(self.files)} objects: fewer than {CONCURRENT_TRANSFERS} transfers "
                             "need (use a larger --study-mb)")
        results: dict[str, list[ConcurrentRun]] = {route.key: [] for route in routes}
        say(f"concurrent: {len(routes)} routes x {self.reps} interleaved runs of {CONCURRENT_TRANSFERS} "
            "storescu at once")
        for rep in range(-1, self.reps):
            order = routes[rep % len(routes):] + routes[:rep % len(routes)]
            for route in order:
                server_port = self._server_port(route)
                self._clear_out(server_port)
                relay_pids = route.cpu_pids()
                relay_before = sum(proc_stat_cpu(p) for p in relay_pids)
                started = time.perf_counter()
                processes = [subprocess.Popen(
                    dcmtk.storescu_argv(route.port, share, tls=route.tls, called_ae=CALLED_AE, log_level="warn"),
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=peer_env())
                    for share in shares]
                durations, outputs = _finish_all(processes, started)
                for process, output in zip(processes, outputs, strict=True):
                    if process.returncode != 0:
                        raise BenchError(f"concurrent {route.label}: storescu exit {process.returncode}:\n"
                                         f"{output[-3000:].decode(errors='replace')}")
                stored = self._stored(server_port)
                if stored != len(self.files):
                    raise BenchError(f"concurrent {route.label}: {stored} of {len(self.files)} stored")
                time.sleep(0.05)
                relay_cpu = sum(proc_stat_cpu(p) for p in relay_pids) - relay_before
                run = ConcurrentRun(durations, relay_cpu)
                say(f"  {'warm-up' if rep < 0 else f'run {rep + 1}/{self.reps}'} {route.label}: "
                    f"{self.total_bytes / MB / run.wall:.0f} MB/s aggregate, slowest/fastest {run.fairness:.2f}")
                if rep >= 0:
                    results[route.key].append(run)
        for route in routes:
            self._clear_out(self._server_port(route))
        return results

    def _server_port(self, route: Route) -> int:
        return self.routes["plain"].port if route.key == "plain" else self.routes["direct"].port

    # -- 4. memory -----------------------------------------------------------------------------

    def agent_memory(self) -> list[tuple[str, int, int | None]]:
        session = self.agent.session_pid()
        rows = [("supervisor (card-agent run)", self.agent.pid, vm_hwm_kib(self.agent.pid))]
        if session is not None:
            rows.append(("card-session (python -m dicom_card_agent.session.worker)", session, vm_hwm_kib(session)))
        else:
            self.problems.append("the card-session child of the agent was not found in /proc")
        return rows

    # -- 2. latency ----------------------------------------------------------------------------

    def _lookup_cost(self) -> PeerLookupCost | None:
        try:
            return peer_lookup_cost()
        except Exception as error:  # noqa: BLE001 (agent internals may change; the rest still runs)
            self.problems.append(f"cannot measure the agent's local peer check: {type(error).__name__}: {error}")
            return None

    def lean_call(self, route: Route) -> None:
        lean_echo(route.port, route.context, resumption=route.resumption)

    def run_latency(self, routes: list[Route], client: str, call: Callable[[Route], None],
                    pause: float = 0.0) -> tuple[dict[str, list[float]], tuple[int, int]]:
        """``pause`` seconds after each sample: the next one starts once this one's relay has
        finished with it (closing, logging), instead of sharing the CPUs with that."""
        say(f"latency ({client} client): {len(routes)} routes x {self.samples} interleaved associations")
        for route in routes:  # warm-up (the agent's resumed tunnel gets its session here)
            for _ in range(3):
                call(route)
        time.sleep(0.2)
        samples: dict[str, list[float]] = {route.key: [] for route in routes}
        rows_seen = [tcp_table_rows()]
        for index in range(self.samples):
            order = routes[index % len(routes):] + routes[:index % len(routes)]
            for route in order:
                started = time.perf_counter()
                call(route)
                samples[route.key].append((time.perf_counter() - started) * 1000)
                if pause:
                    time.sleep(pause)
            if index % 10 == 0:
                rows_seen.append(tcp_table_rows())
        rows_seen.append(tcp_table_rows())
        for route in routes:
            say(f"  {route.label}: median {median(samples[route.key]):.2f} ms, p90 {p90(samples[route.key]):.2f} ms")
        return samples, (min(rows_seen), max(rows_seen))

    # -- 3. token signatures -------------------------------------------------------------------

    def count_signatures(self, work: Path, remote_port: int) -> dict:
        say("token signatures: card-agent on the fault_pkcs11 wrapper around SoftHSM")
        try:
            module = build_fault_module(work / "fault-build")
        except Exception as error:  # noqa: BLE001
            self.problems.append(f"cannot build fault_pkcs11: {error}")
            return {}
        card = FaultControl(work / "card.ctl")
        result: dict = {"module": str(module)}
        with running_agent(work, "agent-fault", self.pki, self.softhsm_conf, str(module),
                           [("pacs", remote_port, True), ("pacs-full", remote_port, False)],
                           extra_env=card.env(), token=self.key.token) as agent:
            result["at_start"] = card.signatures()
            done = 0
            for tunnel in ("pacs", "pacs-full"):
                lean_echo(agent.ports[tunnel])  # the first association is a full handshake either way
                done += 1
                agent.wait_for_connections(done)
                log_before = agent.log()
                before = card.signatures()
                for _ in range(self.sign_n):
                    lean_echo(agent.ports[tunnel])
                    done += 1
                    agent.wait_for_connections(done)
                after = card.signatures()
                new_log = agent.log()[len(log_before):]
                result[tunnel] = {
                    "associations": self.sign_n,
                    "signatures": after - before,
                    "resumed": new_log.count(" resumed "),
                    "full": new_log.count(" full handshake "),
                }
        result["calls_logged"] = len(card.log_lines())
        return result

    # -- report --------------------------------------------------------------------------------

    def report(self, started: datetime.datetime, finished: datetime.datetime) -> str:
        out: list[str] = []
        mode = "quick" if self.quick else "full"
        out.append(f"### dicom-card-agent benchmark ({mode} mode)")
        out.append("")
        out.append(f"Run {started:%Y-%m-%d %H:%M} to {finished:%H:%M} UTC; command: "
                   f"`.venv/bin/python benchmarks/run.py{' --quick' if self.quick else ''}"
                   f"{' --key ec' if self.key is TOKEN_KEYS['ec'] else ''}`; code: "
                   f"commit {git_commit()}")
        out.append("")
        out.append("| machine | |")
        out.append("|---|---|")
        for key, value in self.info.items():
            out.append(f"| {key} | {value} |")
        out.append("")
        out.append(f"Study: {self.study_text}. Token key: SoftHSM token `{self.key.token}`, "
                   f"{self.key.description}, id 01. File key: {self.key.description} issued from the same test "
                   "CA. Server: one `storescp +tls ... -rc` (client certificate required) for every TLS row, one "
                   "plain `storescp` for the plaintext row; TCP_NODELAY=1 for DCMTK.")
        out.append("")
        out.append("Negotiated:")
        out += [f"- {line}" for line in self.tls_details]
        out.append("")

        # 1. bulk
        out.append(f"#### 1. Bulk throughput: storescu -R -xy -> storescp, one association, "
                   f"{len(self.files)} objects / {self.total_bytes / MB:.1f} MB, {self.reps} interleaved runs")
        out.append("")
        cpus = os.cpu_count() or 1
        out.append("| route | median MB/s | best MB/s | vs direct TLS: median / best | vs stunnel: median / best "
                   "| target | result: median / best | CPU s/run: storescu / relay / storescp | relay CPU s/GB "
                   f"| CPU ceiling on {cpus} cores |")
        out.append("|---|---:|---:|---:|---:|---|---|---|---:|---:|")
        self.summary: list[tuple[str, str, str]] = []
        speeds = {key: (self.total_bytes / MB / median(entry.seconds), self.total_bytes / MB / min(entry.seconds))
                  for key, entry in self.bulk.items()}
        gigabytes = self.total_bytes / 1e9
        relay_per_gb = {key: median(entry.cpu_relay) / gigabytes for key, entry in self.bulk.items()}

        def ratio_text(key: str, reference: str) -> str:
            if key not in speeds or reference not in speeds:
                return "n/a"
            return f"{speeds[key][0] / speeds[reference][0]:.2f}x / {speeds[key][1] / speeds[reference][1]:.2f}x"

        for key in ("plain", "direct", "agent", "stunnel", "stunnel_file"):
            route = self.routes[key]
            role = {"plain": "(reference)", "direct": "(reference)", "stunnel": "(baseline)",
                    "stunnel_file": "(comparison)"}.get(key, f">= {TARGET_BULK:.2f}x stunnel")
            if key not in self.bulk:
                out.append(f"| {route.label} | n/a | n/a | n/a | n/a | {role} | n/a | {route.unavailable} | | |")
                continue
            entry = self.bulk[key]
            med, best = speeds[key]
            result = ""
            if key == "agent" and "stunnel" in speeds:
                ok = med / speeds["stunnel"][0] >= TARGET_BULK
                ok_best = best / speeds["stunnel"][1] >= TARGET_BULK
                result = f"{verdict(ok)} / {verdict(ok_best)}"
                self.summary.append((f"bulk through the agent >= {TARGET_BULK:.1f}x stunnel (same key)",
                                     ratio_text("agent", "stunnel"), result))
                cpu_ok = relay_per_gb["agent"] <= TARGET_CPU_PER_GB * relay_per_gb["stunnel"]
                self.summary.append(("relay CPU per GB <= stunnel's",
                                     f"{relay_per_gb['agent']:.2f} vs {relay_per_gb['stunnel']:.2f} s/GB",
                                     verdict(cpu_ok)))
            relayed = key not in ("plain", "direct")
            relay_cpu = median(entry.cpu_relay) if relayed else 0.0
            parts = [median(entry.cpu_client), relay_cpu, median(entry.cpu_server)]
            bound = max(sum(parts) / cpus, max(parts))  # no schedule on `cpus` cores can do better
            out.append(f"| {route.label} | {med:.0f} | {best:.0f} | {ratio_text(key, 'direct')} | "
                       f"{ratio_text(key, 'stunnel')} | {role} | {result} | {parts[0]:.2f} / "
                       f"{f'{relay_cpu:.2f}' if relayed else '-'} / {parts[2]:.2f} | "
                       f"{f'{relay_per_gb[key]:.2f}' if relayed else '-'} | {self.total_bytes / MB / bound:.0f} MB/s |")
        out.append("")
        out.append("MB = 10^6 bytes of DICOM files sent, timed from storescu start to exit (includes its start-up "
                   "and the TLS handshake). Median and best of the runs, each ratio against the same statistic "
                   "of the reference route; host noise only ever slows a run down, so \"best\" estimates the "
                   "undisturbed speed and \"median\" the typical one. CPU = user+system seconds per run (median) "
                   "of storescu, of the relay process(es) (agent: supervisor + card-session; stunnel) and of "
                   "storescp; relay CPU s/GB = the relay's median per GB of DICOM files. CPU ceiling = study bytes "
                   "/ max(sum of the three CPU times / cores, the largest one): the throughput no scheduling of "
                   "that much work on this many cores could beat.")
        out.append("")

        # 2. latency
        out.append(f"#### 2. Fresh association: connect + A-ASSOCIATE + C-ECHO + A-RELEASE, median of {self.samples} "
                   "(p90), interleaved")
        out.append("")
        out.append("| route | lean client ms | vs direct | vs stunnel | pynetdicom ms | vs direct | vs stunnel "
                   "| target | lean | pynetdicom |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---|---|---|")
        lean_direct = median(self.latency_lean["direct"])
        pyn_direct = median(self.latency_pynetdicom["direct"])
        # Each agent row against the stunnel row of the same kind: full handshakes against stunnel with
        # session resumption off, resumed against stunnel resuming (its default).
        baselines = {"agent_full": "stunnel_full", "agent": "stunnel"}
        latency_targets = {"plain": ("(reference)", None), "direct": ("(reference)", None),
                           "direct_resumed": ("(extra: resumption floor)", None),
                           "agent_full": (f"<= {TARGET_FULL:.2f}x stunnel, full", TARGET_FULL),
                           "agent": (f"<= {TARGET_RESUMED:.2f}x stunnel, resumed", TARGET_RESUMED),
                           "stunnel": ("(baseline, resumed)", None), "stunnel_file": ("(comparison)", None),
                           "stunnel_full": ("(baseline, full)", None)}
        labels = {"agent": "card-agent, resumed (default)", "agent_full": "card-agent, full handshake "
                  "(session_resumption = false)"}
        for key in ("plain", "direct", "direct_resumed", "agent_full", "agent", "stunnel", "stunnel_file",
                    "stunnel_full"):
            route = self.routes[key]
            label = labels.get(key, route.label)
            target_text, target = latency_targets[key]
            if key not in self.latency_lean:
                out.append(f"| {label} | n/a | | | n/a | | | {target_text} | n/a | n/a |")
                continue
            baseline = baselines.get(key, "stunnel_full" if key == "direct" else "stunnel")

            def versus(samples: dict[str, list[float]], reference: str, key: str = key) -> float:
                return (median(samples[key]) / median(samples[reference])
                        if key in samples and reference in samples else math.nan)

            lean = self.latency_lean[key]
            lean_vs_stunnel = versus(self.latency_lean, baseline)
            lean_ok = None if target is None else lean_vs_stunnel <= target
            pyn = self.latency_pynetdicom.get(key)
            if pyn is not None:
                pyn_vs_stunnel = versus(self.latency_pynetdicom, baseline)
                pyn_ok = None if target is None else pyn_vs_stunnel <= target
                pyn_text = (f"{median(pyn):.2f} ({p90(pyn):.2f}) | {median(pyn) / pyn_direct:.2f}x | "
                            f"{pyn_vs_stunnel:.2f}x")
            else:
                pyn_vs_stunnel, pyn_ok, pyn_text = math.nan, None, "n/a | | "
            out.append(f"| {label} | {median(lean):.2f} ({p90(lean):.2f}) | {median(lean) / lean_direct:.2f}x | "
                       f"{lean_vs_stunnel:.2f}x | {pyn_text} | {target_text} | "
                       f"{verdict(lean_ok) if target else ''} | {verdict(pyn_ok) if target else ''} |")
            if target is not None:
                name = (f"association set-up, full handshake every time <= {TARGET_FULL:.1f}x stunnel"
                        if key == "agent_full" else f"association set-up, resumed <= {TARGET_RESUMED:.1f}x stunnel")
                self.summary.append((name, f"lean {lean_vs_stunnel:.2f}x, pynetdicom {pyn_vs_stunnel:.2f}x",
                                     f"lean {verdict(lean_ok)}, pynetdicom {verdict(pyn_ok)}"))
        out.append("")
        out.append(f"Isolated samples (extra, no verdict): the lean client again, the same rotation, each sample "
                   f"{ISOLATION_PAUSE * 1000:.0f} ms after the previous one ended, so that none shares the CPUs "
                   "with the previous route's relay still closing its connection (back to back, each route "
                   "pays for the one before it: the agent's full-handshake row follows its resumed row).")
        out.append("")
        out.append("| route | lean client ms, isolated | vs stunnel (same kind) |")
        out.append("|---|---:|---:|")
        for key in ISOLATED_KEYS:
            if key not in self.latency_isolated:
                continue
            reference = baselines.get(key, key)
            ratio = (f"{median(self.latency_isolated[key]) / median(self.latency_isolated[reference]):.2f}x"
                     if reference in self.latency_isolated else "n/a")
            out.append(f"| {labels.get(key, self.routes[key].label)} | {median(self.latency_isolated[key]):.2f} "
                       f"({p90(self.latency_isolated[key]):.2f}) | {ratio} |")
        out.append("")
        floor = median(self.latency_pynetdicom["plain"]) - median(self.latency_lean["plain"])
        out.append("Both clients run in the benchmark process and speak the same DICOM: A-ASSOCIATE-RQ "
                   "(Verification), C-ECHO-RQ, A-RELEASE-RQ, then close; the time runs from connect() to the "
                   "A-RELEASE-RP. The lean client is a raw socket with stdlib `ssl` for the direct rows (full "
                   "handshake every time unless marked resumed; "
                   f"{self.key.description} file key; server verified against the "
                   "CA with host name check, as the agent does): its verdicts are the ones that measure the "
                   "transport. pynetdicom is the same for every row too (one AE, TLS through the same "
                   f"SSLContext for the direct row), but its own machinery adds {floor:.1f} ms per association "
                   "(its plaintext median minus the lean one) and several ms of jitter, more than the "
                   "differences being measured: read its ratios as what a pynetdicom application would "
                   "notice, not as transport cost. The direct rows do their handshake in the client process, "
                   "the agent and stunnel rows in their relay process. Every TLS client in this run (this "
                   f"process, storescu, stunnel, the agent) offers the groups {TLS_GROUPS} in that order, through "
                   "one OpenSSL configuration (the agent: its own, with the same groups), so that no row pays "
                   "storescp's HelloRetryRequest (DCMTK 3.6.7 answers an X25519 key share with one for P-256) "
                   "and the others not.")
        stunnel_note = []
        for key in ("stunnel", "stunnel_file", "stunnel_full"):
            reuse = self.stunnel_reuse.get(key)
            if reuse:
                stunnel_note.append(f"{self.routes[key].label}: {reuse[0]} resumed, {reuse[1]} full handshakes")
        out.append("")
        out.append(f"Handshakes over the whole run: card-agent {self.agent_log_counts[0]} resumed, "
                   f"{self.agent_log_counts[1]} full; " + "; ".join(stunnel_note) + ".")
        direct_resumed = self.routes["direct_resumed"].resumption
        out.append(f"The extra \"direct TLS, resumed\" row (lean client only) resumed {direct_resumed.resumed} and "
                   f"fully negotiated {direct_resumed.full} of its handshakes.")
        out.append("")
        start, end = self.lookup_start, self.lookup_end
        lookup = (f"measured here with the agent's own code: {start.admit_ms:.2f} ms at {start.rows} rows before the "
                  f"latency runs, {end.admit_ms:.2f} ms at {end.rows} rows after them (its fallback without "
                  f"sock_diag, reading and parsing that table, would take {start.read_ms:.2f} + "
                  f"{start.parse_ms:.2f} ms and {end.read_ms:.2f} + {end.parse_ms:.2f} ms)."
                  if start and end else "its cost could not be measured (see problems).")
        out.append(f"Each latency phase started after the TIME_WAIT sockets of earlier connections had expired "
                   f"(waited {self.quiet[0][1]:.0f} s and {self.quiet[1][1]:.0f} s; {self.quiet[0][0]} and "
                   f"{self.quiet[1][0]} left). "
                   f"Sockets in /proc/net/tcp during the latency runs (TIME_WAIT included; the runs make them): "
                   f"lean {self.tcp_lean[0]}-{self.tcp_lean[1]}, pynetdicom {self.tcp_pynetdicom[0]}-"
                   f"{self.tcp_pynetdicom[1]}. The agent identifies the user of every local TCP connection with "
                   f"agent.tunnel.peer.admit_peer, which asks the kernel (sock_diag) for the client's socket alone; "
                   f"{lookup}")
        out.append("")

        # 3. signatures
        out.append("#### 3. Token signatures per association (fault_pkcs11 wrapper around SoftHSM, C_Sign counted)")
        out.append("")
        sig = self.signatures
        if sig:
            out.append("| tunnel | associations (after the first) | C_Sign | per association | handshakes logged "
                       "| target | result |")
            out.append("|---|---:|---:|---:|---|---|---|")
            for tunnel, label, target in (("pacs", "resumed (default)", 0),
                                          ("pacs-full", "session_resumption = false", None)):
                entry = sig[tunnel]
                per = entry["signatures"] / entry["associations"]
                ok = None if target is None else per == target
                out.append(f"| {label} | {entry['associations']} | {entry['signatures']} | {per:.2f} | "
                           f"{entry['resumed']} resumed, {entry['full']} full | "
                           f"{'0' if target == 0 else '(expect 1)'} | {verdict(ok) if target is not None else ''} |")
                if target == 0:
                    self.summary.append(("0 token signatures per resumed association", f"{per:.2f}", verdict(ok)))
            out.append("")
            out.append(f"Signatures at agent start-up (sign-in and context set-up, before any association): "
                       f"{sig['at_start']}.")
        else:
            out.append("n/a (see problems)")
        out.append("")

        # 4. memory
        out.append("#### 4. Agent peak RSS (VmHWM) after the bulk runs")
        out.append("")
        out.append("| process | VmHWM |")
        out.append("|---|---:|")
        for name, _pid, kib in self.memory:
            out.append(f"| {name} | {kib / 1024:.1f} MiB |" if kib is not None else f"| {name} | ? |")
        out.append("")

        # 5. concurrent transfers
        out.append(f"#### 5. {CONCURRENT_TRANSFERS} concurrent transfers: {CONCURRENT_TRANSFERS} storescu at once, "
                   f"each with 1/{CONCURRENT_TRANSFERS} of the study, {self.reps} interleaved runs")
        out.append("")
        out.append("| route | aggregate MB/s, median | vs stunnel | slowest / fastest transfer, median (worst) "
                   "| relay CPU s/run | relay CPU s/GB (one transfer, section 1) | target | result |")
        out.append("|---|---:|---:|---|---:|---:|---|---|")
        aggregate = {key: self.total_bytes / MB / median([run.wall for run in runs])
                     for key, runs in self.concurrent.items() if runs}
        for key in ("direct", "agent", "stunnel"):
            route = self.routes[key]
            runs = self.concurrent.get(key)
            if not runs:
                out.append(f"| {route.label} | n/a | | | | | {route.unavailable} |")
                continue
            versus_stunnel = aggregate[key] / aggregate["stunnel"] if "stunnel" in aggregate else math.nan
            fairness = [run.fairness for run in runs]
            target_text, result = {"direct": ("(reference)", ""), "stunnel": ("(baseline)", "")}.get(key, (
                f">= {TARGET_CONCURRENT:.1f}x stunnel", verdict(versus_stunnel >= TARGET_CONCURRENT)))
            relay_cpu = median([run.cpu_relay for run in runs])
            relay = f"{relay_cpu:.2f}" if key != "direct" else "-"
            one_transfer = f" ({relay_per_gb[key]:.2f})" if key in relay_per_gb else ""
            per_gb = f"{relay_cpu / gigabytes:.2f}{one_transfer}" if key != "direct" else "-"
            out.append(f"| {route.label} | {aggregate[key]:.0f} | {versus_stunnel:.2f}x | "
                       f"{median(fairness):.2f} ({max(fairness):.2f}) | {relay} | {per_gb} | {target_text} | "
                       f"{result} |")
            if key == "agent":
                self.summary.append((f"{CONCURRENT_TRANSFERS} concurrent transfers, aggregate >= "
                                     f"{TARGET_CONCURRENT:.1f}x stunnel", f"{versus_stunnel:.2f}x; slowest/fastest "
                                     f"{median(fairness):.2f}", result))
        out.append("")
        out.append("Aggregate = study bytes / time until the last of the transfers ended; fairness = the slowest "
                   "transfer's time over the fastest one's (1.00 = all alike), both from one common start. Relay CPU "
                   "per GB beside the one-transfer figure of section 1: with eight transfers the two cores are "
                   "saturated, so the aggregate follows the CPU each GB costs, the relay's included; a relay that "
                   "pays more for serving many connections at once (one process, one interpreter lock) shows it here.")
        out.append("")

        out += self.revocation.report()
        if self.revocation.target_met is not None:
            self.summary.append(("association set-up with revocation (cached) <= 0.1 ms over off",
                                 f"{self.revocation.difference_ms:+.2f} ms", verdict(self.revocation.target_met)))
        out.append("#### Targets")
        out.append("")
        out.append("| target | measured | result |")
        out.append("|---|---|---|")
        for name, measured, result in self.summary:
            out.append(f"| {name} | {measured} | {result} |")
        out.append("")
        if self.problems:
            out.append("#### Problems")
            out.append("")
            for problem in self.problems:
                out.append("```")
                out.append(problem)
                out.append("```")
            out.append("")
        return "\n".join(out)


# ---------------------------------------------------------------------------------------- revocation


@dataclass
class RevocationResult:
    """Association set-up through the agent with revocation off and on (answer cached), in the same
    run and alternating; and the cost of a first, uncached OCSP check against the local responder."""

    off_ms: list[float]
    cached_ms: list[float]
    first_check_ms: list[float]
    cached_check_us: list[float]
    requests_during_cached_rows: int

    @property
    def difference_ms(self) -> float:
        return median(self.cached_ms) - median(self.off_ms)

    @property
    def target_met(self) -> bool | None:
        return self.difference_ms <= 0.1 if self.off_ms and self.cached_ms else None

    def report(self) -> list[str]:
        return [
            "#### Revocation checking (OCSP, `openssl ocsp` on loopback)",
            "",
            "Fresh association + C-ECHO (lean client, full TLS handshake each time: no resumption) through one "
            "agent with two tunnels to the same storescp, alternating; `[trust] crl` empty, so the \"require\" "
            "tunnel's answer comes from OCSP, fetched once and cached.",
            "",
            "| row | median | p90 | samples |",
            "|---|---|---|---|",
            f"| set-up, revocation = \"off\" | {median(self.off_ms):.2f} ms | {p90(self.off_ms):.2f} ms | "
            f"{len(self.off_ms)} |",
            f"| set-up, revocation = \"require\", answer cached | {median(self.cached_ms):.2f} ms | "
            f"{p90(self.cached_ms):.2f} ms | {len(self.cached_ms)} |",
            f"| difference (target <= 0.1 ms) | {self.difference_ms:+.2f} ms | | |",
            f"| OCSP requests during the cached rows | {self.requests_during_cached_rows} | | |",
            f"| first, uncached check (in-process: request, `openssl ocsp`, verification) | "
            f"{median(self.first_check_ms):.1f} ms | {p90(self.first_check_ms):.1f} ms | {len(self.first_check_ms)} |",
            f"| cached check (in-process) | {median(self.cached_check_us):.1f} us | {p90(self.cached_check_us):.1f} us "
            f"| {len(self.cached_check_us)} |",
            "",
        ]


def measure_revocation(stack: contextlib.ExitStack, work: Path, pki: Path, softhsm_conf: Path, scp_port: int,
                       samples: int, token: str = TOKEN) -> RevocationResult:
    from cryptography import x509

    from dicom_card_agent.revocation.checker import RevocationChecker
    from dicom_card_agent.softhsm.responder import ResponderFiles, RevocationServer, configured_port
    from dicom_card_agent.trust.anchors import load_certificates

    files = ResponderFiles.for_pki(pki)
    files.crl_directory = None  # OCSP only
    responder = stack.enter_context(RevocationServer(configured_port(pki.parent), files))
    say("starting card-agent with revocation off and on (OCSP)")
    agent = stack.enter_context(running_agent(
        work, "agent-revocation", pki, softhsm_conf, "softhsm2",
        [("off", scp_port, False), ("on", scp_port, False)], token=token,
        revocation={"off": "off", "on": "require"}, crl_files=False))
    lean_echo(agent.ports["on"])  # fetches and caches the PACS's answer
    before = responder.requests["ocsp"]
    off: list[float] = []
    cached: list[float] = []
    for _ in range(samples):
        for port, into in ((agent.ports["off"], off), (agent.ports["on"], cached)):
            started = time.perf_counter()
            lean_echo(port)
            into.append((time.perf_counter() - started) * 1000)
    requests = responder.requests["ocsp"] - before

    leaf = x509.load_pem_x509_certificate((pki / "server-chain.pem").read_bytes())
    certificates = load_certificates(pki / "ca-bundle.pem")
    first: list[float] = []
    for index in range(min(samples, 20)):
        checker = RevocationChecker(certificates=certificates, ca_source="bench",
                                    cache_directory=work / f"revocation-cache-{index}", refresh=False)
        started = time.perf_counter()
        verdict = checker.check(leaf, "require")
        first.append((time.perf_counter() - started) * 1000)
        if verdict.outcome != "allow":
            raise BenchError(f"the first revocation check did not pass: {verdict.message}")
    cached_check: list[float] = []
    for _ in range(samples):
        started = time.perf_counter()
        checker.check(leaf, "require")
        cached_check.append((time.perf_counter() - started) * 1_000_000)
    return RevocationResult(off, cached, first, cached_check, requests)


def revocation_only(args: argparse.Namespace) -> str:
    """Only the revocation rows (``--revocation-only``): a test PKI, a storescp, the agent."""
    bench = Benchmark(args)
    base = Path(args.tmp_dir) if args.tmp_dir else None
    work = Path(tempfile.mkdtemp(prefix="card-agent-bench-revocation-", dir=base))
    try:
        with contextlib.ExitStack() as stack:
            bench.provision(work)
            dcmtk.STORESCP = _find_system_tool("storescp")
            scp = stack.enter_context(dcmtk.storescp(work / "out", tls=TlsServerFiles.from_pki(bench.pki),
                                                     require_client_cert=True, log_level="warn"))
            result = measure_revocation(stack, work, bench.pki, bench.softhsm_conf, scp.port, bench.samples,
                                        token=bench.key.token)
        return "\n".join(result.report())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------- main


def _terminate(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


_BENCH_OPENSSL_CONF = """\
# benchmarks/run.py: Debian's TLS defaults, plus the agent's group order for every client
openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = tls_defaults
[tls_defaults]
MinProtocol = TLSv1.2
CipherString = DEFAULT@SECLEVEL=2
Groups = {groups}
"""


def _same_tls_groups_for_every_client(argv: list[str]) -> None:
    """Re-run this script under an OpenSSL configuration offering the agent's groups in its order.

    OpenSSL reads OPENSSL_CONF once, when a process starts, and Python's ssl cannot set groups per
    context: so the configuration goes into the environment and the script starts again. Children
    (storescu, storescp, stunnel) inherit it; the agent's card session uses its own."""
    path = Path(tempfile.gettempdir()) / f"card-agent-bench-{os.getuid()}-openssl.cnf"
    if os.environ.get("OPENSSL_CONF") == str(path):
        return
    path.write_text(_BENCH_OPENSSL_CONF.format(groups=TLS_GROUPS))
    os.environ["OPENSSL_CONF"] = str(path)
    os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~40 MB study, 3 bulk runs, 20 latency samples")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    parser.add_argument("--tmp-dir", help="where to create the work directory (default /dev/shm)")
    parser.add_argument("--reps", type=int,
                        help="bulk runs per route (default 9, quick 3), after one discarded warm-up run each")
    parser.add_argument("--samples", type=int, help="latency samples per route (default 50, quick 20)")
    parser.add_argument("--study-mb", type=float, help="bulk study size in MB (default 280, quick 40)")
    parser.add_argument("--key", choices=sorted(TOKEN_KEYS), default="rsa",
                        help="the card's key and the file key's kind: rsa (token alice, RSA-2048; default) "
                             "or ec (token bob, EC P-256)")
    parser.add_argument("--wait-idle", type=float, default=600, metavar="SECONDS",
                        help="wait this long for a running test suite (pytest) to end before starting "
                             "(default 600; then it runs anyway and says so in the report)")
    parser.add_argument("--revocation-only", action="store_true",
                        help="only the revocation rows (set-up with revocation off vs on and cached; first check)")
    args = parser.parse_args(argv)
    _same_tls_groups_for_every_client(argv if argv is not None else sys.argv[1:])
    for name in ("CARD_AGENT_MODULE", "SOFTHSM2_CONF"):
        os.environ.pop(name, None)  # ours and every child's: each gets what it needs explicitly
    if args.revocation_only:
        return print_report(lambda: revocation_only(args))
    return print_report(lambda: Benchmark(args).run())


def print_report(produce: Callable[[], str]) -> int:
    """Run ``produce`` and print its report; the exit status of a benchmark script.

    Ctrl-C, SIGTERM and SIGHUP end it through KeyboardInterrupt (also when a shell started it in
    the background, which leaves SIGINT ignored), so that its ExitStack stops every process."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    try:
        report = produce()
    except KeyboardInterrupt:
        say("interrupted; every process started here has been stopped")
        return 130
    except BenchError as error:
        say(f"failed: {error}")
        return 1
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 1
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
