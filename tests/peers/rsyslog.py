"""rsyslog (Debian rsyslog 8.2302 + rsyslog-gnutls) on loopback as a real TLS audit repository.

A private configuration in the test's directory: no system inputs, only ``imtcp`` with the
``gtls`` stream driver (``StreamDriver.Mode 1``: TLS only, RFC 5425 octet-counted framing is
what imtcp accepts), the server certificate of the test PKI, and one ``omfile`` action writing
each received message exactly as received (``%rawmsg%``, one per line) to ``received.log``::

    rsyslogd -n -f rsyslog.conf -i rsyslog.pid

``auth_mode`` is ``anon`` (any client; the client still verifies the server) or ``x509/certvalid``
(the client must present a certificate from the CA bundle). ``maxMessageSize`` is raised to 256 KiB
(the default 8 KiB cuts large DICOM Instances Transferred messages). Notes on rsyslog 8.2302:

- it checks the configuration at start and exits on errors (``-N1`` checks without starting);
- ``stop()`` (SIGTERM) closes the client connections (FIN) and exits after flushing the file;
  ``start()`` again reuses the same port, config and output file (appended);
- imtcp logs peer TLS problems only to its own stderr (our log file), not as syslog messages.

:func:`rsyslog_relp` is the same repository speaking RELP over TLS instead (``imrelp`` from
rsyslog-relp, librelp with OpenSSL): every message is acknowledged with ``rsp 200`` once rsyslog
has taken it. :meth:`Rsyslog.pause` / :meth:`Rsyslog.resume` / :meth:`Rsyslog.kill` (SIGSTOP,
SIGCONT, SIGKILL) make the failures a repository really has.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dicom_card_agent.audit.syslog import SyslogMessage, parse_message

from .pki_files import TlsServerFiles
from .ports import LOOPBACK, ManagedProcess, free_port, managed_process, wait_for_port

RSYSLOGD = "/usr/sbin/rsyslogd"
AuthMode = Literal["anon", "x509/certvalid"]
Protocol = Literal["tls", "relp"]

_CONFIG = """\
global(
    workDirectory="{work}"
    maxMessageSize="256k"
    defaultNetstreamDriver="gtls"
    defaultNetstreamDriverCAFile="{ca}"
    defaultNetstreamDriverCertFile="{cert}"
    defaultNetstreamDriverKeyFile="{key}"
)
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="{auth_mode}"
       maxSessions="20")
input(type="imtcp" address="{host}" port="{port}" ruleset="audit")
template(name="raw" type="string" string="%rawmsg%\\n")
ruleset(name="audit" queue.type="Direct") {{
    action(type="omfile" file="{output}" template="raw" flushOnTXEnd="on" asyncWriting="off")
}}
"""


_RELP_CONFIG = """\
global(workDirectory="{work}" maxMessageSize="256k")
module(load="imrelp" tls.tlslib="openssl")
input(type="imrelp" address="{host}" port="{port}" ruleset="audit" maxDataSize="256k" tls="on"
      tls.cacert="{ca}" tls.mycert="{cert}" tls.myprivkey="{key}"{auth_mode})
template(name="raw" type="string" string="%rawmsg%\\n")
ruleset(name="audit" queue.type="Direct") {{
    action(type="omfile" file="{output}" template="raw" flushOnTXEnd="on" asyncWriting="off")
}}
"""


@dataclass
class Rsyslog:
    """A configured rsyslogd; :meth:`start` / :meth:`stop` as often as needed (same port)."""

    directory: Path
    port: int
    auth_mode: AuthMode
    host: str = LOOPBACK
    process: ManagedProcess | None = None
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _starts: int = 0

    @property
    def config_path(self) -> Path:
        return self.directory / "rsyslog.conf"

    @property
    def output(self) -> Path:
        return self.directory / "received.log"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        if self.process is not None and self.process.alive:
            raise RuntimeError("rsyslogd is already running")
        self._starts += 1
        pid_file = self.directory / "rsyslog.pid"
        pid_file.unlink(missing_ok=True)
        argv = [RSYSLOGD, "-n", "-f", self.config_path, "-i", pid_file]
        self.process = self._stack.enter_context(
            managed_process(argv, log_path=self.directory / f"rsyslogd-{self._starts}.log"))
        wait_for_port(self.port, timeout, host=self.host, process=self.process)

    def pause(self, timeout: float = 5.0) -> None:
        """SIGSTOP: the repository neither reads nor answers; the kernel still takes bytes. Returns
        once every thread is stopped (a busy machine may let a thread run on for a moment)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while not _all_threads_stopped(self.process.pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rsyslogd (pid {self.process.pid}) did not stop within {timeout} s")
            time.sleep(0.005)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: whatever it had not written to received.log is gone."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.stop()  # reaps it
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def close(self) -> None:
        self.stop()
        self._stack.close()

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.directory.glob("rsyslogd-*.log")))

    def raw_lines(self) -> list[bytes]:
        try:
            data = self.output.read_bytes()
        except FileNotFoundError:
            return []
        return [line for line in data.split(b"\n") if line]

    def messages(self) -> list[SyslogMessage]:
        """Every message received so far, in order of arrival."""
        return [parse_message(line) for line in self.raw_lines()]

    def wait_for_messages(self, count: int, timeout: float = 20.0) -> list[SyslogMessage]:
        """Wait until at least ``count`` messages arrived; return all. ``TimeoutError`` with the
        rsyslogd log otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.raw_lines()
            if len(lines) >= count:
                return [parse_message(line) for line in lines]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(lines)} of {count} messages arrived at rsyslog after {timeout} s; "
                                   f"rsyslogd log:\n{self.log_text()}")
            time.sleep(0.02)


def _all_threads_stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is in state T (stopped by a signal)."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:
            continue  # a thread that just ended
        states.append(stat.rpartition(")")[2].split()[0])
    return bool(states) and all(state == "T" for state in states)


def write_config(directory: Path, server: TlsServerFiles, port: int, auth_mode: AuthMode, host: str,
                 protocol: Protocol = "tls") -> Path:
    work = directory / "work"
    work.mkdir(parents=True, exist_ok=True)
    path = directory / "rsyslog.conf"
    if protocol == "relp":  # imrelp: no authMode accepts any client; certvalid without the x509/ prefix
        template = _RELP_CONFIG
        auth_mode = "" if auth_mode == "anon" else ' tls.authMode="certvalid"'  # type: ignore[assignment]
    else:
        template = _CONFIG
    path.write_text(template.format(work=work, ca=server.ca_bundle, cert=server.chain, key=server.key,
                                   auth_mode=auth_mode, host=host, port=port, output=directory / "received.log"))
    return path


@contextlib.contextmanager
def rsyslog_tls(directory: Path, server: TlsServerFiles, *, auth_mode: AuthMode = "anon",
                port: int | None = None, start: bool = True, protocol: Protocol = "tls") -> Iterator[Rsyslog]:
    """An rsyslogd TLS audit repository on 127.0.0.1 (a free port unless given); stopped on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    write_config(directory, server, port, auth_mode, LOOPBACK, protocol)
    server_process = Rsyslog(directory, port, auth_mode)
    try:
        if start:
            server_process.start()
        yield server_process
    finally:
        server_process.close()


def rsyslog_relp(directory: Path, server: TlsServerFiles, *, auth_mode: AuthMode = "anon",
                 port: int | None = None, start: bool = True) -> contextlib.AbstractContextManager[Rsyslog]:
    """An rsyslogd RELP-over-TLS audit repository (imrelp); ``anon`` or ``x509/certvalid`` as above."""
    return rsyslog_tls(directory, server, auth_mode=auth_mode, port=port, start=start, protocol="relp")
