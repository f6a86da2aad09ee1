#!/usr/bin/env python3
"""How long each relay holds each step of a fresh association, seen on the wire (a diagnostic for
docs/benchmarks.md; not part of the test suite).

    .venv/bin/python benchmarks/relay_turns.py [--associations 200] [--kind resumed|full]
                                               [--pause 0.003] [--other PATH]

The real ``card-agent run`` (token alice on SoftHSM) and stunnel + libp11 (the same key), both in
front of one ``storescp +tls -rc``; the lean client of benchmarks/run.py makes fresh associations
(A-ASSOCIATE, C-ECHO, A-RELEASE) through each in turn, rotating the order, ``--pause`` seconds apart.
Meanwhile a packet capture on ``lo`` (an AF_PACKET socket in a process of its own, kernel time
stamps; root needed) records every TCP segment. Per association it prints, as medians:

- the client's time (connect to A-RELEASE-RP) and the relay's (the client's SYN to the relay's last
  segment to it);
- ``A-ASSOCIATE-RQ in -> SYN to the PACS``: accepting, identifying the local user, connecting;
- each *turn*: from a segment that reached the relay (``client>`` from the application, ``<pacs``
  from the PACS) to the relay's next segment out (``>pacs``, ``client<``): the relay's own delay,
  without the peers' time. The turns in order: the ClientHello, the client's Finished, then the
  A-ASSOCIATE-RQ/AC, C-ECHO-RQ/RSP and A-RELEASE-RQ/RP each way (a relay that sends two segments
  for one turn shows one turn fewer).

``--other PATH``: a second agent from a copy of the package at PATH (``PATH/dicom_card_agent``), as
column "other": the code before a change, against the working tree's.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (benchmarks/run.py: servers, agent, stunnel, lean client)

SO_TIMESTAMPNS = 35
PACKET_OUTGOING = 4  # on lo each segment shows twice: once going out, once coming in
SYN, ACK = 0x02, 0x10


def capture(path: str) -> None:
    """Until SIGTERM: one line per TCP segment on lo, ``time source-port destination-port flags
    payload-length``."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind(("lo", 0))
    sock.settimeout(0.2)
    with open(path, "w") as out:
        while not stop:
            try:
                frame, ancillary, _, address = sock.recvmsg(256, 64)
            except (TimeoutError, InterruptedError):
                continue
            if address[2] != PACKET_OUTGOING or frame[12:14] != b"\x08\x00" or frame[23] != 6:  # IPv4, TCP
                continue
            stamp = next(struct.unpack("qq", data[:16]) for _, kind, data in ancillary if kind == SO_TIMESTAMPNS)
            ip_header = (frame[14] & 15) * 4
            total = struct.unpack(">H", frame[16:18])[0]
            tcp = 14 + ip_header
            source, destination = struct.unpack(">HH", frame[tcp:tcp + 4])
            payload = total - ip_header - (frame[tcp + 12] >> 4) * 4
            out.write(f"{stamp[0] + stamp[1] * 1e-9:.6f} {source} {destination} {frame[tcp + 13]} {payload}\n")


def turns(segments: list[tuple[float, int, int, int, int]], listeners: dict[int, str],
          pacs: int) -> dict[str, dict[str, list[float]]]:
    """Per relay, per step: the durations in ms (see the module's docstring)."""
    steps: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))

    def is_client_syn(s: tuple) -> bool:
        return s[2] in listeners and s[3] & SYN and not s[3] & ACK

    starts = [i for i, s in enumerate(segments) if is_client_syn(s)]
    for n, first in enumerate(starts):
        last = starts[n + 1] if n + 1 < len(starts) else len(segments)
        window = segments[first:last]
        started, client_port, listen_port = window[0][0], window[0][1], window[0][2]
        relay = listeners[listen_port]
        syn = next((s for s in window if s[2] == pacs and s[3] & SYN and not s[3] & ACK), None)
        if syn is None:
            continue
        near = [s for s in window if {s[1], s[2]} == {client_port, listen_port} and s[4]]
        far = [s for s in window if {s[1], s[2]} == {syn[1], pacs} and s[4]]
        if len(near) < 6 or len(far) < 4:
            continue
        events = sorted([(s[0], "client>" if s[2] == listen_port else "client<") for s in near]
                        + [(s[0], ">pacs" if s[2] == pacs else "<pacs") for s in far])
        steps[relay]["relay: client SYN -> last segment to the client"].append((near[-1][0] - started) * 1e3)
        request = next(s[0] for s in near if s[2] == listen_port)
        steps[relay]["A-ASSOCIATE-RQ in -> SYN to the PACS"].append((syn[0] - request) * 1e3)
        came: tuple[float, str] | None = None
        turn = 0
        for stamp, direction in events:
            if direction in ("client>", "<pacs"):
                came = (stamp, direction)
            elif came is not None:
                steps[relay][f"turn {turn}: {came[1]} -> {direction}"].append((stamp - came[0]) * 1e3)
                turn += 1
                came = None
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--associations", type=int, default=200)
    parser.add_argument("--kind", choices=("resumed", "full"), default="resumed")
    parser.add_argument("--pause", type=float, default=0.003, help="seconds between two associations")
    parser.add_argument("--other", help="a copy of the package to run as a second agent (PATH/dicom_card_agent)")
    args = parser.parse_args()
    resumed = args.kind == "resumed"
    with bench.softhsm_work_directory("bench-turns-") as (work, pki, conf), contextlib.ExitStack() as stack:
        scp = stack.enter_context(bench.dcmtk.storescp(work / "out", tls=bench.TlsServerFiles.from_pki(pki),
                                                       require_client_cert=True, log_level="warn"))
        tunnels = [("pacs", scp.port, resumed)]
        routes = {"agent": stack.enter_context(bench.running_agent(work, "agent", pki, conf, "softhsm2",
                                                                   tunnels)).ports["pacs"]}
        if args.other:
            routes["other"] = stack.enter_context(bench.running_agent(
                work, "other", pki, conf, "softhsm2", tunnels, extra_env={"PYTHONPATH": args.other})).ports["pacs"]
        port = bench.free_port()
        config = bench.write_stunnel_config(work / "stunnel.conf", accept_port=port, connect_port=scp.port,
                                            cert_chain=bench.write_token_chain(pki, bench.TOKEN, work / "chain.pem"),
                                            ca_bundle=pki / "ca-bundle.pem",
                                            engine_key_uri=bench.token_key_uri(bench.TOKEN), session_resume=resumed)
        executable = shutil.which("stunnel4") or shutil.which("stunnel")
        if executable is None:
            raise SystemExit("stunnel4 is not installed")
        stack.enter_context(bench.running_stunnel(executable, config, port, work / "stunnel.log",
                                                  {"SOFTHSM2_CONF": str(conf)}))
        routes["stunnel"] = port
        names = list(routes)
        for name in names:
            for _ in range(5):
                bench.lean_echo(routes[name])
        captured = work / "segments.txt"
        capturer = subprocess.Popen([sys.executable, __file__, "--capture-to", str(captured)])
        time.sleep(0.5)
        client: dict[str, list[float]] = collections.defaultdict(list)
        try:
            for index in range(args.associations):
                for name in names[index % len(names):] + names[:index % len(names)]:
                    started = time.perf_counter()
                    bench.lean_echo(routes[name])
                    client[name].append((time.perf_counter() - started) * 1e3)
                    time.sleep(args.pause)
            time.sleep(0.3)
        finally:
            capturer.send_signal(signal.SIGTERM)
            capturer.wait(10)
        segments = [(float(t), int(a), int(b), int(f), int(n))
                    for t, a, b, f, n in (line.split() for line in captured.read_text().splitlines())]
        steps = turns(segments, {p: name for name, p in routes.items()}, scp.port)
    print(f"{args.kind} associations, {args.associations} per relay, {args.pause * 1000:g} ms apart; medians in ms "
          "(samples)")
    print()
    print("| step | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    print("| client: connect -> A-RELEASE-RP | " + " | ".join(
        f"{statistics.median(client[n]):.3f} ({len(client[n])})" for n in names) + " |")
    labels = list(dict.fromkeys(label for name in names for label in steps[name]))
    for label in labels:
        if all(len(steps[n][label]) >= args.associations // 2 for n in names if n != "stunnel"):
            print(f"| {label} | " + " | ".join(
                f"{statistics.median(steps[n][label]):.3f} ({len(steps[n][label])})" if steps[n][label] else "-"
                for n in names) + " |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--capture-to":
        capture(sys.argv[2])
    else:
        main()
