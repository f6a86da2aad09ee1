#!/usr/bin/env python3
"""Where a sign-in's card round trips go: APDUs per process and per OpenSC call, on the virtual CAC.

    .venv/bin/python benchmarks/apdu_split.py [--signins 2] [--apdu-delay-ms 0] [--keep]

Counts, not timings (OpenSC's debug log, which this needs, slows OpenSC down): the counts do not
depend on the machine's load, so this may run while other things do. Runs the agent with OpenSC
(pcscd + vpcd + libcacard, tests/virtual_card) and ``OPENSC_CONF`` pointing at a configuration with
``debug = 3`` and a ``debug_file``: every line there names its process (``P:pid``), and every APDU
sent is logged (``Outgoing APDU``) after a line of the thread that sent it. For each sign-in (insert
a card, wait for ``event=sign-in``, one association through the agent, pull) the report splits the
APDUs between the supervisor (the agent's pid) and the card-session process, and within each by
the PKCS#11 call under way (the last ``C_...`` function OpenSC logged in that thread; OpenSC's
probe of a newly seen card runs inside ``C_GetSlotList``, or before any call is logged in a process
that just loaded the module: "none logged yet").

The report (markdown) goes to stdout, progress to stderr.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import run as bench  # noqa: E402  (benchmarks/run.py: provisioning, the agent, the lean DICOM client)
from card_events import HeldAssociation, _wait_log  # noqa: E402
from peers.pynetdicom_scp import tls_scp  # noqa: E402
from run import git_commit, print_report, running_agent, say  # noqa: E402
from virtual_card.nssdb import make_card  # noqa: E402
from virtual_card.pcscd import pcscd_with_vpcd  # noqa: E402
from virtual_card.reader import VirtualReader  # noqa: E402

# "P:1234; T:0x7f...; 13:50:46.686 [opensc-pkcs11] pkcs11-session.c:145:C_OpenSession: ..."
LOG_LINE = re.compile(r"^P:(\d+); T:(0x[0-9a-f]+) \S+ \[[^\]]*\] ([\w.-]+):\d+:(\w+):")
MODULE_START = "none logged yet in its thread (module start)"


@dataclass
class Split:
    """APDUs by (process role, PKCS#11 call under way)."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)

    def total(self, role: str | None = None) -> int:
        return sum(n for (r, _), n in self.counts.items() if role in (None, r))


def split_apdus(text: str, roles: dict[int, str]) -> Split:
    """The APDUs logged in ``text`` (an OpenSC debug log excerpt), by the role of their process
    (``roles``: pid -> name; other pids are "other") and the PKCS#11 call under way in their thread."""
    split = Split()
    call: dict[tuple[str, str], str] = {}
    thread: tuple[str, str] | None = None
    for line in text.splitlines():
        match = LOG_LINE.match(line)
        if match:
            pid, tid, source, function = match.groups()
            thread = (pid, tid)
            if function.startswith("C_"):  # pkcs11-*.c and framework-pkcs15.c name the entry point
                call[thread] = function
            continue
        if line.startswith("Outgoing APDU") and thread is not None:
            role = roles.get(int(thread[0]), "other")
            split.counts[(role, call.get(thread, MODULE_START))] += 1
    return split


def debug_conf(directory: Path) -> tuple[Path, Path]:
    """An opensc.conf logging every APDU to a file; (the conf, the log)."""
    log = directory / "opensc-debug.log"
    conf = directory / "opensc.conf"
    conf.write_text(f"app default {{\n  debug = 3;\n  debug_file = {log};\n  framework pkcs15 {{\n  }}\n}}\n")
    return conf, log


def table(title: str, split: Split) -> list[str]:
    lines = [f"**{title}**: {split.total()} APDUs (supervisor {split.total('supervisor')}, "
             f"card session {split.total('card session')})", "", "| process | PKCS#11 call under way | APDUs |",
             "|---|---|---:|"]
    for (role, call), count in sorted(split.counts.items(), key=lambda item: (item[0][0] != "supervisor", -item[1])):
        lines.append(f"| {role} | {call} | {count} |")
    return [*lines, ""]


def measure(args: argparse.Namespace, work: Path) -> str:
    provisioned = bench.Benchmark(argparse.Namespace(quick=True, reps=None, samples=None, study_mb=None, key="rsa"))
    provisioned.provision(work)
    conf, debug_log = debug_conf(work)
    report = [f"Commit {git_commit()}; virtual CAC, {args.apdu_delay_ms:g} ms per APDU; OpenSC debug log on "
              "(timings not representative: counts only).", ""]
    with contextlib.ExitStack() as stack:
        stack.enter_context(pcscd_with_vpcd(work / "pcscd"))
        cards = [make_card(provisioned.pki, work / "cards" / name, name, common_name)
                 for name, common_name in (("carol", "Carol Example"), ("dave", "Dave Example"))]
        reader = VirtualReader(work / "reader", apdu_delay_ms=args.apdu_delay_ms)
        stack.callback(reader.close)
        reader.check_empty()
        pacs = stack.enter_context(tls_scp(pki_dir=provisioned.pki))
        agent = stack.enter_context(running_agent(work, "split", provisioned.pki, provisioned.softhsm_conf, "opensc",
                                                  [("pacs", pacs.port, True)], extra_env={"OPENSC_CONF": str(conf)},
                                                  token=""))
        _wait_log(agent, "card events: ", 1, 10)
        for index in range(args.signins):
            start = debug_log.stat().st_size if debug_log.exists() else 0
            reader.insert(cards[index % 2])
            _wait_log(agent, "event=sign-in ", index + 1, 60)
            signed_in = debug_log.stat().st_size
            at_ready = reader.apdus()
            worker = agent.session_pid()
            held = HeldAssociation(agent.ports["pacs"])  # accepted: the handshake signed on the card
            held.sock.shutdown(socket.SHUT_RDWR)
            held.join(2)
            time.sleep(0.5)  # the last lines of the log
            first_association = debug_log.stat().st_size
            data = debug_log.read_bytes()
            roles = {agent.pid: "supervisor", **({worker: "card session"} if worker else {})}
            before = split_apdus(data[start:signed_in].decode(errors="replace"), roles)
            after = split_apdus(data[signed_in:first_association].decode(errors="replace"), roles)
            say(f"sign-in {index + 1}: {before.total()} APDUs to ready (card counted {at_ready}), "
                f"{after.total()} for the first association")
            report += table(f"Sign-in {index + 1}, card inserted -> signed in (the card counted {at_ready})", before)
            report += table(f"Sign-in {index + 1}, the first association (full handshake)", after)
            reader.pull()
            _wait_log(agent, "event=sign-out ", index + 1, 10)
    return "\n".join(report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--signins", type=int, default=2, help="sign-ins to count (default 2, alternating cards)")
    parser.add_argument("--apdu-delay-ms", type=float, default=0.0, help="the card answers each APDU this late")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, the OpenSC debug log)")
    args = parser.parse_args(argv)
    for name in ("OPENSSL_CONF", "CARD_AGENT_MODULE", "SOFTHSM2_CONF", "CARD_AGENT_CARD_EVENTS", "OPENSC_CONF"):
        os.environ.pop(name, None)

    def produce() -> str:
        work = Path(tempfile.mkdtemp(prefix="apdu-split-"))
        try:
            return measure(args, work)
        finally:
            if args.keep:
                say(f"kept {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)

    return print_report(produce)


if __name__ == "__main__":
    sys.exit(main())
