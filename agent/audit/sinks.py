"""Where audit messages go: an append-only local file, and an audit repository (syslog-TLS or RELP).

:class:`FileSink` appends one XML message per line (file 0600, its directory created 0700) and
fsyncs each write (one for all the messages of a card session's report); a write the disk refuses
half-way is cut back, so the file never holds half a line.
It follows a rotation by renaming (logrotate ``create``, with or without ``compress``): a message
goes to the file its path names at that moment, never to a renamed or removed one.
Its directory must be the agent's user's own (or root's) and writable by neither group nor others
(agent/audit/directories.py): whoever can write there could replace the file.

The repository sinks put each RFC 5424 message into the on-disk :class:`~agent.audit.spool.Spool`
and return at once; a background thread connects to the repository (TLS 1.2+, the repository's
own CA, optional client certificate), sends the spooled messages oldest first, and removes each
from the spool only once the repository has confirmed it. While the repository is unreachable it
retries with exponential backoff (up to ``retry_max`` seconds); nothing waits for the network but
that thread. Both deliver at least once: what was sent but not confirmed when a connection (or
the agent) died is sent again, so a repository may see a message twice (byte for byte the same;
docs/audit.md says how to recognise it).

- :class:`RelpSink` (RELP over TLS, rsyslog ``imrelp``): the repository answers every message
  (``rsp 200``); up to ``RELP_WINDOW`` wait for their answer at a time.
- :class:`SyslogTlsSink` (RFC 5425): the protocol has no acknowledgements, so the sink makes one
  from the end of the connection. After a burst it sends TLS close_notify and waits for the
  repository to close its side: a receiver reads its connection in order, so it meets our
  close_notify only after it has read every message before it. A repository that is stopped
  (never answers), killed (the kernel resets the connection, as it does for a socket closed with
  unread data) or unreachable confirms nothing, and the burst is sent again on a new connection.
  Each burst therefore costs a TLS handshake; after each handshake the sink watches the new
  connection for ``settle_time`` (0.25 s) first, because with TLS 1.3 a repository that refuses
  the client certificate says so only after the client finished its handshake.

  A slow repository (one that reads tens of messages a second) is not a stopped one: while it
  confirms nothing, the sink watches how many bytes of the burst its TCP has not acknowledged yet
  (Linux ``SIOCOUTQ``). While that count shrinks the repository is reading, and the wait goes on;
  only ``CONFIRM_TIMEOUT`` seconds without progress end it. Bytes the repository's kernel has
  taken but the repository has not read cannot be seen: for those, a burst that was not confirmed
  in time is followed by one of half its size (down to one message), and the burst grows back
  (doubling, up to ``CONFIRM_AFTER``) after each one confirmed with time to spare.

Failures are logged once per outage: the first failure is a warning, the next confirmation ends
the outage (an info line); what fails in between is only in ``last_error`` (``card-agent status``).
A spool that cannot delete a confirmed message (a read-only or failing file system) is an outage
too, with a warning of its own: the message stays waiting and is sent again later. Only closing
ends the sender thread.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import ssl
import stat
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from dicom_card_agent.audit.config import SyslogConfig
from dicom_card_agent.audit.directories import (
    FILE_DIRECTORY_RISK,
    check_private_directory,
    check_private_status,
    make_private_directory,
)
from dicom_card_agent.audit.errors import AuditError, AuditSpoolError
from dicom_card_agent.audit.relp import Acknowledged, Refused, RelpProtocolError, RelpSession, ServerClosed
from dicom_card_agent.audit.spool import Spool
from dicom_card_agent.audit.syslog import frame
from dicom_card_agent.file_trust import UnsafeFileError, check_trusted_file, existing
from dicom_card_agent.sockets import unsent_bytes
from dicom_card_agent.tls.policy import TLS12_CIPHERS

log = logging.getLogger("agent.audit")

INITIAL_BACKOFF = 0.25
RELP_WINDOW = 128  # messages sent and not yet acknowledged, at most
SEND_BATCH = 64  # spool files read at a time
CONFIRM_LINGER = 0.2  # syslog-TLS: wait this long for more messages before confirming a burst
CONFIRM_AFTER = 500  # syslog-TLS: confirm after this many messages even while more keep coming (the largest burst)
CONFIRM_TIMEOUT = 5.0  # syslog-TLS: how long the repository may go without visible progress before it confirms
CONFIRM_POLL = 0.1  # syslog-TLS: how often the progress of a burst being confirmed is looked at


class ConnectionLost(ConnectionError):
    """The repository's connection ended or stopped answering; what it has not confirmed is resent."""


class NotConfirmed(ConnectionLost):
    """syslog-TLS: the repository made no progress through a burst for ``CONFIRM_TIMEOUT`` seconds."""


class FileSink:
    """The append-only local audit file: one audit message (XML) per line.

    The file may be rotated under the agent (logrotate's ``create``: renamed, perhaps compressed and
    removed): before each message the sink checks that its path still names the file it holds open,
    and if not, opens (creates) the file now at the path, so that no message goes to a renamed or
    deleted file. ``copytruncate`` needs nothing (the file stays the same) but loses what is
    written while it copies (docs/audit.md, "Rotating the local file")."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            make_private_directory(self.path.parent)
        except OSError as error:
            raise AuditError(f"cannot open the audit file {self.path}: {error.strerror}; "
                             "check [audit] file and its directory's permissions") from None
        try:
            # The directory, held from now on: the file is found again (after a rotation) in this
            # directory, which is checked on the handle, whatever is later renamed to its name by
            # whoever can write above it.
            self._dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            raise AuditError(f"cannot open the audit file {self.path}: {error.strerror}; "
                             "check [audit] file and its directory's permissions") from None
        try:
            check_file_directory_handle(self._dir_fd, self.path)
            self._fd = self._open()
        except OSError as error:
            os.close(self._dir_fd)
            raise AuditError(f"cannot open the audit file {self.path}: {error.strerror}; "
                             "check [audit] file and its directory's permissions") from None
        except BaseException:  # refused (UnsafeFileError, AuditError): the directory is not kept open
            os.close(self._dir_fd)
            raise

    def _open(self) -> int:
        """Open (or create) the file named ``path`` in the held directory for appending, owner-only.
        Only a regular file of the agent's user is taken: not a link, a FIFO (whose open or write
        would block every record, and with it ``status`` and ``lock``) or a device."""
        fd = os.open(self.path.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
                     | os.O_NONBLOCK, 0o600, dir_fd=self._dir_fd)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise AuditError(f"the audit file {self.path} is not a regular file; remove what is there, the "
                                 "agent creates the file")
            if info.st_uid != os.geteuid():
                raise AuditError(f"the audit file {self.path} belongs to uid {info.st_uid}, not to the agent's user "
                                 f"(uid {os.geteuid()}); remove it or give it to the agent's user")
            if info.st_mode & 0o077:
                os.fchmod(fd, 0o600)  # audit records name people and patients: owner only
            os.set_blocking(fd, True)  # a regular file: O_NONBLOCK only kept the open from waiting
        except (OSError, AuditError):
            os.close(fd)
            raise
        return fd

    def write(self, xml: bytes) -> None:
        """Append one message and fsync; ``OSError`` if the disk refuses, :class:`AuditError` if
        the file was rotated away and a new one cannot be opened."""
        self.write_all([xml])

    def write_all(self, messages: Sequence[bytes]) -> None:
        """Append ``messages``, one a line, with one write and one fsync (a card session's report
        holds up to ~100: an fsync each took longer than an ending card session has to report).
        All or none: on failure the file is cut back to where it was, not one of them is in it."""
        if any(b"\n" in xml for xml in messages):
            raise ValueError("an audit message for the file must be a single line")
        if not messages:
            return
        lines = b"".join(xml + b"\n" for xml in messages)
        with self._lock:
            if self._fd < 0:
                raise AuditError(f"the audit file {self.path} is closed")
            if not self._holds_path():
                self._reopen()
            self._append(lines)
            if not self._holds_path():
                # Rotated while we wrote: the lines may be in a file that is being compressed and
                # removed. Write them to the new file too: rare duplicates, never a lost message.
                self._reopen()
                self._append(lines)

    def _holds_path(self) -> bool:
        """Whether ``path`` still names the open file (not renamed away, removed or replaced)."""
        try:
            named = os.stat(self.path.name, dir_fd=self._dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        held = os.fstat(self._fd)
        return held.st_nlink > 0 and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    def _reopen(self) -> None:
        """Go on in the file now at ``path`` (created if the rotation left none)."""
        try:
            fd = self._open()
        except AuditError as error:
            raise AuditError(f"the audit file {self.path} was rotated and cannot be opened again: {error}") from None
        except OSError as error:
            raise AuditError(
                f"the audit file {self.path} was rotated and cannot be opened again: {error.strerror}; "
                "logrotate must leave the new file to the agent's user (`create 0600` without an owner, or "
                "`nocreate`), see docs/audit.md, \"Rotating the local file\"") from None
        os.close(self._fd)
        self._fd = fd
        log.info("audit: the audit file %s was renamed or removed (rotated); messages go to a new file there",
                 self.path)

    def _append(self, lines: bytes) -> None:
        size = os.fstat(self._fd).st_size
        try:
            view = memoryview(lines)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError:
            # A full disk can take part of the lines: cut them back, so that the lines written
            # once space returns are the only copy and the file stays one message per line.
            try:
                os.ftruncate(self._fd, size)
            except OSError:
                pass
            raise

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                os.close(self._dir_fd)
                self._fd = -1


FILE_DIRECTORY = "the directory of the audit file"
FILE_DIRECTORY_ELSEWHERE = "set [audit] file to a file in a directory of the agent's own"


def check_file_directory(path: Path) -> None:
    """Refuse (:class:`~agent.file_trust.UnsafeFileError`) an audit file whose directory another
    user could write to; a missing directory passes (the agent creates it 0700)."""
    check_private_directory(Path(path).parent, FILE_DIRECTORY, FILE_DIRECTORY_RISK, ancestors=False,
                            elsewhere=FILE_DIRECTORY_ELSEWHERE)


def check_file_directory_handle(directory_fd: int, path: Path) -> None:
    """:func:`check_file_directory` for the directory the file sink holds open (``path``'s, as it
    was opened): what is checked is what its records go to, whatever the path names by then."""
    found = existing(Path(path).parent)  # for the message: the path as given, and where its links lead
    given, resolved = (found[0], found[1]) if found is not None else (Path(path).parent, Path(path).parent)
    check_private_status(given, resolved, os.fstat(directory_fd), FILE_DIRECTORY, FILE_DIRECTORY_RISK,
                         elsewhere=FILE_DIRECTORY_ELSEWHERE)


def client_context(config: SyslogConfig) -> ssl.SSLContext:
    """TLS to the audit repository: 1.2+ (TLS 1.2 with ECDHE and AEAD only, as the tunnels),
    the server verified against ``ca`` with host name ``server_name``, our certificate if set. Files
    another user could have changed are refused (agent/file_trust.py), as every file the agent trusts."""
    refuse_unsafe_tls_files(config)
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


def refuse_unsafe_tls_files(config: SyslogConfig) -> None:
    """:class:`AuditError` for an [audit.syslog] TLS file another user could have changed: with the CA
    bundle they could have the records sent to a repository of their own, with the certificate and
    key send them under another workstation's name."""
    files = [(config.ca, "the audit repository's CA bundle",
              "add a CA of their own, and the agent would send its audit records to a repository they run")]
    if config.certificate is not None:
        files.append((config.certificate, "the audit client certificate",
                      "put another certificate in its place, and the repository would take the records for another "
                      "workstation's"))
    if config.key is not None:
        files.append((config.key, "the audit client key", "put another key in its place"))
    for path, what, risk in files:
        try:
            check_trusted_file(path, what, risk)
        except UnsafeFileError as error:
            raise AuditError(f"[audit.syslog]: {error}") from None


class RepositorySink:
    """Spool, then deliver in order to the audit repository from a background thread; the
    transport (:class:`SyslogTlsSink`, :class:`RelpSink`) decides when a message is confirmed."""

    transport = "repository"

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
        self._submitted = 0  # messages taken so far: the sender waits for this to change
        self._cursor = 0  # the last sequence number sent on the current connection
        self._rtt = 0.0  # how long the last TCP connect took: about one round trip
        self.connected = False
        self.delivered = 0
        self.last_error = ""
        self._outage = False  # from a failure until the repository confirms again: the failure is logged once
        self._spool_failing = False  # a confirmed message could not be removed, since the last that could
        self._version = ""  # the TLS version of the last connection
        self._thread = threading.Thread(target=self._run, name=f"audit-{self.transport}", daemon=True)
        self._thread.start()

    # -- the caller's side ----------------------------------------------------------------

    def submit(self, message: bytes) -> None:
        """Queue one RFC 5424 message durably (:class:`AuditSpoolError` if the disk refuses)."""
        self.submit_all([message])

    def submit_all(self, messages: Sequence[bytes]) -> None:
        """Queue ``messages`` durably, in order, all or none (:meth:`Spool.append_all`)."""
        with self._condition:
            if self._stopping:
                raise AuditError("the audit repository sink is closed")
            self.spool.append_all(messages)
            self._submitted += len(messages)
            self._condition.notify_all()
        self._wake()

    def _wake(self) -> None:
        """Wake a sender waiting on the repository for a new message (or the close). The
        condition, notified already, wakes one waiting for messages; only RELP waits on the
        repository with messages to send (:class:`RelpSink`)."""

    def pending(self) -> int:
        """Messages not yet confirmed by the repository."""
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
        self._wake()
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

    def _wait_for_work(self) -> bool:
        """Wait until a message waits; ``False`` when the sink is closing and done (or out of time)."""
        with self._condition:
            while not len(self.spool) and not self._stopping:
                self._condition.wait()
            return not (self._stopping and (not len(self.spool) or self._past_deadline()))

    def _run(self) -> None:
        """Deliver until closed. Whatever fails (the repository, the network, the spool's disk, or a
        bug) is an outage: logged once, shown by ``card-agent status``, retried with backoff.
        Only closing ends the thread, so that one failure never stops delivery until a restart."""
        backoff = INITIAL_BACKOFF
        try:
            while self._wait_for_work():
                if self._attempt():
                    backoff = INITIAL_BACKOFF
                elif self._sock is None:  # the attempt failed: wait before the next one
                    if self._stopping and self.spool.closed:
                        return  # close() gave up waiting and closed the spool under us: what is left stays on disk
                    self._pause(backoff)
                    backoff = min(backoff * 2, self.config.retry_max)
        finally:
            self._goodbye()
            self._disconnect(None)

    def _attempt(self) -> bool:
        """Connect if needed, then send and confirm for a while; ``True`` if the repository
        confirmed something. A failure drops the connection (what it has not confirmed is sent
        again on the next one) and is recorded by :meth:`_failed`."""
        try:
            if self._sock is None:
                try:
                    self._connect()
                except (OSError, ssl.SSLError, RelpProtocolError) as error:
                    self._failed(f"cannot connect: {_describe(error)}")
                    return False
            return self._exchange()
        except (OSError, ssl.SSLError, RelpProtocolError) as error:
            self._disconnect(_describe(error))
        except AuditSpoolError as error:
            if self.spool.closed:  # close() gave up waiting and closed the spool under us: no failure to report
                self._disconnect(None)
                return False
            # The spool's disk, not the repository: a confirmed message could not be removed
            # (read-only, failing or full file system, permissions). It stays waiting and is sent
            # again once the spool works (at least once: a duplicate, never a loss).
            self._disconnect(str(error), spool=True)
        except Exception as error:  # noqa: BLE001 - a bug must not silently end delivery
            if not self._outage:
                log.exception("audit: the repository sender failed; it retries, undelivered messages stay in %s",
                              self.spool.directory)
            self._disconnect(f"internal error: {_describe(error)}")
        return False

    def _exchange(self) -> bool:
        """Send and confirm for a while on the open connection; ``True`` if the repository
        confirmed something. Raises (``ConnectionLost``, ``OSError``, ...) when the connection
        is lost: what it did not confirm is sent again on the next one."""
        raise NotImplementedError

    def _goodbye(self) -> None:
        """End the session politely when stopping (RELP ``close``)."""

    def _confirmed(self, sequences: list[int]) -> None:
        with self._condition:
            try:
                for sequence in sequences:
                    self.spool.remove(sequence)  # AuditSpoolError: this one and the rest stay waiting
                    self.delivered += 1
            finally:
                self._condition.notify_all()
        if sequences and self._outage:
            self._outage = self._spool_failing = False
            self.connected = True
            self.last_error = ""
            waiting = len(self.spool)
            log.info("audit: the audit repository %s confirms messages again (%s%s); %d message%s to deliver",
                     self.config.address, self._version, ", RELP" if self.transport == "relp" else "", waiting,
                     "" if waiting == 1 else "s")

    def _connect(self) -> None:
        started = time.monotonic()
        raw = socket.create_connection((self.config.host, self.config.port), timeout=self.connect_timeout)
        self._rtt = time.monotonic() - started
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
            sock.settimeout(self.io_timeout)
            self._opening(sock)
        except BaseException:
            sock.close()
            raise
        finally:
            self._connecting = None
        self._sock = sock
        self._cursor = 0  # everything not confirmed goes (again) over this connection
        self._version = sock.version() or ""
        if not self.connected and not self._outage:  # during an outage, the first confirmation says it is over
            waiting = len(self.spool)
            log.info("audit: connected to the audit repository %s (%s%s); %d message%s to deliver",
                     self.config.address, self._version, ", RELP" if self.transport == "relp" else "", waiting,
                     "" if waiting == 1 else "s")
        if not self._outage:  # during an outage only a confirmation says that delivery works again (_confirmed)
            self.connected = True

    def _opening(self, sock: ssl.SSLSocket) -> None:
        """What the transport does on a new connection before the first message."""

    def _alive(self, sock: ssl.SSLSocket, window: float = 0.0) -> bool:
        """Whether the repository still has the connection open, watching it for ``window``
        seconds. A syslog receiver never sends, so a readable socket means end-of-file, a reset,
        or TLS housekeeping (session tickets, which are read and ignored)."""
        deadline = time.monotonic() + window
        try:
            while True:
                remaining = max(0.0, deadline - time.monotonic())
                if _readable(sock, remaining) or sock.pending():
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

    def _disconnect(self, reason: str | None, *, spool: bool = False) -> None:
        """Drop the connection; ``reason`` ``None`` for a normal close (with TLS close_notify),
        else what failed (the spool, with ``spool``; else the repository or the network)."""
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
            self._failed(reason, spool=spool)

    def _failed(self, reason: str, *, spool: bool = False) -> None:
        """A failed connection or delivery: logged once per outage (a connection that then fails to
        deliver does not end the outage; a confirmed message does, see :meth:`_confirmed`)."""
        if spool and not self._spool_failing:
            # Logged even during an outage of the repository: this one needs the administrator.
            log.warning("audit: %s; delivery to the audit repository %s is retried until the spool works again "
                        "(a message confirmed but not removed is sent again); check that file system and the "
                        "directory's permissions", reason, self.config.address)
        elif not spool and not self._outage:
            log.warning("audit: audit repository %s: %s; messages wait in %s and are sent when it is back",
                        self.config.address, reason, self.spool.directory)
        self._spool_failing = spool or self._spool_failing
        self._outage = True
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


class SyslogTlsSink(RepositorySink):
    """RFC 5425 syslog over TLS, each burst confirmed by the end of its connection (module doc)."""

    transport = "tls"

    def __init__(self, config: SyslogConfig, spool: Spool, **options: float) -> None:
        self.burst = CONFIRM_AFTER  # the most messages sent before a confirmation (smaller after a timeout)
        super().__init__(config, spool, **options)

    def _opening(self, sock: ssl.SSLSocket) -> None:
        # With TLS 1.3 a server that refuses our certificate (or has none from us) closes the
        # connection only after our side of the handshake is done: give it a moment to say so,
        # rather than write the first message into a connection it is about to drop.
        if not self._alive(sock, self.settle_time):
            raise ConnectionError("the repository closed the connection right after the TLS handshake "
                                  "(does it accept our client certificate? see its log)")

    def _exchange(self) -> bool:
        sock = self._sock
        assert sock is not None
        sent: list[int] = []
        burst = self.burst
        while len(sent) < burst:
            batch = self.spool.after(self._cursor, min(SEND_BATCH, burst - len(sent)))
            if not batch:
                if not sent or self._stopping or not self._more_within(CONFIRM_LINGER):
                    break
                continue
            if not self._alive(sock):
                raise ConnectionLost("the audit repository closed the connection")
            for sequence, message in batch:
                sock.sendall(frame(message))
                self._cursor = sequence
                sent.append(sequence)
        if not sent:
            return False
        try:
            after_progress = self._confirm(sock, len(sent))
        except NotConfirmed:
            # What the repository's kernel took and it did not read in time cannot be watched: send
            # less at a time, so that a slow repository gets through a whole burst before the timeout.
            self.burst = min(self.burst, max(1, len(sent) // 2))
            raise
        self._confirmed(sent)
        if len(sent) == burst and after_progress < CONFIRM_TIMEOUT / 2:
            # It read what it held within half the timeout: twice as much would still fit in it.
            self.burst = min(CONFIRM_AFTER, burst * 2)
        return True

    def _more_within(self, seconds: float) -> bool:
        """Whether a message is submitted within ``seconds``."""
        deadline = time.monotonic() + seconds
        with self._condition:
            seen = self._submitted
            while self._submitted == seen and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._condition.wait(remaining)
            return self._submitted != seen

    def _confirm(self, sock: ssl.SSLSocket, count: int) -> float:
        """Close the connection and learn whether the repository read all of it (module doc).
        Returns how long the repository took to confirm after its last visible progress."""
        self._sock = None  # whatever happens, this connection is done
        try:
            if not self._alive(sock):
                raise ConnectionLost("the audit repository closed the connection")
            unacknowledged = unsent_bytes(sock)
            progress = time.monotonic()  # when the repository was last seen taking bytes
            sock.settimeout(CONFIRM_POLL)
            while True:
                try:
                    sock.unwrap()  # our close_notify (sent once); returns on the repository's close_notify
                    break
                except ssl.SSLEOFError:
                    break  # or on its plain close: rsyslog closes without close_notify
                except TimeoutError:
                    pass
                now = time.monotonic()
                left = unsent_bytes(sock)
                if left is not None and unacknowledged is not None and left < unacknowledged:
                    unacknowledged, progress = left, now  # it is reading: a slow repository, not a stopped one
                elif now - progress >= CONFIRM_TIMEOUT:
                    raise NotConfirmed(f"the audit repository did not confirm {count} message"
                                       f"{'' if count == 1 else 's'} within {CONFIRM_TIMEOUT:g} s of its last "
                                       "progress (stopped or overloaded?)")
                if self._stopping and self._past_deadline():
                    raise ConnectionLost(f"the agent stopped before the audit repository confirmed {count} "
                                         f"message{'' if count == 1 else 's'}")
            after_progress = time.monotonic() - progress
            # A repository that closed on its own just as our last bytes arrived answers them
            # with a reset (a socket closed with unread data does); it comes one round trip later.
            time.sleep(min(1.0, max(0.02, 4 * self._rtt)))
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise ConnectionLost(f"the audit repository reset the connection ({os.strerror(error)}) "
                                     "before it had read everything")
            return after_progress
        finally:
            try:
                sock.close()
            except OSError:
                pass


class RelpSink(RepositorySink):
    """RELP over TLS (agent/audit/relp.py): a message leaves the spool on the repository's ``rsp 200``."""

    transport = "relp"

    def __init__(self, config: SyslogConfig, spool: Spool, *, window: int = RELP_WINDOW, **options: float) -> None:
        self.window = window
        self._session = RelpSession(window)
        self._answered = 0.0  # when the repository last answered (or had nothing to answer)
        # Wakes the sender waiting for the repository's answers (:meth:`_receive`) when a message
        # comes, to send it if the window has room: one byte a message, read as the sender wakes.
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        super().__init__(config, spool, **options)

    def close(self, timeout: float = 5.0) -> None:
        super().close(timeout)
        self._wake_reader.close()
        self._wake_writer.close()

    def _wake(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except OSError:
            pass  # full (the sender is already due to wake) or closed

    def _drain_wake(self) -> None:
        try:
            while self._wake_reader.recv(4096):
                pass
        except OSError:
            pass

    def _attempt(self) -> bool:
        # Awake, the sender reads the spool next: the wake-ups of the messages in it are spent. (Not
        # waiting on the repository, while it is unreachable, it would otherwise leave them unread.)
        self._drain_wake()
        return super()._attempt()

    def _opening(self, sock: ssl.SSLSocket) -> None:
        self._session = RelpSession(self.window)
        sock.sendall(self._session.open())
        deadline = time.monotonic() + self.io_timeout
        while not self._session.opened:
            for event in self._receive(sock, deadline):
                if isinstance(event, Refused):
                    raise ConnectionError(f"the repository refused the RELP session: {event.response.code} "
                                          f"{event.response.text}")
                if isinstance(event, ServerClosed):
                    raise ConnectionLost("the repository closed the RELP session while opening it")

    def _receive(self, sock: ssl.SSLSocket, deadline: float) -> list[object]:
        """Wait for data from the repository until ``deadline`` (or a wake-up: then ``[]``)."""
        if not sock.pending():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectionLost(f"no RELP answer from the audit repository within {self.io_timeout:g} s "
                                     "(stopped or overloaded?)")
            ready = _readable_any([sock, self._wake_reader], remaining)
            if self._wake_reader in ready:
                self._drain_wake()
            if sock not in ready:
                return []
        data = sock.recv(65536)
        if not data:
            raise ConnectionLost("the audit repository closed the connection")
        return list(self._session.receive(data))

    def _exchange(self) -> bool:
        sock = self._sock
        assert sock is not None
        session = self._session
        if not session.unacknowledged:
            self._answered = time.monotonic()  # the repository owes us nothing yet
        while session.can_send():
            room = session.window - len(session.unacknowledged)
            batch = self.spool.after(self._cursor, min(SEND_BATCH, room))
            if not batch:
                break
            sock.sendall(b"".join(session.syslog(message, sequence) for sequence, message in batch))
            self._cursor = batch[-1][0]
        if not session.unacknowledged:
            return False
        acknowledged: list[int] = []
        # From its last answer, not from our last send: new messages keep coming to a stopped repository.
        deadline = self._answered + self.io_timeout
        while not acknowledged:
            events = self._receive(sock, deadline)
            if not events and not acknowledged:
                if session.can_send() and self.spool.after(self._cursor, 1):
                    return False  # woken by a new message: send it, then wait again
                if self._stopping and self._past_deadline():
                    return False
            for event in events:
                if isinstance(event, Acknowledged):
                    acknowledged.append(event.key)
                elif isinstance(event, Refused):
                    if acknowledged:
                        self._confirmed(acknowledged)
                    raise ConnectionLost(f"the repository refused a message: {event.response.code} "
                                         f"{event.response.text}")
                elif isinstance(event, ServerClosed):
                    if acknowledged:
                        self._confirmed(acknowledged)
                    raise ConnectionLost("the audit repository ended the RELP session (serverclose)")
        self._answered = time.monotonic()
        self._confirmed(acknowledged)
        return True

    def _goodbye(self) -> None:
        sock = self._sock
        if sock is None or not self._session.opened or self._session.unacknowledged:
            return
        try:
            sock.sendall(self._session.close())
            deadline = time.monotonic() + 1.0
            while not any(isinstance(e, ServerClosed) for e in self._receive(sock, deadline)):
                pass
        except (OSError, ssl.SSLError, RelpProtocolError):
            pass


def repository_sink(config: SyslogConfig, spool: Spool) -> RepositorySink:
    """The sink for ``config.transport``."""
    if config.transport == "relp":
        return RelpSink(config, spool)
    return SyslogTlsSink(config, spool)


def _readable(sock: socket.socket, timeout: float) -> bool:
    return bool(_readable_any([sock], timeout))


def _readable_any(socks: list[socket.socket], timeout: float) -> list[socket.socket]:
    """The sockets of ``socks`` readable within ``timeout`` s (selectors: no FD_SETSIZE limit)."""
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        return [key.fileobj for key, _ in selector.select(max(0.0, timeout))]  # type: ignore[misc]


def _describe(error: BaseException) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"the repository's certificate was refused: {error.verify_message}"
    if isinstance(error, socket.timeout):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
