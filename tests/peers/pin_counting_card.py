"""A virtual CAC that checks its PIN and counts wrong tries, as a real card does: a fault injector.

    python -m peers.pin_counting_card --db DIR --cert NICKNAME --port PORT --pin-file F --tries-file T

libcacard (tests/virtual_card/bridge.py) has no PIN rules of its own: over an NSS database with an
empty password it accepts any PIN and never counts a wrong one, so with it alone a test cannot see
a PIN try spent on the wrong card. This card puts a real card's rules (ISO 7816 VERIFY, CAC/PIV)
in front of libcacard; everything else is libcacard's:

- its PIN is the first line of ``--pin-file`` (the test's card, not the agent's PIN source); a
  VERIFY with a PIN (OpenSC pads it to 8 bytes with 0xFF) that matches goes on to libcacard and
  resets the counter to 3; one that does not answers 63Cx (x tries left), 6983 once none are left;
- the tries left are kept in ``--tries-file``, across insertions, as a card keeps them;
- a VERIFY without data (OpenSC asking for the tries left) answers 9000 when the PIN was verified
  since the last reset, else 63Cx, so that OpenSC reports "few tries" and "final try" as for a card.

Each wrong try prints ``pin-counting card: PIN wrong, tries left N``.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from virtual_card import bridge

START_TRIES = 3
VERIFY = 0x20
PIN_PAD = b"\xff"
WRONG_PIN_PREFIX = "pin-counting card: PIN wrong, tries left "
VERIFIED, BLOCKED = b"\x90\x00", b"\x69\x83"


def tries_left(tries_file: Path) -> int:
    return int(tries_file.read_text()) if tries_file.exists() else START_TRIES


class PinCountingCard(bridge.EmulatedCard):
    def __init__(self, db: Path, nickname: str, *, pin: bytes, tries_file: Path) -> None:
        super().__init__(db, nickname)
        self.pin = pin
        self.tries_file = tries_file
        self.verified = False  # since the last reset or power-off, as a card's security status

    def power_off(self) -> None:
        self.verified = False
        super().power_off()

    def transmit(self, apdu: bytes) -> bytes:
        if len(apdu) < 4 or apdu[1] != VERIFY:
            return super().transmit(apdu)
        left = tries_left(self.tries_file)
        if len(apdu) <= 5:  # no data: how many tries are left
            return VERIFIED if self.verified else bytes([0x63, 0xC0 | left])
        if left == 0:
            self.verified = False
            return BLOCKED
        if apdu[5:5 + apdu[4]].rstrip(PIN_PAD) == self.pin:
            self.tries_file.write_text(str(START_TRIES))
            self.verified = True
            return super().transmit(apdu)
        left -= 1
        self.tries_file.write_text(str(left))
        self.verified = False
        print(f"{WRONG_PIN_PREFIX}{left}", flush=True)
        return BLOCKED if left == 0 else bytes([0x63, 0xC0 | left])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peers.pin_counting_card", description=__doc__.split("\n")[0])
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pin-file", type=Path, required=True)
    parser.add_argument("--tries-file", type=Path, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        card = PinCountingCard(args.db.resolve(), args.cert, pin=args.pin_file.read_bytes().splitlines()[0],
                               tries_file=args.tries_file)
        sock = bridge.connect(args.host, args.port, 10.0)
    except bridge.BridgeError as error:
        print(f"bridge: {error}", file=sys.stderr, flush=True)
        return 2
    print(f"bridge: card {args.cert!r} inserted into vpcd at {args.host}:{args.port}", flush=True)
    with sock:
        bridge.serve(card, sock)
    print("bridge: vpcd closed the connection", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
