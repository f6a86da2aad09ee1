"""A second host on this machine, and an address this machine gets only later.

``separate_host()``: a network namespace joined to ours by a veth pair. A PACS run inside it
(``ip netns exec``) is reached over a real link that a test can unplug: its side of the link goes
down and every packet to and from it is lost, as when a PACS's host loses power or its network.
Nothing outside this machine can reach it (the link's addresses are a /30 of 198.18.0.0/16, in
the range RFC 2544 keeps for such tests, and nothing routes them here), and the namespace, with
its end of the link, is deleted when the ``with`` block ends.

``late_address()``: an address from 198.19.0.0/16 that the loopback interface gets when the test
says so, and loses at the end.

Needs root (CAP_NET_ADMIN) and ``ip`` from iproute2, as the rest of the suite has.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

IP = "ip"
_numbers = itertools.count()
# Each test process (an xdist worker) numbers its hosts and addresses from a block of its own: the
# workers' pids are close together, so pid + n would give two workers the same address.
_BLOCK = 64


def _own_number(modulus: int) -> int:
    return (os.getpid() * _BLOCK + next(_numbers) % _BLOCK) % modulus


def _ip(*args: str) -> None:
    result = subprocess.run([IP, *args], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")


@dataclass(frozen=True)
class SeparateHost:
    """The namespace ``name``, reached at ``address``; run its programs with ``prefix + argv``. It
    reaches us at ``workstation_address`` (our end of the link)."""

    name: str
    address: str
    workstation_address: str
    link: str  # its end of the veth pair
    workstation_link: str  # ours

    @property
    def prefix(self) -> list[str]:
        return [IP, "netns", "exec", self.name]

    def unplug(self) -> None:
        """Its link goes down: from now on nothing reaches it and nothing comes back from it."""
        _ip("-n", self.name, "link", "set", self.link, "down")

    def plug(self, timeout: float = 10.0) -> None:
        """Its link comes back up; return once our end has its carrier back and has forgotten
        that the host's address did not answer (else the next connection fails at once with
        "host unreachable")."""
        _ip("-n", self.name, "link", "set", self.link, "up")
        operstate = Path(f"/sys/class/net/{self.workstation_link}/operstate")
        deadline = time.monotonic() + timeout
        while operstate.read_text().strip() != "up":
            if time.monotonic() > deadline:
                state = operstate.read_text().strip()
                raise TimeoutError(f"{self.workstation_link} is {state} {timeout} s after plug()")
            time.sleep(0.02)
        _ip("neigh", "flush", "dev", self.workstation_link)


@contextlib.contextmanager
def separate_host() -> Iterator[SeparateHost]:
    """A namespace with its own loopback and a veth link to ours; deleted at the end."""
    number = next(_numbers)
    tag = f"{os.getpid() % 100000}x{number}"
    name, ours, theirs = f"cardagent-{tag}", f"cah{tag}", f"cap{tag}"
    subnet = _own_number(16000)  # a /30 of 198.18.0.0/16 for each host this run makes
    base = 198 << 24 | 18 << 16 | subnet * 4
    our_address, their_address = (".".join(str(base + n >> shift & 255) for shift in (24, 16, 8, 0)) for n in (1, 2))
    _ip("netns", "add", name)
    try:
        _ip("link", "add", ours, "type", "veth", "peer", "name", theirs, "netns", name)
        _ip("addr", "add", f"{our_address}/30", "dev", ours)
        _ip("link", "set", ours, "up")
        _ip("-n", name, "addr", "add", f"{their_address}/30", "dev", theirs)
        _ip("-n", name, "link", "set", theirs, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        yield SeparateHost(name, their_address, our_address, theirs, ours)
    finally:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            _ip("netns", "delete", name)  # takes both ends of the link with it


@dataclass(frozen=True)
class LateAddress:
    """An address this machine does not have until :meth:`bring_up` (as when Wi-Fi or DHCP brings
    the workstation's address up after the agent started)."""

    address: str

    @property
    def prefix_length(self) -> int:
        return 128 if ":" in self.address else 32

    @property
    def listen(self) -> str:
        """The address as a ``listen`` setting's host takes it (IPv6 in brackets)."""
        return f"[{self.address}]" if ":" in self.address else self.address

    def bring_up(self) -> None:
        _ip("addr", "add", f"{self.address}/{self.prefix_length}", "dev", "lo")


@contextlib.contextmanager
def late_address(version: int = 4) -> Iterator[LateAddress]:
    """An address not on this machine yet, from 198.19.0.0/16 (in RFC 2544's test range) or, with
    ``version=6``, 2001:db8::/32 (RFC 3849's documentation range); removed from the loopback
    interface at the end if :meth:`LateAddress.bring_up` added it there."""
    number = _own_number(65000) + 1
    late = LateAddress(f"2001:db8::{number:x}" if version == 6 else f"198.19.{number >> 8}.{number & 255}")
    try:
        yield late
    finally:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            _ip("addr", "del", f"{late.address}/{late.prefix_length}", "dev", "lo")
