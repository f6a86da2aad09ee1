"""systemd's notify protocol (sd_notify(3)): READY=1, STATUS=, WATCHDOG=1, STOPPING=1.

A few lines of our own rather than a library: python3-systemd is a C extension (a build dependency
for the package and a binding to libsystemd for four datagrams), and `sdnotify` has seen no release
since 2017 and knows nothing of the watchdog variables. The protocol is one datagram per message to
the unix socket in NOTIFY_SOCKET (a path, or ``@name`` in the abstract namespace).

The variables are taken out of the environment when read, so that the card-session processes the
agent starts never speak for it (sd_notify's unset_environment).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, MutableMapping

from dicom_card_agent.logline import printable

log = logging.getLogger("agent.service")

STATUS_MAX = 200  # characters of STATUS=: systemctl status shows one line


class Notifier:
    """The agent's messages to its service manager; every method does nothing without one."""

    def __init__(self, environ: MutableMapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        environ = os.environ if environ is None else environ
        self.address = _socket_address(environ.pop("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(environ.pop("WATCHDOG_USEC", ""), environ.pop("WATCHDOG_PID", ""))
        self._clock = clock
        self._next_ping = 0.0
        self._status: str | None = None
        self._socket: socket.socket | None = None
        if self.address is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def ready(self, status: str) -> None:
        self._status = status
        self._send(f"READY=1\nSTATUS={_status_text(status)}")

    def status(self, status: str) -> None:
        """STATUS=, only when it changed (it is sent from the card loop's every turn)."""
        if status != self._status:
            self._status = status
            self._send(f"STATUS={_status_text(status)}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        """WATCHDOG=1 at half the manager's interval: called from the card loop's every turn, so that a
        loop that no longer turns no longer pings and the manager restarts the agent."""
        if self.watchdog_interval is None:
            return
        now = self._clock()
        if now >= self._next_ping:
            self._next_ping = now + self.watchdog_interval / 2
            self._send("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _send(self, message: str) -> None:
        if self._socket is None or self.address is None:
            return
        try:
            self._socket.sendto(message.encode(), self.address)
        except OSError as error:  # the manager went away: its business, never the agent's end
            log.warning("cannot notify the service manager at %s: %s", printable(repr(self.address)),
                        error.strerror or error)


def _socket_address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):  # abstract namespace: a leading NUL byte instead of the @
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    log.warning("NOTIFY_SOCKET %s is neither a path nor an abstract name: not notifying", printable(repr(value)))
    return None


def _watchdog_interval(usec: str, pid: str) -> float | None:
    """Seconds within which the manager wants a ping, when it wants them from this process."""
    if not usec:
        return None
    try:
        if pid and int(pid) != os.getpid():  # meant for another process (e.g. a wrapper)
            return None
        interval = int(usec) / 1_000_000
    except ValueError:
        log.warning("WATCHDOG_USEC %s or WATCHDOG_PID %s is not a number: no watchdog pings",
                    printable(repr(usec)), printable(repr(pid)))
        return None
    return interval if interval > 0 else None


def _status_text(status: str) -> str:
    return printable(status)[:STATUS_MAX]
