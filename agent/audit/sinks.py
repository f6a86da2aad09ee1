"""Where audit messages go: an append-only local file, and an audit repository over syslog-TLS.

:class:`FileSink` appends one XML message per line (file 0600, its directory created 0700) and
fsyncs each. :class:`SyslogTlsSink` puts each RFC 5424 message into the on-disk
:class:`~agent.audit.spool.Spool` and returns at once; a background thread connects to the
repository (TLS 1.2+, the repository's own CA, optional client certificate), sends the spooled
messages oldest first with RFC 5425 framing, and removes each from the spool once written to the
connection. While the repository is unreachable it retries with exponential backoff (up to
``retry_max`` seconds); nothing waits for the network but that thread.

Delivery guarantee and its limit: RFC 5425 has no acknowledgements, so "written to the TLS
connection" is the best the sender can know. Before each message the thread checks whether the
repository has closed the connection (a readable socket that reads end-of-file), so a repository
that stopped or restarted is noticed and the message goes over a new connection; after each TLS
handshake it watches the new connection for ``settle_time`` (0.25 s) first, because with TLS 1.3 a
repository that refuses the client certificate says so only after the client finished its
handshake. What remains: a
message written after the repository's last read but before its connection actually dropped
(a crash, a reset, a network cut mid-stream) can be lost without the sender learning it, at most
the few messages written in that moment. A message is sent twice only if the agent crashes
between writing it and removing it from the spool.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import threading
import time
from pathlib import Path

from dicom_card_agent.audit.config import SyslogConfig
from dicom_card_agent.audit.errors import AuditError, AuditSpoolError
from dicom_card_agent.audit.spool import Spool
from dicom_card_agent.audit.syslog import frame
from dicom_card_agent.tls.policy import TLS12_CIPHERS

log = logging.getLogger("agent.audit")

INITIAL_BACKOFF = 0.25


class FileSink:
    """The append-only local audit file: one audit message (XML) per line."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            if not self.path.parent.exists():
                self.path.parent.mkdir(mode=0o700, parents=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise AuditError(f"cannot open the audit file {self.path}: {error.strerror}; "
                             "check [audit] file and its directory's permissions") from None
        if os.fstat(self._fd).st_mode & 0o077:
            os.fchmod(self._fd, 0o600)  # audit records name people and patients: owner only

    def write(self, xml: bytes) -> None:
        """Append one message and fsync; ``OSError`` if the disk refuses."""
        if b"\n" in xml:
            raise ValueError("an audit message for the file must be a single line")
        line = xml + b"\n"
        with self._lock:
            if self._fd < 0:
                raise AuditError(f"the audit file {self.path} is closed")
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def client_context(config: SyslogConfig) -> ssl.SSLContext:
    """TLS to the audit repository: 1.2+ (TLS 1.2 with ECDHE and AEAD only, as the tunnels),
    the server verified against ``ca`` with host name ``server_name``, our certificate if set."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        context.set_ciphers(TLS12_CIPHERS)
        context.load_verify_locations(cafile=str(config.ca))
        if config.certificate is not None:
            context.load_cert_chain(str(config.certificate), str(config.key) if config.key else None)
    except (ssl.SSLError, OSError) as error:
        raise AuditError(f"[audit.syslog]: cannot load the TLS files (ca {config.ca}"
                         + (f", certificate {config.certificate}, key {config.key}" if config.certificate else "")
                         + f"): {error}") from None
    return context


class SyslogTlsSink:
    """Spool, then deliver in order to the audit repository from a background thread."""

    def __init__(self, config: SyslogConfig, spool: Spool, *, connect_timeout: float = 10.0,
                 io_timeout: float = 10.0, settle_time: float = 0.25) -> None:
        self.config = config
        self.spool = spool
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self.settle_time = settle_time
        self._context = client_context(config)
        self._condition = threading.Condition()
        self._stopping = False
        self._deadline: float | None = None  # when closing: drain until then
        self._sock: ssl.SSLSocket | None = None
        self._connecting: socket.socket | None = None
        self.connected = False
        self.delivered = 0
        self.last_error = ""
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    # -- the caller's side ----------------------------------------------------------------

    def submit(self, message: bytes) -> None:
        """Queue one RFC 5424 message durably (:class:`AuditSpoolError` if the disk refuses)."""
        with self._condition:
            if self._stopping:
                raise AuditError("the audit repository sink is closed")
            self.spool.append(message)
            self._condition.notify_all()

    def pending(self) -> int:
        return len(self.spool)

    def wait_delivered(self, timeout: float) -> bool:
        """Wait until no message waits in the spool; ``False`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while len(self.spool):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._condition.wait(remaining)
            return True

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what waits for up to ``timeout`` seconds, then stop; the rest stays in the
        spool for the next start."""
        with self._condition:
            if self._stopping:
                return
            self._stopping = True
            self._deadline = time.monotonic() + max(0.0, timeout)
            self._condition.notify_all()
        self._thread.join(max(0.0, timeout))
        if self._thread.is_alive():
            self._abort_io()  # a connect, handshake or send to a repository that does not answer
            self._thread.join(2.0)
        if self._thread.is_alive():
            log.error("audit: the repository sender did not stop in time; undelivered messages stay in %s",
                      self.spool.directory)
        self.spool.close()

    def _abort_io(self) -> None:
        for sock in (self._connecting, self._sock):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # -- the sender thread ----------------------------------------------------------------

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _run(self) -> None:
        backoff = INITIAL_BACKOFF
        try:
            while True:
                with self._condition:
                    item = self.spool.oldest()
                    while item is None and not self._stopping:
                        self._condition.wait()
                        item = self.spool.oldest()
                    if self._stopping and (item is None or self._past_deadline()):
                        return
                assert item is not None
                sequence, message = item
                if self._sock is not None and not self._alive(self._sock):
                    self._disconnect("the audit repository closed the connection")
                if self._sock is None:
                    try:
                        self._connect()
                    except (OSError, ssl.SSLError) as error:
                        self._failed(f"cannot connect: {_describe(error)}")
                        self._pause(backoff)
                        backoff = min(backoff * 2, self.config.retry_max)
                        continue
                try:
                    assert self._sock is not None
                    self._sock.sendall(frame(message))
                except (OSError, ssl.SSLError) as error:
                    self._disconnect(f"sending failed: {_describe(error)}")
                    self._pause(backoff)
                    backoff = min(backoff * 2, self.config.retry_max)
                    continue
                backoff = INITIAL_BACKOFF
                with self._condition:
                    self.spool.remove(sequence)
                    self.delivered += 1
                    self._condition.notify_all()
        except AuditSpoolError:
            if not self._stopping:
                log.exception("audit: the repository sender stopped; undelivered messages stay in %s",
                              self.spool.directory)
            # else close() gave up waiting and closed the spool under us: what is left stays on disk
        except Exception:  # noqa: BLE001 - a bug must not silently end delivery
            log.exception("audit: the repository sender stopped; undelivered messages stay in %s",
                          self.spool.directory)
        finally:
            self._disconnect(None)

    def _connect(self) -> None:
        raw = socket.create_connection((self.config.host, self.config.port), timeout=self.connect_timeout)
        try:
            raw.settimeout(self.connect_timeout)
            sock = self._context.wrap_socket(raw, server_hostname=self.config.server_name,
                                             do_handshake_on_connect=False)
        except BaseException:
            raw.close()
            raise
        self._connecting = sock  # close() may cut the handshake short
        try:
            sock.do_handshake()
        except BaseException:
            sock.close()
            raise
        finally:
            self._connecting = None
        sock.settimeout(self.io_timeout)
        # With TLS 1.3 a server that refuses our certificate (or has none from us) closes the
        # connection only after our side of the handshake is done: give it a moment to say so,
        # rather than write the first message into a connection it is about to drop.
        if not self._alive(sock, self.settle_time):
            sock.close()
            raise ConnectionError("the repository closed the connection right after the TLS handshake "
                                  "(does it accept our client certificate? see its log)")
        self._sock = sock
        if not self.connected:
            waiting = len(self.spool)
            log.info("audit: connected to the audit repository %s (%s); %d message%s to deliver",
                     self.config.address, sock.version(), waiting, "" if waiting == 1 else "s")
        self.connected = True
        self.last_error = ""

    def _alive(self, sock: ssl.SSLSocket, window: float = 0.0) -> bool:
        """Whether the repository still has the connection open, watching it for ``window``
        seconds. A syslog receiver never sends, so a readable socket means end-of-file, a reset,
        or TLS housekeeping (session tickets, which are read and ignored)."""
        deadline = time.monotonic() + window
        try:
            while True:
                remaining = max(0.0, deadline - time.monotonic())
                readable, _, _ = select.select([sock], [], [], remaining)
                if readable or sock.pending():
                    sock.setblocking(False)
                    try:
                        while True:
                            if not sock.recv(4096):
                                return False  # end of file: the repository closed the connection
                    except (ssl.SSLWantReadError, BlockingIOError):
                        pass  # only TLS housekeeping (or stray bytes) arrived
                    finally:
                        sock.settimeout(self.io_timeout)
                if time.monotonic() >= deadline:
                    return True
        except (OSError, ssl.SSLError, ValueError):
            return False

    def _disconnect(self, reason: str | None) -> None:
        """Drop the connection; ``reason`` ``None`` for a normal close (with TLS close_notify)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            if reason is None:
                try:
                    sock.settimeout(1.0)
                    sock.unwrap().close()
                except (OSError, ssl.SSLError, ValueError):
                    pass
            try:
                sock.close()
            except OSError:
                pass
        if reason is not None:
            self._failed(reason)

    def _failed(self, reason: str) -> None:
        if self.connected or self.last_error == "":
            log.warning("audit: audit repository %s: %s; messages wait in %s and are sent when it is back",
                        self.config.address, reason, self.spool.directory)
        self.connected = False
        self.last_error = reason

    def _pause(self, seconds: float) -> None:
        """Wait before the next attempt; cut short when closing (up to the close deadline)."""
        end = time.monotonic() + seconds
        with self._condition:
            while True:
                now = time.monotonic()
                limit = end if self._deadline is None else min(end, self._deadline)
                if now >= limit:
                    return
                self._condition.wait(limit - now)
                if self._stopping and self._past_deadline():
                    return


def _describe(error: BaseException) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"the repository's certificate was refused: {error.verify_message}"
    if isinstance(error, socket.timeout):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
