"""Which TLS session a tunnel keeps for the next association (TunnelRuntime.remember_session).

The connections of the first tests are stand-ins with the two attributes remember_session reads: a PACS that
accepts each TLS 1.3 ticket only once could not be made from the test peers (OpenSSL's s_server
and Python's ssl resume a ticket as often as it is offered), and that is the fault this covers.
Reading ``.session`` is counted, as each read leaks a copy in Python 3.11 (CPython gh-116810).
The last tests make real TLS connections to a TLS 1.3 server in this process.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

import pytest

from dicom_card_agent.config.model import ListenAddress, TunnelConfig
from dicom_card_agent.tunnel.relay import TunnelRuntime, _handshake, _Tls
from peers.pki_files import TlsServerFiles
from peers.ports import LOOPBACK


@dataclass
class FakeSession:
    time: float = field(default_factory=time.time)
    timeout: int = 7200


class Connection:
    def __init__(self, reused: bool) -> None:
        self.session_reused = reused
        self.new_session = FakeSession()
        self.reads = 0

    @property
    def session(self) -> FakeSession:
        self.reads += 1
        return self.new_session


def runtime() -> TunnelRuntime:
    config = TunnelConfig(name="pacs", listen=ListenAddress("127.0.0.1", 11112), remote_host="127.0.0.1",
                          remote_port=2762, server_name="pacs")
    return TunnelRuntime(config=config, context=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), checks=None,  # type: ignore[arg-type]
                         identity=None, trust_ca="")  # type: ignore[arg-type]


def remember(tunnel: TunnelRuntime, reused: bool) -> Connection:
    connection = Connection(reused)
    tunnel.remember_session(connection)  # type: ignore[arg-type]
    return connection


def test_a_resumed_connection_keeps_the_session_of_the_full_handshake_without_reading_its_own() -> None:
    tunnel = runtime()
    full = remember(tunnel, reused=False)
    resumed = [remember(tunnel, reused=True) for _ in range(50)]
    assert full.reads == 1 and sum(c.reads for c in resumed) == 0
    assert tunnel.resumable_session() is full.new_session


def test_an_expired_ticket_is_replaced_by_the_next_full_handshake() -> None:
    tunnel = runtime()
    remember(tunnel, reused=False)
    for _ in range(3):
        remember(tunnel, reused=True)
    refused = remember(tunnel, reused=False)
    assert refused.reads == 1 and tunnel.resumable_session() is refused.new_session
    assert sum(remember(tunnel, reused=True).reads for _ in range(5)) == 0


def test_a_pacs_taking_each_ticket_once_gets_the_newest_ticket_every_time() -> None:
    tunnel = runtime()
    remember(tunnel, reused=False)
    remember(tunnel, reused=True)
    remember(tunnel, reused=False)  # the same ticket refused on its second use, well within its lifetime
    following = remember(tunnel, reused=True)
    assert following.reads == 1 and tunnel.resumable_session() is following.new_session


def test_a_ticket_refused_after_its_lifetime_is_no_sign_of_single_use_tickets() -> None:
    tunnel = runtime()
    first = remember(tunnel, reused=False)
    first.new_session.time -= 7300  # older than its 7200 s lifetime when the PACS refuses it
    remember(tunnel, reused=True)
    remember(tunnel, reused=False)
    assert remember(tunnel, reused=True).reads == 0


def test_a_ticket_refused_after_the_clock_was_set_back_is_no_sign_of_single_use_tickets() -> None:
    tunnel = runtime()
    first = remember(tunnel, reused=False)
    first.new_session.time += 86400  # the clock was set back a day: the session seems made tomorrow
    remember(tunnel, reused=True)
    remember(tunnel, reused=False)  # OpenSSL offers no ticket whose age is negative
    assert remember(tunnel, reused=True).reads == 0


def test_forgetting_leaves_nothing_to_resume() -> None:
    tunnel = runtime()
    remember(tunnel, reused=False)
    tunnel.forget_sessions()
    assert tunnel.resumable_session() is None


# -- the TLS object made ahead (TunnelRuntime.prepare_tls), against a real TLS server -----------

class CountingContext(ssl.SSLContext):
    """A real client context that counts the TLS objects made from it (instrumentation, no fake)."""

    made = 0

    def wrap_bio(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.made += 1
        return super().wrap_bio(*args, **kwargs)


@pytest.fixture
def tls_server(test_pki):  # type: ignore[no-untyped-def]
    """A TLS 1.3 server (Python's ssl: it resumes a ticket as often as it is offered) serving
    handshakes until the test ends; its port."""
    context = TlsServerFiles.from_pki(test_pki.pki).ssl_context(require_client_cert=False)
    listener = socket.create_server((LOOPBACK, 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with contextlib.suppress(OSError), context.wrap_socket(connection, server_side=True) as tls:
                tls.settimeout(5)
                tls.sendall(b"x")
                tls.recv(1)  # until the client closes
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    listener.close()


def tls_runtime(test_pki, session_resumption: bool = True) -> tuple[TunnelRuntime, CountingContext]:  # type: ignore[no-untyped-def]
    context = CountingContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=test_pki.ca_bundle)
    config = TunnelConfig(name="pacs", listen=ListenAddress(LOOPBACK, 11112), remote_host=LOOPBACK,
                          remote_port=2762, server_name="localhost", session_resumption=session_resumption)
    return TunnelRuntime(config=config, context=context, checks=None,  # type: ignore[arg-type]
                         identity=None, trust_ca=""), context  # type: ignore[arg-type]


def associate(tunnel: TunnelRuntime, port: int, tls: _Tls | None = None) -> _Tls:
    """A connection's TLS as handle_outbound does it (its own object unless ``tls`` is given),
    then its session remembered and the next connection's TLS object made."""
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        if tls is None:
            tls = _handshake(tunnel, sock)
        else:
            tls.handshake(sock, 5, None, tunnel.ending)
        sock.settimeout(5)  # the handshake leaves it non-blocking, for the relay's poll
        while True:  # the server's byte, behind its tickets: as the relay reads them before the session is kept
            try:
                assert tls.obj.read(1) == b"x"
                break
            except ssl.SSLWantReadError:
                tls.incoming.write(sock.recv(4096))
        tunnel.remember_session(tls.obj)
    tunnel.prepare_tls()
    return tls


def test_the_next_connection_finds_its_tls_object_made_with_the_session_to_resume(test_pki, tls_server) -> None:  # type: ignore[no-untyped-def]
    tunnel, context = tls_runtime(test_pki)
    first = associate(tunnel, tls_server)
    assert not first.obj.session_reused and context.made == 2  # its own, and the next one's, offering its session
    second = associate(tunnel, tls_server)
    assert second.obj.session_reused
    made = context.made
    assert made == 3  # the next one's only: the second connection took the one made for it
    third = tunnel.tls_for_connection()
    assert context.made == made, "the third connection made its TLS object on its own path"
    assert third.offered_session is tunnel.resumable_session()
    associate(tunnel, tls_server, third)
    assert third.obj.session_reused


def test_an_object_made_for_a_session_since_replaced_is_not_offered(test_pki, tls_server) -> None:  # type: ignore[no-untyped-def]
    tunnel, context = tls_runtime(test_pki)
    associate(tunnel, tls_server)
    tunnel.prepare_tls()
    made_ahead_for = tunnel.resumable_session()
    # A full handshake (as after a refused ticket): its session replaces the one kept.
    associate(tunnel, tls_server, _Tls(context, server_hostname="localhost"))
    tls = tunnel.tls_for_connection()
    assert tls.offered_session is tunnel.resumable_session()
    assert tls.offered_session is not None and tls.offered_session is not made_ahead_for


def test_forgetting_sessions_forgets_the_object_made_ahead(test_pki, tls_server) -> None:  # type: ignore[no-untyped-def]
    tunnel, context = tls_runtime(test_pki)
    associate(tunnel, tls_server)
    associate(tunnel, tls_server)  # resumed: the next object, offering the session, is made meanwhile
    tunnel.forget_sessions()  # the card left: nothing of its sessions may be resumed
    tls = tunnel.tls_for_connection()
    assert not tls.resuming and tls.offered_session is None


def test_without_session_resumption_the_object_made_ahead_offers_no_session(test_pki, tls_server) -> None:  # type: ignore[no-untyped-def]
    tunnel, context = tls_runtime(test_pki, session_resumption=False)
    associate(tunnel, tls_server)
    made = context.made
    tls = tunnel.tls_for_connection()
    assert context.made == made and tls.offered_session is None
    associate(tunnel, tls_server, tls)
    assert not tls.obj.session_reused  # a full handshake every time, as configured
