"""Messages between the supervisor and a card-session process: JSON over a SOCK_SEQPACKET pair,
with accepted sockets passed along (SCM_RIGHTS), so the card-session process relays them directly."""

from __future__ import annotations

import json
import socket
from typing import Any

MAX_MESSAGE = 64 * 1024


def channel_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(channel: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(channel, [data], fds)
    else:
        channel.sendall(data)


def receive(channel: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """The next message and the descriptors that came with it; ``None`` when the other side is gone."""
    data, fds, _, _ = socket.recv_fds(channel, MAX_MESSAGE, 4)
    if not data:
        for fd in fds:
            socket.close(fd)
        return None, []
    return json.loads(data), fds
