#!/usr/bin/env python3
"""A slow card under load: does a running transfer keep its pace while new associations queue
for the card's signature? Not part of the test suite.

    .venv/bin/python benchmarks/token_contention.py [--reps N] [--study-mb MB] [--delay-ms 500]

One agent, token "alice" behind the fault_pkcs11 wrapper with every signature delayed by
``--delay-ms`` (a real card takes about 500 ms), two tunnels to two ``storescp +tls``: one
with session resumption for the bulk transfer, one without, so that each of the 8 concurrent
new associations needs a signature. Each repetition runs the bulk study through the agent
quietly, then again right after 8 C-ECHO associations started together and the first of them
reached the card, so that the whole transfer runs while they queue for it (the study must take
less than the queue's 8 x 500 ms; the script says when it did not). It prints the
ratio loaded/quiet throughput (target >= 0.9) and whether the card's signatures overlapped
(target: never; read from the wrapper's begin/end timestamps).
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True

import argparse  # noqa: E402
import contextlib  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from itertools import pairwise  # noqa: E402
from pathlib import Path  # noqa: E402

import run as bench  # noqa: E402  (benchmarks/run.py: provisioning, peers, lean DICOM client)
from run import MB, BenchError, dcmtk, lean_echo, make_bulk_study, peer_env, running_agent, say  # noqa: E402

CONCURRENT = 8
TARGET_RATIO = 0.9


def transfer(files: list[Path], port: int, out_dir: Path) -> float:
    for path in out_dir.rglob("*"):
        if path.is_file():
            path.unlink()
    argv = dcmtk.storescu_argv(port, files, called_ae=bench.CALLED_AE, log_level="warn")
    started = time.perf_counter()
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=peer_env(),
                            timeout=900)
    elapsed = time.perf_counter() - started
    stored = sum(1 for p in out_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    if result.returncode != 0 or stored != len(files):
        raise BenchError(f"storescu exit {result.returncode}, {stored} of {len(files)} stored:\n"
                         f"{result.stdout[-2000:]}")
    return elapsed


def new_associations(port: int, errors: list[str]) -> list[threading.Thread]:
    def one() -> None:
        try:
            lean_echo(port)
        except Exception as error:  # noqa: BLE001 (reported)
            errors.append(f"{type(error).__name__}: {error}")
    threads = [threading.Thread(target=one) for _ in range(CONCURRENT)]
    for thread in threads:
        thread.start()
    return threads


def overlapping(intervals: list[tuple[int, int, int]]) -> int:
    ordered = sorted(intervals)
    return sum(1 for a, b in pairwise(ordered) if b[0] < a[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--study-mb", type=float, default=200)
    parser.add_argument("--delay-ms", type=int, default=500)
    args = parser.parse_args()
    for tool in ("STORESCP", "STORESCU", "ECHOSCU"):
        setattr(dcmtk, tool, bench._find_system_tool(getattr(dcmtk, tool).lower()))
    work = Path(tempfile.mkdtemp(prefix="card-agent-contention-", dir="/dev/shm"))
    try:
        with contextlib.ExitStack() as stack:
            helper = bench.Benchmark(argparse.Namespace(quick=True, reps=1, samples=1, study_mb=1, key="rsa"))
            helper.provision(work)
            fault_module = bench.build_fault_module(work / "fault-build")
            card = bench.FaultControl(work / "card.ctl")
            say(f"building the bulk study (~{args.study_mb:.0f} MB)")
            files = make_bulk_study(work / "study", int(args.study_mb * MB))
            total = sum(p.stat().st_size for p in files)
            out = work / "out"
            scp = stack.enter_context(dcmtk.storescp(out, tls=bench.TlsServerFiles.from_pki(helper.pki),
                                                     require_client_cert=True, log_level="warn"))
            # storescp serves one association at a time: the new associations get their own, so the
            # bulk transfer measures the agent, not a server queue.
            echo_scp = stack.enter_context(dcmtk.storescp(work / "out-echo", tls=bench.TlsServerFiles.from_pki(
                helper.pki), require_client_cert=True, log_level="warn"))
            agent = stack.enter_context(running_agent(
                work, "agent", helper.pki, helper.softhsm_conf, str(fault_module),
                [("bulk", scp.port, True), ("new", echo_scp.port, False)], extra_env=card.env()))
            lean_echo(agent.ports["bulk"])
            card.sign_delay(args.delay_ms)
            transfer(files, agent.ports["bulk"], out)  # warm-up, not counted
            quiet, loaded, waits, overlaps, errors = [], [], [], 0, []
            for rep in range(args.reps):
                quiet.append(total / MB / transfer(files, agent.ports["bulk"], out))
                before = len(card.signature_intervals())
                started = time.perf_counter()
                threads = new_associations(agent.ports["new"], errors)
                while not any(line.startswith("C_SignInit") for line in card.log_lines()[-CONCURRENT:]):
                    time.sleep(0.005)  # the first handshake is at the card: the queue has formed
                loaded.append(total / MB / transfer(files, agent.ports["bulk"], out))
                still_waiting = sum(thread.is_alive() for thread in threads)
                if still_waiting == 0:
                    errors.append(f"rep {rep + 1}: the transfer outlasted the queue: use a smaller study")
                for thread in threads:
                    thread.join(120)
                waits.append(time.perf_counter() - started)
                intervals = card.signature_intervals()[before:]
                if len(intervals) != CONCURRENT:
                    errors.append(f"rep {rep + 1}: {len(intervals)} signatures for {CONCURRENT} new associations")
                overlaps += overlapping(intervals)
                say(f"  rep {rep + 1}: quiet {quiet[-1]:.0f} MB/s, with {CONCURRENT} new associations "
                    f"{loaded[-1]:.0f} MB/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = [b / a for a, b in zip(quiet, loaded, strict=False)]
    ratio = statistics.median(ratios)
    print(f"#### Slow card under load: {args.delay_ms} ms signatures, {CONCURRENT} concurrent new associations\n")
    print(f"Study {total / MB:.0f} MB through the agent (resumed session), {args.reps} interleaved pairs of runs.\n")
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| quiet throughput, median | {statistics.median(quiet):.0f} MB/s | |")
    print(f"| throughput while {CONCURRENT} associations wait for the card, median | "
          f"{statistics.median(loaded):.0f} MB/s | |")
    print(f"| ratio loaded / quiet, median (min) | {ratio:.2f}x ({min(ratios):.2f}x) | >= {TARGET_RATIO}x "
          f"{'met' if ratio >= TARGET_RATIO else 'MISSED'} |")
    print(f"| overlapping card signatures | {overlaps} | 0 {'met' if overlaps == 0 else 'MISSED'} |")
    print(f"| time until all {CONCURRENT} new associations were done, median | {statistics.median(waits):.1f} s | "
          f"about {CONCURRENT} x {args.delay_ms} ms when serialized |")
    if errors:
        print("\nProblems:\n" + "\n".join(f"- {e}" for e in errors))
    return 0 if ratio >= TARGET_RATIO and overlaps == 0 and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
