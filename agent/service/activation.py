"""Socket activation (sd_listen_fds(3)): listening sockets systemd (or systemd-socket-activate)
opened for the agent, taken instead of binding.

An activated socket is matched to a [[tunnel]] or [[inbound]] by its FileDescriptorName= (the
listener's name), else by its address (the listener's `listen`); a socket matched by name must
still be bound where the configuration says, and a socket nothing takes is an error: the socket
unit and the configuration disagree, and an application would connect to a socket nobody serves.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import MutableMapping
from dataclasses import dataclass

from dicom_card_agent.config.model import ListenAddress
from dicom_card_agent.errors import ConfigError
from dicom_card_agent.tunnel.peer import is_loopback

SD_LISTEN_FDS_START = 3


@dataclass
class _Activated:
    sock: socket.socket
    name: str

    def address(self) -> str:
        """The bound address in a configuration's spelling: ``host:port`` or ``unix:/path``."""
        bound = self.sock.getsockname()
        if self.sock.family == socket.AF_UNIX:
            return f"unix:{bound if isinstance(bound, str) else bound.decode(errors='replace')}"
        host, port = bound[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ActivatedSockets:
    """The listening sockets passed to this process, until the listeners take them."""

    def __init__(self, sockets: list[_Activated]) -> None:
        self._left = sockets

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> ActivatedSockets:
        """LISTEN_FDS for this process (LISTEN_PID), taken out of the environment: the card-session
        processes must not believe they were activated."""
        environ = os.environ if environ is None else environ
        count, pid = environ.pop("LISTEN_FDS", ""), environ.pop("LISTEN_PID", "")
        names = environ.pop("LISTEN_FDNAMES", "")
        if not count or (pid and pid != str(os.getpid())):
            return cls([])
        try:
            fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count))
        except ValueError:
            raise ConfigError(f"LISTEN_FDS={count!r} is not a number: check the socket unit") from None
        labels = names.split(":") if names else []
        return cls([_activated(fd, labels[i] if i < len(labels) else "") for i, fd in enumerate(fds)])

    def take(self, name: str, listen: ListenAddress, *, unsafe_listen: bool) -> socket.socket | None:
        """The activated socket for the listener ``name`` at ``listen``, if there is one."""
        wanted = str(listen)
        for activated in self._left:
            if activated.name == name or activated.address() == wanted:
                if activated.address() != wanted:
                    raise ConfigError(f"the activated socket named {name!r} is bound to {activated.address()}, "
                                      f"but listener {name!r} has listen = {wanted!r}: make the socket unit's "
                                      "ListenStream= and the configuration agree")
                if listen.host is not None and not unsafe_listen and not is_loopback(listen.host):
                    raise ConfigError(f"the activated socket {wanted} is not a loopback address: set "
                                      f"unsafe_listen = true for {name!r} if other machines must connect")
                self._left.remove(activated)
                return activated.sock
        return None

    def check_all_taken(self) -> None:
        if self._left:
            names = ", ".join(f"{a.address()} ({a.name or 'unnamed'})" for a in self._left)
            for activated in self._left:
                activated.sock.close()
            raise ConfigError(f"activated socket(s) {names} match no [[tunnel]] or [[inbound]] listen address or "
                              "name: remove them from the socket unit or add the listener to the configuration")


def _activated(fd: int, name: str) -> _Activated:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as error:
        raise ConfigError(f"activated file descriptor {fd} is not open ({error.strerror}): "
                          "check the socket unit") from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"activated file descriptor {fd} is not a socket: check the socket unit")
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)  # not into the card-session processes
    if sock.type != socket.SOCK_STREAM or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 1:
        sock.close()
        raise ConfigError(f"activated file descriptor {fd} is not a listening stream socket: use ListenStream=")
    sock.setblocking(True)
    return _Activated(sock, name)
