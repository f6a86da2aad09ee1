"""The supervisor's side of the tunnels: local listeners, who may connect, and handing connections
to the card session."""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dicom_card_agent.audit.events import AlertType, AuditEvent, LocalPeer, Outcome
from dicom_card_agent.audit.refusal import refusal_advice
from dicom_card_agent.config.model import AgentConfig, InboundConfig, TunnelConfig
from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.service.activation import ActivatedSockets
from dicom_card_agent.session.audit import AuditRecorder
from dicom_card_agent.session.channel import MAX_FDS
from dicom_card_agent.session.manager import SessionManager
from dicom_card_agent.session.supervisor import CardSession
from dicom_card_agent.tls.failures import TunnelFailure
from dicom_card_agent.tunnel.accepting import AcceptBackoff
from dicom_card_agent.tunnel.admission import (
    LOOPBACK_NETWORKS,
    InFlight,
    PeerRefusalLog,
    RefusalLog,
    connection_source,
    is_allowed,
)
from dicom_card_agent.tunnel.localhost_guard import (
    bound_endpoint,
    describe,
    hold_other_address,
    listen_endpoint,
    other_localhost_endpoint,
)
from dicom_card_agent.tunnel.peer import (
    SOCKET_FILE_CHECK_SECONDS,
    Peer,
    PeerPolicy,
    PeerRefusedError,
    PortInUseError,
    SocketFile,
    admit_peer,
    create_tcp_listener,
    create_unix_listener,
    is_address_of_this_machine,
)
from dicom_card_agent.tunnel.relay import reject_at_once, reject_in_thread, reject_refused_peer

log = logging.getLogger("agent.tunnel")

FIRST_BYTES_TIMEOUT = 5.0  # seconds an inbound peer has to send its first TLS bytes (its ClientHello)


@dataclass(frozen=True)
class _Silent:
    """An inbound connection admitted by address, waiting in the accept loop for its first bytes."""

    listener: InboundConfig
    connection: socket.socket
    peer: str
    deadline: float

    @staticmethod
    def wait(listener: InboundConfig) -> float:
        """Seconds ``listener``'s peers have for their first bytes: no longer than for a whole handshake."""
        return min(FIRST_BYTES_TIMEOUT, listener.handshake_timeout)


class Listeners:
    """Every tunnel's listening socket, served by one accept thread."""

    def __init__(self, config: AgentConfig, activated: ActivatedSockets | None = None,
                 audit: AuditRecorder | None = None) -> None:
        self.config = config
        self._audit = audit  # for a port another user holds at start-up (later: the manager's)
        activated = activated or ActivatedSockets([])
        self._activated_fds: set[int] = set()  # systemd's sockets: their unix paths are its to remove
        self.sockets: dict[int, tuple[socket.socket, TunnelConfig | InboundConfig]] = {}
        # By a tunnel's listening descriptor: the other address of `localhost` at its port, bound, not
        # listening, so that no other user can listen there (agent/tunnel/localhost_guard.py).
        self._guards: dict[int, socket.socket] = {}
        self.policies = {tunnel.name: PeerPolicy.allowing(tunnel.allowed_uids)
                         for tunnel in config.tunnels}
        self.manager: SessionManager | None = None
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refusals = RefusalLog(log)  # inbound listeners'
        self._tunnel_refusals = RefusalLog(log, kind="tunnel")
        self._peer_refusals = PeerRefusalLog(log)
        self._backoff = AcceptBackoff(log, "tunnels", self._stop)
        self._in_flight = InFlight()  # the allowed users' connections being admitted, or answered
        self._refusing = InFlight()  # refused users' connections being answered
        self._lock = threading.Lock()  # the accept thread's view of self.sockets while a reload swaps them
        self._silent: dict[int, _Silent] = {}  # the accept thread's: inbound connections yet to send a byte
        self._lent_to: CardSession | None = None  # the card session accepting on the tunnels' sockets
        self._lent: set[int] = set()  # their descriptors (not in the selector meanwhile)
        # The files of the unix listeners we bound (not systemd's), by path: looked at every
        # SOCKET_FILE_CHECK_SECONDS and at SIGHUP (keep_socket_files); why one cannot be made again, by name.
        self._socket_files: dict[str, SocketFile] = {}
        self._socket_file_trouble: dict[str, str] = {}
        self._next_look = time.monotonic() + SOCKET_FILE_CHECK_SECONDS
        try:
            for listener in config.listeners:
                sock = self._open(listener, activated)
                self.sockets[sock.fileno()] = (sock, listener)
                self._selector.register(sock, selectors.EVENT_READ)
            activated.check_all_taken()
            self._guards, _ = self._guard(self.sockets)
        except CardAgentError:
            self.close()
            raise

    def _open(self, listener: TunnelConfig | InboundConfig,
              activated: ActivatedSockets | None = None) -> socket.socket:
        """A listening socket for ``listener`` (the one systemd passed for it, if any), logged;
        CardAgentError naming it when it cannot be had."""
        listen = listener.listen
        unsafe_listen = True if isinstance(listener, InboundConfig) else listener.unsafe_listen
        taken = activated.take(listener.name, listen, unsafe_listen=unsafe_listen) if activated else None
        if taken is not None:
            taken.setblocking(False)  # see below
            self._activated_fds.add(taken.fileno())
            _log_listening(listener)
            return taken
        try:
            if isinstance(listener, InboundConfig):
                # The PACS connects over the network: allow_from (checked before any TLS) and a
                # required, verified client certificate guard this listener, not its address.
                assert listen.host is not None and listen.port is not None  # parse_listen: host:port (no unix:)
                sock = create_tcp_listener(listen.host, listen.port, unsafe_listen=True)
            elif listen.unix_path:
                sock = create_unix_listener(listen.unix_path, reachable_by=self.policies[listener.name].allowed_uids)
                try:
                    self._socket_files[listen.unix_path] = SocketFile.bound_at(listen.unix_path)
                except OSError:
                    sock.close()
                    raise
            else:
                assert listen.host is not None and listen.port is not None  # parse_listen: host:port when not unix:
                sock = create_tcp_listener(listen.host, listen.port, unsafe_listen=listener.unsafe_listen)
        except PortInUseError as error:
            named = error.naming_the_holder()
            self._alert_port_taken(listener, named)
            raise named from None
        except OSError as error:
            raise CardAgentError(f"cannot listen on {listen} ({_kind(listener)} {listener.name!r}): "
                                 f"{error.strerror or error}") from None
        # Non-blocking: while a card session is signed in it accepts on the same socket (lent), and
        # whichever process loses the race for a connection must not block in accept().
        sock.setblocking(False)
        _log_listening(listener)
        return sock

    def _alert_port_taken(self, listener: TunnelConfig | InboundConfig, error: PortInUseError) -> None:
        """A Security Alert when another user holds the listener's port: it may be receiving what the
        applications (or the PACS) send there. Only with an audit trail at hand: at start-up the one
        given to the constructor, at a reload the manager's."""
        audit = self.manager.audit if self.manager is not None else self._audit
        if audit is None or not error.by_another_user:
            return
        audit.record(AuditEvent.security_alert(
            AlertType.LOCAL_PEER_REFUSED, str(error), outcome=Outcome.SERIOUS_FAILURE, tunnel=listener.name,
            local_peer=LocalPeer(uid=error.holder_uid, listen=str(listener.listen))))

    def prepare(self, config: AgentConfig) -> Callable[[], bool]:
        """For a reload: open the sockets ``config`` has and these lack (listeners are matched by
        address); the returned function puts them in service and closes those ``config`` no longer
        has, or, when :meth:`close` came meanwhile (the agent stops), closes the new ones and returns
        False. Raises CardAgentError, with nothing changed, when a new socket cannot be had."""
        # Under the lock: keep_socket_files (the accept thread) must neither replace a socket being
        # matched here nor open one with the new policies set for a moment below.
        with self._lock:
            kept = {str(listener.listen): sock for sock, listener in self.sockets.values()}
            _refuse_to_let_go_of_systemds(config, [listener for fd, (_, listener) in self.sockets.items()
                                                   if fd in self._activated_fds])
            policies = {tunnel.name: PeerPolicy.allowing(tunnel.allowed_uids)
                        for tunnel in config.tunnels}
            old_policies, self.policies = self.policies, policies  # _open reads a unix socket's users from them
            opened: list[tuple[socket.socket, TunnelConfig | InboundConfig]] = []
            chosen: dict[int, tuple[socket.socket, TunnelConfig | InboundConfig]] = {}
            new_guards: list[socket.socket] = []
            try:
                for listener in config.listeners:
                    sock = kept.get(str(listener.listen))
                    if sock is None:
                        self._refuse_a_guarded_address(listener)
                        sock = self._open(listener)
                        opened.append((sock, listener))
                    chosen[sock.fileno()] = (sock, listener)
                guards, new_guards = self._guard(chosen, self._guards)
            except CardAgentError:
                self._close_unused(opened)
                raise
            finally:
                self.policies = old_policies

        def commit() -> bool:
            with self._lock:
                if self._stop.is_set():  # close() came meanwhile: the agent stops
                    self._close_unused(opened)
                    _close_all(new_guards)
                    return False
                borrower = self._lent_to
                if borrower is not None:  # it gets the new set below
                    self._take_back()
                self._keep_sockets_made_again(chosen, [sock for sock, _ in opened])
                retired = [(sock, listener) for fd, (sock, listener) in self.sockets.items() if fd not in chosen]
                _close_all([guard for fd, guard in self._guards.items() if fd not in guards])
                self._guards = guards
                for sock, _ in opened:
                    self._selector.register(sock, selectors.EVENT_READ)
                self.sockets, self.policies, self.config = chosen, policies, config
                paths = {listener.listen.unix_path for _, listener in chosen.values()}
                names = {listener.name for _, listener in chosen.values()}
                self._socket_file_trouble = {name: trouble for name, trouble in self._socket_file_trouble.items()
                                             if name in names}
                for sock, listener in retired:
                    self._selector.unregister(sock)
                    # The lent copy in the card session listens until that process has read the new
                    # set (sent below): a shut-down socket refuses connections in every copy. (None is
                    # systemd's: prepare refuses to let go of those.)
                    _stop_listening(sock)
                    sock.close()
                    if listener.listen.unix_path and listener.listen.unix_path not in paths:
                        self._remove_socket_file(listener.listen.unix_path)  # not systemd's: none recorded
                    log.info("%s %s: no longer listening on %s", _kind(listener), listener.name, listener.listen)
                if borrower is not None:
                    self._lend(borrower)
            return True
        return commit

    def _guard(self, sockets: dict[int, tuple[socket.socket, TunnelConfig | InboundConfig]],
               held: dict[int, socket.socket] | None = None) -> tuple[dict[int, socket.socket], list[socket.socket]]:
        """The other `localhost` address of each tunnel's TCP port in ``sockets``, bound so that no
        other user can listen there: those ``held`` already, and new ones (also returned apart). A
        port whose other address is a listener of ``sockets`` needs none. CardAgentError, the new ones
        closed, when one cannot be had (with a Security Alert when another user has it)."""
        held = held or {}
        listening = {bound_endpoint(sock) for sock, _ in sockets.values()}
        ours_until_the_reload = {bound_endpoint(sock) for fd, (sock, _) in self.sockets.items() if fd not in sockets}
        guards: dict[int, socket.socket] = {}
        new: list[socket.socket] = []
        try:
            for fd, (sock, listener) in sockets.items():
                if fd in held:
                    guards[fd] = held[fd]
                    continue
                endpoint = bound_endpoint(sock) if isinstance(listener, TunnelConfig) else None
                other = other_localhost_endpoint(endpoint) if endpoint is not None else None
                if endpoint is None or other is None or other in listening:
                    continue
                if other in ours_until_the_reload:
                    raise CardAgentError(
                        f"cannot keep {describe(other)} from other users at a reload (the other address of "
                        f"`localhost` beside {describe(endpoint)}, where {_kind(listener)} {listener.name!r} "
                        "listens): a listener the reload removes holds it until then; restart the agent")
                try:
                    guard = hold_other_address(sock)
                except PortInUseError as error:
                    self._alert_port_taken(listener, error)
                    raise
                if guard is not None:
                    guards[fd] = guard
                    new.append(guard)
        except CardAgentError:
            _close_all(new)
            raise
        return guards, new

    def _refuse_a_guarded_address(self, listener: TunnelConfig | InboundConfig) -> None:
        """CardAgentError when a reload's new ``listener`` is to listen where the agent keeps the other
        `localhost` address of a tunnel's port: only a restart can move it from one to the other."""
        endpoint = listen_endpoint(listener.listen)
        for fd, guard in self._guards.items():
            if endpoint is not None and bound_endpoint(guard) == endpoint:
                _, keeper = self.sockets[fd]
                raise CardAgentError(
                    f"cannot listen on {listener.listen} ({_kind(listener)} {listener.name!r}) at a reload: the "
                    f"agent keeps that address from other users as the other address of `localhost` beside "
                    f"{keeper.listen} ({_kind(keeper)} {keeper.name!r}); restart the agent to listen there")

    def _close_unused(self, opened: list[tuple[socket.socket, TunnelConfig | InboundConfig]]) -> None:
        """Close the sockets :meth:`prepare` opened for a reload that does not take effect."""
        for sock, listener in opened:
            sock.close()
            if listener.listen.unix_path:
                self._remove_socket_file(listener.listen.unix_path)

    def _keep_sockets_made_again(self, chosen: dict[int, tuple[socket.socket, TunnelConfig | InboundConfig]],
                                 opened: list[socket.socket]) -> None:
        """A socket ``prepare`` kept that :meth:`keep_socket_files` has replaced since (its file was
        lost meanwhile): the new one is kept instead, not the closed one. Under ``self._lock``."""
        current = {str(listener.listen): sock for sock, listener in self.sockets.values()}
        for fd, (sock, listener) in list(chosen.items()):
            now = current.get(str(listener.listen), sock)
            if now is not sock and sock not in opened:
                del chosen[fd]
                chosen[now.fileno()] = (now, listener)

    # -- unix listeners whose file was removed (docs/troubleshooting.md, "The runtime directory was removed") --

    def keep_socket_files(self) -> None:
        """Listen again on every unix listener whose socket file is gone or no longer ours (logind
        removes /run/user/UID at the user's last logout, tmpfiles cleans directories): the socket
        still listens, but no application can reach it. One lstat each; called every
        SOCKET_FILE_CHECK_SECONDS by the accept loop, and at SIGHUP. systemd's sockets are its own."""
        with self._lock:
            self._next_look = time.monotonic() + SOCKET_FILE_CHECK_SECONDS
            for fd, (sock, listener) in list(self.sockets.items()):
                path = listener.listen.unix_path
                socket_file = self._socket_files.get(path) if path and fd not in self._activated_fds else None
                lost = socket_file.lost() if socket_file is not None else None
                if lost is not None:
                    self._listen_again(fd, sock, listener, lost)

    def socket_file_trouble(self) -> dict[str, str]:
        """Why a listener's socket file, lost, could not be made again (by listener name), for `status`."""
        with self._lock:
            return dict(self._socket_file_trouble)

    def _listen_again(self, fd: int, sock: socket.socket, listener: TunnelConfig | InboundConfig, lost: str) -> None:
        """A new socket at ``listener``'s path in place of ``sock`` (the same checks as at start:
        a directory another user made is refused), lent to the card session if ``sock`` was. Under
        ``self._lock``. Logged once when made again (WARNING), once per reason it cannot be (ERROR)."""
        path = listener.listen.unix_path
        try:
            new = self._open(listener)
        except CardAgentError as error:
            trouble = (f"{_kind(listener)} {listener.name}: its socket file {path} {lost} and cannot be made again: "
                       f"{error}; applications cannot connect there until it is (tried again every "
                       f"{SOCKET_FILE_CHECK_SECONDS:g} s)")
            if self._socket_file_trouble.get(listener.name) != trouble:
                log.error("%s", trouble)
                self._socket_file_trouble[listener.name] = trouble
            return
        borrower = self._lent_to
        if borrower is not None:  # the card session accepts on copies of the old socket: it gets the new set
            self._take_back()
        self._selector.unregister(sock)
        sockets = {other: entry for other, entry in self.sockets.items() if other != fd}
        sock.close()
        # A new dict, as a reload's commit makes: whoever reads self.sockets without the lock sees one or the other.
        self.sockets = {**sockets, new.fileno(): (new, listener)}
        self._selector.register(new, selectors.EVENT_READ)
        if borrower is not None:
            self._lend(borrower)
        self._socket_file_trouble.pop(listener.name, None)
        log.warning("%s %s: its socket file %s %s while the agent listened on it (a login session's end, or a "
                    "clean-up, removes runtime directories): listening on a new one there; applications can "
                    "connect again", _kind(listener), listener.name, path, lost)

    def _remove_socket_file(self, path: str) -> None:
        """Remove the socket file at ``path`` if it is still the one we bound (never another
        process's, made there since ours was lost; never systemd's, of which none is recorded)."""
        socket_file = self._socket_files.pop(path, None)
        if socket_file is not None and socket_file.lost() is None:
            _unlink(path)

    # -- lending the tunnels' sockets to the signed-in card session (agent/tunnel/lent_listeners.py) --

    def lend(self, session: CardSession) -> None:
        """``session`` is signed in: it accepts on the tunnels' sockets itself until :meth:`take_back`.
        Not under [audit] on_failure = "refuse": admission then asks the audit trail, which is here."""
        with self._lock:
            if self._lent_to is not None:
                self._take_back()
            self._lend(session)

    def take_back(self, session: CardSession) -> None:
        """``session`` is ending: accept here again (connections waiting in the backlog included)."""
        with self._lock:
            if self._lent_to is session:
                self._take_back()

    def _lend(self, session: CardSession) -> None:
        if self.manager is not None and self.manager.audit.refuses_when_failing:
            return
        tunnels = {listener.name: sock for sock, listener in self.sockets.values()
                   if isinstance(listener, TunnelConfig)}
        if not tunnels or len(tunnels) > MAX_FDS:
            return
        for sock in tunnels.values():
            self._selector.unregister(sock)
        if session.lend_listeners(tunnels):
            self._lent_to, self._lent = session, {sock.fileno() for sock in tunnels.values()}
            return
        for sock in tunnels.values():  # the process is gone: nothing lent
            self._selector.register(sock, selectors.EVENT_READ)

    def _take_back(self) -> None:
        for fd in self._lent:
            sock, _ = self.sockets.get(fd, (None, None))
            if sock is not None:
                self._selector.register(sock, selectors.EVENT_READ)
        self._lent_to, self._lent = None, set()

    def addresses(self) -> dict[str, object]:
        return {tunnel.name: sock.getsockname() for sock, tunnel in self.sockets.values()}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        # Nothing may end this loop but close(): a dead accept thread leaves the agent "signed in"
        # with every association timing out.
        while not self._stop.is_set():
            try:
                self._refusals.flush()
                self._tunnel_refusals.flush()
                self._peer_refusals.flush()
                self._close_silent(time.monotonic())
                if time.monotonic() >= self._next_look:
                    self.keep_socket_files()
                for key, _ in self._selector.select(timeout=self._select_timeout()):
                    if isinstance(key.data, _Silent):
                        self._first_bytes_came(key.data)
                        continue
                    with self._lock:
                        sock, listener = self.sockets.get(key.fd, (None, None))
                    if sock is None or listener is None:  # closed by a reload since select()
                        continue
                    connection = self._backoff.accept(sock)
                    if connection is not None:
                        self._serve(listener, connection)
            except Exception:  # a bug must cost one connection, not every later one
                log.exception("accepting connections: internal error; accepting goes on")
                self._stop.wait(0.1)

    def _serve(self, listener: TunnelConfig | InboundConfig, connection: socket.socket) -> None:
        """Admit, refuse or turn away one accepted connection; never raises, never blocks for long."""
        if isinstance(listener, TunnelConfig):
            self._serve_tunnel(listener, connection)
            return
        if not self._in_flight.enter(listener.name, listener.max_connections):
            self._over_capacity(listener, connection, connection_source(connection))
            return
        # Kept once the accept loop watches it for its first bytes: its place is left then.
        self._admit_in_place(listener, connection, lambda: self._admit_inbound(listener, connection))

    def _serve_tunnel(self, tunnel: TunnelConfig, connection: socket.socket) -> None:
        """The user first (one sock_diag query), then a place of max_connections: those are the allowed
        users'; another user's connections are refused under a budget of their own (:meth:`_refuse_peer`)."""
        try:
            peer = admit_peer(connection, self.policies[tunnel.name], name_refused_process=False)
        except PeerRefusedError as error:
            self._refuse_peer(tunnel, connection, error)
            return
        except (CardAgentError, OSError) as error:
            self._failed(tunnel, connection, error)
            return
        if not self._in_flight.enter(tunnel.name, tunnel.max_connections):
            self._over_capacity(tunnel, connection, f"uid {peer.uid}")
            return
        # Admitting is quick (one message to the card session), so it runs here: a thread per
        # connection cost every association ~0.1 ms of set-up. Kept by a refusal thread, which
        # leaves the place when it ends.
        self._admit_in_place(tunnel, connection, lambda: self._admit(tunnel, connection, peer))

    def _admit_in_place(self, listener: TunnelConfig | InboundConfig, connection: socket.socket,
                        admit: Callable[[], bool]) -> None:
        """Run ``admit`` for ``connection``, which holds one of ``listener``'s places of
        max_connections: the place is left when it returns, unless it returned True (whoever took the
        connection over leaves it), and when it fails (closed, without an answer)."""
        kept = False
        try:
            kept = admit()
            self._backoff.succeeded()
        except (CardAgentError, OSError, RuntimeError) as error:
            self._failed(listener, connection, error)
        finally:
            if not kept:
                self._in_flight.leave(listener.name)

    def _failed(self, listener: TunnelConfig | InboundConfig, connection: socket.socket, error: Exception) -> None:
        """Whoever it is cannot be established (PeerLookupError when descriptors ran out), or no
        thread is to be had for the answer: fail closed, without an answer."""
        connection.close()
        self._backoff.failed(f"{_kind(listener)} {listener.name}: closed a connection it could not identify "
                             "or answer", error)

    def _over_capacity(self, listener: TunnelConfig | InboundConfig, connection: socket.socket, source: str) -> None:
        """Beyond max_connections: a tunnel's application gets A-ASSOCIATE-RJ (rejected-transient)
        at once, without its request being read; an inbound peer sees the connection close."""
        refusals = self._refusals
        if isinstance(listener, TunnelConfig):
            reject_at_once(connection)
            refusals = self._tunnel_refusals
        # Logged before the close: the line is there once the peer sees it (tests read the log then).
        refusals.refused(listener.name, source, f"{listener.max_connections} connections in flight (max_connections)")
        connection.close()

    def _refuse_peer(self, tunnel: TunnelConfig, local: socket.socket, error: PeerRefusedError) -> None:
        """A user not in allowed_uids, or one that could not be identified: A-ASSOCIATE-RJ in a thread
        of its own, under a budget of its own (REFUSALS_IN_FLIGHT a tunnel), never in a place of
        max_connections; beyond the budget the connection is closed at once, so that a flood holds
        no thread and no descriptor. Logged, audited and counted either way (in full once a minute)."""
        self._peer_refusals.refused(tunnel.name, error)
        if self.manager is not None:
            self.manager.audit.peer_refused(tunnel.name, str(tunnel.listen), error.peer, str(error))
        self._turned_away(tunnel.name, "local_peer_refused")
        try:
            reject_refused_peer(local, tunnel.name, self._refusing)
        except RuntimeError as failure:  # no thread to be had: closed without an answer
            self._failed(tunnel, local, failure)

    def _admit(self, tunnel: TunnelConfig, local: socket.socket, peer: Peer) -> bool:
        """True when a refusal thread took over ``local``."""
        refusal = self.manager.audit.refusal() if self.manager is not None else None
        if refusal is not None:  # [audit] on_failure = "refuse": no association goes unrecorded
            log.warning("tunnel %s: %s: rejected: %s%s", tunnel.name, peer.describe(), refusal, refusal_advice(refusal))
            self._turned_away(tunnel.name, "audit_failing")
            return self._reject(tunnel, local, TunnelFailure(refusal, transient=True))
        silence = self.manager.session_silence() if self.manager is not None else None
        if silence is not None:  # handed over, it would wait in a process that reads nothing
            log.warning("tunnel %s: %s: rejected: %s", tunnel.name, peer.describe(), silence)
            self._turned_away(tunnel.name, "session_silent")
            return self._reject(tunnel, local, TunnelFailure(silence, transient=True))
        session = self.manager.current_session() if self.manager else None
        if session is not None and self.manager:
            self.manager.touch()
        if session is None or not session.dispatch(tunnel.name, local, peer.describe()):
            state = self.manager.state if self.manager else "starting"
            log.warning("tunnel %s: %s: rejected: %s", tunnel.name, peer.describe(), state)
            self._turned_away(tunnel.name)
            return self._reject(tunnel, local, TunnelFailure(state, transient=True))
        local.close()
        return False

    def _turned_away(self, name: str, reason: str | None = None) -> None:
        """Count it for `status` (agent/tunnel/counters.py); the reason defaults to the card state."""
        if self.manager is not None:
            self.manager.turned_away(name, reason)

    def _reject(self, tunnel: TunnelConfig, local: socket.socket, failure: TunnelFailure) -> bool:
        """Answer A-ASSOCIATE-RJ in a thread of its own (agent/tunnel/relay.py reject_in_thread),
        leaving the listener's in-flight count when done. True when the thread took over ``local``."""
        reject_in_thread(local, failure, tunnel.name, lambda: self._in_flight.leave(tunnel.name))
        return True

    def _admit_inbound(self, inbound: InboundConfig, connection: socket.socket) -> bool:
        """True when ``connection`` now waits for its first bytes (still in flight, see :meth:`_wait_for_bytes`)."""
        try:
            host, port = connection.getpeername()[:2]
        except OSError:
            connection.close()
            return False
        if not self._allows(inbound, host):
            # Closed here, in the supervisor: a stranger costs no TLS, and never a card signature.
            connection.close()
            return False
        if self._turn_away(inbound, connection, f"{host}:{port}", dispatch=False):
            return False
        self._wait_for_bytes(_Silent(inbound, connection, f"{host}:{port}",
                                     time.monotonic() + _Silent.wait(inbound)))
        return True

    def _turn_away(self, inbound: InboundConfig, connection: socket.socket, peer: str, *, dispatch: bool) -> bool:
        """Close ``connection`` when no card session can take it (logged once a minute per address
        and reason, as other refusals: connecting in a loop must not fill the journal); True then.
        ``dispatch``: hand it to the card session if there is one (the caller closes its copy)."""
        refusal = self.manager.audit.refusal() if self.manager is not None else None
        if refusal is not None:  # [audit] on_failure = "refuse": what the PACS sends would go unrecorded
            connection.close()
            self._refusals.refused(inbound.name, peer.rsplit(":", 1)[0], f"turned away: {refusal}",
                                   first_line=f"PACS at {peer} turned away: {refusal}; [audit] on_failure = \"refuse\"")
            self._turned_away(inbound.name, "audit_failing")
            return True
        session = self.manager.current_session() if self.manager else None
        if session is not None and (not dispatch or session.dispatch(inbound.name, connection, peer)):
            return False
        state = self.manager.state if self.manager else "starting"
        # No TLS without a card session, so no DICOM answer either: the PACS sees the connection close.
        connection.close()
        self._refusals.refused(inbound.name, peer.rsplit(":", 1)[0], f"turned away: {state}",
                               first_line=f"PACS at {peer} turned away: {state}")
        self._turned_away(inbound.name)
        return True

    def _wait_for_bytes(self, silent: _Silent) -> None:
        """Hand ``silent`` to the card session once its first bytes came, or close it at its deadline.

        Only then does it take one of the card session's handshakes in flight
        (max_pending_handshakes): a peer that connects and sends nothing costs no signature and no
        place a PACS needs, and while it waits, no thread either (the accept loop watches it)."""
        self._silent[silent.connection.fileno()] = silent
        self._selector.register(silent.connection, selectors.EVENT_READ, silent)

    def _first_bytes_came(self, silent: _Silent) -> None:
        self._stop_watching(silent)
        inbound, connection = silent.listener, silent.connection
        try:
            try:
                if not connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    return  # connected and closed without a byte: a port probe, not worth a line
            except OSError:
                return  # reset: gone
            current = self._admitted_still(silent)
            if current is not None:
                self._turn_away(current, connection, silent.peer, dispatch=True)
        finally:
            connection.close()
            self._in_flight.leave(inbound.name)

    def _admitted_still(self, silent: _Silent) -> InboundConfig | None:
        """``silent``'s listener as the configuration now has it, if that still lets its address in.
        A reload may have narrowed ``allow_from`` or removed the listener while the peer waited: its
        address was judged at accept time, by the configuration of then."""
        host = silent.peer.rsplit(":", 1)[0]
        current = next((inbound for inbound in self.config.inbound if inbound.name == silent.listener.name), None)
        if current is None:
            self._refusals.refused(silent.listener.name, host, "its listener was removed by a reload")
            return None
        return current if self._allows(current, host) else None

    def _allows(self, inbound: InboundConfig, host: str) -> bool:
        """Whether ``inbound``'s allow_from lets ``host`` in; a refusal is logged and counted."""
        if is_allowed(host, inbound.allow_from):
            return True
        self._refusals.refused(inbound.name, host, "its address is not in allow_from")
        self._turned_away(inbound.name, "address_not_allowed")
        return False

    def _close_silent(self, now: float) -> None:
        """Close the inbound connections whose first bytes did not come by their deadline."""
        for silent in [s for s in self._silent.values() if s.deadline <= now]:
            self._stop_watching(silent)
            silent.connection.close()
            self._in_flight.leave(silent.listener.name)
            self._refusals.refused(silent.listener.name, silent.peer.rsplit(":", 1)[0],
                                   f"it sent nothing within {_Silent.wait(silent.listener):g} s (no TLS ClientHello)")

    def _stop_watching(self, silent: _Silent) -> None:
        self._selector.unregister(silent.connection)
        del self._silent[silent.connection.fileno()]

    def _select_timeout(self) -> float:
        """Until the next silent connection's deadline, at most 0.5 s."""
        if not self._silent:
            return 0.5
        return max(0.0, min(0.5, min(s.deadline for s in self._silent.values()) - time.monotonic()))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        for silent in list(self._silent.values()):
            self._stop_watching(silent)
            silent.connection.close()
        for refusals in (self._refusals, self._tunnel_refusals, self._peer_refusals):
            refusals.flush(ending=True)
        with self._lock:  # a reload's commit either came before, or finds the stop and changes nothing
            for sock, tunnel in self.sockets.values():
                # Refused at once, in the card session's lent copy too (it accepts until its end, which
                # follows). Not systemd's: it keeps them listening for the agent's next start.
                if sock.fileno() not in self._activated_fds:
                    _stop_listening(sock)
                sock.close()
                # Inbound listeners are never unix sockets; systemd's sockets are its own to remove.
                if tunnel.listen.unix_path:
                    self._remove_socket_file(tunnel.listen.unix_path)
            self.sockets.clear()
            _close_all(self._guards.values())
            self._guards.clear()
            self._selector.close()


def _log_listening(listener: TunnelConfig | InboundConfig) -> None:
    host = listener.listen.host
    if host is not None and not is_address_of_this_machine(host):
        log.warning("%s %s: %s is not an address of this workstation yet: listening on it anyway, connections "
                    "arrive once the network brings it up", _kind(listener), listener.name, host)
    if isinstance(listener, TunnelConfig):
        log.info("tunnel %s: listening on %s for %s (TLS %s, server %s)", listener.name, listener.listen,
                 listener.remote, listener.tls, listener.server_name)
        return
    log.info("inbound %s: listening on %s for the PACS at %s (TLS %s, as %s), forwarding to %s",
             listener.name, listener.listen, ", ".join(map(str, listener.allow_from)), listener.tls,
             listener.server_certificate or "the card", listener.forward)
    if listener.server_certificate is None and listener.allow_from != LOOPBACK_NETWORKS:
        log.warning("inbound %s: the card is this listener's TLS server identity: every handshake, even "
                    "with a peer then refused, waits for a card signature; prefer the workstation's node "
                    "key (server_certificate, server_key)", listener.name)


def _refuse_to_let_go_of_systemds(config: AgentConfig, activated: list[TunnelConfig | InboundConfig]) -> None:
    """CardAgentError when ``config`` no longer listens where one of the ``activated`` listeners (on a
    socket systemd passed) does. systemd goes on listening on its copy of such a socket, and would
    hold the applications' connections in its backlog for an agent that no longer accepts them."""
    addresses = {str(listener.listen) for listener in config.listeners}
    dropped = [listener for listener in activated if str(listener.listen) not in addresses]
    if dropped:
        which = ", ".join(f"{_kind(listener)} {listener.name!r} ({listener.listen})" for listener in dropped)
        raise CardAgentError(
            f"{which} would no longer be served, but listen{'s' if len(dropped) == 1 else ''} on a socket "
            "systemd passed (socket activation), which systemd keeps listening on: applications connecting "
            "there would wait for nobody; remove it from the socket unit (ListenStream=), then restart the "
            "socket unit and the agent")


def _stop_listening(sock: socket.socket) -> None:
    """Make ``sock`` refuse new connections in every process holding a copy of it (Linux: a listening
    socket shut down leaves the listen state; those waiting in its backlog are reset)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # it refuses once its last copy is closed


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _close_all(sockets: Iterable[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def _kind(listener: TunnelConfig | InboundConfig) -> str:
    return "tunnel" if isinstance(listener, TunnelConfig) else "inbound"
