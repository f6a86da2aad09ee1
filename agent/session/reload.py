"""SIGHUP: read the configuration file again and put it into effect (docs/configuration.md, "Reloading").

A configuration with errors, or one that changes what only a restart can change, is refused with
one log line and an audit Security Alert (Software Configuration, minor failure); the old one goes
on. Otherwise new listeners are opened first (a port that is taken refuses the whole reload), the
card session is brought up to date (agent/session/manager.py ``reconfigure``), then listeners no
longer configured are closed; the change is logged and audited (Software Configuration, success).
Whatever the file says, a SIGHUP also makes the control socket and the unix listeners again if
their files were removed (agent/tunnel/server.py ``keep_socket_files``; they look every few seconds anyway).
An error no check anticipated (a bug) costs that one reload: logged with its traceback and audited
as a minor failure too, so that the audit trail has every reload that did not take effect.
"""

from __future__ import annotations

import logging
import threading

from dicom_card_agent.config.model import AgentConfig, InboundConfig, TunnelConfig, load_config
from dicom_card_agent.config.preflight import crls_after_reload, prepare_pin_sources
from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.session.audit import AuditRecorder
from dicom_card_agent.session.control_server import ControlServer
from dicom_card_agent.session.manager import SessionManager
from dicom_card_agent.tunnel.server import Listeners

log = logging.getLogger("agent")

REFUSED = "SIGHUP: configuration not reloaded, the running one goes on: {reason}"


class ReloadRefusedError(CardAgentError):
    """The new configuration changes what only a restart can change."""


def restart_only_changes(old: AgentConfig, new: AgentConfig) -> list[str]:
    """What ``new`` changes that the running agent cannot take: each says why."""
    reasons = []
    if old.identity != new.identity:
        reasons.append("[identity] changed (the PKCS#11 module is loaded and the card chosen once, at start)")
    if old.audit != new.audit:
        reasons.append("[audit] changed (the audit trail is opened at start)")
    if old.desktop != new.desktop:
        reasons.append("[desktop] changed (the notifications and the PIN dialog are set up at start)")
    if old.metrics != new.metrics:
        reasons.append("[metrics] changed (the metrics endpoint is opened at start)")
    if old.runtime_dir != new.runtime_dir:
        reasons.append("[agent] runtime_dir changed (status and lock find the running agent there)")
    return reasons


def describe(old: AgentConfig, new: AgentConfig) -> str:
    """The listeners added, removed and changed, for the log and the audit message."""
    old_listeners: list[TunnelConfig | InboundConfig] = [*old.tunnels, *old.inbound]
    new_listeners: list[TunnelConfig | InboundConfig] = [*new.tunnels, *new.inbound]
    before = {listener.name: listener for listener in old_listeners}
    after = {listener.name: listener for listener in new_listeners}
    parts = [f"{what} {', '.join(names)}" for what, names in (
        ("added", [name for name in after if name not in before]),
        ("removed", [name for name in before if name not in after]),
        ("changed", [name for name in after if name in before and before[name] != after[name]])) if names]
    settings = [key for key in ("trust", "log_level", "idle_timeout") if getattr(old, key) != getattr(new, key)]
    parts += [f"{', '.join(settings)} changed"] if settings else []
    return "; ".join(parts) or "nothing changed"


class Reloader:
    """Reloads in a thread of its own: the signal handler only asks (it may run at any moment)."""

    def __init__(self, settings: AgentConfig, manager: SessionManager, listeners: Listeners,
                 control_server: ControlServer, audit: AuditRecorder) -> None:
        self.settings = settings
        self.manager = manager
        self.listeners = listeners
        self.control_server = control_server
        control_server.listeners = listeners  # `status` tells of a unix listener's socket file not made again
        self.audit = audit
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None

    def request(self) -> None:
        """Reload soon (SIGHUP, acted on in the signals thread: agent/service/signals.py)."""
        self._wanted.set()

    def start(self, stop: threading.Event) -> None:
        self._thread = threading.Thread(target=self._loop, args=(stop,), name="reload", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the reload under way, if any, once ``stop`` (of :meth:`start`) is set."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if self._wanted.wait(0.2) and not stop.is_set():
                self._wanted.clear()
                try:
                    self.reload()
                except Exception as error:  # a bug must cost one reload, not every later one
                    self._failed(error)

    def keep_socket_files(self) -> None:
        """An administrator's SIGHUP after the runtime directory was removed: the socket files lost
        are made again now, not at the next periodic look (logged by their owners either way)."""
        self.control_server.check_socket_file()
        self.listeners.keep_socket_files()

    def _failed(self, error: Exception) -> None:
        """A reload that ended in an error no check anticipated (a bug): logged with its traceback,
        and audited like any reload that did not take effect (Software Configuration, minor failure)."""
        message = (f"SIGHUP: reloading the configuration {self.settings.source} failed: internal error "
                   f"({type(error).__name__}: {error}); the agent goes on")
        log.error("%s", message, exc_info=error)
        try:
            self._ended(message, applied=False)
        except Exception:  # the audit trail's own failures are its to report; this thread must go on
            log.exception("SIGHUP: the failed reload could not be recorded in the audit trail")

    def reload(self) -> None:
        source = self.settings.source
        try:
            new = load_config(source)
            refused = restart_only_changes(self.settings, new)
            if refused:
                raise ReloadRefusedError(f"{source}: " + "; ".join(refused) + ": restart the agent for it to take "
                                         "effect")
            prepare_pin_sources(new)
            crls = crls_after_reload(new, self.settings, self.control_server.crls)
            commit = self.listeners.prepare(new)
        except CardAgentError as error:
            self.keep_socket_files()  # a refused configuration is no reason to leave them lost
            message = REFUSED.format(reason=error)
            log.error("%s", message)
            self._ended(message, applied=False)
            return
        what = describe(self.settings, new)
        logging.getLogger().setLevel(new.log_level.upper())
        session = self.manager.reconfigure(new)
        if not commit():  # the stop came while the card session was brought up to date
            log.info("SIGHUP: configuration %s not put into effect: the agent is stopping", source)
            return
        self.keep_socket_files()
        self.control_server.config, self.control_server.crls = new, crls
        self.settings = new
        message = f"SIGHUP: configuration {source} reloaded: {what}; {session}"
        log.info("%s", message)
        self._ended(message, applied=True)

    def _ended(self, message: str, *, applied: bool) -> None:
        """Every reload's outcome, with its log line: for `status` first (a refused edit is otherwise
        told in the log alone, and `systemctl reload` reports success either way), then the audit
        trail, whose own failure must not hide it from `status`."""
        self.control_server.reload_ended(message, applied=applied)
        self.audit.configuration_changed(message, applied=applied)
