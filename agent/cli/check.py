"""``card-agent check [--config FILE]``: is a configuration ready to run on this machine? Checked
without starting the agent, for configuration management to run before it rolls a file out.

It uses what ``run`` and ``doctor`` use (agent/config/preflight.py, agent/cli/doctor.py, the
listeners' own socket code), so that each thing is checked one way. No card is needed: whether a
card signs in is ``doctor``'s question.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import typer

from dicom_card_agent.audit.sinks import check_file_directory
from dicom_card_agent.audit.spool import check_spool_directory
from dicom_card_agent.audit.trail import FREE_INODES_RESERVE, FREE_SPACE_RESERVE, short_of_space
from dicom_card_agent.cli.doctor import Check, platform_checks, report
from dicom_card_agent.cli.options import ConfigFile
from dicom_card_agent.config.locate import locate_config
from dicom_card_agent.config.model import AgentConfig, InboundConfig, ListenAddress, TunnelConfig, load_config
from dicom_card_agent.config.preflight import open_crl_files, pin_sources, refuse_unsafe, tunnel_and_listener_files
from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.session import control
from dicom_card_agent.session.runtime_dir import is_private_runtime_directory, runtime_directories
from dicom_card_agent.tls.failures import connect_failure
from dicom_card_agent.token.pin import PinSource
from dicom_card_agent.trust.anchors import TrustAnchors, load_certificates
from dicom_card_agent.tunnel.connecting import connect_tcp
from dicom_card_agent.tunnel.localhost_guard import hold_other_address
from dicom_card_agent.tunnel.peer import (
    NonLoopbackListenError,
    PortInUseError,
    SocketInUseError,
    SocketPathError,
    UnreachableSocketError,
    UnsafeSocketDirectoryError,
    create_tcp_listener,
    create_unix_listener,
    identify_server,
    is_address_of_this_machine,
)
from dicom_card_agent.tunnel.session_end import SessionEnd

EXIT_PROBLEMS = 2


def check(config: ConfigFile = None) -> None:
    """Check a configuration and what it needs here (module, pkcs11-provider, trust files and CRLs,
    free listen ports, PIN source, each PACS found and accepting TCP, [metrics], audit paths) without starting:
    exit 0 when all is well, 2 otherwise."""
    failed = report(configuration_checks(config))
    raise typer.Exit(EXIT_PROBLEMS if failed else 0)


def configuration_checks(explicit: Path | None) -> Iterator[Check]:
    try:
        path = locate_config(explicit)
        settings = load_config(path)
    except CardAgentError as error:
        yield Check("fail", "config", str(error), "correct what the message names, then run `card-agent check` again")
        return
    yield Check("ok", "config", f"{path}: {len(settings.tunnels)} tunnel(s), {len(settings.inbound)} inbound "
                                f"listener(s)")
    checks, _ = platform_checks(settings.identity.module, "[identity] module")
    yield from checks
    yield from _trust_checks(settings)
    yield from _pin_checks(settings)
    running = _running_agents(settings)
    default_place = runtime_directories(settings)[0]
    for listener in settings.listeners:
        yield _listen_check(listener, running, default_place)
    for tunnel in settings.tunnels:
        yield _remote_check(tunnel)
    yield from _metrics_checks(settings, running)
    yield from _audit_checks(settings)
    yield from _audit_reserve_checks(settings)


def _trust_checks(settings: AgentConfig) -> Iterator[Check]:
    trust = settings.trust
    try:
        anchors = TrustAnchors.load(trust.ca)
        yield Check("ok", "trust", f"{trust.ca}: {len(anchors.roots)} root and {len(anchors.intermediates)} "
                                   "intermediate CA certificate(s)")
    except CardAgentError as error:
        yield Check("fail", "trust", str(error), "give [trust] ca a readable PEM bundle holding the PACS's root CA")
    try:
        refuse_unsafe(tunnel_and_listener_files(settings))
    except CardAgentError as error:
        yield Check("fail", "trust", str(error), "give the file to root or the agent's user, writable by neither "
                                                 "group nor others")
    if not trust.crl:
        return
    try:
        store = open_crl_files(settings)
    except CardAgentError as error:
        yield Check("fail", "crl", str(error), "give [trust] crl files holding only CRLs (PEM or DER)")
        return
    for crl in store.status():
        expired = [entry["issuer"] for entry in crl["crls"] if entry["expired"]]
        if expired and trust.crl_expired == "refuse":
            yield Check("fail", "crl", f"{crl['file']}: the CRL of {', '.join(expired)} has expired: certificates "
                                       "it covers are refused", "install a current CRL (or crl_expired = \"warn\")")
        else:
            yield Check("ok", "crl", f"{crl['file']}: {len(crl['crls'])} CRL(s)"
                                     + (f", expired (accepted: crl_expired = \"warn\"): {', '.join(expired)}"
                                        if expired else ""))
    for listener in settings.inbound:
        for certificate in filter(None, [listener.server_certificate]):
            try:
                load_certificates(certificate)
                yield Check("ok", f"inbound {listener.name}", f"server certificate {certificate} readable")
            except CardAgentError as error:
                yield Check("fail", f"inbound {listener.name}", str(error), "give a readable PEM certificate chain")


def _pin_checks(settings: AgentConfig) -> Iterator[Check]:
    """The PIN sources as ``run`` prepares them (run this as the agent's user, with its environment)."""
    for where, source in pin_sources(settings):
        try:
            source.prepare()
        except CardAgentError as error:
            yield Check("fail", "pin", f"{where}: {error}", _PIN_FIXES.get(source.kind, ""))
            continue
        yield Check("ok", "pin", f"{where}: {_describe_pin_source(source)}")


_PIN_FIXES = {
    "env": "set the variable in the agent's environment (systemd: Environment= or EnvironmentFile=)",
    "file": "make the PIN file the agent's user's own, mode 0600",
    "pinentry": "install a pinentry package, or give its full path",
}


def _describe_pin_source(source: PinSource) -> str:
    return {
        "env": f"the variable {source.target} is set",
        "file": f"{source.target} is the agent's user's own and private",
        "pinentry": f"the program {source.target} is there",
        "prompt": "asked on the agent's terminal (a service has none: use pinentry there)",
        "protected": "entered on the reader's PIN pad",
    }.get(source.kind, str(source))


@dataclass(frozen=True)
class RunningAgents:
    """The agents of this user that answer on a control socket where an agent of this configuration
    would have one: whichever environment it was started in (XDG_RUNTIME_DIR set or not), ``check``
    run on a workstation whose agent runs finds it, and does not take its ports for another program's."""

    listening: dict[str, Path] = field(default_factory=dict)  # listen address -> control socket of ours
    others: list[str] = field(default_factory=list)  # "SOCKET: why" of agents of another configuration
    ours: list[Path] = field(default_factory=list)  # control sockets of agents of this configuration
    one_place: bool = False  # [agent] runtime_dir is set: no other environment's agent to think of


def _running_agents(settings: AgentConfig) -> RunningAgents:
    running = RunningAgents(one_place=settings.runtime_dir is not None)
    for directory in runtime_directories(settings):
        socket_path = directory / control.SOCKET_NAME
        if not (is_private_runtime_directory(directory) and socket_path.is_socket()):
            continue  # looked at, never created: `check` leaves nothing behind
        try:
            answer = control.request(settings, "status", socket_path)
        except control.NoAgentError:
            continue  # left by an agent that was killed
        except CardAgentError as error:  # an agent answered: it runs another configuration
            running.others.append(f"{socket_path}: {error}")
            continue
        running.ours.append(socket_path)
        for listener in [*answer.get("tunnels", []), *answer.get("inbound", [])]:
            running.listening.setdefault(listener["listen"], socket_path)
    return running


def _listen_check(listener: TunnelConfig | InboundConfig, running: RunningAgents, default_place: Path) -> Check:
    kind = "tunnel" if isinstance(listener, TunnelConfig) else "inbound"
    name, listen = f"listen {listener.name}", listener.listen
    control_socket = running.listening.get(str(listen))
    if control_socket is not None:
        # Named when it is not where `status` run in this environment asks: the way to reach that agent.
        where = "" if control_socket.parent == default_place else f" (its control socket: {control_socket})"
        return Check("ok", name, f"{listen}: the running agent of this configuration listens there{where}")
    try:  # the listeners' own code: bound and closed at once
        if listen.unix_path:
            uids = (listener.allowed_uids or (os.getuid(),)) if isinstance(listener, TunnelConfig) else ()
            sock = create_unix_listener(listen.unix_path, reachable_by=uids)
            sock.close()
            os.unlink(listen.unix_path)
        else:
            assert listen.host is not None and listen.port is not None
            with create_tcp_listener(listen.host, listen.port, unsafe_listen=True) as sock:
                guard = hold_other_address(sock) if isinstance(listener, TunnelConfig) else None
                if guard is not None:
                    guard.close()
    except (CardAgentError, OSError) as error:
        return _listen_failed(f"{kind} {listener.name}: {error}", name, error, running)
    if listen.host is not None and not is_address_of_this_machine(listen.host):
        return Check("warn", name, f"{kind} {listener.name}: {listen.host} is not an address of this workstation "
                                   "now; the agent listens on it anyway, connections arrive once the network "
                                   "brings it up", "check the address if this workstation's network is up")
    return Check("ok", name, f"{listen} is free")


def _listen_failed(problem: str, name: str, error: Exception, running: RunningAgents) -> Check:
    """A listen address that cannot be had: taken (another process listens there), or refused for
    another reason, whose fix is not to stop what listens there."""
    if isinstance(error, (PortInUseError, SocketInUseError)):
        return _listen_taken(problem, name, running)
    return Check("fail", name, problem, _LISTEN_FIXES.get(type(error), _OTHER_LISTEN_FIX))


# The messages of these say what to do with the path they name; the fix line says it in general.
_LISTEN_FIXES: dict[type, str] = {
    UnsafeSocketDirectoryError: "make the socket's directory the agent's user's own with mode 0700, as the message "
                                "says, or choose another socket path",
    SocketPathError: "remove that file, or choose another socket path",
    UnreachableSocketError: "put the socket in a directory every allowed user can pass through, or listen on "
                            "loopback TCP",
}
_OTHER_LISTEN_FIX = "correct what the message names, or choose another listen address"


def _listen_taken(problem: str, name: str, running: RunningAgents) -> Check:
    """The listen address cannot be had: say which agents of this user run, one of which may hold it."""
    if running.others:
        return Check("fail", name, f"{problem}; an agent of this user answers on {'; on '.join(running.others)}",
                     "if that agent holds the address, stop it or give one of the two configurations another "
                     "listen address")
    fix = "stop what listens there (`ss -ltnp`) or choose another listen address"
    if not running.one_place:
        fix += ("; if it is this configuration's agent, started with another XDG_RUNTIME_DIR, run `card-agent "
                "check` with that one, or set [agent] runtime_dir")
    return Check("fail", name, problem, fix)


def _metrics_checks(settings: AgentConfig, running: RunningAgents) -> Iterator[Check]:
    """[metrics] as ``run`` sets it up: its listener opened by the same code (and closed at once),
    its textfile's directory judged as the writer judges it when a write fails."""
    metrics = settings.metrics
    if metrics is None:
        return
    # Imported here, as `run` imports it: prometheus_client copies the environment at import.
    from dicom_card_agent.service.metrics import open_listener, textfile_problem

    if metrics.listen is not None:
        listen = metrics.listen
        try:
            for sock in open_listener(listen):
                if sock is not None:
                    sock.close()
            if listen.unix_path:
                os.unlink(listen.unix_path)
        except NonLoopbackListenError as error:
            yield Check("fail", "metrics listen", f"[metrics].listen: {error}",
                        "listen on 127.0.0.1:PORT or unix:/PATH, or use textfile")
        except (CardAgentError, OSError) as error:
            if running.ours and not running.others and _card_agent_metrics_answer(listen):
                yield Check("ok", "metrics listen", f"{listen}: the running agent of this configuration serves "
                                                    "its metrics there")
            else:
                yield _listen_failed(f"[metrics].listen: {error}", "metrics listen", error, running)
        else:
            yield Check("ok", "metrics listen", f"{listen} is free")
    if metrics.textfile is not None:
        problem = textfile_problem(metrics.textfile)
        if problem is not None:
            yield Check("fail", "metrics textfile", problem,
                        "create the directory (node_exporter's textfile directory, e.g. /var/lib/prometheus/"
                        "node-exporter) writable by the agent's user, or choose another textfile")
        else:
            yield Check("ok", "metrics textfile", f"{metrics.textfile}: its directory is writable")


def _card_agent_metrics_answer(listen: ListenAddress) -> bool:
    """Whether a card agent of this user serves metrics at ``listen``, which is taken: the running
    agent of this configuration, unless another program of this user has it."""
    try:
        if listen.unix_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(listen.unix_path)
        else:
            assert listen.host is not None and listen.port is not None
            sock = socket.create_connection((listen.host, listen.port), timeout=5)
        with sock:
            if identify_server(sock).uid != os.getuid():
                return False
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            answer = sock.makefile("rb").read(4_000_000)
    except (CardAgentError, OSError):
        return False
    return answer.startswith((b"HTTP/1.0 200 ", b"HTTP/1.1 200 ")) and b"\ncard_agent_build_info{" in answer


def _remote_check(tunnel: TunnelConfig) -> Check:
    """Whether the tunnel's PACS is found and accepts TCP from here, the way an association connects
    (names through DNS, within connect_timeout). Its TLS needs the card: the first association's."""
    name = f"remote {tunnel.name}"
    try:
        sock = connect_tcp(tunnel.remote_host, tunnel.remote_port, tunnel.connect_timeout, SessionEnd())
    except OSError as error:
        failure = connect_failure(tunnel.remote, error, tunnel.connect_timeout)
        # A name this machine cannot resolve is a setting to fix; a PACS not answering may be down for now.
        return Check("fail" if isinstance(error, socket.gaierror) else "warn", name,
                     f"tunnel {tunnel.name}: {failure.message}")
    with sock:
        host, port = sock.getpeername()[:2]
    reached = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return Check("ok", name, f"{tunnel.remote} accepts TCP connections (at {reached})")


def _audit_checks(settings: AgentConfig) -> Iterator[Check]:
    audit = settings.audit
    if audit is None:
        return
    # The checks ``run`` makes when it opens the audit trail (agent/audit/directories.py).
    for what, path, directory, check_owner in (("audit file", audit.file, False, check_file_directory),
                                                ("audit spool", audit.spool, True, check_spool_directory)):
        if path is not None:
            try:
                check_owner(path)
            except CardAgentError as error:
                yield Check("fail", what, str(error), "give the directory to the agent's user (or root), writable "
                                                      "by neither group nor others, as the message says")
                continue
            yield _writable(what, path, directory)
    if audit.syslog is not None:
        try:
            load_certificates(audit.syslog.ca)
            yield Check("ok", "audit repository", f"{audit.syslog.address}, CA {audit.syslog.ca} readable")
        except CardAgentError as error:
            yield Check("fail", "audit repository", str(error), "give [audit.syslog] ca a readable PEM bundle")


def _audit_reserve_checks(settings: AgentConfig) -> Iterator[Check]:
    """Whether the file systems of the audit file and spool keep the reserve the audit trail keeps
    under ``on_failure = "refuse"`` (agent/audit/trail.py): short of it, the agent refuses every
    association from its start, so that is a failure; under "continue" a warning (events are lost
    once the file system is full). Judged by the trail's own test, on the directory that holds the
    sink (or the nearest one there is: the agent creates the rest on the same file system)."""
    audit = settings.audit
    if audit is None:
        return
    refuse = audit.on_failure == "refuse"
    reserve = f"{FREE_SPACE_RESERVE // 1024} KiB and {FREE_INODES_RESERVE} inodes"
    for what, directory in (("audit file", audit.file.parent if audit.file is not None else None),
                            ("audit spool", audit.spool)):
        if directory is None:
            continue
        existing = directory
        while not existing.is_dir() and existing != existing.parent:
            existing = existing.parent
        short = short_of_space(existing)
        name = f"{what} reserve"
        if not short:
            if refuse:
                stats = os.statvfs(existing)
                yield Check("ok", name, f"{stats.f_bavail * stats.f_frsize // 1024} KiB free on the file system of "
                                        f"{existing}: the audit trail's reserve of {reserve} is free")
            continue
        fix = (f"free space on that file system or move the {what} to another one: at least {reserve} must "
               "stay free")
        if refuse:
            yield Check("fail", name, f"{short}: with [audit] on_failure = \"refuse\" the agent refuses every "
                                      "association (A-ASSOCIATE-RJ) while the reserve is not free", fix)
        else:
            yield Check("warn", name, f"{short}: audit events will be lost once it is full "
                                      "(on_failure = \"continue\")", fix)


def _writable(what: str, path: Path, directory: bool) -> Check:
    """``path`` (a file, or a ``directory``) can be written by this user, or created where it would be."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == path and directory != path.is_dir():
        return Check("fail", what, f"{path} is not a {'directory' if directory else 'file'}",
                     "point the key at a " + ("directory" if directory else "file"))
    if existing != path and not existing.is_dir():
        return Check("fail", what, f"{path} cannot be created: {existing} is not a directory",
                     "choose a path in a directory")
    if not os.access(existing, os.W_OK | (os.X_OK if existing.is_dir() else 0)):
        return Check("fail", what, f"{path}: {existing} is not writable by uid {os.getuid()}",
                     f"create {path} for the agent's user (`install -d -o USER ...`) or choose a writable path")
    return Check("ok", what, f"{path} " + ("writable" if existing == path else f"can be created (in {existing})"))
