"""The agent as an admin runs it: configuration errors, signals, local peers of other users,
resumption that spares the card, and many associations at once."""

from __future__ import annotations

import re
import stat
import subprocess
import textwrap
import threading
from pathlib import Path

import pytest

from agent.dicom.pdu import A_ASSOCIATE_RJ
from agent_runner import (FramedEchoServer, associate_rq, dicom_stream, echoed, p_data, running_agent, s_server, send_and_close, send_concurrently, tunnel, wait_for, write_config)
from conftest import USER_PIN, ProvisionedPki, run_card_agent
from fault_pkcs11 import FaultControl


@pytest.mark.parametrize("change, message", [
    ("listen = \"10.1.2.3:104\"", "is not a loopback address: other machines could then use the clinician's card"),
    ("tls = \"tls10\"", "tls: must be one of bcp195, tls13"),
    ("verify = \"none\"", "there is no mode that verifies nothing"),
    ("verify = \"pin\"", "\"pin\" trusts the server by fingerprint only: give server_pins"),
    ("server_pins = [\"12:34\"]", "is not a SHA-256 fingerprint"),
    ("remote = \"pacs\"", "is not HOST:PORT"),
    ("colour = \"blue\"", "unknown key(s) colour"),
])
def test_bad_configuration_is_named_and_exits_2(test_pki: ProvisionedPki, tmp_path: Path, change: str,
                                                message: str) -> None:
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)])
    key = change.split(" = ")[0]
    lines = [line for line in config.read_text().splitlines() if not line.startswith(f"{key} = ")]
    config.write_text("\n".join(lines) + "\n" + change + "\n")
    result = run_card_agent("run", "--config", config, env=test_pki.env(CARD_PIN=USER_PIN))
    assert result.returncode == 2
    assert "[[tunnel]] 'pacs'" in result.stderr and message in result.stderr, result.stderr


def test_missing_file_and_bad_toml(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    result = run_card_agent("run", "--config", tmp_path / "nope.toml", env=test_pki.env())
    assert result.returncode == 2 and "cannot read configuration" in result.stderr
    (tmp_path / "bad.toml").write_text("[identity\n")
    result = run_card_agent("run", "--config", tmp_path / "bad.toml", env=test_pki.env())
    assert result.returncode == 2 and "not valid TOML" in result.stderr


def test_wrong_pin_is_tried_once_and_the_agent_waits_for_the_card_to_be_reinserted(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    card = FaultControl(tmp_path / "card.ctl")
    card.pin_retries(3)
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 104)], pin="000000",
                       module=str(fault_module), env=card.env()) as agent:
        answer = send_and_close(agent.port(), associate_rq())
        log = agent.wait_for_log("rejected: card present, PIN not accepted")
        send_and_close(agent.port(), associate_rq())
        logins = [line for line in card.log_lines() if line.startswith("C_Login")]
    assert answer[:1] == bytes([A_ASSOCIATE_RJ])
    assert 'event=pin-failure token="alice"' in log and "the card now reports: few PIN tries left" in log
    assert len(logins) == 1  # never retried on its own
    assert "000000" not in log


def test_sigterm_ends_cleanly(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    with running_agent(test_pki, tmp_path, [tunnel("pacs", 104)]) as agent:
        process = agent.process
    assert process.returncode == 0
    assert "card-agent: INFO: stopping" in agent.log()
    assert "card session ending: the agent is stopping" in agent.log()


NOBODY_CLIENT = textwrap.dedent("""
    import socket, sys
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
    s.sendall(bytes.fromhex(sys.argv[2]))
    s.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    sys.stdout.write(data.hex())
""")


def test_local_peer_of_another_user_is_refused(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    with s_server(test_pki, tmp_path, "-naccept", "1") as (port, server_log):
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", port)]) as agent:
            result = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
                 NOBODY_CLIENT, str(agent.port()), associate_rq().hex()],
                capture_output=True, text=True, timeout=30)
            log = agent.wait_for_log("refused local connection from uid 65534")
        assert "ACCEPT" in server_log.read_text(errors="replace") and "Shared ciphers" not in server_log.read_text(errors="replace")
    answer = bytes.fromhex(result.stdout)
    assert answer[:1] == bytes([A_ASSOCIATE_RJ])
    assert "only uid 0 may use this tunnel" in log and " pid " in log




def test_resumed_associations_cost_no_token_signature(test_pki: ProvisionedPki, tmp_path: Path,
                                                      fault_module: Path) -> None:
    card = FaultControl(tmp_path / "card.ctl")
    with s_server(test_pki, tmp_path, "-naccept", "3", "-tls1_3") as (port, _):
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", port)], module=str(fault_module),
                           env=card.env()) as agent:
            signatures = []
            for attempt in range(3):
                send_and_close(agent.port())
                wait_for(lambda: agent.log().count(" to 127.0.0.1:") == attempt + 1)
                signatures.append(card.signatures())
            log = agent.log()
    assert signatures == [1, 1, 1], signatures  # one CertificateVerify, then resumption
    assert log.count("full handshake") == 1 and log.count(" resumed ") == 2


def _card_session_rss_kib(agent_pid: int) -> int:
    """VmRSS of the agent's card-session process (its child running agent.session.worker)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            cmdline = (status.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields["PPid"]) == agent_pid and b"agent.session.worker" in cmdline:
            return int(fields["VmRSS"].split()[0])
    raise AssertionError("no card-session process found")


def test_resumed_associations_do_not_grow_the_card_session(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    # Reading SSLObject.session leaks a copy of the session in Python 3.11 (CPython gh-116810): it
    # grew the card-session process ~6 kB per resumed association, 1.8 MB over these 300.
    server = FramedEchoServer(test_pki)
    try:
        with running_agent(test_pki, tmp_path, [tunnel("echo", server.port)]) as agent:
            request = dicom_stream(b"ping" * 64)
            for _ in range(100):
                assert echoed(send_and_close(agent.port(), request)) == request
            before = _card_session_rss_kib(agent.process.pid)
            for _ in range(300):
                assert echoed(send_and_close(agent.port(), request)) == request
            after = _card_session_rss_kib(agent.process.pid)
            log = agent.wait_for_log("to 127.0.0.1:")
    finally:
        server.close()
    assert log.count("full handshake") == 1 and log.count(" resumed ") == 399
    assert after - before < 600, f"the card-session process grew {after - before} KiB over 300 associations"


def test_sixty_four_concurrent_associations(test_pki: ProvisionedPki, tmp_path: Path) -> None:

    server = FramedEchoServer(test_pki, concurrent=True)
    try:
        with running_agent(test_pki, tmp_path, [tunnel("echo", server.port)]) as agent:
            answers = send_concurrently(agent.port(), [dicom_stream(i.to_bytes(4, "big") * 1000) for i in range(64)])
    finally:
        server.close()
    assert len(answers) == 64
    for index, answer in answers.items():
        assert echoed(answer) == dicom_stream(index.to_bytes(4, "big") * 1000)
    assert len(server.received) == 64


def test_session_resumption_can_be_turned_off(test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    card = FaultControl(tmp_path / "card.ctl")
    with s_server(test_pki, tmp_path, "-naccept", "2", "-tls1_3") as (port, _):
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", port, session_resumption=False)],
                           module=str(fault_module), env=card.env()) as agent:
            for attempt in range(2):
                send_and_close(agent.port())
                wait_for(lambda: agent.log().count(" to 127.0.0.1:") == attempt + 1)
            log = agent.log()
    assert card.signatures() == 2 and log.count("full handshake") == 2


def test_pin_reaches_no_environment_argv_or_file(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 104)],
                       agent={"runtime_dir": str(runtime)}) as agent:
        worker = int(re.search(r"card session started \(pid (\d+)\)", agent.log()).group(1))
        for pid in (agent.process.pid, worker):
            assert USER_PIN.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{worker}/environ").read_bytes()
        assert b"CARD_PIN=" not in environ and USER_PIN.encode() not in environ
        written = [p for p in runtime.rglob("*") if p.is_file()]
        assert {p.name for p in written} == {"chain.pem", "key.pem", "openssl.cnf"}
        assert all(USER_PIN.encode() not in p.read_bytes() for p in written)
        assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    assert USER_PIN not in agent.log()
    assert list(runtime.iterdir()) == []  # the session's files went with the session


def test_a_slow_card_signature_does_not_stall_other_connections(test_pki: ProvisionedPki, tmp_path: Path,
                                                                fault_module: Path) -> None:
    """Connection A is relaying while B's handshake waits 3 s on the card's signature: A finishes first."""
    import socket


    card = FaultControl(tmp_path / "card.ctl")
    server = FramedEchoServer(test_pki, concurrent=True)
    try:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("echo", server.port, session_resumption=False)],
                           module=str(fault_module), env=card.env()) as agent:
            connection_a = socket.create_connection(("127.0.0.1", agent.port()), timeout=30)
            connection_a.sendall(dicom_stream(b"A" * 1000))
            wait_for(lambda: card.signatures() == 1)  # A's handshake is done
            card.sign_delay(3000)
            finished: list[str] = []
            b = threading.Thread(target=lambda: (send_and_close(agent.port(), dicom_stream(b"B")), finished.append("B")))
            b.start()
            wait_for(lambda: any(line.startswith("C_SignInit") for line in card.log_lines()[-3:]))
            connection_a.sendall(p_data(b"A" * 1000))
            connection_a.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := connection_a.recv(65536):
                reply += chunk
            finished.append("A")
            b.join(30)
            connection_a.close()
    finally:
        server.close()
    assert echoed(reply) == dicom_stream(b"A" * 1000) + p_data(b"A" * 1000)
    assert finished == ["A", "B"]
    assert card.signatures() == 2


def test_unix_socket_listener(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    import socket


    directory = tmp_path / "sockets"
    path = directory / "pacs.sock"
    server = FramedEchoServer(test_pki)
    try:
        with running_agent(test_pki, tmp_path / "agent", [{**tunnel("echo", server.port), "listen": f"unix:{path}"}]):
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(path))
                client.sendall(dicom_stream(b"over a unix socket"))
                client.shutdown(socket.SHUT_WR)
                answer = b""
                while chunk := client.recv(4096):
                    answer += chunk
        assert not path.exists()  # removed when the agent stops
    finally:
        server.close()
    assert echoed(answer) == dicom_stream(b"over a unix socket")
