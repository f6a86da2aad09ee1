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
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Mapping

from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.tls.failures import TunnelFailure
from dicom_card_agent.tunnel.accepting import AcceptBackoff
from dicom_card_agent.tunnel.admission import RefusalLog, connection_source
from dicom_card_agent.tunnel.peer import PeerPolicy, PeerRefusedError, admit_peer, identify_peer
from dicom_card_agent.tunnel.relay import (
    InboundRuntime,
    Report,
    TunnelRuntime,
    reject_at_once,
    reject_in_thread,
    serve_connection,
)

log = logging.getLogger("agent.tunnel")

PEER_REFUSED = "peer-refused"  # the report the supervisor audits and counts (agent/session/manager.py)


def _who(connection: socket.socket) -> str:
    """The local user for a log line ("uid 1000"), else the address: one line per user, not per process."""
    try:
        peer = identify_peer(connection)
    except (CardAgentError, OSError):  # descriptors ran out, say: the address will do
        return connection_source(connection)
    return f"uid {peer.uid}" if peer.uid is not None else connection_source(connection)


class LentListeners:
    """Accepts on the listening sockets the supervisor lent, in one thread, until :meth:`close`."""

    def __init__(self, runtimes: Mapping[str, TunnelRuntime | InboundRuntime], report: Report) -> None:
        self._runtimes = runtimes  # the card session's, changed in place by a reload
        self._report = report
        self._selector = selectors.DefaultSelector()
        self._sockets: dict[str, socket.socket] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_read, self._wake_write = os.pipe()  # interrupts select() when the set changes
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        self._backoff = AcceptBackoff(log, "tunnels", self._stop)  # the log line names the process
        self._capacity_refusals = RefusalLog(log, kind="tunnel")
        self._thread: threading.Thread | None = None
        self._relays: list[threading.Thread] = []
        self.last_connection = 0.0  # time.monotonic() of the latest connection accepted, for the idle lock

    def replace(self, sockets: dict[str, socket.socket]) -> None:
        """Accept on exactly ``sockets`` (tunnel name -> listening socket) from now on."""
        with self._lock:
            for name, sock in list(self._sockets.items()):
                if sockets.get(name) is not sock:
                    self._selector.unregister(sock)
                    sock.close()
                    del self._sockets[name]
            for name, sock in sockets.items():
                if name not in self._sockets:
                    self._selector.register(sock, selectors.EVENT_READ, name)
                    self._sockets[name] = sock
        os.write(self._wake_write, b"x")
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="accept-lent", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop accepting and let go of every lent socket (the supervisor's own copies stay open)."""
        self._stop.set()
        os.write(self._wake_write, b"x")
        if self._thread is not None:
            self._thread.join(2)
        with self._lock:
            for sock in self._sockets.values():
                sock.close()
            self._sockets.clear()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._capacity_refusals.flush()
                for key, _ in self._selector.select(timeout=1.0):
                    if key.fd == self._wake_read:
                        os.read(self._wake_read, 64)
                        continue
                    if self._stop.is_set():
                        return
                    with self._lock:
                        sock = self._sockets.get(key.data)
                    if sock is None:  # given back since select()
                        continue
                    connection = self._backoff.accept(sock)
                    if connection is not None:
                        self._serve(key.data, connection)
            except Exception:  # a bug must cost one connection, not every later one
                log.exception("accepting connections in the card session: internal error; accepting goes on")
                self._stop.wait(0.1)

    def _serve(self, name: str, connection: socket.socket) -> None:
        runtime = self._runtimes.get(name)
        if not isinstance(runtime, TunnelRuntime):  # accepted just before a reload removed its tunnel
            log.warning("tunnel %s: no longer configured: connection closed", name)
            connection.close()
            return
        self.last_connection = time.monotonic()
        # Refusals being answered count against max_connections as relays do: another user's flood
        # of connections must not hold an unbounded number of threads and descriptors.
        limit = runtime.config.max_connections
        if not runtime.enter(limit):
            source = _who(connection)  # before the answer: a peer gone since has no address
            reject_at_once(connection)
            connection.close()
            self._capacity_refusals.refused(name, source, f"{limit} connections in flight (max_connections)")
            return
        answering = False  # True once a refusal thread owns the connection (and leaves in-flight)
        try:
            try:
                peer = admit_peer(connection, PeerPolicy.allowing(runtime.config.allowed_uids))  # as reloaded
            except PeerRefusedError as error:
                log.warning("tunnel %s: %s", name, error)
                self._report(PEER_REFUSED, {"tunnel": name, "listen": str(runtime.config.listen),
                                            "uid": error.peer.uid, "pid": error.peer.pid, "message": str(error)})
                reject_in_thread(connection, TunnelFailure("local peer refused"), name, runtime.leave)
                answering = True
                return
        except (CardAgentError, OSError, RuntimeError) as error:
            # Whoever it is cannot be established (descriptors ran out), or no thread is to be had
            # for the answer: fail closed, without an answer (as the supervisor does).
            connection.close()
            self._backoff.failed(f"tunnel {name}: closed a connection it could not identify or answer", error)
            return
        finally:
            if not answering:
                runtime.leave()
        self._backoff.succeeded()
        thread = serve_connection(runtime, connection, peer.describe())  # counts it in flight again, for its relay
        if thread is not None:
            with self._lock:
                self._relays = [t for t in self._relays if t.is_alive()] + [thread]

    def relays(self) -> list[threading.Thread]:
        """The relay threads started here and still running: the session's end waits for them to
        tell their applications (A-ABORT) before the process exits."""
        with self._lock:
            return [t for t in self._relays if t.is_alive()]

