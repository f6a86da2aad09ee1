"""A PACS that vanishes in the middle of an association: its host loses power or its network.

The PACS (storescp, TLS) runs on a second host on this machine, a network namespace behind a veth
link (tests/peers/netns.py); the test unplugs the link, so nothing reaches the PACS and nothing
comes back, with no RST and no ICMP: what a workstation sees when a PACS's host dies. The
application must get an A-ABORT within the tunnel's ``dead_pacs_timeout``, the log must say what
happened, and the agent must go on serving once the PACS is back.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from agent_runner import associate_rq, inbound_listener, p_data, port_of, running_agent, tunnel, wait_for
from conftest import ProvisionedPki, run_card_agent
from dicom_card_agent.dicom.pdu import A_ABORT, A_ASSOCIATE_AC, A_ASSOCIATE_RJ
from peers.dcmtk import storescp, storescu
from peers.netns import separate_host
from peers.pki_files import TlsServerFiles
from peers.ports import free_port, managed_process, wait_for_port
from peers.study import assert_delivered, make_study
from test_inbound import node_identity
from test_metrics import samples, unix_get, value
from test_tunnel_association import receive_pdu

DEAD_AFTER = 3  # seconds: the tunnel's dead_pacs_timeout here (120 by default)


@pytest.mark.parametrize("when", ["the association idles", "a request is on its way"])
def test_a_pacs_that_vanishes_is_given_up_within_dead_pacs_timeout_and_the_application_gets_an_a_abort(
        test_pki: ProvisionedPki, tmp_path: Path, when: str) -> None:
    """Idle, TCP keepalive finds the silence; with a request on its way, unacknowledged data does
    (TCP_USER_TIMEOUT: keepalive does not run while data waits for its acknowledgement). Before
    ``dead_pacs_timeout``, the request's case waited for TCP's retransmissions to give up, 15
    minutes and more (a storescu with no DIMSE timeout, the default, hung all that time)."""
    study = make_study(tmp_path / "study", files=2)
    with ExitStack() as stack:
        host = stack.enter_context(separate_host())
        # --fork: the association the test cuts off stays in its first storescp, which never hears of its end.
        scp = stack.enter_context(storescp(tmp_path / "received", tls=TlsServerFiles.from_pki(test_pki.pki),
                                           prefix=host.prefix, extra_args=["--fork"]))
        pacs = f"{host.address}:{scp.port}"
        metrics = tmp_path / "metrics.sock"
        agent = stack.enter_context(running_agent(
            test_pki, tmp_path / "agent", [tunnel("pacs", scp.port, remote=pacs, dead_pacs_timeout=DEAD_AFTER)],
            metrics={"listen": f"unix:{metrics}"}))
        application = stack.enter_context(socket.create_connection(("127.0.0.1", agent.port()), timeout=60))
        application.sendall(associate_rq())
        assert receive_pdu(application)[0] == A_ASSOCIATE_AC, agent.log()
        host.unplug()
        unplugged = time.monotonic()
        if when == "a request is on its way":
            application.sendall(p_data(bytes(200_000)))
        answer_type, answer = receive_pdu(application)
        answered_after = time.monotonic() - unplugged
        assert application.recv(1) == b"", "the agent closes the connection after its A-ABORT"
        message = (f"from 127.0.0.1:{application.getsockname()[1]}: the PACS at {pacs} stopped answering: nothing "
                   f"came back for {DEAD_AFTER} s (dead_pacs_timeout); the network to it or the PACS is down")
        agent.wait_for_log(message)
        wait_for(lambda: value(samples(unix_get(metrics, "/metrics")), "card_agent_associations_broken_total",
                               listener="pacs", kind="tunnel", reason="pacs_stopped_answering") == 1)
        status = run_card_agent("status", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env()).stdout

        host.plug()  # the PACS is back: the next association works, with no restart
        result = storescu(agent.port(), study)
        assert result.returncode == 0, result.stdout + agent.log()
        received = scp.stored_files()
    assert answer_type == A_ABORT, answer.hex()
    assert "this card session: 1 associations accepted (1 broke off: pacs_stopped_answering 1), " in status, status
    assert DEAD_AFTER - 0.5 < answered_after < DEAD_AFTER + 2.5, f"A-ABORT after {answered_after:.1f} s"
    assert_delivered(study, received)


# The sending PACS of an inbound listener, run in the separate host: mutual TLS to the listener, an
# A-ASSOCIATE-RQ, the answer's PDU type printed once the whole answer is in and the connection idles,
# then silence.
SENDING_PACS = """
import socket, ssl, struct, sys, time
host, port, ca, chain, key, request = sys.argv[1:]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.load_verify_locations(ca)
context.load_cert_chain(chain, key)
with socket.create_connection((host, int(port)), timeout=30) as raw:
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(open(request, "rb").read())
        answer = b""
        while len(answer) < 6 or len(answer) < 6 + struct.unpack(">L", answer[2:6])[0]:
            answer += tls.recv(65536)
        time.sleep(1)  # for our delayed ACK of the answer to reach the listener before the unplug
        print("answered", answer[:1].hex(), "from", tls.getsockname()[1], flush=True)
        time.sleep(600)
"""


def test_a_pacs_that_vanishes_from_an_inbound_listener_is_given_up_within_dead_pacs_timeout(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The same on an inbound listener (the PACS connected to the workstation for a C-MOVE), whose
    connection has its own ``dead_pacs_timeout``: idle, keepalive finds the silence. The listener
    listens on this machine's end of the link, which only the separate host reaches."""
    script, request = tmp_path / "sending_pacs.py", tmp_path / "associate-rq"
    script.write_text(SENDING_PACS)
    request.write_bytes(associate_rq())
    with ExitStack() as stack:
        host = stack.enter_context(separate_host())
        viewer = stack.enter_context(storescp(tmp_path / "viewer", tls=None))
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", **node_identity(test_pki),
                                    listen=f"{host.workstation_address}:{free_port()}", allow_from=[host.address],
                                    dead_pacs_timeout=DEAD_AFTER, client_names=["localhost"])
        agent = stack.enter_context(running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]))
        pacs = stack.enter_context(managed_process(
            [*host.prefix, sys.executable, script, host.workstation_address, str(port_of(listener)),
             test_pki.ca_bundle, test_pki.pki / "server-chain.pem", test_pki.pki / "server.key", request],
            log_path=tmp_path / "sending-pacs.log"))
        answer = pacs.wait_for_log("answered ", timeout=30)
        host.unplug()
        unplugged = time.monotonic()
        pacs_port = answer.split(" from ")[1].split()[0]
        message = (f"inbound retrieves: {host.address}:{pacs_port}: the PACS at {host.address}:{pacs_port} stopped "
                   f"answering: nothing came back for {DEAD_AFTER} s (dead_pacs_timeout); the network to it or the "
                   "PACS is down")
        agent.wait_for_log(message, timeout=DEAD_AFTER + 5)
        given_up_after = time.monotonic() - unplugged
    assert "answered 02" in answer, answer  # A-ASSOCIATE-AC from the viewer, through the listener
    assert given_up_after < DEAD_AFTER + 2.5, f"given up after {given_up_after:.1f} s"


# A PACS that completes mutual TLS, reads the A-ASSOCIATE-RQ and says so, and then never answers it.
ACCEPTING_PACS = """
import socket, ssl, sys, time
port, ca, chain, key = sys.argv[1:]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(chain, key)
context.load_verify_locations(ca)
context.verify_mode = ssl.CERT_REQUIRED
with socket.create_server(("0.0.0.0", int(port))) as server:
    raw, _ = server.accept()
    with context.wrap_socket(raw, server_side=True) as tls:
        print("request", tls.recv(1).hex(), flush=True)
        time.sleep(600)
"""


@pytest.mark.parametrize("fault", ["its host vanishes", "it takes nothing in"])
def test_a_pacs_that_stops_answering_before_it_answers_the_association_is_an_a_associate_rj(
        test_pki: ProvisionedPki, tmp_path: Path, fault: str) -> None:
    """Between the A-ASSOCIATE-RQ and its answer, the PACS's host vanishes, or the PACS stops
    reading while the application sends (its receive window stays closed; docs/dicom.md): the
    application gets A-ASSOCIATE-RJ, rejected-transient (retrying later may work), not an A-ABORT,
    and the log says the PACS stopped answering, not that it refused the card (a TLS 1.3 server
    refuses a client certificate by closing right after the handshake, also before any answer)."""
    script = tmp_path / "accepting_pacs.py"
    script.write_text(ACCEPTING_PACS)
    with ExitStack() as stack:
        host = stack.enter_context(separate_host())
        port = free_port()
        pacs = stack.enter_context(managed_process(
            [*host.prefix, sys.executable, script, str(port), test_pki.ca_bundle, test_pki.pki / "server-chain.pem",
             test_pki.pki / "server.key"], log_path=tmp_path / "accepting-pacs.log"))
        wait_for_port(port, process=pacs)
        agent = stack.enter_context(running_agent(
            test_pki, tmp_path / "agent", [tunnel("pacs", port, remote=f"{host.address}:{port}",
                                                  dead_pacs_timeout=DEAD_AFTER)]))
        application = stack.enter_context(socket.create_connection(("127.0.0.1", agent.port()), timeout=60))
        application.sendall(associate_rq())
        pacs.wait_for_log("request 01", timeout=30)  # PDU type 0x01: the A-ASSOCIATE-RQ reached the PACS
        if fault == "its host vanishes":
            host.unplug()
        else:
            sending = threading.Thread(target=send_until_refused, args=(application, p_data(bytes(32 << 20))))
            sending.start()
        answer_type, answer = receive_pdu(application)
        agent.wait_for_log(f"the PACS at {host.address}:{port} stopped answering: nothing came back for "
                           f"{DEAD_AFTER} s (dead_pacs_timeout); the network to it or the PACS is down")
        log = agent.log()
        if fault == "it takes nothing in":
            sending.join(30)
    assert answer_type == A_ASSOCIATE_RJ, answer.hex()
    assert answer[7] == 2, answer.hex()  # result: rejected-transient
    assert "rejected our certificate" not in log, log


def send_until_refused(sock: socket.socket, data: bytes) -> None:
    """Send ``data`` until it is all gone or the other side closes (the agent, after its answer)."""
    with contextlib.suppress(OSError):
        sock.sendall(data)
