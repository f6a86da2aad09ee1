"""One virtual CAC card in vpcd's reader: libcacard (over an NSS database) wired to pcscd's vpcd driver.

    python -m virtual_card.bridge --db DIR --cert NICKNAME [--port 35963] [--host 127.0.0.1]
                                  [--apdu-delay-ms MS] [--count-file PATH]

While this process runs, the card is in the reader; when it exits (or is killed) vpcd sees its
socket close and pcscd reports the card removed. So a test "pulls" the card by killing it.

vpcd protocol (vsmartcard's ``vpcd.c``): every message either way is a 2-byte big-endian length
and a payload. From vpcd, a 1-byte payload is a control message (0 power off, 1 power on,
2 reset, 4 "send your ATR"); anything longer is a command APDU, answered with the response APDU.
Only ATR requests and APDUs get an answer.

pcscd asks for the ATR on every presence poll: answering it must NOT power-cycle the emulated card
(libcacard would wipe the applet state and the login, and OpenSC would see a "new" card).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path

LIBCACARD = "libcacard.so.0"
VPCD_PORT = 35963  # /etc/reader.conf.d/vpcd: DEVICENAME /dev/null:0x8C7B, reader "Virtual PCD 00 00"
READER_NAME = "Virtual CAC Reader"  # libcacard's own name for its (only) reader, not pcscd's

POWER_OFF, POWER_ON, RESET, GET_ATR = 0, 1, 2, 4
VREADER_OK = 0
VCARD_EMUL_OK = 0
MAX_RESPONSE = 65536 + 2  # extended-length response data + SW1 SW2


class BridgeError(RuntimeError):
    """libcacard could not present the card, or vpcd could not be reached."""


class EmulatedCard:
    """libcacard's CAC emulation of the certificate ``nickname`` (and its key) in the NSS db ``db``."""

    def __init__(self, db: Path, nickname: str) -> None:
        lib = ctypes.CDLL(LIBCACARD)
        lib.vcard_emul_options.argtypes = [ctypes.c_char_p]
        lib.vcard_emul_options.restype = ctypes.c_void_p
        lib.vcard_emul_init.argtypes = [ctypes.c_void_p]
        lib.vcard_emul_init.restype = ctypes.c_int
        lib.vreader_get_reader_by_name.argtypes = [ctypes.c_char_p]
        lib.vreader_get_reader_by_name.restype = ctypes.c_void_p
        lib.vreader_power_on.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
        lib.vreader_power_on.restype = ctypes.c_int
        lib.vreader_power_off.argtypes = [ctypes.c_void_p]
        lib.vreader_power_off.restype = ctypes.c_int
        lib.vreader_xfr_bytes.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                                          ctypes.POINTER(ctypes.c_int)]
        lib.vreader_xfr_bytes.restype = ctypes.c_int
        self._lib = lib
        # An empty NSS slot name means NSS's internal key slot: the one `certutil -d` writes to.
        # use_hw=no: never mirror real readers NSS might find.
        options = f'db="sql:{db}" use_hw=no soft=(,{READER_NAME},CAC,,{nickname})'
        opts = lib.vcard_emul_options(options.encode())
        if lib.vcard_emul_init(opts) != VCARD_EMUL_OK:
            raise BridgeError(f"libcacard found no certificate {nickname!r} with its key in sql:{db}")
        self._reader = lib.vreader_get_reader_by_name(READER_NAME.encode())
        if not self._reader:
            raise BridgeError(f"libcacard has no reader {READER_NAME!r}")
        self.powered = False
        self.atr = b""
        self.power_on()  # the ATR is needed before the first power-on request (vpcd asks for it first)

    def power_on(self) -> None:
        buffer = ctypes.create_string_buffer(64)
        length = ctypes.c_int(len(buffer))
        if self._lib.vreader_power_on(self._reader, buffer, ctypes.byref(length)) != VREADER_OK:
            raise BridgeError("libcacard refused to power the card on")
        self.atr = buffer.raw[:length.value]
        self.powered = True

    def power_off(self) -> None:
        self._lib.vreader_power_off(self._reader)
        self.powered = False

    def transmit(self, apdu: bytes) -> bytes:
        if not self.powered:
            self.power_on()
        response = ctypes.create_string_buffer(MAX_RESPONSE)
        length = ctypes.c_int(MAX_RESPONSE)
        if self._lib.vreader_xfr_bytes(self._reader, apdu, len(apdu), response, ctypes.byref(length)) != VREADER_OK:
            return b"\x6f\x00"  # "no precise diagnosis", as a card would answer
        return response.raw[:length.value]


def _receive_exactly(sock: socket.socket, count: int) -> bytes | None:
    data = bytearray()
    while len(data) < count:
        # vpcd writes an answer's length and its bytes in two segments without TCP_NODELAY: without
        # an immediate ACK from here, Nagle holds the second one for the 40 ms delayed-ACK timer, on
        # every APDU. Linux clears TCP_QUICKACK after use, so it is set before each read.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack(">H", len(payload)) + payload)


def connect(host: str, port: int, timeout: float) -> socket.socket:
    """vpcd accepts only while pcscd runs; retry briefly so the bridge may start first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=2)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as error:
            if time.monotonic() > deadline:
                raise BridgeError(f"cannot reach vpcd on {host}:{port}: {error}") from None
            time.sleep(0.1)


class ApduCounter:
    """How many APDUs the card answered, kept current in a file (the bridge is killed, not asked, when
    the card is pulled): a benchmark reads it to count what a sign-in costs in card round trips."""

    def __init__(self, path: Path | None) -> None:
        self.count = 0
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if path is not None else None

    def add(self) -> None:
        self.count += 1
        if self._fd is not None:
            text = f"{self.count}\n".encode()
            os.pwrite(self._fd, text, 0)


def read_apdu_count(path: Path) -> int:
    text = path.read_text() if path.exists() else ""
    return int(text) if text.strip() else 0


def serve(card: EmulatedCard, sock: socket.socket, *, apdu_delay: float = 0.0,
          counter: ApduCounter | None = None) -> None:
    """Answer vpcd until it closes the connection; ``apdu_delay`` seconds before each answer stand in
    for a real card's processing and transmission time."""
    while True:
        header = _receive_exactly(sock, 2)
        if header is None:
            return
        (length,) = struct.unpack(">H", header)
        payload = _receive_exactly(sock, length)
        if payload is None:
            return
        if length != 1:
            if _presents_a_pin(payload):
                print(PIN_PRESENTED, flush=True)  # a PIN try: tests count them in the bridge's log
            answer = card.transmit(payload)
            if apdu_delay:
                time.sleep(apdu_delay)
            if counter is not None:
                counter.add()
            _send(sock, answer)
        elif payload[0] == GET_ATR:
            _send(sock, card.atr)  # the cached ATR: see the module docstring
        elif payload[0] == POWER_ON and not card.powered:
            card.power_on()
        elif payload[0] == POWER_OFF:
            card.power_off()
        elif payload[0] == RESET:
            card.power_off()
            card.power_on()


PIN_PRESENTED = "bridge: a PIN presented (VERIFY)"


def _presents_a_pin(apdu: bytes) -> bool:
    """ISO 7816 VERIFY with data: a login's PIN try (VERIFY without data only asks for the tries left)."""
    return len(apdu) > 5 and apdu[1] == 0x20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m virtual_card.bridge", description=__doc__.split("\n")[0])
    parser.add_argument("--db", type=Path, required=True, help="NSS database directory (made by virtual_card.nssdb)")
    parser.add_argument("--cert", required=True, help="nickname of the card's certificate in the database")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=VPCD_PORT)
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    parser.add_argument("--apdu-delay-ms", type=float, default=0.0,
                        help="wait this long before each APDU's answer (a real card's pace; default none)")
    parser.add_argument("--count-file", type=Path, help="keep the number of APDUs answered in this file")
    args = parser.parse_args(argv)
    # SIGTERM ends the process at once: the socket closes and the card is "pulled".
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        card = EmulatedCard(args.db.resolve(), args.cert)
        sock = connect(args.host, args.port, args.connect_timeout)
    except BridgeError as error:
        print(f"bridge: {error}", file=sys.stderr, flush=True)
        return 2
    # The fixtures wait for this line: from now on the card is in the reader.
    print(f"bridge: card {args.cert!r} inserted into vpcd at {args.host}:{args.port}", flush=True)
    with sock:
        serve(card, sock, apdu_delay=args.apdu_delay_ms / 1000, counter=ApduCounter(args.count_file))
    print("bridge: vpcd closed the connection", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
