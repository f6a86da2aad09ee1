"""One local DICOM connection relayed to the PACS over TLS with the card's identity.

Each connection has its own thread, which owns the TLS object (an ``ssl.SSLObject`` over memory
BIOs, so the relay decides every read and write) and both sockets. The handshake, and with it the
token's signature, runs in that thread with the GIL released: a slow card never stalls data
flowing in other connections. The relay is byte-exact and full-duplex, and forwards half-closes
(local EOF becomes TLS close_notify; the server's close_notify becomes a local FIN).

It watches PDU boundaries in the server-to-application direction so that, when something fails,
the application gets a well-formed A-ASSOCIATE-RJ (association not yet accepted) or A-ABORT
instead of a bare reset.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from agent.config.model import TunnelConfig
from agent.dicom.association import Association, Refuse
from agent.dicom.pdu import (A_ABORT, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ, A_RELEASE_RP, AbortReason,
                             AbortSource, AcseRejectReason, AssociationPdu, CommandSet, FramerEvent, MalformedPduError,
                             PduFramer, PduHeader, PresentationRejectReason, RejectResult, RejectSource, a_abort,
                             a_associate_rj, pdu_type_name)
from agent.tls.failures import (TunnelFailure, connect_failure, failure_after_handshake, handshake_failure)
from agent.tls.policy import ClientIdentityFiles, ServerChecks, ServerVerificationError

log = logging.getLogger("agent.tunnel")

CHUNK = 256 * 1024
HIGH_WATER = 2 * CHUNK  # stop reading a side while this much waits for the other
REJECT_READ_TIMEOUT = 3.0
POLL_INTERVAL_MS = 1000


TOKEN_LOCK = threading.Lock()
"""Held around every step of a full handshake in this card session's process (one process, one token).

A card computes one signature at a time; handing it several at once only queues them inside the
module or, on some cards, fails them. Steps run on memory BIOs, so the lock is never held while
waiting for the network, and relays moving data never take it. A handshake that offers a session
to resume does not take it: it needs no signature, and must not wait seconds behind others that
do. (Should the server decline the resumption, that one signature is not serialized here; card
modules such as OpenSC lock the card for each operation themselves.)"""


class SessionEnd:
    """Tells every relay of a card session, at once, that the session is over.

    A pipe that is written once and never read: every relay polls its read end, so all of them
    wake within the same scheduler tick (a card pulled must close everything within 100 ms)."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        self.reason: str | None = None

    def signal(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            os.write(self._write_fd, b"x")

    def is_set(self) -> bool:
        return self.reason is not None


@dataclass
class TunnelRuntime:
    """A tunnel inside the card session: its TLS context and resumable session."""

    config: TunnelConfig
    context: ssl.SSLContext
    checks: ServerChecks
    identity: ClientIdentityFiles
    trust_ca: str
    ending: SessionEnd = field(default_factory=SessionEnd)
    username: str | None = None  # asserted in User Identity Negotiation when the tunnel's rules ask for it
    report: Callable[[str, dict[str, Any]], None] = lambda kind, fields: None  # for the audit trail
    _session: ssl.SSLSession | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    open_connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    last_error: str | None = None

    def resumable_session(self) -> ssl.SSLSession | None:
        with self._lock:
            return self._session

    def remember_session(self, session: ssl.SSLSession | None) -> None:
        if session is not None and self.config.session_resumption:
            with self._lock:
                self._session = session

    def forget_sessions(self) -> None:
        with self._lock:
            self._session = None

    def counters(self) -> dict[str, object]:
        with self._lock:
            return {"open_connections": self.open_connections, "bytes_up": self.bytes_up,
                    "bytes_down": self.bytes_down, "last_error": self.last_error}

    def count(self, delta_open: int = 0, up: int = 0, down: int = 0, error: str | None = None) -> None:
        with self._lock:
            self.open_connections += delta_open
            self.bytes_up += up
            self.bytes_down += down
            if error:
                self.last_error = error


def set_nodelay(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Tls:
    """The TLS object and its memory BIOs."""

    def __init__(self, runtime: TunnelRuntime) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        session = runtime.resumable_session()
        self.resuming = session is not None
        self.obj = runtime.context.wrap_bio(self.incoming, self.outgoing,
                                            server_hostname=runtime.config.server_name, session=session)

    def pending_output(self) -> bytes:
        return self.outgoing.read() if self.outgoing.pending else b""


def _connect(runtime: TunnelRuntime) -> socket.socket:
    config = runtime.config
    try:
        remote = socket.create_connection((config.remote_host, config.remote_port), timeout=config.connect_timeout)
    except OSError as error:
        raise connect_failure(config.remote, error, config.connect_timeout) from None
    set_nodelay(remote)
    return remote


def _handshake(runtime: TunnelRuntime, remote: socket.socket) -> _Tls:
    config = runtime.config
    tls = _Tls(runtime)
    lock = contextlib.nullcontext() if tls.resuming else TOKEN_LOCK
    deadline = time.monotonic() + config.handshake_timeout
    try:
        while True:
            try:
                with lock:
                    tls.obj.do_handshake()
                remote.sendall(tls.pending_output())
                return tls
            except ssl.SSLWantReadError:
                remote.sendall(tls.pending_output())
                remote.settimeout(max(0.001, deadline - time.monotonic()))
                data = remote.recv(CHUNK)
                if data:
                    tls.incoming.write(data)
                else:
                    tls.incoming.write_eof()
    except (OSError, ssl.SSLError) as error:
        try:  # let the server see our alert, if OpenSSL wrote one
            remote.sendall(tls.pending_output())
        except OSError:
            pass
        raise handshake_failure(config.remote, error, runtime.identity.describe(), runtime.trust_ca,
                                config.server_name) from None


def handle_connection(runtime: TunnelRuntime, local: socket.socket, peer: str) -> None:
    """Serve one accepted local connection to the end; never raises."""
    config = runtime.config
    set_nodelay(local)
    runtime.count(delta_open=1)
    started = time.monotonic()
    remote: socket.socket | None = None
    try:
        try:
            remote = _connect(runtime)
            tls = _handshake(runtime, remote)
            try:
                runtime.checks.verify(tls.obj.getpeercert(binary_form=True))
            except ServerVerificationError as error:
                raise TunnelFailure(str(error)) from None
        except TunnelFailure as failure:
            runtime.count(error=failure.message)
            log.warning("tunnel %s: %s: %s", config.name, peer, failure.message)
            runtime.report("tls-failure", {"tunnel": config.name, "peer": peer, "remote": config.remote,
                                           "reason": failure.message})
            reject_local(local, failure)
            return
        version, resumed = tls.obj.version(), tls.obj.session_reused
        relay = _Relay(runtime, local, remote, tls, peer)
        relay.run()
        runtime.remember_session(tls.obj.session)
        association = relay.association
        log.info("tunnel %s: %s: %s %s to %s as %s, %s, %d bytes up, %d down, %.1f s%s%s", config.name, peer,
                 version, "resumed" if resumed else "full handshake", config.remote,
                 runtime.identity.describe(), association.describe_request(), relay.bytes_up, relay.bytes_down,
                 time.monotonic() - started, association.describe_instances(),
                 f"; {relay.failure.message}" if relay.failure else "")
        if association.answer == "accepted":
            runtime.report("association-end", relay.association_fields(failure=relay.failure))
    except Exception:  # a bug must end this connection, not the agent
        log.exception("tunnel %s: %s: internal error", config.name, peer)
    finally:
        runtime.count(delta_open=-1)
        for sock in (local, remote):
            if sock is not None:
                sock.close()


def reject_pdu(*, transient: bool) -> bytes:
    """The A-ASSOCIATE-RJ the agent answers with when it cannot reach or trust the PACS."""
    if transient:
        return a_associate_rj(RejectResult.REJECTED_TRANSIENT, RejectSource.SERVICE_PROVIDER_PRESENTATION,
                              PresentationRejectReason.TEMPORARY_CONGESTION)
    return a_associate_rj(RejectResult.REJECTED_PERMANENT, RejectSource.SERVICE_PROVIDER_ACSE,
                          AcseRejectReason.NO_REASON_GIVEN)


def abort_pdu(malformed: MalformedPduError | None = None) -> bytes:
    """The A-ABORT the agent sends as DICOM UL service-provider; its reason names a malformed PDU."""
    if malformed is None:
        return a_abort(AbortSource.SERVICE_PROVIDER, AbortReason.REASON_NOT_SPECIFIED)
    unknown_type = str(malformed).startswith("unknown PDU type")
    return a_abort(AbortSource.SERVICE_PROVIDER, AbortReason.UNRECOGNIZED_PDU if unknown_type
                   else AbortReason.INVALID_PDU_PARAMETER_VALUE)


def _read_one_pdu(local: socket.socket, timeout: float) -> None:
    """Consume what the application sent (normally its A-ASSOCIATE-RQ) so that closing does not reset."""
    framer = PduFramer()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            local.settimeout(max(0.001, deadline - time.monotonic()))
            data = local.recv(CHUNK)
            if not data:
                return
            if any(isinstance(event, AssociationPdu) for event in framer.feed(data)):
                return
    except (OSError, MalformedPduError):
        return


def reject_local(local: socket.socket, failure: TunnelFailure) -> None:
    """Answer the application's association request with A-ASSOCIATE-RJ, then close gracefully."""
    _read_one_pdu(local, REJECT_READ_TIMEOUT)
    _send_and_close(local, reject_pdu(transient=failure.transient))


def _send_and_close(local: socket.socket, data: bytes) -> None:
    try:
        local.settimeout(2.0)
        local.sendall(data)
        local.shutdown(socket.SHUT_WR)
        while local.recv(CHUNK):  # until the application closes, so our PDU is not lost to a reset
            pass
    except OSError:
        pass


class _Relay:
    def __init__(self, runtime: TunnelRuntime, local: socket.socket, remote: socket.socket, tls: _Tls,
                 peer: str) -> None:
        self.runtime = runtime
        self.local = local
        self.remote = remote
        self.tls = tls
        self.peer = peer
        self.to_local = bytearray()
        self.to_remote = bytearray(tls.pending_output())
        self.association = Association(runtime.config.association, runtime.username)
        self.up_framer = PduFramer(inspect_commands=True)
        self.down_framer = PduFramer(inspect_commands=True)
        self.held_request: bytearray | None = bytearray()  # the application's bytes until its A-ASSOCIATE-RQ is whole
        self.refusal: Refuse | None = None
        self.malformed: MalformedPduError | None = None  # from either side: ends the association with A-ABORT
        self.association_answered = False  # an A-ASSOCIATE-AC or -RJ went to the application
        self.association_over = False  # an A-RELEASE-RP, A-ABORT or A-ASSOCIATE-RJ went to the application
        self.local_eof = False
        self.remote_done = False
        self.local_write_closed = False
        self.received_any = False
        self.bytes_up = 0
        self.bytes_down = 0
        self.failure: TunnelFailure | None = None

    def run(self) -> None:
        self.local.setblocking(False)
        self.remote.setblocking(False)
        poller = select.poll()
        local_fd, remote_fd = self.local.fileno(), self.remote.fileno()
        poller.register(local_fd, 0)
        poller.register(remote_fd, 0)
        poller.register(self.runtime.ending.read_fd, select.POLLIN)
        try:
            while self.failure is None:
                local_mask = (select.POLLIN if not self.local_eof and len(self.to_remote) < HIGH_WATER else 0) | (
                    select.POLLOUT if self.to_local else 0)
                remote_mask = (select.POLLIN if not self.remote_done and len(self.to_local) < HIGH_WATER else 0) | (
                    select.POLLOUT if self.to_remote else 0)
                if self.remote_done and not self.to_local and not self.local_write_closed:
                    self._close_local_write()
                if self._finished(local_mask, remote_mask):
                    return
                poller.modify(local_fd, local_mask)
                poller.modify(remote_fd, remote_mask)
                for fd, events in poller.poll(POLL_INTERVAL_MS):
                    if fd == local_fd:
                        self._on_local(events)
                    elif fd == remote_fd:
                        self._on_remote(events)
                if self.runtime.ending.is_set():
                    self.failure = TunnelFailure(f"card session ended: {self.runtime.ending.reason}")
        except OSError as error:
            self.failure = self.failure or TunnelFailure(f"connection error: {error.strerror or error}", True)
        if self.failure is not None:
            self.runtime.count(error=self.failure.message)
            log.warning("tunnel %s: %s: %s", self.runtime.config.name, self.peer, self.failure.message)
            self._end_remote()
            self._tell_application()

    def _end_remote(self) -> None:
        """Flush what the PACS should still get (an A-ABORT we wrote) and say close_notify, briefly."""
        if self.remote_done or self.runtime.ending.is_set():
            return  # the card is gone: nothing more goes out under its identity
        try:
            self.tls.obj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass
        self.to_remote += self.tls.pending_output()
        try:
            self.remote.settimeout(1.0)
            self.remote.sendall(self.to_remote)
        except OSError:
            pass
        self.to_remote.clear()

    def _finished(self, local_mask: int, remote_mask: int) -> bool:
        if self.remote_done and self.local_write_closed and (self.local_eof or not local_mask & select.POLLIN):
            return True
        if self.local_eof and self.remote_done and not self.to_remote and not self.to_local:
            return True
        return not local_mask and not remote_mask

    def _close_local_write(self) -> None:
        self.local_write_closed = True
        try:
            self.local.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if not self.local_eof:
            # The server is done; the application gets a moment to close its side.
            self.local.settimeout(5.0)
            try:
                while self.local.recv(CHUNK):
                    pass
            except OSError:
                pass
            self.local_eof = True

    def _on_local(self, events: int) -> None:
        if events & select.POLLOUT and self.to_local:
            sent = self._send(self.local, self.to_local)
            del self.to_local[:sent]
        if events & (select.POLLIN | select.POLLHUP | select.POLLERR) and not self.local_eof:
            try:
                data = self.local.recv(CHUNK)
            except BlockingIOError:
                return
            except ConnectionResetError:
                data = b""
            if data:
                self.bytes_up += len(data)
                self.runtime.count(up=len(data))
                self._from_application(data)
            else:
                self.local_eof = True
                if not self.remote_done:
                    try:
                        self.tls.obj.unwrap()  # close_notify: our half of the connection ends
                    except (ssl.SSLWantReadError, ssl.SSLError):
                        pass
            self.to_remote += self.tls.pending_output()

    def _on_remote(self, events: int) -> None:
        if events & select.POLLOUT and self.to_remote:
            sent = self._send(self.remote, self.to_remote)
            del self.to_remote[:sent]
        if not events & (select.POLLIN | select.POLLHUP | select.POLLERR) or self.remote_done:
            return
        try:
            data = self.remote.recv(CHUNK)
        except BlockingIOError:
            return
        except ConnectionResetError as error:
            return self._remote_failed(error)
        if data:
            self.tls.incoming.write(data)
        else:
            self.tls.incoming.write_eof()
        while True:
            try:
                plain = self.tls.obj.read(CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.remote_done = True
                break
            except ssl.SSLError as error:
                return self._remote_failed(error)
            if not plain:
                break
            self.received_any = True
            self._to_application(plain)
        self.to_remote += self.tls.pending_output()

    def _from_application(self, data: bytes) -> None:
        """Hold the application's bytes until its A-ASSOCIATE-RQ is whole and decided, then pass them on."""
        was_at_boundary = self.up_framer.at_boundary
        try:
            events = self.up_framer.feed(data)
            if self.held_request is not None:
                self.held_request += data
                data = self._decide_request(events)
            else:
                self._inspect(events, from_application=True)
        except MalformedPduError as error:
            self.malformed = error
            self.failure = TunnelFailure(f"malformed PDU from the application: {error}")
            self._security_alert("malformed-pdu", self.failure.message)
            if self.held_request is None and was_at_boundary:
                self.tls.obj.write(abort_pdu(error))  # the PACS gets a clean end of the association too
                self.to_remote += self.tls.pending_output()
            return
        if data:
            self.tls.obj.write(data)

    def _decide_request(self, events: list[FramerEvent]) -> bytes:
        for index, event in enumerate(events):
            if isinstance(event, PduHeader) and event.pdu_type != A_ASSOCIATE_RQ:
                raise MalformedPduError(f"{pdu_type_name(event.pdu_type)} PDU before any A-ASSOCIATE-RQ")
            if not isinstance(event, AssociationPdu):
                continue
            decision = self.association.on_request(event.pdu)
            assert self.held_request is not None
            rest = bytes(self.held_request[len(event.pdu):])
            self.held_request = None
            if isinstance(decision, Refuse):
                self.refusal = decision
                self.failure = TunnelFailure(f"association {self.association.describe_request()} refused: "
                                             f"{decision.reason}")
                self._security_alert("association-refused", self.failure.message)
                return b""
            self._inspect(events[index + 1:], from_application=True)
            return decision.pdu + rest
        return b""

    def _inspect(self, events: list[FramerEvent], *, from_application: bool) -> None:
        for event in events:
            if isinstance(event, CommandSet):
                self.association.on_command(event.data, from_application)
            elif isinstance(event, AssociationPdu) and event.pdu_type == A_ABORT and from_application:
                self.association.end = "aborted by the application"

    def _to_application(self, plain: bytes) -> None:
        try:
            events = self.down_framer.feed(plain)
            for event in events:
                if not isinstance(event, AssociationPdu):
                    continue
                if event.pdu_type == A_ASSOCIATE_AC:
                    self.association.on_accept(event.pdu)
                    log.info("tunnel %s: %s: %s", self.runtime.config.name, self.peer, self.association.describe_accept())
                    self.runtime.report("association-begin", self.association_fields())
                elif event.pdu_type == A_ASSOCIATE_RJ:
                    log.info("tunnel %s: %s: association %s rejected by the PACS: %s", self.runtime.config.name,
                             self.peer, self.association.describe_request(), self.association.on_reject(event.pdu))
                elif event.pdu_type == A_RELEASE_RP:
                    self.association.end = "released"
                elif event.pdu_type == A_ABORT:
                    self.association.end = "aborted by the PACS"
                if event.pdu_type in (A_ASSOCIATE_AC, A_ASSOCIATE_RJ):
                    self.association_answered = True
                if event.pdu_type in (A_RELEASE_RP, A_ABORT, A_ASSOCIATE_RJ):
                    self.association_over = True
            self._inspect(events, from_application=False)
        except MalformedPduError as error:
            self.malformed = error
            self.failure = TunnelFailure(f"malformed PDU from the server: {error}")
            self._security_alert("malformed-pdu", self.failure.message)
            return
        self.bytes_down += len(plain)
        self.runtime.count(down=len(plain))
        self.to_local += plain

    def association_fields(self, failure: TunnelFailure | None = None) -> dict[str, Any]:
        """What the audit trail records about this association."""
        association = self.association
        return {
            "tunnel": self.runtime.config.name, "peer": self.peer, "remote": self.runtime.config.remote,
            "calling_ae_title": association.calling_ae_title, "called_ae_title": association.called_ae_title,
            "user_identity": association.user_identity_sent, "end": association.end,
            "abstract_syntaxes": sorted(set(association.accepted_abstract_syntaxes.values())),
            "instances": [{"sop_class_uid": i.sop_class_uid, "sop_instance_uid": i.sop_instance_uid,
                           "status": i.status} for i in association.instances],
            "failure": failure.message if failure else None,
        }

    def _security_alert(self, what: str, reason: str) -> None:
        self.runtime.report("security-alert", {"tunnel": self.runtime.config.name, "peer": self.peer,
                                               "remote": self.runtime.config.remote, "what": what,
                                               "reason": reason})

    def _remote_failed(self, error: Exception | None) -> None:
        config = self.runtime.config
        if self.association_over and self.down_framer.at_boundary:
            # Many PACSes drop TCP right after A-RELEASE-RP without a TLS close_notify: a normal end.
            self.remote_done = True
            return
        if self.association_answered:
            detail = getattr(error, "reason", None) or getattr(error, "strerror", None) or error
            self.failure = TunnelFailure(f"server {config.remote} broke the connection: {detail}", transient=True)
        else:
            self.failure = failure_after_handshake(config.remote, error, self.runtime.identity.describe(),
                                                   self.received_any)

    @staticmethod
    def _send(sock: socket.socket, data: bytearray) -> int:
        try:
            return sock.send(data)
        except BlockingIOError:
            return 0

    def _tell_application(self) -> None:
        """A-ASSOCIATE-RJ before the association was answered, else A-ABORT, at a PDU boundary only."""
        if not self.down_framer.at_boundary:
            return  # a PDU is half-delivered: anything we add would corrupt it; closing says enough
        assert self.failure is not None
        if self.refusal is not None:
            pdu = self.refusal.reject_pdu
        elif self.association_answered or self.malformed is not None:
            pdu = abort_pdu(self.malformed)
        else:
            pdu = reject_pdu(transient=self.failure.transient)
        self.local.setblocking(True)
        _send_and_close(self.local, bytes(self.to_local) + pdu)
