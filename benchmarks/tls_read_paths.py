#!/usr/bin/env python3
"""What the relay's way of reading TLS costs: receiver CPU per GB of a DICOM bulk stream
(16 KiB P-DATA-TF PDUs) through an ``ssl.SSLObject`` over memory BIOs, framed by the agent's
``PduFramer`` as the relay frames it, against an ``ssl.SSLSocket`` reading the same stream into a
buffer without framing (OpenSSL reads the socket itself). Two memory-BIO variants: a new bytes
object and a framer feed per TLS record (the relay before), and the records of one socket read
decrypted one after another into one buffer, fed and copied once (agent/tunnel/relay.py now).
Not part of the test suite.

    .venv/bin/python benchmarks/tls_read_paths.py [--mb 512] [--rounds 3]

One process, loopback, TLS 1.3 with a throw-away certificate; a thread sends. Rounds alternate
the paths; it prints each round and the median ratios to SSLSocket.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True

import resource  # noqa: E402
import select  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import struct  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_card_agent.dicom.association import DATA_SET_PREFIX  # noqa: E402
from dicom_card_agent.dicom.pdu import PduFramer  # noqa: E402
from tls_write_paths import compare_to_sslsocket, memory_bio_handshake, thread_cpu_since  # noqa: E402

CHUNK = 256 * 1024  # the relay's read size
PDU_PAYLOAD = 16384 - 12  # storescp's default maximum PDU: 16 KiB, PDU and PDV item headers included
MODES = ("memory BIO, per record", "memory BIO, per read")


def bulk_stream(size: int) -> bytes:
    """Data-set fragments (not the last) on one presentation context, in whole PDUs."""
    pdu = struct.pack(">BxIIBB", 4, PDU_PAYLOAD + 6, PDU_PAYLOAD + 2, 1, 0) + bytes(PDU_PAYLOAD)
    return pdu * (size // len(pdu) + 1)


def send(listener: socket.socket, server: ssl.SSLContext, stream: bytes) -> None:
    connection, _ = listener.accept()
    with server.wrap_socket(connection, server_side=True) as tls:
        tls.sendall(stream)


def framer() -> PduFramer:
    """The relay's framer, past the start of the data set (whose first bytes it keeps)."""
    made = PduFramer(inspect_commands=True, data_set_prefix=DATA_SET_PREFIX, quiet_data=True)
    made.feed(bulk_stream(DATA_SET_PREFIX))  # whole PDUs, more than the prefix
    return made


def receive(mode: str, server: ssl.SSLContext, client: ssl.SSLContext, total: int) -> float:
    """Receiver thread CPU seconds per GB."""
    stream = bulk_stream(total)
    listener = socket.create_server(("127.0.0.1", 0))
    sender = threading.Thread(target=send, args=(listener, server, stream))
    sender.start()
    raw = socket.create_connection(listener.getsockname())
    buffer = memoryview(bytearray(CHUNK))
    got = 0
    if mode == "SSLSocket":
        tls_socket = client.wrap_socket(raw, server_hostname="localhost")
        before = resource.getrusage(resource.RUSAGE_THREAD)
        while got < total:
            count = tls_socket.recv_into(buffer)
            if not count:
                break
            got += count
    else:
        tls, incoming, _ = memory_bio_handshake(client, raw)
        data_framer = framer()
        to_local = bytearray()
        raw.setblocking(False)
        before = resource.getrusage(resource.RUSAGE_THREAD)
        while got < total:
            select.select([raw], [], [])
            count = raw.recv_into(buffer)
            if not count:
                break
            incoming.write(buffer[:count])
            filled = 0
            while True:  # as agent/tunnel/relay.py's _read_tls, each way
                try:
                    if mode == "memory BIO, per record":
                        plain: bytes | memoryview = tls.read(CHUNK)
                    else:
                        filled += tls.read(len(buffer) - filled, buffer[filled:])
                        if filled < len(buffer):
                            continue
                        plain, filled = buffer, 0
                except ssl.SSLWantReadError:
                    if not filled:
                        break
                    plain, filled = buffer[:filled], 0
                data_framer.feed(plain)
                to_local += plain
                got += len(plain)
            del to_local[:]  # as sent to the application
    cpu = thread_cpu_since(before)
    raw.close()
    sender.join()
    listener.close()
    return cpu / (total / 1e9)


def main() -> None:
    compare_to_sslsocket(receive, MODES, "receiver")


if __name__ == "__main__":
    main()
