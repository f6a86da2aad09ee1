"""``card-agent run [--config FILE]``: the agent in the foreground (systemd-friendly)."""

from __future__ import annotations

import logging
import os
import resource
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer

from dicom_card_agent.cli.options import ConfigFile
from dicom_card_agent.config.locate import locate_config
from dicom_card_agent.config.model import load_config
from dicom_card_agent.config.preflight import open_crls, prepare_pin_sources
from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.service.activation import ActivatedSockets
from dicom_card_agent.service.heartbeat import Heartbeat, service_status
from dicom_card_agent.service.notify import Notifier
from dicom_card_agent.service.signals import (
    IGNORED_SIGNALS,
    STOP_SIGNALS,
    SUSPEND_SIGNAL,
    EarlyRequests,
    SignalActions,
    StopRequest,
)
from dicom_card_agent.session.audit import AuditRecorder
from dicom_card_agent.session.control_server import ControlServer
from dicom_card_agent.session.identity import remove_leftover_session_files
from dicom_card_agent.session.manager import SessionManager
from dicom_card_agent.session.reload import Reloader
from dicom_card_agent.token.secret import make_non_dumpable, trace_refusal
from dicom_card_agent.tunnel.server import Listeners

if TYPE_CHECKING:
    from dicom_card_agent.service.metrics import Metrics

log = logging.getLogger("agent")

RELOAD_END_SECONDS = 5.0  # for a reload under way at the stop to finish, once the card session has ended


def run(
    config: ConfigFile = None,
    confirm_final_try: Annotated[bool, typer.Option(
        "--confirm-final-try", help="Allow the sign-in when the card reports its final PIN try.")] = False,
) -> None:
    """Serve the tunnels with the identity of the card in the reader, until SIGTERM, SIGINT or SIGQUIT."""
    # First: no same-user process may read this one's memory (/proc/PID/mem, ptrace), no core dump.
    make_non_dumpable()
    _refuse_if_traced()  # before any PIN source is prepared (an env: PIN is taken at start-up)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    notifier = Notifier()  # first: the card-session processes must not inherit NOTIFY_SOCKET
    signals = SignalActions()
    # Until the reloader is there, a SIGHUP waits for it (the default action, death, would also cost
    # the audit trail its Application Stop); one that came before this point was held (blocked) by
    # the executable's entry point (agent/cli/entry.py) and is taken now, as the mask lets it through.
    reloads = EarlyRequests()
    stop_request = StopRequest()
    stop = stop_request.flag
    signals.on(signal.SIGHUP, _reload_or_hang_up(reloads, stop_request))
    # The ignored ones were held (blocked) from the entry point on too: one that came meanwhile is logged now.
    for signum in IGNORED_SIGNALS:
        signals.on(signum, _ignore(signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP, *IGNORED_SIGNALS})  # before any child inherits the mask
    activated = ActivatedSockets.from_environment()
    settings = load_config(locate_config(config))
    logging.getLogger().setLevel(settings.log_level.upper())
    crls = open_crls(settings)
    prepare_pin_sources(settings)
    for signum in STOP_SIGNALS:
        signals.on(signum, _stop_by(signum, stop_request))

    audit = AuditRecorder(settings.audit)
    manager = SessionManager(settings, confirm_final_try=confirm_final_try, audit=audit)
    signals.on(SUSPEND_SIGNAL, _lock_then_suspend(manager))
    manager.heartbeat = Heartbeat(notifier, manager)
    try:  # a port another user holds is named, and recorded as a Security Alert, before the error ends the agent
        listeners = Listeners(settings, activated, audit=audit)
    except BaseException:
        audit.close()
        raise
    control_server: ControlServer | None = None
    metrics: Metrics | None = None
    reloader: Reloader | None = None
    failure: BaseException | None = None
    try:
        control_server = ControlServer(settings, manager, crls)
        for leftover in remove_leftover_session_files(settings):  # this agent owns the runtime directory now
            log.warning("removed %s: the files of a card session whose agent ended without removing them", leftover)
        if settings.metrics is not None:
            # Imported only now, after prepare_pin_sources took env: PINs out of the environment:
            # prometheus_client imports wsgiref, whose handlers module copies the whole environment
            # into a dict at import (tests/test_pin_memory.py found the PIN there).
            from dicom_card_agent.service.metrics import Metrics
            metrics = Metrics(settings.metrics, settings, manager)
        listeners.manager = manager
        manager.listeners = listeners
        audit.application_start()
        # `status` and `lock` answer while the start waits for an unattended sign-in (a slow card, a
        # PIN file's card that takes its time): that wait may last up to a minute.
        control_server.start()
        manager.start(stop)
        listeners.start()
        if metrics is not None:
            metrics.start()
        reloader = Reloader(settings, manager, listeners, control_server, audit)
        reloader.start(stop)
        if reloads.hand_to(reloader.request):
            log.info("SIGHUP came while the agent started: the configuration is read again now")
        who = manager.session.signed_in.files.subject if manager.session else f"nobody yet ({manager.state})"
        inbound = f", {len(settings.inbound)} inbound listener(s)" if settings.inbound else ""
        log.info("ready: %d tunnel(s)%s for %s", len(settings.tunnels), inbound, who)
        notifier.ready(service_status(manager))
        manager.run(stop)
        log.info("stopping")
        notifier.stopping()
    except BaseException as error:
        failure = error
        raise
    finally:
        listeners.close()
        # The card's sessions end first: nothing a local client does to the servers below (a
        # connection left open, a slow read) may keep the card session relaying after the stop.
        manager.shutdown()
        if reloader is not None:  # a reload under way ends now (the card session is gone): its line and
            reloader.join(RELOAD_END_SECONDS)  # audit record come before the stop's, not lost at the exit
        if metrics is not None:
            metrics.close()
        if control_server is not None:
            control_server.close()
        _record_stop(audit, stop_request, failure)
        audit.close()


def _stop_by(signum: signal.Signals, stop: StopRequest) -> Callable[[], None]:
    return lambda: stop.request(signum.name)


def _lock_then_suspend(manager: SessionManager) -> Callable[[], None]:
    """SIGTSTP's action, in a thread of its own (ending a session may take seconds, and a stop must
    not wait behind it): the signed-in session locked, then the agent suspended as SIGTSTP's default
    action would. Suspended, the agent saw no card pulled, and the card-session process, which no
    terminal suspends, relayed the open associations on: a clinician who pressed Ctrl-Z, pulled her
    card and left, left them to the next person at the workstation."""
    def suspend() -> None:
        subject = manager.lock_before_suspend()
        if subject is not None:
            log.warning("SIGTSTP (Ctrl-Z): the session of %s is locked before the agent is suspended: suspended, "
                        "it would not see the card pulled. Bring it back (fg), then remove and re-insert the card "
                        "to sign in again", subject)
        os.kill(os.getpid(), signal.SIGSTOP)
    return lambda: threading.Thread(target=suspend, name="suspend", daemon=True).start()


def _ignore(signum: signal.Signals) -> Callable[[], None]:
    def act() -> None:
        log.warning("%s ignored: it means nothing to card-agent (SIGHUP reloads its configuration; SIGTERM, "
                    "SIGINT and SIGQUIT stop it)", signum.name)
    return act


def _reload_or_hang_up(reloads: EarlyRequests, stop: StopRequest) -> Callable[[], None]:
    """SIGHUP's action: the configuration read again, unless the terminal the agent was started from
    (its standard input) has been closed, which sends SIGHUP too: then the agent stops, as the
    programs of that terminal do. One that went on could no longer ask for a PIN there nor show
    what it logs, and the clinician who closed the window would find it still signed in."""
    started_on_a_terminal = os.isatty(0)

    def act() -> None:
        if started_on_a_terminal and not os.isatty(0):  # a terminal hung up is no terminal any more
            if not stop.flag.is_set():  # the kernel's SIGHUP and the shell's: one line
                log.info("SIGHUP: the terminal the agent was started from was closed: stopping")
            stop.request("SIGHUP: the terminal it was started from was closed")
            return
        reloads.request()
    return act


def _refuse_if_traced() -> None:
    """A process of the agent's user that attached (ptrace) between this process's start and its
    prctl(PR_SET_DUMPABLE, 0) stays attached: it would read every PIN that passes through here."""
    traced = trace_refusal()
    if traced is not None:
        raise CardAgentError(
            f"the agent does not start: {traced} (a debugger or another process of the agent's user attached "
            "as it started); no PIN is read. Stop that process, or run the agent without a debugger "
            "(docs/troubleshooting.md)")


def _record_stop(audit: AuditRecorder, stop: StopRequest, failure: BaseException | None) -> None:
    """Application Stop: a success only when asked to stop (SIGTERM, SIGINT, SIGQUIT, the hang-up of
    its terminal), described by what asked; a stop by an error is a major failure (PS3.15: the
    reporting application is now unavailable), with the error."""
    if failure is None and stop.flag.is_set():
        audit.application_stop(stop.cause)
        return
    reason = (f"stopped by an error: {str(failure) or type(failure).__name__}" if failure is not None
              else "the card loop ended unexpectedly")
    audit.application_stop(reason, failed=True)
