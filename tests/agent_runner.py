"""Run the real `card-agent run` in a subprocess for tests, with a configuration written from dicts."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from conftest import CARD_AGENT, USER_PIN, ProvisionedPki, run_card_agent
from dicom_card_agent.dicom.pdu import (
    AssociateAccept,
    AssociateRequest,
    MaximumLength,
    PduType,
    PresentationContextItemAC,
    PresentationContextItemRQ,
    encode_associate_ac,
    encode_associate_rq,
    parse_associate_rj,
    parse_associate_rq,
)
from peers.ports import free_port

SYSTEM_PYTHON = "/usr/bin/python3"
# What starts every log line outside the journal (agent/logline.py): local time to the millisecond.
LOG_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d ")


def log_lines(log: str) -> list[str]:
    """The lines of an agent's log without their timestamps (lines without one, a traceback's or a
    command's final error, as they are)."""
    return [LOG_TIMESTAMP.sub("", line, count=1) if LOG_TIMESTAMP.match(line) else line
            for line in log.splitlines()]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def _table(name: str, values: dict[str, Any], array: bool = False) -> str:
    """A TOML table; dict values become its sub-tables ([audit.syslog])."""
    header = f"[[{name}]]" if array else f"[{name}]"
    plain = {k: v for k, v in values.items() if not isinstance(v, dict)}
    text = "\n".join([header, *(f"{k} = {_toml_value(v)}" for k, v in plain.items())]) + "\n"
    return text + "".join(_table(f"{name}.{k}", v) for k, v in values.items() if isinstance(v, dict))


def write_config(path: Path, test_pki: ProvisionedPki, tunnels: list[dict[str, Any]], *, token: str = "alice",
                 module: str = "softhsm2", identity: dict[str, Any] | None = None,
                 trust: dict[str, Any] | None = None, agent: dict[str, Any] | None = None,
                 inbound: list[dict[str, Any]] | None = None, audit: dict[str, Any] | None = None,
                 desktop: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> Path:
    identity_table = {"token": token, "module": module, "pin": "env:CARD_PIN", **(identity or {})}
    # Each agent its own revocation cache: an answer cached by one test must not spare another its fetch.
    trust_table = {"ca": test_pki.ca_bundle, "crl": [test_pki.crl],
                   "revocation_cache": str(path.parent / "revocation-cache"), **(trust or {})}
    # Each agent its own runtime directory (control socket, session files): agents of tests that run
    # at the same time, in other checkouts or by other users, must not meet at /tmp/card-agent-UID.
    agent = {"runtime_dir": str(path.parent / "run"), **(agent or {})}
    text = _table("identity", identity_table) + _table("trust", trust_table) + _table("agent", agent)
    text += "".join(_table("tunnel", tunnel, array=True) for tunnel in tunnels)
    text += "".join(_table("inbound", listener, array=True) for listener in inbound or ())
    if audit:
        text += _table("audit", audit)
    if desktop:
        text += _table("desktop", desktop)
    if metrics is not None:
        text += _table("metrics", metrics)
    path.write_text(text)
    return path


def inbound_listener(name: str, forward: str, **extra: Any) -> dict[str, Any]:
    """An [[inbound]] table on a free loopback port, forwarding to ``forward``."""
    return {"name": name, "listen": f"127.0.0.1:{free_port()}", "forward": forward, **extra}


def port_of(table: dict[str, Any]) -> int:
    return int(table["listen"].rsplit(":", 1)[1])


# [identity] token for the tests that switch between the SoftHSM tokens (alice, bob, ...) with one
# stored PIN (env:CARD_PIN): a stored PIN goes to the first card only, unless the configuration
# names the cards it is for (agent/token/pin.py StoredPinUse).
ANY_SOFTHSM_TOKEN = "pkcs11:manufacturer=SoftHSM%20project"


def tunnel(name: str, remote_port: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "listen": f"127.0.0.1:{free_port()}", "remote": f"127.0.0.1:{remote_port}",
            "server_name": "localhost", **extra}


@dataclass
class RunningAgent:
    process: subprocess.Popen
    log_path: Path
    tunnels: list[dict[str, Any]]

    def port(self, name: str | None = None) -> int:
        chosen = next(t for t in self.tunnels if name in (None, t["name"]))
        return int(chosen["listen"].rsplit(":", 1)[1])

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the agent's log:\n{self.log()}")


# A command prefix: the command runs without CAP_SYS_PTRACE, so that even as root it is "another
# process of the same user" to the agent, which may read its memory only if the agent is dumpable.
WITHOUT_PTRACE = ["setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace"]
# Runs the Python script that follows as another local user (uid 65534, nobody): the hostile one.
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON, "-I", "-c"]


VIRTUALENV_PACKAGES = (Path(CARD_AGENT).parent.parent / "lib"
                       / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages")


def with_virtualenv_packages(env: dict[str, str]) -> dict[str, str]:
    """``env`` for the system interpreter to import this virtualenv's packages, in every process it
    starts (the card-session process too): a world-readable directory on PYTHONPATH whose
    sitecustomize puts the virtualenv's site-packages first and reads its .pth files (the editable
    install's import hook is one; PYTHONPATH alone ignores them)."""
    directory = Path(tempfile.gettempdir()) / f"card-agent-system-python-{os.getuid()}"
    directory.mkdir(mode=0o755, exist_ok=True)
    (directory / "sitecustomize.py").write_text(
        f"import site, sys\nsys.path.insert(0, {str(VIRTUALENV_PACKAGES)!r})\n"
        f"site.addsitedir({str(VIRTUALENV_PACKAGES)!r})\n")
    return {**env, "PYTHONPATH": str(directory)}


def start_agent(config: Path, log_path: Path, env: dict[str, str], user: int | None = None,
                stdin: int | None = None, prefix: list[str] | None = None) -> subprocess.Popen:
    """``card-agent run``; as uid ``user`` (and its gid, no supplementary groups) when given, which needs root;
    ``stdin`` a terminal (for pinentry-tty), else /dev/null; ``prefix`` goes before the command (e.g.
    :data:`WITHOUT_PTRACE`).

    Another user cannot run this virtualenv's interpreter when it lives in root's private home (pyenv
    under /root), so that user runs the agent with the system Python 3 of the same minor version and
    the virtualenv's packages on PYTHONPATH."""
    command = [CARD_AGENT, "run", "--config", str(config)]
    if user is not None:
        env = with_virtualenv_packages(env)
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", SYSTEM_PYTHON, "-c",
                   "import sys; from dicom_card_agent.cli.entry import main; sys.exit(main())", *command[1:]]
    command = [*(prefix or []), *command]
    with open(log_path, "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL if stdin is None else stdin, env=env,
                                start_new_session=True)


def stop_process(pid: int, timeout: float = 5.0) -> None:
    """SIGSTOP ``pid`` and wait until every thread of it is stopped: the signal only asks, and a
    thread running (or woken by a connection) as it comes may still accept a connection the test
    means to leave queued."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while True:
        states = set()
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                states.add((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):
                continue  # a thread that ended meanwhile
        if states <= {"T", "t"}:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} not stopped after {timeout:g} s: its threads are {sorted(states)}")
        time.sleep(0.005)


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """``pid`` stopped (SIGSTOP) for the block; continued whatever happens."""
    stop_process(pid)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def refused_at_once(port: int) -> str:
    """An application's association through ``port``: the A-ASSOCIATE-RJ it gets, described."""
    answer = send_and_close(port)
    assert answer[:1] == b"\x03", f"not an A-ASSOCIATE-RJ: {answer[:16]!r}"  # 0x02 would be the PACS's accept
    reject = parse_associate_rj(answer)
    assert (reject.result, reject.source, reject.reason) == (2, 3, 1)  # as with nobody signed in
    return reject.describe()


def stat_fields(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces and parentheses):
    [0] the state (T: stopped), [1] the parent, [3] the session."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def card_session_pid(agent_pid: int) -> int | None:
    """The pid of the agent's card-session process (its child running agent.session.worker), if any."""
    for process in Path("/proc").glob("[0-9]*"):
        try:
            parent = int(stat_fields(process.name)[1])
            cmdline = (process / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if parent == agent_pid and b"agent.session.worker" in cmdline:
            return int(process.name)
    return None


def agent_status(agent_dir: Path, env: dict[str, str]) -> dict:
    """``card-agent status --json`` of the agent whose configuration is ``agent_dir``/agent.toml."""
    return json.loads(run_card_agent("status", "--json", "--config", agent_dir / "agent.toml", env=env,
                                     check=True).stdout)


def stop_agent(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            return process.wait()
    return process.returncode


@contextmanager
def running_agent(test_pki: ProvisionedPki, workdir: Path, tunnels: list[dict[str, Any]], *,
                  pin: str = USER_PIN, env: dict[str, str] | None = None, user: int | None = None,
                  stdin: int | None = None, prefix: list[str] | None = None,
                  **config: Any) -> Iterator[RunningAgent]:
    """The agent with these tunnels, ready; as uid ``user`` if given (see :func:`pki_for_user`), with
    ``stdin`` and ``prefix`` as :func:`start_agent` takes them."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = write_config(workdir / "agent.toml", test_pki, tunnels, **config)
    log_path = workdir / "agent.log"
    process = start_agent(path, log_path, test_pki.env(CARD_PIN=pin, **(env or {})), user, stdin, prefix)
    agent = RunningAgent(process, log_path, tunnels)
    try:
        deadline = time.monotonic() + 30
        while "card-agent: INFO: ready:" not in agent.log():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the agent did not become ready (exit {process.poll()}):\n{agent.log()}")
            time.sleep(0.05)
        yield agent
    finally:
        stop_agent(process)


@dataclass(frozen=True)
class LockedWhileWaiting:
    answer: bytes  # what the waiting application read to its end of stream
    # Seconds from the agent's decision to end the session (not from the `lock` command's start,
    # whose Python takes a second to start on a busy machine) to that end of stream.
    answered_after: float
    closed_in_ms: int  # what the sign-out event says the session's end took
    log: str


def decided_at(log: str, event: str) -> float:
    """The wall-clock time the agent decided a sign-out: the first log line with ``event`` (a
    ``event=sign-out ...``), less how long the session took to close (its ``closed_in_ms``)."""
    line = next(line for line in log.splitlines() if event in line)
    logged_at = datetime.fromisoformat(line.split()[0]).timestamp()
    return logged_at - int(line.split("closed_in_ms=")[1].split()[0]) / 1000


def lock_while_the_application_reads(test_pki: ProvisionedPki, agent: RunningAgent, workdir: Path,
                                     application: socket.socket) -> LockedWhileWaiting:
    """``card-agent lock`` (the agent's configuration in ``workdir``) while ``application``, a
    connection waiting on the agent, reads to its end as its own process would: `lock` returns only
    once the session has ended. Then closes ``application``, as a DICOM application does once
    rejected (PS3.8 7.1.1.7)."""
    lock = threading.Thread(target=run_card_agent, args=("lock", "--config", workdir / "agent.toml"),
                            kwargs={"env": test_pki.env(), "check": True})
    lock.start()
    answer = b""
    while chunk := application.recv(65536):
        answer += chunk
    answered_at = time.time()
    application.close()
    lock.join()
    log = agent.wait_for_log('event=sign-out reason="locked"')
    closed_in_ms = int(log.split('event=sign-out reason="locked"')[1].split("closed_in_ms=")[1].split()[0])
    return LockedWhileWaiting(answer, answered_at - decided_at(log, 'event=sign-out reason="locked"'),
                              closed_in_ms, log)


@contextmanager
def signed_in_through_fault_module(test_pki: ProvisionedPki, workdir: Path, fault_module: Path, card: Any,
                                   **config: Any) -> Iterator[tuple[RunningAgent, int]]:
    """Alice's card in the fault module's reader (``card``, a FaultControl), an agent with one
    tunnel "pacs" to a pynetdicom TLS PACS, signed in and answering a C-ECHO; yields the agent and
    its card-session process's pid."""
    from peers.pynetdicom_scp import echo, tls_scp

    card.show("alice")
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, workdir, [tunnel("pacs", pacs.port)], module=str(fault_module),
                           env=card.env(), **config) as agent:
            agent.wait_for_log('event=sign-in subject="CN=Alice Example')
            worker = card_session_pid(agent.process.pid)
            assert worker is not None and echo(agent.port()), agent.log()
            yield agent, worker


@contextmanager
def pki_for_user(test_pki: ProvisionedPki, user: int) -> Iterator[tuple[ProvisionedPki, Path]]:
    """A copy of the test PKI and tokens owned by uid ``user``, and a work directory of that user, for
    an agent run as that user (pytest's own tmp directories are root's alone); removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix=f"card-agent-{user}-"))
    try:
        copy = base / "pki"
        shutil.copytree(test_pki.directory, copy, symlinks=True)
        conf = copy / test_pki.softhsm_conf.name
        conf.write_text(conf.read_text().replace(str(test_pki.directory), str(copy)))
        (base / "work").mkdir()
        for path in [base, *base.rglob("*")]:
            os.chown(path, user, user, follow_symlinks=False)
        yield ProvisionedPki(copy, conf), base / "work"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def s_server(test_pki: ProvisionedPki, workdir: Path, *args: str, cert: str = "server-chain.pem",
             key: str = "server.key", ca: str = "ca-bundle.pem") -> Iterator[tuple[int, Path]]:
    """openssl s_server requiring a client certificate; files are named inside the test PKI; yields (port, log)."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"s_server-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(test_pki.pki / cert),
             "-key", str(test_pki.pki / key), "-CAfile", str(test_pki.pki / ca), "-Verify", "3",
             "-verify_return_error", *args], stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
            env=test_pki.env())
    try:
        wait_for(lambda: "ACCEPT" in log_path.read_text(errors="replace"))
        yield port, log_path
    finally:
        process.kill()
        process.wait()


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def accept_queue(port: int) -> int:
    """How many connections wait in the accept queue of this machine's TCP listener on ``port``
    (``ss -l``: a listening socket's Recv-Q), 0 once the listener's owner has accepted them all."""
    listing = subprocess.run(["ss", "-tlnH", f"( sport = :{port} )"], capture_output=True, text=True, check=True,
                             timeout=10).stdout.split()
    return int(listing[1])


def keepalive_timers(ss_filter: str, settle: float = 3.0) -> list[str]:
    """The keepalive timer of each established TCP socket of this machine matching ``ss_filter``
    (e.g. ``"( dport = :104 )"``), as the kernel reports it (``ss -o``: "59sec", "119min"; ""
    for a socket without one). A socket with data not yet acknowledged shows its retransmission
    timer instead: asked again for up to ``settle`` seconds until every one is idle."""
    deadline = time.monotonic() + settle
    while True:
        listing = subprocess.run(["ss", "-tnoH", "state", "established", ss_filter], capture_output=True,
                                 text=True, check=True, timeout=10).stdout.splitlines()
        if not any("timer:(on," in line for line in listing) or time.monotonic() > deadline:
            return [match.group(1) if (match := re.search(r"timer:\(keepalive,(\w+),", line)) else ""
                    for line in listing]
        time.sleep(0.05)


def send_and_close(port: int, data: bytes | None = None) -> bytes:
    """Send ``data`` (default: an A-ASSOCIATE-RQ), half-close, and return all that came back."""
    data = associate_rq() if data is None else data
    with socket.create_connection(("127.0.0.1", port), timeout=15) as client:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := client.recv(65536):
            received += chunk
        return received


def send_concurrently(port: int, payloads: list[bytes]) -> dict[int, bytes]:
    """:func:`send_and_close` of every payload at once, each on its own connection; answers by index."""
    answers: dict[int, bytes] = {}

    def one(index: int) -> None:
        answers[index] = send_and_close(port, payloads[index])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return answers


def associate_rq() -> bytes:
    """A minimal A-ASSOCIATE-RQ for Verification, as an application would send it."""
    return encode_associate_rq(AssociateRequest(
        protocol_version=1, called_ae_title="PACS", calling_ae_title="TESTSCU",
        application_context_name="1.2.840.10008.3.1.1.1",
        presentation_contexts=(PresentationContextItemRQ(1, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",)),),
        user_information=(MaximumLength(16384),),
    ))


def p_data(data: bytes, context_id: int = 1, max_fragment: int = 16372) -> bytes:
    """``data`` as P-DATA-TF PDUs, one data-set PDV each (message control header 0x00, 0x02 on the last)."""
    pdus = []
    for offset in range(0, max(len(data), 1), max_fragment):
        piece = data[offset:offset + max_fragment]
        control = 0x02 if offset + max_fragment >= len(data) else 0x00
        pdv = struct.pack(">LBB", len(piece) + 2, context_id, control) + piece
        pdus.append(struct.pack(">BBL", PduType.P_DATA_TF, 0, len(pdv)) + pdv)
    return b"".join(pdus)


def accept_for(request: bytes) -> bytes:
    """The A-ASSOCIATE-AC a PACS sends for the A-ASSOCIATE-RQ at the start of ``request``: every
    presentation context accepted with its first transfer syntax (the agent aborts an association
    whose acceptor sends anything else first, as PS3.8 wants)."""
    length = struct.unpack(">L", request[2:6])[0]
    rq = parse_associate_rq(request[:6 + length])
    return encode_associate_ac(AssociateAccept(
        1, rq.called_ae_title, rq.calling_ae_title, rq.application_context_name,
        tuple(PresentationContextItemAC(pc.context_id, 0, pc.transfer_syntaxes[0]) for pc in rq.presentation_contexts)))


def dicom_stream(payload: bytes) -> bytes:
    """What an application sends first: an A-ASSOCIATE-RQ, then ``payload`` in P-DATA-TF PDUs."""
    return associate_rq() + p_data(payload)


def echoed(answer: bytes) -> bytes:
    """The bytes a :class:`FramedEchoServer` answer carries (its A-ASSOCIATE-AC, PDU and PDV headers removed)."""
    out, offset = bytearray(), 0
    if answer[:1] == bytes([PduType.A_ASSOCIATE_AC]):
        offset = 6 + struct.unpack(">L", answer[2:6])[0]
    while offset < len(answer):
        pdu_type, _, length = struct.unpack(">BBL", answer[offset:offset + 6])
        if pdu_type != PduType.P_DATA_TF:
            raise AssertionError(f"PDU type {pdu_type:#04x} at offset {offset} of the echo")
        out += answer[offset + 12:offset + 6 + length]
        offset += 6 + length
    return bytes(out)


class FramedEchoServer:
    """A TLS server (file key, the PACS certificate) that reads the whole request until the client's
    close_notify, then answers with an A-ASSOCIATE-AC and P-DATA-TF PDUs (one data-set PDV each)
    carrying the same bytes, and closes. :func:`echoed` takes the bytes back out."""

    def __init__(self, test_pki: ProvisionedPki, concurrent: bool = False) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(test_pki.pki / "server-chain.pem", test_pki.pki / "server.key")
        self.context.load_verify_locations(test_pki.ca_bundle)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.concurrent = concurrent
        self.port = self.listener.getsockname()[1]
        self.peer_certificates: list[bytes] = []
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            if self.concurrent:
                threading.Thread(target=self._answer, args=(raw,), daemon=True).start()
            else:
                self._answer(raw)

    def _answer(self, raw: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(raw, server_side=True)
        except OSError:  # a client gone before the handshake (an agent refusing its application's connection)
            raw.close()
            return
        with tls:
            self.peer_certificates.append(tls.getpeercert(binary_form=True))
            data = bytearray()
            while chunk := tls.recv(65536):  # b"" at the client's close_notify: half-close seen
                data += chunk
            self.received.append(bytes(data))
            tls.sendall(accept_for(bytes(data)) + p_data(bytes(data), max_fragment=60000))
            tls.unwrap()

    def close(self) -> None:
        self.listener.close()
