"""Loopback ports and child processes for the test peers.

Every peer process is started in its own process group (session) with ``TCP_NODELAY=1`` in its
environment (DCMTK and Orthanc leave Nagle on otherwise and each DIMSE message then stalls
40-50 ms), its stdout and stderr in one log file, stdin closed, and the whole group is killed when
the ``with`` block ends, whatever happens inside it.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"
_TCP_LISTEN = "0A"  # socket state LISTEN in /proc/net/tcp


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for bind(0) and outgoing connections' source ports."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


# Ports are handed out from just below the ephemeral range, in turn, so that one comes back only
# after all the others: a port the kernel picks for bind(0) is free again the moment the probe
# closes, so the next bind(0) (a peer's own free_port call, or any outgoing connection's source
# port) could get it before its first user binds it. CI saw exactly that: storescp was given the
# port just handed to an agent's listener.
_HANDED_OUT_SPAN = 12000
_next_port: list[int] = []  # where this process goes on handing out ports in its share


def _this_workers_share(low: int, high: int) -> range:
    """The part of ``low``-``high`` this pytest-xdist worker hands out ports from: workers are
    processes that do not see each other's ports, and two of them gave one port to two peers in a
    full run (each bound it in turn: "address already in use")."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or count <= 1:
        return range(low, high)
    share = (high - low) // count
    start = low + int(worker[2:]) % count * share
    return range(start, start + share)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that was free a moment ago, from below the kernel's ephemeral range
    (so no outgoing connection takes it first), in this process's turn through its share (so no
    other pytest-xdist worker, nor a recent call here, was given it)."""
    ephemeral_low, _ = ephemeral_range()
    candidates = _this_workers_share(max(1024, ephemeral_low - _HANDED_OUT_SPAN), ephemeral_low)
    if not _next_port:
        _next_port.append(random.randrange(len(candidates)))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(len(candidates)):
        port = candidates[_next_port[0] % len(candidates)]
        _next_port[0] += 1
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port left in {candidates.start}-{candidates.stop - 1} on {host}")


def peer_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a peer process: ours plus ``TCP_NODELAY=1`` (and ``extra``), without
    ``OPENSSL_CONF``: peers use the system OpenSSL configuration, never a provider configuration
    meant for the agent (pass it in ``extra`` to override)."""
    env = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}
    env["TCP_NODELAY"] = "1"
    if extra:
        env.update(extra)
    return env


def _listening_ports(pid: int | None = None) -> set[int] | None:
    """Ports in LISTEN state on this host (Linux /proc), or None where /proc is not available; as
    process ``pid`` sees them if given (it may run in another network namespace)."""
    ports: set[int] = set()
    found = False
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid or 'self'}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        found = True
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == _TCP_LISTEN:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports if found else None


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(port: int, timeout: float = 10.0, *, host: str = LOOPBACK,
                  process: ManagedProcess | None = None) -> None:
    """Return once something listens on ``port``; raise ``TimeoutError`` after ``timeout`` seconds.

    On Linux the LISTEN state is read from /proc/net/tcp, so the peer never sees a probe
    connection (a bare TCP connect makes TLS servers log a failed handshake). Elsewhere it connects.
    If ``process`` is given, its own network namespace is looked at, and should it exit first,
    ``RuntimeError`` is raised with its log.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and not process.alive:
            raise RuntimeError(f"{process.name} exited with {process.returncode} before listening on "
                               f"port {port}:\n{process.log_text()}")
        listening = _listening_ports(process.pid if process is not None else None)
        if (port in listening) if listening is not None else _accepts_connections(host, port):
            return
        if time.monotonic() > deadline:
            log = f":\n{process.log_text()}" if process is not None else ""
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s{log}")
        time.sleep(0.02)


class ManagedProcess:
    """A running peer process; see :func:`managed_process`."""

    def __init__(self, argv: Sequence[str | os.PathLike[str]], log_path: Path, popen: subprocess.Popen):
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.popen = popen

    @property
    def name(self) -> str:
        return Path(self.argv[0]).name

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self._peek() is None

    @property
    def returncode(self) -> int | None:
        """The exit status (negative: killed by that signal), or None while it runs."""
        return self._peek()

    def _peek(self) -> int | None:
        # Look at the exit status without reaping the child: until stop() reaps it, its pid (and
        # so its process group id) cannot be reused, so killpg() only ever reaches our processes.
        if self.popen.returncode is not None:
            return self.popen.returncode
        try:
            info = os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.popen.poll()
        if info is None:
            return None
        return -info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status

    def log_text(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """Wait until ``text`` appears in the log; return the log. ``TimeoutError`` otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log_text()
            if text in log:
                return log
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not in the log of {self.name} after {timeout} s:\n{log}")
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``timeout`` s; return the exit status."""
        if self.popen.returncode is None:
            if self._peek() is None:
                self._signal_group(signal.SIGTERM)
                deadline = time.monotonic() + timeout
                while self._peek() is None and time.monotonic() < deadline:
                    time.sleep(0.02)
            # Also reaches children the peer forked (storescp --fork), which may outlive it.
            self._signal_group(signal.SIGKILL)
            self.popen.wait(timeout)  # subprocess.TimeoutExpired if even SIGKILL did not work
        return self.popen.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        # start_new_session=True made the child the leader of a group whose id is its pid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def __repr__(self) -> str:
        return f"ManagedProcess(pid={self.pid}, argv={self.argv!r})"


@contextlib.contextmanager
def managed_process(argv: Sequence[str | os.PathLike[str]], *, log_path: Path,
                    env: Mapping[str, str] | None = None, cwd: Path | None = None,
                    stop_timeout: float = 5.0) -> Iterator[ManagedProcess]:
    """Start ``argv`` in a new process group with ``TCP_NODELAY=1``; kill the group on exit.

    ``env`` entries are added to (not replacing) the inherited environment. stdout and stderr go to
    ``log_path`` (truncated first), stdin is /dev/null.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        popen = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, env=peer_env(env), cwd=cwd,
                                 start_new_session=True)
    process = ManagedProcess(argv, log_path, popen)
    try:
        yield process
    finally:
        process.stop(stop_timeout)


def run_peer_tool(argv: Sequence[str | os.PathLike[str]], *, timeout: float = 120.0,
                  env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a short-lived client (storescu, echoscu, openssl) with ``TCP_NODELAY=1`` and stdin
    /dev/null; return its exit status and its stdout and stderr merged, as text, in ``.stdout``.

    Its process group is killed if it overruns ``timeout`` (then ``subprocess.TimeoutExpired``).
    """
    argv = [str(a) for a in argv]
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", env=peer_env(env), start_new_session=True) as popen:
        try:
            output, _ = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, signal.SIGKILL)  # not reaped yet: the group is still ours
            popen.communicate()
            raise
    return subprocess.CompletedProcess(argv, popen.returncode, output, None)
