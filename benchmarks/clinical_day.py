#!/usr/bin/env python3
"""A compressed clinical day against one running agent: a RELIABILITY run, not a performance claim.
Not part of the test suite; run it on a quiet machine (it also reports event latencies).

    .venv/bin/python benchmarks/clinical_day.py [--quick] [--cycles 200] [--associations 5000] [--keep]

One agent (SoftHSM behind the fault-injecting PKCS#11 module, tests/fault_pkcs11; the PIN from
``env:``, so no typing; ``idle_timeout`` set) and one TLS PACS (the recording pynetdicom SCP of
tests/peers) live through ``--cycles`` card cycles. Each cycle signs a card in (alice and bob in
turn), runs its share of ``--associations`` fresh associations (A-ASSOCIATE, C-ECHO, A-RELEASE)
and a port probe, and ends in one of: the card pulled, swapped for the other one, ``lock`` and
pulled, or the idle timeout and pulled. Twice in the day (a third and two thirds of the way) the
card-session process is SIGKILLed while signed in; the agent must sign in again by itself.

It prints (markdown on stdout, progress on stderr):
- agent restarts needed: the agent had died, or its control socket stopped answering, and was
  started again (target 0);
- associations that failed while a card was signed in (the PACS is up all day) (target 0),
  associations the PACS saw under another certificate than the card signed in (target 0), and
  tracebacks and OpenSSL "Enter PIN" prompts in the agent's log (target 0);
- RSS and open descriptors of the supervisor and the card-session process at the start, the
  middle and the end of the day (target: flat; a card-session process is new after each sign-in,
  so its figures say whether each new one starts as lean as the first);
- the latency from each event (card inserted, pulled, swapped, lock, idle deadline, card-session
  killed) until ``status`` says the right state, p50 / p95 in milliseconds.

``--quick`` (20 cycles, 500 associations) is a smoke run of the script itself.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import run as bench  # noqa: E402  (benchmarks/run.py: provisioning, the lean DICOM client, the report)
from fault_pkcs11 import FaultControl  # noqa: E402
from fault_pkcs11 import build as build_fault_module  # noqa: E402
from peers.ports import ManagedProcess, free_port, managed_process  # noqa: E402
from peers.pynetdicom_scp import RecordingScp, tls_scp  # noqa: E402
from run import LOOPBACK, BenchError, card_agent_executable, git_commit, machine_info, print_report, say  # noqa: E402

CARDS = ("alice", "bob")
SUBJECTS = {"alice": "CN=Alice Example,O=Example Hospital Test PKI",
            "bob": "CN=Bob Example,O=Example Hospital Test PKI"}
IDLE_TIMEOUT_S = 3.0  # long enough that no pause inside a cycle of a loaded machine reaches it
# How the cycles end, in turn: mostly pulls, as at a shared workstation; every kind a few times.
ENDINGS = ("pull", "pull", "swap", "pull", "lock", "pull", "swap", "idle", "pull", "lock")
STATE_TIMEOUT_S = 30.0  # a state not reached by then is a failure of the day, not a slow sample
NO_CARD, SIGNED_IN = "no card inserted", "signed in"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def proc_figures(pid: int | None) -> tuple[int, int] | None:
    """(VmRSS in KiB, open descriptors) of ``pid``; None if it is gone."""
    if pid is None:
        return None
    try:
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration, ValueError):
        return None

ALL_TOKENS = "pkcs11:manufacturer=SoftHSM%20project"


def write_config(path: Path, pki: Path, runtime_dir: Path, module: str, listen: int, remote: int) -> Path:
    def q(value: object) -> str:
        return json.dumps(str(value))
    # The day's cards (SoftHSM tokens) share one stored PIN: the token selector names them all, as a
    # stored PIN goes to the cards it names only (agent/token/pin.py StoredPinUse).
    path.write_text("\n".join([
        "[identity]", f"token = {q(ALL_TOKENS)}", f"module = {q(module)}", 'pin = "env:CARD_PIN"', "",
        "[trust]", f"ca = {q(pki / 'ca-bundle.pem')}", f"crl = [{q(pki / 'issuing-ca.crl.pem')}]", "",
        "[agent]", 'log_level = "info"', f"runtime_dir = {q(runtime_dir)}", f"idle_timeout = {IDLE_TIMEOUT_S}", "",
        "[[tunnel]]", 'name = "pacs"', f'listen = "127.0.0.1:{listen}"', f'remote = "127.0.0.1:{remote}"',
        'server_name = "localhost"', ""]))
    return path


@dataclass
class Day:
    cycles: int = 0
    sign_ins: int = 0
    associations: int = 0
    failed_signed_in: int = 0
    wrong_certificate: int = 0
    restarts: int = 0
    probes: int = 0
    kills: int = 0
    latencies: dict[str, list[float]] = field(default_factory=dict)
    figures: list[tuple[str, tuple[int, int] | None, tuple[int, int] | None]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # the first few, to say what went wrong
    tracebacks: int = 0  # in the agent's logs: an exception nothing caught
    pin_prompts: int = 0  # OpenSSL's own "Enter PIN" prompt: the pkcs11-provider wanting to log in by itself

    def latency(self, event: str, seconds: float) -> None:
        self.latencies.setdefault(event, []).append(seconds * 1000)


class AgentUnusable(BenchError):
    """The agent died, or its control socket stopped answering: it has to be restarted."""


class AgentUnderTest:
    """``card-agent run`` that can be started again (counted) if it ever dies."""

    def __init__(self, stack: contextlib.ExitStack, work: Path, config: Path, env: dict[str, str]) -> None:
        self.stack, self.work, self.config, self.env = stack, work, config, env
        self.runtime_dir = work / "runtime"
        self.starts = 0
        self.process: ManagedProcess | None = None
        self.start()

    def start(self) -> None:
        self.starts += 1
        log_path = self.work / f"agent-{self.starts}.log"
        self.process = self.stack.enter_context(managed_process(
            [card_agent_executable(), "run", "--config", str(self.config)], log_path=log_path, env=self.env,
            stop_timeout=10))
        deadline = time.monotonic() + 60
        while "card-agent: INFO: ready:" not in self.process.log_text():
            if not self.process.alive or time.monotonic() > deadline:
                raise BenchError(f"the agent did not become ready:\n{self.process.log_text()[-3000:]}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def session_pid(self) -> int | None:
        for pid in bench.child_pids(self.pid):
            if "agent.session.worker" in bench.cmdline(pid):
                return pid
        return None

    def control(self, command: str) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(str(self.runtime_dir / "control.sock"))
            client.sendall(json.dumps({"command": command}).encode() + b"\n")
            return json.loads(client.makefile("rb").readline())

    def restart(self) -> None:
        """Stop what is left of the agent and start it again."""
        assert self.process is not None
        self.process.stop(10)
        self.start()

    def wait_state(self, reached: Callable[[dict], bool], what: str) -> float:
        """Poll ``status`` every 5 ms until ``reached``; the time it was."""
        deadline = time.monotonic() + STATE_TIMEOUT_S
        status: dict = {}
        error: Exception | None = None
        while True:
            try:
                status, error = self.control("status"), None
                if reached(status):
                    return time.monotonic()
            except (OSError, ValueError) as failed:
                error = failed
            if self.process is not None and not self.process.alive:
                raise AgentUnusable(f"{what}: the agent died (exit {self.process.returncode})")
            if time.monotonic() > deadline:
                if error is not None:
                    raise AgentUnusable(f"{what}: the control socket stopped answering ({error}); "
                                        f"last status {status.get('state')!r}")
                raise BenchError(f"{what}: not reached within {STATE_TIMEOUT_S:g} s; status {status.get('state')!r}")
            time.sleep(0.005)


def signed_in_as(card: str) -> Callable[[dict], bool]:
    return lambda status: status.get("state") == SIGNED_IN and status.get("identity") == SUBJECTS[card]


class ClinicalDay:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.day = Day()
        self.last_activity = time.monotonic()  # when the last association of the agent ended

    def run(self) -> str:
        started = datetime.datetime.now(datetime.timezone.utc)
        clock = time.monotonic()
        base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else None
        work = Path(tempfile.mkdtemp(prefix="clinical-day-", dir=base))
        say(f"work directory {work}")
        try:
            provisioned = bench.Benchmark(argparse.Namespace(quick=True, reps=None, samples=None, study_mb=None,
                                                             key="rsa"))
            provisioned.provision(work)
            with contextlib.ExitStack() as stack:
                pacs = stack.enter_context(tls_scp(pki_dir=provisioned.pki))
                card = FaultControl(work / "reader.ctl", log=False)  # a day of calls would make a large log
                card.show(CARDS[0])
                card.remove_card()
                port = free_port()
                config = write_config(work / "agent.toml", provisioned.pki, work / "runtime",
                                      str(build_fault_module(work / "fault-build")), port, pacs.port)
                (work / "runtime").mkdir(mode=0o700)
                env = {"SOFTHSM2_CONF": str(provisioned.softhsm_conf), "CARD_PIN": bench.USER_PIN, **card.env()}
                agent = AgentUnderTest(stack, work, config, env)
                self.live(agent, card, pacs, port)
                logs = [path.read_text(errors="replace") for path in sorted(work.glob("agent-*.log"))]
                self.day.tracebacks = sum(log.count("Traceback (most recent call last)") for log in logs)
                self.day.pin_prompts = sum(log.count("Enter PIN") for log in logs)
            return self.report(started, time.monotonic() - clock)
        finally:
            if self.args.keep:
                say(f"kept {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)

    # -- the day --

    def live(self, agent: AgentUnderTest, card: FaultControl, pacs: RecordingScp, port: int) -> None:
        day, cycles = self.day, self.args.cycles
        per_cycle = [self.args.associations // cycles + (i < self.args.associations % cycles) for i in range(cycles)]
        kill_at = {cycles // 3, (2 * cycles) // 3}
        reader: str | None = None
        next_card = 0
        for index in range(cycles):
            day.cycles += 1
            try:
                reader, next_card = self.cycle(agent, card, pacs, port, index, per_cycle[index], index in kill_at,
                                               reader, next_card)
            except AgentUnusable as error:
                day.restarts += 1
                day.failures.append(f"cycle {index + 1}: {error}: restarted (log {agent.process.log_path})")
                say(f"cycle {index + 1}: {error}; restarting the agent")
                card.remove_card()
                reader = None
                agent.restart()
            if (index + 1) % 10 == 0 or index + 1 == cycles:
                say(f"cycle {index + 1}/{cycles}: {day.associations} associations, {day.failed_signed_in} failed, "
                    f"{day.restarts} restarts")
        if reader is None:  # the end figures with a card session, like the start and the middle
            card.show(CARDS[0])
            card.insert_card()
            agent.wait_state(signed_in_as(CARDS[0]), "sign-in")
        self.sample(agent, "end")

    def cycle(self, agent: AgentUnderTest, card: FaultControl, pacs: RecordingScp, port: int, index: int,
              associations: int, kill: bool, reader: str | None, next_card: int) -> tuple[str | None, int]:
        """One card cycle; (the card left in the reader, the index of the next card to insert)."""
        day, cycles = self.day, self.args.cycles
        if reader is None:
            reader = CARDS[next_card % 2]
            next_card += 1
            card.show(reader)
            inserted = time.monotonic()
            card.insert_card()
            day.latency("card inserted -> signed in", agent.wait_state(signed_in_as(reader), "sign-in") - inserted)
            day.sign_ins += 1
        if index == 0:
            self.sample(agent, "start")
        if index == cycles // 2:
            self.sample(agent, "middle")
        half = associations // 2
        self.associations(agent, pacs, port, half, reader)
        self.probe(port)
        if kill:
            self.kill_card_session(agent, reader)
        self.associations(agent, pacs, port, associations - half, reader)
        reader = self.end_cycle(agent, card, reader, ENDINGS[index % len(ENDINGS)])
        if agent.process is not None and not agent.process.alive:
            raise AgentUnusable(f"the agent died (exit {agent.process.returncode})")
        return reader, next_card

    def associations(self, agent: AgentUnderTest, pacs: RecordingScp, port: int, count: int, reader: str) -> None:
        day = self.day
        before = len(pacs.associations)
        for _ in range(count):
            day.associations += 1
            try:
                bench.lean_echo(port)
            except (OSError, BenchError) as error:
                day.failed_signed_in += 1
                if len(day.failures) < 5:
                    day.failures.append(f"association {day.associations} as {reader}: {error}")
        self.last_activity = time.monotonic()
        # pynetdicom records an association in its own threads, a moment after the client is done
        with contextlib.suppress(TimeoutError):
            pacs.wait_for(lambda scp: len(scp.associations) - before >= count, timeout=5)
        with pacs._lock:
            seen = [a.peer_subject for a in pacs.associations[before:]]
        day.wrong_certificate += sum(subject != SUBJECTS[reader] for subject in seen)

    def probe(self, port: int) -> None:
        with socket.create_connection((LOOPBACK, port), timeout=10):
            pass
        self.day.probes += 1

    def kill_card_session(self, agent: AgentUnderTest, reader: str) -> None:
        worker = agent.session_pid()
        if worker is None:
            raise BenchError("signed in without a card-session process")
        killed = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        back = agent.wait_state(lambda s: signed_in_as(reader)(s) and agent.session_pid() not in (None, worker),
                                "signed in again after the card-session process was killed")
        self.day.latency("card session killed -> signed in again", back - killed)
        self.day.kills += 1
        self.day.sign_ins += 1

    def end_cycle(self, agent: AgentUnderTest, card: FaultControl, reader: str, ending: str) -> str | None:
        """End the cycle as ``ending`` says; the card left in the reader (None: none)."""
        day = self.day
        if ending == "swap":
            other = CARDS[1] if reader == CARDS[0] else CARDS[0]
            swapped = time.monotonic()
            card.show(other)
            day.latency("card swapped -> signed in as the other",
                        agent.wait_state(signed_in_as(other), "swap") - swapped)
            day.sign_ins += 1
            return other
        if ending == "lock":
            locked = time.monotonic()
            agent.control("lock")
            day.latency("lock -> locked", agent.wait_state(lambda s: s.get("state", "").startswith("locked:"), "lock")
                        - locked)
        elif ending == "idle":
            deadline = self.last_activity + IDLE_TIMEOUT_S
            reached = agent.wait_state(lambda s: s.get("state", "").startswith("locked after"), "idle timeout")
            day.latency("idle deadline -> locked", max(0.0, reached - deadline))
        pulled = time.monotonic()
        card.remove_card()
        day.latency("card pulled -> no card", agent.wait_state(lambda s: s.get("state") == NO_CARD, "pull") - pulled)
        return None

    def sample(self, agent: AgentUnderTest, when: str) -> None:
        self.day.figures.append((when, proc_figures(agent.pid), proc_figures(agent.session_pid())))

    # -- the report --

    def report(self, started: datetime.datetime, elapsed: float) -> str:
        day, info = self.day, machine_info(None)

        def figures(value: tuple[int, int] | None) -> str:
            return f"{value[0] / 1024:.1f} MiB, {value[1]} fds" if value else "n/a"
        lines = [
            f"Run {started:%Y-%m-%d %H:%M} UTC, commit {git_commit()}, {elapsed / 60:.1f} min; {info['nproc']} CPUs "
            f"({info['cpu']}), {info['os']}. A reliability run: the figures are counts and a leak check; "
            "the latencies say how soon the state is right, they are no performance claim.",
            "",
            f"{day.cycles} card cycles, {day.sign_ins} sign-ins, {day.associations} associations, {day.probes} probes, "
            f"{day.kills} card-session processes killed, idle timeout {IDLE_TIMEOUT_S:g} s.",
            "",
            "| measure | value | target |",
            "|---|---|---|",
            f"| agent restarts needed | {day.restarts} | 0 |",
            f"| associations failed while a card was signed in (PACS up) | {day.failed_signed_in} | 0 |",
            f"| associations the PACS saw under another card's certificate | {day.wrong_certificate} | 0 |",
            f"| tracebacks in the agent's log (uncaught exceptions) | {day.tracebacks} | 0 |",
            f"| OpenSSL \"Enter PIN\" prompts in the agent's log | {day.pin_prompts} | 0 |",
            "",
            "| when | supervisor | card-session process |",
            "|---|---|---|",
            *(f"| {when} | {figures(supervisor)} | {figures(session)} |" for when, supervisor, session in day.figures),
            "",
            "Target: flat from start to end.",
            "",
            "| event -> state right (`status`) | n | p50 ms | p95 ms |",
            "|---|---|---|---|",
            *(f"| {event} | {len(values)} | {statistics.median(values):.0f} | {percentile(values, 0.95):.0f} |"
              for event, values in day.latencies.items()),
        ]
        if day.failures:
            lines += ["", "First failures:", *(f"- {failure}" for failure in day.failures)]
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 cycles, 500 associations")
    parser.add_argument("--cycles", type=int, help="card cycles (default 200, quick 20)")
    parser.add_argument("--associations", type=int, help="associations over the day (default 5000, quick 500)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    args = parser.parse_args(argv)
    args.cycles = args.cycles or (20 if args.quick else 200)
    args.associations = args.associations or (500 if args.quick else 5000)
    if args.cycles < 3:
        parser.error("--cycles must be at least 3 (two card-session kills and a middle)")
    for name in ("OPENSSL_CONF", "CARD_AGENT_MODULE", "SOFTHSM2_CONF", "CARD_AGENT_CARD_EVENTS"):
        os.environ.pop(name, None)
    return print_report(lambda: ClinicalDay(args).run())


if __name__ == "__main__":
    sys.exit(main())
