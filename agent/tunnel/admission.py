"""Who may open a connection to an inbound listener, and how refusals are logged.

An inbound listener faces the network, and every TLS handshake it serves costs a signature with
its server key, on the card when the card is the server identity, before the peer's certificate
is even seen. So the supervisor checks the source address against ``allow_from`` before the
connection reaches the card session, and the card session caps the handshakes in flight
(``max_pending_handshakes``). Both refuse by closing the connection, without TLS.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK_NETWORKS: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
"""Who may connect when an inbound listener names no ``allow_from``: this workstation only."""

REFUSAL_LOG_INTERVAL = 60.0  # seconds: one line per listener, source and reason in this time
REFUSAL_LOG_SOURCES = 256  # distinct sources tracked at once; more are counted together


class AllowFromError(ValueError):
    """An ``allow_from`` entry is not an IP address or network."""


def parse_network(text: str) -> Network:
    """An ``allow_from`` entry: an address (a /32 or /128) or a network in CIDR notation.

    An IPv4-mapped IPv6 address stands for its IPv4 form, as peers are matched."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as error:
        if "has host bits set" in str(error):
            corrected = ipaddress.ip_network(text.strip(), strict=False)
            raise AllowFromError(f"{text!r} has host bits set: write the network as {corrected}, or the single "
                                 f"address as {text.split('/')[0].strip()}") from None
        raise AllowFromError(f"{text!r} is not an IP address or network (e.g. \"10.1.2.3\", \"10.1.0.0/16\", "
                             "\"fd00::/8\"; host names are not resolved)") from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen == 128:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.ip_network(mapped)
    return network


def source_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's address as allow_from matches it: an IPv4-mapped IPv6 peer (a dual-stack
    listener) as its IPv4 address, an IPv6 zone dropped; None if ``host`` is not an address."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_allowed(host: str, allow_from: tuple[Network, ...]) -> bool:
    address = source_address(host)
    return address is not None and any(address in network for network in allow_from)


@dataclass
class _Refusals:
    logged_at: float
    since_logged: int = 0


class RefusalLog:
    """Logs refused connections at most once per listener, source and reason in ``interval``
    seconds; the refusals in between are counted and told in one line when the interval is over,
    so that a scan or a flood cannot flood the log. ``kind`` names the listeners' kind in its
    lines ("inbound", "tunnel"). Thread-safe."""

    def __init__(self, logger: logging.Logger, interval: float = REFUSAL_LOG_INTERVAL,
                 max_sources: int = REFUSAL_LOG_SOURCES, clock: Callable[[], float] = time.monotonic,
                 kind: str = "inbound") -> None:
        self._log = logger
        self._kind = kind
        self._interval = interval
        self._max_sources = max_sources
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str, str], _Refusals] = {}
        self._next_sweep = 0.0

    def refused(self, listener: str, source: str, reason: str) -> None:
        """One connection to ``listener`` from ``source`` closed before TLS, for ``reason``."""
        now = self._clock()
        with self._lock:
            self._report_expired(now)
            key = (listener, source, reason)
            if key not in self._seen and len(self._seen) >= self._max_sources:
                key = (listener, "other addresses", reason)  # a wide scan: memory stays bounded
            refusals = self._seen.get(key)
            if refusals is None:
                self._seen[key] = _Refusals(logged_at=now)
                self._log.warning("%s %s: closed a connection from %s before TLS: %s", self._kind, *key)
            else:
                refusals.since_logged += 1

    def flush(self) -> None:
        """Tell the counts of intervals that are over (else told at the next refusal)."""
        with self._lock:
            if self._seen:
                self._report_expired(self._clock())

    def _report_expired(self, now: float) -> None:
        if now < self._next_sweep:
            return  # a flood calls this for every connection: the accept thread must stay quick
        self._next_sweep = now + 1.0
        for key, refusals in list(self._seen.items()):
            if now - refusals.logged_at < self._interval:
                continue
            if refusals.since_logged:
                count = refusals.since_logged
                self._log.warning("%s %s: closed %d more connection%s from %s before TLS in the last %.0f s: %s",
                                  self._kind, key[0], count, "s" if count > 1 else "", key[1],
                                  now - refusals.logged_at, key[2])
                self._seen[key] = _Refusals(logged_at=now)
            else:
                del self._seen[key]


def connection_source(connection: socket.socket) -> str:
    """The peer's address for a log line: a TCP host, or the unix socket's own path."""
    try:
        peer = connection.getpeername()
    except OSError:
        return "(disconnected)"
    if isinstance(peer, tuple):
        return str(peer[0])
    return "a local process"
