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
from typing import Callable, Generic, TypeVar

from dicom_card_agent.tunnel.peer import PeerRefusedError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK_NETWORKS: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
"""Who may connect when an inbound listener names no ``allow_from``: this workstation only."""

REFUSAL_LOG_INTERVAL = 60.0  # seconds: one line per listener, source and reason in this time
REFUSAL_LOG_SOURCES = 256  # distinct sources tracked at once; more are counted together
# Per tunnel: refused users' connections answered with A-ASSOCIATE-RJ in threads of their own (each
# waits up to 5 s for the application); more are closed at once. Never counted in max_connections.
REFUSALS_IN_FLIGHT = 8
PID_LOOKUP_SECONDS = 0.5  # for the process of the one refusal a minute logged in full (a scan of /proc/*/fd)

Key = TypeVar("Key")
Latest = TypeVar("Latest")


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
class _Occurrences(Generic[Latest]):
    told_at: float
    since_told: int = 0
    latest: Latest | None = None


class Throttle(Generic[Key, Latest]):
    """Lets the first occurrence of each key through once per ``interval`` seconds and counts the
    rest, so that a flood of one thing (refused connections) costs one line, or one audit record,
    a minute: :meth:`occurred` says whether to tell this one in full, :meth:`expired` gives the
    counts to tell once an interval is over. At most ``max_keys`` keys are tracked; the caller
    folds further ones into one key (:meth:`tracks`). Thread-safe; no I/O."""

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL, max_keys: int = REFUSAL_LOG_SOURCES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[Key, _Occurrences[Latest]] = {}
        self._next_sweep = 0.0

    def tracks(self, key: Key) -> bool:
        """Whether ``key`` is tracked already or there is room for it."""
        with self._lock:
            return key in self._seen or len(self._seen) < self.max_keys

    def occurred(self, key: Key, latest: Latest | None = None) -> bool:
        """One occurrence of ``key`` (``latest``: what :meth:`expired` gives back with its count);
        True when it is the first of its interval, to be told in full."""
        now = self._clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is None:
                self._seen[key] = _Occurrences(now, latest=latest)
                return True
            seen.since_told += 1
            seen.latest = latest
            return False

    def due_in(self) -> float | None:
        """Seconds until the first count not told yet is due (:meth:`expired`); None without one."""
        now = self._clock()
        with self._lock:
            due = [seen.told_at + self.interval - now for seen in self._seen.values() if seen.since_told]
        return max(0.0, min(due)) if due else None

    def expired(self, *, all_counted: bool = False) -> list[tuple[Key, int, float, Latest | None]]:
        """(key, occurrences not told, seconds they span, the latest one's ``latest``) for each key
        whose interval is over (``all_counted``: every key with a count, at the end); looked at
        once a second at most, as a flood calls it for every connection."""
        now = self._clock()
        told: list[tuple[Key, int, float, Latest | None]] = []
        with self._lock:
            if now < self._next_sweep and not all_counted:
                return told
            self._next_sweep = now + 1.0
            for key, seen in list(self._seen.items()):
                if now - seen.told_at < self.interval and not (all_counted and seen.since_told):
                    continue
                if seen.since_told:
                    told.append((key, seen.since_told, now - seen.told_at, seen.latest))
                    self._seen[key] = _Occurrences(now)
                else:
                    del self._seen[key]
        return told


@dataclass(frozen=True)
class _Refused:
    """How the refusals of one key are told: where the connection ended, and who else hears of the
    count once its interval is over (the audit trail, for refused TLS handshakes)."""

    stage: str = "before TLS"
    counted: Callable[[int, float], None] | None = None  # (refusals not told, seconds they span)


class RefusalLog:
    """Logs refused connections at most once per listener, source and reason in ``interval``
    seconds; the refusals in between are counted and told in one line when the interval is over,
    so that a scan or a flood cannot flood the log. ``kind`` names the listeners' kind in its
    lines ("inbound", "tunnel"). A count is told at the next refusal or :meth:`flush`, and else by
    a timer once its interval is over: a card-session process has no loop that would flush it, and
    a flood that stops must still be told. Thread-safe."""

    def __init__(self, logger: logging.Logger, interval: float = REFUSAL_LOG_INTERVAL,
                 max_sources: int = REFUSAL_LOG_SOURCES, clock: Callable[[], float] = time.monotonic,
                 kind: str = "inbound") -> None:
        self._log = logger
        self._kind = kind
        self._throttle: Throttle[tuple[str, str, str], _Refused] = Throttle(interval, max_sources, clock)
        self._timer_lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def refused(self, listener: str, source: str, reason: str, *, stage: str = "before TLS",
                first_line: str | None = None, counted: Callable[[int, float], None] | None = None) -> bool:
        """One connection to ``listener`` from ``source`` closed ``stage``, for ``reason``; True when
        it is the first of its interval, told in full (``first_line``: the line to log for it, after
        the listener's name). ``counted`` is called with the count of the others when it is told."""
        self.flush()
        key = (listener, source, reason)
        if not self._throttle.tracks(key):
            key = (listener, "other addresses", reason)  # a wide scan: memory stays bounded
        if self._throttle.occurred(key, _Refused(stage, counted)):
            if first_line is None:
                self._log.warning("%s %s: closed a connection from %s %s: %s", self._kind, listener, key[1], stage,
                                  reason)
            else:
                self._log.warning("%s %s: %s", self._kind, listener, first_line)
            return True
        self._flush_when_due()
        return False

    def flush(self, *, ending: bool = False) -> None:
        """Tell the counts of intervals that are over (else told at the next refusal, or by the timer);
        ``ending``: every count, interval over or not, as the listeners (or their process) end."""
        for (listener, source, reason), count, seconds, refused in self._throttle.expired(all_counted=ending):
            refused = refused or _Refused()
            self._log.warning("%s %s: closed %d more connection%s from %s %s in the last %.0f s: %s", self._kind,
                              listener, count, "s" if count > 1 else "", source, refused.stage, seconds, reason)
            if refused.counted is not None:
                refused.counted(count, seconds)

    def _flush_when_due(self) -> None:
        """Flush once the first count not told yet is due, unless a flush is set for then already."""
        due_in = self._throttle.due_in()
        with self._timer_lock:
            if self._timer is not None or due_in is None:
                return
            # A second more: the throttle looks at its counts once a second at most.
            self._timer = threading.Timer(due_in + 1.0, self._flush_by_timer)
            self._timer.daemon = True
            self._timer.start()

    def _flush_by_timer(self) -> None:
        with self._timer_lock:
            self._timer = None
        self.flush()
        self._flush_when_due()


class PeerRefusalLog:
    """Logs local connections refused for their user (not in ``allowed_uids``, or not identified)
    once per tunnel and uid in ``interval`` seconds, then how many more there were: another user
    could otherwise write the journal full by connecting in a loop. The line told in full names the
    connecting process, looked up (for at most ``pid_lookup_seconds``) in a thread of its own: the
    lookup reads every process's descriptors, and another user holding many made each take seconds
    while the clinician's connections waited behind it. Thread-safe."""

    def __init__(self, logger: logging.Logger, interval: float = REFUSAL_LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic, pid_lookup_seconds: float = PID_LOOKUP_SECONDS) -> None:
        self._log = logger
        self._throttle: Throttle[tuple[str, int | None], None] = Throttle(interval, clock=clock)
        self._pid_lookup_seconds = pid_lookup_seconds
        self._naming_lock = threading.Lock()
        self._naming: set[threading.Thread] = set()  # at most one per tunnel and uid a minute

    def refused(self, tunnel: str, error: PeerRefusedError) -> None:
        self.flush()
        if self._throttle.occurred((tunnel, error.peer.uid)):
            self._tell_naming_the_process(tunnel, error)

    def _tell_naming_the_process(self, tunnel: str, error: PeerRefusedError) -> None:
        if not error.process_not_looked_up:  # nothing to look up (a unix peer, an unidentified one)
            self._log.warning("tunnel %s: %s", tunnel, error)
            return
        thread = threading.Thread(target=self._tell_named, args=(tunnel, error), name=f"refused-{tunnel}",
                                  daemon=True)
        with self._naming_lock:
            self._naming.add(thread)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: the line says that the pid was not looked up
            with self._naming_lock:
                self._naming.discard(thread)
            self._log.warning("tunnel %s: %s", tunnel, error)

    def _tell_named(self, tunnel: str, error: PeerRefusedError) -> None:
        try:
            self._log.warning("tunnel %s: %s", tunnel, error.naming_the_process(self._pid_lookup_seconds))
        finally:
            with self._naming_lock:
                self._naming.discard(threading.current_thread())

    def flush(self, *, ending: bool = False) -> None:
        """Tell the counts of intervals that are over (else told at the next refusal); ``ending``:
        every count, as the listeners (or their process) end, after the lines still naming a process."""
        if ending:
            with self._naming_lock:
                naming = list(self._naming)
            for thread in naming:
                thread.join(self._pid_lookup_seconds + 1.0)
        for (tunnel, uid), count, seconds, _ in self._throttle.expired(all_counted=ending):
            self._log.warning("tunnel %s: refused %d more local connection%s from %s in the last %.0f s", tunnel,
                              count, "s" if count > 1 else "", refused_user(uid), seconds)


class InFlight:
    """Connections each listener (by name) holds at once, up to a limit the caller gives. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def enter(self, name: str, limit: int) -> bool:
        """Count one more for ``name`` unless it has ``limit`` already."""
        with self._lock:
            count = self._counts.get(name, 0)
            if count >= limit:
                return False
            self._counts[name] = count + 1
            return True

    def leave(self, name: str) -> None:
        with self._lock:
            self._counts[name] -= 1


def refused_user(uid: int | None) -> str:
    return f"uid {uid}" if uid is not None else "a user that could not be identified"


def connection_source(connection: socket.socket) -> str:
    """The peer's address for a log line: a TCP host, or the unix socket's own path."""
    try:
        peer = connection.getpeername()
    except OSError:
        return "(disconnected)"
    if isinstance(peer, tuple):
        return str(peer[0])
    return "a local process"
