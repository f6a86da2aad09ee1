"""RELP, rsyslog's Reliable Event Logging Protocol, client side: frames out, responses in, no I/O.

Every command is a frame ``TXNR SP COMMAND SP DATALEN [SP DATA] LF``; the server answers each with
``TXNR rsp DATALEN SP CODE SP TEXT [LF DATA] LF`` carrying the same transaction number (``200 OK``
for success). A session starts with ``open`` (offers: ``relp_version=0``, ``commands=syslog``),
carries ``syslog`` commands, and ends with ``close``; the server may end it any time with
``serverclose`` (transaction number 0). Transaction numbers run 1..999,999,999 and wrap to 1.

:class:`RelpSession` numbers the commands, keeps which are unacknowledged (at most ``window``), and
turns received bytes into :class:`Acknowledged`, :class:`Refused` and :class:`ServerClosed`
events; the sink (agent/audit/sinks.py) does the I/O and removes a message from the spool only on
its ``200``. A connection lost before the ``rsp`` arrives leaves the message unacknowledged: it is
sent again on the next connection, so RELP, too, delivers at least once (a duplicate is possible
when the repository took a message but its answer was lost).

No maintained Python RELP client exists (PyPI: ``pyrelp`` 0.6 of 2014 wraps librelp; ``relppy``
is a server), hence this module.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

MAX_TXNR = 999_999_999
MAX_DATALEN = 999_999_999
OPEN_OFFERS = b"relp_version=0\nrelp_software=dicom-card-agent\ncommands=syslog"
_HEADER = re.compile(rb"(\d{1,9}) ([A-Za-z]{1,32}) (\d{1,9})")
_HEADER_LIMIT = 9 + 1 + 32 + 1 + 9 + 1  # a header longer than this without its data is garbage


class RelpProtocolError(ValueError):
    """The server sent something that is not RELP, or a response to nothing we sent."""


@dataclass(frozen=True)
class Frame:
    txnr: int
    command: str
    data: bytes = b""


def encode(frame: Frame) -> bytes:
    """The bytes of one frame."""
    if not 0 <= frame.txnr <= MAX_TXNR:
        raise ValueError(f"RELP transaction number {frame.txnr} is not 0-{MAX_TXNR}")
    if not re.fullmatch(r"[A-Za-z]{1,32}", frame.command):
        raise ValueError(f"RELP command {frame.command!r} is not 1-32 letters")
    if len(frame.data) > MAX_DATALEN:
        raise ValueError(f"RELP data of {len(frame.data)} bytes is too long")
    header = b"%d %s %d" % (frame.txnr, frame.command.encode("ascii"), len(frame.data))
    return header + (b" " + frame.data if frame.data else b"") + b"\n"


class FrameParser:
    """Splits a received byte stream into :class:`Frame` objects."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        while True:
            frame = self._next()
            if frame is None:
                return frames
            frames.append(frame)

    def _next(self) -> Frame | None:
        buffer = self._buffer
        # The header ends at the third space, or at the LF of a frame without data.
        end = -1
        spaces = 0
        for index in range(min(len(buffer), _HEADER_LIMIT)):
            byte = buffer[index]
            if byte == 0x20:
                spaces += 1
                if spaces == 3:
                    end = index
                    break
            elif byte == 0x0A and spaces == 2:
                end = index
                break
        if end < 0:
            if len(buffer) >= _HEADER_LIMIT:
                raise RelpProtocolError(f"no RELP frame header in {bytes(buffer[:40])!r}")
            return None
        match = _HEADER.fullmatch(bytes(buffer[:end]))
        if match is None:
            raise RelpProtocolError(f"not a RELP frame header: {bytes(buffer[:end])!r}")
        txnr, command, length = int(match.group(1)), match.group(2).decode("ascii"), int(match.group(3))
        if buffer[end] == 0x0A:  # "TXNR COMMAND 0" LF
            if length != 0:
                raise RelpProtocolError(f"RELP frame {txnr} {command} announces {length} bytes but has none")
            del buffer[:end + 1]
            return Frame(txnr, command)
        if length == 0:
            raise RelpProtocolError(f"RELP frame {txnr} {command}: DATALEN 0 followed by data")
        total = end + 1 + length + 1
        if len(buffer) < total:
            return None
        if buffer[total - 1] != 0x0A:
            raise RelpProtocolError(f"RELP frame {txnr} {command} does not end with LF after {length} bytes")
        data = bytes(buffer[end + 1:total - 1])
        del buffer[:total]
        return Frame(txnr, command, data)


@dataclass(frozen=True)
class Response:
    code: int
    text: str
    data: bytes = b""

    @property
    def ok(self) -> bool:
        return self.code == 200


def parse_response(data: bytes) -> Response:
    """The data of an ``rsp`` frame: ``CODE [SP TEXT] [LF DATA]``."""
    line, _, rest = data.partition(b"\n")
    match = re.fullmatch(rb"(\d{3})(?: (.*))?", line, re.DOTALL)
    if match is None:
        raise RelpProtocolError(f"not a RELP response: {data[:60]!r}")
    text = (match.group(2) or b"").decode("utf-8", "replace")
    return Response(int(match.group(1)), text, rest)


@dataclass(frozen=True)
class Opened:
    """The server accepted ``open``."""
    response: Response


@dataclass(frozen=True)
class Acknowledged:
    """The server took the message sent with ``key``."""
    key: int


@dataclass(frozen=True)
class Refused:
    """The server answered a command with an error (``key`` None for ``open`` and ``close``)."""
    key: int | None
    command: str
    response: Response


@dataclass(frozen=True)
class ServerClosed:
    """``serverclose`` (the server ends the session), or the answer to our ``close``."""


Event = Opened | Acknowledged | Refused | ServerClosed


class RelpSession:
    """One RELP session's client state. ``key`` is the caller's name for a message (the spool's
    sequence number), returned in its :class:`Acknowledged` event."""

    def __init__(self, window: int = 128, first_txnr: int = 1) -> None:
        if window < 1:
            raise ValueError("the RELP window must be at least 1")
        self.window = window
        self._next_txnr = first_txnr
        self._parser = FrameParser()
        self._waiting: OrderedDict[int, tuple[str, int | None]] = OrderedDict()  # txnr -> (command, key)
        self.opened = False
        self.closing = False

    def _send(self, command: str, data: bytes, key: int | None) -> bytes:
        txnr = self._next_txnr
        self._next_txnr = 1 if txnr >= MAX_TXNR else txnr + 1
        self._waiting[txnr] = (command, key)
        return encode(Frame(txnr, command, data))

    def open(self) -> bytes:
        if self._waiting or self.opened:
            raise RelpProtocolError("RELP open: the session is already open")
        return self._send("open", OPEN_OFFERS, None)

    def can_send(self) -> bool:
        return self.opened and not self.closing and len(self._waiting) < self.window

    def syslog(self, message: bytes, key: int) -> bytes:
        if not self.can_send():
            raise RelpProtocolError("RELP syslog: the session is not open or its window is full")
        return self._send("syslog", message, key)

    def close(self) -> bytes:
        self.closing = True
        return self._send("close", b"", None)

    @property
    def unacknowledged(self) -> list[int]:
        """Keys of the messages sent and not yet acknowledged, oldest first."""
        return [key for command, key in self._waiting.values() if command == "syslog" and key is not None]

    def receive(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        for frame in self._parser.feed(data):
            if frame.command == "serverclose":
                events.append(ServerClosed())
                continue
            if frame.command != "rsp":
                raise RelpProtocolError(f"unexpected RELP command {frame.command!r} from the server")
            if frame.txnr not in self._waiting:
                raise RelpProtocolError(f"RELP response to transaction {frame.txnr}, which was not sent")
            command, key = self._waiting.pop(frame.txnr)
            if command == "close":  # librelp answers close with an empty rsp
                events.append(ServerClosed())
                continue
            response = parse_response(frame.data)
            if not response.ok:
                events.append(Refused(key, command, response))
            elif command == "open":
                self.opened = True
                events.append(Opened(response))
            else:
                assert key is not None
                events.append(Acknowledged(key))
        return events
