"""A DNS server of the test's own, and a command prefix that makes a process's resolver use it.

glibc reads its name servers from /etc/resolv.conf only (no variable names another, nor a port), so
:func:`resolving_through` runs the command in a mount namespace of its own (root only) with a
resolv.conf naming this server bind-mounted over the real one: the machine's resolver is not
touched, and the process under test resolves with the real glibc stub resolver, its timeouts and
retries included.

:class:`DnsServer` answers over UDP on port 53 of a loopback address of its own (127.53.x.y):
A and AAAA records for the names it was given, after ``delay`` seconds; "no such name" for others;
nothing at all while ``silent`` (a DNS server behind a firewall that drops queries: the resolver's
timeouts run out, 5 s x 2 attempts by default).
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import socket
import threading
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self, addresses: dict[str, list[str]], *, delay: float = 0.0) -> None:
        self.addresses = {name.rstrip(".").lower(): list(found) for name, found in addresses.items()}
        self.delay = delay
        self.silent = False
        self.questions: list[tuple[str, str]] = []  # (name, record type) in the order they came
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(20):
            self.host = f"127.53.{random.randint(0, 255)}.{random.randint(1, 254)}"
            try:
                self._sock.bind((self.host, 53))
                break
            except OSError:
                continue
        else:
            raise OSError("no free loopback address for the test DNS server")
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)
        self._thread.start()

    def __enter__(self) -> DnsServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, client = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            message = dns.message.from_wire(query)
            question = message.question[0]
            name = question.name.to_text(omit_final_dot=True).lower()
            self.questions.append((name, dns.rdatatype.to_text(question.rdtype)))
            if self.silent:
                continue
            threading.Thread(target=self._answer, args=(message, name, question.rdtype, client), daemon=True).start()

    def _answer(self, query: dns.message.Message, name: str, rdtype: int, client: tuple[str, int]) -> None:
        time.sleep(self.delay)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        if name not in self.addresses:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            version = 4 if rdtype == dns.rdatatype.A else 6
            found = [a for a in self.addresses[name] if ipaddress.ip_address(a).version == version]
            if found:
                response.answer.append(dns.rrset.from_text(query.question[0].name, 5, "IN",
                                                           dns.rdatatype.to_text(rdtype), *found))
        if not self._stop.is_set():
            with contextlib.suppress(OSError):  # closed meanwhile
                self._sock.sendto(response.to_wire(), client)


# /etc/hosts as Debian's installer and Ubuntu write it: `localhost` is ::1 and 127.0.0.1, and the
# resolver gives ::1 first (this machine's names 127.0.0.1 alone).
DEBIAN_HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def with_hosts_file(text: str, directory: Path) -> list[str]:
    """A command prefix: what follows it reads ``text`` as /etc/hosts (as :func:`resolving_through`)."""
    hosts = directory / "hosts"
    hosts.write_text(text)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)]


def resolving_through(server: DnsServer, directory: Path) -> list[str]:
    """A command prefix: what follows it runs with ``server`` as its only DNS server."""
    resolv_conf = directory / "resolv.conf"
    resolv_conf.write_text(f"nameserver {server.host}\n")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(resolv_conf)]
