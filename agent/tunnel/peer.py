"""Who is on the other end of an accepted local connection, and whether to let it in.

On a shared workstation every user can connect to 127.0.0.1, and whoever gets through a tunnel
acts with the clinician's card. So each local connection is tied to the user who opened it:

* unix sockets carry the connecting process's credentials (SO_PEERCRED);
* for TCP on loopback, the kernel is asked about the connecting socket (sock_diag, else the row of
  /proc/net/tcp or tcp6 whose local address is our peer's and whose remote address is ours); it
  names the socket's owner uid and inode, and the process holding that inode is found in
  /proc/*/fd (costly, so only on demand).

A socket that no process holds any more (the client wrote its request and closed at once, so the
socket lingers orphaned in FIN_WAIT or TIME_WAIT with inode 0) is reported by the kernel with
uid 0 or some other default, not its opener's: such a peer counts as unidentified, never as a uid.
:class:`PeerPolicy` then lets in only the allowed uids and refuses a peer it cannot identify.
The listeners made here are local by default: loopback TCP, or a unix socket kept 0600 in a
0700 directory of ours; a unix socket that other allowed users must reach is 0666 in a 0711
directory, and SO_PEERCRED decides, as for loopback TCP.
"""

from __future__ import annotations

import errno
import functools
import grp
import ipaddress
import os
import pwd
import select
import socket
import stat
import string
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

from dicom_card_agent.errors import CardAgentError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Endpoint = tuple[IPAddress, int]

PROC = "/proc"
LISTEN_BACKLOG = 128
TCP_ESTABLISHED = 0x01
TCP_FIN_WAIT1 = 0x04
TCP_FIN_WAIT2 = 0x05
TCP_TIME_WAIT = 0x06
TCP_LISTEN = 0x0A
_TCP_STATE_NAMES = {0x01: "ESTABLISHED", 0x02: "SYN_SENT", 0x03: "SYN_RECV", 0x04: "FIN_WAIT1", 0x05: "FIN_WAIT2",
                    0x06: "TIME_WAIT", 0x07: "CLOSE", 0x08: "CLOSE_WAIT", 0x09: "LAST_ACK", 0x0A: "LISTEN",
                    0x0B: "CLOSING", 0x0C: "NEW_SYN_RECV"}
# The client end of a connection we accepted, still open or half-closed (shutdown(SHUT_WR) by a client
# that waits for the answer). Only while a process holds the socket (inode != 0) is its uid the opener's.
_HELD_CLIENT_STATES = frozenset({TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2})
SOCKET_DIRECTORY_MODE = 0o700
SOCKET_FILE_MODE = 0o600
SHARED_SOCKET_DIRECTORY_MODE = 0o711
SHARED_SOCKET_FILE_MODE = 0o666
_STALE_PROBE_TIMEOUT = 1.0
SOCKET_FILE_CHECK_SECONDS = 2.0  # how often the owners of unix listeners look at their files (SocketFile.lost)
_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
_NO_UID = 0xFFFFFFFF  # (uid_t)-1: what the kernel reports when no credentials were passed
_HEX = frozenset(string.hexdigits)


class PeerRefusedError(CardAgentError):
    """A local connection comes from a user who may not use the tunnel; ``peer`` is who it was."""

    def __init__(self, message: str, peer: Peer) -> None:
        super().__init__(message)
        self.peer = peer

    @property
    def process_not_looked_up(self) -> bool:
        """Whether :meth:`naming_the_process` has a process to look for."""
        return False

    def naming_the_process(self, seconds: float) -> PeerRefusedError:
        """This refusal with the connecting process's pid looked up, for at most ``seconds`` (see
        :func:`admit_peer`); itself when there is nothing to look up."""
        return self


class DisallowedUserError(PeerRefusedError):
    """A local connection from an identified user who is not in the tunnel's allowed_uids."""

    def __init__(self, peer: Peer, rule: str) -> None:
        super().__init__(f"refused local connection from {peer.describe()}: {rule}", peer)
        self.rule = rule

    @property
    def process_not_looked_up(self) -> bool:
        return self.peer.pid is None and self.peer.socket_inode is not None

    def naming_the_process(self, seconds: float) -> PeerRefusedError:
        if not self.process_not_looked_up or self.peer.socket_inode is None:
            return self
        pid = pid_of_socket_inode(self.peer.socket_inode, deadline=time.monotonic() + seconds)
        return DisallowedUserError(replace(self.peer, pid=pid, socket_inode=None), self.rule)


class UnidentifiedPeerError(PeerRefusedError):
    """A local connection whose user could not be determined; refused, as it could be anyone."""


class PeerLookupError(CardAgentError):
    """The kernel's socket tables cannot be read, so no local client can be identified; ``errno``
    is the OS error's (EMFILE when descriptors ran out), if one caused it."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class ListenerError(CardAgentError):
    """A local listener cannot be set up."""


class NonLoopbackListenError(ListenerError):
    """A listener was asked on an address other machines can reach."""


class UnsafeSocketDirectoryError(ListenerError):
    """The directory of a unix socket could let another user reach or replace the socket."""


class UnreachableSocketError(ListenerError):
    """A unix socket that a user of allowed_uids could not connect to, for a directory above it."""


class SocketInUseError(ListenerError):
    """Another process already listens on the socket path."""


class PortInUseError(ListenerError):
    """Another socket holds the TCP address ``address`` a listener needs (EADDRINUSE); ``holder_uid`` is
    its owner's uid once :meth:`naming_the_holder` found it (None otherwise)."""

    def __init__(self, message: str, where: str, address: Endpoint, holder_uid: int | None = None, *,
                 cannot: str = "", keep: str = "") -> None:
        super().__init__(message)
        self.where = where
        self.address = address
        self.holder_uid = holder_uid
        self.cannot = cannot or f"cannot listen on {where}"  # what could not be done, as the message begins
        self.keep = keep or KEEP_THE_PORT  # how to keep the address from another user

    @property
    def by_another_user(self) -> bool:
        """Taken by a user other than the agent's: one who may be reading the applications' requests."""
        return self.holder_uid is not None and self.holder_uid != os.geteuid()

    def naming_the_holder(self) -> PortInUseError:
        """This error naming the owner of the socket that holds the address, as far as the kernel
        tells (sock_diag, else /proc/net/tcp*): while the agent restarts, another user can take a
        tunnel's loopback port and receive what the applications send there."""
        return port_in_use(self.where, self.address, self.cannot, self.keep)


class SocketPathError(ListenerError):
    """The socket path is taken by something that is not a socket."""


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a local connection, as far as it could be found out."""

    uid: int | None
    pid: int | None
    address: str
    unknown_because: str | None = None  # with uid None: why the user could not be established
    # A TCP client's socket whose process was not looked up (yet): pid_of_socket_inode scans every
    # process's descriptors, which no accepting thread may wait for (see admit_peer).
    socket_inode: int | None = None

    def describe(self) -> str:
        """E.g. "uid 1000 pid 4242 (storescu) from 127.0.0.1:53412"; for logs and refusals."""
        who = "uid unknown" if self.uid is None else f"uid {self.uid}"
        if self.pid is None:
            looked_up = "not looked up" if self.socket_inode is not None else "unknown"
            return f"{who} pid {looked_up} from {self.address}"
        name = process_name(self.pid)
        process = f"pid {self.pid}" if name is None else f"pid {self.pid} ({name})"
        return f"{who} {process} from {self.address}"


def process_name(pid: int) -> str | None:
    """The command name of a process (/proc/PID/comm), made safe to log; None if unknown."""
    try:
        with open(f"{PROC}/{pid}/comm", encoding="utf-8", errors="backslashreplace") as file:
            name = file.read().removesuffix("\n")
    except OSError:
        return None
    # Any process can rename itself (prctl PR_SET_NAME): don't let it forge log lines.
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in name)


# --- unix sockets -------------------------------------------------------------------------------


def unix_peer(sock: socket.socket) -> Peer:
    """The credentials the connecting process had when it called connect() (SO_PEERCRED)."""
    if sock.family != socket.AF_UNIX:
        raise ValueError(f"unix_peer needs a unix socket, not {sock.family!r}")
    pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    # pid is 0 when the peer lives in a PID namespace we cannot see.
    address = _unix_address(sock.getsockname())
    if uid == _NO_UID:
        return Peer(uid=None, pid=pid if pid > 0 else None, address=address,
                    unknown_because="the kernel passed no credentials for it")
    return Peer(uid=uid, pid=pid if pid > 0 else None, address=address)


def _unix_address(name: str | bytes) -> str:
    if isinstance(name, bytes):  # abstract namespace: a leading NUL byte
        return "unix:@" + name[1:].decode(errors="backslashreplace")
    return f"unix:{name}" if name else "unix:(unnamed)"


# --- TCP on loopback: /proc/net/tcp and /proc/net/tcp6 --------------------------------------------


@dataclass(frozen=True)
class TcpRow:
    """One socket of /proc/net/tcp or /proc/net/tcp6, with the columns the peer lookup needs."""

    local: Endpoint
    remote: Endpoint
    state: int
    uid: int
    inode: int


def parse_proc_net_tcp(text: str, ipv6: bool, byteorder: Literal["little", "big"] = sys.byteorder) -> list[TcpRow]:
    """Parse the text of /proc/net/tcp (``ipv6=False``) or /proc/net/tcp6 (``ipv6=True``).

    Addresses are printed as the hex of each 32-bit word in the kernel's byte order (one word for
    IPv4, four for IPv6), ports as 4 hex digits; uid and inode are decimal. ``byteorder`` is the
    kernel's, which is this machine's. Raises ValueError on a line that does not fit the format.
    """
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        columns = line.split()
        if not columns or columns[0] == "sl":
            continue
        try:
            rows.append(_parse_row(columns, ipv6, byteorder))
        except ValueError as error:
            table = f"/proc/net/tcp{'6' if ipv6 else ''}"
            raise ValueError(f"line {number} of {table}: {error}: {line.strip()!r}") from None
    return rows


def _parse_row(columns: list[str], ipv6: bool, byteorder: Literal["little", "big"]) -> TcpRow:
    if len(columns) < 10:
        raise ValueError(f"{len(columns)} columns, expected at least 10")
    return TcpRow(local=_parse_endpoint(columns[1], ipv6, byteorder),
                  remote=_parse_endpoint(columns[2], ipv6, byteorder),
                  state=_hex(columns[3], 2), uid=_decimal(columns[7]), inode=_decimal(columns[9]))


def _parse_endpoint(text: str, ipv6: bool, byteorder: Literal["little", "big"]) -> Endpoint:
    host, colon, port = text.partition(":")
    digits = 32 if ipv6 else 8
    if not colon or len(host) != digits:
        raise ValueError(f"address {text!r} is not {digits} hex digits, a colon and a port")
    packed = b"".join(_hex(host[i:i + 8], 8).to_bytes(4, byteorder) for i in range(0, digits, 8))
    address: IPAddress = ipaddress.IPv6Address(packed) if ipv6 else ipaddress.IPv4Address(packed)
    return address, _hex(port, 4)


def _hex(text: str, digits: int) -> int:
    # int(text, 16) alone would also take signs, spaces and underscores
    if len(text) != digits or not _HEX.issuperset(text):
        raise ValueError(f"{text!r} is not {digits} hex digits")
    return int(text, 16)


def _decimal(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"{text!r} is not a decimal number")
    return int(text)


def tcp_state_name(state: int) -> str:
    return _TCP_STATE_NAMES.get(state, f"state {state:#04x}")


def client_owner_doubt(row: TcpRow | None) -> str | None:
    """Why ``row`` does not tell for certain who opened the client's socket; None when it does.

    Certain means: the socket is still held by a process (the kernel prints inode 0 for an orphaned
    or TIME_WAIT socket, and its uid is then a default such as 0, not the opener's) and is in a
    state the client end of an accepted connection has while open or half-closed.
    """
    if row is None:
        return ("no socket of this machine is its other end (a client on another machine or in another "
                "network namespace, or one that is already gone)")
    if row.inode == 0:
        return (f"its socket ({tcp_state_name(row.state)}) is no longer held by any process: the client "
                "closed it before the agent looked, and the kernel then no longer knows who opened it")
    if row.state not in _HELD_CLIENT_STATES:
        return f"its socket is in state {tcp_state_name(row.state)}, not an open connection"
    return None


def find_client_row(rows: Iterable[TcpRow], client: Endpoint, server: Endpoint) -> TcpRow | None:
    """The row of the socket at ``client`` connected to ``server``, or None.

    IPv4-mapped IPv6 addresses match their IPv4 address: an IPv6 socket may reach an IPv4
    listener through ::ffff:127.0.0.1, and an IPv4 socket may reach a dual-stack one.
    A row whose owner is certain (:func:`client_owner_doubt`) is preferred: the same addresses
    may also be listed for a TIME_WAIT socket of an earlier connection. Failing that, a doubtful
    row is returned, so that the refusal can say why.
    """
    wanted = (_plain(client), _plain(server))
    doubtful = None
    for row in rows:
        if (_plain(row.local), _plain(row.remote)) == wanted:
            if client_owner_doubt(row) is None:
                return row
            doubtful = doubtful or row
    return doubtful


def _plain(endpoint: Endpoint) -> Endpoint:
    host, port = endpoint
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        return host.ipv4_mapped, port
    return host, port


def _load_rows(ipv6: bool) -> list[TcpRow]:
    path = f"{PROC}/net/tcp6" if ipv6 else f"{PROC}/net/tcp"
    try:
        with open(path, encoding="ascii") as file:
            text = file.read()
    except FileNotFoundError:
        if ipv6:  # IPv6 disabled: no IPv6 sockets to look at
            return []
        raise PeerLookupError(f"{path} does not exist, so local TCP clients cannot be identified; "
                              "is /proc mounted?") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PeerLookupError(f"cannot read {path} to identify local TCP clients: {error}",
                              getattr(error, "errno", None)) from None
    try:
        return parse_proc_net_tcp(text, ipv6)
    except ValueError as error:
        raise PeerLookupError(f"cannot identify local TCP clients: unexpected format: {error}") from None


def endpoint_of(sockaddr: tuple) -> Endpoint:
    """The address and port of a socket address (``getsockname()``, ``getpeername()``)."""
    return _ip_address(str(sockaddr[0]).partition("%")[0]), int(sockaddr[1])  # no IPv6 scope id: /proc shows none


@functools.lru_cache(maxsize=256)
def _ip_address(host: str) -> IPAddress:
    """``ipaddress.ip_address``, remembered: a connection's addresses are those of the last ones."""
    return ipaddress.ip_address(host)


def _inet_address(sockaddr: tuple) -> str:
    host, port = endpoint_of(sockaddr)
    if host.version == 4:
        return f"{host}:{port}"
    if host.ipv4_mapped is not None:  # str() would give "::ffff:7f00:1"
        return f"[::ffff:{host.ipv4_mapped}]:{port}"
    return f"[{host}]:{port}"


# sock_diag (linux/inet_diag.h): ask the kernel about exactly one socket, instead of reading all of
# /proc/net/tcp (measured 2.3 ms a connection, growing with the number of sockets on the machine).
# Not pyroute2 (0.9.7, measured with 281 TCP sockets): its DiagSocket.get_sock_stats() only dumps
# every socket (10 ms), and one exact query through its nlm_request() took 136 us on a reused
# socket, 620 us on a new one, against 14 us for this one message.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_NLMSG_HEADER = struct.Struct("=IHHII")
_DIAG_REQUEST = struct.Struct("=BBBxI")
_DIAG_SOCKID = struct.Struct(">HH16s16s")
_DIAG_MESSAGE_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode


def _diag_address(address: IPAddress) -> bytes:
    return address.packed.ljust(16, b"\0")


def _diag_lookup(family: int, local: Endpoint, remote: Endpoint) -> TcpRow | None:
    """The socket the kernel would hand a packet from ``remote`` to ``local``, as it sees it: the
    connected socket with these ends, else a socket listening at ``local`` (None: neither, in
    this network namespace). Raises OSError when sock_diag cannot be used, so that the caller
    falls back to /proc."""
    def as_family(endpoint: Endpoint) -> IPAddress:
        address = endpoint[0]
        if family == socket.AF_INET6 and address.version == 4:
            return ipaddress.IPv6Address(f"::ffff:{address}")
        if family == socket.AF_INET and address.version == 6 and address.ipv4_mapped is not None:
            return address.ipv4_mapped
        return address

    source, destination = as_family(local), as_family(remote)
    if (source.version == 4) != (family == socket.AF_INET):
        return None
    body = _DIAG_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF)
    body += _DIAG_SOCKID.pack(local[1], remote[1], _diag_address(source), _diag_address(destination))
    body += struct.pack("=III", 0, _INET_DIAG_NOCOOKIE, _INET_DIAG_NOCOOKIE)
    reply = _SOCK_DIAG.ask(lambda sequence: _NLMSG_HEADER.pack(
        _NLMSG_HEADER.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, sequence, 0) + body)
    _, kind, _, _, _ = _NLMSG_HEADER.unpack_from(reply)
    if kind == _NLMSG_ERROR:
        error = -struct.unpack_from("=i", reply, _NLMSG_HEADER.size)[0]
        if error == errno.ENOENT:
            return None
        raise OSError(error, os.strerror(error))
    found_family, state = reply[_NLMSG_HEADER.size], reply[_NLMSG_HEADER.size + 1]  # then timer, retrans
    sport, dport, src, dst = _DIAG_SOCKID.unpack_from(reply, _NLMSG_HEADER.size + 4)
    sockid_end = _NLMSG_HEADER.size + 4 + _DIAG_SOCKID.size + 12  # + interface and cookie
    _, _, _, uid, inode = _DIAG_MESSAGE_TAIL.unpack_from(reply, sockid_end)
    # The ends the kernel reports, not the ones asked for: a listener's differ.
    return TcpRow(local=(_diag_ip(found_family, src), sport), remote=(_diag_ip(found_family, dst), dport),
                  state=state, uid=uid, inode=inode)


@functools.lru_cache(maxsize=256)
def _diag_ip(family: int, packed: bytes) -> IPAddress:
    return ipaddress.IPv4Address(packed[:4]) if family == socket.AF_INET else ipaddress.IPv6Address(packed)


class _SockDiagSocket:
    """One netlink socket for the process's sock_diag questions, asked one at a time.

    A socket per question cost four more system calls (socket, two polls for its timeout, close)
    on every connection's way. Each question has its own sequence number and only the answer
    carrying it is taken, so an answer that came too late for an earlier question is skipped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._sequence = 0

    def ask(self, message: Callable[[int], bytes]) -> bytes:
        """The answer to ``message(sequence)``; OSError when sock_diag cannot be used or does not
        answer within a second (the socket is then made anew for the next question)."""
        with self._lock:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
                self._socket.setblocking(False)  # the kernel answers within send(): no wait, normally
            self._sequence = self._sequence % 0xFFFFFFFF + 1
            try:
                return self._exchange(self._socket, message(self._sequence), self._sequence)
            except OSError:
                self._socket.close()
                self._socket = None
                raise

    @staticmethod
    def _exchange(netlink: socket.socket, request: bytes, sequence: int) -> bytes:
        netlink.send(request)
        deadline = time.monotonic() + 1.0
        while True:
            try:
                reply = netlink.recv(4096)
            except BlockingIOError:
                left = deadline - time.monotonic()
                poller = select.poll()  # not select(): descriptors above 1023 are fine
                poller.register(netlink, select.POLLIN)
                if left <= 0 or not poller.poll(max(1, round(left * 1000))):
                    raise TimeoutError("sock_diag did not answer within 1 s") from None
                continue
            if len(reply) >= _NLMSG_HEADER.size and _NLMSG_HEADER.unpack_from(reply)[3] == sequence:
                return reply


_SOCK_DIAG = _SockDiagSocket()


def _lookup_tcp_client(sock: socket.socket) -> tuple[str, TcpRow | None]:
    """Our peer's address as text and the row of its socket, if it is a socket of this machine."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        raise ValueError(f"tcp_peer needs a TCP socket, not {sock.family!r}/{sock.type!r}")
    try:
        peername, sockname = sock.getpeername(), sock.getsockname()
    except OSError:  # ENOTCONN: reset before we looked
        return "(disconnected)", None
    client, server = endpoint_of(peername), endpoint_of(sockname)
    address = _inet_address(peername)
    rows: list[TcpRow | None] = []
    try:
        for family in (socket.AF_INET, socket.AF_INET6):
            rows.append(_diag_lookup(family, client, server))
            if client_owner_doubt(rows[-1]) is None:
                break  # the usual case: one question to the kernel
    except OSError:  # no sock_diag (an old or restricted kernel): read /proc
        # The client's socket is in tcp6 if it is an IPv6 socket, even one using a mapped IPv4
        # address, and in tcp otherwise; an IPv4 peer may therefore be in either table.
        tables = (True,) if client[0].version == 6 and client[0].ipv4_mapped is None else (False, True)
        rows = [find_client_row(_load_rows(ipv6), client, server) for ipv6 in tables]
    return address, find_client_row(filter(None, rows), client, server)


def tcp_peer(sock: socket.socket, want_pid: bool = False) -> Peer:
    """Who opened this accepted TCP connection, if it was opened from this machine.

    The uid is None when no socket of this machine (and network namespace) is the other end:
    a remote client, or a local one that is already gone. The pid is looked up only with
    ``want_pid``, and is None if the process cannot be found (see :func:`pid_of_socket_inode`).
    """
    address, row = _lookup_tcp_client(sock)
    return _client_peer(address, row, want_pid)


def _client_peer(address: str, row: TcpRow | None, want_pid: bool) -> Peer:
    doubt = client_owner_doubt(row)
    if row is None or doubt is not None:
        return Peer(uid=None, pid=None, address=address, unknown_because=doubt)
    return Peer(uid=row.uid, pid=pid_of_socket_inode(row.inode) if want_pid else None, address=address)


def find_listener_row(rows: Iterable[TcpRow], server: Endpoint) -> TcpRow | None:
    """The socket listening at ``server``: one bound to its address, else one bound to the
    unspecified address of its family, else a dual-stack IPv6 one (as the kernel chooses)."""
    host, port = _plain(server)
    ranked: dict[int, TcpRow] = {}
    for row in rows:
        bound, bound_port = _plain(row.local)
        if row.state != TCP_LISTEN or bound_port != port:
            continue
        if bound == host:
            ranked.setdefault(0, row)
        elif bound.is_unspecified:
            ranked.setdefault(1 if bound.version == host.version else 2, row)
    return ranked[min(ranked)] if ranked else None


def listener_owner_doubt(row: TcpRow | None) -> str | None:
    """Why ``row`` does not tell for certain who listens; None when it does."""
    if row is None:
        return "nothing listens there any more"
    if row.state != TCP_LISTEN or row.inode == 0:
        return f"the socket found there ({tcp_state_name(row.state)}) is not a listener held by a process"
    return None


def tcp_server_owner(sock: socket.socket) -> Peer:
    """Who listens where this TCP connection, opened by us, goes: the owner of the listening socket.

    Not the owner of the socket that serves our connection: until the server calls accept(), that
    socket is held by no process, and the kernel reports it with inode 0 and a default uid. The
    listener's owner is the one whose program accepts it.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        raise ValueError(f"tcp_server_owner needs a TCP socket, not {sock.family!r}/{sock.type!r}")
    try:
        peername, sockname = sock.getpeername(), sock.getsockname()
    except OSError:  # ENOTCONN: reset before we looked
        return Peer(uid=None, pid=None, address="(disconnected)", unknown_because="the connection is gone")
    server, ours = endpoint_of(peername), endpoint_of(sockname)
    address = _inet_address(peername)
    row = _listener_row(server, ours[0])
    doubt = listener_owner_doubt(row)
    if row is None or doubt is not None:
        return Peer(uid=None, pid=None, address=address, unknown_because=doubt)
    return Peer(uid=row.uid, pid=None, address=address)


def _listener_row(server: Endpoint, source: IPAddress) -> TcpRow | None:
    """The socket listening at ``server`` that a connection from ``source`` would reach.
    PeerLookupError when neither sock_diag nor /proc can tell."""
    try:
        # No connected socket has remote port 0, so the kernel answers with the listener.
        family = socket.AF_INET if _plain(server)[0].version == 4 else socket.AF_INET6
        return _diag_lookup(family, server, (source, 0))
    except OSError:  # no sock_diag: read /proc; a dual-stack listener is in tcp6
        return find_listener_row([*_load_rows(False), *_load_rows(True)], server)


def identify_server(sock: socket.socket) -> Peer:
    """Who listens where this connection, opened by us, goes (SO_PEERCRED of a unix socket names
    the process that called listen())."""
    if sock.family == socket.AF_UNIX:
        return unix_peer(sock)
    return tcp_server_owner(sock)


def pid_of_socket_inode(inode: int, deadline: float | None = None) -> int | None:
    """The pid of a process holding the socket ``socket:[inode]``, by scanning /proc/*/fd.

    Best effort: processes we may not look into (other users' unless we are root, or /proc
    mounted with hidepid) and processes that exit during the scan are skipped. When several
    processes share the socket (inherited across fork), the lowest-numbered one found first is
    returned. It reads a link per open file on the machine (any user can open hundreds of
    thousands), so call it only when needed; past ``deadline`` (``time.monotonic()``) it gives up.
    """
    if inode <= 0:  # orphaned and TIME_WAIT sockets have no inode
        return None
    target = f"socket:[{inode}]"
    try:
        pids = sorted(int(name) for name in os.listdir(PROC) if name.isdigit())
    except OSError:
        return None
    for pid in pids:
        if _holds_link(f"{PROC}/{pid}/fd", target, deadline):
            return pid
        if deadline is not None and time.monotonic() > deadline:
            return None
    return None


_DEADLINE_CHECK_EVERY = 1024  # descriptors read between looks at the clock


def _holds_link(fd_directory: str, target: str, deadline: float | None = None) -> bool:
    try:
        with os.scandir(fd_directory) as fds:
            for number, fd in enumerate(fds, 1):
                try:
                    if os.readlink(fd.path) == target:
                        return True
                except OSError:  # closed since the listing
                    continue
                if deadline is not None and number % _DEADLINE_CHECK_EVERY == 0 and time.monotonic() > deadline:
                    return False
    except OSError:  # gone, or not ours to look into
        return False
    return False


# --- deciding -------------------------------------------------------------------------------


def identify_peer(sock: socket.socket, want_pid: bool = False) -> Peer:
    """:func:`unix_peer` or :func:`tcp_peer`, depending on the socket's family."""
    if sock.family == socket.AF_UNIX:
        return unix_peer(sock)
    return tcp_peer(sock, want_pid=want_pid)


def _own_uid() -> frozenset[int]:
    return frozenset({os.getuid()})


@dataclass(frozen=True)
class PeerPolicy:
    """Which local users may use a tunnel: by default only the user running the agent."""

    allowed_uids: frozenset[int] = field(default_factory=_own_uid)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_uids", frozenset(self.allowed_uids))

    @classmethod
    def allowing(cls, uids: Iterable[int]) -> PeerPolicy:
        """The users ``uids`` (a configuration's ``allowed_uids``), or only the agent's own user when it names none."""
        return cls(frozenset(uids or (os.getuid(),)))

    def allows(self, peer: Peer) -> bool:
        return peer.uid is not None and peer.uid in self.allowed_uids

    def check(self, peer: Peer) -> None:
        """Return if ``peer`` may use the tunnel, else raise :class:`PeerRefusedError`."""
        if peer.uid is None:
            raise UnidentifiedPeerError(
                f"refused unidentified local connection from {peer.address}: the user who opened it "
                f"cannot be established with certainty: {peer.unknown_because or 'unknown reason'}; "
                "a connection that could be anyone's is refused", peer)
        if peer.uid not in self.allowed_uids:
            raise DisallowedUserError(peer, self._who_may())

    def _who_may(self) -> str:
        if not self.allowed_uids:
            return "no uid may use this tunnel (allowed_uids is empty)"
        uids = ", ".join(map(str, sorted(self.allowed_uids)))
        noun = "uid" if len(self.allowed_uids) == 1 else "uids"
        return f"only {noun} {uids} may use this tunnel (allowed_uids)"


def admit_peer(sock: socket.socket, policy: PeerPolicy, *, name_refused_process: bool = True) -> Peer:
    """Identify the peer of an accepted socket and check it against ``policy``.

    Returns the peer if let in. The costly pid lookup of TCP peers is done only for a refusal, so
    that its message names the process; not even then without ``name_refused_process``: the accept
    loops refuse without it, as another user holding many descriptors makes each lookup last seconds
    (the refusal carries the socket's inode: :meth:`PeerRefusedError.naming_the_process` looks it
    up later, for the one refusal a minute that is logged in full).
    """
    if sock.family == socket.AF_UNIX:
        peer = unix_peer(sock)
        policy.check(peer)
        return peer
    address, row = _lookup_tcp_client(sock)
    peer = _client_peer(address, row, want_pid=False)
    if not policy.allows(peer):
        if peer.uid is not None and row is not None:
            peer = _client_peer(address, row, want_pid=True) if name_refused_process else \
                replace(peer, socket_inode=row.inode)
        policy.check(peer)
    return peer


# --- listeners ------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for "localhost", 127.0.0.0/8 and ::1 literally; any other name or address is not."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if address.version == 4:
        return address.is_loopback
    return address == ipaddress.IPv6Address("::1")


def create_tcp_listener(host: str, port: int, unsafe_listen: bool = False) -> socket.socket:
    """A TCP socket listening on ``host``:``port``; only loopback unless ``unsafe_listen``."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if not 0 <= port <= 65535:
        raise ListenerError(f"cannot listen on {where}: the port must be between 0 and 65535")
    if not unsafe_listen and not is_loopback(host):
        raise NonLoopbackListenError(
            f"refusing to listen on {where}: it is not a loopback address, so another machine could "
            "connect through this tunnel and act with the clinician's card. Listen on 127.0.0.1 or "
            "::1; if other machines really must connect (and a firewall you control limits which), "
            "set `unsafe_listen = true` for this listener")
    family, sockaddr = _bind_address(host, port, where)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        bind_before_the_address_exists(sock, sockaddr)
        sock.listen(LISTEN_BACKLOG)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:  # the holder is named by the agent's listeners (naming_the_holder)
            raise PortInUseError(f"cannot listen on {where}: {error.strerror}", where, endpoint_of(sockaddr)) from None
        raise ListenerError(f"cannot listen on {where}: {error.strerror or error}") from None
    return sock


KEEP_THE_PORT = ("To keep the port across restarts, let systemd hold it (card-agent.socket), or listen on a unix "
                 "socket or a port below 1024 (docs/security.md)")


def port_in_use(where: str, address: Endpoint, cannot: str, keep: str = KEEP_THE_PORT) -> PortInUseError:
    """The error for a TCP address another socket holds, naming its owner (see
    :meth:`PortInUseError.naming_the_holder`); its message begins with ``cannot``, and says how to
    ``keep`` the port when another user holds it."""
    host, port = address
    if host.is_unspecified:  # a wildcard listener also takes the connections to loopback
        host = ipaddress.IPv4Address("127.0.0.1") if host.version == 4 else ipaddress.IPv6Address("::1")
    try:
        row = _listener_row((host, port), host)
    except PeerLookupError as error:
        return PortInUseError(f"{cannot}: the address is already in use (by whom cannot be "
                              f"told: {error})", where, address, cannot=cannot, keep=keep)
    if row is None or listener_owner_doubt(row) is not None:
        return PortInUseError(f"{cannot}: the address is already in use, by a socket that is not "
                              "listening (a connection's end, or a program about to listen): try again in a moment, "
                              "or find it with `ss -tanpe`", where, address, cannot=cannot, keep=keep)
    holder = f"uid {row.uid} ({user_name(row.uid)})"
    find = f"find the program with `ss -ltnpe 'sport = :{port}'`"
    if row.uid == os.geteuid():
        return PortInUseError(f"{cannot}: it is already in use by {holder}, the agent's own user: "
                              f"is another card agent (or an earlier one) still running? {find}", where, address,
                              row.uid, cannot=cannot, keep=keep)
    return PortInUseError(
        f"{cannot}: it is already in use by {holder}: another user may be waiting for your "
        f"applications' associations, to read what they send (in plain text) to this port; {find} and stop it, "
        f"and do not send anything there until the agent listens again. {keep}",
        where, address, row.uid, cannot=cannot, keep=keep)


def user_name(uid: int) -> str:
    """The account name of ``uid``, for a message; "no account" when the account database has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "no account"


# Linux's IP_FREEBIND and IPV6_FREEBIND (linux/in.h, linux/in6.h), which Python's socket module lacks.
_FREEBIND = ({socket.AF_INET: (socket.IPPROTO_IP, 15), socket.AF_INET6: (socket.IPPROTO_IPV6, 78)}
             if sys.platform == "linux" else {})


def bind_before_the_address_exists(sock: socket.socket, sockaddr: tuple) -> None:
    """Bind, also to an address this machine does not have yet, where the system allows it.

    An inbound listener's address is the workstation's on the hospital network, which may come up
    after the agent starts (Wi-Fi, a slow DHCP server, IPv6's duplicate address detection); without
    this the agent ended at start-up ("Cannot assign requested address") and its tunnels with it.
    Bound as systemd's FreeBind= binds, the listener receives connections once the address exists."""
    try:
        sock.bind(sockaddr)
    except OSError as error:
        if error.errno != errno.EADDRNOTAVAIL or sock.family not in _FREEBIND:
            raise
        sock.setsockopt(*_FREEBIND[sock.family], 1)
        sock.bind(sockaddr)


def is_address_of_this_machine(host: str) -> bool:
    """Whether the listen address ``host`` is one this machine has now (see
    :func:`bind_before_the_address_exists`); a name that does not resolve counts as one."""
    try:
        family, sockaddr = _bind_address(host, 0, host)
    except ListenerError:
        return True
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(sockaddr)
        except OSError as error:
            return error.errno != errno.EADDRNOTAVAIL
    return True


def listen_address(host: str) -> IPAddress | None:
    """The address a listener on ``host`` binds: `localhost` is 127.0.0.1, never looked up (/etc/hosts
    could map it to an address other machines reach); an address literal is itself; None for a host
    name (looked up when bound, only reachable with unsafe_listen)."""
    if host.lower() == "localhost":
        return ipaddress.IPv4Address("127.0.0.1")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _bind_address(host: str, port: int, where: str) -> tuple[socket.AddressFamily, tuple]:
    address = listen_address(host)
    if address is not None:
        return ((socket.AF_INET, (str(address), port)) if address.version == 4
                else (socket.AF_INET6, (str(address), port, 0, 0)))
    try:  # a name: only reachable with unsafe_listen
        family, _type, _proto, _name, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, IndexError) as error:
        raise ListenerError(f"cannot listen on {where}: cannot resolve {host!r}: {error}") from None
    return family, sockaddr


def create_unix_listener(path: str, reachable_by: Iterable[int] = ()) -> socket.socket:
    """A unix socket listening at ``path``, in a directory of ours.

    Private by default: socket 0600 in a 0700 directory, so only our own user can connect. When
    ``reachable_by`` names other users (a tunnel whose allowed_uids does), those users must be able
    to connect() so that the agent can tell them apart: the socket is 0666 in a 0711 directory
    (others may pass through it, not list it), exactly as anyone can connect to loopback TCP, and
    SO_PEERCRED with the tunnel's allowed_uids decides. Every directory above must let those users
    through, else :class:`UnreachableSocketError`. The directory is created if missing. A socket file
    left by a previous run is replaced when nothing listens on it any more.
    """
    others = frozenset(reachable_by) - {os.geteuid(), 0}  # root needs no permission bits
    directory = os.path.dirname(os.path.abspath(path))
    if others:
        _check_reachable(path, directory, others)
    _ensure_socket_directory(directory, shared=bool(others))
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        sock.bind(path)
        bound = True
        # Until this chmod the socket has the umask's mode; a private directory keeps others out,
        # and a shared socket's peers are checked on accept anyway.
        os.chmod(path, SHARED_SOCKET_FILE_MODE if others else SOCKET_FILE_MODE)
        sock.listen(LISTEN_BACKLOG)
    except OSError as error:
        sock.close()
        if bound:
            _unlink_quietly(path)
        if error.errno == errno.EADDRINUSE:  # another agent started at the same moment
            raise SocketInUseError(f"another process is already listening on {path}; stop it or "
                                   "choose another socket path") from None
        raise ListenerError(f"cannot listen on unix socket {path}: {error.strerror or error}") from None
    return sock


@dataclass(frozen=True)
class SocketFile:
    """The file a unix listener of ours was bound to, by identity (device and inode).

    A socket keeps listening when its file goes: logind removes /run/user/UID at the user's last
    logout, tmpfiles and administrators clean directories. Nobody can connect to it any more then,
    and nothing else tells: the listener's owner looks (one lstat) and makes it again."""

    path: str
    device: int
    inode: int

    @classmethod
    def bound_at(cls, path: str) -> SocketFile:
        """The socket file just bound at ``path`` (OSError when it is already gone)."""
        info = os.lstat(path)
        return cls(path, info.st_dev, info.st_ino)

    def lost(self) -> str | None:
        """How ``path`` stopped naming this socket ("was removed", ...); None while it does."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            directory = os.path.dirname(self.path)
            return "was removed" if os.path.isdir(directory) else f"was removed with its directory {directory}"
        except OSError as error:  # its directory was replaced by one we may not search (another user's)
            return f"can no longer be looked at ({error.strerror})"
        if (info.st_dev, info.st_ino) != (self.device, self.inode):
            return "was replaced by another file"
        return None


def _ensure_socket_directory(directory: str, shared: bool) -> None:
    mode = SHARED_SOCKET_DIRECTORY_MODE if shared else SOCKET_DIRECTORY_MODE
    try:
        os.mkdir(directory, mode)
    except FileExistsError:
        pass
    except FileNotFoundError:
        parent = os.path.dirname(directory)
        raise ListenerError(
            f"cannot create the socket directory {directory}: its parent {parent} does not exist (the agent "
            f"creates only the socket's own directory): create {parent}, or put the socket in a directory "
            f"that exists, e.g. unix:/run/user/{os.getuid()}/card-agent/NAME.sock") from None
    except OSError as error:
        raise ListenerError(f"cannot create the socket directory {directory}: {error.strerror}") from None
    else:
        os.chmod(directory, mode)  # mkdir's mode went through the umask
    try:
        info = os.lstat(directory)
    except OSError as error:
        raise ListenerError(f"cannot check the socket directory {directory}: {error.strerror}") from None
    _check_private_directory(directory, info)
    if shared and stat.S_IMODE(info.st_mode) != SHARED_SOCKET_DIRECTORY_MODE:
        os.chmod(directory, SHARED_SOCKET_DIRECTORY_MODE)  # ours (checked): let the allowed users pass


def _check_private_directory(directory: str, info: os.stat_result) -> None:
    required = f"it must be a directory owned by uid {os.geteuid()} (the agent's user) with mode 0700 (or 0711)"
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeSocketDirectoryError(
            f"the socket directory {directory} is a symbolic link; {required}: replace the link by such a directory")
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeSocketDirectoryError(f"the socket directory {directory} is not a directory; {required}")
    if info.st_uid != os.geteuid():
        raise UnsafeSocketDirectoryError(
            f"the socket directory {directory} is owned by uid {info.st_uid}, who could replace the "
            f"agent's socket; {required}: remove it so that the agent creates it, or choose another path")
    mode = stat.S_IMODE(info.st_mode)
    # Passing through (x) lets others reach a socket whose own mode allows them; reading or writing
    # the directory would let them list or replace the agent's sockets.
    if mode not in (SOCKET_DIRECTORY_MODE, SHARED_SOCKET_DIRECTORY_MODE):
        raise UnsafeSocketDirectoryError(
            f"the socket directory {directory} has mode {mode:04o}, so other users may reach the "
            f"agent's sockets; {required}: run `chmod 700 {directory}`")


def _check_reachable(path: str, directory: str, uids: frozenset[int]) -> None:
    """Refuse a socket that an allowed user could not reach: connect() needs search permission on
    every directory above it, and without it the user gets EACCES the agent never sees."""
    ancestor = os.path.dirname(directory)
    while True:
        try:
            info = os.stat(ancestor)
        except OSError as error:
            raise ListenerError(f"cannot check the directory {ancestor} above {path}: {error.strerror}") from None
        blocked = sorted(uid for uid in uids if not _may_search(info, uid))
        if blocked:
            who, them = ", ".join(map(str, blocked)), "them" if len(blocked) > 1 else "it"
            raise UnreachableSocketError(
                f"uid {who} (allowed_uids) could not connect to {path}: the directory {ancestor} (owner uid "
                f"{info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}) does not let {them} "
                "through, so connect() would fail with 'permission denied' before the agent sees it. Put the "
                "socket in a directory every allowed user can pass through (e.g. /run/card-agent/pacs.sock), "
                "or listen on loopback TCP")
        parent = os.path.dirname(ancestor)
        if parent == ancestor:
            return
        ancestor = parent


def _may_search(info: os.stat_result, uid: int) -> bool:
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid == uid:
        return bool(mode & stat.S_IXUSR)
    if info.st_gid in _groups_of(uid):
        return bool(mode & stat.S_IXGRP)
    return bool(mode & stat.S_IXOTH)


def _groups_of(uid: int) -> frozenset[int]:
    """The user's primary and supplementary groups as the account database has them (none if
    the uid has no account: then only the "others" bits apply to it)."""
    try:
        account = pwd.getpwuid(uid)
    except KeyError:
        return frozenset()
    return frozenset({account.pw_gid, *(group.gr_gid for group in grp.getgrall() if account.pw_name in group.gr_mem)})


def _remove_stale_socket(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as error:
        raise ListenerError(f"cannot check the socket path {path}: {error.strerror}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketPathError(f"{path} exists and is not a socket; it was left alone: remove it or "
                              "choose another socket path")
    if _something_listens(path):
        raise SocketInUseError(f"another process is already listening on {path} (another card agent?); "
                               "stop it or choose another socket path")
    _unlink_quietly(path)


def _something_listens(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_STALE_PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except (TimeoutError, BlockingIOError):  # a full backlog: someone listens but is busy
        return True
    except OSError as error:
        raise ListenerError(f"cannot tell whether something listens on {path}: {error.strerror or error}") from None
    finally:
        probe.close()
    return True


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
