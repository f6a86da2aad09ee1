"""The supervisor's side of the tunnels: local listeners, who may connect, and handing connections
to the card session."""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading

from agent.config.model import AgentConfig, TunnelConfig
from agent.errors import CardAgentError
from agent.session.manager import SessionManager
from agent.tls.failures import TunnelFailure
from agent.tunnel.peer import PeerPolicy, PeerRefusedError, admit_peer, create_tcp_listener, create_unix_listener
from agent.tunnel.relay import reject_local

log = logging.getLogger("agent.tunnel")


class Listeners:
    """Every tunnel's listening socket, served by one accept thread."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.sockets: dict[int, tuple[socket.socket, TunnelConfig]] = {}
        self.policies = {tunnel.name: PeerPolicy(frozenset(tunnel.allowed_uids or (os.getuid(),)))
                         for tunnel in config.tunnels}
        self.manager: SessionManager | None = None
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            for tunnel in config.tunnels:
                listen = tunnel.listen
                sock = (create_unix_listener(listen.unix_path) if listen.unix_path
                        else create_tcp_listener(listen.host, listen.port, unsafe_listen=tunnel.unsafe_listen))
                self.sockets[sock.fileno()] = (sock, tunnel)
                self._selector.register(sock, selectors.EVENT_READ)
                log.info("tunnel %s: listening on %s for %s (TLS %s, server %s)", tunnel.name, listen,
                         tunnel.remote, tunnel.tls, tunnel.server_name)
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
            for key, _ in self._selector.select(timeout=0.5):
                sock, tunnel = self.sockets[key.fd]
                try:
                    local, _ = sock.accept()
                except OSError:
                    continue
                threading.Thread(target=self._admit, args=(tunnel, local), name=f"admit-{tunnel.name}",
                                 daemon=True).start()

    def _admit(self, tunnel: TunnelConfig, local: socket.socket) -> None:
        try:
            peer = admit_peer(local, self.policies[tunnel.name])
        except PeerRefusedError as error:
            log.warning("tunnel %s: %s", tunnel.name, error)
            reject_local(local, TunnelFailure("local peer refused"))
            local.close()
            return
        session = self.manager.current_session() if self.manager else None
        if session is not None:
            self.manager.touch()
        if session is None or not session.dispatch(tunnel.name, local, peer.describe()):
            state = self.manager.state if self.manager else "starting"
            log.warning("tunnel %s: %s: rejected: %s", tunnel.name, peer.describe(), state)
            reject_local(local, TunnelFailure(state, transient=True))
        local.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        for sock, tunnel in self.sockets.values():
            sock.close()
            if tunnel.listen.unix_path:
                try:
                    os.unlink(tunnel.listen.unix_path)
                except OSError:
                    pass
        self.sockets.clear()
        self._selector.close()
