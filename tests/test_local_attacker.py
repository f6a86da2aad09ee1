"""Another local user (uid 65534, run with setpriv) against the clinician's tunnels, with the real
agent on SoftHSM, a real TLS PACS (pynetdicom) and the clinician's application (DCMTK echoscu):

* refused connections in a crowd must not take the places of max_connections;
* a refused connection must not make the clinician's associations wait for the lookup of its pid
  (a scan of every process's descriptors, which that user can make last seconds);
* a tunnel's port taken while the agent restarts is named, with its holder, in the error;
* the other address of `localhost` at a tunnel's port is not theirs to listen on.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from agent_runner import NOBODY, associate_rq, running_agent, start_agent, stop_agent, tunnel, write_config
from conftest import USER_PIN, ProvisionedPki
from dicom_card_agent.dicom.pdu import PduType
from peers.dcmtk import echoscu
from peers.ports import free_port
from peers.pynetdicom_scp import tls_scp

SIGNED_IN = 'event=sign-in subject="CN=Alice Example'

# Keeps COUNT silent connections open (no byte sent), opening a new one as soon as the agent closes
# one, for SECONDS; prints how many it opened in all.
CROWD = textwrap.dedent("""
    import selectors, socket, sys, time
    port, count, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    chosen = selectors.DefaultSelector()
    def opened():
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        chosen.register(sock, selectors.EVENT_READ)
    for _ in range(count):
        opened()
    print("crowding", flush=True)
    end, total = time.monotonic() + seconds, count
    while time.monotonic() < end:
        for key, _ in chosen.select(0.2):
            try:
                data = key.fileobj.recv(4096)
            except OSError:
                data = b""
            if not data:
                chosen.unregister(key.fileobj)
                key.fileobj.close()
                time.sleep(0.01)
                opened()
                total += 1
    print(total, flush=True)
""")

# HOLDERS processes hold as many descriptors as their limit allows (started first: lower pids, which
# a scan of /proc reads first); then a process started after them opens one connection with an
# A-ASSOCIATE-RQ every 1/RATE s, each kept until answered, for SECONDS. Prints "ready" once the
# descriptors are held, then the count of connections answered; the holders end after that.
DESCRIPTOR_HOLDER = textwrap.dedent("""
    import os, resource, selectors, signal, socket, sys, time
    port, holders, seconds, rate, request = (int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]),
                                             float(sys.argv[4]), bytes.fromhex(sys.argv[5]))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    kids, (full_read, full_write) = [], os.pipe()
    for _ in range(holders):
        pid = os.fork()
        if pid == 0:
            fd = os.open("/dev/null", os.O_RDONLY)
            try:
                while True:
                    os.dup(fd)
            except OSError:
                pass
            os.write(full_write, b"x")
            time.sleep(seconds + 30)
            os._exit(0)
        kids.append(pid)
    for _ in kids:
        os.read(full_read, 1)
    print("ready", holders * hard, flush=True)
    connector = os.fork()  # after the holders: a higher pid, which a scan of /proc finds last
    if connector:
        os.waitpid(connector, 0)
        for kid in kids:
            os.kill(kid, signal.SIGKILL)
            os.waitpid(kid, 0)
        sys.exit(0)
    chosen, answered, due, end = selectors.DefaultSelector(), 0, 0.0, time.monotonic() + seconds
    while time.monotonic() < end or (chosen.get_map() and time.monotonic() < end + 10):
        if time.monotonic() < end and time.monotonic() >= due:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(request)
            sock.setblocking(False)
            chosen.register(sock, selectors.EVENT_READ)
            due = time.monotonic() + 1 / rate
        for key, _ in chosen.select(0.02):
            try:
                key.fileobj.recv(100)
            except OSError:
                pass
            chosen.unregister(key.fileobj)
            key.fileobj.close()
            answered += 1
    print(answered, flush=True)
""")

# Listens on the port, as another user would while the agent restarts, until killed.
# Listens on HOST:PORT, where the clinician's applications may send their associations; prints
# "listening", or why it cannot.
SQUATTER = textwrap.dedent("""
    import socket, sys, time
    host, port = sys.argv[1], int(sys.argv[2])
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(16)
    except OSError as error:
        sys.exit(print("cannot listen:", error.strerror, flush=True))
    print("listening", flush=True)
    time.sleep(120)
""")


def as_nobody(script: str, *args: str) -> subprocess.Popen:
    """``script`` run by uid 65534 in a process group of its own (ended by :func:`end`)."""
    return subprocess.Popen([*NOBODY, script, *args], stdout=subprocess.PIPE, text=True, cwd="/",
                            start_new_session=True)


def end(process: subprocess.Popen) -> None:
    """Kill the attacker and whatever it forked (its process group), and make sure none is left."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(10)
    deadline = time.monotonic() + 5
    while _processes_of(65534, process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _processes_of(65534, process.pid), "an attacker process of uid 65534 outlived the test"


def _processes_of(uid: int, group: int) -> list[int]:
    """The processes of ``uid`` in the process group ``group``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            owner = os.stat(f"/proc/{name}").st_uid
        except OSError:
            continue
        if owner == uid and int(fields[2]) == group:
            found.append(int(name))
    return found


def timed_echo(port: int) -> tuple[float, subprocess.CompletedProcess]:
    started = time.monotonic()
    result = echoscu(port, called_ae="PYNETDICOM", timeout=60)
    return time.monotonic() - started, result


def test_another_user_s_crowd_of_connections_does_not_take_the_clinician_s_places(test_pki: ProvisionedPki,
                                                                                tmp_path: Path) -> None:
    """uid 65534 keeps 40 silent connections open, reopening each as soon as it is closed, against a
    tunnel with max_connections = 8: the clinician's echoscu succeeds all along. (The old agent
    counted refusals being answered, 5 s each, against max_connections: every try of the
    clinician's got A-ASSOCIATE-RJ "Temporary Congestion".)"""
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port, max_connections=8)]) as agent:
            agent.wait_for_log(SIGNED_IN)
            attacker = as_nobody(CROWD, str(agent.port()), "40", "8")
            try:
                assert attacker.stdout is not None and attacker.stdout.readline() == "crowding\n"
                agent.wait_for_log("refused local connection from uid 65534")
                echoes = []
                for _ in range(3):
                    time.sleep(1)
                    echoes.append(timed_echo(agent.port()))
                reopened = int(attacker.stdout.readline())
            finally:
                end(attacker)
            log = agent.log()
    failed = [f"{result.stdout}{result.stderr or ''}" for _, result in echoes if result.returncode != 0]
    assert not failed, f"the clinician's C-ECHO failed during the crowd:\n{failed[0]}\n{log}"
    assert reopened > 40, reopened  # the crowd was refused (closed) all along, and came back
    assert "connections in flight (max_connections)" not in log, log  # no place of the allowed users' was taken


def test_a_refused_user_holding_many_descriptors_does_not_delay_the_clinician(test_pki: ProvisionedPki,
                                                                              tmp_path: Path) -> None:
    """uid 65534 holds ~200,000 descriptors in 10 idle processes and connects 5 times a second: each
    refusal made the old agent scan every process's /proc/PID/fd for the refused peer's pid while
    holding the lock every accepting thread shares, and the clinician's C-ECHO took seconds. Now
    the pid is looked up only for the refusal a minute that is logged in full, in a thread of its
    own, for at most 0.5 s: the clinician's associations take what they take on a quiet machine."""
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)]) as agent:
            agent.wait_for_log(SIGNED_IN)
            quiet, result = timed_echo(agent.port())
            assert result.returncode == 0, result.stdout + result.stderr
            attacker = as_nobody(DESCRIPTOR_HOLDER, str(agent.port()), "10", "8", "5", associate_rq().hex())
            try:
                assert attacker.stdout is not None
                ready = attacker.stdout.readline().split()
                assert ready[:1] == ["ready"] and int(ready[1]) > 100_000, ready
                time.sleep(2)  # refusals keep coming
                during = [timed_echo(agent.port()) for _ in range(3)]
                answered = int(attacker.stdout.readline())
            finally:
                end(attacker)
            log = agent.log()
    assert all(result.returncode == 0 for _, result in during), log
    took = [round(seconds, 2) for seconds, _ in during]
    # The old code's took 3.7 to 12.6 s. A loaded machine slows every C-ECHO (1.1 s before the
    # refusals once, with the suite and other tests on the 2 cores): the bound follows the quiet one.
    limit = max(1.5, 3 * quiet)
    assert max(took) < limit, f"the clinician's C-ECHO took {took} s during the refusals (quiet: {quiet:.2f} s)"
    assert answered > 20, answered  # the refusals were answered all along
    assert "refused local connection from uid 65534 pid" in log, log


@pytest.mark.parametrize("taken", ["127.0.0.1", "::1"])
def test_a_port_another_user_took_during_a_restart_is_named_with_its_holder(test_pki: ProvisionedPki,
                                                                            tmp_path: Path, taken: str) -> None:
    """uid 65534 listens on the tunnel's port as the agent starts (as it could during a restart, with
    systemd's RestartSec=2), or on the other address of `localhost` at that port, which applications
    told `localhost` may try first: the agent stops, naming the port's holder (the old message was
    only "Address already in use", while the clinician's applications sent their associations to
    it; on ::1 the agent started and said nothing), and the audit trail gets a Security Alert
    naming that user."""
    audit_file = tmp_path / "audit" / "audit.log"
    port = free_port()
    squatter = as_nobody(SQUATTER, taken, str(port))
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == "listening\n"
        config = write_config(tmp_path / "agent.toml", test_pki,
                              [{**tunnel("pacs", 104), "listen": f"127.0.0.1:{port}"}],
                              audit={"file": str(audit_file)})
        agent = start_agent(config, tmp_path / "agent.log", test_pki.env(CARD_PIN=USER_PIN))
        try:
            agent.wait(30)
        finally:
            stop_agent(agent)
    finally:
        end(squatter)
    log = (tmp_path / "agent.log").read_text()
    assert agent.returncode != 0, log
    cannot = (f"cannot listen on 127.0.0.1:{port}" if taken == "127.0.0.1" else
              f"cannot keep [::1]:{port} from other users (the other address of `localhost` beside 127.0.0.1:{port}, "
              "where the agent listens: applications told `localhost` may try it first)")
    assert (f"{cannot}: it is already in use by uid 65534 (nobody): another user may be waiting for your "
            "applications' associations") in log, log
    alerts = [line for line in audit_file.read_text().splitlines()
              if 'csd-code="110132"' in line and "already in use by uid 65534" in line]
    assert len(alerts) == 1, audit_file.read_text()


@pytest.mark.parametrize("held", ["127.0.0.1", "::1"])
def test_a_reload_that_adds_a_port_another_user_holds_is_refused_and_audited(test_pki: ProvisionedPki,
                                                                            tmp_path: Path, held: str) -> None:
    """A reload (SIGHUP) that adds a tunnel whose port uid 65534 holds, on its address or on the
    other address of `localhost`, is refused, naming the holder, and the audit trail gets a Security
    Alert: that user may be receiving the applications' requests."""
    audit_file = tmp_path / "audit" / "audit.log"
    taken = free_port()
    squatter = as_nobody(SQUATTER, held, str(taken))
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == "listening\n"
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 104)],
                           audit={"file": str(audit_file)}) as agent:
            tunnels = [*agent.tunnels, {**tunnel("more", 104), "listen": f"127.0.0.1:{taken}"}]
            write_config(tmp_path / "agent" / "agent.toml", test_pki, tunnels, audit={"file": str(audit_file)})
            agent.process.send_signal(signal.SIGHUP)
            log = agent.wait_for_log("configuration not reloaded")
            if held == "::1":  # the new tunnel's own address was let go again
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("127.0.0.1", taken), timeout=5)
    finally:
        end(squatter)
    alerts = [line for line in audit_file.read_text().splitlines()
              if 'csd-code="110132"' in line and "already in use by uid 65534" in line]
    cannot = (f"cannot listen on 127.0.0.1:{taken}" if held == "127.0.0.1" else
              f"cannot keep [::1]:{taken} from other users (the other address of `localhost` beside 127.0.0.1:{taken}, "
              "where the agent listens: applications told `localhost` may try it first)")
    assert f"{cannot}: it is already in use by uid 65534 (nobody)" in log, log
    assert len(alerts) == 1, audit_file.read_text()


def connected_as_localhost(port: int) -> socket.socket:
    """The connection an application told `localhost` makes with Python's socket.create_connection on
    Debian or Ubuntu, whose /etc/hosts names ::1 first (this machine's names 127.0.0.1 alone): ::1,
    then 127.0.0.1 when refused."""
    for host in ("::1", "127.0.0.1"):
        try:
            return socket.create_connection((host, port), timeout=10)
        except ConnectionRefusedError:
            continue
    raise AssertionError(f"nothing listens on localhost port {port}")


def test_an_application_told_localhost_reaches_the_tunnel_and_not_another_user(test_pki: ProvisionedPki,
                                                                               tmp_path: Path) -> None:
    """uid 65534 cannot listen on [::1] at the port of a tunnel on 127.0.0.1 (it could, and an
    application told `localhost` sent it its association, in plain text); that application's
    association reaches the PACS through the tunnel (its A-ASSOCIATE-AC comes back)."""
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)]) as agent:
            agent.wait_for_log(SIGNED_IN)
            squatter = as_nobody(SQUATTER, "::1", str(agent.port()))
            try:
                assert squatter.stdout is not None
                assert squatter.stdout.readline() == "cannot listen: Address already in use\n"
            finally:
                end(squatter)
            with connected_as_localhost(agent.port()) as application:
                assert application.getpeername()[:2] == ("127.0.0.1", agent.port())
                application.sendall(associate_rq())
                answer = application.recv(1)
    assert answer == bytes([PduType.A_ASSOCIATE_AC]), answer
