#!/usr/bin/env python3
"""What the card-session process spends in CPU: per GB of a ``storescu`` bulk run through the
agent, both ways (outbound: the agent writes TLS; inbound: a PACS sends over TLS to the agent's
inbound listener, the agent reads TLS), and per fresh association (resumed, and with a full
handshake every time). Not part of the test suite.

    .venv/bin/python benchmarks/relay_cpu.py [--study-mb 200] [--reps 5] [--associations 200] [--other PATH]

Runs the real ``card-agent run`` (token alice on SoftHSM) in front of ``storescp +tls`` (and an
inbound listener, with the PKI's server key in a file, in front of a plain ``storescp``), and reads
the card-session process's user + system CPU from /proc/PID/stat before and after each run
(clock ticks of 10 ms: the sizes keep that under a few per cent; the threads that served a
connection and ended are counted too). CPU time moves much less with other load on the machine
than wall time does, so this can compare two versions of the relay on a shared machine where
throughput cannot; it prints each run and the medians.

``--other PATH`` runs a second agent from a copy of the package at PATH (``PATH/dicom_card_agent``,
e.g. the code before a change), alternates the two run by run (the machine's load drifts), and
prints the ratios this tree / other.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (benchmarks/run.py: servers, agent, lean client)


def session_cpu(agent: bench.Agent) -> tuple[int, float]:
    pid = agent.session_pid()
    if pid is None:
        raise bench.BenchError("no card-session process")
    return pid, bench.proc_stat_cpu(pid)


def bulk_cpu(agent: bench.Agent, port: int, files: list[Path], total: int,
             tls: bench.TlsClientFiles | None = None) -> float:
    """Card-session CPU seconds per GB of one storescu run."""
    pid, before = session_cpu(agent)
    argv = bench.dcmtk.storescu_argv(port, files, tls=tls, called_ae=bench.CALLED_AE, log_level="warn")
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", env=bench.peer_env(), timeout=900)
    if result.returncode != 0:
        raise bench.BenchError(f"storescu exit {result.returncode}:\n{result.stdout[-3000:]}")
    bench.time.sleep(0.1)  # let the relay account its last bytes
    return (bench.proc_stat_cpu(pid) - before) / (total / 1e9)


def association_cpu(agent: bench.Agent, port: int, count: int) -> float:
    """Card-session CPU milliseconds per lean association (connect, A-ASSOCIATE, C-ECHO, A-RELEASE)."""
    for _ in range(3):
        bench.lean_echo(port)
    pid, before = session_cpu(agent)
    for _ in range(count):
        bench.lean_echo(port)
    bench.time.sleep(0.1)
    return (bench.proc_stat_cpu(pid) - before) * 1000 / count


WRITE_AGENT_CONFIG = bench.write_agent_config


def with_inbound(listen: int, forward: int, pki: Path):
    """bench.write_agent_config, with an inbound listener added to what it writes."""
    write = WRITE_AGENT_CONFIG

    def write_with_inbound(path: Path, *args, **kwargs) -> Path:
        write(path, *args, **kwargs)
        with path.open("a") as config:
            config.write(f'''
[[inbound]]
name = "retrieves"
listen = "127.0.0.1:{listen}"
forward = "127.0.0.1:{forward}"
server_certificate = "{pki / 'server-chain.pem'}"
server_key = "{pki / 'server.key'}"
''')
        return path
    return write_with_inbound


MEASURES = (("bulk, s per GB", ".3f"), ("bulk inbound, s per GB", ".3f"), ("association, resumed, ms", ".2f"),
            ("association, full handshake, ms", ".2f"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study-mb", type=int, default=200)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--associations", type=int, default=200)
    parser.add_argument("--other", help="a copy of the package to run as a second agent (PATH/dicom_card_agent)")
    args = parser.parse_args()
    with bench.softhsm_work_directory("card-agent-relay-cpu-") as (work, pki, conf):
        files = bench.make_bulk_study(work / "study", args.study_mb * bench.MB)
        total = sum(path.stat().st_size for path in files)
        # The inbound listener admits only a certificate naming the PACS, by default the tunnels'
        # server_name: "localhost" here.
        pacs = bench.TlsClientFiles.issue(pki, work / "pacs-identity", "localhost")
        with contextlib.ExitStack() as stack:
            scp = stack.enter_context(bench.dcmtk.storescp(work / "out", tls=bench.TlsServerFiles.from_pki(pki),
                                                           log_level="warn", extra_args=["--ignore"]))
            local_scp = stack.enter_context(bench.dcmtk.storescp(work / "local-out", log_level="warn",
                                                                 extra_args=["--ignore"]))
            agents: dict[str, tuple[bench.Agent, int]] = {}
            versions = [("this tree", None)] + ([("other", args.other)] if args.other else [])
            for name, path in versions:
                inbound_port = bench.free_port()
                bench.write_agent_config = with_inbound(inbound_port, local_scp.port, pki)
                agent = stack.enter_context(bench.running_agent(
                    work, name.replace(" ", "-"), pki, conf, "softhsm2",
                    [("pacs", scp.port, True), ("pacs-full", scp.port, False)],
                    extra_env={"PYTHONPATH": path} if path else None))
                agents[name] = (agent, inbound_port)
            values: dict[str, dict[str, list[float]]] = {name: {m: [] for m, _ in MEASURES} for name in agents}
            names = list(agents)
            for rep in range(-1, args.reps):  # rep -1: warm-up, not counted
                for name in names[rep % len(names):] + names[:rep % len(names)]:
                    agent, inbound_port = agents[name]
                    run = dict(zip([m for m, _ in MEASURES], (
                        bulk_cpu(agent, agent.ports["pacs"], files, total),
                        bulk_cpu(agent, inbound_port, files, total, tls=pacs),
                        association_cpu(agent, agent.ports["pacs"], args.associations),
                        association_cpu(agent, agent.ports["pacs-full"], args.associations)), strict=True))
                    print(f"  {'warm-up' if rep < 0 else f'run {rep + 1}'} {name}: "
                          + ", ".join(f"{m} {v:.3f}" for m, v in run.items()), file=sys.stderr)
                    if rep >= 0:
                        for measure, value in run.items():
                            values[name][measure].append(value)
        print(f"card-session CPU, {len(files)} objects / {total / bench.MB:.0f} MB per bulk run, "
              f"{args.associations} associations per set-up run; {args.reps} runs each, median (min-max):")
        print()
        print("| | " + " | ".join(names) + (" | this tree / other |" if len(names) > 1 else " |"))
        print("|---|" + "---:|" * (len(names) + (len(names) > 1)))
        for measure, unit in MEASURES:
            cells = [f"{statistics.median(values[n][measure]):{unit}} ({min(values[n][measure]):{unit}}-"
                     f"{max(values[n][measure]):{unit}})" for n in names]
            if len(names) > 1:
                ratio = statistics.median(values[names[0]][measure]) / statistics.median(values[names[1]][measure])
                cells.append(f"{ratio:.2f}x")
            print(f"| {measure} | " + " | ".join(cells) + " |")
        return 0


if __name__ == "__main__":
    sys.exit(main())
