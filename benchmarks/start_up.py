#!/usr/bin/env python3
"""What a process of the agent costs in CPU before it does its work: `card-agent status` (an
administrator's monitoring may ask it every minute on every workstation), `card-agent --version`, and
the imports of the card-session process (started at each card insertion: its start is part of the
time from insertion to a signed-in card) and of `card-agent run`. Not part of the test suite.

    .venv/bin/python benchmarks/start_up.py [--reps 15] [--other PATH]

`status` asks a real agent (token alice on SoftHSM, signed in). Each figure is the user + system CPU
of the whole process (getrusage of the child), median of ``--reps`` runs, compiled bytecode in use
(a warm-up run first). The references, measured in the same run, are the floors no version of the
agent can go below: the interpreter importing only the libraries the command needs (typer for the
command line; ssl, cryptography's X.509 and python-pkcs11 for a card session).

``--other PATH`` measures a copy of the package at PATH (``PATH/dicom_card_agent``, e.g. the code
before a change) as well, alternated run by run, and prints the ratios this tree / other.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True

import argparse  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (benchmarks/run.py: the SoftHSM work directory, the agent)

PYTHON = [sys.executable, "-P"]
REFERENCES = {
    "the command line's library (typer)": [*PYTHON, "-c", "import typer"],
    "a card session's libraries (ssl, cryptography.x509, pkcs11)":
        [*PYTHON, "-c", "import ssl, cryptography.x509, pkcs11"],
}


def commands(config: Path) -> dict[str, tuple[list[str], str]]:
    """What is measured, and the reference each is compared with."""
    card_agent = [bench.card_agent_executable()]
    command_line, card_session = REFERENCES
    return {
        "card-agent status (an agent answers)": ([*card_agent, "status", "--config", str(config)], command_line),
        "card-agent --version": ([*card_agent, "--version"], command_line),
        "card-session process imports": ([*PYTHON, "-c", "import dicom_card_agent.session.worker"], card_session),
        "card-agent run imports": ([*PYTHON, "-c", "import dicom_card_agent.cli.run"], card_session),
    }


def cpu_of(argv: list[str], env: dict[str, str]) -> float:
    """User + system CPU seconds of one run of ``argv``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, timeout=60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise bench.BenchError(f"{' '.join(argv)}: exit {result.returncode}:\n{result.stdout.decode(errors='replace')}")
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def compile_package(path: Path) -> None:
    """Bytecode for every module, as an installed package has it (these runs write none)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(path)], check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--other", help="a copy of the package to measure as well (PATH/dicom_card_agent)")
    args = parser.parse_args()
    compile_package(bench.REPO / "agent")
    if args.other:
        compile_package(Path(args.other))
    with bench.softhsm_work_directory("card-agent-start-up-") as (work, pki, conf):
        with bench.running_agent(work, "agent", pki, conf, "softhsm2", [("pacs", bench.free_port(), True)]):
            env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
            versions = {"this tree": env} | ({"other": {**env, "PYTHONPATH": args.other}} if args.other else {})
            measured = commands(work / "agent.toml")
            samples: dict[tuple[str, str], list[float]] = {}
            for rep in range(-1, args.reps):  # -1: the warm-up, not counted
                for name, argv in REFERENCES.items():
                    value = cpu_of(argv, env)
                    if rep >= 0:
                        samples.setdefault(("reference", name), []).append(value)
                for version, version_env in versions.items():
                    for name, (argv, _) in measured.items():
                        value = cpu_of(argv, version_env)
                        if rep >= 0:
                            samples.setdefault((version, name), []).append(value)

    def ms(key: tuple[str, str]) -> float:
        return statistics.median(samples[key]) * 1000

    print(f"CPU per process (user + system), median of {args.reps} runs, ms:")
    print()
    for name in REFERENCES:
        print(f"reference, {name}: {ms(('reference', name)):.0f} ms")
    print()
    names = list(versions)
    print("| process | " + " | ".join(names) + " | this tree / reference |"
          + (" this tree / other |" if len(names) > 1 else ""))
    print("|---|" + "---:|" * (len(names) + 1 + (len(names) > 1)))
    for name, (_, reference) in measured.items():
        cells = [f"{ms((version, name)):.0f}" for version in names]
        cells.append(f"{ms(('this tree', name)) / ms(('reference', reference)):.2f}x")
        if len(names) > 1:
            cells.append(f"{ms(('this tree', name)) / ms(('other', name)):.2f}x")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
