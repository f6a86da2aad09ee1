"""The tunnels' listening sockets, accepted on in the card-session process while its card is signed in.

The supervisor owns the listening sockets (it opens them, takes them from systemd, answers while no
card is signed in). Handing each accepted connection over to the card-session process cost every
association a second process's wake-up, a message and a descriptor passed (~0.4 ms of a 5 ms
set-up, benchmarks/agent_timing.py), so while a session is signed in the supervisor lends it the
tunnels' listening sockets (copies of the descriptors) and stops accepting on them itself; this
process then accepts, identifies the local user (the same :func:`admit_peer` check, refusals
answered with A-ASSOCIATE-RJ and reported to the supervisor for the audit trail and the counters)
and relays. When the session ends its process ends, and with it its copies: connections waiting in
the backlog are the supervisor's again.

The thread that accepts a connection serves it too. Handing it to another thread (a new one, or
one waiting in a pool) put a second thread's wake-up on every association's way, and the two
threads took turns at the GIL while it started: 0.1-0.2 ms of a resumed association's 2.3 ms
set-up (docs/benchmarks.md). Threads wait for connections together in one epoll set, each
listener armed for one waiter at a time (``EPOLLONESHOT``, armed again once its connection is
accepted), and the thread that takes a connection starts another first when none would be left
waiting.

New associations are admitted only under the supervisor's lease (:class:`SupervisorLease`): the card
loop renews it every second with the time of its latest look at the reader. A supervisor that stops
(SIGSTOP, a deadlock, a stall) cannot act on a pulled card, and this process, which relays with TLS
sessions that need no card signature to resume, used to go on accepting as the clinician until it
ran again; past the lease it answers as the supervisor does with nobody signed in.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping

from dicom_card_agent.clock import awake_or_asleep
from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.session.channel import LEASE_SECONDS
from dicom_card_agent.tls.failures import TunnelFailure
from dicom_card_agent.tunnel.accepting import AcceptBackoff
from dicom_card_agent.tunnel.admission import InFlight, PeerRefusalLog, RefusalLog
from dicom_card_agent.tunnel.peer import PeerPolicy, PeerRefusedError, admit_peer
from dicom_card_agent.tunnel.relay import (
    InboundRuntime,
    Report,
    TunnelRuntime,
    reject_at_once,
    reject_in_thread,
    reject_refused_peer,
    serve_here,
)

log = logging.getLogger("agent.tunnel")

IDLE_SECONDS = 60.0  # a waiting thread beyond the first ends after this long without a connection
TICK_SECONDS = 1.0  # how often a waiting thread tells the refusal counts that are due
_ARMED = select.EPOLLIN | select.EPOLLONESHOT
PEER_REFUSED = "peer-refused"  # the report the supervisor audits and counts (agent/session/manager.py)
LISTENERS_NOT_TAKEN = "listeners-not-taken"  # the process had no room for the lent sockets: taken back
SUPERVISOR_SILENT = "supervisor-silent"  # an association refused past the lease: the supervisor counts it
RENEWAL_GRACE_SECONDS = 1.5  # the supervisor renews every second once its latest lease was read


class SupervisorLease:
    """Whether the supervisor has vouched recently enough for the card (channel.LEASE_SECONDS) for
    this process to admit new associations on the lent listeners. Each episode of silence is
    logged once as it starts and once as it ends (``on_change`` is called at both)."""

    def __init__(self, supervisor_pid: int | None, seconds: float = LEASE_SECONDS) -> None:
        self._who = "the agent's supervisor" + (f" (pid {supervisor_pid})" if supervisor_pid else "")
        self.seconds = seconds
        # Called as each episode starts and as it ends (LentListeners forgets the TLS sessions then).
        self.on_change: Callable[[], None] = lambda: None
        self._renewed = threading.Condition()
        self._seen_at = awake_or_asleep()  # given at the sign-in, which the supervisor has just made
        self._lapsed = False

    def renew(self, seen_at: float) -> None:
        """A lease message: the supervisor saw the card at ``seen_at`` (``awake_or_asleep()``, one clock
        for both processes, which counts a suspend: a lease from before one has lapsed after it). One
        that waited in the channel (sent before a stall) counts for when it was sent, not read."""
        with self._renewed:
            self._seen_at = max(self._seen_at, min(seen_at, awake_or_asleep()))
            silent = awake_or_asleep() - self._seen_at
            ended = self._lapsed and silent < self.seconds
            if ended:
                self._lapsed = False
            self._renewed.notify_all()
        if ended:
            log.info("%s answers again: new associations are admitted again", self._who)
            self.on_change()

    def silence(self) -> float | None:
        """Seconds since the supervisor last vouched for the card, once past the lease; None while
        the lease holds. The first call to find it past starts the episode, after a grace of
        RENEWAL_GRACE_SECONDS for a renewal: when this process itself was not running (stopped,
        starved), the supervisor's latest lease is still to be read, and its next one comes within a
        second of that; blaming the supervisor then would refuse the applications that waited."""
        with self._renewed:
            if not self._lapsed:
                self._renewed.wait_for(lambda: awake_or_asleep() - self._seen_at < self.seconds,
                                       timeout=RENEWAL_GRACE_SECONDS)
            silent = awake_or_asleep() - self._seen_at
            if silent < self.seconds:
                return None
            started, self._lapsed = not self._lapsed, True
        if started:
            # Open associations go on: this process knows only that the supervisor is silent, not
            # that the card left, and ending a transfer for a stall would lose the clinician's work;
            # a supervisor that runs again ends the session at once if the card is gone.
            log.warning("%s has not answered for %.0f s: new associations are refused until it does; open "
                        "associations go on, and no TLS session is resumed", self._who, silent)
            self.on_change()
        return silent

    def refusal(self, silent: float) -> str:
        """What an application's refused association is logged with."""
        return f"{self._who} has not answered for {silent:.0f} s: new associations are refused until it does"


class LentListeners:
    """Accepts on the listening sockets the supervisor lent, each connection served in the thread
    that accepted it, until :meth:`close`."""

    def __init__(self, runtimes: Mapping[str, TunnelRuntime | InboundRuntime], report: Report,
                 lease: SupervisorLease | None = None) -> None:
        self._runtimes = runtimes  # the card session's, changed in place by a reload
        self._report = report
        self.lease = lease  # None: connections are admitted without one
        if lease is not None:
            lease.on_change = self._forget_sessions
        self._epoll = select.epoll()
        self._accepting = threading.Lock()  # one thread accepts at a time; held to change the sockets
        self._sockets: dict[int, tuple[str, socket.socket]] = {}  # by descriptor
        self._lock = threading.Lock()  # the threads' bookkeeping
        self._threads: set[threading.Thread] = set()
        self._serving: set[threading.Thread] = set()
        self._stop = threading.Event()
        self._wake_read, self._wake_write = os.pipe()  # readable once close() was called: wakes every thread
        self._epoll.register(self._wake_read, select.EPOLLIN)
        self._backoff = AcceptBackoff(log, "tunnels", self._stop)  # the log line names the process
        self._capacity_refusals = RefusalLog(log, kind="tunnel")
        self._peer_refusals = PeerRefusalLog(log)
        self._refusing = InFlight()  # refused users' connections being answered, by tunnel
        # awake_or_asleep() of the latest connection accepted, for the idle lock: the supervisor compares it
        # with its own clock, and a suspend must count as time without connections (agent/clock.py).
        self.last_connection = 0.0

    def replace(self, sockets: dict[str, socket.socket]) -> None:
        """Accept on exactly ``sockets`` (tunnel name -> listening socket) from now on."""
        with self._accepting:
            for fd, (name, sock) in list(self._sockets.items()):
                if sockets.get(name) is not sock:
                    self._epoll.unregister(fd)
                    sock.close()
                    del self._sockets[fd]
            for name, sock in sockets.items():
                if self._sockets.get(sock.fileno()) != (name, sock):
                    self._sockets[sock.fileno()] = (name, sock)
                    self._epoll.register(sock.fileno(), _ARMED)
        with self._lock:
            start = not self._threads and not self._stop.is_set()
        if start:
            self._start_thread()

    def close(self) -> None:
        """Stop accepting and let go of every lent socket (the supervisor's own copies stay open).
        Connections being served go on: the session's end tells them (see :meth:`relays`)."""
        self._stop.set()
        os.write(self._wake_write, b"x")
        with self._lock:
            waiting = self._threads - self._serving
        for thread in waiting:
            thread.join(2)
        with self._accepting:
            for fd, (_, sock) in self._sockets.items():
                self._epoll.unregister(fd)
                sock.close()
            self._sockets.clear()
        self._capacity_refusals.flush(ending=True)
        self._peer_refusals.flush(ending=True)

    def relays(self) -> list[threading.Thread]:
        """The threads serving a connection: the session's end waits for them to tell their
        applications (A-ABORT) before the process exits. Each ends once its connection has."""
        with self._lock:
            return list(self._serving)

    def _start_thread(self) -> None:
        """One more thread waiting for connections. RuntimeError when no thread is to be had."""
        thread = threading.Thread(target=self._loop, name="accept-lent", daemon=True)
        # Started under the lock: close() joins the threads it finds, and joining one not yet
        # started raises, which ended the card session's process before it told its associations.
        with self._lock:
            self._threads.add(thread)
            try:
                thread.start()
            except RuntimeError:
                self._threads.discard(thread)
                raise

    def _loop(self) -> None:
        me = threading.current_thread()
        waiting_since = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    # One event at a time: a listener's event is armed for this thread alone
                    # (EPOLLONESHOT) and this thread serves what it takes to the end, so events
                    # taken with it would wait for that association to end.
                    events = self._epoll.poll(TICK_SECONDS, 1)
                    if not events:
                        self._silence()  # the lapse is logged as it comes, not with the next connection
                        self._capacity_refusals.flush()
                        self._peer_refusals.flush()
                        if time.monotonic() - waiting_since >= IDLE_SECONDS and self._retire(me):
                            return
                        continue
                    for fd, mask in events:
                        # A hang-up: the supervisor shut this listener down (a reload removed its
                        # tunnel, or the agent stops); left unarmed until the new set of listeners,
                        # or the session's end, lets go of it.
                        if fd != self._wake_read and not mask & select.EPOLLHUP and self._take(fd, me):
                            waiting_since = time.monotonic()
                except Exception:  # a bug must cost one connection, not every later one
                    log.exception("accepting connections in the card session: internal error; accepting goes on")
                    self._stop.wait(0.1)
        finally:
            with self._lock:
                self._threads.discard(me)

    def _retire(self, me: threading.Thread) -> bool:
        """End this thread if another one waits for connections (the first one stays)."""
        with self._lock:
            if len(self._threads - self._serving) > 1:
                self._threads.discard(me)
                return True
        return False

    def _take(self, fd: int, me: threading.Thread) -> bool:
        """Accept on the listener ``fd`` and serve what comes, here; True when a connection came."""
        with self._accepting:
            if self._stop.is_set() or fd not in self._sockets:
                return False  # closing, or the listener was replaced since the wait
            name, sock = self._sockets[fd]
            try:
                connection = self._backoff.accept(sock)
            finally:
                self._epoll.modify(fd, _ARMED)  # the next connection is for another thread
            if connection is None:
                return False
            silent = self._silence()
            if silent is None:  # one refused for the supervisor's silence is no activity of the clinician's
                self.last_connection = awake_or_asleep()
            admitted = self._admit(name, connection, silent)
        if admitted is not None:
            self._serve(me, name, connection, *admitted)
        return True

    def _silence(self) -> float | None:
        return self.lease.silence() if self.lease is not None else None

    def _forget_sessions(self) -> None:
        """As the lease lapses, and again as it is renewed: no TLS session kept before is resumed
        (a resumption needs no card), nor one an association open across the lapse kept as it
        ended; the next association makes a full handshake, which needs the card."""
        for runtime in list(self._runtimes.values()):
            if isinstance(runtime, TunnelRuntime):
                runtime.forget_sessions()

    def _admit(self, name: str, connection: socket.socket,
               silent: float | None = None) -> tuple[TunnelRuntime, str] | None:
        """The tunnel and the local user to serve ``connection`` for, or None when it was refused
        (answered, closed or handed to a thread that answers). ``silent``: seconds the supervisor
        has been silent past its lease (see :class:`SupervisorLease`)."""
        runtime = self._runtimes.get(name)
        if not isinstance(runtime, TunnelRuntime):  # accepted just before a reload removed its tunnel
            log.warning("tunnel %s: no longer configured: connection closed", name)
            connection.close()
            return None
        try:
            # The user first (one sock_diag query), then a place: another user's connections must
            # never take the places of max_connections, which are the allowed users'.
            peer = admit_peer(connection, PeerPolicy.allowing(runtime.config.allowed_uids),  # as reloaded
                              name_refused_process=False)
        except PeerRefusedError as error:
            self._refuse_peer(name, runtime, connection, error)
            return None
        except (CardAgentError, OSError) as error:
            # Whoever it is cannot be established (descriptors ran out): fail closed, without an
            # answer (as the supervisor does).
            connection.close()
            self._backoff.failed(f"tunnel {name}: closed a connection it could not identify or answer", error)
            return None
        if silent is not None and self.lease is not None:
            self._refuse_while_silent(name, runtime, connection, peer.describe(), silent)
            return None
        self._backoff.succeeded()
        return runtime, peer.describe()

    def _refuse_peer(self, name: str, runtime: TunnelRuntime, connection: socket.socket,
                     error: PeerRefusedError) -> None:
        """A user not in allowed_uids, or one that could not be identified: A-ASSOCIATE-RJ in a thread
        of its own, under a budget of its own (REFUSALS_IN_FLIGHT a tunnel); beyond it the connection
        is closed at once, so that a flood holds no thread, no descriptor and no place of
        max_connections. Logged and reported either way (once a minute in full)."""
        self._peer_refusals.refused(name, error)
        self._report(PEER_REFUSED, {"tunnel": name, "listen": str(runtime.config.listen),
                                    "uid": error.peer.uid, "pid": error.peer.pid, "message": str(error)})
        try:
            reject_refused_peer(connection, name, self._refusing)
        except RuntimeError as failure:  # no thread to be had: closed without an answer
            self._backoff.failed(f"tunnel {name}: closed a connection it could not identify or answer", failure)

    def _refuse_while_silent(self, name: str, runtime: TunnelRuntime, connection: socket.socket, peer: str,
                             silent: float) -> None:
        """As the supervisor answers with nobody signed in: A-ASSOCIATE-RJ (rejected-transient), in a
        place of max_connections (an allowed user's connection), or at once when none is left."""
        assert self.lease is not None
        refusal = self.lease.refusal(silent)
        log.warning("tunnel %s: %s: rejected: %s", name, peer, refusal)
        self._report(SUPERVISOR_SILENT, {"tunnel": name})
        limit = runtime.config.max_connections
        if not runtime.enter(limit):
            reject_at_once(connection)
            connection.close()
            self._capacity_refusals.refused(name, peer.split(" pid ", 1)[0], f"{limit} connections in flight "
                                            "(max_connections)")  # "uid 1000": one line per user
            return
        try:
            reject_in_thread(connection, TunnelFailure(refusal, transient=True), name, runtime.leave)
        except RuntimeError as failure:
            runtime.leave()
            self._backoff.failed(f"tunnel {name}: closed a connection it could not identify or answer", failure)

    def _serve(self, me: threading.Thread, name: str, connection: socket.socket, runtime: TunnelRuntime,
               peer: str) -> None:
        """Serve in this thread, after making sure another one waits for the next connection."""
        with self._lock:
            self._serving.add(me)
            alone = not self._threads - self._serving and not self._stop.is_set()
        try:
            if alone:
                try:
                    self._start_thread()
                except RuntimeError:  # no thread to be had: this one accepts again after this connection
                    log.error("tunnel %s: no thread to wait for the next connection while this one is served", name)
            me.name = f"conn-{name}"
            serve_here(runtime, connection, peer)  # counts it in flight again, for its relay
        finally:
            me.name = "accept-lent"
            with self._lock:
                self._serving.discard(me)
