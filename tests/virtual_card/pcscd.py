"""pcscd with vsmartcard's vpcd reader, for the virtual card tests.

If pcscd already runs (a desktop, or a developer's shell) it is used as it is, provided it has
the vpcd reader; otherwise ``pcscd --foreground`` is started here (CI: root in a fresh container
without systemd) and stopped again at the end. The vpcd reader's TCP port, 35963, is fixed by
the package's /etc/reader.conf.d/vpcd (``DEVICENAME /dev/null:0x8C7B``; vpcd listens on every
interface there, not only loopback). Whatever makes the stack unusable raises
:class:`StackUnavailable` with the precise reason, which the fixtures turn into a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dicom_card_agent.card.pcsc import PcscContext, PcscUnavailable
from dicom_card_agent.tunnel.peer import parse_proc_net_tcp

VPCD_PORT = 35963
VPCD_READER = "Virtual PCD 00 00"  # the reader of port 35963 (35964 is "Virtual PCD 00 01")
VPCD_CONFIG = Path("/etc/reader.conf.d/vpcd")
VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
PCSCD_SOCKET_DIR = Path("/run/pcscd")
OPENSC_MODULE = Path("/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so")
LIBCACARD = "libcacard.so.0"
START_TIMEOUT = 15.0


class StackUnavailable(RuntimeError):
    """The virtual smart-card stack cannot run here; the message says exactly why."""


@dataclass
class Pcscd:
    """The pcscd the tests use; ``process`` is set only when the tests started it."""

    process: subprocess.Popen | None
    log_path: Path | None

    @property
    def started_here(self) -> bool:
        return self.process is not None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def restart(self) -> None:
        """Stop this pcscd and start another, as a package upgrade or an administrator does; the
        card in vpcd's reader goes with the old one (its bridge exits). Only a pcscd started here:
        one the tests found running is left as it is."""
        if self.process is None or self.log_path is None:
            raise StackUnavailable("pcscd runs outside the tests (a desktop's, systemd's): they do not restart it")
        _stop(self.process)
        self.process = _start_pcscd(self.log_path)  # stopped by pcscd_with_vpcd, as the first one would be
        _wait_until_ready(self)


def check_installed() -> None:
    """Every package of the stack is there (scripts/setup installs them)."""
    import ctypes

    missing = []
    if shutil.which("pcscd") is None and not Path("/usr/sbin/pcscd").exists():
        missing.append("pcscd (package pcscd)")
    if not VPCD_DRIVER.exists() or not VPCD_CONFIG.exists():
        missing.append(f"{VPCD_DRIVER} and {VPCD_CONFIG} (package vsmartcard-vpcd)")
    try:
        ctypes.CDLL(LIBCACARD)
    except OSError:
        missing.append(f"{LIBCACARD} (package libcacard0)")
    if shutil.which("certutil") is None:
        missing.append("certutil (package libnss3-tools)")
    if not OPENSC_MODULE.exists():
        missing.append(f"{OPENSC_MODULE} (package opensc)")
    if missing:
        raise StackUnavailable("not installed: " + "; ".join(missing) + " (scripts/setup installs them)")
    config = VPCD_CONFIG.read_text(errors="replace")
    if "0x8c7b" not in config.lower():
        raise StackUnavailable(f"{VPCD_CONFIG} does not put the vpcd reader on port {VPCD_PORT} (0x8C7B)")


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def _vpcd_reader(context: PcscContext) -> bool:
    return VPCD_READER in context.readers()


def _pcscd_answers() -> PcscContext | None:
    try:
        return PcscContext()
    except PcscUnavailable:
        return None


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def pcscd_with_vpcd(workdir: Path) -> Iterator[Pcscd]:
    """A pcscd with the vpcd reader: the running one, or one started (and stopped) here."""
    check_installed()
    context = _pcscd_answers()
    if context is not None:
        try:
            if not _vpcd_reader(context):
                raise StackUnavailable(f"pcscd runs (not started by the tests) but has no reader {VPCD_READER!r}: "
                                       f"restart it after installing vsmartcard-vpcd")
        finally:
            context.release()
        yield Pcscd(None, None)
        return
    if _port_open(VPCD_PORT):
        raise StackUnavailable(f"TCP port {VPCD_PORT} (vpcd's, fixed by {VPCD_CONFIG}) is in use by a program "
                               f"other than pcscd; vpcd cannot listen there")
    if os.geteuid() != 0 and not os.access(PCSCD_SOCKET_DIR if PCSCD_SOCKET_DIR.exists() else PCSCD_SOCKET_DIR.parent,
                                            os.W_OK):
        raise StackUnavailable(f"pcscd is not running and starting it needs root (it creates {PCSCD_SOCKET_DIR}); "
                               "start it as root (pcscd --foreground) and run the tests again")
    _keep_vpcd_port_for_vpcd()
    workdir.mkdir(parents=True, exist_ok=True)
    daemon = Pcscd(_start_pcscd(workdir / "pcscd.log"), workdir / "pcscd.log")
    try:
        _wait_until_ready_or_start_again(daemon)
        yield daemon
    finally:
        if daemon.process is not None:  # the one running now: a test may have restarted it (Pcscd.restart)
            _stop(daemon.process)


VPCD_PORT_TAKEN = "Address already in use"  # vpcd's line in pcscd's log when its bind fails
VPCD_PORT_RETRY_SECONDS = 5.0


def _wait_until_ready_or_start_again(daemon: Pcscd) -> None:
    """:func:`_wait_until_ready`; once more after a pause when vpcd could not bind its port though no
    socket in /proc/net/tcp had it (seen once in five full runs, 2026-11-29: a socket bound and not
    listening is not listed there, so _keep_vpcd_port_for_vpcd cannot wait for it to go)."""
    try:
        _wait_until_ready(daemon)
        return
    except StackUnavailable:
        if daemon.process is None or daemon.log_path is None or VPCD_PORT_TAKEN not in daemon.log_text():
            raise
    _stop(daemon.process)
    time.sleep(VPCD_PORT_RETRY_SECONDS)
    _keep_vpcd_port_for_vpcd()
    daemon.process = _start_pcscd(daemon.log_path)
    try:
        _wait_until_ready(daemon)
    except StackUnavailable as error:
        raise StackUnavailable(f"{error}\n(the second start; the first failed the same way: something held port "
                               f"{VPCD_PORT} without listening or being connected)") from None


def _start_pcscd(log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        # --foreground: our child, so we stop exactly what we started; --error: quiet unless broken
        return subprocess.Popen([shutil.which("pcscd") or "/usr/sbin/pcscd", "--foreground", "--error"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


RESERVED_PORTS = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")
PORT_RELEASE_SECONDS = 65.0  # TIME_WAIT lasts 60 s on Linux


def _keep_vpcd_port_for_vpcd() -> None:
    """vpcd's port lies in the ephemeral range (32768-60999): the suite's own outgoing connections
    took it, and vpcd's bind failed with "Address already in use" (CI run, 2026-11-26). As root,
    reserve it so no connection is given it from now on; then wait until none holds it."""
    if os.geteuid() == 0 and RESERVED_PORTS.exists():
        reserved = RESERVED_PORTS.read_text().strip()
        if not _covers(reserved, VPCD_PORT):
            RESERVED_PORTS.write_text(f"{reserved},{VPCD_PORT}" if reserved else str(VPCD_PORT))
    deadline = time.monotonic() + PORT_RELEASE_SECONDS
    while _port_in_use(VPCD_PORT):
        if time.monotonic() > deadline:
            raise StackUnavailable(f"TCP port {VPCD_PORT} (vpcd's) is still held by a connection after "
                                   f"{PORT_RELEASE_SECONDS:g} s: see `ss -tanp sport = :{VPCD_PORT}`")
        time.sleep(0.5)


def _covers(reserved: str, port: int) -> bool:
    for part in filter(None, reserved.split(",")):
        low, _, high = part.partition("-")
        if int(low) <= port <= int(high or low):
            return True
    return False


def _port_in_use(port: int) -> bool:
    """A TCP socket of any state (a connection in TIME_WAIT too) has ``port`` as its local port."""
    for table, ipv6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            rows = parse_proc_net_tcp(Path(table).read_text(), ipv6)
        except OSError:
            continue
        if any(row.local[1] == port for row in rows):
            return True
    return False


def _wait_until_ready(daemon: Pcscd) -> None:
    assert daemon.process is not None
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if daemon.process.poll() is not None:
            raise StackUnavailable(f"pcscd --foreground exited with status {daemon.process.returncode}:\n"
                                   f"{daemon.log_text()[-2000:]}")
        context = _pcscd_answers()
        if context is not None:
            try:
                if _vpcd_reader(context) and _port_open(VPCD_PORT):
                    return
            finally:
                context.release()
        if time.monotonic() > deadline:
            raise StackUnavailable(f"pcscd started but did not offer {VPCD_READER!r} on port {VPCD_PORT} within "
                                   f"{START_TIMEOUT:g} s:\n{daemon.log_text()[-2000:]}")
        time.sleep(0.1)


PCSCD_READER_CONFIG_DIR = Path("/etc/reader.conf.d")
# In a mount namespace of its own, pcscd's fixed paths are the test's: its socket and pid file
# directory (pcscd 1.9 ignores PCSCLITE_CSOCK_NAME; its clients honour it) and an empty reader
# configuration, so that it does not take vpcd's port from the machine's pcscd.
_PRIVATE_PCSCD = ('mount --bind "$1" /run/pcscd && mount --bind "$2" /etc/reader.conf.d && '
                  'exec "$3" --foreground --error')


class PrivatePcscd:
    """A pcscd of the test's own, without readers, that the test may stop and start again: the
    machine's pcscd and the other tests' readers are untouched. Its clients find it through
    ``env()`` (PCSCLITE_CSOCK_NAME, read once per process by libpcsclite: use it in a subprocess)."""

    def __init__(self, workdir: Path) -> None:
        self.run_dir = workdir / "run"
        self.readers_dir = workdir / "reader.conf.d"
        self.log_path = workdir / "pcscd.log"
        self.process: subprocess.Popen | None = None

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "pcscd.comm"

    def env(self) -> dict[str, str]:
        return {**os.environ, "PCSCLITE_CSOCK_NAME": str(self.socket_path)}

    def check_possible(self) -> None:
        if os.geteuid() != 0:
            raise StackUnavailable("a private pcscd needs root (a mount namespace: unshare --mount)")
        for tool in ("unshare", "mount"):
            if shutil.which(tool) is None:
                raise StackUnavailable(f"{tool} is missing (package util-linux / mount)")
        if shutil.which("pcscd") is None and not Path("/usr/sbin/pcscd").exists():
            raise StackUnavailable("pcscd is not installed (package pcscd)")
        if not PCSCD_READER_CONFIG_DIR.is_dir():
            raise StackUnavailable(f"{PCSCD_READER_CONFIG_DIR} is missing (package pcscd)")

    def start(self) -> None:
        self.check_possible()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.readers_dir.mkdir(parents=True, exist_ok=True)
        PCSCD_SOCKET_DIR.mkdir(exist_ok=True)  # the mount point; pcscd itself would create it
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", _PRIVATE_PCSCD, "private-pcscd",
                 str(self.run_dir), str(self.readers_dir), shutil.which("pcscd") or "/usr/sbin/pcscd"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            if self.process.poll() is not None:
                raise StackUnavailable(f"the private pcscd exited with status {self.process.returncode}:\n"
                                       f"{self.log_path.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise StackUnavailable(f"the private pcscd did not open {self.socket_path} within {START_TIMEOUT:g} s")
            time.sleep(0.05)

    def _answers(self) -> bool:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as client:
            client.connect(str(self.socket_path))
            return True
        return False

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)  # SIGTERM: pcscd removes its socket and pid file
            self.process = None


# vpcd's two readers, on the port its configuration names and the next one.
VPCD_READERS = ("Virtual PCD 00 00", "Virtual PCD 00 01")


def _free_port_pair() -> int:
    """A port with the next one free too: vpcd listens on both (its two readers)."""
    from peers.ports import free_port

    while True:
        port = free_port()
        with contextlib.suppress(OSError), socket.socket() as probe:
            probe.bind(("0.0.0.0", port + 1))
            return port


@contextlib.contextmanager
def private_pcscd_with_two_readers(workdir: Path) -> Iterator[tuple[PrivatePcscd, int]]:
    """A :class:`PrivatePcscd` with vpcd's two readers (:data:`VPCD_READERS`) on ``port`` and
    ``port + 1`` of its own: the machine's pcscd and other tests' readers are untouched. Raises
    :class:`StackUnavailable` when it cannot run."""
    daemon = PrivatePcscd(workdir)
    port = _free_port_pair()
    daemon.readers_dir.mkdir(parents=True)
    (daemon.readers_dir / "vpcd").write_text(
        f'FRIENDLYNAME "Virtual PCD"\nDEVICENAME   /dev/null:0x{port:04X}\n'
        f"LIBPATH      /usr/lib/pcsc/drivers/serial/libifdvpcd.so\nCHANNELID    0x{port:04X}\n")
    daemon.start()
    try:
        yield daemon, port
    finally:
        daemon.stop()


def readers_with_a_card_in(daemon: PrivatePcscd) -> list[str]:
    """The readers ``daemon`` reports a card in: asked in a process of its own, as libpcsclite reads
    PCSCLITE_CSOCK_NAME once per process (this one may have used the machine's pcscd)."""
    import sys

    asked = subprocess.run([sys.executable, "-c", "from dicom_card_agent.card.pcsc import readers_with_a_card; "
                            "print(*readers_with_a_card(), sep='\\n')"],
                           env=daemon.env(), capture_output=True, text=True, timeout=30, check=True)
    return asked.stdout.splitlines()
