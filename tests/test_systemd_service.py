"""The agent as a systemd service: the unit files, the notify and watchdog protocol against a real
listening NOTIFY_SOCKET, and socket activation with systemd-socket-activate (no systemd as PID 1
needed). Real agent, SoftHSM identity, a real pynetdicom PACS over TLS."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Iterator

import pytest

from agent_runner import card_session_pid, port_of, running_agent, stop_agent, tunnel, wait_for, write_config
from conftest import CARD_AGENT, ProvisionedPki, run_card_agent
from dicom_card_agent.session.supervisor import END_TIMEOUT_SECONDS, STATUS_TIMEOUT_SECONDS
from peers.ports import free_port
from peers.pynetdicom_scp import echo, tls_scp

REPOSITORY = Path(__file__).resolve().parent.parent
UNITS = REPOSITORY / "systemd"
SO_TIMESTAMPNS = 35  # Linux's <asm-generic/socket.h>; the socket module does not name it
WATCHDOG_USEC = 1_000_000  # pings due every 0.5 s: half the interval, as sd_watchdog_enabled(3) advises


def _require(program: str) -> str:
    found = shutil.which(program)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{program} is missing (scripts/setup installs it)")
        pytest.skip(f"{program} is not installed")
    return found


def verify_units(units: list[Path], runtime_dir: Path) -> subprocess.CompletedProcess:
    """`systemd-analyze verify --user`: as root without a user manager it wants an XDG_RUNTIME_DIR."""
    runtime_dir.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir)}
    return subprocess.run([_require("systemd-analyze"), "verify", "--user", *map(str, units)],
                          capture_output=True, text=True, env=env, timeout=60)


def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # The service names /usr/bin/card-agent, which verify wants to exist: this checkout's stands in
    # (the package test verifies the installed unit as it is).
    service = (UNITS / "card-agent.service").read_text()
    assert "ExecStart=/usr/bin/card-agent run\n" in service
    (tmp_path / "card-agent.service").write_text(service.replace("/usr/bin/card-agent", CARD_AGENT))
    shutil.copy(UNITS / "card-agent.socket", tmp_path / "card-agent.socket")
    result = verify_units([tmp_path / "card-agent.service", tmp_path / "card-agent.socket"], tmp_path / "xdg")
    # verify exits 0 on unknown keys and bad values (it only warns): nothing may be said at all.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def unit_settings(unit: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in unit.read_text().splitlines() if "=" in line and line[0] != "#")


def test_a_stop_signals_the_agent_alone_and_leaves_it_the_time_to_end_the_card_session() -> None:
    """systemd signals the main process only (KillMode=mixed), which ends the card session in order:
    with the default, every card-session process got SIGTERM too, and the association it relayed
    was missing from the audit trail (tests/test_stop_signals.py sends both kinds of stop). What is
    left after TimeoutStopSec is killed: the card session's end and the audit hand-over fit in it."""
    settings = unit_settings(UNITS / "card-agent.service")
    assert settings["KillMode"] == "mixed"
    audit_hand_over = 5.0
    assert float(settings["TimeoutStopSec"]) > END_TIMEOUT_SECONDS + 2.0 + audit_hand_over


def test_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported."""
    broken = tmp_path / "card-agent.service"
    broken.write_text((UNITS / "card-agent.service").read_text().replace("/usr/bin/card-agent", CARD_AGENT)
                      .replace("WatchdogSec=", "WatchdogSecs="))
    result = verify_units([broken], tmp_path / "xdg")
    assert "Unknown key 'WatchdogSecs'" in result.stderr


@contextmanager
def notify_socket(directory: Path) -> Iterator[tuple[str, socket.socket]]:
    """A unix datagram socket listening as a service manager's NOTIFY_SOCKET."""
    path = directory / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.bind(str(path))
    try:
        yield str(path), sock
    finally:
        sock.close()


def receive(sock: socket.socket, seconds: float) -> list[tuple[float, str]]:
    """Every message for ``seconds``, with the time it came (time.monotonic()'s clock): the kernel's
    time of arrival, not this process's time of reading, which a loaded host delays (a CI run saw
    1.09 s between two pings the agent sends every 0.5 s)."""
    messages = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(16))
        except TimeoutError:
            break
        messages.append((_arrival(ancillary), data.decode()))
    return messages


def _arrival(ancillary: list[tuple[int, int, bytes]]) -> float:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            seconds, nanoseconds = struct.unpack("qq", data[:16])
            return time.monotonic() - (time.time() - (seconds + nanoseconds / 1e9))
    raise AssertionError("a message without the kernel's time of arrival")


def receive_until(sock: socket.socket, wanted: str, timeout: float = 15.0) -> list[tuple[float, str]]:
    messages: list[tuple[float, str]] = []
    deadline = time.monotonic() + timeout
    while not any(wanted in text for _, text in messages):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {wanted!r} within {timeout} s: {messages}")
        messages += receive(sock, 0.2)
    return messages


def signed_in_subject(log: str) -> str:
    return json.loads(re.search(r'event=sign-in subject=("(?:[^"\\]|\\.)*")', log).group(1))


def pings(messages: list[tuple[float, str]]) -> list[float]:
    return [when for when, text in messages if text == "WATCHDOG=1"]


def test_ready_status_watchdog_and_stopping(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    with tls_scp(pki_dir=test_pki.pki) as pacs, notify_socket(tmp_path) as (path, manager):
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], env=env) as agent:
            started = receive_until(manager, "READY=1")
            subject = signed_in_subject(agent.log())
            assert subject.startswith("CN=Alice Example")
            status = f"STATUS=signed in: {subject} (token 'alice')"
            assert f"READY=1\n{status}" in [text for _, text in started]
            assert echo(agent.port())  # READY=1 meant it: the tunnel serves

            during = receive(manager, 3.0)
            beats = pings(during)
            # Every 0.5 s (the loop turns every 0.05 s): within the 1 s the manager allows.
            assert 5 <= len(beats) <= 7, during
            assert max(b - a for a, b in pairwise(beats)) < WATCHDOG_USEC / 1e6
            assert [text for _, text in during if not text.startswith("WATCHDOG=")] == []  # STATUS only on change

            # Signing out (lock) is told: the status says nobody is signed in, and why.
            run_card_agent("lock", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env(), check=True)
            after_lock = receive_until(manager, "STATUS=nobody signed in")
            state = json.loads(run_card_agent("status", "--json", "--config", tmp_path / "agent" / "agent.toml",
                                              env=test_pki.env(), check=True).stdout)["state"]
            assert f"STATUS=nobody signed in: {state}" in [text for _, text in after_lock]

            agent.process.send_signal(signal.SIGTERM)
            receive_until(manager, "STOPPING=1")
            assert agent.process.wait(15) == 0
    # The card-session process never spoke for the agent: it did not inherit NOTIFY_SOCKET.
    assert "cannot notify" not in agent.log()


def test_the_pings_come_from_the_card_loop_and_a_stuck_card_session_holds_it_only_briefly(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The pings come from the card loop, not from a timer of their own: while the loop waits, no
    ping goes out, and systemd (here allowing 1 s) would restart the agent. The wait here is a real
    one: the card-session process stops answering (SIGSTOP on it, not on the agent) when the loop's
    idle check asks for its counters. That wait is bounded (STATUS_TIMEOUT_SECONDS): the loop then
    turns and pings again although the process is still stopped; it used to wait for good."""
    with tls_scp(pki_dir=test_pki.pki) as pacs, notify_socket(tmp_path) as (path, manager):
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], env=env,
                           agent={"idle_timeout": 2}) as agent:
            receive_until(manager, "READY=1")
            session = card_session_pid(agent.process.pid)
            assert session is not None
            os.kill(session, signal.SIGSTOP)
            try:
                stopped_at = time.monotonic()
                beats = pings(receive(manager, 2.0 + STATUS_TIMEOUT_SECONDS + 2.5))
            finally:
                os.kill(session, signal.SIGCONT)
    assert beats and beats[0] - stopped_at < 1.0, beats  # pinging before the idle check asked
    gaps = [later - earlier for earlier, later in pairwise(beats)]
    # The loop waited for the stopped process: longer than the 1 s the manager allows.
    assert max(gaps) > 1.5, gaps
    # ... and no longer than the bound: it pings on with the process still stopped.
    assert max(gaps) < STATUS_TIMEOUT_SECONDS + 1.0, gaps
    assert beats[-1] - beats[gaps.index(max(gaps)) + 1] > 0.9, beats


def test_socket_activation_with_systemd_socket_activate(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The agent takes the listening socket it was given (matched by its address) instead of binding:
    binding the same address again would fail, so an echo answered through it proves it."""
    activate = _require("systemd-socket-activate")
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        table = tunnel("pacs", pacs.port)
        workdir = tmp_path / "agent"
        workdir.mkdir()
        config = write_config(workdir / "agent.toml", test_pki, [table])
        env = test_pki.env(CARD_PIN="123456")
        # systemd-socket-activate passes on only the variables named with -E.
        passed = [f"-E{name}={env[name]}" for name in ("SOFTHSM2_CONF", "CARD_PIN", "PATH", "HOME") if name in env]
        log_path = workdir / "agent.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen([activate, "-l", table["listen"], *passed, CARD_AGENT, "run", "--config",
                                        str(config)], stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            port = int(table["listen"].rsplit(":", 1)[1])
            deadline = time.monotonic() + 10
            while f"Listening on {table['listen']}" not in log_path.read_text():
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.05)
            # The first connection starts the agent; it waits in the backlog until the agent is ready.
            assert echo(port), log_path.read_text()
            text = log_path.read_text()
            assert f"tunnel pacs: listening on {table['listen']} for 127.0.0.1:{pacs.port}" in text
            assert "cannot listen" not in text
        finally:
            stop_agent(process)


def refused_activation(test_pki: ProvisionedPki, config: Path, listen: str, name: str) -> tuple[int, str]:
    """(exit status, output) of an agent activated with one socket at ``listen`` named ``name``,
    which it is expected to refuse: it starts at the first connection and exits."""
    activate = _require("systemd-socket-activate")
    env = test_pki.env(CARD_PIN="123456")
    passed = [f"-E{key}={env[key]}" for key in ("SOFTHSM2_CONF", "CARD_PIN", "PATH", "HOME") if key in env]
    process = subprocess.Popen([activate, "-l", listen, f"--fdname={name}", *passed, CARD_AGENT, "run", "--config",
                                str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", int(listen.rsplit(":", 1)[1])), timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
                time.sleep(0.05)
        output, _ = process.communicate(timeout=60)
    finally:
        stop_agent(process)
    return process.returncode, output


# systemd's part in socket activation: the socket at descriptor 3, LISTEN_PID the agent's own pid (exec
# keeps it), while systemd keeps its copy of the socket; systemd-socket-activate keeps none.
HOLD_AND_EXEC = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


def start_activated_agent(config: Path, log_path: Path, test_pki: ProvisionedPki, systemds: socket.socket,
                          name: str) -> subprocess.Popen:
    """`card-agent run` given ``systemds`` (a listening socket this process keeps) for the listener ``name``."""
    env = {**test_pki.env(CARD_PIN="123456"), "LISTEN_FDS": "1", "LISTEN_FDNAMES": name}
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-c", HOLD_AND_EXEC, str(systemds.fileno()), CARD_AGENT, "run",
                                 "--config", str(config)], pass_fds=(systemds.fileno(),), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)


def test_the_agent_s_stop_leaves_systemd_s_socket_listening_for_the_next_start(test_pki: ProvisionedPki,
                                                                               tmp_path: Path) -> None:
    """Socket activation keeps a tunnel's port bound while the agent restarts: an association made
    meanwhile waits in systemd's socket for the next start. The agent's stop shuts down the sockets it
    bound itself (refused at once, in the card session's copies too), never systemd's: shut down, it
    would refuse every connection until the socket unit restarts. The second agent serves one made
    while none ran."""
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        activated = tunnel("ct", pacs.port)
        systemds = socket.create_server(("127.0.0.1", port_of(activated)))
        try:
            workdir = tmp_path / "agent"
            workdir.mkdir()
            config = write_config(workdir / "agent.toml", test_pki, [activated])
            first = start_activated_agent(config, workdir / "first.log", test_pki, systemds, "ct")
            try:
                wait_for(lambda: "event=sign-in" in (workdir / "first.log").read_text() or first.poll() is not None,
                         timeout=30)
                assert echo(port_of(activated)), (workdir / "first.log").read_text()
            finally:
                stop_agent(first)
            assert first.returncode == 0, (workdir / "first.log").read_text()
            answered: list[bool] = []
            waiting = threading.Thread(target=lambda: answered.append(echo(port_of(activated))))
            waiting.start()  # no agent runs: its A-ASSOCIATE-RQ waits in systemd's socket
            second = start_activated_agent(config, workdir / "second.log", test_pki, systemds, "ct")
            try:
                waiting.join(60)
                log = (workdir / "second.log").read_text()
            finally:
                stop_agent(second)
            assert answered == [True], log
        finally:
            systemds.close()


def test_a_reload_that_would_let_go_of_an_activated_socket_is_refused(test_pki: ProvisionedPki,
                                                                      tmp_path: Path) -> None:
    """systemd goes on listening on a socket it passed. A reload that removed its tunnel closed the
    agent's copy alone: connections were still taken into systemd's backlog, and the application's
    association waited there for nobody until it gave up. Such a reload is now refused, naming the
    listener. systemd's copy is held by this test's process."""
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        activated, other = tunnel("ct", pacs.port), tunnel("us", pacs.port)
        systemds = socket.create_server(("127.0.0.1", port_of(activated)))
        workdir = tmp_path / "agent"
        workdir.mkdir()
        config = write_config(workdir / "agent.toml", test_pki, [activated, other])
        log_path = workdir / "agent.log"
        process = start_activated_agent(config, log_path, test_pki, systemds, "ct")
        try:
            wait_for(lambda: "INFO: ready: " in log_path.read_text() or process.poll() is not None, timeout=30)
            assert echo(port_of(activated)), log_path.read_text()
            write_config(config, test_pki, [other])
            process.send_signal(signal.SIGHUP)
            refused = "ERROR: SIGHUP: configuration not reloaded, the running one goes on: "
            wait_for(lambda: refused in log_path.read_text() or process.poll() is not None, timeout=20)
            assert echo(port_of(activated)), log_path.read_text()  # the running configuration serves on
            log = log_path.read_text()
        finally:
            stop_agent(process)
            systemds.close()
    assert (refused + f"tunnel 'ct' ({activated['listen']}) would no longer be served, but listens on a socket "
            "systemd passed (socket activation), which systemd keeps listening on: applications connecting there "
            "would wait for nobody; remove it from the socket unit (ListenStream=), then restart the socket unit "
            "and the agent\n") in log, log
    assert "no longer listening" not in log, log


def test_an_activated_socket_no_listener_takes_is_refused(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", free_port())])
    stray = f"127.0.0.1:{free_port()}"
    status, output = refused_activation(test_pki, config, stray, "spare")
    assert status == 2
    assert (f"card-agent: error: activated socket(s) {stray} (spare) match no [[tunnel]] or [[inbound]] listen "
            "address or name: remove them from the socket unit or add the listener to the configuration") in output


def test_notify_reaches_an_abstract_socket_and_takes_its_variables_out_of_the_environment() -> None:
    from dicom_card_agent.service.notify import Notifier

    name = f"card-agent-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)  # for receive()
        manager.bind("\0" + name)
        environ = {"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
        notifier = Notifier(environ, clock=iter([0.0, 0.5, 1.0, 1.5]).__next__)
        assert environ == {}  # a card-session process must not speak for the agent
        notifier.ready("nobody signed in: no card inserted")
        for _ in range(4):
            notifier.watchdog()  # at 0 and 1 s (half of 2 s), not at 0.5 or 1.5
        notifier.status("nobody signed in: no card inserted")  # unchanged: not sent
        notifier.stopping()
        notifier.close()
        texts = [text for _, text in receive(manager, 0.5)]
    assert texts == ["READY=1\nSTATUS=nobody signed in: no card inserted", "WATCHDOG=1", "WATCHDOG=1", "STOPPING=1"]


def test_watchdog_variables_for_another_process_are_ignored() -> None:
    from dicom_card_agent.service.notify import Notifier

    notifier = Notifier({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert (notifier.enabled, notifier.watchdog_interval) == (False, None)


def test_an_activated_socket_named_after_a_listener_must_listen_where_it_does(test_pki: ProvisionedPki,
                                                                              tmp_path: Path) -> None:
    table = tunnel("pacs", free_port())
    config = write_config(tmp_path / "agent.toml", test_pki, [table])
    elsewhere = f"127.0.0.1:{free_port()}"
    status, output = refused_activation(test_pki, config, elsewhere, "pacs")
    assert status == 2
    assert (f"card-agent: error: the activated socket named 'pacs' is bound to {elsewhere}, but listener 'pacs' has "
            f"listen = '{table['listen']}': make the socket unit's ListenStream= and the configuration agree") in output
