"""Reaching a TCP server (the PACS, or an inbound listener's local storage SCP) for a connection of
a card session: its name looked up within the time allowed, its addresses tried as RFC 8305 ("Happy
Eyeballs") says, all of it given up as soon as the card session ends.

An address that does not answer (IPv6 that a firewall drops, one node of a PACS cluster that is
down) must not cost the whole ``connect_timeout`` when the next address would answer: while an
attempt waits, the next one starts every :data:`ATTEMPT_DELAY`, a refused attempt hands over at
once, and the first connection made wins (the others are closed unused).
"""

from __future__ import annotations

import errno
import itertools
import math
import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable

from dicom_card_agent.tunnel.resolver import AddressInfo, ResolutionGivenUpError, resolve_stream
from dicom_card_agent.tunnel.session_end import SessionEnd

ATTEMPT_DELAY = 0.25  # RFC 8305 section 5, "Connection Attempt Delay": 250 ms recommended


def connect_tcp(host: str, port: int, timeout: float, ending: SessionEnd, *,
                refuse: Callable[[socket.socket], Exception | None] | None = None) -> socket.socket:
    """A connected socket (with ``timeout`` set on it) to ``host``:``port``, name lookup included
    within ``timeout``. ``refuse`` is asked of each connection made: one it returns an exception
    for is closed and the next address tried (`localhost` is ::1 and 127.0.0.1, and another user
    may listen on the one the server does not).

    Raises :class:`SessionEndedError` as soon as ``ending`` is signalled, ``TimeoutError`` when no
    address answered in time, ``socket.gaierror`` or the resolver's errors for a name that does not
    resolve, else the exception ``refuse`` returned, else the last address's ``OSError``
    (connection refused, unreachable).
    """
    deadline = time.monotonic() + timeout
    try:
        addresses = resolve_stream(host, port, timeout, ending.future)
    except ResolutionGivenUpError:
        raise ending.error() from None
    waiting = deque(_families_alternating(addresses))
    pending: dict[int, socket.socket] = {}
    poller = select.poll()  # not select(): descriptors above 1023 are fine
    poller.register(ending.read_fd, select.POLLIN)
    last_error = OSError(f"{host} has no address")
    refused: Exception | None = None

    def made(sock: socket.socket) -> socket.socket | None:
        nonlocal refused
        try:
            refusal = refuse(sock) if refuse is not None else None
        except BaseException:
            sock.close()
            raise
        if refusal is None:
            return _connected(sock, timeout)
        sock.close()
        refused = refusal
        return None

    next_attempt = 0.0
    try:
        while waiting or pending:
            now = time.monotonic()
            if waiting and (now >= next_attempt or not pending):
                family, kind, proto, _, address = waiting.popleft()
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                started = sock.connect_ex(address)
                if started == 0:
                    if (connected := made(sock)) is not None:
                        return connected
                    continue
                if started != errno.EINPROGRESS:
                    sock.close()
                    last_error = OSError(started, os.strerror(started))
                    continue
                pending[sock.fileno()] = sock
                poller.register(sock, select.POLLOUT)
                next_attempt = now + ATTEMPT_DELAY
                continue
            if now >= deadline:
                raise TimeoutError("timed out")
            until = min(deadline, next_attempt) if waiting else deadline
            ready = poller.poll(max(1, math.ceil((until - now) * 1000)))
            if ending.is_set():
                raise ending.error()
            for fd, _ in ready:
                if fd not in pending:  # the session's end
                    continue
                sock = pending.pop(fd)
                poller.unregister(fd)
                failed = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if not failed and (connected := made(sock)) is not None:
                    return connected
                if failed:
                    sock.close()
                    last_error = OSError(failed, os.strerror(failed))
                next_attempt = now  # a refused or unreachable address hands over at once
        raise refused or last_error
    finally:
        for sock in pending.values():  # the attempts that lost, or all of them
            sock.close()


def _connected(sock: socket.socket, timeout: float) -> socket.socket:
    sock.settimeout(timeout)
    return sock


def _families_alternating(addresses: list[AddressInfo]) -> list[AddressInfo]:
    """RFC 8305 section 4: the resolver's order (RFC 6724), with the address families alternating
    from its first choice on, so that a family that does not work costs one attempt delay."""
    if not addresses:
        return []
    first = [a for a in addresses if a[0] == addresses[0][0]]
    other = [a for a in addresses if a[0] != addresses[0][0]]
    return [a for pair in itertools.zip_longest(first, other) for a in pair if a is not None]
