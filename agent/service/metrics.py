"""[metrics]: Prometheus metrics from the supervisor, on a loopback port or unix socket and/or in a
file for node_exporter's textfile collector.

Served from the supervisor with what already flows to it for `card-agent status`: the counts since
start (ended card sessions, the running one asked on each scrape, and what the supervisor turned
away), the card state, the card events, the audit trail's status; the process's own RSS and
descriptors come from prometheus_client's process collector. Exposition is prometheus_client's.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, exposition
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from dicom_card_agent.config.model import AgentConfig, ListenAddress, MetricsConfig
from dicom_card_agent.errors import CardAgentError, ConfigError
from dicom_card_agent.lifecycle.machine import State
from dicom_card_agent.session import events
from dicom_card_agent.session.manager import SessionManager
from dicom_card_agent.session.supervisor import RUNNING_BUILD, RUNNING_VERSION, CardSessionUnresponsive
from dicom_card_agent.tunnel.counters import (
    BROKEN_REASONS,
    DURATIONS,
    DURATIONS_KEY,
    Counts,
    cumulative_buckets,
    empty_histogram,
)
from dicom_card_agent.tunnel.localhost_guard import hold_other_address
from dicom_card_agent.tunnel.peer import (
    NonLoopbackListenError,
    create_tcp_listener,
    create_unix_listener,
    identify_peer,
    is_loopback,
)

log = logging.getLogger("agent.metrics")
# The classic text format's media type: Prometheus 2 (Debian 12) scrapers know it; newer
# prometheus_client releases announce 1.0.0 for the same text.
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)
PREFIX = "card_agent"
# A scrape is one short request: a client still connected after Prometheus's own default
# scrape_timeout is cut off, so that one sending nothing holds neither the endpoint nor the stop.
SCRAPE_DEADLINE_SECONDS = 10.0
# A scraper sends its request as soon as it is connected: one that has not within this time is cut
# off, so that idle connections hold a slot for a moment, not for the whole scrape deadline.
REQUEST_ARRIVAL_SECONDS = 2.0
SCRAPES_AT_ONCE = 16  # more at once are closed unanswered: a local flood costs no more threads
# Any local user can connect to a loopback port: each user (the kernel names the uid of the
# connecting socket) gets this many of the slots, so that another user's flood of connections
# leaves the real scraper (Prometheus's or node_exporter's user, root) slots of its own.
SCRAPES_AT_ONCE_PER_USER = 4
DURATION_HELP = {
    "handshake": "TLS handshakes, full or resumed, from the first message to the last",
    "token_signature": "Handshake steps that sign with the token (the card's signature and the step's own "
                       "cryptography), full handshakes only",
}


class AgentCollector:
    """The agent's metrics, computed on each collection (a scrape or a textfile write)."""

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        manager = self.manager
        live = _live_counters(manager)
        answering = GaugeMetricFamily(
            f"{PREFIX}_card_session_answering", "0 when the card-session process did not answer this collection: "
            "how many connections it serves is unknown, and card_agent_open_connections is left out; 1 when it "
            "answered or no card session runs")
        answering.add_metric([], 0 if live is None else 1)
        yield answering
        yield from self._listeners(live)
        yield from self._card(manager)
        yield from self._audit(manager)
        info = GaugeMetricFamily(f"{PREFIX}_build_info", "The agent's version and build (a digest of the "
                                 "installed files' list: builds of one version differ there)",
                                 labels=["version", "build"])
        # The code answering, not what an upgrade put on disk since.
        info.add_metric([RUNNING_VERSION, RUNNING_BUILD or ""], 1)
        yield info

    def _listeners(self, answered: dict[str, dict] | None) -> Iterator[Metric]:
        """The counts of each listener; its open connections only when the card session answered
        (``answered`` is None when it did not): a 0 there would tell an admin waiting to restart
        that nothing is open while studies still go through."""
        live = answered if answered is not None else {}
        labels = ["listener", "kind"]
        associations = CounterMetricFamily(
            f"{PREFIX}_associations", "Associations by outcome: accepted, rejected (by the acceptor), aborted (by "
            "the acceptor instead of an answer), refused (by the tunnel's association rules), failed (with its "
            "reason)", labels=[*labels, "outcome", "reason"])
        broken = CounterMetricFamily(
            f"{PREFIX}_associations_broken", "Accepted associations that ended by a failure instead of their "
            "release, by reason: pacs_stopped_answering, connection, malformed, card_session_ended (each also "
            "counts as accepted)", labels=[*labels, "reason"])
        rejections = CounterMetricFamily(
            f"{PREFIX}_rejections", "Connections the supervisor turned away before any card session took them, by "
            "reason (no_card, pin_pending, signing_in, waiting, local_peer_refused, address_not_allowed, "
            "supervisor_silent, ...)",
            labels=[*labels, "reason"])
        transferred = CounterMetricFamily(f"{PREFIX}_bytes", "Bytes relayed: up (application to PACS), down",
                                          labels=[*labels, "direction"])
        handshakes = CounterMetricFamily(f"{PREFIX}_handshakes", "Completed TLS handshakes: full or resumed",
                                         labels=[*labels, "type"])
        open_now = GaugeMetricFamily(f"{PREFIX}_open_connections", "Connections the card session serves now",
                                     labels=labels)
        histograms = {name: HistogramMetricFamily(f"{PREFIX}_{name}_duration_seconds", DURATION_HELP[name],
                                                  labels=labels) for name in DURATIONS}
        for name, kind in self._names(live):
            current = live.get(name, {})
            counts = self.manager.totals.since_start(name)
            key = [name, kind]
            for outcome in ("accepted", "rejected", "aborted", "refused"):
                associations.add_metric([*key, outcome, ""], counts["associations"].get(outcome, 0))
            for reason, number in sorted(counts["associations"].get("failed", {}).items()):
                associations.add_metric([*key, "failed", reason], number)
            for reason in BROKEN_REASONS:
                broken.add_metric([*key, reason], counts["associations"].get("broken", {}).get(reason, 0))
            for reason, number in sorted(counts["associations"].get("turned_away", {}).items()):
                rejections.add_metric([*key, reason], number)
            transferred.add_metric([*key, "up"], counts["bytes_up"])
            transferred.add_metric([*key, "down"], counts["bytes_down"])
            for kind_of_handshake in ("full", "resumed"):
                handshakes.add_metric([*key, kind_of_handshake], counts["handshakes"].get(kind_of_handshake, 0))
            open_now.add_metric(key, current.get("open_connections", 0))
            for duration, family in histograms.items():
                histogram = _histogram(counts, duration)
                family.add_metric(key, cumulative_buckets(histogram), histogram["sum_us"] / 1_000_000)
        yield from (associations, broken, rejections, transferred, handshakes, *histograms.values())
        if answered is not None:
            yield open_now

    def _names(self, live: dict[str, dict]) -> list[tuple[str, str]]:
        """The listeners of the configuration now in force (SIGHUP reloads it), and those a reload
        removed while the card session still counts them (kind "retired"): an association open on one
        goes on, and an admin waiting for no open connection must see it."""
        config = self.manager.config
        names = [(t.name, "tunnel") for t in config.tunnels] + [(i.name, "inbound") for i in config.inbound]
        return names + [(name, "retired") for name in sorted(live) if live[name].get("retired")]

    def _card(self, manager: SessionManager) -> Iterator[Metric]:
        state = GaugeMetricFamily(f"{PREFIX}_card_state", "1 for the card life-cycle's current state",
                                  labels=["state"])
        current = manager.lifecycle_state
        for each in State:
            state.add_metric([each.name.lower()], 1 if current is each else 0)
        signed_in = GaugeMetricFamily(f"{PREFIX}_signed_in", "1 while a clinician is signed in with a card")
        session = manager.current_session()
        signed_in.add_metric([], 1 if session is not None else 0)
        expiry = GaugeMetricFamily(f"{PREFIX}_certificate_expiry_timestamp_seconds",
                                   "When the signed-in card's certificate expires (its notAfter), in Unix time; "
                                   "absent while nobody is signed in")
        if session is not None:
            expiry.add_metric([], session.signed_in.expires.timestamp())
        card_events = CounterMetricFamily(f"{PREFIX}_card_events", "Card and sign-in events since start",
                                          labels=["event"])
        happened = events.counted()
        for name in ("card-inserted", "card-removed", "sign-in", "sign-out", "sign-in-failed", "pin-failure"):
            card_events.add_metric([name], happened.get(name, 0))
        yield from (state, signed_in, expiry, card_events)

    def _audit(self, manager: SessionManager) -> Iterator[Metric]:
        trail = manager.audit.trail
        if trail is None:
            return
        status: dict[str, Any] = trail.status()
        waiting = GaugeMetricFamily(f"{PREFIX}_audit_messages_waiting",
                                    "Audit messages waiting for the audit repository")
        waiting.add_metric([], status.get("pending", 0))
        yield waiting
        if status.get("repository") is not None:  # 0 while none waits: an alert on its age needs no absent()
            age = GaugeMetricFamily(f"{PREFIX}_audit_oldest_waiting_age_seconds",
                                    "Age of the oldest audit message waiting for the repository (0: none waits)")
            age.add_metric([], status.get("oldest_pending_seconds") or 0.0)
            yield age
        failures = CounterMetricFamily(f"{PREFIX}_audit_failures", "Audit messages that could not be recorded")
        failures.add_metric([], status.get("failures", 0))
        yield failures


def _live_counters(manager: SessionManager) -> dict[str, dict] | None:
    """The running card session's live counters by listener ({} when none runs), or None when its
    process does not answer (stuck: it logs why), which must not hold the scrape up."""
    session = manager.current_session()
    if session is None:
        return {}
    try:
        return session.status()
    except CardSessionUnresponsive:
        return None


def _histogram(counts: Counts, name: str) -> dict[str, int]:
    return {**empty_histogram(), **counts.get(DURATIONS_KEY, {}).get(name, {})}


class TextfileWritten:
    """When the textfile was written. The agent removes the file when it stops, but not when it is
    killed (systemd's watchdog, the OOM killer): that file goes on showing a signed-in agent that no
    longer exists, and only its age tells. node_exporter reads the file, so its ``up`` cannot."""

    def collect(self) -> Iterator[Metric]:
        written = GaugeMetricFamily(f"{PREFIX}_textfile_written_timestamp_seconds",
                                    "When the agent wrote this file (Unix time); it rewrites it every "
                                    "textfile_interval seconds while it runs")
        written.add_metric([], time.time())
        yield written


class Metrics:
    """The endpoint and the textfile writer of [metrics]; ``close`` stops both."""

    def __init__(self, config: MetricsConfig, agent: AgentConfig, manager: SessionManager) -> None:
        self.config = config
        collector = AgentCollector(manager)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        ProcessCollector(registry=self.registry)
        self.textfile_registry = CollectorRegistry(auto_describe=False)  # the same, and when it was written
        for each in (collector, TextfileWritten()):
            self.textfile_registry.register(each)
        ProcessCollector(registry=self.textfile_registry)
        self._stop = threading.Event()
        self._server: HTTPServer | None = None
        self._threads: list[threading.Thread] = []
        if config.listen is not None:
            self._server = _server(config, self.registry, f"{agent.source} [metrics].listen")

    def start(self) -> None:
        if self._server is not None:
            server = self._server
            self._threads.append(threading.Thread(target=server.serve_forever, args=(0.5,), name="metrics",
                                                  daemon=True))
            log.info("metrics: serving on %s", self.config.listen)
        if self.config.textfile is not None:
            self._threads.append(threading.Thread(target=self._write_textfile_loop, name="metrics-textfile",
                                                  daemon=True))
            log.info("metrics: writing %s every %g s", self.config.textfile, self.config.textfile_interval)
        for thread in self._threads:
            thread.start()

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def write_textfile(self) -> None:
        """The metrics into the textfile, atomically: node_exporter never reads half a file."""
        path = self.config.textfile
        assert path is not None
        data = generate_latest(self.textfile_registry)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def _write_textfile_loop(self) -> None:
        failing = False
        while True:
            try:
                self.write_textfile()
                if failing:
                    log.info("metrics: writing %s works again", self.config.textfile)
                failing = False
            except Exception as error:  # a full disk must not end the agent; say so once per episode
                if not failing:
                    assert self.config.textfile is not None
                    problem = textfile_problem(self.config.textfile) or f"cannot write {self.config.textfile}: {error}"
                    log.warning("metrics: %s", problem)
                failing = True
            if self._stop.wait(self.config.textfile_interval):
                return

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            if any(t.name == "metrics" for t in self._threads):
                self._server.shutdown()
            self._server.server_close()
            listen = self.config.listen
            if listen is not None and listen.unix_path:
                Path(listen.unix_path).unlink(missing_ok=True)
        for thread in self._threads:
            thread.join(2)
        if self.config.textfile is not None:
            # A file left behind would show a stopped agent's last numbers as if it were running.
            self.config.textfile.unlink(missing_ok=True)


class _Handler(BaseHTTPRequestHandler):
    registry: CollectorRegistry

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        server = self.server
        if isinstance(server, _SocketServer):
            server.request_arrived(self.request)
        if self.path.split("?")[0] not in ("/metrics", "/"):
            self.send_error(404, "only /metrics is here")
            return
        try:
            body = generate_latest(self.registry)
        except Exception:
            log.exception("metrics: collecting failed")
            self.send_error(500)
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:
        return str(self.client_address[0]) if isinstance(self.client_address, tuple) else "local"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        pass  # a scrape every 15 s is not news for the agent's log


def textfile_problem(path: Path) -> str | None:
    """Why the agent cannot write the textfile ``path``, as far as its directory tells, or None.
    Its directory is node_exporter's (the agent creates none); a temporary file is written in it,
    then renamed over ``path``. ``run`` logs this, ``check`` fails on it."""
    directory = path.parent
    if not directory.is_dir():
        state = "is not a directory" if directory.exists() else "does not exist"
        return f"cannot write {path}: its directory {directory} {state}"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"cannot write {path}: its directory {directory} is not writable by uid {os.getuid()}"
    return None


def open_listener(listen: ListenAddress) -> tuple[socket.socket, socket.socket | None]:
    """The socket of [metrics].listen, as ``run`` opens it and ``check`` tries it: loopback TCP, or a
    unix socket 0600 in a private directory; with the other address of `localhost` at a TCP port,
    held from other users (agent/tunnel/localhost_guard.py). Raises :class:`ListenerError` saying why not."""
    if listen.unix_path:
        return create_unix_listener(listen.unix_path), None
    assert listen.host is not None and listen.port is not None
    if not is_loopback(listen.host):
        # Not the tunnels' refusal: nobody acts with the card here, and [metrics] has no unsafe_listen.
        raise NonLoopbackListenError(
            f"refusing to serve metrics on {listen}: it is not a loopback address, so other machines could read "
            "them (who is signed in, the workstation's PACS traffic). Listen on 127.0.0.1, ::1 or a unix socket; "
            "to scrape from another machine, write a textfile for the workstation's node_exporter")
    sock = create_tcp_listener(listen.host, listen.port)
    try:
        return sock, hold_other_address(sock)
    except CardAgentError:
        sock.close()
        raise


def _server(config: MetricsConfig, registry: CollectorRegistry, where: str) -> HTTPServer:
    """An HTTP server on :func:`open_listener`'s socket."""
    listen = config.listen
    assert listen is not None
    try:
        sock, other_localhost = open_listener(listen)
    except CardAgentError as error:
        raise ConfigError(f"{where}: {error}") from None
    handler = type("MetricsHandler", (_Handler,), {"registry": registry})
    return _SocketServer(sock, handler, other_localhost)


@dataclass
class _Slot:
    """A connection being served: whose, and until when."""

    user: int | None  # the connecting uid; None when the kernel could not tell
    accepted: float
    deadline: float


def _peer_uid(connection: socket.socket) -> int | None:
    """The uid of the process that connected (SO_PEERCRED, or sock_diag for loopback TCP, as the
    tunnels ask); None when it cannot be told (a client that already closed)."""
    try:
        return identify_peer(connection).uid
    except (CardAgentError, OSError, ValueError):
        return None


class _SocketServer(ThreadingMixIn, HTTPServer):
    """An HTTPServer on a socket already listening (TCP or unix). Each scrape runs in a thread of its
    own: any local user can connect to a loopback port, and one that connected and sent nothing used
    to hold every later scrape and the agent's stop (``shutdown`` waited for the request in hand).
    So a connection has ``REQUEST_ARRIVAL_SECONDS`` to send its request and ``SCRAPE_DEADLINE_SECONDS``
    in all, and each user ``SCRAPES_AT_ONCE_PER_USER`` of the ``SCRAPES_AT_ONCE`` slots: another user
    holding idle connections open, re-opened as they are cut, took every slot and blinded the scraper."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, sock: socket.socket, handler: type[BaseHTTPRequestHandler],
                 other_localhost: socket.socket | None) -> None:
        super().__init__(("", 0), handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self._other_localhost = other_localhost  # held while the server listens
        self.address_family = sock.family
        self.server_address = sock.getsockname()
        self._lock = threading.Lock()
        self._slots: dict[socket.socket, _Slot] = {}

    def process_request(self, request: Any, client_address: Any) -> None:
        user = _peer_uid(request)
        with self._lock:
            if not self._slot_free(user):
                request.close()
                return
            now = time.monotonic()
            self._slots[request] = _Slot(user, now, now + REQUEST_ARRIVAL_SECONDS)
        super().process_request(request, client_address)

    def _slot_free(self, user: int | None) -> bool:
        if len(self._slots) >= SCRAPES_AT_ONCE:
            return False
        return sum(slot.user == user for slot in self._slots.values()) < SCRAPES_AT_ONCE_PER_USER

    def request_arrived(self, request: socket.socket) -> None:
        """The request is in: the scrape has until its whole deadline to be answered."""
        with self._lock:
            slot = self._slots.get(request)
            if slot is not None:
                slot.deadline = slot.accepted + SCRAPE_DEADLINE_SECONDS

    def server_close(self) -> None:
        super().server_close()
        if self._other_localhost is not None:
            self._other_localhost.close()

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._slots.pop(request, None)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """Called by ``serve_forever`` between polls: cut off the scrapes past their deadline (their
        thread's read or write then fails, and the thread ends)."""
        now = time.monotonic()
        with self._lock:
            late = [request for request, slot in self._slots.items() if slot.deadline < now]
        for request in late:
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # its thread closed it meanwhile
