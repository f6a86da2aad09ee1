"""What the kernel says of a socket that Python's ``socket`` module does not."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios


def unsent_bytes(sock: socket.socket) -> int | None:
    """Bytes written to ``sock`` that its peer has not taken yet: for TCP, not acknowledged; for a
    Unix socket, not read (Linux ``SIOCOUTQ``, the same request number as ``TIOCOUTQ``). ``None``
    where the system does not say."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except (OSError, ValueError, struct.error):
        return None
