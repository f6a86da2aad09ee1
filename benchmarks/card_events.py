#!/usr/bin/env python3
"""Card events: how fast the agent lets go of a pulled card and takes up an inserted one. Not part
of the test suite; do not run it while the tests run (it measures latencies).

    .venv/bin/python benchmarks/card_events.py [--pulls 20] [--associations 3] [--keep]

For each configuration, ``--pulls`` times: sign in, open ``--associations`` DICOM associations
through the agent to a TLS PACS (pynetdicom SCP) and hold them, wait a random 0-400 ms (pcscd
polls the vpcd reader every 400 ms: a fixed delay would always hit the same phase), pull the
card, and time until every held association saw its connection end (A-ABORT or close) on the
client side. The agent logs how long closing took once it had seen the removal
(``event=sign-out ... closed_in_ms``); "observed" is the difference. Then insert the next card
and time until the agent logged the sign-in (the PIN comes from ``env:``, no typing).

Configurations:
1. the fault-injecting PKCS#11 module around SoftHSM (tests/fault_pkcs11; ``present = 0``);
2. the virtual CAC (pcscd + vpcd + libcacard + OpenSC, tests/virtual_card), with PC/SC events;
3. the same with PC/SC events off (``CARD_AGENT_CARD_EVENTS=poll``): PKCS#11 polling alone;
4. the virtual CAC with PC/SC events, each APDU answered ``--apdu-delay-ms`` (default 20) late: a
   stand-in for a real card's pace (the virtual card answers in well under a millisecond).
The virtual card counts the APDUs it answers: the report gives how many a sign-in costs (OpenSC's
probe of the card is most of them; it is paid once per process that loads OpenSC).

Targets (issue "Card sessions"): removal observed within 250 ms, everything closed within 100 ms
after that. Issue "Faster than stunnel": card present -> signed in <= 2.5 s on the virtual CAC,
<= 0.5 s on SoftHSM. The report (markdown) goes to stdout, progress to stderr.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import run as bench  # noqa: E402  (benchmarks/run.py: provisioning, the agent, the lean DICOM client)
from fault_pkcs11 import FaultControl  # noqa: E402
from fault_pkcs11 import build as build_fault_module  # noqa: E402
from peers.pynetdicom_scp import tls_scp  # noqa: E402
from run import ASSOCIATE_RQ, LOOPBACK, BenchError, git_commit, machine_info, print_report, running_agent, say  # noqa: E402
from virtual_card.nssdb import make_card  # noqa: E402
from virtual_card.pcscd import StackUnavailable, pcscd_with_vpcd  # noqa: E402
from virtual_card.reader import VirtualReader  # noqa: E402

TARGET_OBSERVED_MS = 250
TARGET_CLOSED_MS = 100
ANY_CARD = ""  # the agent's [identity] token: cards are swapped (alice/bob, carol/dave), so any card
PCSCD_POLL_S = 0.4  # pcscd's polling of drivers that cannot signal (vpcd): PCSCLITE_STATUS_POLL_RATE
A_ABORT = 0x07


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class HeldAssociation:
    """An accepted association kept open; a thread records when the connection ends."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(ASSOCIATE_RQ)
        header = self._read(6)
        if header[0] != 0x02:
            raise BenchError(f"association not accepted (PDU type {header[0]:#04x})")
        self._read(int.from_bytes(header[2:], "big"))  # the rest of the A-ASSOCIATE-AC
        self.ended_at: float | None = None
        self.how = ""
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _read(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise BenchError("the agent closed the association before accepting it")
            data += chunk
        return data

    def _watch(self) -> None:
        self.sock.settimeout(None)
        try:
            while chunk := self.sock.recv(65536):
                if chunk[:1] == bytes([A_ABORT]):
                    self.how = "A-ABORT"
                    break
            else:
                self.how = self.how or "closed"
        except OSError as error:
            self.how = f"error {error.errno}"
        self.ended_at = time.monotonic()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        self.sock.close()


@dataclass
class Series:
    label: str
    events: str
    closed_ms: list[float] = field(default_factory=list)    # pull -> last held association ended
    agent_close_ms: list[float] = field(default_factory=list)  # the agent's own closed_in_ms
    ready_ms: list[float] = field(default_factory=list)     # card present -> sign-in logged
    apdus: list[int] = field(default_factory=list)          # APDUs the card answered from insertion to sign-in
    endings: dict[str, int] = field(default_factory=dict)
    note: str = ""

    @property
    def observed_ms(self) -> list[float]:
        return [c - a for c, a in zip(self.closed_ms, self.agent_close_ms, strict=False)]


def _stat(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} / {p95(values):.0f}" if values else "n/a"


def _wait_log(agent: bench.Agent, text: str, count: int, timeout: float) -> float:
    """Poll the agent's log every 5 ms until ``text`` occurs ``count`` times; the time it did."""
    deadline = time.monotonic() + timeout
    while agent.log().count(text) < count:
        if time.monotonic() > deadline:
            raise BenchError(f"{text!r} not logged {count} times within {timeout:g} s:\n{agent.log()[-3000:]}")
        time.sleep(0.005)
    return time.monotonic()


def measure(agent: bench.Agent, series: Series, pulls: int, associations: int,
            insert: Callable[[int], float], pull: Callable[[], float], ready_timeout: float,
            apdus: Callable[[], int] | None = None) -> None:
    """``insert(n)`` puts the n-th card in and returns when it was present; ``pull()`` pulls the
    card and returns when it did; ``apdus()``, where the card can count them, says how many APDUs the
    card in the reader has answered since its insertion."""
    port = agent.ports["pacs"]
    # What the agent itself says it uses ("PC/SC events from pcscd, and polling every 50 ms", ...)
    _wait_log(agent, "card events: ", 1, 10)  # logged just after "ready:"
    found = re.search(r"card events: (PC/SC events|polling every \d+ ms)", agent.log())
    series.events = "PC/SC events + polling" if found and found.group(1) == "PC/SC events" else "polling only"
    insert(0)
    _wait_log(agent, "event=sign-in ", 1, ready_timeout)
    for index in range(pulls):
        held = [HeldAssociation(port) for _ in range(associations)]
        time.sleep(random.uniform(0, PCSCD_POLL_S))
        pulled = pull()
        for association in held:
            association.join(10)
        if any(a.ended_at is None for a in held):
            raise BenchError(f"pull {index + 1}: an association was still open 10 s after the pull")
        series.closed_ms.append((max(a.ended_at for a in held if a.ended_at) - pulled) * 1000)
        for association in held:
            series.endings[association.how] = series.endings.get(association.how, 0) + 1
        _wait_log(agent, "event=sign-out ", index + 1, 10)
        last = [line for line in agent.log().splitlines() if "event=sign-out " in line][-1]
        series.agent_close_ms.append(float(re.search(r"closed_in_ms=(\d+)", last).group(1)))
        present_at = insert(index + 1)
        signed_in = _wait_log(agent, "event=sign-in ", index + 2, ready_timeout)
        series.ready_ms.append((signed_in - present_at) * 1000)
        if apdus is not None:
            series.apdus.append(apdus())
        say(f"{series.label} ({series.events}) pull {index + 1}/{pulls}: closed {series.closed_ms[-1]:.0f} ms "
            f"(agent {series.agent_close_ms[-1]:.0f} ms), ready {series.ready_ms[-1]:.0f} ms")


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results: list[Series] = []

    def fault_module(self, work: Path, provisioned: bench.Benchmark, pacs_port: int) -> None:
        module = build_fault_module(work / "fault-build")
        card = FaultControl(work / "reader.ctl")
        card.show("alice")
        card.remove_card()
        series = Series("fault_pkcs11 (SoftHSM)", "")
        names = ("alice", "bob")

        def insert(index: int) -> float:
            card.show(names[index % 2])
            card.insert_card()
            return time.monotonic()

        def pull() -> float:
            pulled = time.monotonic()
            card.remove_card()
            return pulled

        with running_agent(work, "fault", provisioned.pki, provisioned.softhsm_conf, str(module),
                           [("pacs", pacs_port, True)], extra_env=card.env(), token=ANY_CARD) as agent:
            measure(agent, series, self.args.pulls, self.args.associations, insert, pull, ready_timeout=30)
        self.results.append(series)

    def virtual_cac(self, work: Path, provisioned: bench.Benchmark, pacs_port: int) -> None:
        try:
            with contextlib.ExitStack() as stack:
                daemon = stack.enter_context(pcscd_with_vpcd(work / "pcscd"))
                say(f"pcscd: {'started here' if daemon.started_here else 'the one already running'}")
                cards = [make_card(provisioned.pki, work / "cards" / name, name, common_name)
                         for name, common_name in (("carol", "Carol Example"), ("dave", "Dave Example"))]
                # The last row paces the card: each APDU's answer waits --apdu-delay-ms, standing in for a
                # real card's processing and transmission, which the virtual card does not have.
                for extra_env, delay in (({}, 0.0), ({"CARD_AGENT_CARD_EVENTS": "poll"}, 0.0),
                                         ({}, self.args.apdu_delay_ms)):
                    reader = VirtualReader(work / f"reader-{len(self.results)}", apdu_delay_ms=delay)
                    stack.callback(reader.close)
                    reader.check_empty()
                    series = Series("virtual CAC (OpenSC)" + (f", {delay:g} ms per APDU" if delay else ""), "")

                    def insert(index: int, reader: VirtualReader = reader) -> float:
                        reader.insert(cards[index % 2])  # returns once pcscd reports the card
                        return time.monotonic()

                    def pull(reader: VirtualReader = reader) -> float:
                        return reader.pull(wait=False)

                    with running_agent(work, f"vcac-{len(self.results)}", provisioned.pki,
                                       provisioned.softhsm_conf, "opensc", [("pacs", pacs_port, True)],
                                       extra_env=extra_env, token=ANY_CARD) as agent:
                        measure(agent, series, self.args.pulls, self.args.associations, insert, pull,
                                ready_timeout=60, apdus=reader.apdus)
                        reader.close()
                    self.results.append(series)
        except StackUnavailable as error:
            self.results.append(Series("virtual CAC (OpenSC)", "-", note=f"not measured: {error}"))

    def report(self, started: datetime.datetime, elapsed: float) -> str:
        info = machine_info(None)
        lines = [
            f"Run {started:%Y-%m-%d %H:%M} UTC, commit {git_commit()}, {elapsed / 60:.1f} min; "
            f"{info['nproc']} CPUs ({info['cpu']}), {info['os']}; {self.args.pulls} pulls per row, "
            f"{self.args.associations} open associations per pull. Milliseconds, median / p95.",
            "",
            "| card | card events | pull -> all associations ended | pull -> observed | observed -> all closed "
            "(agent) | card present -> signed in | APDUs, insertion -> signed in |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in self.results:
            if s.note:
                lines.append(f"| {s.label} | {s.events} | {s.note} | | | | |")
                continue
            apdus = (f"{statistics.median(s.apdus):.0f} ({min(s.apdus)}-{max(s.apdus)})" if s.apdus else "-")
            lines.append(f"| {s.label} | {s.events} | {_stat(s.closed_ms)} | {_stat(s.observed_ms)} | "
                         f"{_stat(s.agent_close_ms)} | {_stat(s.ready_ms)} | {apdus} |")
        lines += ["", f"Targets: observed <= {TARGET_OBSERVED_MS} ms, closed <= {TARGET_CLOSED_MS} ms after that. "
                  "How the held associations ended: " + "; ".join(
                      f"{s.label} {s.events}: " + ", ".join(f"{k} {v}" for k, v in sorted(s.endings.items()))
                      for s in self.results if s.endings)]
        return "\n".join(lines)

    def run(self) -> str:
        started = datetime.datetime.now(datetime.timezone.utc)
        clock = time.monotonic()
        base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else None
        work = Path(tempfile.mkdtemp(prefix="card-events-bench-", dir=base))
        say(f"work directory {work}")
        try:
            provisioned = bench.Benchmark(argparse.Namespace(quick=True, reps=None, samples=None, study_mb=None,
                                                             key="rsa"))
            provisioned.provision(work)
            with tls_scp(pki_dir=provisioned.pki) as pacs:
                self.fault_module(work, provisioned, pacs.port)
                self.virtual_cac(work, provisioned, pacs.port)
            return self.report(started, time.monotonic() - clock)
        finally:
            if self.args.keep:
                say(f"kept {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pulls", type=int, default=20, help="pulls per configuration (default 20)")
    parser.add_argument("--associations", type=int, default=3, help="associations held open per pull (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    parser.add_argument("--apdu-delay-ms", type=float, default=20.0,
                        help="the paced virtual-CAC row: wait before each APDU's answer (default 20)")
    args = parser.parse_args(argv)
    for name in ("OPENSSL_CONF", "CARD_AGENT_MODULE", "SOFTHSM2_CONF", "CARD_AGENT_CARD_EVENTS"):
        os.environ.pop(name, None)
    return print_report(lambda: Run(args).run())


if __name__ == "__main__":
    sys.exit(main())
