"""Identifying and admitting local peers, and the safety of local listeners; all on real sockets.

Clients of another user run as uid 65534 under `setpriv` with the system Python and plain
sockets (no project imports), so these tests need root; they are skipped otherwise.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import selectors
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.tunnel import peer as peer_module
from dicom_card_agent.tunnel.peer import (
    ListenerError,
    NonLoopbackListenError,
    Peer,
    PeerPolicy,
    PeerRefusedError,
    SocketInUseError,
    SocketPathError,
    TcpRow,
    UnidentifiedPeerError,
    UnreachableSocketError,
    UnsafeSocketDirectoryError,
    admit_peer,
    client_owner_doubt,
    create_tcp_listener,
    create_unix_listener,
    find_client_row,
    find_listener_row,
    identify_peer,
    identify_server,
    is_loopback,
    parse_proc_net_tcp,
    pid_of_socket_inode,
    tcp_peer,
    unix_peer,
)

OTHER_UID = 65534
SETPRIV = shutil.which("setpriv")
SYSTEM_PYTHON = "/usr/bin/python3"
IO_TIMEOUT = 5.0

CLIENT = r"""
import socket, sys
kind, target = sys.argv[1], sys.argv[2:]
if kind == "unix":
    sock, address = socket.socket(socket.AF_UNIX), target[0]
else:
    sock = socket.socket(socket.AF_INET6 if kind == "6" else socket.AF_INET)
    address = (target[0], int(target[1]))
try:
    sock.connect(address)
except OSError as error:
    print("error", error.errno, flush=True)
    sys.exit(3)
print("connected", flush=True)
sock.recv(1)
"""


def _ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_other_uid = pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None or not os.path.exists(SYSTEM_PYTHON),
    reason="running a client as uid 65534 needs root, setpriv and /usr/bin/python3")
needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback_works(), reason="no IPv6 loopback")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def sockets() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


@pytest.fixture
def socket_base() -> Iterator[Path]:
    """A short directory under /tmp (unix socket paths are limited to 107 bytes)."""
    base = Path(tempfile.mkdtemp(prefix="card-agent-peer-"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def spawn_other_uid() -> Iterator[Callable[..., subprocess.Popen]]:
    """Start the plain-socket CLIENT as uid 65534; every child is killed at the end."""
    children: list[subprocess.Popen] = []

    def spawn(*args: str) -> subprocess.Popen:
        command = [SETPRIV, f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
                   SYSTEM_PYTHON, "-I", "-c", CLIENT, *args]
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, cwd="/")
        children.append(child)
        return child

    try:
        yield spawn
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=IO_TIMEOUT)
            child.stdout.close()


def read_line(child: subprocess.Popen) -> str:
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        if not selector.select(IO_TIMEOUT):
            raise AssertionError("the client printed nothing in time")
    return child.stdout.readline().strip()


def listen(kind: str, base: Path, sockets: ExitStack) -> socket.socket:
    if kind == "unix":
        listener = create_unix_listener(str(base / "agent" / "pacs.sock"))
    else:
        listener = create_tcp_listener("::1" if kind == "6" else "127.0.0.1", 0)
    listener.settimeout(IO_TIMEOUT)
    return sockets.enter_context(listener)


def target_of(listener: socket.socket) -> list[str]:
    if listener.family == socket.AF_UNIX:
        return [listener.getsockname()]
    host, port = listener.getsockname()[:2]
    return [host, str(port)]


def accept(listener: socket.socket, sockets: ExitStack) -> socket.socket:
    accepted, _ = listener.accept()
    return sockets.enter_context(accepted)


def connect_self(listener: socket.socket, sockets: ExitStack) -> tuple[socket.socket, socket.socket]:
    client = sockets.enter_context(socket.socket(listener.family, socket.SOCK_STREAM))
    client.settimeout(IO_TIMEOUT)
    client.connect(listener.getsockname())
    return client, accept(listener, sockets)


KINDS = ["4", pytest.param("6", marks=needs_ipv6), "unix"]


# --- connections from this process ---------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_own_connection_is_identified_and_admitted(kind: str, socket_base: Path, sockets: ExitStack) -> None:
    listener = listen(kind, socket_base, sockets)
    client, accepted = connect_self(listener, sockets)

    peer = identify_peer(accepted, want_pid=True)

    assert (peer.uid, peer.pid) == (os.getuid(), os.getpid())
    if kind == "unix":
        assert peer.address == f"unix:{socket_base}/agent/pacs.sock"
    else:
        host, port = client.getsockname()[:2]
        assert peer.address == (f"[{host}]:{port}" if kind == "6" else f"{host}:{port}")
    PeerPolicy().check(peer)
    assert admit_peer(accepted, PeerPolicy()).uid == os.getuid()
    assert peer.describe().startswith(f"uid {os.getuid()} pid {os.getpid()} (")


def test_tcp_pid_is_looked_up_only_when_asked(sockets: ExitStack) -> None:
    client, accepted = connect_self(listen("4", Path("/"), sockets), sockets)
    assert tcp_peer(accepted) == Peer(uid=os.getuid(), pid=None, address=f"127.0.0.1:{client.getsockname()[1]}")
    assert tcp_peer(accepted, want_pid=True).pid == os.getpid()


def test_ipv6_client_reaching_an_ipv4_listener_through_a_mapped_address(sockets: ExitStack) -> None:
    # The client socket is listed in /proc/net/tcp6, although our accepted socket is IPv4.
    listener = listen("4", Path("/"), sockets)
    client = sockets.enter_context(socket.socket(socket.AF_INET6))
    client.connect(("::ffff:127.0.0.1", listener.getsockname()[1]))
    accepted = accept(listener, sockets)

    peer = tcp_peer(accepted, want_pid=True)

    assert (peer.uid, peer.pid) == (os.getuid(), os.getpid())
    assert peer.address == f"127.0.0.1:{client.getsockname()[1]}"


def test_ipv4_client_reaching_a_dual_stack_listener(sockets: ExitStack) -> None:
    # The client socket is listed in /proc/net/tcp, although our accepted socket is IPv6.
    listener = sockets.enter_context(socket.socket(socket.AF_INET6))
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind(("::ffff:127.0.0.1", 0))
    listener.listen()
    listener.settimeout(IO_TIMEOUT)
    client = sockets.enter_context(socket.create_connection(("127.0.0.1", listener.getsockname()[1])))
    accepted = accept(listener, sockets)

    peer = tcp_peer(accepted, want_pid=True)

    assert (peer.uid, peer.pid) == (os.getuid(), os.getpid())
    assert peer.address == f"[::ffff:127.0.0.1]:{client.getsockname()[1]}"


ORPHAN_REASON = ("is no longer held by any process: the client closed it before the agent looked, and the "
                 "kernel then no longer knows who opened it")


@pytest.mark.parametrize(("state", "uid", "inode", "reason"), [
    # What a client that wrote its request and closed at once leaves: an orphaned socket, printed
    # with uid 0 and inode 0, still in FIN_WAIT while the kernel drains it, later in TIME_WAIT.
    (0x04, 0, 0, f"its socket (FIN_WAIT1) {ORPHAN_REASON}"),
    (0x05, 0, 0, f"its socket (FIN_WAIT2) {ORPHAN_REASON}"),
    (0x06, 0, 0, f"its socket (TIME_WAIT) {ORPHAN_REASON}"),
    (0x07, 0, 4242, "its socket is in state CLOSE, not an open connection"),
    (None, 0, 0, "no socket of this machine is its other end"),
])
def test_proc_path_refuses_a_client_socket_whose_owner_is_uncertain(
        state: int | None, uid: int, inode: int, reason: str, sockets: ExitStack,
        monkeypatch: pytest.MonkeyPatch) -> None:
    client, accepted = connect_self(listen("4", Path("/"), sockets), sockets)
    rows = [] if state is None else [TcpRow(local=_endpoint(client.getsockname()),
                                            remote=_endpoint(client.getpeername()), state=state, uid=uid, inode=inode)]
    monkeypatch.setattr(peer_module, "_load_rows", lambda ipv6: [] if ipv6 else rows)
    monkeypatch.setattr(peer_module, "_diag_lookup", _no_sock_diag)  # exercise the /proc path

    peer = tcp_peer(accepted, want_pid=True)

    assert (peer.uid, peer.pid) == (None, None)
    with pytest.raises(UnidentifiedPeerError) as refused:
        admit_peer(accepted, PeerPolicy(frozenset({0, os.getuid()})))  # uid 0 allowed: still refused
    assert str(refused.value).startswith(
        f"refused unidentified local connection from 127.0.0.1:{client.getsockname()[1]}: the user who opened "
        f"it cannot be established with certainty: {reason}")
    assert str(refused.value).endswith("; a connection that could be anyone's is refused")


ORPHAN_CLIENT = r"""
import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
sock.sendall(b"\x01" * 200)  # a request, then gone: the socket lingers orphaned in FIN_WAIT2
sock.close()
print("closed", flush=True)
"""


@needs_other_uid
@pytest.mark.parametrize("path", ["sock_diag", "proc"])
def test_client_that_closed_before_the_lookup_is_unidentified_not_root(
        path: str, sockets: ExitStack, monkeypatch: pytest.MonkeyPatch) -> None:
    listener = listen("4", Path("/"), sockets)
    if path == "proc":
        monkeypatch.setattr(peer_module, "_diag_lookup", _no_sock_diag)
    child = subprocess.run([SETPRIV, f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups", SYSTEM_PYTHON,
                            "-I", "-c", ORPHAN_CLIENT, *target_of(listener)],
                           capture_output=True, text=True, timeout=IO_TIMEOUT, cwd="/")
    assert child.stdout == "closed\n", child.stderr
    accepted = accept(listener, sockets)

    peer = tcp_peer(accepted, want_pid=True)

    assert peer.uid is None  # the kernel says uid 0 for this socket; the old code took that as root's
    assert peer.unknown_because is not None and ORPHAN_REASON in peer.unknown_because
    with pytest.raises(UnidentifiedPeerError, match="cannot be established with certainty: its socket \\(FIN_WAIT"):
        admit_peer(accepted, PeerPolicy(frozenset({0, OTHER_UID})))


@pytest.mark.parametrize("path", ["sock_diag", "proc"])
def test_half_closed_client_still_holding_its_socket_is_identified(
        path: str, sockets: ExitStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """shutdown(SHUT_WR) after the request, waiting for the answer: FIN_WAIT2, but held, so certain."""
    if path == "proc":
        monkeypatch.setattr(peer_module, "_diag_lookup", _no_sock_diag)
    client, accepted = connect_self(listen("4", Path("/"), sockets), sockets)
    client.shutdown(socket.SHUT_WR)
    assert accepted.recv(1) == b""  # our side saw the FIN: the client socket is in FIN_WAIT2

    assert tcp_peer(accepted, want_pid=True) == Peer(uid=os.getuid(), pid=os.getpid(),
                                                     address=f"127.0.0.1:{client.getsockname()[1]}")


def _no_sock_diag(*_args: object) -> None:
    raise OSError(errno.EPROTONOSUPPORT, "sock_diag unavailable (injected)")


def _endpoint(sockaddr: tuple) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    return ipaddress.ip_address(sockaddr[0]), sockaddr[1]


# --- connections from another user ----------------------------------------------------------


@needs_other_uid
@pytest.mark.parametrize("kind", KINDS)
def test_other_uid_is_identified_and_refused(kind: str, socket_base: Path, sockets: ExitStack,
                                             spawn_other_uid: Callable[..., subprocess.Popen]) -> None:
    listener = listen(kind, socket_base, sockets)
    if kind == "unix":
        # Bending the permissions on purpose, for this test only, so that uid 65534 can connect.
        socket_base.chmod(0o711)
        (socket_base / "agent").chmod(0o711)
        (socket_base / "agent" / "pacs.sock").chmod(0o666)
    child = spawn_other_uid(kind, *target_of(listener))
    accepted = accept(listener, sockets)
    assert read_line(child) == "connected"

    peer = identify_peer(accepted, want_pid=True)

    assert (peer.uid, peer.pid) == (OTHER_UID, child.pid)
    with pytest.raises(PeerRefusedError) as refused:
        PeerPolicy().check(peer)
    message = str(refused.value)
    assert not isinstance(refused.value, UnidentifiedPeerError)
    assert message.startswith(f"refused local connection from uid {OTHER_UID} pid {child.pid} (python3) from ")
    assert message.endswith(f": only uid {os.getuid()} may use this tunnel (allowed_uids)")
    # admit_peer looks the pid up for the refusal, even though TCP peers are identified without it.
    with pytest.raises(PeerRefusedError, match=f"uid {OTHER_UID} pid {child.pid} "):
        admit_peer(accepted, PeerPolicy())
    assert admit_peer(accepted, PeerPolicy(frozenset({OTHER_UID}))).uid == OTHER_UID


@needs_other_uid
def test_default_permissions_keep_other_users_away_from_the_unix_socket(
        socket_base: Path, sockets: ExitStack, spawn_other_uid: Callable[..., subprocess.Popen]) -> None:
    socket_base.chmod(0o711)  # so that only the agent's own directory stands in the way
    listener = listen("unix", socket_base, sockets)
    control = sockets.enter_context(socket.socket(socket.AF_UNIX))
    control.bind(str(socket_base / "open.sock"))
    control.listen()
    (socket_base / "open.sock").chmod(0o666)

    refused = spawn_other_uid("unix", listener.getsockname())
    reachable = spawn_other_uid("unix", str(socket_base / "open.sock"))

    assert read_line(refused) == f"error {errno.EACCES}"
    assert read_line(reachable) == "connected"


@needs_other_uid
def test_socket_mode_alone_keeps_other_users_out(socket_base: Path, sockets: ExitStack,
                                                 spawn_other_uid: Callable[..., subprocess.Popen]) -> None:
    listener = listen("unix", socket_base, sockets)
    socket_base.chmod(0o711)
    (socket_base / "agent").chmod(0o711)  # the directory bent open; the 0600 socket still holds

    assert read_line(spawn_other_uid("unix", listener.getsockname())) == f"error {errno.EACCES}"


LISTENER = r"""
import socket, sys
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
sys.stdin.read()  # never accepts: the connection's own socket on its side has no owner yet
"""


@needs_other_uid
@pytest.mark.parametrize("path", ["sock_diag", "proc"])
def test_server_owner_is_the_listeners_not_the_unaccepted_socket(
        path: str, sockets: ExitStack, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "proc":
        monkeypatch.setattr(peer_module, "_diag_lookup", _no_sock_diag)
    server = subprocess.Popen([SETPRIV, f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
                               SYSTEM_PYTHON, "-I", "-c", LISTENER],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        port = int(read_line(server))
        connection = sockets.enter_context(socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT))
        assert tcp_peer(connection).uid is None  # the kernel's row for the unaccepted socket has inode 0

        owner = identify_server(connection)

        assert owner == Peer(uid=OTHER_UID, pid=None, address=f"127.0.0.1:{port}")
        server.kill()
        server.wait(timeout=IO_TIMEOUT)
        assert identify_server(connection).uid is None  # the listener and our connection are gone
    finally:
        server.kill()
        server.wait(timeout=IO_TIMEOUT)
        server.stdin.close()
        server.stdout.close()


@needs_other_uid
def test_unix_socket_for_other_allowed_users_lets_them_connect_and_be_identified(
        socket_base: Path, sockets: ExitStack, spawn_other_uid: Callable[..., subprocess.Popen]) -> None:
    socket_base.chmod(0o755)  # as /run: every user may pass through to the agent's directory
    path = socket_base / "agent" / "pacs.sock"
    listener = sockets.enter_context(create_unix_listener(str(path), reachable_by={OTHER_UID}))
    listener.settimeout(IO_TIMEOUT)

    child = spawn_other_uid("unix", str(path))
    accepted = accept(listener, sockets)

    assert read_line(child) == "connected"
    assert stat.S_IMODE(os.lstat(path.parent).st_mode) == 0o711  # others pass through, cannot list
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o666
    assert unix_peer(accepted).uid == OTHER_UID  # so allowed_uids, not file modes, decides
    with pytest.raises(PeerRefusedError):
        admit_peer(accepted, PeerPolicy(frozenset({os.getuid(), OTHER_UID + 1})))


def test_unix_socket_for_other_users_behind_a_closed_directory_is_refused(socket_base: Path) -> None:
    socket_base.chmod(0o700)
    path = socket_base / "agent" / "pacs.sock"

    with pytest.raises(UnreachableSocketError) as refused:
        create_unix_listener(str(path), reachable_by={OTHER_UID, os.geteuid()})

    assert str(refused.value) == (
        f"uid {OTHER_UID} (allowed_uids) could not connect to {path}: the directory {socket_base} (owner uid "
        f"{os.geteuid()}, mode 0700) does not let it through, so connect() would fail with 'permission denied' "
        "before the agent sees it. Put the socket in a directory every allowed user can pass through "
        "(e.g. /run/card-agent/pacs.sock), or listen on loopback TCP")
    assert not path.exists()


def test_shared_unix_socket_opens_an_existing_private_directory(socket_base: Path, sockets: ExitStack) -> None:
    socket_base.chmod(0o755)
    directory = socket_base / "agent"
    directory.mkdir(mode=0o700)

    sockets.enter_context(create_unix_listener(str(directory / "pacs.sock"), reachable_by={OTHER_UID}))

    assert stat.S_IMODE(directory.stat().st_mode) == 0o711


# --- parsing /proc/net/tcp(6) ---------------------------------------------------------------

TCP_HEADER = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"
              "                                                     ")
TCP_LINES = [
    "   0: 0100007F:A427 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 19775 1 "
    "00000000db170cec 100 0 0 10 0                     ",
    "   6: 0100007F:C9E0 0100007F:A427 01 00000000:00000000 00:00000000 00000000  1000        0 19776 2 "
    "000000008c4f1153 20 0 0 10 -1                     ",
    "   7: 0302010A:0050 0100007F:A427 06 00000000:00000000 03:00001766 00000000     0        0 0 3 "
    "00000000b7aea09b                                      ",
]
TCP6_HEADER = ("  sl  local_address                         remote_address                        st tx_queue "
               "rx_queue tr tm->when retrnsmt   uid  timeout inode")
TCP6_LINES = [
    "   2: 00000000000000000000000001000000:9248 00000000000000000000000001000000:BD8F 01 00000000:00000000 "
    "00:00000000 00000000  1000        0 19781 2 000000006724e411 20 0 0 10 -1",
    "   3: 0000000000000000FFFF00000100007F:C9EC 0000000000000000FFFF00000100007F:A427 01 00000000:00000000 "
    "00:00000000 00000000  1001        0 19783 2 00000000844659df 20 0 0 10 -1",
    "   4: B80D0120000000000000000001000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 "
    "00:00000000 00000000   104        7 19799 1 0000000000000000 100 0 0 10 0",
]
IP = ipaddress.ip_address


def test_parse_ipv4_rows() -> None:
    rows = parse_proc_net_tcp("\n".join([TCP_HEADER, *TCP_LINES]) + "\n", ipv6=False, byteorder="little")

    assert rows == [
        TcpRow(local=(IP("127.0.0.1"), 0xA427), remote=(IP("0.0.0.0"), 0), state=0x0A, uid=0, inode=19775),
        TcpRow(local=(IP("127.0.0.1"), 51680), remote=(IP("127.0.0.1"), 42023), state=0x01, uid=1000, inode=19776),
        TcpRow(local=(IP("10.1.2.3"), 80), remote=(IP("127.0.0.1"), 42023), state=0x06, uid=0, inode=0),
    ]


def test_parse_ipv6_and_ipv4_mapped_rows() -> None:
    rows = parse_proc_net_tcp("\n".join([TCP6_HEADER, *TCP6_LINES]), ipv6=True, byteorder="little")

    assert rows == [
        TcpRow(local=(IP("::1"), 0x9248), remote=(IP("::1"), 0xBD8F), state=1, uid=1000, inode=19781),
        TcpRow(local=(IP("::ffff:127.0.0.1"), 0xC9EC), remote=(IP("::ffff:127.0.0.1"), 0xA427), state=1,
               uid=1001, inode=19783),
        TcpRow(local=(IP("2001:db8::1"), 443), remote=(IP("::"), 0), state=0x0A, uid=104, inode=19799),
    ]


def test_parse_on_a_big_endian_kernel() -> None:
    v4 = parse_proc_net_tcp("0: 7F000001:0050 0A010203:01BB 01 0:0 0:0 0 5 0 42", ipv6=False, byteorder="big")
    v6 = parse_proc_net_tcp("0: 20010DB8000000000000000000000001:0050 00000000000000000000FFFF7F000001:01BB "
                            "01 0:0 0:0 0 5 0 42", ipv6=True, byteorder="big")

    assert (v4[0].local, v4[0].remote) == ((IP("127.0.0.1"), 80), (IP("10.1.2.3"), 443))
    assert (v6[0].local, v6[0].remote) == ((IP("2001:db8::1"), 80), (IP("::ffff:127.0.0.1"), 443))


@pytest.mark.parametrize("line", [
    "0: 0100007F:A427 0100007F:C9E0 01 0:0 0:0 0 1000 0",                 # no inode column
    "0: 0100007:A427 0100007F:C9E0 01 0:0 0:0 0 1000 0 7",                # 7 hex digits
    "0: 0100007G:A427 0100007F:C9E0 01 0:0 0:0 0 1000 0 7",               # not hex
    "0: +100007F:A427 0100007F:C9E0 01 0:0 0:0 0 1000 0 7",               # a sign int() would take
    "0: 0100007F-A427 0100007F:C9E0 01 0:0 0:0 0 1000 0 7",               # no colon
    "0: 0100007F:A427 0100007F:C9E0 01 0:0 0:0 0 -1 0 7",                 # negative uid
    "0: 00000000000000000000000001000000:A427 0100007F:C9E0 01 0:0 0:0 0 1000 0 7",  # IPv6 in tcp
])
def test_parse_rejects_malformed_lines(line: str) -> None:
    with pytest.raises(ValueError, match="line 1 of /proc/net/tcp:"):
        parse_proc_net_tcp(line, ipv6=False)


def test_find_client_row_prefers_a_held_socket_and_matches_mapped_addresses() -> None:
    rows = parse_proc_net_tcp("\n".join(TCP_LINES), ipv6=False, byteorder="little")
    mapped = parse_proc_net_tcp("\n".join(TCP6_LINES), ipv6=True, byteorder="little")
    server = (IP("127.0.0.1"), 42023)

    assert find_client_row(rows, (IP("127.0.0.1"), 51680), server) == rows[1]
    assert find_client_row(rows, (IP("::ffff:127.0.0.1"), 51680), (IP("::ffff:127.0.0.1"), 42023)) == rows[1]
    assert find_client_row(rows, server, (IP("127.0.0.1"), 51680)) is None  # that is our own end
    assert find_client_row(mapped, (IP("127.0.0.1"), 0xC9EC), (IP("127.0.0.1"), 0xA427)) == mapped[1]
    # Only a TIME_WAIT row: returned, so that the refusal can say why, but its owner is not known.
    assert find_client_row(rows, (IP("10.1.2.3"), 80), server) == rows[2]
    assert client_owner_doubt(rows[2]) == f"its socket (TIME_WAIT) {ORPHAN_REASON}"
    # An earlier connection's TIME_WAIT row with the same addresses does not hide the live one.
    earlier = TcpRow(local=rows[1].local, remote=rows[1].remote, state=0x06, uid=0, inode=0)
    assert find_client_row([earlier, rows[1]], (IP("127.0.0.1"), 51680), server) == rows[1]


# A client that wrote its request and closed at once, as /proc/net/tcp prints it: FIN_WAIT2, uid 0, inode 0.
ORPHAN_LINE = ("   8: 0100007F:C9E2 0100007F:A427 05 00000000:00000000 00:00000000 00000000     0        0 0 1 "
               "00000000c4f1153b 20 4 30 10 -1                     ")


def test_an_orphaned_client_row_from_proc_names_no_owner() -> None:
    rows = parse_proc_net_tcp("\n".join([TCP_HEADER, *TCP_LINES, ORPHAN_LINE]), ipv6=False, byteorder="little")
    orphan = TcpRow(local=(IP("127.0.0.1"), 0xC9E2), remote=(IP("127.0.0.1"), 0xA427), state=0x05, uid=0, inode=0)

    assert rows[-1] == orphan
    assert find_client_row(rows, orphan.local, orphan.remote) == orphan
    assert client_owner_doubt(orphan) == f"its socket (FIN_WAIT2) {ORPHAN_REASON}"
    assert client_owner_doubt(rows[1]) is None  # ESTABLISHED, held (inode 19776): uid 1000 is certain
    assert client_owner_doubt(None) is not None


def test_find_listener_row_prefers_the_exact_address() -> None:
    v4 = parse_proc_net_tcp("\n".join(TCP_LINES), ipv6=False, byteorder="little")
    v6 = parse_proc_net_tcp("\n".join(TCP6_LINES), ipv6=True, byteorder="little")
    wildcard = TcpRow(local=(IP("0.0.0.0"), 0xA427), remote=(IP("0.0.0.0"), 0), state=0x0A, uid=7, inode=8)
    dual_stack = TcpRow(local=(IP("::"), 0xA427), remote=(IP("::"), 0), state=0x0A, uid=9, inode=10)

    assert find_listener_row([*v4, *v6], (IP("127.0.0.1"), 0xA427)) == v4[0]  # not the connections to it
    assert find_listener_row([dual_stack, wildcard, *v4], (IP("127.0.0.1"), 0xA427)) == v4[0]
    assert find_listener_row([dual_stack, wildcard], (IP("127.0.0.1"), 0xA427)) == wildcard
    assert find_listener_row([dual_stack], (IP("::ffff:127.0.0.1"), 0xA427)) == dual_stack
    assert find_listener_row([*v4, *v6], (IP("127.0.0.1"), 0x0050)) is None


def test_pid_of_socket_inode() -> None:
    with socket.socket() as sock:
        inode = os.stat(f"/proc/self/fd/{sock.fileno()}").st_ino
        assert pid_of_socket_inode(inode) == os.getpid()
    assert pid_of_socket_inode(inode) is None  # closed
    assert pid_of_socket_inode(0) is None


# --- the policy -----------------------------------------------------------------------------


def test_policy_messages() -> None:
    stranger = Peer(uid=1234, pid=None, address="127.0.0.1:53412")

    with pytest.raises(PeerRefusedError) as one:
        PeerPolicy().check(stranger)
    with pytest.raises(PeerRefusedError) as several:
        PeerPolicy(frozenset({1000, 0})).check(stranger)
    with pytest.raises(PeerRefusedError) as none:
        PeerPolicy(frozenset()).check(Peer(uid=os.getuid(), pid=None, address="unix:/x"))
    with pytest.raises(UnidentifiedPeerError):
        PeerPolicy().check(Peer(uid=None, pid=None, address="[::1]:1"))

    assert str(one.value) == ("refused local connection from uid 1234 pid unknown from 127.0.0.1:53412: "
                              f"only uid {os.getuid()} may use this tunnel (allowed_uids)")
    assert str(several.value).endswith(": only uids 0, 1000 may use this tunnel (allowed_uids)")
    assert str(none.value).endswith(": no uid may use this tunnel (allowed_uids is empty)")
    assert isinstance(one.value, CardAgentError)
    PeerPolicy(frozenset({1234})).check(stranger)
    assert PeerPolicy().allowed_uids == frozenset({os.getuid()})
    assert PeerPolicy({5, 6}).allowed_uids == frozenset({5, 6})  # type: ignore[arg-type]


def test_describe_names_the_process() -> None:
    comm = Path("/proc/self/comm").read_text().strip()
    described = Peer(uid=7, pid=os.getpid(), address="unix:/s").describe()
    assert described == f"uid 7 pid {os.getpid()} ({comm}) from unix:/s"


def test_describe_escapes_a_forged_process_name() -> None:
    # Any process may rename itself; a newline in its name must not start a fake log line.
    script = "open('/proc/self/comm', 'w').write('x\\nuid 0'); print('renamed', flush=True); input()"
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert read_line(child) == "renamed"
        described = Peer(uid=7, pid=child.pid, address="unix:/s").describe()
        assert described == f"uid 7 pid {child.pid} (x\\x0auid 0) from unix:/s"
    finally:
        child.kill()
        child.wait(timeout=IO_TIMEOUT)
        child.stdin.close()
        child.stdout.close()


def test_unix_peer_of_a_socketpair() -> None:
    left, right = socket.socketpair()
    with left, right:
        assert unix_peer(left) == Peer(uid=os.getuid(), pid=os.getpid(), address="unix:(unnamed)")


# --- listeners ------------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "expected"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True), ("LocalHost", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.10", False), ("128.0.0.1", False),
    ("::ffff:127.0.0.1", False), ("localhost.example.org", False), ("127.1", False), ("", False),
])
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "pacs.example.org"])
def test_non_loopback_listener_is_refused(host: str) -> None:
    with pytest.raises(NonLoopbackListenError) as refused:
        create_tcp_listener(host, 0)
    assert "another machine could connect" in str(refused.value)
    assert "clinician's card" in str(refused.value)
    assert "`unsafe_listen = true`" in str(refused.value)


def test_unsafe_listen_allows_any_address() -> None:
    with create_tcp_listener("0.0.0.0", 0, unsafe_listen=True) as listener:
        assert listener.getsockname()[0] == "0.0.0.0"


@pytest.mark.parametrize(("host", "family", "bound"), [
    ("127.0.0.1", socket.AF_INET, "127.0.0.1"),
    ("localhost", socket.AF_INET, "127.0.0.1"),
    pytest.param("::1", socket.AF_INET6, "::1", marks=needs_ipv6),
])
def test_tcp_listener(host: str, family: socket.AddressFamily, bound: str) -> None:
    with create_tcp_listener(host, 0) as listener:
        assert listener.family == family
        assert listener.getsockname()[0] == bound
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


def test_tcp_listener_errors() -> None:
    with create_tcp_listener("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ListenerError, match=f"cannot listen on 127.0.0.1:{port}: "):
            create_tcp_listener("127.0.0.1", port)
    with pytest.raises(ListenerError, match="between 0 and 65535"):
        create_tcp_listener("127.0.0.1", 70000)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_unix_listener_creates_private_directory_and_socket(umask: int, socket_base: Path, sockets: ExitStack) -> None:
    path = socket_base / "agent" / "pacs.sock"
    old_umask = os.umask(umask)  # the modes must not depend on the umask
    try:
        listener = sockets.enter_context(create_unix_listener(str(path)))
    finally:
        os.umask(old_umask)

    directory, sock = os.lstat(path.parent), os.lstat(path)
    assert stat.S_ISDIR(directory.st_mode) and stat.S_IMODE(directory.st_mode) == 0o700
    assert directory.st_uid == os.geteuid()
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600
    listener.settimeout(IO_TIMEOUT)
    connect_self(listener, sockets)


def test_unix_listener_keeps_an_existing_private_directory(socket_base: Path, sockets: ExitStack) -> None:
    directory = socket_base / "agent"
    directory.mkdir(mode=0o700)
    (directory / "other-file").write_text("kept")

    sockets.enter_context(create_unix_listener(str(directory / "pacs.sock")))

    assert (directory / "other-file").read_text() == "kept"


def test_unix_listener_refuses_an_open_directory(socket_base: Path) -> None:
    directory = socket_base / "agent"
    directory.mkdir()
    directory.chmod(0o755)

    with pytest.raises(UnsafeSocketDirectoryError) as refused:
        create_unix_listener(str(directory / "pacs.sock"))

    assert f"{directory} has mode 0755" in str(refused.value)
    assert f"chmod 700 {directory}" in str(refused.value)
    assert not (directory / "pacs.sock").exists()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o755  # reported, not silently changed


@needs_root
def test_unix_listener_refuses_a_directory_of_another_user(socket_base: Path) -> None:
    directory = socket_base / "agent"
    directory.mkdir(mode=0o700)
    os.chown(directory, OTHER_UID, OTHER_UID)

    with pytest.raises(UnsafeSocketDirectoryError, match=f"owned by uid {OTHER_UID}"):
        create_unix_listener(str(directory / "pacs.sock"))


def test_unix_listener_refuses_a_symlinked_directory(socket_base: Path) -> None:
    real = socket_base / "real"
    real.mkdir(mode=0o700)
    (socket_base / "agent").symlink_to(real)

    with pytest.raises(UnsafeSocketDirectoryError, match="is a symbolic link"):
        create_unix_listener(str(socket_base / "agent" / "pacs.sock"))


def test_unix_listener_needs_the_parent_directory(socket_base: Path) -> None:
    with pytest.raises(ListenerError, match="cannot create the socket directory") as failed:
        create_unix_listener(str(socket_base / "missing" / "agent" / "pacs.sock"))
    assert not isinstance(failed.value, UnsafeSocketDirectoryError)
    assert str(failed.value) == (
        f"cannot create the socket directory {socket_base}/missing/agent: its parent {socket_base}/missing does not "
        f"exist (the agent creates only the socket's own directory): create {socket_base}/missing, or put the socket "
        f"in a directory that exists, e.g. unix:/run/user/{os.getuid()}/card-agent/NAME.sock")


def test_unix_socket_in_use_is_refused(socket_base: Path, sockets: ExitStack) -> None:
    path = str(socket_base / "agent" / "pacs.sock")
    first = sockets.enter_context(create_unix_listener(path))

    with pytest.raises(SocketInUseError, match=f"already listening on {path}"):
        create_unix_listener(path)

    first.settimeout(IO_TIMEOUT)
    connect_self(first, sockets)  # the running listener was left alone


def test_stale_unix_socket_is_replaced(socket_base: Path, sockets: ExitStack) -> None:
    path = socket_base / "agent" / "pacs.sock"
    create_unix_listener(str(path)).close()  # a crash leaves the file behind
    assert stat.S_ISSOCK(os.lstat(path).st_mode)

    # bind() would fail with EADDRINUSE had the stale file not been removed
    listener = sockets.enter_context(create_unix_listener(str(path)))

    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    listener.settimeout(IO_TIMEOUT)
    connect_self(listener, sockets)


def test_non_socket_at_the_socket_path_is_left_alone(socket_base: Path) -> None:
    path = socket_base / "agent" / "pacs.sock"
    path.parent.mkdir(mode=0o700)
    path.write_text("not a socket")

    with pytest.raises(SocketPathError, match="is not a socket"):
        create_unix_listener(str(path))

    assert path.read_text() == "not a socket"


def test_proc_fallback_when_sock_diag_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection (no real part here lacks sock_diag): the /proc/net/tcp path must still answer."""
    monkeypatch.setattr(peer_module, "_diag_lookup", _no_sock_diag)
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname()) as client:
            client_port = client.getsockname()[1]
            accepted, _ = server.accept()
            with accepted:
                found = peer_module.tcp_peer(accepted, want_pid=True)
    assert found.uid == os.getuid() and found.pid == os.getpid()
    assert found.address == f"127.0.0.1:{client_port}"


def test_a_sock_diag_answer_that_came_too_late_is_not_taken_for_the_next_one() -> None:
    """One netlink socket serves all of a process's questions (agent/tunnel/peer.py): an answer
    carrying another question's sequence number (one that came after its question gave up) is
    skipped. The kernel answers at once, so a socket pair stands in for it here to inject that."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, kernel:
        ours.setblocking(False)
        header = struct.Struct("=IHHII")
        kernel.send(header.pack(header.size + 4, 20, 0, 1, 0) + b"late")
        kernel.send(header.pack(header.size + 4, 20, 0, 2, 0) + b"mine")
        reply = peer_module._SockDiagSocket._exchange(ours, b"question", 2)
        assert kernel.recv(64) == b"question"
    assert reply.endswith(b"mine")
