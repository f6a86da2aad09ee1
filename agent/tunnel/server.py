"""The supervisor's side of the tunnels: local listeners, who may connect, and handing connections
to the card session."""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading

from agent.config.model import AgentConfig, InboundConfig, TunnelConfig
from agent.errors import CardAgentError
from agent.session.manager import SessionManager
from agent.tls.failures import TunnelFailure
from agent.tunnel.admission import LOOPBACK_NETWORKS, RefusalLog, is_allowed
from agent.tunnel.peer import PeerPolicy, PeerRefusedError, admit_peer, create_tcp_listener, create_unix_listener
from agent.tunnel.relay import reject_local

log = logging.getLogger("agent.tunnel")


class Listeners:
    """Every tunnel's listening socket, served by one accept thread."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.sockets: dict[int, tuple[socket.socket, TunnelConfig | InboundConfig]] = {}
        self.policies = {tunnel.name: PeerPolicy(frozenset(tunnel.allowed_uids or (os.getuid(),)))
                         for tunnel in config.tunnels}
        self.manager: SessionManager | None = None
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refusals = RefusalLog(log)
        try:
            for tunnel in config.tunnels:
                listen = tunnel.listen
                if listen.unix_path:
                    reachable_by = self.policies[tunnel.name].allowed_uids
                    sock = create_unix_listener(listen.unix_path, reachable_by=reachable_by)
                else:
                    sock = create_tcp_listener(listen.host, listen.port, unsafe_listen=tunnel.unsafe_listen)
                self.sockets[sock.fileno()] = (sock, tunnel)
                self._selector.register(sock, selectors.EVENT_READ)
                log.info("tunnel %s: listening on %s for %s (TLS %s, server %s)", tunnel.name, listen,
                         tunnel.remote, tunnel.tls, tunnel.server_name)
            for inbound in config.inbound:
                listen, tunnel = inbound.listen, inbound  # named for the error below
                # The PACS connects over the network: allow_from (checked before any TLS) and a
                # required, verified client certificate guard this listener, not its address.
                sock = create_tcp_listener(listen.host, listen.port, unsafe_listen=True)
                self.sockets[sock.fileno()] = (sock, inbound)
                self._selector.register(sock, selectors.EVENT_READ)
                log.info("inbound %s: listening on %s for the PACS at %s (TLS %s, as %s), forwarding to %s",
                         inbound.name, listen, ", ".join(map(str, inbound.allow_from)), inbound.tls,
                         inbound.server_certificate or "the card", inbound.forward)
                if inbound.server_certificate is None and inbound.allow_from != LOOPBACK_NETWORKS:
                    log.warning("inbound %s: the card is this listener's TLS server identity: every handshake, even "
                                "with a peer then refused, waits for a card signature; prefer the workstation's node "
                                "key (server_certificate, server_key)", inbound.name)
        except (CardAgentError, OSError) as error:
            self.close()
            if isinstance(error, OSError):
                raise CardAgentError(f"cannot listen on {listen} (tunnel {tunnel.name!r}): {error.strerror or error}") from None
            raise

    def addresses(self) -> dict[str, object]:
        return {tunnel.name: sock.getsockname() for sock, tunnel in self.sockets.values()}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            self._refusals.flush()
            for key, _ in self._selector.select(timeout=0.5):
                sock, tunnel = self.sockets[key.fd]
                try:
                    local, _ = sock.accept()
                except OSError:
                    continue
                # Admitting is quick (one sock_diag query, one message to the card session), so it
                # runs here: a thread per connection cost every association ~0.1 ms of set-up.
                if isinstance(tunnel, TunnelConfig):
                    self._admit(tunnel, local)
                else:
                    self._admit_inbound(tunnel, local)

    def _admit(self, tunnel: TunnelConfig, local: socket.socket) -> None:
        try:
            peer = admit_peer(local, self.policies[tunnel.name])
        except PeerRefusedError as error:
            log.warning("tunnel %s: %s", tunnel.name, error)
            if self.manager is not None:
                self.manager.audit.peer_refused(tunnel.name, str(tunnel.listen), error.peer, str(error))
            self._turned_away(tunnel.name, "local_peer_refused")
            self._reject(tunnel, local, TunnelFailure("local peer refused"))
            return
        session = self.manager.current_session() if self.manager else None
        if session is not None:
            self.manager.touch()
        if session is None or not session.dispatch(tunnel.name, local, peer.describe()):
            state = self.manager.state if self.manager else "starting"
            log.warning("tunnel %s: %s: rejected: %s", tunnel.name, peer.describe(), state)
            self._turned_away(tunnel.name)
            self._reject(tunnel, local, TunnelFailure(state, transient=True))
            return
        local.close()

    def _turned_away(self, name: str, reason: str | None = None) -> None:
        """Count it for `status` (agent/tunnel/counters.py); the reason defaults to the card state."""
        if self.manager is not None:
            self.manager.turned_away(name, reason)

    @staticmethod
    def _reject(tunnel: TunnelConfig, local: socket.socket, failure: TunnelFailure) -> None:
        """Answer A-ASSOCIATE-RJ in a thread of its own: it waits seconds for the application."""
        def reject_and_close() -> None:
            reject_local(local, failure)
            local.close()
        threading.Thread(target=reject_and_close, name=f"reject-{tunnel.name}", daemon=True).start()

    def _admit_inbound(self, inbound: InboundConfig, connection: socket.socket) -> None:
        try:
            host, port = connection.getpeername()[:2]
        except OSError:
            connection.close()
            return
        if not is_allowed(host, inbound.allow_from):
            # Closed here, in the supervisor: a stranger costs no TLS, and never a card signature.
            connection.close()
            self._refusals.refused(inbound.name, host, "its address is not in allow_from")
            self._turned_away(inbound.name, "address_not_allowed")
            return
        peer = f"{host}:{port}"
        session = self.manager.current_session() if self.manager else None
        if session is None or not session.dispatch(inbound.name, connection, peer):
            state = self.manager.state if self.manager else "starting"
            # No TLS without a card session, so no DICOM answer either: the PACS sees the connection close.
            log.warning("inbound %s: PACS at %s turned away: %s", inbound.name, peer, state)
            self._turned_away(inbound.name)
        connection.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        for sock, tunnel in self.sockets.values():
            sock.close()
            if tunnel.listen.unix_path:  # inbound listeners are never unix sockets
                try:
                    os.unlink(tunnel.listen.unix_path)
                except OSError:
                    pass
        self.sockets.clear()
        self._selector.close()
