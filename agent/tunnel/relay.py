"""One local DICOM connection relayed to the PACS over TLS with the card's identity.

Each connection has its own thread, which owns the TLS object (an ``ssl.SSLObject`` over memory
BIOs, so the relay decides every read and write) and both sockets. The handshake, and with it the
token's signature, runs in that thread with the GIL released: a slow card never stalls data
flowing in other connections. The relay is byte-exact and full-duplex, and forwards half-closes
(local EOF becomes TLS close_notify; the server's close_notify becomes a local FIN, after an
A-ABORT if it came in the middle of an accepted association).

It watches PDU boundaries in the server-to-application direction so that, when something fails,
the application gets a well-formed A-ASSOCIATE-RJ (association not yet accepted) or A-ABORT
instead of a bare reset. What the audit trail needs it reports as it passes: each C-FIND's
Identifier at once, answered C-STOREs in batches (agent/tunnel/transfers.py).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ipaddress
import logging
import math
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, cast

from cryptography import x509
from cryptography.x509.oid import NameOID

from dicom_card_agent.config.model import InboundConfig, TunnelConfig
from dicom_card_agent.dicom.association import DATA_SET_PREFIX, Association, Forward, Query, Refuse
from dicom_card_agent.dicom.pdu import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    P_DATA_TF,
    AbortReason,
    AbortSource,
    AcseRejectReason,
    AssociationPdu,
    CommandSet,
    DataSetPrefix,
    FramerEvent,
    MalformedPduError,
    PduFramer,
    PduHeader,
    PresentationRejectReason,
    RejectResult,
    RejectSource,
    a_abort,
    a_associate_rj,
    parse_a_abort,
    pdu_type_name,
)
from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.logline import printable
from dicom_card_agent.revocation.checker import CheckGivenUpError
from dicom_card_agent.revocation.peer import PeerRevocation
from dicom_card_agent.session.channel import clipped
from dicom_card_agent.tls.failures import (
    PEER_STOPPED_ANSWERING_ERRNOS,
    UNREACHABLE,
    CardBusyError,
    TunnelFailure,
    connect_failure,
    failure_after_handshake,
    handshake_failure,
    pacs_stopped_answering,
)
from dicom_card_agent.tls.policy import ClientIdentityFiles, ServerChecks, ServerVerificationError
from dicom_card_agent.trust.errors import TrustError
from dicom_card_agent.tunnel.admission import REFUSALS_IN_FLIGHT, InFlight, RefusalLog
from dicom_card_agent.tunnel.connecting import connect_tcp
from dicom_card_agent.tunnel.counters import SessionCounts
from dicom_card_agent.tunnel.peer import PeerPolicy, identify_server
from dicom_card_agent.tunnel.session_end import SessionEnd, SessionEndedError
from dicom_card_agent.tunnel.transfers import INSTANCE_TEXT_LIMIT, TransferBatch, query_fields

log = logging.getLogger("agent.tunnel")

CHUNK = 256 * 1024
HIGH_WATER = 2 * CHUNK  # stop reading a side while this much waits for the other
# Stop reading the TLS peer while this much waits to go to it: what the application sends stops at
# HIGH_WATER, so only TLS's own answers to the peer (a KeyUpdate for each of its KeyUpdates) go
# beyond; a peer that provokes them without reading would otherwise grow the process without bound.
TLS_ANSWERS_CAP = 2 * HIGH_WATER
REJECT_READ_TIMEOUT = 3.0  # for the request of an application about to be rejected, however it trickles
CLOSE_LINGER = 2.0  # for the application to close after our last PDU, however it trickles
LOCAL_CLOSE_WAIT = 5.0  # for the application to close once the PACS has closed
ENDING_SEND_TIMEOUT = 0.5  # the last PDU to an application as the card session ends: well within its grace
ENDING_LINGER = 1.0  # then, for an application still sending to see that PDU: well within it too
SENDING_PAUSE = 0.05  # an application that sent nothing for this long is not sending
ASSOCIATE_RQ_TIMEOUT = 30.0  # the ARTIM timer's job (PS3.8 9.1.5) while no PACS is involved yet
CLOSED_MID_ASSOCIATION = "closed the connection (TLS close_notify) in the middle of the association, without " \
    "A-RELEASE or A-ABORT"
PACS_FINISH_TIMEOUT = 30.0  # ARTIM again: for the PACS to answer an A-RELEASE-RQ, or close after the application
POLL_INTERVAL_MS = 1000
TELL_AFTER_MS = 1  # see _Relay._tell_what_passed


TOKEN_LOCK = threading.Lock()
LOCK_WAIT_SLICE = 0.1  # a handshake waiting for TOKEN_LOCK looks this often whether its session ended
"""Held around every step of a full handshake in this card session's process (one process, one token).

A card computes one signature at a time; handing it several at once only queues them inside the
module or, on some cards, fails them. Steps run on memory BIOs, so the lock is never held while
waiting for the network, and relays moving data never take it. A handshake that offers a session
to resume does not take it: it needs no signature, and must not wait seconds behind others that
do. (Should the server decline the resumption, that one signature is not serialized here; card
modules such as OpenSC lock the card for each operation themselves.)"""
CARD_LOST = "card-lost"  # the report of a card session whose card no longer signs (agent/session/manager.py)


Report = Callable[[str, dict[str, Any]], None]


def no_report(kind: str, fields: dict[str, Any]) -> None:
    """The report sink when no audit trail is configured."""


PACS_PROBLEM = "pacs-problem"  # what the clinician is told about (agent/desktop/session_notices.py)


def report_pacs_problem(runtime: TunnelRuntime, failure: TunnelFailure | None) -> None:
    """A PACS that cannot be reached or refuses the card's certificate, for a desktop notification."""
    if failure is not None and failure.cause:
        runtime.report(PACS_PROBLEM, {"tunnel": runtime.config.name, "cause": failure.cause})


@dataclass
class _Counters:
    """Open connections, bytes each way (up: toward TLS) and the last error, for ``card-agent status``;
    ``tally`` counts associations and handshakes (agent/tunnel/counters.py)."""

    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    open_connections: int = field(default=0, init=False)
    bytes_up: int = field(default=0, init=False)
    bytes_down: int = field(default=0, init=False)
    last_error: str | None = field(default=None, init=False)
    tally: SessionCounts = field(default_factory=SessionCounts, init=False, repr=False)
    _in_flight: int = field(default=0, init=False, repr=False)  # handed to a thread and not yet ended

    def enter(self, limit: int) -> bool:
        """Count one more connection in flight unless ``limit`` are already."""
        with self._lock:
            if self._in_flight >= limit:
                return False
            self._in_flight += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def counters(self) -> dict[str, object]:
        with self._lock:
            bytes_up, bytes_down = self.bytes_up, self.bytes_down
            current = {"open_connections": self.open_connections, "bytes_up": bytes_up,
                       "bytes_down": bytes_down, "last_error": self.last_error}
        return {**current, "counts": self.tally.snapshot(bytes_up, bytes_down)}

    def count(self, delta_open: int = 0, up: int = 0, down: int = 0, error: str | None = None) -> None:
        with self._lock:
            self.open_connections += delta_open
            self.bytes_up += up
            self.bytes_down += down
            if error:
                self.last_error = error


@dataclass
class TunnelRuntime(_Counters):
    """A tunnel inside the card session: its TLS context and resumable session."""

    config: TunnelConfig = field(kw_only=True)
    context: ssl.SSLContext = field(kw_only=True)
    checks: ServerChecks = field(kw_only=True)
    identity: ClientIdentityFiles = field(kw_only=True)
    trust_ca: str = field(kw_only=True)
    ending: SessionEnd = field(default_factory=SessionEnd, kw_only=True)
    username: str | None = field(default=None, kw_only=True)  # for User Identity Negotiation, when asked for
    report: Report = field(default=no_report, kw_only=True)  # for the audit trail
    # After a TLS failure that may be the card's: why the card no longer signs (its login is gone),
    # or None; the card-session process tells the supervisor (CARD_LOST) the first time.
    card_lost: Callable[[], str | None] = field(default=lambda: None, kw_only=True)
    _session: ssl.SSLSession | None = field(default=None, init=False, repr=False)
    _session_resumptions: int = field(default=0, init=False, repr=False)
    _single_use_tickets: bool = field(default=False, init=False, repr=False)
    _spare: _Tls | None = field(default=None, init=False, repr=False)  # made ahead by prepare_tls

    def resumable_session(self) -> ssl.SSLSession | None:
        with self._lock:
            return self._session

    def tls_for_connection(self) -> _Tls:
        """A TLS object for a new connection to the PACS, offering the session to resume.

        Attaching a session takes 0.1-0.4 ms, as Python's ``ssl`` copies it through DER; the object
        made ahead by :meth:`prepare_tls` saves the connection that. It always offers the session
        kept: replacing or forgetting the session drops it.
        """
        with self._lock:
            spare, self._spare = self._spare, None
            session = self._session
        return spare or _Tls(self.context, server_hostname=self.config.server_name, session=session)

    def prepare_tls(self) -> None:
        """Make the next connection's TLS object now, for the session to resume (or none), unless
        one is made.

        Called once a connection has ended and its session was kept: its thread has nothing left to
        do. (Made while a handshake waited for the PACS's answer instead, it delayed that answer's
        handling whenever the PACS answered within the 0.2-0.4 ms it takes: 0.09 ms of a resumed
        association's set-up, measured with a packet capture.) It is kept only if the session is
        still the one kept then.
        """
        with self._lock:
            session = self._session
            if self._spare is not None:
                return
        try:
            spare = _Tls(self.context, server_hostname=self.config.server_name, session=session)
        except (ValueError, ssl.SSLError) as error:  # the connection that takes it would fail the same way
            log.debug("tunnel %s: no TLS object made ahead: %s", self.config.name, error)
            return
        with self._lock:
            if self._session is session and self._spare is None:
                self._spare = spare

    def remember_session(self, tls: ssl.SSLObject) -> None:
        """Keep a session for the next connection to resume.

        A resumed connection's session is read only for a PACS whose tickets work once: Python
        3.11 leaks a copy of the session (~6 kB) on every read of ``.session`` (CPython
        gh-116810), which grew the card-session process with every association. So the session of
        a full handshake serves every resumption until the PACS stops accepting it (its ticket
        lifetime), when a full handshake gives the next one. docs/tls-policy.md says what that
        means for the privacy of TLS 1.3 tickets.
        """
        if not self.config.session_resumption:
            return
        with self._lock:
            if tls.session_reused:
                self._session_resumptions += 1
                if not self._single_use_tickets:
                    return
            elif (self._session is not None and self._session_resumptions == 1 and not self._single_use_tickets
                  and self._session.time <= time.time() < self._session.time + self._session.timeout):
                # Refused on its second use, within its lifetime: this PACS takes each ticket once. A
                # session made "later" than now means the clock was set back, and OpenSSL offers no
                # ticket of negative age: that refusal says nothing of the PACS.
                self._single_use_tickets = True
                log.info("tunnel %s: the PACS accepts each TLS session ticket once; every association now keeps "
                         "its newest ticket", self.config.name)
            else:
                self._session_resumptions = 0
        session = tls.session
        if session is not None:
            with self._lock:
                self._session = session
                self._spare = None

    def forget_sessions(self) -> None:
        with self._lock:
            self._session = None
            self._spare = None
            self._session_resumptions = 0


@dataclass
class InboundRuntime(_Counters):
    """An inbound listener inside the card session: the PACS connects over TLS, the agent is the server."""

    config: InboundConfig = field(kw_only=True)
    context: ssl.SSLContext = field(kw_only=True)
    identity_description: str = field(kw_only=True)
    signs_on_token: bool = field(kw_only=True)  # its handshakes take TOKEN_LOCK
    ending: SessionEnd = field(default_factory=SessionEnd, kw_only=True)
    report: Report = field(default=no_report, kw_only=True)
    revocation: PeerRevocation | None = field(default=None, kw_only=True)  # checked after the handshake
    username: None = field(default=None, init=False)  # the agent asserts no user identity toward a local SCP
    # Free places for TLS handshakes with peers not yet authenticated (max_pending_handshakes).
    handshake_slots: threading.Semaphore = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.handshake_slots = threading.Semaphore(self.config.max_pending_handshakes)


_inbound_refusals = RefusalLog(log)


def set_nodelay(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


KEEPALIVE_PROBES = 6


def keep_alive(sock: socket.socket, dead_after: float) -> None:
    """Give up the PACS's connection once the PACS has answered nothing for ``dead_after`` seconds.

    Idle: a viewer may hold an association for long, and a firewall or NAT between the workstation
    and the PACS forgets an idle flow (often after 5 to 60 minutes). Keepalive probes after half of
    ``dead_after`` keep the flow known and find a PACS that vanished (host down, network gone).
    Sending: while data waits for its acknowledgement keepalive does not run, and TCP would
    retransmit for 15 minutes and more before the application heard anything; TCP_USER_TIMEOUT
    ends it after ``dead_after`` (and then also bounds the probes). Default 120 s: probes after
    60 s, every 10 s, 6 of them."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    idle = max(1, int(dead_after / 2))
    interval = max(1, int((dead_after - idle) / KEEPALIVE_PROBES))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, math.ceil((dead_after - idle) / interval)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(dead_after * 1000))


class _Tls:
    """A TLS object over memory BIOs, so that the relay decides every read and write."""

    def __init__(self, context: ssl.SSLContext, *, server_side: bool = False, server_hostname: str | None = None,
                 session: ssl.SSLSession | None = None) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.offered_session = session
        self.seconds = 0.0  # the whole handshake, once done
        self.locked_seconds = 0.0  # inside OpenSSL holding the token lock (its wait for the lock not counted)
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                    server_hostname=server_hostname, session=session)

    @property
    def resuming(self) -> bool:
        return self.offered_session is not None

    def pending_output(self) -> bytes:
        return self.outgoing.read() if self.outgoing.pending else b""

    def handshake(self, sock: socket.socket, timeout: float, lock: threading.Lock | None,
                  ending: SessionEnd) -> None:
        """Complete the handshake over ``sock``, each step holding ``lock`` (the token's, when it
        signs); OSError or ssl.SSLError when it fails, :class:`SessionEndedError` when the card
        session ends while it waits for the peer or the lock, :class:`CardBusyError` when the lock
        is not free before the deadline."""
        started = time.monotonic()
        deadline = started + timeout
        buffer = read_buffer()
        sock.setblocking(False)  # each wait is a poll that also watches the session's end
        try:
            while True:
                try:
                    with _holding(lock, deadline, ending):
                        step = time.monotonic()
                        try:
                            self.obj.do_handshake()
                        finally:
                            self.locked_seconds += time.monotonic() - step
                    _send_all(sock, self.pending_output(), deadline, ending)
                    self.seconds = time.monotonic() - started
                    return
                except ssl.SSLWantReadError:
                    _send_all(sock, self.pending_output(), deadline, ending)
                    if time.monotonic() >= deadline:  # a peer trickling bytes must not outlast it either
                        raise TimeoutError("the peer did not finish the TLS handshake in time") from None
                    _wait_for_peer(sock, deadline, ending)
                    try:
                        count = sock.recv_into(buffer)
                    except BlockingIOError:
                        continue
                    if count:
                        self.incoming.write(buffer[:count])
                    else:
                        self.incoming.write_eof()
        except (OSError, ssl.SSLError):
            try:  # let the peer see our alert, if OpenSSL wrote one
                sock.send(self.pending_output())
            except OSError:
                pass
            raise


@contextlib.contextmanager
def _holding(lock: threading.Lock | None, deadline: float, ending: SessionEnd) -> Iterator[None]:
    """``lock`` held for one handshake step, if it is free before ``deadline``: a signature that
    takes the card for long (a card another program holds in a PC/SC transaction, a slow card)
    must not hold every handshake queued behind it past its own handshake_timeout. Given up at
    once when the card session ends."""
    if lock is None:
        yield
        return
    while not lock.acquire(timeout=min(LOCK_WAIT_SLICE, max(0.0, deadline - time.monotonic()))):
        if ending.is_set():
            raise ending.error()
        if time.monotonic() >= deadline:
            raise CardBusyError("the card did not become free for this handshake's signature in time: another "
                                "signature held it (a slow card, or another program using the card)")
    try:
        yield
    finally:
        lock.release()


_thread_buffers = threading.local()


def read_buffer() -> memoryview:
    """This thread's buffer for reading a socket (``CHUNK`` bytes). A connection's reads are passed
    on, or copied, before the next read, and a thread serves one connection at a time; one buffer a
    connection cost a 256 KiB allocation, zero-filled and faulted in page by page, every time."""
    buffer = getattr(_thread_buffers, "buffer", None)
    if buffer is None:
        buffer = _thread_buffers.buffer = memoryview(bytearray(CHUNK))
    return buffer


def _send_all(sock: socket.socket, data: bytes, deadline: float, ending: SessionEnd) -> None:
    """All of ``data`` on a non-blocking ``sock``, waiting (see :func:`_wait_for`) while it is full."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            pass
        if view:
            _wait_for(sock, select.POLLOUT, deadline, ending, "the peer did not take the TLS handshake in time")


def _wait_for_peer(sock: socket.socket, deadline: float, ending: SessionEnd) -> None:
    """Until ``sock`` is readable: see :func:`_wait_for`."""
    _wait_for(sock, select.POLLIN, deadline, ending, "the peer did not answer in time")


def _wait_for(sock: socket.socket, events: int, deadline: float, ending: SessionEnd, late: str) -> None:
    """Until ``sock`` has ``events``; TimeoutError(``late``) at ``deadline``. A session that ends
    meanwhile raises :class:`SessionEndedError`: nothing may keep waiting for a peer then (the
    application would be closed without a DICOM answer, and the session's end would wait)."""
    poller = select.poll()  # not select(): descriptors above 1023 are fine
    poller.register(sock, events)
    poller.register(ending.read_fd, select.POLLIN)
    ready = poller.poll(max(1, round((deadline - time.monotonic()) * 1000)))
    if ending.is_set():
        raise ending.error()
    if not ready:
        raise TimeoutError(late)


def _connect(runtime: TunnelRuntime) -> socket.socket:
    config = runtime.config
    try:
        remote = connect_tcp(config.remote_host, config.remote_port, config.connect_timeout, runtime.ending)
    except SessionEndedError as error:
        raise TunnelFailure(str(error), transient=True) from None
    except OSError as error:
        raise connect_failure(config.remote, error, config.connect_timeout) from None
    set_nodelay(remote)
    keep_alive(remote, config.dead_pacs_timeout)
    return remote


def _handshake(runtime: TunnelRuntime, remote: socket.socket) -> _Tls:
    config = runtime.config
    tls = runtime.tls_for_connection()
    try:
        tls.handshake(remote, config.handshake_timeout, None if tls.resuming else TOKEN_LOCK, runtime.ending)
    except SessionEndedError as error:
        raise TunnelFailure(str(error), transient=True) from None
    except (OSError, ssl.SSLError) as error:
        if runtime.ending.is_set():  # the card left mid-signature ("EVP lib"): not the PACS's doing
            raise TunnelFailure(f"card session ended: {runtime.ending.reason}", transient=True) from None
        if _may_be_the_cards(error):
            lost = runtime.card_lost()
            if lost is not None:
                raise TunnelFailure(f"the card did not sign the TLS handshake: {lost}", transient=True) from None
        raise handshake_failure(config.remote, error, runtime.identity.describe(), runtime.trust_ca,
                                config.server_name) from None
    return tls


def _may_be_the_cards(error: Exception) -> bool:
    """A handshake failure the card's signature may be behind ("EVP lib", ...): an OpenSSL error that
    is neither the server's certificate nor the connection's end."""
    return isinstance(error, ssl.SSLError) and not isinstance(
        error, (ssl.SSLCertVerificationError, ssl.SSLEOFError, ssl.SSLZeroReturnError))


def _tally_handshake(runtime: TunnelRuntime | InboundRuntime, tls: _Tls, *, signs_on_token: bool) -> None:
    """Count a completed handshake and its durations; the token's share only when it signed."""
    resumed = tls.obj.session_reused
    signing = tls.locked_seconds if signs_on_token and not resumed else None
    runtime.tally.handshake(resumed, tls.seconds, signing)


_capacity_refusals = RefusalLog(log, kind="tunnel")


def serve_connection(runtime: TunnelRuntime | InboundRuntime, connection: socket.socket,
                     peer: str) -> threading.Thread | None:
    """Serve a connection the supervisor handed over in a thread of its own, unless the listener has
    max_connections in flight (see :func:`serve_here`). The thread, or None."""
    if not _enter(runtime, connection, peer):
        return None
    thread = threading.Thread(target=_serve_entered, args=(runtime, connection, peer),
                              name=f"conn-{runtime.config.name}", daemon=True)
    try:
        thread.start()
    except RuntimeError:  # no thread to be had: the connection cannot be served
        runtime.leave()
        connection.close()
        log.error("%s %s: %s: no thread to serve the connection; closed",
                  "tunnel" if isinstance(runtime, TunnelRuntime) else "inbound", runtime.config.name, peer)
        return None
    return thread


def serve_here(runtime: TunnelRuntime | InboundRuntime, connection: socket.socket, peer: str) -> None:
    """Serve a connection to its end in the calling thread, unless the listener has max_connections
    in flight: then a tunnel's application gets A-ASSOCIATE-RJ (rejected-transient) at once and an
    inbound peer sees the connection close. Never raises."""
    if _enter(runtime, connection, peer):
        _serve_entered(runtime, connection, peer)


def _enter(runtime: TunnelRuntime | InboundRuntime, connection: socket.socket, peer: str) -> bool:
    """Count the connection in flight; False (the connection refused and closed) at max_connections."""
    config = runtime.config
    if runtime.enter(config.max_connections):
        return True
    reason = f"{config.max_connections} connections in flight (max_connections)"
    runtime.count(error=f"connection closed before TLS: {reason}")
    if isinstance(runtime, TunnelRuntime):
        reject_at_once(connection)
        _capacity_refusals.refused(config.name, peer.split(" pid ", 1)[0], reason)  # "uid 1000": one line per user
    else:
        _inbound_refusals.refused(config.name, peer.rsplit(":", 1)[0], reason)
    connection.close()
    return False


def _serve_entered(runtime: TunnelRuntime | InboundRuntime, connection: socket.socket, peer: str) -> None:
    try:
        if isinstance(runtime, TunnelRuntime):
            handle_outbound(runtime, connection, peer)
        else:
            handle_inbound(runtime, connection, peer)
    finally:
        runtime.leave()


def handle_outbound(runtime: TunnelRuntime, local: socket.socket, peer: str) -> None:
    """Serve one accepted local connection to the end; never raises."""
    config = runtime.config
    set_nodelay(local)
    runtime.count(delta_open=1)
    started = time.monotonic()
    remote: socket.socket | None = None
    try:
        request = b""
        try:
            if config.association.can_refuse:
                # A request these rules refuse must not cost a TLS connection under the card's identity,
                # nor a card signature: decide before contacting the PACS. Without such rules the
                # connection is made while the application is still sending, to save a round trip.
                whole_request = _request_before_connecting(runtime, local, peer)
                if whole_request is None:
                    return
                request = whole_request
            elif not _application_sent_something(runtime, local, peer):
                return
        except SessionEndedError as error:
            log.info("tunnel %s: %s: %s before the application's A-ASSOCIATE-RQ was read", config.name, peer, error)
            reject_at_once(local)
            return
        stage = "connect"
        try:
            remote = _connect(runtime)
        except TunnelFailure as failure:
            # The PACS is down or unreachable: news for the log and `status`, not a security alert
            # at the audit repository (nothing was authenticated, nor refused).
            runtime.count(error=failure.message)
            _tally_failure(runtime, stage)
            log.warning("tunnel %s: %s: %s", config.name, peer, failure.message)
            report_pacs_problem(runtime, failure)
            reject_local(local, failure, request_read=bool(request))
            return
        stage = "tls"
        try:
            tls = _handshake(runtime, remote)
            _tally_handshake(runtime, tls, signs_on_token=True)
            try:
                runtime.checks.verify(tls.obj.getpeercert(binary_form=True), runtime.ending.future)
            except ServerVerificationError as error:
                raise TunnelFailure(str(error)) from None
            except CheckGivenUpError as error:
                raise TunnelFailure(f"card session ended: {error}", transient=True) from None
        except TunnelFailure as failure:
            runtime.count(error=failure.message)
            _tally_failure(runtime, stage)
            log.warning("tunnel %s: %s: %s", config.name, peer, failure.message)
            if not runtime.ending.is_set():  # a card pulled mid-handshake is no security alert
                runtime.report("tls-failure", {"tunnel": config.name, "remote": config.remote,
                                               "reason": failure.message})
            report_pacs_problem(runtime, failure)
            reject_local(local, failure, request_read=bool(request))
            return
        version, resumed = tls.obj.version(), tls.obj.session_reused
        relay = _Relay(runtime, local, remote, tls.obj, tls.incoming, tls.outgoing, peer, requestor_is_local=True,
                       received=request)
        relay.run()
        _count_association(runtime, relay)
        relay.keep_session()  # unless the PACS's bytes did already
        association = relay.association
        log.info("tunnel %s: %s: %s %s to %s as %s, %s, %d bytes up, %d down, %.1f s%s%s", config.name, peer,
                 version, "resumed" if resumed else "full handshake", config.remote,
                 runtime.identity.describe(), association.describe_request(), relay.bytes_up, relay.bytes_down,
                 time.monotonic() - started, association.describe_instances(), _how_it_ended(relay))
        relay.report_end()
        report_pacs_problem(runtime, relay.failure)  # TLS 1.3: the certificate is refused after the handshake
        relay.finish()  # after the reports: it may wait for the peers, and the session's end cuts it short
        runtime.prepare_tls()
    except Exception:  # a bug must end this connection, not the agent
        log.exception("tunnel %s: %s: internal error", config.name, peer)
    finally:
        runtime.count(delta_open=-1)
        for sock in (local, remote):
            if sock is not None:
                sock.close()


def _request_before_connecting(runtime: TunnelRuntime, local: socket.socket, peer: str) -> bytes | None:
    """The application's bytes up to its whole A-ASSOCIATE-RQ, if the tunnel's rules let it through.

    Otherwise the application is answered here, as the relay would answer it (A-ASSOCIATE-RJ for a
    refused request, A-ABORT for a malformed stream, each logged and reported the same way), and
    None is returned; None too when the application leaves or sends nothing in time."""
    association = Association(runtime.config.association, runtime.username)
    try:
        received, request = _read_first_association_pdu(functools.partial(_receive_plain, local, runtime.ending),
                                                        ASSOCIATE_RQ_TIMEOUT, request_first=True)
        if request is None:
            return None
        decision = association.on_request(request)
    except SessionEndedError:
        raise
    except (socket.timeout, TimeoutError):
        log.info("tunnel %s: %s: no A-ASSOCIATE-RQ within %.0f s; closed", runtime.config.name, peer,
                 ASSOCIATE_RQ_TIMEOUT)
        return None
    except OSError:
        return None  # the application went away
    except MalformedPduError as error:
        message = f"malformed PDU from the application: {error}"
        runtime.count(error=message)
        runtime.tally.association("failed", "malformed")
        _tell_malformed(runtime, peer, message, "the application",
                        _association_fields(runtime, association, peer, requestor_is_local=True))
        _send_and_close(local, abort_pdu(error))
        return None
    if isinstance(decision, Forward):
        return received
    message = _refusal_message(association, decision)
    runtime.count(error=message)
    runtime.tally.association("refused")
    log.warning("tunnel %s: %s: %s", runtime.config.name, peer, message)
    runtime.report("security-alert", {**_association_fields(runtime, association, peer, requestor_is_local=True),
                                      "what": "association-refused", "reason": message})
    _send_and_close(local, decision.reject_pdu)
    return None


def _application_sent_something(runtime: TunnelRuntime, local: socket.socket, peer: str) -> bool:
    """Wait for the application's first byte before contacting the PACS.

    A port check or monitoring probe connects and closes without a word; contacting the PACS for it
    would cost a card signature and, at a PACS serving one association at a time, block the next
    real one. An application sends its A-ASSOCIATE-RQ as soon as it is connected, so waiting for its
    first byte gives up almost none of the round trip that connecting early saves."""
    try:
        _wait_for_peer(local, time.monotonic() + ASSOCIATE_RQ_TIMEOUT, runtime.ending)
        return bool(local.recv(1, socket.MSG_PEEK))
    except SessionEndedError:
        raise
    except TimeoutError:
        log.info("tunnel %s: %s: no A-ASSOCIATE-RQ within %.0f s; closed", runtime.config.name, peer,
                 ASSOCIATE_RQ_TIMEOUT)
        return False
    except OSError:
        return False  # reset: the application went away


def _how_it_ended(relay: _Relay) -> str:
    """The end of the summary line: the relay's failure, else an abort by either side or a PACS's
    close mid-association (a release, the normal end, goes unsaid)."""
    if relay.failure is not None:
        return f"; {relay.failure.message}"
    return "" if relay.association.end in ("open", "released", "rejected") else f"; {relay.association.end}"


def _tally_failure(runtime: TunnelRuntime | InboundRuntime, stage: str) -> None:
    """An association that failed at ``stage`` before the relay, or because the card session ended first."""
    runtime.tally.association("failed", "card_session_ended" if runtime.ending.is_set() else stage)


def _count_association(runtime: TunnelRuntime | InboundRuntime, relay: _Relay) -> None:
    """Count the relayed association's outcome once; a connection that ended before any
    A-ASSOCIATE-RQ (a port probe) is not an association."""
    association = relay.association
    if relay.refusal is not None:
        runtime.tally.association("refused")
    elif association.answer == "none" and relay.acceptor_aborted:
        # PS3.8 9.2 lets an acceptor answer the A-ASSOCIATE-RQ with an A-ABORT: turned down by the
        # acceptor, as by an A-ASSOCIATE-RJ, but without a reason; an outcome of its own tells an
        # administrator which of the two a PACS does.
        runtime.tally.association("aborted")
    elif association.answer in ("accepted", "rejected"):
        runtime.tally.association(association.answer)
        if association.answer == "accepted" and relay.failure is not None:
            runtime.tally.broken(_broken_reason(runtime, relay))
    elif relay.malformed is not None:
        runtime.tally.association("failed", "malformed")
    elif association.request is None:
        return
    elif runtime.ending.is_set():
        runtime.tally.association("failed", "card_session_ended")
    elif relay.failure is not None and not relay.failure.transient:
        runtime.tally.association("failed", "tls")  # the server refused the card's certificate after the handshake
    else:
        runtime.tally.association("failed", "connection")


def _broken_reason(runtime: TunnelRuntime | InboundRuntime, relay: _Relay) -> str:
    """Why an accepted association failed: one of agent/tunnel/counters.py's BROKEN_REASONS."""
    assert relay.failure is not None
    if relay.malformed is not None:
        return "malformed"
    if runtime.ending.is_set():
        return "card_session_ended"
    if relay.failure.cause == UNREACHABLE or relay.pacs_did_not_finish:  # after the handshake, only
        return "pacs_stopped_answering"  # pacs_stopped_answering and PACS_FINISH_TIMEOUT say so
    return "connection"


# PDUs an acceptor may not send before its answer (PS3.8 9.2: only an AC, RJ or A-ABORT); an unknown
# type is left to the framer, which says so (unrecognized-PDU).
NOT_ANSWERS = frozenset({A_ASSOCIATE_RQ, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP})


def _check_first_pdu(event: FramerEvent) -> None:
    """An association starts with an A-ASSOCIATE-RQ; anything else first is a malformed stream."""
    if isinstance(event, PduHeader) and event.pdu_type != A_ASSOCIATE_RQ:
        raise MalformedPduError(f"{pdu_type_name(event.pdu_type)} PDU before any A-ASSOCIATE-RQ")


def _refusal_message(association: Association, decision: Refuse) -> str:
    return f"association {association.describe_request()} refused: {decision.reason}"


def _association_fields(runtime: TunnelRuntime | InboundRuntime, association: Association, peer: str, *,
                       requestor_is_local: bool, peer_subject: str = "") -> dict[str, Any]:
    """What the audit trail records about an association; ``remote`` is always the PACS, and
    ``remote_subject`` its certificate's subject when it connected to an inbound listener."""
    fields = {
        "direction": "outbound" if requestor_is_local else "inbound",
        "tunnel": runtime.config.name,
        "remote": runtime.config.remote if requestor_is_local else peer,
        "local": peer if requestor_is_local else runtime.config.remote,
        "calling_ae_title": association.calling_ae_title, "called_ae_title": association.called_ae_title,
        "user_identity": association.user_identity_sent, "end": association.end,
        # Clipped as an instance's UIDs are: an A-ASSOCIATE-RQ of 1 MiB of control characters
        # otherwise made this field ~6 MB of JSON, in each of the association's reports.
        "abstract_syntaxes": clipped(sorted(set(association.accepted_abstract_syntaxes.values())),
                                     INSTANCE_TEXT_LIMIT),
    }
    if peer_subject:
        fields["remote_subject"] = printable(peer_subject)
    return fields


class ClientVerificationError(CardAgentError):
    """The PACS's client certificate does not meet the inbound listener's settings."""


def handle_inbound(runtime: InboundRuntime, remote: socket.socket, peer: str) -> None:
    """Serve one connection from the PACS (the agent is the TLS server) to the end; never raises."""
    config = runtime.config
    if not runtime.handshake_slots.acquire(blocking=False):
        # Every handshake waits for a signature with the server key (the card's, perhaps) before
        # the peer's certificate is seen: peers not yet authenticated get only so many at once.
        remote.close()
        reason = f"too many TLS handshakes in flight (max_pending_handshakes = {config.max_pending_handshakes})"
        runtime.count(error=f"connection closed before TLS: {reason}")
        runtime.tally.association("failed", "busy")
        _inbound_refusals.refused(config.name, peer.rsplit(":", 1)[0], reason)
        return
    set_nodelay(remote)
    keep_alive(remote, config.dead_pacs_timeout)
    runtime.count(delta_open=1)
    started = time.monotonic()
    local: socket.socket | None = None
    try:
        try:
            tls = _Tls(runtime.context, server_side=True)
            tls.handshake(remote, config.handshake_timeout, TOKEN_LOCK if runtime.signs_on_token else None,
                          runtime.ending)
            _tally_handshake(runtime, tls, signs_on_token=runtime.signs_on_token)
            client = _check_client(runtime, tls.obj.getpeercert(binary_form=True))
        except (OSError, ssl.SSLError, ClientVerificationError) as error:
            _refuse_handshake(runtime, peer, error)
            return
        finally:
            runtime.handshake_slots.release()  # authenticated or refused: no longer pending
        request = _request_over_tls(runtime, tls, remote, peer, client)
        if request is None:
            return
        try:
            local = _connect_forward(runtime)
        except TunnelFailure as failure:
            runtime.count(error=failure.message)
            _tally_failure(runtime, "connect")
            log.warning("inbound %s: %s: %s", config.name, peer, failure.message)
            _reject_over_tls(tls, remote, reject_pdu(transient=failure.transient))
            return
        version = tls.obj.version()  # while TLS is up: after the relay, its shutdown leaves None
        relay = _Relay(runtime, local, remote, tls.obj, tls.incoming, tls.outgoing, peer, requestor_is_local=False,
                       received=request, peer_subject=client)
        relay.run()
        _count_association(runtime, relay)
        association = relay.association
        log.info("inbound %s: %s: %s from %s as %s to %s, %s, %d bytes in, %d out, %.1f s%s%s", config.name, peer,
                 version, client, runtime.identity_description, config.forward,
                 association.describe_request(), relay.bytes_down, relay.bytes_up, time.monotonic() - started,
                 association.describe_instances(), _how_it_ended(relay))
        relay.report_end()
        relay.finish()
    except Exception:  # a bug must end this connection, not the agent
        log.exception("inbound %s: %s: internal error", config.name, peer)
    finally:
        runtime.count(delta_open=-1)
        for sock in (local, remote):
            if sock is not None:
                sock.close()


_handshake_refusals = RefusalLog(log)
_tunnel_malformed_pdus = RefusalLog(log, kind="tunnel")
_inbound_malformed_pdus = RefusalLog(log)
MALFORMED_STAGE = "on a malformed PDU"


def tell_refusal_counts() -> None:
    """Log (and report, for the audit trail) every refusal count not told yet: the card session is
    ending, and its process with the counts."""
    for refusals in (_inbound_refusals, _capacity_refusals, _handshake_refusals, _tunnel_malformed_pdus,
                     _inbound_malformed_pdus):
        refusals.flush(ending=True)


def _tell_malformed(runtime: TunnelRuntime | InboundRuntime, peer: str, message: str, sender: str,
                    fields: dict[str, Any]) -> None:
    """Log and report (an audit Security Alert with the association's ``fields``) a malformed PDU
    from ``sender``, as refused handshakes are: in full once a minute per listener, connection's
    peer (a local user, a PACS's host) and sender, then with the count of the others, so that a
    peer sending garbage on connection after connection fills neither the journal nor the audit
    trail (each alert is ~1.5 KB), and no malformed PDU goes uncounted."""
    tunnel = isinstance(runtime, TunnelRuntime)
    source = peer.split(" pid ", 1)[0] if tunnel else peer.rsplit(":", 1)[0]
    counted = functools.partial(_report_malformed_count, runtime.report, fields, source, sender)
    malformed_pdus = _tunnel_malformed_pdus if tunnel else _inbound_malformed_pdus
    if malformed_pdus.refused(runtime.config.name, source, f"sent by {sender}", stage=MALFORMED_STAGE,
                              first_line=f"{peer}: {message}", counted=counted):
        runtime.report("security-alert", {**fields, "what": "malformed-pdu", "reason": message})


def _report_malformed_count(report: Report, fields: dict[str, Any], source: str, sender: str, count: int,
                            seconds: float) -> None:
    """The audit Security Alert for the malformed PDUs after the one reported in full (``fields``: the
    latest one's association), worded as the log line that counts them."""
    report("security-alert", {
        **fields, "what": "malformed-pdu",
        "reason": f"closed {count} more connection{'s' if count > 1 else ''} from {source} {MALFORMED_STAGE} in "
                  f"the last {seconds:.0f} s: sent by {sender}"})


def _refuse_handshake(runtime: InboundRuntime, peer: str, error: Exception) -> None:
    """Log and report a handshake that did not authenticate the PACS: in full once a minute per
    listener, source and reason, then with the count of the others (log line and audit Security
    Alert alike), so that a peer handshaking in a loop fills neither the journal nor the audit trail."""
    config = runtime.config
    message, reason = _inbound_handshake_failure(peer, error, runtime.ending)
    runtime.count(error=message)
    _tally_failure(runtime, "tls")
    if runtime.ending.is_set():  # once per connection open when the session ends: nothing to throttle
        log.warning("inbound %s: %s: %s", config.name, peer, message)
        return
    host = peer.rsplit(":", 1)[0]
    counted = functools.partial(_report_refusal_count, runtime, peer, reason)
    if _handshake_refusals.refused(config.name, host, reason, stage="in the TLS handshake",
                                   first_line=f"{peer}: {message}", counted=counted):
        runtime.report("tls-failure", {"tunnel": config.name, "remote": peer, "reason": message})


def _report_refusal_count(runtime: InboundRuntime, peer: str, reason: str, count: int, seconds: float) -> None:
    """The audit Security Alert for the handshakes refused after the one reported in full (``peer``:
    the latest of them)."""
    host = peer.rsplit(":", 1)[0]
    runtime.report("tls-failure", {
        "tunnel": runtime.config.name, "remote": peer,
        "reason": f"refused {count} more TLS handshake{'s' if count > 1 else ''} from {host} in the last "
                  f"{seconds:.0f} s: {reason}"})


def _request_over_tls(runtime: InboundRuntime, tls: _Tls, remote: socket.socket, peer: str,
                      client: str) -> bytes | None:
    """The PACS's bytes up to its whole A-ASSOCIATE-RQ, read before the local storage SCP is
    connected: a peer that authenticates and then says nothing holds neither a connection to the
    local SCP nor this one beyond ``ASSOCIATE_RQ_TIMEOUT``, the ARTIM timer's job (PS3.8 9.1.5), as
    for an outbound application. None (logged, answered if malformed, to be closed) when the PACS
    closed, sent nothing in time or no DICOM, or the card session ended."""
    receive = functools.partial(_receive_over_tls, tls, remote, runtime.ending)
    try:
        received, request = _read_first_association_pdu(receive, ASSOCIATE_RQ_TIMEOUT, request_first=True)
    except SessionEndedError as error:
        log.info("inbound %s: %s: %s before the PACS's A-ASSOCIATE-RQ was read", runtime.config.name, peer, error)
    except TimeoutError:
        log.info("inbound %s: %s: no A-ASSOCIATE-RQ within %.0f s; closed", runtime.config.name, peer,
                 ASSOCIATE_RQ_TIMEOUT)
    except MalformedPduError as error:
        _abort_malformed_request(runtime, tls, remote, peer, client, error)
    except OSError as error:  # ssl.SSLError included
        log.info("inbound %s: %s: the connection ended before the A-ASSOCIATE-RQ: %s", runtime.config.name, peer,
                 getattr(error, "reason", None) or getattr(error, "strerror", None) or error)
    else:
        return received if request is not None else None
    return None


def _abort_malformed_request(runtime: InboundRuntime, tls: _Tls, remote: socket.socket, peer: str, client: str,
                             error: MalformedPduError) -> None:
    """The PACS sent no DICOM: A-ABORT and a Security Alert, as the relay answers a malformed PDU,
    and the local storage SCP never hears of it."""
    message = f"malformed PDU from the PACS at {peer}: {error}"
    runtime.count(error=message)
    runtime.tally.association("failed", "malformed")
    association = Association(runtime.config.association, runtime.username)
    _tell_malformed(runtime, peer, message, "the PACS", _association_fields(runtime, association, peer,
                                                                            requestor_is_local=False,
                                                                            peer_subject=client))
    _reject_over_tls(tls, remote, abort_pdu(error))


def _check_client(runtime: InboundRuntime, leaf_der: bytes | None) -> str:
    """The PACS's subject, once its pinned fingerprint (if any) matched and the revocation policy
    accepts it; OpenSSL checked the chain."""
    if leaf_der is None:
        raise ClientVerificationError("the PACS sent no client certificate")
    try:
        return _check_client_certificate(runtime, leaf_der)
    except ValueError as error:  # a field OpenSSL accepted and cryptography cannot parse: refused, not a crash
        raise ClientVerificationError(f"its client certificate cannot be read: {error}") from None


def _check_client_certificate(runtime: InboundRuntime, leaf_der: bytes) -> str:
    leaf = x509.load_der_x509_certificate(leaf_der)
    subject = printable(leaf.subject.rfc4514_string())  # the peer's text: it reaches the log and the audit trail
    config = runtime.config
    pins = config.client_pins
    if pins and hashlib.sha256(leaf_der).digest() not in pins:
        raise ClientVerificationError(
            f"client certificate {subject} has SHA-256 fingerprint {hashlib.sha256(leaf_der).digest().hex(':')}, "
            f"which is not among client_pins of inbound {config.name!r}")
    if config.client_names and not _carries_one_of(leaf, config.client_names):
        setting = ("client_names, by default the server_name of each [[tunnel]]" if config.client_names_by_default
                   else "client_names")
        raise ClientVerificationError(
            f"client certificate {subject} is not one of this listener's accepted peers: it names none of "
            f"{', '.join(config.client_names)} ({setting}); set [[inbound]] {config.name!r} client_names "
            "(or client_pins) to admit it")
    if runtime.revocation is not None:
        try:
            runtime.revocation.check(leaf, runtime.ending.future)
        except TrustError as error:
            raise ClientVerificationError(str(error)) from None
        except CheckGivenUpError as error:  # told as the session's end (see _inbound_handshake_failure)
            raise ClientVerificationError(f"card session ended: {error}") from None
    return subject


def _carries_one_of(leaf: x509.Certificate, names: tuple[str, ...]) -> bool:
    """Whether ``leaf`` carries one of ``names``: as a subjectAltName DNS name or IP address, or as its
    subject CN; names compared without regard to ASCII case (Unicode case folding would take
    "localho\u017ft" and "\u212aey.example", look-alikes, for "localhost" and "key.example"), and no
    wildcards (a PACS has its own name)."""
    common_names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    carried = {_ascii_lower(str(attribute.value)) for attribute in common_names}
    addresses: set[str] = set()  # as ipaddress writes them: one spelling per address
    try:
        alternative = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    else:
        carried.update(_ascii_lower(dns) for dns in alternative.get_values_for_type(x509.DNSName))
        addresses.update(map(str, alternative.get_values_for_type(x509.IPAddress)))
    for name in names:
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            if _ascii_lower(name) in carried:
                return True
        else:
            if str(address) in addresses:
                return True
    return False


def _ascii_lower(name: str) -> str:
    """``name`` with A-Z lowered and nothing else changed: host names compare so (RFC 4343)."""
    return name.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _inbound_handshake_failure(peer: str, error: Exception, ending: SessionEnd) -> tuple[str, str]:
    """The log line's message for a handshake that did not authenticate the PACS at ``peer``, and its
    reason without the peer's address (by which refusals are counted)."""
    if ending.is_set():  # it waited for its PACS, or the card left mid-signature: not the PACS's doing
        reason = f"ended with the card session: {ending.reason}"
        return f"TLS handshake with the PACS at {peer} {reason}", reason
    if isinstance(error, (socket.timeout, TimeoutError)):
        reason = "the TLS handshake did not finish in time"
        return f"TLS handshake with the PACS at {peer} did not finish in time", reason
    if isinstance(error, ClientVerificationError):
        reason = str(error)
    elif isinstance(error, ssl.SSLCertVerificationError):
        reason = f"its client certificate does not verify against [trust] ca: {error.verify_message or error}"
    else:
        detail = getattr(error, "reason", None) or getattr(error, "strerror", None) or error
        if detail != "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return f"TLS handshake with the PACS at {peer} failed: {detail}", f"the TLS handshake failed: {detail}"
        reason = "it sent no client certificate (this listener requires one)"
    return f"refused the PACS at {peer}: {reason}", reason


def _connect_forward(runtime: InboundRuntime) -> socket.socket:
    """A connection to the local storage SCP, once its owner is known to be an allowed user (of
    `localhost`'s two addresses, the one whose listener is theirs)."""
    config = runtime.config
    target = config.forward
    try:
        if target.unix_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(config.connect_timeout)
            try:
                sock.connect(target.unix_path)
            except OSError:
                sock.close()
                raise
            if (refusal := _another_users_scp(config, sock)) is not None:
                sock.close()
                raise refusal
        else:
            assert target.host is not None and target.port is not None  # a ListenAddress without a unix path
            sock = connect_tcp(target.host, target.port, config.connect_timeout, runtime.ending,
                               refuse=functools.partial(_another_users_scp, config))
    except SessionEndedError as error:
        raise TunnelFailure(str(error), transient=True) from None
    except OSError as error:
        raise TunnelFailure(f"cannot reach the local storage SCP at {target}: {error.strerror or error} "
                            "(is the viewer's storage SCP running?)", transient=True) from None
    set_nodelay(sock)
    return sock


def _another_users_scp(config: InboundConfig, sock: socket.socket) -> TunnelFailure | None:
    """Why ``sock``, connected to ``config``'s local storage SCP, must not be used: a listener of a
    user ``forward_uids`` does not name; None for one of theirs."""
    policy = PeerPolicy.allowing(config.forward_uids)
    owner = identify_server(sock)
    if policy.allows(owner):
        return None
    who = "an unknown user" if owner.uid is None else f"uid {owner.uid}"
    return TunnelFailure(f"the local storage SCP at {config.forward} belongs to {who}, not to "
                         f"{', '.join(map(str, sorted(policy.allowed_uids)))} (forward_uids): retrieved "
                         "images go only to the signed-in user's own software")


def _reject_over_tls(tls: _Tls, remote: socket.socket, pdu: bytes) -> None:
    """Answer the PACS's request (read already) with ``pdu``, an A-ASSOCIATE-RJ or A-ABORT, and end
    the TLS connection."""
    try:
        tls.obj.write(pdu)
        tls.obj.unwrap()
    except ssl.SSLError:
        pass  # SSLWantReadError from unwrap: the PACS's close_notify is not awaited
    try:
        remote.settimeout(REJECT_READ_TIMEOUT)
        remote.sendall(tls.pending_output())
    except OSError:
        pass


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


def _read_first_association_pdu(receive: Callable[[float], bytes], timeout: float, *,
                                request_first: bool) -> tuple[bytes, bytes | None]:
    """The peer's bytes up to its first whole association PDU (normally its A-ASSOCIATE-RQ), and that
    PDU; None for it if the peer closed first. ``receive(deadline)``: the peer's next bytes, b"" at
    its end (:func:`_receive_plain`, :func:`_receive_over_tls`). ``request_first``: any other PDU
    before it is malformed. Raises OSError (a timeout included, and :class:`SessionEndedError` when
    the session ends) and MalformedPduError."""
    framer = PduFramer()
    received = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        if deadline - time.monotonic() <= 0:
            raise TimeoutError("no whole association PDU in time")  # also when bytes keep trickling in
        data = receive(deadline)
        if not data:
            return bytes(received), None
        received += data
        for event in framer.feed(data):
            if request_first:
                _check_first_pdu(event)
            if isinstance(event, AssociationPdu):
                return bytes(received), event.pdu


def _receive_plain(local: socket.socket, ending: SessionEnd | None, deadline: float) -> bytes:
    """What an application sent next, waiting until ``deadline`` (and, given ``ending``, no longer
    than the card session)."""
    if ending is not None:
        _wait_for_peer(local, deadline, ending)
    local.settimeout(max(0.001, deadline - time.monotonic()))
    return local.recv(CHUNK)


def _receive_over_tls(tls: _Tls, remote: socket.socket, ending: SessionEnd, deadline: float) -> bytes:
    """What the TLS peer sent next, decrypted (records may already wait from the handshake), waiting
    until ``deadline`` and no longer than the card session; b"" at its close."""
    buffer = read_buffer()
    while True:
        try:
            return tls.obj.read(CHUNK)  # b"" at its close_notify
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            return b""
        _wait_for(remote, select.POLLIN, deadline, ending, "no whole association PDU in time")
        try:
            count = remote.recv_into(buffer)
        except BlockingIOError:
            continue
        if not count:
            return b""
        tls.incoming.write(buffer[:count])


def _read_one_pdu(local: socket.socket, timeout: float) -> None:
    """Consume what the application sent (normally its A-ASSOCIATE-RQ) so that closing does not reset."""
    try:
        _read_first_association_pdu(functools.partial(_receive_plain, local, None), timeout, request_first=False)
    except (OSError, MalformedPduError):
        return


def reject_local(local: socket.socket, failure: TunnelFailure, *, request_read: bool = False) -> None:
    """Answer the application's association request with A-ASSOCIATE-RJ, then close gracefully;
    the request is read first unless ``request_read``. Bounded: at most REJECT_READ_TIMEOUT for the
    request and CLOSE_LINGER for the goodbye, however the application trickles its bytes."""
    if not request_read:
        _read_one_pdu(local, REJECT_READ_TIMEOUT)
    _send_and_close(local, reject_pdu(transient=failure.transient))


def reject_in_thread(local: socket.socket, failure: TunnelFailure, name: str, done: Callable[[], None]) -> None:
    """A-ASSOCIATE-RJ to ``local`` in a thread of its own (:func:`reject_local` waits a bounded time
    for the application), then close it and call ``done``. RuntimeError when no thread is to be had
    (``local`` is then closed and ``done`` not called)."""
    def reject_and_close() -> None:
        try:
            reject_local(local, failure)
        finally:
            local.close()
            done()
    try:
        threading.Thread(target=reject_and_close, name=f"reject-{name}", daemon=True).start()
    except RuntimeError:
        local.close()
        raise


def reject_refused_peer(local: socket.socket, name: str, budget: InFlight) -> None:
    """A-ASSOCIATE-RJ to a local user the tunnel ``name`` refused, in a thread of its own under
    ``budget`` (REFUSALS_IN_FLIGHT a tunnel, never a place of max_connections); beyond the budget
    ``local`` is closed at once, so that a flood holds no thread and no descriptor. RuntimeError
    when no thread is to be had (``local`` is then closed, the budget left)."""
    if not budget.enter(name, REFUSALS_IN_FLIGHT):
        local.close()
        return
    try:
        reject_in_thread(local, TunnelFailure("local peer refused"), name, lambda: budget.leave(name))
    except RuntimeError:
        budget.leave(name)
        raise


def reject_at_once(local: socket.socket) -> None:
    """A-ASSOCIATE-RJ (rejected-transient) without reading or waiting: for a listener with
    max_connections in flight. What the application already sent is dropped, so that closing
    does not reset the connection before it reads the answer; the caller closes."""
    try:
        local.setblocking(False)
        local.send(reject_pdu(transient=True))
        local.shutdown(socket.SHUT_WR)
        for _ in range(4):  # what a request takes; a flood is not read to its end
            if not local.recv(CHUNK):
                break
    except OSError:
        pass  # BlockingIOError: nothing more waiting; anything else: the application is gone


def _send_and_close(local: socket.socket, data: bytes, linger: float = CLOSE_LINGER,
                    ending: SessionEnd | None = None) -> None:
    """Send ``data``, half-close, and wait up to ``linger`` seconds in all for the application to
    close too, so that our PDU is not lost to a reset. The wait is one deadline: bytes trickling
    in do not extend it. Given the card session's ``ending``, no longer than the session: once it
    ends, the send gets ENDING_SEND_TIMEOUT and there is no waiting (a viewer idle with its
    connection open would hold the session's end past its grace)."""
    deadline = time.monotonic() + linger
    try:
        local.settimeout(ENDING_SEND_TIMEOUT if ending is not None and ending.is_set() else linger)
        local.sendall(data)
        local.shutdown(socket.SHUT_WR)
    except OSError:
        return
    if ending is not None:
        _linger_for_close(local, deadline, ending)
        return
    try:
        while (left := deadline - time.monotonic()) > 0:
            local.settimeout(left)
            if not local.recv(CHUNK):
                break
    except OSError:
        pass


def _linger_for_close(local: socket.socket, deadline: float, ending: SessionEnd) -> None:
    """Read what the application sends until it closes, ``deadline`` passes or the card session ends;
    then, so that closing does not reset the connection, what it sends while it is still sending:
    once the session has ended, for ENDING_LINGER at most."""
    try:
        while not ending.is_set() and time.monotonic() < deadline:
            _wait_for_peer(local, deadline, ending)  # TimeoutError, SessionEndedError: both OSError
            if not local.recv(CHUNK):
                return
    except (SessionEndedError, TimeoutError):
        pass
    except OSError:
        return  # the application reset: nothing left to read
    _read_while_sending(local, time.monotonic() + (ENDING_LINGER if ending.is_set() else 0.0))


def _read_while_sending(local: socket.socket, deadline: float) -> None:
    """Read until the application pauses for SENDING_PAUSE, closes, or ``deadline`` passes. An
    application in the middle of a send (a C-STORE under way as the card is pulled) then fails its
    send on our FIN and reads our last PDU, where a reset would destroy it; an idle one (a viewer
    between studies) holds nothing up."""
    poller = select.poll()
    poller.register(local, select.POLLIN)
    try:
        while poller.poll(round(SENDING_PAUSE * 1000)) and local.recv(CHUNK):
            if time.monotonic() >= deadline:
                return
    except OSError:
        pass


def _tell_all(tells: list[Callable[[], None]]) -> None:
    """Run the log lines and reports ``tells`` holds, oldest first, and empty it."""
    while tells:
        tells.pop(0)()


def _report_after(tells: list[Callable[[], None]], report: Report, kind: str, fields: dict[str, Any]) -> None:
    """``report``, once what ``tells`` holds was told (not a relay's bound method: see TransferBatch)."""
    _tell_all(tells)
    report(kind, fields)


def _peer_gone(error: OSError) -> bool:
    """The TLS peer reset the connection, or stopped answering (``keep_alive``)."""
    return isinstance(error, (ConnectionResetError, BrokenPipeError)) or error.errno in PEER_STOPPED_ANSWERING_ERRNOS


class _Passing:
    """What of one direction's bytes the relay passes on as they come: all of them, but the start of
    a PDU not yet whole unless it is a P-DATA-TF past its header. That start is withheld until its
    PDU is whole (an association PDU is small and limited: agent/dicom/pdu.py), so that the far side,
    should the PDU be malformed, is still at a PDU boundary, where it can read an A-ABORT. A
    P-DATA-TF is streamed (held whole, a bulk transfer would wait for each PDU): one malformed in
    its middle leaves the far side half a PDU, and only the connection's close."""

    def __init__(self) -> None:
        self.withheld = bytearray()
        self.at_boundary = True  # what was passed on ends at a PDU boundary

    def passed(self, framer: PduFramer, data: bytes | memoryview) -> bytes | memoryview:
        """What to pass on, now that ``data`` was fed to ``framer`` without error."""
        keep = _to_withhold(framer)
        self.at_boundary = framer.at_boundary or keep > 0
        if not keep and not self.withheld:
            return data  # the usual case: no copy
        whole = self.withheld + data
        cut = len(whole) - keep
        self.withheld = whole[cut:]
        return bytes(whole[:cut])


def _to_withhold(framer: PduFramer) -> int:
    """The bytes of the PDU ``framer`` is in that are to wait for the rest of it: an association
    PDU's, or a P-DATA-TF's while its header is incomplete (its length may be refused)."""
    if framer.at_boundary or (framer.current_type == P_DATA_TF and framer.remaining_in_pdu is not None):
        return 0
    return framer.bytes_into_pdu


class _Relay:
    """Moves bytes between a plain local socket and a TLS connection, watching the association.

    ``requestor_is_local``: the association requestor is the local application (an outbound
    tunnel) or, for an inbound listener, the PACS on the TLS side. The requestor's direction holds
    the A-ASSOCIATE-RQ until it is whole and decided; failures are told to the requestor as
    DICOM (A-ASSOCIATE-RJ before the answer, A-ABORT after it or on a malformed PDU).
    """

    def __init__(self, runtime: TunnelRuntime | InboundRuntime, local: socket.socket, remote: socket.socket,
                 tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, peer: str, *,
                 requestor_is_local: bool, received: bytes = b"", peer_subject: str = "") -> None:
        self.runtime = runtime
        self.local = local
        self.remote = remote
        self.tls = tls
        self.incoming = incoming
        self.outgoing = outgoing
        self.peer = peer
        self.requestor_is_local = requestor_is_local
        self.to_local = bytearray()
        self.to_remote = bytearray(self._tls_output())
        self._read_buffer = read_buffer()  # for every read, from either side
        self._received_before = received  # from the requestor before the relay started
        self.peer_subject = peer_subject  # inbound: the PACS's certificate subject, for the audit trail
        self.tls_version = tls.version()  # how a close right after the handshake is read (_remote_failed)
        self.association = Association(runtime.config.association, runtime.username)
        # P-DATA an application writes before the A-ASSOCIATE-AC came (a whole association in one write)
        # passes, for the PACS to judge; once the AC passed, only the contexts it accepted do.
        self.requestor_framer = PduFramer(inspect_commands=True, data_set_prefix=DATA_SET_PREFIX, quiet_data=True)
        # Both directions keep the start of data sets: the acceptor sends C-GET sub-operations' C-STOREs.
        self.acceptor_framer = PduFramer(inspect_commands=True, data_set_prefix=DATA_SET_PREFIX,
                                         accepted_contexts=frozenset(), quiet_data=True)
        self.remote_framer = self.acceptor_framer if requestor_is_local else self.requestor_framer
        self.held_request: bytearray | None = bytearray()  # the requestor's bytes until its A-ASSOCIATE-RQ is whole
        self.refusal: Refuse | None = None
        self.malformed: MalformedPduError | None = None  # from either side: ends the association with A-ABORT
        self.malformed_by_acceptor = False  # then sent by the acceptor, which is told with an A-ABORT too
        self.requestor_passing = _Passing()  # what of the requestor's bytes went on to the acceptor
        self.acceptor_passing = _Passing()  # and of the acceptor's bytes to the requestor
        self.association_answered = False  # an A-ASSOCIATE-AC or -RJ went to the requestor
        self.association_over = False  # an A-RELEASE-RP, A-ABORT or A-ASSOCIATE-RJ went to the requestor (or
        # its A-RELEASE-RP to the acceptor's A-RELEASE-RQ)
        self._to_tell: list[Callable[[], None]] = []  # log lines and reports about what is being passed on
        self.local_eof = False
        self.remote_done = False
        self.local_write_closed = False
        self.local_close_awaited = False  # we closed our side toward the application, which has not yet
        self.acceptor_aborted = False  # the acceptor's A-ABORT passed to the requestor
        self.release_requested = False  # the application's A-RELEASE-RQ passed to the PACS
        # The acceptor's own A-RELEASE-RQ passed to the requestor (PS3.8 allows either side to release):
        # the requestor's A-RELEASE-RP then ends the association, and the acceptor closes the transport.
        self.acceptor_release_requested = False
        # When the PACS must have answered the A-RELEASE-RQ, or closed after the application did (what
        # it must do: ``pacs_awaited``); None while nothing is awaited of it.
        self.pacs_deadline: float | None = None
        self.pacs_awaited = ""
        self.pacs_did_not_finish = False
        self.received_any = False
        self._session_kept = not requestor_is_local  # inbound: no session of ours to resume
        self.bytes_up = 0
        self.bytes_down = 0
        self.failure: TunnelFailure | None = None
        # Its reports follow what is still to be told (an A-ASSOCIATE-AC's association-begin first).
        self.transfers = TransferBatch(functools.partial(_report_after, self._to_tell, runtime.report),
                                       requestor_is_local=requestor_is_local)

    def _tls_output(self) -> bytes:
        return self.outgoing.read() if self.outgoing.pending else b""

    def run(self) -> None:
        for sock in (self.local, self.remote):
            if sock.gettimeout() != 0.0:  # the handshake left the TLS side non-blocking
                sock.setblocking(False)
        poller = select.poll()
        local_fd, remote_fd = self.local.fileno(), self.remote.fileno()
        poller.register(local_fd, 0)
        poller.register(remote_fd, 0)
        poller.register(self.runtime.ending.read_fd, select.POLLIN)
        try:
            if self._received_before and self.requestor_is_local:
                self._from_local(self._received_before)
            elif self._received_before:
                self._from_remote(memoryview(self._received_before))
            self._read_tls()  # the requestor's first PDU may have come with its last handshake message
            while self.failure is None:
                local_mask = (select.POLLIN if not self.local_eof and len(self.to_remote) < HIGH_WATER else 0) | (
                    select.POLLOUT if self.to_local else 0)
                remote_mask = (select.POLLIN if not self.remote_done and len(self.to_local) < HIGH_WATER
                               and len(self.to_remote) < TLS_ANSWERS_CAP else 0) | (
                    select.POLLOUT if self.to_remote else 0)
                if self.remote_done and not self.to_local and not self.local_write_closed:
                    self._close_local_write()
                if self._finished(local_mask, remote_mask):
                    break
                poller.modify(local_fd, local_mask)
                poller.modify(remote_fd, remote_mask)
                timeout = self.transfers.poll_timeout_ms(POLL_INTERVAL_MS)
                ready = poller.poll(min(timeout, TELL_AFTER_MS) if self._to_tell else timeout)
                if not ready:
                    self._tell_what_passed()
                for fd, events in ready:
                    if fd == local_fd:
                        self._on_local(events)
                    elif fd == remote_fd:
                        self._on_remote(events)
                self.transfers.flush_if_due(self.association_fields)
                if self.pacs_deadline is not None:
                    self._watch_pacs_finishing()
                if self.runtime.ending.is_set():
                    self.failure = TunnelFailure(f"card session ended: {self.runtime.ending.reason}")
        except OSError as error:
            self.failure = self.failure or TunnelFailure(f"connection error: {error.strerror or error}", True)
        self._tell_what_passed()
        if self.failure is not None:
            self.runtime.count(error=self.failure.message)
            if self.malformed is None:  # else told as it was read, once a minute at most (_tell_malformed)
                log.warning("%s: %s: %s", self._where(), self.peer, self.failure.message)

    def keep_session(self) -> None:
        """Keep the TLS session for the tunnel's next association, once, before any of the PACS's
        bytes reach the application (TLS 1.3 tickets come before them): an application that
        connects again as soon as this association ends must find it. Kept only once the relay had
        ended, it raced with that next connection on a busy machine, which made a full handshake."""
        if self._session_kept:
            return
        self._session_kept = True
        assert isinstance(self.runtime, TunnelRuntime)
        self.runtime.remember_session(self.tls)

    def finish(self) -> None:
        """The connection's last words, once its end was logged and reported: they may wait for the
        peers, and the card session's end, which ends this process after END_GRACE_SECONDS
        (agent/session/worker.py), must not cost the audit trail what the relay has to report.
        Each wait is bounded, and none outlasts the session."""
        if self.failure is not None:
            if self.requestor_is_local:
                self._end_remote(self._abort_for_malformed_acceptor())
                self._tell_local_requestor()
            else:
                self._end_local(self._abort_for_malformed_acceptor())
                self._tell_remote_requestor()
        elif self.local_close_awaited:
            _linger_for_close(self.local, time.monotonic() + LOCAL_CLOSE_WAIT, self.runtime.ending)

    def _where(self) -> str:
        kind = "tunnel" if self.requestor_is_local else "inbound"
        return f"{kind} {self.runtime.config.name}"

    def _end_remote(self, pdu: bytes = b"") -> None:
        """Flush what the TLS peer should still get (``pdu``, an A-ABORT we wrote) and say close_notify."""
        if self.remote_done or self.runtime.ending.is_set():
            return  # the card is gone: nothing more goes out under its identity
        try:
            if pdu:
                self.tls.write(pdu)
            self.tls.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass
        self.to_remote += self._tls_output()
        try:
            self.remote.settimeout(1.0)
            self.remote.sendall(self.to_remote)
        except OSError:
            pass
        self.to_remote.clear()

    def _end_local(self, pdu: bytes = b"") -> None:
        """Flush what the local acceptor should still get (an A-ABORT we queued, or ``pdu``, one we
        wrote) and close our side."""
        self.to_local += pdu
        try:
            self.local.settimeout(1.0)
            self.local.sendall(self.to_local)
            self.local.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.to_local.clear()

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
            # The TLS side is done; the local side gets a moment to close too, in finish(): once the
            # association's end is reported.
            self.local_eof = True
            self.local_close_awaited = True

    def _on_local(self, events: int) -> None:
        if events & select.POLLOUT and self.to_local:
            self._flush_to_local()
        if events & (select.POLLIN | select.POLLHUP | select.POLLERR) and not self.local_eof:
            try:
                count = self.local.recv_into(self._read_buffer)
            except BlockingIOError:
                return
            except ConnectionResetError:
                count = 0
            if count:
                self._from_local(self._read_buffer[:count])  # read before the next recv_into; kept bytes are copied
            else:
                self.local_eof = True
                if self.held_request is not None and self.requestor_is_local:
                    self._leave_before_request()
                    return
                if not self.remote_done and self.requestor_is_local and self._association_ended():
                    # PS3.8 9.2 (AR-3, AA-3): once the association is released or aborted, the requestor
                    # closes the transport connection; a PACS waits for that (Orthanc, after its own
                    # A-ABORT, keeps the connection until it goes), so the application's close is ours.
                    self._end_remote()
                    self.remote_done = True
                    return
                if not self.remote_done and self.requestor_is_local and self._release_pending():
                    # The application half-closed after its A-RELEASE-RQ and reads on: a close_notify now
                    # reached a PACS (DCMTK) that closed its socket with that record unread, and the
                    # reset destroyed the A-RELEASE-RP on its way. The PACS's connection closes once
                    # the A-RELEASE-RP or an A-ABORT has passed (_watch_pacs_finishing).
                    return
                if not self.remote_done:
                    try:
                        self.tls.unwrap()  # close_notify: our half of the connection ends
                    except (ssl.SSLWantReadError, ssl.SSLError):
                        pass
                    if self.requestor_is_local:
                        self._await_pacs("close its connection after the application closed")
                self._push_tls_output()

    def _release_pending(self) -> bool:
        """The application's A-RELEASE-RQ passed, and no A-RELEASE-RP or A-ABORT has come back yet."""
        return self.release_requested and not self.association_over

    def _await_pacs(self, what: str) -> None:
        """Give the PACS PACS_FINISH_TIMEOUT to ``what``: one that never does must not hold the
        connection, and its place among max_connections, for good."""
        if self.pacs_deadline is None:
            self.pacs_deadline = time.monotonic() + PACS_FINISH_TIMEOUT
            self.pacs_awaited = what

    def _watch_pacs_finishing(self) -> None:
        """While the PACS is to answer the A-RELEASE-RQ or to close: close its connection once the
        association is over and the application has gone, or once PACS_FINISH_TIMEOUT has passed."""
        assert self.pacs_deadline is not None
        if self.remote_done:
            self.pacs_deadline = None
        elif self.association_over:
            if not self.local_eof:
                self.pacs_deadline = None  # the application closes, and with it the PACS's connection
            elif not self.to_local:  # the A-RELEASE-RP (or A-ABORT) reached the application, which left
                self._end_remote()
                self.remote_done = True
                self.pacs_deadline = None
        elif time.monotonic() >= self.pacs_deadline:
            self.pacs_did_not_finish = True
            self.failure = TunnelFailure(
                f"server {self.runtime.config.remote} did not {self.pacs_awaited} within {PACS_FINISH_TIMEOUT:g} s "
                "(the ARTIM timer of PS3.8 9.1.5); connection closed", transient=True)

    def _association_ended(self) -> bool:
        """An A-RELEASE-RP, A-ABORT or A-ASSOCIATE-RJ went to the requestor, or the requestor aborted."""
        return self.association_over or self.association.end == "aborted by the requestor"

    def _leave_before_request(self) -> None:
        """The application left before its A-ASSOCIATE-RQ was whole: no association to wait for, so the
        PACS connection ends now instead of holding a PACS that serves one association at a time."""
        log.info("%s: %s: the application closed before its A-ASSOCIATE-RQ; PACS connection closed",
                 self._where(), self.peer)
        self._end_remote()
        self.remote_done = True
        self.to_local.clear()

    def _from_local(self, data: bytes | memoryview) -> None:
        self.bytes_up += len(data)
        self.runtime.count(up=len(data))
        out = self._from_requestor(data) if self.requestor_is_local else self._from_acceptor(data)
        if out:
            self.tls.write(out)
        self._push_tls_output()

    def _tell_what_passed(self) -> None:
        """Log and report what was passed on (an A-ASSOCIATE-AC, a C-FIND request) once the
        association pauses: when no PDU came for ``TELL_AFTER_MS``, before anything else is
        reported, and at its end. Telling right after the PDU passed made the next PDU each way wait
        for it (0.12-0.18 ms of a resumed association's C-ECHO, measured with a packet capture):
        the peers of a quick exchange answer sooner than a cold log line is written."""
        _tell_all(self._to_tell)

    def _flush_to_local(self) -> None:
        try:
            sent = self._send(self.local, self.to_local)
        except OSError as error:
            if not (self.local_eof and _peer_gone(error)):
                raise
            sent = len(self.to_local)  # the application closed altogether: nothing reaches it any more
        del self.to_local[:sent]

    def _push_tls_output(self) -> None:
        """Send the TLS records OpenSSL wrote at once, unless older ones still wait; keep what the
        socket does not take. Sending here, rather than on the next poll, saves a wake-up per PDU."""
        records = self._tls_output()
        if not records:
            return
        if self.to_remote:
            self.to_remote += records
            return
        sent = self._send_to_remote(records)
        if sent is not None and sent < len(records):
            self.to_remote += memoryview(records)[sent:]

    def _send_to_remote(self, data: bytes | bytearray) -> int | None:
        """Bytes the socket took; None if the peer reset the connection or stopped answering (then
        handled here)."""
        try:
            return self._send(self.remote, data)
        except OSError as error:
            # A TLS 1.3 server that refused our certificate may reset while our request goes out:
            # the same news as reading the reset, and told the same way.
            if not _peer_gone(error):
                raise
            self._remote_failed(error)
            return None

    def _on_remote(self, events: int) -> None:
        if events & select.POLLOUT and self.to_remote:
            sent = self._send_to_remote(self.to_remote)
            if sent is None:
                return
            del self.to_remote[:sent]
        if not events & (select.POLLIN | select.POLLHUP | select.POLLERR) or self.remote_done:
            return
        try:
            count = self.remote.recv_into(self._read_buffer)
        except BlockingIOError:
            return
        except OSError as error:
            if not _peer_gone(error):
                raise
            return self._remote_failed(error)
        if count:
            self.incoming.write(self._read_buffer[:count])
        else:
            self.incoming.write_eof()
        self._read_tls()

    def _read_tls(self) -> None:
        """Decrypt what the TLS peer sent and pass it on; records may already wait from the handshake.

        The records are decrypted one after another into the read buffer (free again once the
        socket's bytes are in the incoming BIO) and passed on together: one framer feed and one
        copy per read of the socket. With a new bytes object and a feed per record (16 KiB at
        most), reading cost 0.4-1.5 s per GB, as the allocator's state went; now 0.4
        (benchmarks/tls_read_paths.py)."""
        buffer = self._read_buffer
        filled = 0
        failed: ssl.SSLError | None = None
        closed = False
        while self.failure is None:
            try:
                # With a buffer, read() returns how many bytes it wrote there (typeshed says bytes).
                count = cast(int, self.tls.read(len(buffer) - filled, buffer[filled:]))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                closed = True
                break
            except ssl.SSLError as error:
                failed = error  # what came before it was authenticated: it goes on first
                break
            if not count:  # close_notify received while ours is not yet sent (ssl returns 0 then)
                closed = True
                break
            filled += count
            if filled == len(buffer):
                self.keep_session()
                self._from_remote(buffer)
                filled = 0
        if filled:
            self.keep_session()
            self._from_remote(buffer[:filled])
        if closed:  # after what came before the close_notify, which may have ended the association
            self._remote_closed()
        if failed is not None and self.failure is None:
            return self._remote_failed(failed)
        if self.to_local and self.failure is None:
            self._flush_to_local()
        self._push_tls_output()

    def _remote_closed(self) -> None:
        """The TLS peer's close_notify, which becomes the application's FIN. A PACS that sends it while
        the application still holds the association (PS3.8 has it end with A-RELEASE or A-ABORT) is
        news: a warning, and the association's end for the summary line and the audit trail. An
        accepted association is then ended for the application as PS3.8 ends one whose transport
        closes (AA-4): with an A-ABORT from the service-provider before the FIN."""
        self.remote_done = True
        if (self.failure is None and self.requestor_is_local and not self.local_eof
                and self.association.request is not None and not self._association_ended()):
            self.association.end = CLOSED_MID_ASSOCIATION
            log.warning("%s: %s: server %s %s", self._where(), self.peer, self.runtime.config.remote,
                        CLOSED_MID_ASSOCIATION)
            if self.association_answered and self.acceptor_passing.at_boundary:
                self.to_local += abort_pdu()
                self.association_over = True

    def _from_remote(self, plain: memoryview) -> None:
        """Decrypted bytes from the TLS peer, passed on (copied) before the buffer is read into again."""
        self.received_any = True
        out = self._from_acceptor(plain) if self.requestor_is_local else self._from_requestor(plain)
        if out:
            self.bytes_down += len(out)
            self.runtime.count(down=len(out))
            self.to_local += out

    # -- the association, from the requestor's side ------------------------------------------------

    def _from_requestor(self, data: bytes | memoryview) -> bytes | memoryview:
        """What to pass on to the acceptor: nothing until the A-ASSOCIATE-RQ is whole and decided."""
        try:
            events = self.requestor_framer.feed(data)
            if self.held_request is not None:
                self.held_request += data
                return self._decide_request(events)
            self._inspect(events, from_requestor=True)
            return self.requestor_passing.passed(self.requestor_framer, data)
        except MalformedPduError as error:
            if self.requestor_is_local:
                self._malformed(error, "the application", "the application")
            else:
                self._malformed(error, f"the PACS at {self.peer}", "the PACS")
            if self.held_request is None and self.requestor_passing.at_boundary:
                return abort_pdu(error)  # the acceptor gets a clean end of the association too
            return b""

    def _decide_request(self, events: list[FramerEvent]) -> bytes:
        for index, event in enumerate(events):
            _check_first_pdu(event)
            if not isinstance(event, AssociationPdu):
                continue
            decision = self.association.on_request(event.pdu)
            assert self.held_request is not None
            rest = bytes(self.held_request[len(event.pdu):])
            self.held_request = None
            if isinstance(decision, Refuse):
                self.refusal = decision
                self.failure = TunnelFailure(_refusal_message(self.association, decision))
                self._security_alert("association-refused", self.failure.message)
                return b""
            self._inspect(events[index + 1:], from_requestor=True)
            return decision.pdu + self.requestor_passing.passed(self.requestor_framer, rest)
        return b""

    # -- the association, from the acceptor's side -------------------------------------------------

    def _from_acceptor(self, data: bytes | memoryview) -> bytes | memoryview:
        """What to pass on to the requestor: all of ``data``, unless it is malformed."""
        was_at_boundary = self.acceptor_framer.at_boundary
        try:
            if not self.association_answered and was_at_boundary and data and data[0] in NOT_ANSWERS:
                # PS3.8 9.2: before its answer an acceptor sends nothing else (the requestor's
                # application would take a P-DATA-TF there for part of an association it never had).
                raise MalformedPduError(f"a {pdu_type_name(data[0])} PDU came before the A-ASSOCIATE-AC or -RJ")
            events = self.acceptor_framer.feed(data)
            for event in events:
                if isinstance(event, AssociationPdu):
                    self._on_answer(event)
            self._inspect(events, from_requestor=False)
        except MalformedPduError as error:
            self.malformed_by_acceptor = True
            acceptor = (f"the server {self.runtime.config.remote}" if self.requestor_is_local
                        else f"the local SCP at {self.runtime.config.remote}")
            self._malformed(error, acceptor, acceptor)
            return b""  # all of ``data`` is dropped
        return self.acceptor_passing.passed(self.acceptor_framer, data)

    def _on_answer(self, event: AssociationPdu) -> None:
        if event.pdu_type in (A_ASSOCIATE_AC, A_ASSOCIATE_RJ) and self.association_answered:
            raise MalformedPduError(f"a second answer ({pdu_type_name(event.pdu_type)}) to the A-ASSOCIATE-RQ")
        if event.pdu_type == A_ASSOCIATE_AC:
            self.association.on_accept(event.pdu)  # a malformed answer must not pass: parsed before
            # The acceptor's framer took them from the AC as it read it.
            self.requestor_framer.accept_contexts(self.association.accepted_abstract_syntaxes)
            self._to_tell.append(self._tell_accepted)
        elif event.pdu_type == A_ASSOCIATE_RJ:
            log.info("%s: %s: association %s rejected by %s: %s", self._where(), self.peer,
                     self.association.describe_request(), "the PACS" if self.requestor_is_local else "the local SCP",
                     self.association.on_reject(event.pdu))
        elif event.pdu_type == A_RELEASE_RP:
            self.association.end = "released"
        elif event.pdu_type == A_RELEASE_RQ:
            self.acceptor_release_requested = True
        elif event.pdu_type == A_ABORT:
            self._on_acceptor_abort(event.pdu)
        if event.pdu_type in (A_ASSOCIATE_AC, A_ASSOCIATE_RJ):
            self.association_answered = True
        if event.pdu_type in (A_RELEASE_RP, A_ABORT, A_ASSOCIATE_RJ):
            self.association_over = True

    def _on_acceptor_abort(self, pdu: bytes) -> None:
        """The acceptor's A-ABORT, as an answer to the A-ASSOCIATE-RQ or later: logged with its source
        and reason, and kept as the association's end for the summary line and the audit trail."""
        self._tell_what_passed()  # the A-ASSOCIATE-AC's line first
        abort = parse_a_abort(pdu).describe()
        self.acceptor_aborted = True
        self.association.end = f"aborted by the acceptor ({abort})"
        acceptor = "the PACS" if self.requestor_is_local else "the local SCP"
        log.info("%s: %s: association %s aborted by %s%s: %s", self._where(), self.peer,
                 self.association.describe_request(), acceptor,
                 "" if self.association_answered else " instead of an answer", abort)
        if not self.association_answered:
            # Turned down without an Association Begin: recorded as the association rules' refusal
            # is, an Association Begin with a failure (PS3.15 A.5: outcome 4) that says why.
            self._security_alert("association-aborted", f"association {self.association.describe_request()} "
                                 f"aborted by {acceptor} instead of an answer: {abort}")

    def _tell_query(self, query: Query) -> None:
        self.runtime.report("query", {**self.association_fields(), **query_fields(query)})

    def _tell_accepted(self) -> None:
        log.info("%s: %s: %s", self._where(), self.peer, self.association.describe_accept())
        self.runtime.report("association-begin", self.association_fields())

    def _inspect(self, events: list[FramerEvent], *, from_requestor: bool) -> None:
        for event in events:
            if isinstance(event, CommandSet):
                answered = self.association.on_command(event.data, from_requestor, event.context_id)
                if answered is not None:
                    self.transfers.answered(answered, self.association_fields)
            elif isinstance(event, DataSetPrefix):
                query = self.association.on_data_set_prefix(event.data, event.context_id, from_requestor)
                if query is not None:  # one Query event per C-FIND request, once it has passed
                    self._to_tell.append(functools.partial(self._tell_query, query))
            elif isinstance(event, AssociationPdu) and from_requestor:
                if event.pdu_type == A_ABORT:
                    self.association.end = "aborted by the requestor"
                elif event.pdu_type == A_RELEASE_RQ and self.requestor_is_local:
                    self.release_requested = True
                    self._await_pacs("answer the A-RELEASE-RQ")
                elif event.pdu_type == A_RELEASE_RP and self.acceptor_release_requested:
                    self.association.end = "released"  # the acceptor released it: it closes next (AR-3)
                    self.association_over = True

    def _malformed(self, error: MalformedPduError, source: str, sender: str) -> None:
        """A malformed PDU from ``source``; ``sender`` names it without what differs from one
        connection to the next (the PACS's port), for counting them (:func:`_tell_malformed`)."""
        self.malformed = error
        self.failure = TunnelFailure(f"malformed PDU from {source}: {error}")
        self._tell_what_passed()
        _tell_malformed(self.runtime, self.peer, self.failure.message, sender, self.association_fields())

    def association_fields(self) -> dict[str, Any]:
        return _association_fields(self.runtime, self.association, self.peer,
                                  requestor_is_local=self.requestor_is_local, peer_subject=self.peer_subject)

    def report_end(self) -> None:
        """The audit reports of an accepted association at its end: the C-STOREs not reported yet
        (answered in the last moment, or never answered), then the end itself."""
        if self.association.answer != "accepted":
            return
        self.transfers.flush(self.association_fields, self.association.unanswered)
        self.runtime.report("association-end", {**self.association_fields(),
                                                "failure": self.failure.message if self.failure else None})

    def _security_alert(self, what: str, reason: str) -> None:
        self._tell_what_passed()
        fields = self.association_fields()
        self.runtime.report("security-alert", {**fields, "what": what, "reason": reason})

    # -- failures --------------------------------------------------------------------------------

    def _remote_failed(self, error: Exception | None) -> None:
        if self.association_over and self.remote_framer.at_boundary:
            # Many PACSes drop TCP right after the release without a TLS close_notify: a normal end.
            self.remote_done = True
            return
        if isinstance(error, OSError) and error.errno in PEER_STOPPED_ANSWERING_ERRNOS:
            pacs = self.runtime.config.remote if self.requestor_is_local else self.peer
            self.failure = pacs_stopped_answering(pacs, self.runtime.config.dead_pacs_timeout)
            return
        detail = getattr(error, "reason", None) or getattr(error, "strerror", None) or error
        if not self.requestor_is_local:
            self.failure = TunnelFailure(f"the PACS at {self.peer} broke the connection: {detail}", transient=True)
        elif self.association_answered:
            self.failure = TunnelFailure(f"server {self.runtime.config.remote} broke the connection: {detail}",
                                         transient=True)
        else:
            assert isinstance(self.runtime, TunnelRuntime)
            self.failure = failure_after_handshake(self.runtime.config.remote, error,
                                                   self.runtime.identity.describe(), self.received_any,
                                                   self.tls_version)

    @staticmethod
    def _send(sock: socket.socket, data: bytes | bytearray | memoryview) -> int:
        try:
            return sock.send(data)
        except BlockingIOError:
            return 0

    def _pdu_for_requestor(self) -> bytes | None:
        """A-ASSOCIATE-RJ before the answer, else A-ABORT; None when a PDU toward it is half-sent."""
        # A read from the acceptor that was malformed was dropped whole, wherever its framer stopped:
        # what the requestor got then ends where the last read passed on ended (a command set over
        # the limit often fails mid-PDU after whole PDUs passed).
        if not self.acceptor_passing.at_boundary:
            return None  # anything we add would corrupt the half-delivered PDU; closing says enough
        assert self.failure is not None
        if self.refusal is not None:
            return self.refusal.reject_pdu
        if self.association_answered or self.malformed is not None:
            return abort_pdu(self.malformed)
        return reject_pdu(transient=self.failure.transient)

    def _abort_for_malformed_acceptor(self) -> bytes:
        """The A-ABORT for an acceptor that sent a malformed PDU, if it can still read one: what it
        was passed of the requestor's bytes ends at a PDU boundary. (A malformed PDU from the
        requestor is answered toward the acceptor as it is read: see _from_requestor.)"""
        if self.malformed is None or not self.malformed_by_acceptor or not self.requestor_passing.at_boundary:
            return b""
        return abort_pdu(self.malformed)

    def _tell_local_requestor(self) -> None:
        pdu = self._pdu_for_requestor()
        if pdu is None:
            return
        _send_and_close(self.local, bytes(self.to_local) + pdu, ending=self.runtime.ending)

    def _tell_remote_requestor(self) -> None:
        pdu = self._pdu_for_requestor()
        self._end_remote(pdu or b"")
