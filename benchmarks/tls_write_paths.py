#!/usr/bin/env python3
"""What the relay's way of using TLS costs: sender CPU per GB through an ``ssl.SSLObject`` over
memory BIOs plus ``socket.send`` (what agent/tunnel/relay.py does, so that it decides every read
and write), against an ``ssl.SSLSocket`` doing the same (OpenSSL writes to the socket itself).
Two memory-BIO variants: records sent at once (the relay now), and records passed through a
``bytearray`` send queue first (the relay before commit f302443). Not part of the test suite.

    .venv/bin/python benchmarks/tls_write_paths.py [--mb 512] [--rounds 3]

One process, loopback, TLS 1.3 with a throw-away certificate; a thread receives. Rounds alternate
the paths; it prints each round and the median ratios to SSLSocket.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

CHUNK = 256 * 1024  # the relay's read size


def contexts(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-days", "1"], check=True, capture_output=True)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cert)
    return server, client


def receive(listener: socket.socket, server: ssl.SSLContext, total: int) -> None:
    connection, _ = listener.accept()
    with server.wrap_socket(connection, server_side=True) as tls:
        got = 0
        while got < total:
            data = tls.recv(1 << 20)
            if not data:
                return
            got += len(data)


def send(mode: str, server: ssl.SSLContext, client: ssl.SSLContext, total: int) -> float:
    """Sender thread CPU seconds per GB."""
    listener = socket.create_server(("127.0.0.1", 0))
    receiver = threading.Thread(target=receive, args=(listener, server, total))
    receiver.start()
    raw = socket.create_connection(listener.getsockname())
    payload = os.urandom(CHUNK)
    if mode == "SSLSocket":
        tls_socket = client.wrap_socket(raw, server_hostname="localhost")
    else:
        tls_object, _, outgoing = memory_bio_handshake(client, raw)
    before = resource.getrusage(resource.RUSAGE_THREAD)
    sent = 0
    queued = bytearray()
    while sent < total:
        if mode == "SSLSocket":
            tls_socket.sendall(payload)
        elif mode == "memory BIO, queued":  # the relay until f302443: every record through a send queue
            tls_object.write(payload)
            queued += outgoing.read()
            while queued:
                del queued[:raw.send(queued)]
        else:  # the relay now: the records go to send() at once, only a rest is queued
            tls_object.write(payload)
            raw.sendall(outgoing.read())
        sent += CHUNK
    cpu = thread_cpu_since(before)
    receiver.join()
    raw.close()
    listener.close()
    return cpu / (total / 1e9)


def memory_bio_handshake(client: ssl.SSLContext,
                         raw: socket.socket) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A client TLS object over memory BIOs, its handshake done over ``raw`` (blocking)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_object = client.wrap_bio(incoming, outgoing, server_hostname="localhost")
    while True:
        try:
            tls_object.do_handshake()
            raw.sendall(outgoing.read())
            return tls_object, incoming, outgoing
        except ssl.SSLWantReadError:
            raw.sendall(outgoing.read())
            incoming.write(raw.recv(65536))


def thread_cpu_since(before: resource.struct_rusage) -> float:
    """User + system CPU seconds of this thread since ``before`` (getrusage(RUSAGE_THREAD))."""
    after = resource.getrusage(resource.RUSAGE_THREAD)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


Measure = Callable[[str, ssl.SSLContext, ssl.SSLContext, int], float]


def compare_to_sslsocket(measure: Measure, modes: Sequence[str], what: str) -> None:
    """Command line, then rounds of ``measure`` for "SSLSocket" and each of ``modes`` in turn;
    prints each round and the median ratios to SSLSocket."""
    parser = argparse.ArgumentParser(description=(sys.modules["__main__"].__doc__ or "").splitlines()[0])
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    total = args.mb * 1024 * 1024
    with tempfile.TemporaryDirectory() as directory:
        server, client = contexts(Path(directory))
        ratios: dict[str, list[float]] = {mode: [] for mode in modes}
        for round_number in range(args.rounds):
            sslsocket = measure("SSLSocket", server, client, total)
            line = [f"round {round_number + 1}: SSLSocket {sslsocket:.2f} s/GB"]
            for mode, values in ratios.items():
                cpu = measure(mode, server, client, total)
                values.append(cpu / sslsocket)
                line.append(f"{mode} {cpu:.2f} s/GB ({values[-1]:.2f}x)")
            print(", ".join(line))
    for mode, values in ratios.items():
        print(f"median ratio {mode} / SSLSocket ({what} CPU per GB): {statistics.median(values):.2f}x")


def main() -> None:
    compare_to_sslsocket(send, ("memory BIO", "memory BIO, queued"), "sender")


if __name__ == "__main__":
    main()
