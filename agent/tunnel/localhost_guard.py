"""The other address of `localhost`, kept from other users while a tunnel listens on one of them.

Debian's and Ubuntu's /etc/hosts give `localhost` two addresses, ::1 and 127.0.0.1, and the
resolver puts ::1 first. An application told `localhost` tries them in that order unless it asks
for IPv4 only: DCMTK, pynetdicom and Java do by default; Python's `socket.create_connection`, Go,
Rust and .NET (fo-dicom) do not. While a tunnel listened on 127.0.0.1:PORT alone, any other user of
the workstation could listen on [::1]:PORT, and those applications sent it their associations, in
plain text, and took its answers for the PACS's (measured: a Python client of `localhost` reached
uid 65534's listener there, not the agent).

So the agent binds the other address and port too, without listening: no other user can bind it
(the socket has no SO_REUSEADDR, which would let another socket share a port nobody listens on),
and the kernel refuses a connection there at once, so the application goes on to the address the
tunnel listens on. The metrics endpoint's port gets the same: a scraper told `localhost` (Prometheus
is written in Go) would otherwise read another user's numbers. Bound by the supervisor, which alone
opens listeners; no card session needs it.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from dicom_card_agent.config.model import ListenAddress
from dicom_card_agent.tunnel.peer import (
    Endpoint,
    ListenerError,
    PortInUseError,
    bind_before_the_address_exists,
    endpoint_of,
    listen_address,
)

IPV4_LOCALHOST = ipaddress.IPv4Address("127.0.0.1")
IPV6_LOCALHOST = ipaddress.IPv6Address("::1")
# Said when another user holds the other address: the systemd socket unit holds the listener's own
# address across restarts, not this one.
KEEP_THE_OTHER_ADDRESS = ("Until then, use the address the agent listens on, not `localhost`; to keep both across "
                          "restarts, listen on a unix socket or a port below 1024 (docs/security.md)")


def listen_endpoint(listen: ListenAddress) -> Endpoint | None:
    """The address and port a TCP ``listen`` binds (:func:`~dicom_card_agent.tunnel.peer.listen_address`);
    None for a unix socket or a host name."""
    if listen.host is None or listen.port is None:
        return None
    address = listen_address(listen.host)
    return None if address is None else (address, listen.port)


def other_localhost_endpoint(endpoint: Endpoint) -> Endpoint | None:
    """[::1]:PORT for 127.0.0.1:PORT and the other way round; None for any other address."""
    address, port = endpoint
    if address == IPV4_LOCALHOST:
        return IPV6_LOCALHOST, port
    if address == IPV6_LOCALHOST:
        return IPV4_LOCALHOST, port
    return None


def describe(endpoint: Endpoint) -> str:
    """``127.0.0.1:PORT``, ``[::1]:PORT``: as a ``listen`` reads."""
    address, port = endpoint
    return str(ListenAddress(host=str(address), port=port))


def bound_endpoint(sock: socket.socket) -> Endpoint | None:
    """Where the TCP socket ``sock`` is bound (its port chosen by then, for `listen = "...:0"`)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return endpoint_of(sock.getsockname())


def hold_other_address(listening: socket.socket) -> socket.socket | None:
    """A socket bound (not listening) at the other `localhost` address of ``listening``'s port;
    None when ``listening`` is on neither, or this system has no such address family at all (then
    nobody can listen there). PortInUseError naming the holder when another socket has it."""
    endpoint = bound_endpoint(listening)
    other = other_localhost_endpoint(endpoint) if endpoint is not None else None
    if endpoint is None or other is None:
        return None
    address, port = other
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        guard = socket.socket(family, socket.SOCK_STREAM)
    except OSError as error:
        if error.errno == errno.EAFNOSUPPORT:  # IPv6 turned off in the kernel: no ::1 to take
            return None
        raise ListenerError(f"cannot keep {describe(other)} from other users: {error.strerror or error}") from None
    try:
        sockaddr = (str(address), port, 0, 0) if family == socket.AF_INET6 else (str(address), port)
        bind_before_the_address_exists(guard, sockaddr)  # ::1 switched off on lo now may be switched on later
    except OSError as error:
        guard.close()
        where = describe(other)
        cannot = (f"cannot keep {where} from other users (the other address of `localhost` beside "
                  f"{describe(endpoint)}, where the agent listens: applications told `localhost` may try it first)")
        if error.errno == errno.EADDRINUSE:
            raise PortInUseError(f"{cannot}: {error.strerror}", where, other, cannot=cannot,
                                 keep=KEEP_THE_OTHER_ADDRESS).naming_the_holder() from None
        raise ListenerError(f"{cannot}: {error.strerror or error}") from None
    return guard
