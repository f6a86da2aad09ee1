"""The local control socket's server: ``card-agent status`` and ``card-agent lock``.

A unix socket in the agent's private runtime directory (0600 in 0700), answering one JSON request
per connection; only the agent's own uid may use it (the same peer check as the tunnels). Its
clients are in agent/session/control.py.

Requests are read as they come, several at once: a client that connects and sends nothing (a
monitoring script gone wrong) must not hold `status` and `lock` (the desktop's "Lock DICOM session")
for anyone else while it waits."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_card_agent.card.watcher import Card
from dicom_card_agent.config.model import AgentConfig
from dicom_card_agent.config.tables import read_config_file
from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.lifecycle.machine import State
from dicom_card_agent.session.control import control_socket_path
from dicom_card_agent.session.manager import SessionManager
from dicom_card_agent.session.runtime_dir import is_private_runtime_directory
from dicom_card_agent.session.supervisor import CardSessionUnresponsive
from dicom_card_agent.trust.crls import CrlStore
from dicom_card_agent.tunnel.accepting import AcceptBackoff
from dicom_card_agent.tunnel.counters import DURATIONS_KEY, empty_counts
from dicom_card_agent.tunnel.peer import (
    SOCKET_FILE_CHECK_SECONDS,
    PeerPolicy,
    PeerRefusedError,
    SocketFile,
    admit_peer,
    create_unix_listener,
)

if TYPE_CHECKING:
    from dicom_card_agent.tunnel.server import Listeners

log = logging.getLogger("agent.control")
REQUEST_TIMEOUT = 5.0  # seconds for a whole request line, however slowly it comes
MAX_REQUEST = 4096  # bytes: requests are one short JSON line
# Connections whose request has not all come, at most: past it the oldest is answered and closed,
# so that the newest (most likely the `status` someone is waiting for) is read.
MAX_WAITING_REQUESTS = 16


@dataclass
class _WaitingRequest:
    """An admitted client whose request line has not all come yet."""

    connection: socket.socket
    deadline: float  # time.monotonic(): REQUEST_TIMEOUT after it was accepted
    data: bytearray = field(default_factory=bytearray)

    def complete(self) -> bool:
        return b"\n" in self.data or len(self.data) >= MAX_REQUEST

    def line(self) -> bytes:
        return bytes(self.data.partition(b"\n")[0])


@dataclass(frozen=True)
class ReloadOutcome:
    """How the latest SIGHUP ended, for `status`: an edit the agent refused is otherwise told only
    in the log (and `systemctl reload` reports success either way)."""

    at: float  # time.time()
    applied: bool
    message: str  # the reload's log line: what changed, or why it was refused
    # Of the file it read (read again just after: the reloader keeps no bytes); None: unreadable.
    file_sha256: str | None


class ControlServer:
    def __init__(self, config: AgentConfig, manager: SessionManager, crls: CrlStore | None = None) -> None:
        self.config = config  # the configuration the agent runs (the reloader puts a reloaded one here)
        self.last_reload: ReloadOutcome | None = None
        self.manager = manager
        # The supervisor's own look at [trust] crl, for `status`; card sessions read the files themselves.
        self.crls = crls if crls is not None else CrlStore(config.trust.crl)
        self.listeners: Listeners | None = None  # for `status` to tell of a unix listener lost (set by the reloader)
        self.path = control_socket_path(config)
        self.listener, self._socket_file = _listen_at(self.path)
        self.policy = PeerPolicy(frozenset({os.getuid()}))
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._backoff = AcceptBackoff(log, "control")
        self._closing = threading.Event()
        self._wake_read, self._wake_write = os.pipe()  # a byte: look at the socket file now (SIGHUP), or stop
        os.set_blocking(self._wake_write, False)
        self._trouble: str | None = None  # why the socket could not be made again, as last logged
        self._waiting: dict[int, _WaitingRequest] = {}  # by descriptor; the control thread's own

    @property
    def config(self) -> AgentConfig:
        return self._config

    @config.setter
    def config(self, config: AgentConfig) -> None:
        self._config = config
        self._config_read_at = time.time()

    def reload_ended(self, message: str, *, applied: bool) -> None:
        """The latest reload's outcome (agent/session/reload.py tells it here)."""
        self.last_reload = ReloadOutcome(time.time(), applied, message, _file_digest(self.config.source))

    def start(self) -> None:
        self._thread.start()

    def check_socket_file(self) -> None:
        """Look at the control socket's file now (SIGHUP) rather than at the next periodic look."""
        self._wake()

    def close(self) -> None:
        self._closing.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(2)
        self.listener.close()
        if self._socket_file.lost() is None:  # never another agent's, made there since ours went
            try:
                self.path.unlink()
            except OSError:
                pass
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"x")
        except (BlockingIOError, OSError):
            pass  # full (it is woken anyway) or closed (stopping)

    def _serve(self) -> None:
        # Nothing ends this loop but close(): `status` and `lock` must answer all day.
        next_look = time.monotonic() + SOCKET_FILE_CHECK_SECONDS
        try:
            while not self._closing.is_set():
                try:
                    listener = self.listener
                    wake_at = min([next_look, *(waiting.deadline for waiting in self._waiting.values())])
                    readable = _readable([listener.fileno(), self._wake_read, *self._waiting],
                                         max(0.0, wake_at - time.monotonic()))
                    if self._wake_read in readable:
                        os.read(self._wake_read, 64)
                    if self._closing.is_set():
                        return
                    if self._wake_read in readable or time.monotonic() >= next_look:
                        self._keep_socket_file()
                        next_look = time.monotonic() + SOCKET_FILE_CHECK_SECONDS
                    for fd in [fd for fd in readable if fd in self._waiting]:
                        self._read_some(self._waiting[fd])
                    self._answer_late(time.monotonic())
                    if listener.fileno() in readable and listener is self.listener:  # not closed: made again
                        self._accept_one(listener)
                except Exception as error:  # a bug costs one turn of the loop, not `status` and `lock` for good
                    self._backoff.failed("serving the control socket", error)
                    self._closing.wait(0.1)
        finally:
            for waiting in self._waiting.values():
                waiting.connection.close()
            self._waiting.clear()

    def _accept_one(self, listener: socket.socket) -> None:
        connection = self._backoff.accept(listener)
        if connection is None:
            return
        try:
            admit_peer(connection, self.policy)
        except PeerRefusedError as error:
            log.warning("control: %s", error)
            connection.close()
            return
        connection.setblocking(False)
        if len(self._waiting) >= MAX_WAITING_REQUESTS:
            oldest = min(self._waiting.values(), key=lambda waiting: waiting.deadline)
            self._finish(oldest, {"error": f"bad request: closed before it came whole, as the oldest of "
                                           f"{MAX_WAITING_REQUESTS} connections waiting"})
        self._waiting[connection.fileno()] = _WaitingRequest(connection, time.monotonic() + REQUEST_TIMEOUT)
        self._backoff.succeeded()

    def _read_some(self, waiting: _WaitingRequest) -> None:
        """What has come of ``waiting``'s request; answered once its line is whole (or the client
        stopped sending: an empty request asks for nothing)."""
        try:
            chunk = waiting.connection.recv(MAX_REQUEST - len(waiting.data))
        except BlockingIOError:
            return
        except OSError:
            self._finish(waiting, None)  # gone
            return
        waiting.data += chunk
        if chunk and not waiting.complete():
            return
        try:
            answer = self._answer_request(waiting.line())
        except Exception as error:  # a bug or a lookup failure costs this request only
            self._backoff.failed("a control request failed", error)
            answer = None
        self._finish(waiting, answer)

    def _answer_late(self, now: float) -> None:
        for waiting in [waiting for waiting in self._waiting.values() if waiting.deadline <= now]:
            self._finish(waiting, {"error": f"bad request: no whole request within {REQUEST_TIMEOUT:g} s"})

    def _finish(self, waiting: _WaitingRequest, answer: dict | None) -> None:
        """Send ``answer`` (None: nothing) and close the connection."""
        self._waiting.pop(waiting.connection.fileno(), None)
        with waiting.connection as connection:
            if answer is None:
                return
            try:
                connection.settimeout(REQUEST_TIMEOUT)
                connection.sendall(json.dumps(answer).encode() + b"\n")
            except OSError:
                pass

    def _keep_socket_file(self) -> None:
        """Make the control socket again when its file is gone or is no longer ours (its runtime
        directory removed at the user's last logout, cleaned by tmpfiles): `card-agent status` and
        `card-agent lock` (the desktop's "Lock DICOM session") would find no agent. Logged once as
        made again (WARNING), once per reason it cannot be (ERROR, tried again at every look)."""
        lost = self._socket_file.lost()
        if lost is None:
            return
        try:
            listener, socket_file = _listen_at(self.path, make_directory_only=True)
        except (CardAgentError, OSError) as error:
            trouble = (f"control socket {self.path} {lost} and cannot be made again: {_reason(error)}; "
                       "`card-agent status` and `card-agent lock` cannot reach this agent until it is (tried "
                       f"again every {SOCKET_FILE_CHECK_SECONDS:g} s)")
            if trouble != self._trouble:
                log.error("%s", trouble)
                self._trouble = trouble
            return
        old, self.listener, self._socket_file, self._trouble = self.listener, listener, socket_file, None
        old.close()
        log.warning("control socket %s %s while the agent ran (a login session's end, or a clean-up, removes "
                    "runtime directories): made it again; `card-agent status` and `card-agent lock` reach the "
                    "agent again", self.path, lost)

    def _answer_request(self, line: bytes) -> dict:
        try:
            request = json.loads(line or b"{}")
        except ValueError as error:
            return {"error": f"bad request: {error}"}
        if not isinstance(request, dict):
            return {"error": "bad request: not a JSON object"}
        asked_for = request.get("config")
        if asked_for is not None and asked_for != str(self.config.source):
            # Two configurations may share a runtime directory: never lock or report the wrong one.
            return {"error": f"the agent answering here runs with {self.config.source}, not {asked_for}"}
        return self.answer(request.get("command"))

    def answer(self, command: str | None) -> dict:
        if command == "status":
            return self.status()
        if command == "lock":
            locked = self.manager.lock()
            return {"locked": locked is not None, "signing_in": locked in (State.PIN_PENDING, State.SIGNING_IN),
                    "state": self.manager.state}
        return {"error": f"unknown command {command!r}: status or lock"}

    def status(self) -> dict:
        manager = self.manager
        session = manager.current_session()
        answered: dict[str, dict] | None
        try:
            answered = session.status() if session else {}
        except CardSessionUnresponsive:  # a stuck card session must not hold `status` up (it logs why)
            answered = None  # what it serves is unknown: never "0 open" to an admin waiting to restart
        counters = answered if answered is not None else {}
        files = session.signed_in.files if session else None
        listen_errors = self.listeners.socket_file_trouble() if self.listeners is not None else {}
        return {
            "state": manager.state,
            "identity": files.subject if files else None,
            "issuer": files.issuer if files else None,
            "expires": _local_time(session.signed_in.expires.timestamp()) if session else None,
            "token": manager.card.label if manager.card else None,
            "token_serial": manager.card.serial if manager.card else None,
            "since": _local_time(manager.since) if manager.since else None,
            "last_error": manager.last_error,
            "reader_trouble": manager.reader_trouble,
            # False: the card-session process did not answer; its listeners' live counts are null.
            "card_session_answering": answered is not None,
            # What the reader(s) hold, signed in or not: shows a [identity] token typo at a glance.
            # A card seen through pcscd alone (agent/card/readers.py) is named by its reader.
            "present_tokens": [{"label": card.label, "serial": card.serial} if isinstance(card, Card)
                               else {"reader": card.reader} for card in manager.watcher.present],
            "tunnels": [
                {"name": t.name, "listen": str(t.listen), "remote": t.remote, **self._counters(t.name, answered),
                 # Why its unix socket file is missing and could not be made again; None while listening.
                 "listen_error": listen_errors.get(t.name)}
                for t in self.config.tunnels
            ],
            "inbound": [
                {"name": i.name, "listen": str(i.listen), "forward": str(i.forward),
                 **self._counters(i.name, answered)}
                for i in self.config.inbound
            ],
            # Listeners a reload removed, whose associations still run in this card session.
            "retired": [{"name": name, **self._counters(name, answered)} for name in sorted(counters)
                        if counters[name].get("retired")],
            "audit": manager.audit.trail.status() if manager.audit.trail is not None else None,
            "crls": self.crls.status(),
            "configuration": self._configuration_status(),
        }

    def _configuration_status(self) -> dict:
        """The configuration the agent runs, by the digest of its bytes: `status` compares it with the
        file, which may hold an edit not reloaded yet or one a reload refused."""
        last = self.last_reload
        return {
            "file": str(self.config.source),
            "sha256": hashlib.sha256(self.config.raw).hexdigest(),
            "read_at": _local_time(self._config_read_at),
            "last_reload": {"at": _local_time(last.at), "applied": last.applied, "message": last.message,
                            "file_sha256": last.file_sha256} if last is not None else None,
        }

    def _counters(self, name: str, session_counters: dict[str, dict] | None) -> dict:
        """The card session's live counters (top level, as before), its counts as ``this_session``,
        and the supervisor's ``since_start`` totals (docs/configuration.md, "card-agent status").
        With ``session_counters`` None (the card session did not answer) the live ones are null."""
        since_start = self.manager.totals.since_start(name)
        since_start.pop(DURATIONS_KEY, None)  # histograms are for the metrics (agent/service/metrics.py)
        if session_counters is None:
            return {"open_connections": None, "bytes_up": None, "bytes_down": None, "last_error": None,
                    "this_session": None, "since_start": since_start}
        current = dict(session_counters.get(name, {"open_connections": 0, "bytes_up": 0, "bytes_down": 0,
                                                   "last_error": None}))
        counts = current.pop("counts", None)
        if counts is not None:
            counts = {key: value for key, value in counts.items() if key != DURATIONS_KEY}
        return {**current, "this_session": counts if counts is not None else empty_counts(),
                "since_start": since_start}


def _file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(read_config_file(path)).hexdigest()
    except CardAgentError:
        return None


def _local_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


def _listen_at(path: Path, *, make_directory_only: bool = False) -> tuple[socket.socket, SocketFile]:
    """The control socket at ``path``, non-blocking (its loop waits in select), and its file.
    ``make_directory_only``: the runtime directory itself may be made again, never its parents
    (XDG_RUNTIME_DIR is logind's to make), with the checks it had at start (agent/session/identity.py)."""
    if make_directory_only:
        _make_runtime_directory_again(path.parent)
    listener = create_unix_listener(str(path))
    try:
        listener.setblocking(False)
        return listener, SocketFile.bound_at(str(path))
    except OSError:
        listener.close()
        raise


def _make_runtime_directory_again(directory: Path) -> None:
    """The runtime directory as the agent made it at start: this user's own, 0700, no link. One
    another user made meanwhile is refused: they could replace the control socket."""
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise CardAgentError(f"its parent {directory.parent} does not exist (the agent makes only its runtime "
                             "directory, never XDG_RUNTIME_DIR: a new login session makes that)") from None
    if not is_private_runtime_directory(directory):
        try:
            info = directory.lstat()
            found = f"owned by uid {info.st_uid} with mode {info.st_mode & 0o7777:04o}"
        except OSError as error:
            found = str(error.strerror)
        raise CardAgentError(f"the runtime directory {directory} is not a private directory of uid {os.getuid()} "
                             f"(this agent's user, mode 0700, no symbolic link) but {found}: another user may have "
                             f"made it; remove it and the agent makes it again")


def _readable(descriptors: list[int], timeout: float) -> set[int]:
    """Those of ``descriptors`` that have something to read (or are closed), within ``timeout`` s.
    poll, not select: a client's descriptor may be above 1023 in an agent serving many connections."""
    poller = select.poll()
    for fd in descriptors:
        poller.register(fd, select.POLLIN)
    return {fd for fd, _ in poller.poll(math.ceil(timeout * 1000))}


def _reason(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)
