#!/usr/bin/env python3
"""Where a fresh association through the agent spends its time (a diagnostic for docs/benchmarks.md).

    .venv/bin/python benchmarks/agent_timing.py [--associations 50]

Runs the real ``card-agent run`` (token alice on SoftHSM) in front of ``storescp +tls -rc`` and
times, inside the agent's two processes, the functions a connection goes through, WITHOUT changing
the agent: a ``sitecustomize.py`` written to a temporary directory (put on the agent's PYTHONPATH,
which the supervisor passes on to its card-session child; variables named CARD_AGENT_* it would not)
wraps them with timers when the modules are imported and appends one line per call to a file:

- accepting: while a card is signed in, the card session's ``LentListeners._serve`` (it accepts on
  the tunnels' sockets the supervisor lent it), otherwise the supervisor's ``Listeners._admit`` and
  ``CardSession.dispatch`` (hand the socket to the card session); within either ``admit_peer`` (who
  is the local client: sock_diag);
- card session: ``_connect`` (TCP to the PACS), ``_Tls.__init__`` (``wrap_bio``, with the session to
  resume), ``_handshake`` (TLS, a Python loop over memory BIOs), ``_Relay.run`` (the DICOM exchange,
  waiting for both ends included) and ``handle_outbound`` (all of it).

It prints medians per function for N resumed and N full-handshake associations (lean raw-socket
client, as benchmarks/run.py) and, for comparison, the same client talking TLS to storescp directly
(full and resumed). Expect the timers to add a few microseconds per call. A ``PYTHONPATH`` it is
given stays behind the hooks' directory: point it at a copy of the package to time another version.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (benchmarks/run.py: servers, agent, lean client)

SITECUSTOMIZE = r'''
import functools, importlib.abc, importlib.util, os, sys, threading, time
_OUT = os.environ.get("BENCH_AGENT_TIMING_OUT")
_LOCK = threading.Lock()
def _wrap(owner, attribute, name):
    original = getattr(owner, attribute)
    @functools.wraps(original)
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            ended = time.perf_counter()
            with _LOCK, open(_OUT, "a") as out:
                out.write(f"{name} {started:.6f} {ended:.6f}\n")
    setattr(owner, attribute, timed)
_TARGETS = {
    "dicom_card_agent.tunnel.peer": lambda m: _wrap(m, "admit_peer", "  admit_peer (sock_diag)"),
    "dicom_card_agent.tunnel.server": lambda m: _wrap(m.Listeners, "_admit", "admit (supervisor thread)"),
    "dicom_card_agent.tunnel.lent_listeners": lambda m: _wrap(m.LentListeners, "_serve",
                                                              "admit (card session, lent listener)"),
    "dicom_card_agent.session.supervisor": lambda m: _wrap(m.CardSession, "dispatch", "  dispatch (to card session)"),
    "dicom_card_agent.tunnel.relay": lambda m: (_wrap(m, "handle_outbound", "handle_outbound (card session)"),
                                     _wrap(m, "_connect", "  connect to the PACS"),
                                     _wrap(m._Tls, "__init__", "  wrap_bio (+ session to resume)"),
                                     _wrap(m, "_handshake", "  TLS handshake"),
                                     _wrap(m._Relay, "run", "  relay (DICOM exchange)")),
}
class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        execute = spec.loader.exec_module
        def exec_module(module):
            execute(module)
            _TARGETS[name](module)
        spec.loader.exec_module = exec_module
        return spec
if _OUT:
    sys.meta_path.insert(0, _Finder())
'''


def direct_echo(port: int, context, resumption, handshakes: list[float]) -> None:
    """The lean client of run.py talking TLS to storescp itself, timing its handshake alone."""
    import socket
    sock = socket.create_connection((bench.LOOPBACK, port), timeout=30)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        sock = context.wrap_socket(sock, server_hostname="localhost",
                                   session=resumption.session if resumption else None)
        handshakes.append((time.perf_counter() - started) * 1000)
        for pdu, expected in ((bench.ASSOCIATE_RQ, 0x02), (bench.C_ECHO_RQ, 0x04), (bench.RELEASE_RQ, 0x06)):
            sock.sendall(pdu)
            pdu_type, _ = bench._recv_pdu(sock)
            if pdu_type != expected:
                raise bench.BenchError(f"unexpected PDU {pdu_type:#04x}")
        if resumption is not None:
            resumption.session = sock.session
    finally:
        sock.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--associations", type=int, default=50)
    args = parser.parse_args()
    with bench.softhsm_work_directory("card-agent-timing-") as (work, pki, conf):
        direct = bench.TlsClientFiles.issue(pki, work / "file-identity", "Direct TLS Timing")
        hooks = work / "hooks"
        hooks.mkdir()
        (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
        timings = work / "timings.txt"
        with contextlib.ExitStack() as stack:
            scp = stack.enter_context(bench.dcmtk.storescp(work / "out", tls=bench.TlsServerFiles.from_pki(pki),
                                                           log_level="warn"))
            agent = stack.enter_context(bench.running_agent(
                work, "agent", pki, conf, "softhsm2", [("pacs", scp.port, True), ("pacs-full", scp.port, False)],
                extra_env={"PYTHONPATH": os.pathsep.join(filter(None, (str(hooks), os.environ.get("PYTHONPATH")))),
                           "BENCH_AGENT_TIMING_OUT": str(timings)}))
            context = direct.ssl_context()
            resumption = bench.Resumption()
            client: dict[str, list[float]] = collections.defaultdict(list)
            handshakes: dict[str, list[float]] = collections.defaultdict(list)
            marks = {}
            bench.wait_for_quiet_tcp_table()
            for label, port, ctx, resume in (("agent, resumed", agent.ports["pacs"], None, None),
                                             ("agent, full handshake", agent.ports["pacs-full"], None, None),
                                             ("direct TLS, full", scp.port, context, None),
                                             ("direct TLS, resumed", scp.port, context, resumption)):
                def one(label=label, port=port, ctx=ctx, resume=resume) -> None:  # this row's, bound now
                    if ctx is None:
                        bench.lean_echo(port)
                    else:
                        direct_echo(port, ctx, resume, handshakes[label])
                for _ in range(3):
                    one()
                handshakes[label].clear()
                time.sleep(0.1)
                marks[label] = (time.perf_counter(), bench.tcp_table_rows())
                for _ in range(args.associations):
                    started = time.perf_counter()
                    one()
                    client[label].append((time.perf_counter() - started) * 1000)
                time.sleep(0.2)
                marks[label] = (*marks[label], time.perf_counter())
        calls: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        for line in timings.read_text().splitlines():
            name, started, ended = line.rsplit(" ", 2)
            for label, (begin, _rows, end) in marks.items():
                if begin <= float(started) <= end:
                    calls[label][name].append((float(ended) - float(started)) * 1000)
        print(f"lean client, {args.associations} associations each, medians in ms "
              f"(connect -> A-RELEASE-RP as the client sees it, then inside the agent):")
        for label in marks:
            print(f"\n{label}: {statistics.median(client[label]):.2f} ms "
                  f"(/proc/net/tcp had {marks[label][1]} rows at the start)")
            order = ["admit (supervisor thread)", "admit (card session, lent listener)", "  admit_peer (sock_diag)",
                     "  dispatch (to card session)",
                     "handle_outbound (card session)", "  connect to the PACS", "  wrap_bio (+ session to resume)",
                     "  TLS handshake", "  relay (DICOM exchange)"]
            for name in sorted(calls[label], key=lambda n: order.index(n) if n in order else len(order)):
                print(f"  {name:36} {statistics.median(calls[label][name]):7.2f}")
            if handshakes[label]:
                print(f"    {'TLS handshake (in-process, C)':34} {statistics.median(handshakes[label]):7.2f}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
