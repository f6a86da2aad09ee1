"""Host names looked up so that neither a connection's deadline nor the card session's end waits for DNS.

``getaddrinfo`` cannot be interrupted, and when no DNS server answers, glibc gives up only after
``timeout`` x ``attempts`` per server in resolv.conf (5 s x 2 each by default: 10 s with one server,
30 s with three). That is longer than a tunnel's ``connect_timeout``, and much longer than a pulled
card's session may take to end. So a name is looked up in a thread of its own, and the connection
waits for the answer, its deadline or the end of its card session, whichever comes first.

Lookups of the same name at the same time share one thread: a DNS outage then holds one thread
per name, not one per association. Nothing is cached beyond that: each association asks again, so
a PACS moved to a new address is found by the next one.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import socket
import threading
from typing import Any

AddressInfo = tuple[Any, ...]  # one getaddrinfo() row: family, type, proto, canonname, sockaddr


class ResolverTimeoutError(TimeoutError):
    """No DNS answer for the name within the time allowed."""


class ResolutionGivenUpError(Exception):
    """Stopped waiting for DNS: the caller's ``given_up`` future completed (with this reason)."""


_lookups: dict[tuple[str, int], concurrent.futures.Future[list[AddressInfo]]] = {}
_lookups_lock = threading.Lock()


def resolve_stream(host: str, port: int, timeout: float,
                   given_up: concurrent.futures.Future[str]) -> list[AddressInfo]:
    """``socket.getaddrinfo(host, port, type=SOCK_STREAM)``, waited for at most ``timeout`` seconds
    and no longer than until ``given_up`` completes.

    Raises ``socket.gaierror`` when the name does not resolve, :class:`ResolverTimeoutError` when
    DNS does not answer in time, :class:`ResolutionGivenUpError` when ``given_up`` completed first.
    An address (IPv4 or IPv6 literal) involves no DNS and is answered at once.
    """
    if _is_address(host):
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    lookup = _shared_lookup(host, port)
    waited: list[concurrent.futures.Future[Any]] = [lookup, given_up]
    done, _ = concurrent.futures.wait(waited, timeout, return_when=concurrent.futures.FIRST_COMPLETED)
    if lookup in done:
        return lookup.result()
    if given_up in done:
        raise ResolutionGivenUpError(given_up.result())
    raise ResolverTimeoutError(f"no DNS answer for {host} within {timeout:g} s")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.partition("%")[0])  # an IPv6 scope id ("fe80::1%eth0") is no name
    except ValueError:
        return False
    return True


def _shared_lookup(host: str, port: int) -> concurrent.futures.Future[list[AddressInfo]]:
    key = (host, port)
    with _lookups_lock:
        lookup = _lookups.get(key)
        if lookup is not None:
            return lookup
        # Made directly rather than by an executor: an executor's threads are joined at exit, and
        # one stuck in getaddrinfo must not hold up the card-session process's end.
        lookup = concurrent.futures.Future()
        _lookups[key] = lookup
    try:
        threading.Thread(target=_look_up, args=(key, lookup), name=f"resolve-{host}", daemon=True).start()
    except RuntimeError as error:  # no thread to be had: this lookup fails, the next one tries again
        with _lookups_lock:
            del _lookups[key]
        lookup.set_exception(OSError(f"no thread to look up {host}: {error}"))
    return lookup


def _look_up(key: tuple[str, int], lookup: concurrent.futures.Future[list[AddressInfo]]) -> None:
    try:
        try:
            answer = socket.getaddrinfo(*key, type=socket.SOCK_STREAM)
        finally:
            with _lookups_lock:
                del _lookups[key]  # the next association asks DNS again
    except Exception as error:  # gaierror, or UnicodeError for a name IDNA cannot encode: every waiter gets it
        lookup.set_exception(error)
    else:
        lookup.set_result(answer)
