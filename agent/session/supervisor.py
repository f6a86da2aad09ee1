"""Starting, feeding and ending a card-session process."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dicom_card_agent.card.watcher import Card
from dicom_card_agent.config.model import AgentConfig
from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.lifecycle.cancel import current_scope
from dicom_card_agent.revocation.peer import CardRevokedError
from dicom_card_agent.service.signals import SUPERVISORS_SIGNALS, blocked, signal_name
from dicom_card_agent.session import channel as messages
from dicom_card_agent.session.identity import (
    LOGIN_ACCEPTED,
    OPENSSL_CONF_NAME,
    SignedIn,
    login_accepted,
    new_session_directory,
)
from dicom_card_agent.session.probe import CardInUseError, FoundCard, ProbeRequest
from dicom_card_agent.session.report_backlog import ReportBacklog
from dicom_card_agent.sockets import unsent_bytes
from dicom_card_agent.token.module import LoadedModule
from dicom_card_agent.token.secret import Secret, pin_refusal_for
from dicom_card_agent.version import agent_build, agent_version

log = logging.getLogger("agent.session")
START_TIMEOUT_SECONDS = 60
END_TIMEOUT_SECONDS = 4.0  # the process's end grace (2 s) and a margin: it answers and exits right after
# How long `status` waits for the card-session process. The card loop asks it (the idle check), and
# a process that hangs (stopped, stuck in a module call) must not freeze the loop, which must go on
# acting on a pulled card; `card-agent status` and metrics scrapes must answer too.
STATUS_TIMEOUT_SECONDS = 2.0
EXIT_WAIT_SECONDS = 1.0  # a process whose channel closed is gone or about to be: how it ended tells a loss
# The version and build of the code this process runs, read once at its start: a package upgrade
# replaces the files (and the version and build they say) under a running agent, and each
# card-session process is started from the files. It checks that it is of this version and build
# before anything else (worker.upgraded_under). The build tells apart what the version does not:
# 0.1.0-1 -> 0.1.0-2, or two builds from main (version.agent_build).
RUNNING_VERSION = agent_version()
RUNNING_BUILD = agent_build()


class CardSessionError(CardAgentError):
    """The card-session process could not start or died."""


class CardSessionUnresponsive(CardSessionError):
    """The card-session process did not answer ``status`` in time: what it serves is not known."""


class CardSessionLostError(CardSessionError):
    """The card-session process was killed (a signal: a crash, the OOM killer, an administrator)
    before it answered, or the card lost the login it had just accepted (reset, its reader
    restarted): a loss, which a new process may get past, not a verdict on the card."""


def pin_variables(config: AgentConfig) -> set[str]:
    """The environment variables ``config``'s PIN sources read (env:): kept out of card-session processes."""
    sources = [config.identity.pin, *(inbound.server_key_pin for inbound in config.inbound)]
    return {source.target for source in sources if source is not None and source.kind == "env"}


def _dropped(kind: str, why: str) -> dict[str, Any]:
    """The report sink's message for a report read and dropped (channel.REPORT_DROPPED)."""
    return {"kind": messages.REPORT_DROPPED, "fields": {"kind": kind, "why": why}}


def describe_exit(status: int) -> str:
    """How a process's exit reads in the log: ``was killed by SIGKILL``, ``exited with status 1``."""
    if status < 0:
        return f"was killed by {signal_name(-status)}"
    return f"exited with status {status}"


OnReport = Callable[[str, dict[str, Any]], None]


class _CardSessionProcess(subprocess.Popen):
    """The card-session process ignores SIGTERM (worker._leave_signals_to_the_supervisor: a stop by systemd
    may signal every process of the unit at once, and the supervisor ends it in order). A cancelled
    sign-in (agent/lifecycle/cancel.py) ends the processes of its scope with ``terminate()``:
    here that kills it, as SIGTERM did before, mid-probe or mid-login alike."""

    def terminate(self) -> None:
        self.kill()


def _upgraded_on_disk() -> str | None:
    """The upgrade message when the installed version or build is no longer the one this process
    runs; the files-gone one when nothing is installed any more (the package was removed)."""
    installed, installed_build = agent_version(), agent_build()
    if installed_build is None and RUNNING_BUILD is not None:
        return messages.FILES_GONE
    if installed == RUNNING_VERSION and installed_build == RUNNING_BUILD:
        return None
    return messages.upgraded_message(RUNNING_VERSION, installed, RUNNING_BUILD or "not installed",
                                     installed_build or "not installed")


def ask(channel: socket.socket, message: dict[str, Any] | None, secrets: Sequence[Secret] = (), *,
        limit: int = messages.MAX_MESSAGE) -> dict[str, Any] | None:
    """Send the card-session process ``message`` (and ``secrets``; None: nothing, it has more to
    say) and wait for its answer; an error answer when none comes."""
    channel.settimeout(START_TIMEOUT_SECONDS)
    try:
        if message is not None:
            messages.send(channel, message)
        for secret in secrets:
            messages.send_secret(channel, secret)
        reply, _ = messages.receive(channel, limit)
    except TimeoutError:
        reply = {"type": "error", "message": f"no answer within {START_TIMEOUT_SECONDS} s"}
    except messages.MessageTooLargeError as error:
        reply = {"type": "error", "message": f"its answer is too large: {error}"}
    except OSError as error:  # it died before answering (e.g. a broken installation, or ended by a cancel)
        reply = _answer_before_going(channel, error, limit) or {
            "type": "error", "message": f"it exited ({error.strerror or error}); see the lines above", "died": True}
    channel.settimeout(None)
    return reply


def _answer_before_going(channel: socket.socket, error: OSError, limit: int) -> dict[str, Any] | None:
    """What a process that closed its channel had answered before it went (a refusal to be traced
    is sent, then the process exits at once). The kernel tells of the close first: EPIPE to a send,
    ECONNRESET to the next read when what was sent went unread; the answer is still there to read
    after it, and once the channel is closed reading never waits."""
    if not isinstance(error, (BrokenPipeError, ConnectionResetError)):
        return None
    try:
        reply, descriptors = messages.receive(channel, limit)
    except (OSError, ValueError):  # ValueError: not JSON
        return None
    for descriptor in descriptors:
        os.close(descriptor)
    return reply


class CardSession:
    """One card's process: started at insertion to probe the card (:meth:`open`), then the signed-in
    identity's TLS (:meth:`start`), until :meth:`end`."""

    signed_in: SignedIn  # from start()

    def __init__(self, config: AgentConfig, on_report: OnReport | None = None, *,
                 confirm_final_try: bool = False) -> None:
        self.config = config
        self.confirm_final_try = confirm_final_try
        self.on_report = on_report
        self.process: subprocess.Popen | None = None
        self.channel: socket.socket | None = None
        # A copy of the channel for the lease alone (channel.send_lease), never given a timeout: other
        # threads set one on self.channel while they wait for answers, and a send on a socket with
        # one waits for room, which the card loop renewing the lease must never do.
        self._lease_channel: socket.socket | None = None
        self.directory: Path | None = None  # the session's files (chain, key URI, OpenSSL configuration)
        self.card: Card | None = None  # the token the probe found
        self._status_lock = threading.Lock()
        # Per tunnel, the latest counts the process reported: its final ones once it has ended, or
        # the last `status` answer if it died without a word.
        self.last_counts: dict[str, dict] = {}
        self._recorder: threading.Thread | None = None  # records the reports until all are recorded
        self._backlog = ReportBacklog()  # the reports read and not recorded yet
        # Answers to requests given up on (timed out): the process answers in order, so the next
        # this many answers are theirs and are skipped. Guarded by _status_lock.
        self._owed = 0
        self.last_connection = 0.0  # awake_or_asleep() of its latest connection on a lent listener, as last told
        self._silent_since: float | None = None  # time.monotonic() of the first status question left unanswered
        # What unread_for() last saw: bytes left unread in the channel, and time.monotonic() since when
        # the process has read none of them (stopped, frozen, starved); None before its first call.
        self._unread: tuple[int, float] | None = None
        self._reloading = False  # a reload keeps the process from reading for as long as it takes
        # True from the probe's answer until the PIN is sent or the process is ended: its exit then
        # is a loss the supervisor notices by itself (the PIN dialog is open for it).
        self.awaiting_pin = False

    @property
    def pid(self) -> int | None:
        """The process's pid; None before it starts and once it has ended."""
        return self.process.pid if self.process is not None else None

    def open(self, request: ProbeRequest, module: LoadedModule) -> FoundCard:
        """Start the process, which probes the card (agent/session/probe.py): what the card holds.
        Raises :class:`LoginError` when the card allows no PIN attempt (as a login here would have),
        :class:`CardSessionError` when the card cannot be used; the process is ended then."""
        self.directory = new_session_directory(self.config, module)
        ours, theirs = messages.channel_pair()
        try:
            reports_ours, reports_theirs = messages.channel_pair()
        except OSError:
            ours.close()
            theirs.close()
            raise
        env = {k: v for k, v in os.environ.items() if not k.startswith("CARD_AGENT_")}
        for variable in pin_variables(self.config):
            env.pop(variable, None)  # the child gets PINs once, on its channel, not in its environment
        env["OPENSSL_CONF"] = str(self.directory / OPENSSL_CONF_NAME)
        try:
            self.process = self._spawn(theirs, reports_theirs, env)
        except BaseException:  # no process (descriptors or memory ran out): none of its channels either
            ours.close()
            reports_ours.close()
            raise
        finally:
            theirs.close()
            reports_theirs.close()
        scope = current_scope()
        if scope is not None:  # a pulled card, a lock or a stop ends it at once, mid-probe or mid-login
            scope.ends_with(self.process)
        self.channel = ours  # from here on, end() closes it
        recorder = threading.Thread(target=self._record_reports, name="session-reports-recorder", daemon=True)
        try:
            recorder.start()
            threading.Thread(target=self._read_reports, args=(reports_ours,), name="session-reports",
                             daemon=True).start()
        except RuntimeError:  # no thread to be had (memory): end() must not wait for one never started
            self._backlog.close()  # the recorder, if it started, ends
            reports_ours.close()
            raise
        self._recorder = recorder
        # The version and build first, looked at before anything else (worker.upgraded_under).
        reply = ask(ours, {**request.to_message(), **messages.config_fields(self.config),
                           "version": RUNNING_VERSION, "build": RUNNING_BUILD}, limit=messages.MAX_CARD_MESSAGE)
        if reply is not None and reply.get("type") == "card":
            found = FoundCard.from_message(reply)
            self.card = found.card
            self._refuse_if_traced()  # before a PIN dialog opens for a process that would not get its PIN
            self.awaiting_pin = True
            return found
        if reply is not None and "label" in reply:  # a card that allows no PIN attempt: named all the same
            self.card = Card(reply["label"], reply["serial"])
        killed_by = self._killed_before_answering(reply)
        if killed_by is not None:
            self.end("start failed")
            raise CardSessionLostError(f"the card-session process {describe_exit(killed_by)} while it read the card")
        raise self._refused(reply, "the card could not be read")

    def _spawn(self, channel: socket.socket, reports: socket.socket, env: dict[str, str]) -> _CardSessionProcess:
        try:
            return self._popen(channel, reports, env)
        except FileNotFoundError:
            if os.path.exists(sys.executable):
                raise
            # The interpreter this process was started with is gone: `dpkg -r` (or an uninstall)
            # under the running agent, which has its code in memory but nothing to start a process from.
            raise CardSessionError(messages.FILES_GONE) from None

    def _popen(self, channel: socket.socket, reports: socket.socket, env: dict[str, str]) -> _CardSessionProcess:
        assert self.directory is not None
        # The signals the process leaves to the supervisor stay blocked until it ignores them (worker.py).
        with blocked(SUPERVISORS_SIGNALS):
            return _CardSessionProcess(
                # The supervisor's pid and the session's directory: the process ends, and removes the
                # directory, if the supervisor dies (agent/session/orphan.py). -P: the working directory
                # (the user's home under systemd) is not put on sys.path, so the code and the version it
                # reports are the installed ones.
                [sys.executable, "-P", "-m", "dicom_card_agent.session.worker", str(channel.fileno()),
                 str(reports.fileno()), self.config.log_level, str(os.getpid()), str(self.directory)],
                pass_fds=[channel.fileno(), reports.fileno()], env=env, stdin=subprocess.DEVNULL,
                # No controlling terminal: OpenSSL's UI fallback must never be able to ask for a PIN.
                start_new_session=True,
            )

    def start(self, signed_in: SignedIn, pin: Secret | None) -> None:
        """Hand the process the identity and the PIN (None: PIN pad), which it tries once; wipes ``pin``.

        A login the card refuses raises the same :class:`LoginError` a login here would have."""
        self.awaiting_pin = False
        self.signed_in = signed_in
        node_pins: dict[str, Secret] = {}
        try:
            # Read first: a PIN source that cannot give its PIN is a sign-in error, and nothing is tried yet.
            for inbound in self.config.inbound:
                if inbound.server_key_pin is not None:
                    node_pins[inbound.name] = inbound.server_key_pin.read(f"PIN of the token of inbound {inbound.name}")
            self._start(pin, node_pins)
        finally:
            for secret in [pin, *node_pins.values()]:
                if secret is not None:
                    secret.wipe()

    def _start(self, pin: Secret | None, node_pins: dict[str, Secret]) -> None:
        assert self.channel is not None and self.process is not None
        files = self.signed_in.files
        start = {
            "type": "start", **messages.config_fields(self.config), "chain": str(files.chain), "key": str(files.key),
            "subject": files.subject, "issuer": files.issuer, "tls13_capable": self.signed_in.tls13_capable,
            "key_id": self.signed_in.key_id.hex(), "pin_pad": pin is None,
            "confirm_final_try": self.confirm_final_try or self.signed_in.final_try_confirmed,
            "node_pins": list(node_pins),
        }
        secrets = [secret for secret in [pin, *node_pins.values()] if secret is not None]
        if secrets:
            self._refuse_if_traced()
        # PINs follow as raw messages of their own, sent from their buffers: never in JSON or a str.
        reply = ask(self.channel, start, secrets)
        if reply is not None and reply.get("type") == LOGIN_ACCEPTED:  # the card took the PIN; "ready" or an error next
            login_accepted(self.signed_in)
            reply = ask(self.channel, None)
        if reply is None or reply.get("type") != "ready":
            killed_by = self._killed_before_answering(reply)
            if killed_by is not None:  # a crash, as while it read the card: a new process may get past it
                self.end("start failed")
                raise CardSessionLostError(
                    f"the card-session process {describe_exit(killed_by)} as its session started")
            raise self._refused(reply, "the card-session process could not start")
        self._lease_channel = socket.socket(fileno=os.dup(self.channel.fileno()))
        log.info("card session started (pid %d) for %s", self.process.pid, files.subject)

    def _refuse_if_traced(self) -> None:
        """End the process and raise :class:`CardSessionError` when it is traced (ptrace): whoever
        attached to it in the moment between its start and its ``prctl(PR_SET_DUMPABLE, 0)`` would
        read the PINs (docs/pin-handling.md). The kernel's ``TracerPid`` is read here, where the
        tracer cannot change what is read, as it can in its tracee."""
        assert self.process is not None
        refusal = pin_refusal_for(self.process.pid)
        if refusal is not None:
            self.process.kill()  # a tracer may hold it stopped: it would not answer an end message
            self.end("traced")
            raise CardSessionError(f"{refusal}: the PIN is not sent")

    def _killed_before_answering(self, reply: dict[str, Any] | None) -> int | None:
        """The (negative) exit status of a process that a signal ended without its answer; None
        when it answered, is still running, or exited by itself (e.g. a broken installation)."""
        if self.process is None or (reply is not None and not reply.get("died")):
            return None
        try:
            status = self.process.wait(timeout=EXIT_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            return None
        return status if status < 0 else None

    def _refused(self, reply: dict[str, Any] | None, what: str) -> CardAgentError:
        """End the process; the error its answer says it met, to raise."""
        self.end("start failed")
        if reply is not None and reply.get("type") == "login-error":
            return messages.login_error_from(reply)
        detail = reply.get("message") if reply else "it exited"
        upgraded = _upgraded_on_disk()
        if upgraded is not None and (reply is None or reply.get("died")):
            # Exited without a word: the code of another release may not even start (an import
            # that fails); the installed version tells what the process could not.
            return CardSessionError(upgraded)
        if reply is not None and reply.get("revoked"):
            return CardRevokedError(detail)
        if reply is not None and reply.get("card_in_use"):
            return CardInUseError(detail)
        if reply is not None and reply.get("lost"):  # it took the PIN, then lost the login (worker._lost_at_start)
            return CardSessionLostError(f"{what}: {detail}: {reply['lost']}; the card signs in again")
        if reply is not None and reply.get("plain"):  # a sentence for the clinician (the card could not be read)
            return CardSessionError(detail)
        return CardSessionError(f"{what}: {detail}")

    def _read_reports(self, reports: socket.socket) -> None:
        """What the card-session process reports for the audit trail, read as it comes into its
        backlog (report_backlog.py) until the process ends; :meth:`_record_reports` records it."""
        with reports:
            try:
                while True:
                    # A report that cannot be read is lost to the audit trail as one it cannot record:
                    # the report sink counts it (and logs it, once); only without one is it logged
                    # here. The reader goes on: a record of the channel is whole, so the next report
                    # can be read.
                    size = 0
                    try:
                        message, size = messages.receive_sized(reports, limit=messages.MAX_REPORT)
                    except messages.MessageTooLargeError as error:  # read to its end: the next one is whole
                        message = _dropped(messages.kind_of(error.head), f"too large to be read: {error}")
                    except ValueError as error:  # not JSON (another build; parts of two reports interleaved)
                        message = _dropped("unknown", f"not readable: {error}")
                    except OSError:
                        return
                    if message is None:
                        return
                    if not isinstance(message, dict) or not {"kind", "fields"} <= message.keys():
                        message = _dropped("unknown", "not readable: not a report")
                    self._backlog.put(message, size)
            finally:
                self._backlog.close()

    @property
    def recording(self) -> bool:
        """True while reports it sent are still being recorded (they may outlast the process)."""
        return self._recorder is not None and self._recorder.is_alive()

    def wait_recorded(self, timeout: float) -> int:
        """Wait up to ``timeout`` for the reports read to be recorded (the agent is stopping); the
        number given up then, which are never recorded."""
        if self._recorder is None:
            return 0
        self._recorder.join(timeout)
        return self._backlog.abandon() if self._recorder.is_alive() else 0

    def _record_reports(self) -> None:
        """Record what :meth:`_read_reports` read, in order, until the process has ended and all is recorded."""
        while (message := self._backlog.take()) is not None:
            self._record(message)

    def _record(self, message: dict[str, Any]) -> None:
        if message["kind"] == messages.REPORT_DROPPED and self.on_report is None:
            log.error("card-session process (pid %s): a report (%s) was dropped: %s",
                      self.pid or "?", message["fields"]["kind"], message["fields"]["why"])
            return
        if self.on_report is not None:
            try:
                self.on_report(message["kind"], message["fields"])
            except Exception:  # the audit trail must not end the session's reports
                log.exception("could not record %s", message.get("kind"))

    def status(self) -> dict[str, dict]:
        """Per tunnel: open connections, bytes each way, last error (asked of the card-session process).
        Raises :class:`CardSessionUnresponsive` when it does not answer within :data:`STATUS_TIMEOUT_SECONDS`
        (at once while an earlier question is still unanswered)."""
        if not self._status_lock.acquire(timeout=STATUS_TIMEOUT_SECONDS):
            raise CardSessionUnresponsive(self._unanswered("another question"))
        try:
            channel = self.channel  # end() may let go of it meanwhile, when this answer is slow
            if channel is None:
                return {}
            try:
                if not self._skip_late_answers(channel):  # do not wait again on a process that is stuck
                    raise CardSessionUnresponsive(self._unanswered("an earlier status question"))
                messages.send(channel, {"type": "status"})
                reply = self._take_answer(channel, STATUS_TIMEOUT_SECONDS)
            except TimeoutError:
                if self._owed == 1:  # once per episode
                    log.warning("card session of %s: %s", self.signed_in.files.subject, self._unanswered("status"))
                raise CardSessionUnresponsive(self._unanswered("status")) from None
            except OSError:
                return {}
            self._silent_since = None
            tunnels = reply.get("tunnels", {}) if reply else {}
            self.last_connection = reply.get("last_connection", 0.0) if reply else self.last_connection
            self._keep_counts(tunnels)
            return tunnels
        finally:
            self._status_lock.release()

    def silent_for(self) -> float:
        """Seconds since the first status question the process has left unanswered (0 while it answers)."""
        return 0.0 if self._silent_since is None else time.monotonic() - self._silent_since

    def unread_for(self) -> float:
        """Seconds the process has read nothing of what the supervisor sent it (0 while it reads, or
        while it is busy with a reload). It reads its channel between requests, at least the lease
        once a second; a process that is stopped (SIGSTOP, a frozen cgroup) or starved reads nothing,
        while the bytes left unread can only grow. Judged from the calls made: call it regularly."""
        channel = self._lease_channel
        unread = (unsent_bytes(channel) if channel is not None else None) or 0
        now = time.monotonic()
        if self._unread is None or not unread or unread < self._unread[0] or self._reloading:
            self._unread = (unread, now)  # a first look, or all read, or some: it runs
            return 0.0
        since = self._unread[1]
        self._unread = (unread, since)
        return now - since

    def _unanswered(self, question: str) -> str:
        if self._silent_since is None:
            self._silent_since = time.monotonic()
        return (f"the card-session process (pid {self.pid or '?'}) has not answered "
                f"{question} within {STATUS_TIMEOUT_SECONDS:g} s")

    def _skip_late_answers(self, channel: socket.socket) -> bool:
        """Read, without waiting, the owed answers that came meanwhile; True when none is owed any more."""
        if not self._owed:
            return True
        channel.setblocking(False)
        try:
            while self._owed:
                messages.receive(channel, limit=messages.MAX_ANSWER)
                self._owed -= 1
        except BlockingIOError:
            pass
        finally:
            channel.setblocking(True)
        return not self._owed

    def _take_answer(self, channel: socket.socket, timeout: float) -> dict[str, Any] | None:
        """The answer to the question just asked, after the owed ones (skipped); raises
        :class:`TimeoutError` (and owes one more) when it does not come within ``timeout``."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                channel.settimeout(max(deadline - time.monotonic(), 0.001))
                reply, _ = messages.receive(channel, limit=messages.MAX_ANSWER)
                if self._owed and reply is not None:
                    self._owed -= 1
                    continue
                return reply
        except TimeoutError:
            self._owed += 1
            raise
        finally:
            channel.settimeout(None)

    def _keep_counts(self, tunnels: dict[str, dict]) -> None:
        self.last_counts = {name: counters["counts"] for name, counters in tunnels.items() if "counts" in counters}

    def reconfigure(self, config: AgentConfig) -> dict[str, Any]:
        """Ask the card-session process to serve ``config``'s tunnels (sent to it: it does not read
        the file); its answer: ``{"type": "reloaded", "added": [...], ...}`` or ``{"type":
        "reload-refused", "message": ...}``."""
        with self._status_lock:
            channel = self.channel
            if channel is None:
                return {"type": "reload-refused", "message": "the card session has ended"}
            self._reloading = True
            try:
                messages.send(channel, {"type": "reload", **messages.config_fields(config)})
                reply = self._take_answer(channel, START_TIMEOUT_SECONDS)
            except OSError as error:
                return {"type": "reload-refused", "message": f"the card session did not answer ({error})"}
            finally:
                self._reloading = False
        if reply is None:
            return {"type": "reload-refused", "message": "the card session has ended"}
        if reply.get("type") == "reloaded":
            self.config = config
        return reply

    def dispatch(self, tunnel: str, local: socket.socket, peer: str) -> bool:
        """Hand an accepted local connection to the card-session process; False when there is none."""
        channel = self.channel  # end() may let go of it at any moment
        if channel is None:
            return False
        try:
            messages.send(channel, {"type": "connection", "tunnel": tunnel, "peer": peer}, [local.fileno()])
        except OSError:
            return False
        return True

    def renew_lease(self, seen_at: float) -> bool:
        """Tell the process that the card was in the reader at ``seen_at`` (``awake_or_asleep()`` of
        the look): it admits new associations for channel.LEASE_SECONDS from then. Never waits: a
        process that has not read the last one gets none (channel.send_lease). False when not sent."""
        lease_channel = self._lease_channel
        return lease_channel is not None and messages.send_lease(lease_channel, seen_at)

    def lend_listeners(self, sockets: dict[str, socket.socket]) -> bool:
        """Let the process accept on these tunnels' listening sockets itself (the complete set: it
        lets go of any it held that is not among them); False when it is gone."""
        channel = self.channel
        if channel is None:
            return False
        names = list(sockets)
        try:
            messages.send(channel, {"type": "listen", "tunnels": names}, [sockets[name].fileno() for name in names])
        except OSError:
            return False
        return True

    def end(self, reason: str) -> None:
        """End the process (its relays close at once) and keep its final counts in ``last_counts``.

        All within END_TIMEOUT_SECONDS: a process not ended by then is stuck (in a module call that
        does not return, or stopped) and is killed, so that the card loop ending it goes back to the
        cards and signals instead of waiting out each step's own timeout in turn."""
        self.awaiting_pin = False
        deadline = time.monotonic() + END_TIMEOUT_SECONDS
        answered = False
        unsent: dict[str, int] = {}  # what the process says it could not send before it ended (ReportsDue)
        lease_channel, self._lease_channel = self._lease_channel, None
        if lease_channel is not None:  # no lease once the end is asked for
            lease_channel.close()
        # A `status` under way must not take the final counts as its answer; one that hangs on a
        # stuck process must not hold up the end (the last counts are then those it had).
        locked = self._status_lock.acquire(timeout=END_TIMEOUT_SECONDS)
        try:
            if self.channel is not None:
                try:
                    messages.send(self.channel, {"type": "end", "reason": reason})
                    if locked:
                        reply = self._take_answer(self.channel, max(deadline - time.monotonic(), 0.001))
                        if reply is not None and reply.get("final"):
                            answered = True
                            self._keep_counts(reply.get("tunnels", {}))
                            unsent = {key: int(reply.get(key, 0)) for key in ("unsent_associations", "unsent_reports")}
                except OSError:
                    pass  # it died first, or did not answer in time: the last status answer is what there is
                try:  # a `status` still waiting on it (when the lock was not had) gets its end of stream
                    self.channel.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self.channel.close()
                self.channel = None
        finally:
            if locked:
                self._status_lock.release()
        if self.process is not None:
            # It exits right after its final counts; without them, only what is left of the deadline.
            exit_wait = max(deadline - time.monotonic(), EXIT_WAIT_SECONDS if answered else 0.0)
            try:
                self.process.wait(timeout=exit_wait)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        if self._recorder is not None:
            self._recorder.join(2)  # its last reports (association ends) are recorded before sign-out
        if any(unsent.values()) and self.on_report is not None:
            self.on_report(messages.REPORTS_NOT_SENT, {"associations": unsent["unsent_associations"],
                                                      "others": unsent["unsent_reports"]})
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

