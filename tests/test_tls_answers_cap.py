"""A PACS that makes the agent answer at the TLS level (a TLS 1.3 KeyUpdate asking for one back)
and never reads: what waits to go to it is capped, as every other relay buffer is.

The hostile PACS asks for KeyUpdates through ctypes into libssl (SSL_key_update): Python's ssl
cannot send one, and this fault is what such a peer does. The real agent on SoftHSM."""

from __future__ import annotations

import ctypes
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

from agent_runner import accept_for, associate_rq, card_session_pid, running_agent, tunnel
from conftest import ProvisionedPki

ATTACK_SECONDS = 40


def _ssl_pointer(obj: ssl.SSLObject) -> int:
    """The ``SSL *`` of a CPython 3.11 ``_ssl._SSLSocket``: after PyObject_HEAD and its socket field."""
    return ctypes.c_void_p.from_address(id(obj._sslobj) + 24).value  # type: ignore[attr-defined]


def _rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


class KeyUpdatingPacs:
    """Accepts the association, then sends KeyUpdate(update_requested) records (and a byte of a
    P-DATA-TF after every 16: OpenSSL allows 32 in a row) without reading: ``blocked_after`` is set
    to the seconds after which its sends could no longer go (the agent stopped reading it)."""

    def __init__(self, test_pki: ProvisionedPki) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(test_pki.pki / "server-chain.pem", test_pki.pki / "server.key")
        self.context.load_verify_locations(test_pki.ca_bundle)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.context.num_tickets = 0
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.blocked_after: float | None = None
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            connection, _ = self.listener.accept()
            with connection:
                self._attack(connection)
        except BaseException as error:  # reported by the test
            self.error = error

    def _attack(self, connection: socket.socket) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.context.wrap_bio(incoming, outgoing, server_side=True)
        connection.settimeout(20)
        while True:
            try:
                tls.do_handshake()
                connection.sendall(outgoing.read())
                break
            except ssl.SSLWantReadError:
                connection.sendall(outgoing.read())
                incoming.write(connection.recv(65536))
        request = b""
        while len(request) < 6 or len(request) < 6 + int.from_bytes(request[2:6], "big"):
            try:
                request += tls.read(65536)
            except ssl.SSLWantReadError:
                incoming.write(connection.recv(65536))
        tls.write(accept_for(request))
        connection.sendall(outgoing.read())
        pdv = b"\x00" * 2000
        stream = (b"\x04\x00" + struct.pack(">I", len(pdv) + 6) + struct.pack(">I", len(pdv) + 2) + b"\x01\x00"
                  + pdv) * 1000
        libssl = ctypes.CDLL("libssl.so.3")
        libssl.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
        pointer = _ssl_pointer(tls)
        connection.settimeout(3)
        started, position = time.monotonic(), 0
        while not self.stop.is_set() and time.monotonic() - started < ATTACK_SECONDS:
            for _ in range(16):
                libssl.SSL_key_update(pointer, 1)
                tls.do_handshake()  # the KeyUpdate, into the outgoing BIO
            tls.write(stream[position:position + 1])
            position += 1
            try:
                connection.sendall(outgoing.read())
            except TimeoutError:
                self.blocked_after = time.monotonic() - started
                return

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        self.thread.join(ATTACK_SECONDS + 10)


def test_a_pacs_that_provokes_tls_answers_and_never_reads_is_no_longer_read(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """A reviewer's KeyUpdate flood grew the card-session process by 1.25 MB a second (55 to 195 MB
    in 113 s) until dead_pacs_timeout: the relay read the PACS as long as the application kept up,
    and queued the answers without limit. It stops reading the PACS once 1 MiB of answers waits."""
    pacs = KeyUpdatingPacs(test_pki)
    try:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)]) as agent:
            agent.wait_for_log('event=sign-in subject="CN=Alice Example')
            session = card_session_pid(agent.process.pid)
            assert session is not None
            with socket.create_connection(("127.0.0.1", agent.port())) as application:
                application.sendall(associate_rq())
                application.settimeout(30)
                assert application.recv(1)[:1] == b"\x02"  # A-ASSOCIATE-AC
                before = _rss_kb(session)
                application.settimeout(0.2)
                deadline = time.monotonic() + ATTACK_SECONDS + 5
                while pacs.thread.is_alive() and time.monotonic() < deadline:
                    try:
                        application.recv(1 << 20)  # the application keeps up with what it is sent
                    except TimeoutError:
                        pass
                grown = _rss_kb(session) - before
    finally:
        pacs.close()
    assert pacs.error is None, repr(pacs.error)
    assert pacs.blocked_after is not None, f"the agent read the PACS for {ATTACK_SECONDS} s; it grew by {grown} kB"
    assert grown < 20_000, grown
