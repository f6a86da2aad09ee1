"""Where the relay's TLS meets the socket, with a real agent and Python TLS servers holding the PACS
certificate: our close_notify made while the PACS is still sending (a half-close), and a record
that arrives whole and alone (or with the PACS's close_notify, which then becomes an A-ABORT for the
application), after which poll shows nothing.

These are what a relay on a non-blocking ``ssl.SSLSocket`` got wrong when it was tried (issue 15,
docs/benchmarks.md "Where the time goes"): ``unwrap()`` there reads the socket and drops the
PACS's data, and data OpenSSL has decrypted but not handed over is invisible to poll."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import pytest

from agent_runner import accept_for, associate_rq, echoed, p_data, running_agent, tunnel
from conftest import ProvisionedPki
from dicom_card_agent.dicom.pdu import A_ABORT

MB = 1024 * 1024


def server_context(test_pki: ProvisionedPki) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(test_pki.pki / "server-chain.pem", test_pki.pki / "server.key")
    context.load_verify_locations(test_pki.ca_bundle)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def read_pdu(tls: ssl.SSLSocket) -> bytes:
    header = b""
    while len(header) < 6:
        header += tls.recv(6 - len(header))
    body = b""
    while len(body) < struct.unpack(">L", header[2:6])[0]:
        body += tls.recv(65536)
    return header + body


class OneConnectionServer:
    """Accepts one TLS connection and runs ``serve`` on it in a thread; what ``serve`` returns is kept."""

    def __init__(self, context: ssl.SSLContext, serve) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.result: object = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(context, serve), daemon=True)
        self.thread.start()

    def _run(self, context: ssl.SSLContext, serve) -> None:
        try:
            raw, _ = self.listener.accept()
            with raw:
                self.result = serve(context, raw)
        except BaseException as error:  # reported by the test
            self.error = error

    def close(self) -> None:
        self.listener.close()
        self.thread.join(15)


def test_pacs_data_in_flight_when_the_application_half_closes_arrives_in_full(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The application half-closes while the PACS is still sending and its data waits in the agent's
    socket: the agent's close_notify goes out and everything the PACS sends, before and after it
    sees that close_notify, reaches the application."""
    answer = p_data(os.urandom(8 * MB), max_fragment=60000)

    def serve(context: ssl.SSLContext, raw: socket.socket) -> bytes:
        with context.wrap_socket(raw, server_side=True) as tls:
            tls.sendall(accept_for(read_pdu(tls)))
            tls.sendall(answer)  # not reading meanwhile: the agent's close_notify comes in the middle
            after = bytearray()
            while chunk := tls.recv(65536):  # b"" only at a close_notify (an error otherwise)
                after += chunk
            tls.unwrap()
            return bytes(after)

    server = OneConnectionServer(server_context(test_pki), serve)
    try:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("stream", server.port)]) as agent:
            with socket.create_connection(("127.0.0.1", agent.port()), timeout=15) as client:
                client.sendall(associate_rq())
                received = bytearray()
                while len(received) < MB and (chunk := client.recv(65536)):
                    received += chunk
                time.sleep(0.5)  # not reading: the PACS's records pile up in the agent's socket meanwhile
                client.shutdown(socket.SHUT_WR)  # the PACS is still sending
                while chunk := client.recv(65536):
                    received += chunk
            log = agent.log()
    finally:
        server.close()
    assert server.error is None, repr(server.error)
    assert server.result == b""  # the close_notify came, after nothing else
    accept = accept_for(associate_rq())
    assert len(received) == len(accept) + len(answer) and echoed(bytes(received)) == echoed(answer)
    assert "WARNING" not in log, log


@pytest.mark.parametrize("close_notify", [False, True], ids=["connection-kept-open", "with-close-notify"])
def test_a_record_decrypted_but_not_yet_handed_over_reaches_the_application(
        test_pki: ProvisionedPki, tmp_path: Path, close_notify: bool) -> None:
    """The PACS sends one full-size TLS record and then nothing more (or only its close_notify, in
    the same segment): once the record has been read from the socket, poll shows nothing more to
    read, so the relay must hand all of its data over at once."""
    pdu = p_data(os.urandom(16384 - 12))  # one P-DATA-TF filling one TLS record (16 KiB of plaintext)
    assert len(pdu) == 16384

    def serve(context: ssl.SSLContext, raw: socket.socket) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_side=True)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                incoming.write(raw.recv(65536))
        raw.sendall(outgoing.read())
        request = b""
        while len(request) < len(associate_rq()):
            try:
                request += tls.read(65536)
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())  # TLS 1.3 session tickets
                incoming.write(raw.recv(65536))
        tls.write(accept_for(request))
        raw.sendall(outgoing.read())  # the A-ASSOCIATE-AC first, in a record and a segment of its own
        tls.write(pdu)
        if close_notify:
            try:
                tls.unwrap()
            except ssl.SSLWantReadError:
                pass
        raw.sendall(outgoing.read())  # one send: one segment on loopback
        raw.settimeout(15)
        while raw.recv(65536):  # until the agent closes
            pass

    server = OneConnectionServer(server_context(test_pki), serve)
    try:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("one-record", server.port)]) as agent:
            with socket.create_connection(("127.0.0.1", agent.port()), timeout=5) as client:
                client.sendall(associate_rq())
                received = b""
                expected = accept_for(associate_rq()) + pdu
                if close_notify:
                    # The PACS's close_notify ended an accepted association: after its data the
                    # application gets an A-ABORT (DICOM UL service-provider, reason-not-specified:
                    # PS3.8 9.3.8), then the FIN, and the warning is in the log by then.
                    expected += bytes([A_ABORT, 0, 0, 0, 0, 4, 0, 0, 2, 0])
                while len(received) < len(expected) and (chunk := client.recv(65536)):
                    received += chunk
                assert received == expected
                if close_notify:
                    assert client.recv(65536) == b""
                    assert "in the middle of the association, without A-RELEASE or A-ABORT" in agent.log()
    finally:
        server.close()
    assert server.error is None, repr(server.error)
